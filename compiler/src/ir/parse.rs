//! The reader of the text form that `Graph::to_text` writes:
//!
//! ```text
//! graph mnist_fc2.train {
//!   %0 = input x : [784, 100]
//!   %1 = param layers.0.weight : [784, 784]
//!   %2 = const 0.5 : []
//!   %3 = matmul %1, %0 : [784, 100] @layers.0
//!   %4 = sum0 %3 : [100] @layers.0
//!   %5 = bcast0:784x100 %4 : [784, 100] @layers.0
//!   inverse_pair layers.0.weight, layers.0.weight_inv
//!   output y = %5
//! }
//! ```
//!
//! One item per line; blank lines and lines starting with `;` are ignored. A node's `%N` must be
//! defined before it is used, but need not be dense or ordered (hand-written files may number as
//! they like): the graph is rebuilt through [`GraphBuilder`], so printing it again numbers
//! densely, and identical lines (same op, same operands) become one node. Every node's declared
//! shape `: [..]` must equal the shape its op infers from its operands (a leaf's shape is its
//! declaration). An op is its token (`Op`'s `FromStr`, the e-graph's spelling: `sum0`,
//! `toeplitz:4x4`, `reshape:1x4x4x2`); leaves are `input NAME`, `param NAME`, `const VALUE`. `@region` (`input`, `layers.K`,
//! `loss`) may follow non-leaf nodes. Every malformed input is a [`ParseError`] naming the line,
//! never a panic.

use super::{Graph, GraphBuilder, NodeIndex, Op, Region, Shape};
use std::collections::HashMap;

/// Why a text is not a graph: the 1-based line and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

type Res<T> = Result<T, String>;

/// Parse the text form of a graph (see the module documentation).
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with(';'));
    let err = |line: usize, message: String| ParseError { line, message };

    let Some((first, header)) = lines.next() else {
        return Err(err(1, "empty input: expected `graph NAME {`".into()));
    };
    let name = header_name(header).map_err(|m| err(first, m))?;
    let mut p = Parser {
        b: GraphBuilder::new(name),
        nodes: HashMap::new(),
        outputs: Vec::new(),
    };
    let mut last = first;
    let mut closed = None;
    for (n, line) in lines.by_ref() {
        last = n;
        if line == "}" {
            closed = Some(n);
            break;
        }
        p.line(line).map_err(|m| err(n, m))?;
    }
    if closed.is_none() {
        return Err(err(
            last + 1,
            format!("missing `}}` closing the graph opened on line {first}"),
        ));
    }
    if let Some((n, line)) = lines.next() {
        return Err(err(
            n,
            format!("unexpected {line:?} after the graph's closing `}}`"),
        ));
    }
    Ok(p.b.finish())
}

/// `graph NAME {` → `NAME`.
fn header_name(line: &str) -> Res<&str> {
    let expected = || format!("expected `graph NAME {{`, found {line:?}");
    let rest = line.strip_prefix("graph").ok_or_else(expected)?;
    let rest = rest.strip_suffix('{').ok_or_else(expected)?;
    if !rest.starts_with(char::is_whitespace) {
        return Err(expected());
    }
    let name = rest.trim();
    if name.is_empty() {
        return Err(format!("missing graph name in {line:?}"));
    }
    Ok(name)
}

struct Parser {
    b: GraphBuilder,
    /// `%N` of the text → node.
    nodes: HashMap<usize, NodeIndex>,
    outputs: Vec<String>,
}

impl Parser {
    fn line(&mut self, line: &str) -> Res<()> {
        if line.starts_with('%') {
            return self.node(line);
        }
        let (word, rest) = split_word(line);
        match word {
            "inverse_pair" => {
                let (w, r) = rest
                    .split_once(',')
                    .ok_or_else(|| format!("expected `inverse_pair W, R`, found {line:?}"))?;
                let (w, r) = (name_token(w, "parameter")?, name_token(r, "parameter")?);
                self.b.declare_inverse_pair(w, r);
                Ok(())
            }
            "output" => {
                let (name, value) = rest
                    .split_once('=')
                    .ok_or_else(|| format!("expected `output NAME = %N`, found {line:?}"))?;
                let name = name_token(name, "output")?;
                if self.outputs.iter().any(|o| o == name) {
                    return Err(format!("output {name} declared twice"));
                }
                let n = self.operand(value)?;
                self.outputs.push(name.to_string());
                self.b.output(name, n);
                Ok(())
            }
            "graph" => Err("a second `graph` header inside a graph".into()),
            _ => Err(format!(
                "expected `%N = ...`, `inverse_pair`, `output` or `}}`, found {line:?}"
            )),
        }
    }

    /// `%N = OP [ATTR] [OPERANDS] : [SHAPE] [@REGION]`
    fn node(&mut self, line: &str) -> Res<()> {
        let (lhs, rhs) = line
            .split_once('=')
            .ok_or_else(|| format!("expected `%N = OP ... : [SHAPE]`, found {line:?}"))?;
        let id = node_number(lhs.trim())?;
        if self.nodes.contains_key(&id) {
            return Err(format!("%{id} is defined twice"));
        }
        let mut rhs = rhs.trim();
        let mut region = None;
        if let Some((before, last)) = rhs.rsplit_once(char::is_whitespace) {
            if let Some(r) = last.strip_prefix('@') {
                region = Some(r.parse::<Region>()?);
                rhs = before.trim_end();
            }
        }
        let (body, shape) = rhs
            .rsplit_once(':')
            .ok_or_else(|| format!("missing `: [SHAPE]` in {line:?}"))?;
        let declared = shape_of(shape.trim())?;
        let (op, args) = op_of(body.trim(), &declared)?;
        let ins = args
            .iter()
            .map(|a| self.operand(a))
            .collect::<Res<Vec<_>>>()?;
        let shapes: Vec<Shape> = ins.iter().map(|i| self.b.shape(*i).clone()).collect();
        let inferred = op.infer_shape(&shapes)?;
        if inferred != declared {
            return Err(format!(
                "%{id} is declared {} but {} gives {}",
                super::print::shape_text(&declared),
                super::print::op_text(&op),
                super::print::shape_text(&inferred)
            ));
        }
        if op.arity() == 0 && region.is_some_and(|r| r != Region::Input) {
            return Err(format!(
                "%{id}: a leaf ({}) belongs to no region",
                super::print::op_text(&op)
            ));
        }
        self.b.set_region(region.unwrap_or_default());
        let n = self.b.add_shaped(op, &ins, inferred);
        self.nodes.insert(id, n);
        Ok(())
    }

    /// `%N`, defined on an earlier line.
    fn operand(&self, text: &str) -> Res<NodeIndex> {
        let id = node_number(text.trim())?;
        self.nodes
            .get(&id)
            .copied()
            .ok_or_else(|| format!("%{id} is used before it is defined"))
    }
}

/// The first whitespace-separated word and the rest.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim_start()),
        None => (s, ""),
    }
}

fn node_number(s: &str) -> Res<usize> {
    let digits = s
        .strip_prefix('%')
        .ok_or_else(|| format!("expected a node `%N`, found {s:?}"))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad node number {s:?}"));
    }
    digits
        .parse()
        .map_err(|e| format!("bad node number {s:?}: {e}"))
}

/// A name (of a parameter, input or output): one word.
fn name_token<'a>(s: &'a str, what: &str) -> Res<&'a str> {
    let s = s.trim();
    if s.is_empty() || s.contains(char::is_whitespace) || s.contains(',') {
        return Err(format!("bad {what} name {s:?}"));
    }
    Ok(s)
}

/// `[]`, `[n]`, `[rows, cols]` or any rank beyond.
fn shape_of(s: &str) -> Res<Shape> {
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| format!("expected a shape `[..]`, found {s:?}"))?;
    if inner.trim().is_empty() {
        return Ok(vec![]);
    }
    let shape = inner
        .split(',')
        .map(|d| {
            let d = d.trim();
            d.parse::<usize>()
                .map_err(|e| format!("bad dimension {d:?} in shape {s}: {e}"))
        })
        .collect::<Res<Shape>>()?;
    Ok(shape)
}

/// The op of `OP [ATTR] [OPERANDS]` and its operand texts; `declared` is the line's shape
/// (a leaf's shape and a broadcast's target).
fn op_of<'a>(body: &'a str, declared: &Shape) -> Res<(Op, Vec<&'a str>)> {
    let (word, rest) = split_word(body);
    let leaf = |what: &str| -> Res<String> {
        let name = name_token(rest, what)?;
        if name.starts_with('%') {
            return Err(format!("{word} takes a name, not an operand: {body:?}"));
        }
        Ok(name.to_string())
    };
    let op = match word {
        "input" => {
            let name = leaf("input")?;
            return Ok((
                Op::Input {
                    name,
                    shape: declared.clone(),
                },
                vec![],
            ));
        }
        "param" => {
            let name = leaf("parameter")?;
            return Ok((
                Op::Param {
                    name,
                    shape: declared.clone(),
                },
                vec![],
            ));
        }
        "const" => {
            let v = rest.trim();
            let v = v
                .parse::<f64>()
                .map_err(|e| format!("bad number {v:?} in const: {e}"))?;
            return Ok((Op::constant(v), vec![]));
        }
        // Every other op is its token, as the e-graph spells it.
        token => token.parse::<Op>()?,
    };
    if matches!(op, Op::Input { .. } | Op::Param { .. } | Op::Const { .. }) {
        return Err(format!(
            "{word}: a leaf is written `input NAME`, `param NAME` or `const VALUE`"
        ));
    }
    let args: Vec<&str> = if rest.trim().is_empty() {
        vec![]
    } else {
        rest.split(',').map(str::trim).collect()
    };
    if args.len() != op.arity() {
        return Err(format!(
            "{word} takes {} operand{}, got {}",
            op.arity(),
            if op.arity() == 1 { "" } else { "s" },
            args.len()
        ));
    }
    Ok((op, args))
}

#[cfg(test)]
mod tests {

    #[test]
    fn tensor_and_convolution_ops_round_trip() {
        let text = "graph conv {
  %0 = input x : [1, 4, 4, 2]
  %1 = param k : [1, 1, 3, 3]
  %2 = conv2d %0, %1 : [1, 4, 4, 2] @layers.0
  %3 = flip_kernel %1 : [1, 1, 3, 3] @layers.0
  %4 = conv_kernel_grad:3 %2, %0 : [1, 1, 3, 3] @layers.0
  %5 = toeplitz:4x4 %1 : [16, 16] @layers.0
  %6 = toeplitz_adjoint:4x4:3 %5 : [1, 1, 3, 3] @layers.0
  %7 = reshape:16x2 %2 : [16, 2] @layers.0
  %8 = permute:1.0 %7 : [2, 16] @layers.0
  %9 = reduce_sum:0.1.2 %2 : [2] @loss
  %10 = expand:0.1.2:1x4x4x2 %9 : [1, 4, 4, 2] @loss
  output a = %3
  output b = %4
  output c = %6
  output d = %8
  output e = %10
}
";
        let g = parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.to_text(), text);
        let bad = text.replace("permute:1.0", "permute:0.0");
        assert!(parse(&bad).is_err());
        let missing = text.replace("toeplitz:4x4 %1", "toeplitz:4 %1");
        let e = parse(&missing).expect_err("w is missing");
        assert_eq!(e.line, 7, "{e}");
    }

    use super::*;

    const GOOD: &str = "\
graph t {
  %0 = input x : [3, 2]
  %1 = param w : [3, 3]
  %2 = const 0.5 : []
  %3 = matmul %1, %0 : [3, 2] @layers.0
  %4 = mul %3, %2 : [3, 2] @layers.0
  %5 = sum0 %4 : [2] @loss
  %6 = bcast0:3x2 %5 : [3, 2] @loss
  %7 = sum %6 : [] @loss
  inverse_pair w, w_inv
  output y = %7
}
";

    #[test]
    fn reads_what_it_prints() {
        let g = parse(GOOD).expect("parses");
        assert_eq!(g.to_text(), GOOD);
        assert_eq!(g.pairs.len(), 1);
    }

    #[test]
    fn sparse_numbers_become_dense_and_duplicates_merge() {
        let text = "\
; a comment
graph t {
  %10 = param w : [2, 2]
  %7 = transpose %10 : [2, 2]

  %8 = transpose %10 : [2, 2]
  %3 = matmul %7, %8 : [2, 2] @layers.1
  output y = %3
}
";
        let g = parse(text).expect("parses");
        assert_eq!(
            g.to_text(),
            "\
graph t {
  %0 = param w : [2, 2]
  %1 = transpose %0 : [2, 2]
  %2 = matmul %1, %1 : [2, 2] @layers.1
  output y = %2
}
"
        );
    }

    /// Each malformed input, the line its error must name and a word of its message.
    #[test]
    fn malformed_inputs_are_errors_naming_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "empty"),
            ("grph t {\n}", 1, "graph NAME"),
            ("graph t {\n  %0 = frob %1 : [2]\n}", 2, "unknown op"),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  %1 = transpose %5 : [2, 2]\n}",
                3,
                "%5",
            ),
            (
                "graph t {\n  %0 = param w : [2, 3]\n  %1 = transpose %0 : [2, 3]\n}",
                3,
                "declared [2, 3]",
            ),
            (
                "graph t {\n  %0 = param w : [2, 3]\n  %1 = matmul %0, %0 : [2, 3]\n}",
                3,
                "matmul",
            ),
            ("graph t {\n  %0 = const 1.2.3 : []\n}", 2, "bad number"),
            ("graph t {\n  %0 = param w : [2, x]\n}", 2, "bad dimension"),
            ("graph t {\n  %0 = param w : [2, 2]\n", 3, "missing `}`"),
            (
                "graph t {\n  %0 = param w : [2, 2]\n}\n%1 = neg %0 : [2, 2]",
                4,
                "after",
            ),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  %0 = param v : [2, 2]\n}",
                3,
                "twice",
            ),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  %1 = neg %0, %0 : [2, 2]\n}",
                3,
                "operand",
            ),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  %1 = neg %0 : [2, 2] @nowhere\n}",
                3,
                "region",
            ),
            (
                "graph t {\n  %0 = param w : [2, 2] @layers.0\n}",
                2,
                "region",
            ),
            (
                "graph t {\n  %0 = param w : [2, 2, 2]\n  %1 = transpose %0 : [2, 2, 2]\n}",
                3,
                "matrix",
            ),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  %1 = sum2 %0 : [2]\n}",
                3,
                "sum2",
            ),
            (
                "graph t {\n  %0 = param w : [2]\n  %1 = bcast1:3x4 %0 : [3, 4]\n}",
                3,
                "broadcast",
            ),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  %1 = reshape:4 %0 : [2, 2]\n}",
                3,
                "declared [2, 2]",
            ),
            ("graph t {\n  %0 = param:w:2x2 : [2, 2]\n}", 2, "param NAME"),
            ("graph t {\n  %0 = const 1.0 : [2]\n}", 2, "declared [2]"),
            ("graph t {\n  output y = %0\n}", 2, "%0"),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  output y = %0\n  output y = %0\n}",
                4,
                "twice",
            ),
            ("graph t {\n  %x = param w : [2, 2]\n}", 2, "node number"),
            (
                "graph t {\n  %99999999999999999999999 = param w : [2]\n}",
                2,
                "node number",
            ),
            ("graph t {\n  %0 = param w\n}", 2, "SHAPE"),
            ("graph t {\n  inverse_pair w\n}", 2, "inverse_pair"),
            (
                "graph t {\n  %0 = param w : [2, 2]\n  %1 = inverse : [2, 2]\n}",
                3,
                "operand",
            ),
            ("graph t {\n  frobnicate\n}", 2, "expected"),
        ];
        for (text, line, word) in cases {
            match parse(text) {
                Ok(g) => panic!("{text:?} parsed as\n{}", g.to_text()),
                Err(e) => {
                    assert_eq!(e.line, *line, "{text:?}: {e}");
                    let shown = e.to_string();
                    assert!(shown.starts_with(&format!("line {line}: ")), "{shown}");
                    assert!(shown.contains(word), "{text:?}: {shown} lacks {word:?}");
                }
            }
        }
    }

    /// Every prefix and every single-byte corruption of a good text gives a graph or an error,
    /// never a panic.
    #[test]
    fn never_panics() {
        for end in 0..GOOD.len() {
            if GOOD.is_char_boundary(end) {
                let _ = parse(&GOOD[..end]);
            }
        }
        let junk = [
            '%', ':', '[', ']', ',', '=', '@', '}', '0', '9', ' ', '\n', '-', 'x',
        ];
        let bytes = GOOD.as_bytes();
        for i in 0..bytes.len() {
            for c in junk {
                let mut t = bytes.to_vec();
                t[i] = c as u8;
                let _ = parse(&String::from_utf8_lossy(&t));
            }
        }
    }
}
