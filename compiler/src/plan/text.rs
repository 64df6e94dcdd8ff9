//! [`Plan::to_text`]: the readable form, one line per kernel (`--emit plan-text`, snapshot-tested).

use super::*;

impl Plan {
    /// The stable text form: one line per kernel in launch order, slots numbered as in the
    /// graph's text (`snfc compile --emit ir-opt`), each written value with its buffer.
    ///
    /// ```text
    /// k4 = gemm %1, %0ᵀ, +1·%3 -> %5 in b2 : [784, 100]
    /// k5 = fused [784 x 100] (%5, %6) { .0 = softplus e0; .1 = sum0 .0 } -> %9 = .1 in b3
    /// ```
    pub fn to_text(&self) -> String {
        use crate::ir::print::{op_text, shape_text};
        use std::fmt::Write;
        let mut out = String::new();
        let (total, naive) = self.buffers.footprint(self);
        let _ = writeln!(out, "plan {} {{", self.name);
        let _ = writeln!(
            out,
            "  {} kernels, {} buffers ({total} elements; {naive} without reuse)",
            self.kernels(),
            self.buffers.sizes.len()
        );
        let view = |s: usize| -> String {
            // Transposes are views: name the stored slot and mark the transpose.
            let (st, t) = self.view(s);
            format!("%{st}{}", if t { "ᵀ" } else { "" })
        };
        let buf = |s: usize| match self.buffers.of_slot.get(s).copied().flatten() {
            Some(b) => format!("b{b}"),
            None => "-".into(),
        };
        let mut k = 0;
        for &i in &self.order {
            let ins = &self.instrs[i];
            if !ins.is_kernel() {
                continue;
            }
            let args: Vec<String> = ins.args.iter().map(|a| view(*a)).collect();
            let line = match (&ins.group, &ins.epilogue) {
                (Some(g), _) => {
                    let members: Vec<String> = g
                        .kernel
                        .members
                        .iter()
                        .enumerate()
                        .map(|(m, mem)| {
                            let a: Vec<String> = mem
                                .args
                                .iter()
                                .map(|s| match s {
                                    Src::Reg(r) => format!(".{r}"),
                                    Src::Ext(e) => format!("e{e}"),
                                })
                                .collect();
                            format!(".{m} = {} {}", op_text(&mem.op), a.join(", "))
                        })
                        .collect();
                    let outs: Vec<String> = g
                        .kernel
                        .outputs
                        .iter()
                        .zip(&g.slots)
                        .map(|((m, _), s)| format!("%{s} = .{m} in {}", buf(*s)))
                        .collect();
                    format!(
                        "fused [{} x {}] ({}) {{ {} }} -> {}",
                        g.kernel.rows,
                        g.kernel.cols,
                        args.join(", "),
                        members.join("; "),
                        outs.join(", ")
                    )
                }
                (None, Some(e)) => format!(
                    "gemm {}, {}, {:+}·(product) {:+}·{} -> %{i} in {} : {}",
                    args[0],
                    args[1],
                    e.alpha,
                    e.beta,
                    args[2],
                    buf(i),
                    shape_text(&ins.shape)
                ),
                (None, None) => format!(
                    "{} {} -> %{i} in {} : {}",
                    if ins.op == Op::MatMul {
                        "gemm".to_string()
                    } else {
                        op_text(&ins.op)
                    },
                    args.join(", "),
                    buf(i),
                    shape_text(&ins.shape)
                ),
            };
            let _ = writeln!(out, "  k{k} = {line}");
            k += 1;
        }
        if let Some(r) = &self.all_reduce {
            let slots: Vec<String> = r
                .outputs
                .iter()
                .filter_map(|name| self.outputs.iter().find(|(n, _)| n == name))
                .map(|(_, s)| view(*s))
                .collect();
            let _ = writeln!(
                out,
                "  all_reduce mean ({}) : {} gradients in one buffer of {} values (over the ranks; nothing alone)",
                slots.join(", "),
                r.outputs.len(),
                r.elements
            );
        }
        for (name, s) in &self.outputs {
            let _ = writeln!(out, "  output {name} = {}", view(*s));
        }
        out.push_str("}\n");
        out
    }
}
