//! The host executor: runs an IR graph on the CPU in f32 or f64.
//!
//! A graph is compiled once into a linear [`Program`] (node order is topological); each run
//! walks it, keeping one value per live node and recycling buffers after their last use.
//! Transposes are views (a flag, no copy) that GEMMs read through strides.

use super::linalg::{self, MatRef, Real};
use rayon::prelude::*;
use snfc_compiler::ir::{Graph, Op, Shape, Unary};
use std::collections::HashMap;
use std::sync::Arc;

/// A named tensor handed to or returned from the executor (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    pub shape: Shape,
    pub data: Vec<T>,
}

impl<T: Real> Tensor<T> {
    pub fn scalar(&self) -> T {
        self.data[0]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("graph {graph}: no value fed for {kind} `{name}`")]
    Missing {
        graph: String,
        kind: &'static str,
        name: String,
    },
    #[error("graph {graph}: {kind} `{name}` has {got} elements, expected shape {shape:?}")]
    BadShape {
        graph: String,
        kind: &'static str,
        name: String,
        got: usize,
        shape: Shape,
    },
    #[error("graph {graph}: node %{node} ({op}): {source}")]
    Linalg {
        graph: String,
        node: usize,
        op: String,
        source: linalg::LinalgError,
    },
}

struct Instr {
    op: Op,
    args: Vec<usize>,
    shape: Shape,
    /// Values whose last use is this instruction.
    release: Vec<usize>,
}

/// A graph compiled for the host executor.
pub struct Program {
    name: String,
    instrs: Vec<Instr>,
    outputs: Vec<(String, usize)>,
}

impl Program {
    pub fn new(g: &Graph) -> Program {
        let nodes = g.nodes();
        let slot: HashMap<_, _> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut instrs: Vec<Instr> = nodes
            .iter()
            .map(|n| Instr {
                op: g.node(*n).op.clone(),
                args: g.inputs(*n).iter().map(|a| slot[a]).collect(),
                shape: g.node(*n).shape.clone(),
                release: Vec::new(),
            })
            .collect();
        let outputs: Vec<(String, usize)> = g
            .outputs
            .iter()
            .map(|(name, n)| (name.clone(), slot[n]))
            .collect();
        let mut last_use = vec![None; instrs.len()];
        for (i, ins) in instrs.iter().enumerate() {
            for a in &ins.args {
                last_use[*a] = Some(i);
            }
        }
        for (_, o) in &outputs {
            last_use[*o] = None; // outputs live to the end
        }
        for (v, lu) in last_use.iter().enumerate() {
            if let Some(i) = lu {
                instrs[*i].release.push(v);
            }
        }
        Program {
            name: g.name.clone(),
            instrs,
            outputs,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Names and shapes of the inputs (`input`) and parameters (`param`) the graph reads.
    pub fn feeds(&self) -> Vec<(&'static str, String, Shape)> {
        self.instrs
            .iter()
            .filter_map(|i| match &i.op {
                Op::Input { name, shape } => Some(("input", name.clone(), shape.clone())),
                Op::Param { name, shape } => Some(("param", name.clone(), shape.clone())),
                _ => None,
            })
            .collect()
    }
}

/// A value during a run: a shared buffer, possibly read transposed.
#[derive(Clone)]
struct Value<T> {
    data: Arc<Vec<T>>,
    shape: Shape,
    /// The buffer holds the row-major transpose of the logical matrix.
    transposed: bool,
}

impl<T: Real> Value<T> {
    fn mat(&self) -> MatRef<'_, T> {
        let (r, c) = (self.shape[0], self.shape[1]);
        if self.transposed {
            MatRef::row_major(&self.data, c, r).t()
        } else {
            MatRef::row_major(&self.data, r, c)
        }
    }
}

/// Tensors fed to a run, by name (inputs and parameters share one namespace).
pub type Feeds<T> = HashMap<String, Arc<Vec<T>>>;

/// Runs programs, recycling buffers between runs.
#[derive(Default)]
pub struct Executor<T> {
    pool: HashMap<usize, Vec<Vec<T>>>,
}

/// Elementwise work below this many elements runs on one thread.
const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

fn map_into<T: Real>(out: &mut [T], f: impl Fn(usize) -> T + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            for (j, o) in chunk.iter_mut().enumerate() {
                *o = f(c * CHUNK + j);
            }
        });
    } else {
        for (j, o) in out.iter_mut().enumerate() {
            *o = f(j);
        }
    }
}

/// Numerically stable elementwise functions.
pub fn unary<T: Real>(u: Unary, x: T) -> T {
    let one = T::one();
    match u {
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        Unary::Softplus => {
            if x > T::zero() {
                x + (-x).exp().ln_1p()
            } else {
                x.exp().ln_1p()
            }
        }
        Unary::Sigmoid => {
            if x >= T::zero() {
                one / (one + (-x).exp())
            } else {
                let e = x.exp();
                e / (one + e)
            }
        }
        Unary::Square => x * x,
        Unary::Recip => one / x,
    }
}

impl<T: Real> Executor<T> {
    pub fn new() -> Self {
        Executor {
            pool: HashMap::new(),
        }
    }

    fn alloc(&mut self, len: usize) -> Vec<T> {
        match self.pool.get_mut(&len).and_then(|v| v.pop()) {
            Some(b) => b,
            None => vec![T::zero(); len],
        }
    }

    fn recycle(&mut self, v: Value<T>) {
        if let Ok(buf) = Arc::try_unwrap(v.data) {
            if buf.len() > 1 {
                self.pool.entry(buf.len()).or_default().push(buf);
            }
        }
    }

    /// A contiguous (not transposed) buffer with the value's logical layout.
    fn contiguous(&mut self, v: &Value<T>) -> Arc<Vec<T>> {
        if !v.transposed {
            return v.data.clone();
        }
        let (r, c) = (v.shape[0], v.shape[1]);
        let mut out = self.alloc(r * c);
        let src = &v.data;
        // logical (i, j) is stored at j * r + i
        map_into(&mut out, |k| src[(k % c) * r + k / c]);
        Arc::new(out)
    }

    /// Run `p` on `feeds`; returns the outputs by name, in the graph's output order.
    pub fn run(&mut self, p: &Program, feeds: &Feeds<T>) -> Result<Vec<(String, Tensor<T>)>, ExecError> {
        let mut vals: Vec<Option<Value<T>>> = vec![None; p.instrs.len()];
        for (i, ins) in p.instrs.iter().enumerate() {
            let v = self.exec(p, i, ins, &vals, feeds)?;
            vals[i] = Some(v);
            for r in &ins.release {
                if let Some(v) = vals[*r].take() {
                    self.recycle(v);
                }
            }
        }
        let mut out = Vec::with_capacity(p.outputs.len());
        for (name, slot) in &p.outputs {
            let v = vals[*slot].clone().expect("output computed");
            let data = self.contiguous(&v);
            let data = Arc::try_unwrap(data).unwrap_or_else(|a| (*a).clone());
            out.push((name.clone(), Tensor { shape: v.shape, data }));
        }
        for v in vals.into_iter().flatten() {
            self.recycle(v);
        }
        Ok(out)
    }

    fn exec(
        &mut self,
        p: &Program,
        i: usize,
        ins: &Instr,
        vals: &[Option<Value<T>>],
        feeds: &Feeds<T>,
    ) -> Result<Value<T>, ExecError> {
        let arg = |k: usize| -> &Value<T> { vals[ins.args[k]].as_ref().expect("operand computed") };
        let numel: usize = ins.shape.iter().product();
        let value = |data: Vec<T>| Value {
            data: Arc::new(data),
            shape: ins.shape.clone(),
            transposed: false,
        };
        Ok(match &ins.op {
            Op::Input { name, shape } | Op::Param { name, shape } => {
                let kind = if matches!(ins.op, Op::Input { .. }) { "input" } else { "param" };
                let data = feeds.get(name).ok_or_else(|| ExecError::Missing {
                    graph: p.name.clone(),
                    kind,
                    name: name.clone(),
                })?;
                if data.len() != numel {
                    return Err(ExecError::BadShape {
                        graph: p.name.clone(),
                        kind,
                        name: name.clone(),
                        got: data.len(),
                        shape: shape.clone(),
                    });
                }
                Value {
                    data: data.clone(),
                    shape: shape.clone(),
                    transposed: false,
                }
            }
            Op::Const { bits } => value(vec![T::of_f64(f64::from_bits(*bits))]),
            Op::MatMul => {
                let (a, b) = (arg(0), arg(1));
                let mut out = self.alloc(numel);
                linalg::matmul(a.mat(), b.mat(), &mut out, T::one(), T::zero(), false);
                value(out)
            }
            Op::Transpose => {
                let a = arg(0);
                Value {
                    data: a.data.clone(),
                    shape: ins.shape.clone(),
                    transposed: !a.transposed,
                }
            }
            Op::Inverse | Op::LogDet => {
                let a = arg(0).clone();
                let n = a.shape[0];
                let data = self.contiguous(&a);
                if ins.op == Op::LogDet {
                    let (_sign, ld) = linalg::slogdet(&data, n);
                    value(vec![ld])
                } else {
                    let inv = linalg::inverse(&data, n).map_err(|source| ExecError::Linalg {
                        graph: p.name.clone(),
                        node: i,
                        op: ins.op.to_string(),
                        source,
                    })?;
                    value(inv)
                }
            }
            Op::Add | Op::Sub | Op::Mul => {
                let (a, b) = (arg(0).clone(), arg(1).clone());
                let (a, b) = (self.contiguous(&a), self.contiguous(&b));
                let mut out = self.alloc(numel);
                let (sa, sb) = (a.len() == 1, b.len() == 1);
                let at = |k: usize| if sa { a[0] } else { a[k] };
                let bt = |k: usize| if sb { b[0] } else { b[k] };
                match ins.op {
                    Op::Add => map_into(&mut out, |k| at(k) + bt(k)),
                    Op::Sub => map_into(&mut out, |k| at(k) - bt(k)),
                    _ => map_into(&mut out, |k| at(k) * bt(k)),
                }
                value(out)
            }
            Op::Neg | Op::Unary(_) | Op::StopGrad => {
                let a = arg(0).clone();
                let a = self.contiguous(&a);
                let mut out = self.alloc(numel);
                match ins.op {
                    Op::Neg => map_into(&mut out, |k| -a[k]),
                    Op::Unary(u) => map_into(&mut out, |k| unary(u, a[k])),
                    _ => out.copy_from_slice(&a),
                }
                value(out)
            }
            Op::Sum { axis } => {
                let a = arg(0).clone();
                let a = self.contiguous(&a);
                let mut out = self.alloc(numel.max(1));
                match axis {
                    None => out[0] = a.iter().copied().sum(),
                    Some(0) => {
                        let c = ins.shape[0];
                        let r = a.len() / c;
                        out.iter_mut().for_each(|o| *o = T::zero());
                        for row in 0..r {
                            let src = &a[row * c..(row + 1) * c];
                            for (o, s) in out.iter_mut().zip(src) {
                                *o = *o + *s;
                            }
                        }
                    }
                    Some(_) => {
                        let r = ins.shape[0];
                        let c = a.len() / r;
                        map_into(&mut out, |row| a[row * c..(row + 1) * c].iter().copied().sum());
                    }
                }
                value(out)
            }
            Op::Broadcast { to, new_axis } => {
                let a = arg(0).clone();
                let a = self.contiguous(&a);
                let mut out = self.alloc(numel);
                match new_axis {
                    None => out.iter_mut().for_each(|o| *o = a[0]),
                    // [C] repeated as every row of [R, C]
                    Some(0) => {
                        let c = to[1];
                        map_into(&mut out, |k| a[k % c]);
                    }
                    // [R] repeated as every column of [R, C]
                    Some(_) => {
                        let c = to[1];
                        map_into(&mut out, |k| a[k / c]);
                    }
                }
                value(out)
            }
        })
    }
}
