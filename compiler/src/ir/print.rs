//! The stable text form of a graph, one node per line in topological order:
//!
//! ```text
//! graph mnist_fc2.train {
//!   %0 = input x : [784, 100]
//!   %1 = param layers.0.weight : [784, 784]
//!   %2 = matmul %1, %0 : [784, 100] @layers.0
//!   ...
//!   inverse_pair layers.0.weight, layers.0.weight_inv
//!   output loss = %41
//! }
//! ```
//! Node numbers are dense and follow creation order, so the text only changes when the graph does.
//! `@region` follows nodes outside the default region `input` (leaves have none);
//! `inverse_pair W, R` lines are the learned-inverse declarations. An op is printed as its
//! token, the same text that names it in the e-graph and in rewrite rules.

use super::{Graph, Op, Region};
use std::collections::HashMap;
use std::fmt::Write;

pub(crate) fn shape_text(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// The op as printed: its token (`matmul`, `sum0`, `toeplitz:4x4`, `reshape:1x4x4x2`), which is
/// also its e-graph operator. Leaves print their name (`input x`, `param layers.0.weight`,
/// `const 0.5`): their shape is the line's, and their e-graph token carries it
/// (`param:layers.0.weight:784x784`).
pub(crate) fn op_text(op: &Op) -> String {
    match op {
        Op::Input { name, .. } => format!("input {name}"),
        Op::Param { name, .. } => format!("param {name}"),
        Op::Const { bits } => format!("const {:?}", f64::from_bits(*bits)),
        other => other.to_string(),
    }
}

pub fn to_text(g: &Graph) -> String {
    let mut out = String::new();
    let mut number = HashMap::new();
    let _ = writeln!(out, "graph {} {{", g.name);
    for (i, n) in g.nodes().into_iter().enumerate() {
        number.insert(n, i);
        let node = g.node(n);
        let args: Vec<String> = g
            .inputs(n)
            .iter()
            .map(|a| format!("%{}", number[a]))
            .collect();
        let sep = if args.is_empty() { "" } else { " " };
        let region = match node.region {
            Region::Input => String::new(),
            r => format!(" @{r}"),
        };
        let _ = writeln!(
            out,
            "  %{i} = {}{sep}{} : {}{region}",
            op_text(&node.op),
            args.join(", "),
            shape_text(&node.shape)
        );
    }
    for p in &g.pairs {
        let _ = writeln!(out, "  inverse_pair {}, {}", p.forward, p.inverse);
    }
    for (name, n) in &g.outputs {
        let _ = writeln!(out, "  output {name} = %{}", number[n]);
    }
    out.push_str("}\n");
    out
}
