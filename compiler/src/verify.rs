//! The post-conditions of the compiler's passes, checked on every compile: what must hold after
//! each pass for the step to be the algorithm the spec asked for. A pass that breaks one is a
//! compile error naming the layer, the op and the node, never a quietly different step.
//!
//! | after | what holds |
//! | --- | --- |
//! | lowering | every declared inverse pair names two parameters of the graph, of one shape |
//! | `self_normalize` | (self-normalizing specs) no `inverse` or `logdet`: every O(D³) inverse and log-determinant is gone; every output is still computed, at its shape |
//! | `optimize` | every output is still computed, at its shape; (self-normalizing specs) no `inverse`, `logdet`, `toeplitz` or `toeplitz_adjoint`: no dense matrix of a convolution either |

use crate::ir::print::op_text;
use crate::ir::{Graph, Op, Region};
use crate::spec::FlowSpec;
use std::collections::HashMap;

/// A post-condition a pass broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("after {pass}: {what}")]
pub struct Violation {
    /// The pass after which the condition failed (`lowering`, `self_normalize`, `optimize`).
    pub pass: String,
    pub what: String,
}

/// After lowering (and for any graph a rewrite is given): every declared pair resolves to two
/// parameters of the graph with the same shape. A pair that named no parameter would make the
/// substitution silently skip that layer.
pub fn pairs_resolve(g: &Graph, pass: &str) -> Result<(), Violation> {
    let params: HashMap<&str, &Vec<usize>> = g
        .nodes()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::Param { name, shape } => Some((name.as_str(), shape)),
            _ => None,
        })
        .collect();
    for p in &g.pairs {
        let violation = |what: String| Violation {
            pass: pass.to_string(),
            what: format!("inverse_pair {}, {}: {what}", p.forward, p.inverse),
        };
        let shape = |name: &str| {
            params
                .get(name)
                .copied()
                .ok_or_else(|| violation(format!("`{name}` is not a parameter of the graph")))
        };
        let (w, r) = (shape(&p.forward)?, shape(&p.inverse)?);
        if w != r {
            return Err(violation(format!(
                "the shapes differ ({w:?} and {r:?}), so one cannot be the other's inverse"
            )));
        }
    }
    Ok(())
}

/// The ops a self-normalizing step never holds: the O(D³) terms the substitution removes, and
/// (once the algebra has run, `dense_convolutions` false) the dense `(C·H·W)²` matrices of
/// convolutions, which the convolution forms replace.
fn forbidden(op: &Op, dense_convolutions: bool) -> Option<&'static str> {
    match op {
        Op::Inverse => Some("an O(D³) inverse"),
        Op::LogDet => Some("an O(D³) log-determinant"),
        Op::Toeplitz { .. } if !dense_convolutions => {
            Some("the dense Toeplitz matrix of a convolution")
        }
        Op::ToeplitzAdjoint { .. } if !dense_convolutions => {
            Some("the adjoint of a dense Toeplitz matrix")
        }
        _ => None,
    }
}

/// A region as a user reads it: `layers.3 (conv)`.
fn describe(spec: &FlowSpec, region: Region) -> String {
    match region {
        Region::Layer(k) => {
            let kind = spec
                .layers
                .get(k)
                .and_then(|l| serde_json::to_value(l).ok())
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string));
            match kind {
                Some(kind) => format!("layer {k} (`{kind}`, /layers/{k})"),
                None => format!("layer {k}"),
            }
        }
        Region::Input => "the input preprocessing".to_string(),
        Region::Loss => "the objective".to_string(),
    }
}

/// After the substitution (`dense_convolutions` true: its term-by-term gradients still hold
/// the convolutions' dense forms, which `--no-fusion` runs) and after the algebra (false) of a
/// self-normalizing spec: the step holds none of the ops of [`forbidden`]. The first offending
/// node is named with its layer.
pub fn self_normalized(
    g: &Graph,
    spec: &FlowSpec,
    pass: &str,
    dense_convolutions: bool,
) -> Result<(), Violation> {
    let forbidden_in_self_normalizing_step = |op: &Op| forbidden(op, dense_convolutions);
    for (number, n) in g.nodes().into_iter().enumerate() {
        let node = g.node(n);
        if let Some(what) = forbidden_in_self_normalizing_step(&node.op) {
            let count = g
                .nodes()
                .into_iter()
                .filter(|&m| forbidden_in_self_normalizing_step(&g.node(m).op).is_some())
                .count();
            return Err(Violation {
                pass: pass.to_string(),
                what: format!(
                    "the self-normalizing step of spec `{}` still holds {what} in {}: `%{} = {} : {:?}`{}; the step would not be the algorithm the spec asks for (its gradient is /objective/gradient = \"self_normalizing\")",
                    spec.name,
                    describe(spec, node.region),
                    number,
                    op_text(&node.op),
                    node.shape,
                    if count > 1 {
                        format!(" (and {} more such nodes)", count - 1)
                    } else {
                        String::new()
                    }
                ),
            });
        }
    }
    Ok(())
}

/// After a rewrite: the step computes the outputs it was given, each at its shape.
pub fn outputs_kept(before: &Graph, after: &Graph, pass: &str) -> Result<(), Violation> {
    let shapes = |g: &Graph| -> HashMap<String, Vec<usize>> {
        g.outputs
            .iter()
            .map(|(name, n)| (name.clone(), g.node(*n).shape.clone()))
            .collect()
    };
    let (a, b) = (shapes(before), shapes(after));
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    for name in names {
        match b.get(name) {
            None => {
                return Err(Violation {
                    pass: pass.to_string(),
                    what: format!("output `{name}` is no longer computed"),
                })
            }
            Some(s) if *s != a[name] => {
                return Err(Violation {
                    pass: pass.to_string(),
                    what: format!("output `{name}` changed shape from {:?} to {s:?}", a[name]),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_spec;

    fn graph(body: &str) -> Graph {
        Graph::from_text(&format!("graph t {{\n{body}\n}}\n")).expect("graph text")
    }

    #[test]
    fn a_pair_must_name_two_parameters_of_one_shape() {
        let ok =
            graph("%0 = param w : [3, 3]\n%1 = param r : [3, 3]\ninverse_pair w, r\noutput y = %0");
        assert_eq!(pairs_resolve(&ok, "lowering"), Ok(()));
        let missing = graph("%0 = param w : [3, 3]\ninverse_pair w, rr\noutput y = %0");
        let e = pairs_resolve(&missing, "lowering").unwrap_err().to_string();
        assert_eq!(
            e,
            "after lowering: inverse_pair w, rr: `rr` is not a parameter of the graph"
        );
        let shapes =
            graph("%0 = param w : [3, 3]\n%1 = param r : [4, 4]\ninverse_pair w, r\noutput y = %0");
        let e = pairs_resolve(&shapes, "lowering").unwrap_err().to_string();
        assert!(e.contains("[3, 3] and [4, 4]"), "{e}");
        // The substitution refuses such a graph rather than skipping the pair.
        let e = crate::rewrite::self_normalize(&missing, crate::rewrite::Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rr` is not a parameter"), "{e}");
    }

    #[test]
    fn a_self_normalizing_step_holds_no_inverse_and_no_dense_convolution() {
        let spec = parse_spec(
            r#"{"name": "s", "input": {"shape": [1, 4, 4], "preprocess": "none"},
                "layers": [{"type": "conv", "kernel_size": 3}]}"#,
        )
        .unwrap();
        let inverse = graph(
            "%0 = param w : [4, 4]\n%1 = inverse %0 : [4, 4] @layers.0\n\
             %2 = inverse %1 : [4, 4] @layers.0\noutput y = %2",
        );
        let e = self_normalized(&inverse, &spec, "optimize", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("after optimize: the self-normalizing step of spec `s` still holds an O(D³) inverse in layer 0 (`conv`, /layers/0): `%1 = inverse : [4, 4]` (and 1 more such nodes)"),
            "{e}"
        );
        let dense = graph(
            "%0 = param w : [1, 1, 3, 3]\n%1 = toeplitz:4x4 %0 : [16, 16] @layers.0\noutput y = %1",
        );
        // The substitution's term-by-term step may hold the dense form; the algebra's may not.
        assert_eq!(
            self_normalized(&dense, &spec, "self_normalize", true),
            Ok(())
        );
        let e = self_normalized(&dense, &spec, "optimize", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the dense Toeplitz matrix of a convolution"),
            "{e}"
        );
    }

    #[test]
    fn a_rewrite_keeps_every_output_at_its_shape() {
        let before =
            graph("%0 = param a : [2, 3]\n%1 = param b : [3, 3]\noutput y = %0\noutput z = %1");
        let lost = graph("%0 = param a : [2, 3]\noutput y = %0");
        let e = outputs_kept(&before, &lost, "optimize")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "after optimize: output `z` is no longer computed");
        let reshaped =
            graph("%0 = param a : [2, 3]\n%1 = param b : [9]\noutput y = %0\noutput z = %1");
        let e = outputs_kept(&before, &reshaped, "optimize")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`z` changed shape from [3, 3] to [9]"), "{e}");
        assert_eq!(outputs_kept(&before, &before, "optimize"), Ok(()));
    }
}
