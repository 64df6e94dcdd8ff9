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
//! `inverse_pair W, R` lines are the learned-inverse declarations.

use super::{Graph, Op, Region};
use std::collections::HashMap;
use std::fmt::Write;

pub(crate) fn shape_text(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// The op's name and attributes as printed (leaves print their name, not their shape twice).
pub(crate) fn op_text(op: &Op) -> String {
    match op {
        Op::Input { name, .. } => format!("input {name}"),
        Op::Param { name, .. } => format!("param {name}"),
        Op::Const { bits } => format!("const {:?}", f64::from_bits(*bits)),
        Op::Sum { axis: None } => "sum".into(),
        Op::Sum { axis: Some(a) } => format!("sum axis={a}"),
        Op::Broadcast { new_axis: None, .. } => "broadcast".into(),
        Op::Broadcast {
            new_axis: Some(a), ..
        } => format!("broadcast axis={a}"),
        Op::Reshape { .. } => "reshape".into(),
        Op::Permute { perm } => format!("permute perm={}", dotted(perm)),
        Op::Take { axis, index } => format!("take axis={axis} index={index}"),
        Op::Embed { axis, index, size } => format!("embed axis={axis} index={index} size={size}"),
        Op::ReduceSum { axes } => format!("reduce_sum axes={}", dotted(axes)),
        Op::Expand { axes, .. } => format!("expand axes={}", dotted(axes)),
        Op::ConvKernelGrad { k } => format!("conv_kernel_grad k={k}"),
        Op::Toeplitz { h, w } => format!("toeplitz h={h} w={w}"),
        Op::Multiplicity { h, w } => format!("multiplicity h={h} w={w}"),
        Op::Spline { bins, bound, part } => format!(
            "spline bins={bins} bound={:?} part={}",
            f64::from_bits(*bound),
            part.name()
        ),
        Op::SplineGrad {
            bins,
            bound,
            part,
            wrt,
        } => format!(
            "spline_grad bins={bins} bound={:?} part={} wrt={wrt}",
            f64::from_bits(*bound),
            part.name()
        ),
        Op::ToeplitzAdjoint { h, w, k } => format!("toeplitz_adjoint h={h} w={w} k={k}"),
        other => other.to_string(),
    }
}

fn dotted(v: &[usize]) -> String {
    v.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(".")
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
