//! Every rewrite rule is sound, rule by rule and direction by direction.
//!
//! For each rule of [`ALGEBRA`] (both directions of a bidirectional one) the checker draws random
//! shape assignments for the pattern variables (scalars, vectors `[n]`, matrices `[m, n]` with
//! dims in 1..=5) and keeps those under which the side being matched type-checks
//! ([`Op::infer_shape`]) and the rule's [`When`] condition holds — exactly the terms the rewriter
//! could match. Under such an assignment:
//!
//! - the other side must type-check too (otherwise the rewriter would build an ill-shaped node
//!   and panic: the historic `transpose-of-sum` on `(transpose (add A 1.0))`);
//! - both sides must have the same shape (the e-graph would merge classes of different shapes);
//! - both sides, built as IR graphs and run on the host executor in f64 with the same random
//!   values, must agree elementwise.
//!
//! [`SUBSTITUTION`] is an approximation by design (R ≈ W⁻¹); it is checked under its premise,
//! R = W⁻¹ exactly (W and R built from elementary matrices and their inverses), for both ways the
//! rewriter instantiates it (R ≈ W⁻¹ and W ≈ R⁻¹).
//!
//! The convolution rules (`CONV_OPERATOR`, `CONV_MERGE`, `CONV_ADJOINT`, `CONV_POINTWISE`) and the
//! spline rule are checked the same way, each instantiated as the rewriter instantiates it
//! (`conv_rule_instance`, `spline_rule_instance`) for random convolutions (channels, map size,
//! kernel size, batch) and spline shapes (bins, tail bound, operand).
//!
//! Three more tests show that the checker can fail: a wrong rule (`(AB)ᵀ = AᵀBᵀ`) is reported
//! numerically unsound, `transpose-of-sum` without its guard is reported ill-typed, and a
//! Toeplitz transpose without its flip is reported unsound.

use snfc_compiler::ir::{GraphBuilder, NodeIndex, Op, Shape};
use snfc_compiler::rewrite::{
    conv_rule_instance, spline_rule_instance, ConvRule, PairRule, RuleSpec, When, ALGEBRA,
    CONV_ADJOINT, CONV_MERGE, CONV_OPERATOR, CONV_POINTWISE, SPLINE, SUBSTITUTION,
};
use snfc_runtime::host::exec::{Executor, Feeds, Program, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod common;
use common::Rng;

/// Valid shape assignments (each with fresh random values) wanted per rule direction.
const WANT_VALID: usize = 60;
/// Shape draws per direction before giving up (shape checks only: cheap).
const MAX_DRAWS: usize = 100_000;
/// Fewest valid assignments a direction may get without failing (no vacuous passes).
const MIN_VALID: usize = 50;
const REL_TOL: f64 = 1e-9;
const ABS_TOL: f64 = 1e-10;
/// Failure messages kept per category (all are counted).
const KEEP_MESSAGES: usize = 5;

// ---------------------------------------------------------------------------------------------
// Patterns: a tiny s-expression parser over the IR's op tokens.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Pat {
    /// A pattern variable (`?a`), kept with its `?`.
    Var(String),
    /// An op applied to operands (leaves such as `const:1.0` have none).
    App(Op, Vec<Pat>),
}

fn tokenize(src: &str) -> Vec<String> {
    src.replace('(', " ( ")
        .replace(')', " ) ")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn parse_pattern(src: &str) -> Pat {
    let toks = tokenize(src);
    let mut pos = 0;
    let p = parse_at(&toks, &mut pos, src);
    assert_eq!(pos, toks.len(), "pattern {src:?}: trailing tokens");
    p
}

fn parse_at(toks: &[String], pos: &mut usize, src: &str) -> Pat {
    let tok = toks
        .get(*pos)
        .unwrap_or_else(|| panic!("pattern {src:?}: unexpected end"));
    *pos += 1;
    match tok.as_str() {
        "(" => {
            let head = toks
                .get(*pos)
                .unwrap_or_else(|| panic!("pattern {src:?}: unexpected end"));
            *pos += 1;
            let op: Op = head
                .parse()
                .unwrap_or_else(|e| panic!("pattern {src:?}: {e}"));
            let mut args = Vec::new();
            while toks.get(*pos).map(String::as_str) != Some(")") {
                args.push(parse_at(toks, pos, src));
            }
            *pos += 1; // ")"
            assert_eq!(
                args.len(),
                op.arity(),
                "pattern {src:?}: {op} takes {} operands",
                op.arity()
            );
            Pat::App(op, args)
        }
        ")" => panic!("pattern {src:?}: unexpected )"),
        t if t.starts_with('?') => Pat::Var(t.to_string()),
        t => {
            let op: Op = t.parse().unwrap_or_else(|e| panic!("pattern {src:?}: {e}"));
            assert_eq!(op.arity(), 0, "pattern {src:?}: {op} needs operands");
            Pat::App(op, vec![])
        }
    }
}

fn collect_vars(p: &Pat, out: &mut BTreeSet<String>) {
    match p {
        Pat::Var(v) => {
            out.insert(v.clone());
        }
        Pat::App(_, args) => args.iter().for_each(|a| collect_vars(a, out)),
    }
}

/// Variables somewhere under an `inverse`: they get diagonally dominant (well-conditioned) values.
fn collect_inverted(p: &Pat, under: bool, out: &mut BTreeSet<String>) {
    match p {
        Pat::Var(v) if under => {
            out.insert(v.clone());
        }
        Pat::Var(_) => {}
        Pat::App(op, args) => {
            let under = under || *op == Op::Inverse;
            args.iter().for_each(|a| collect_inverted(a, under, out));
        }
    }
}

type Shapes = BTreeMap<String, Shape>;
type Values = BTreeMap<String, Vec<f64>>;

fn shape_of(p: &Pat, shapes: &Shapes) -> Result<Shape, String> {
    match p {
        Pat::Var(v) => Ok(shapes[v].clone()),
        Pat::App(op, args) => {
            let ins = args
                .iter()
                .map(|a| shape_of(a, shapes))
                .collect::<Result<Vec<_>, _>>()?;
            op.infer_shape(&ins)
        }
    }
}

/// Does `when` hold for a match of a term of shape `matched` under `shapes`? (As in
/// `compiler/src/rewrite/mod.rs`: `Scalar` — the var has shape `[]`; `Matrix` — the matched term
/// is a matrix; `Matrices` — every listed var is a matrix.)
fn holds(when: When, matched: &Shape, shapes: &Shapes) -> bool {
    match when {
        When::Always => true,
        When::Scalar(v) => shapes[v].is_empty(),
        When::Matrix => matched.len() == 2,
        When::Matrices(vs) => vs.iter().all(|v| shapes[*v].len() == 2),
    }
}

fn param_name(var: &str) -> &str {
    var.trim_start_matches('?')
}

fn build(p: &Pat, b: &mut GraphBuilder, shapes: &Shapes) -> NodeIndex {
    match p {
        Pat::Var(v) => b.param(param_name(v), shapes[v].clone()),
        Pat::App(op, args) => {
            let ins: Vec<NodeIndex> = args.iter().map(|a| build(a, b, shapes)).collect();
            b.add(op.clone(), &ins)
        }
    }
}

/// Build `p` as a graph with one output and run it on the host in f64, unfused (one kernel per
/// node: the graph's literal meaning) and fused (the production program). Returns both.
fn eval(p: &Pat, shapes: &Shapes, values: &Values) -> (Tensor<f64>, Tensor<f64>) {
    let mut b = GraphBuilder::new("side");
    let n = build(p, &mut b, shapes);
    b.output("out", n);
    let g = b.finish();
    let feeds: Feeds<f64> = values
        .iter()
        .map(|(v, x)| (param_name(v).to_string(), Arc::new(x.clone())))
        .collect();
    let run = |prog: Program| -> Tensor<f64> {
        let mut ex = Executor::<f64>::new();
        let mut outs = ex
            .run(&prog, &feeds)
            .unwrap_or_else(|e| panic!("running {p:?} at {shapes:?}: {e}"));
        assert_eq!(outs.len(), 1);
        outs.remove(0).1
    };
    (run(Program::unfused(&g)), run(Program::new(&g)))
}

/// Largest `|x − y| − rel·max(|x|, |y|)` over the elements (positive: out of tolerance), and
/// the largest plain `|x − y|`. Non-finite values count as infinitely far apart.
fn compare(x: &[f64], y: &[f64]) -> (f64, f64) {
    assert_eq!(x.len(), y.len());
    let mut excess = f64::NEG_INFINITY;
    let mut max_err: f64 = 0.0;
    for (a, b) in x.iter().zip(y) {
        let err = if a.is_finite() && b.is_finite() {
            (a - b).abs()
        } else {
            f64::INFINITY
        };
        max_err = max_err.max(err);
        excess = excess.max(err - REL_TOL * a.abs().max(b.abs()) - ABS_TOL);
    }
    (excess, max_err)
}

// ---------------------------------------------------------------------------------------------
// Random shapes and values.
// ---------------------------------------------------------------------------------------------

fn random_shape(rng: &mut Rng) -> Shape {
    let dim = |rng: &mut Rng| rng.int(1, 5);
    match rng.int(0, 9) {
        0 | 1 => vec![],
        2 | 3 => vec![dim(rng)],
        _ => vec![dim(rng), dim(rng)],
    }
}

/// Normal values; a square matrix under `inverse` is made strictly diagonally dominant.
fn random_values(rng: &mut Rng, shapes: &Shapes, inverted: &BTreeSet<String>) -> Values {
    shapes
        .iter()
        .map(|(v, s)| {
            let len: usize = s.iter().product();
            let mut x: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
            if let [r, c] = s.as_slice() {
                if r == c && inverted.contains(v) {
                    let n = *r;
                    for (k, xi) in x.iter_mut().enumerate() {
                        *xi = if k / n == k % n {
                            n as f64 + rng.range(0.5, 1.5)
                        } else {
                            rng.range(-1.0, 1.0)
                        };
                    }
                }
            }
            (v.clone(), x)
        })
        .collect()
}

/// A seed per name (FNV-1a), so that adding a rule does not change the draws of the others.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// The checker.
// ---------------------------------------------------------------------------------------------

/// What checking one rule direction found.
#[derive(Debug, Default)]
struct Report {
    /// e.g. `transpose-of-product-rev: (matmul (transpose ?b) (transpose ?a)) ⇒ ...`
    what: String,
    draws: usize,
    /// Assignments where the matched side type-checks and the condition holds (the rewriter
    /// fires), the other side type-checks to the same shape, and values were compared.
    valid: usize,
    distinct_shapes: usize,
    /// Matched side well-typed and condition true, other side ill-typed.
    ill_typed: usize,
    /// Both sides well-typed, of different shapes.
    shape_mismatch: usize,
    /// Values differ beyond tolerance.
    value_mismatch: usize,
    /// Fused and unfused programs of one side disagree (an executor defect, not the rule's).
    executor_mismatch: usize,
    max_err: f64,
    messages: Vec<String>,
}

impl Report {
    fn sound(&self) -> bool {
        self.ill_typed + self.shape_mismatch + self.value_mismatch == 0
    }

    fn note(&mut self, msg: String) {
        if self.messages.len() < KEEP_MESSAGES {
            self.messages.push(msg);
        }
    }

    fn summary(&self) -> String {
        format!(
            "{}\n  draws {}, valid {} ({} distinct shape assignments), ill-typed {}, \
             shape mismatches {}, value mismatches {}, executor mismatches {}, max error {:.3e}\n{}",
            self.what,
            self.draws,
            self.valid,
            self.distinct_shapes,
            self.ill_typed,
            self.shape_mismatch,
            self.value_mismatch,
            self.executor_mismatch,
            self.max_err,
            self.messages
                .iter()
                .map(|m| format!("  - {m}\n"))
                .collect::<String>()
        )
    }
}

fn show(shapes: &Shapes) -> String {
    shapes
        .iter()
        .map(|(v, s)| format!("{v}: {s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Compare `from` and `to` at one assignment of shapes and values, recording into `rep`.
/// Both must already type-check to the same shape.
fn compare_sides(
    rep: &mut Report,
    from: &Pat,
    to: &Pat,
    shapes: &Shapes,
    values: &Values,
    want: &Shape,
) {
    let (a, a_fused) = eval(from, shapes, values);
    let (b, b_fused) = eval(to, shapes, values);
    for (side, t) in [("matched side", &a), ("rewritten side", &b)] {
        assert_eq!(
            &t.shape,
            want,
            "{}: the {side} ran to shape {:?}, its type is {want:?} ({})",
            rep.what,
            t.shape,
            show(shapes)
        );
    }
    for (side, u, f) in [
        ("matched side", &a, &a_fused),
        ("rewritten side", &b, &b_fused),
    ] {
        let (excess, err) = compare(&u.data, &f.data);
        if excess > 0.0 {
            rep.executor_mismatch += 1;
            rep.note(format!(
                "host executor: fused and unfused programs of the {side} differ by {err:.3e} at {} \
                 (an executor defect, not the rule's)",
                show(shapes)
            ));
        }
    }
    let (excess, err) = compare(&a.data, &b.data);
    rep.max_err = rep.max_err.max(err);
    if excess > 0.0 {
        rep.value_mismatch += 1;
        rep.note(format!(
            "values differ: max error {err:.3e} at {} (matched side {:?}, rewritten side {:?})",
            show(shapes),
            a.data,
            b.data
        ));
    }
}

/// Check one direction `from ⇒ to` of a rule under `when`, with `seed`.
fn check_direction(name: &str, from: &str, to: &str, when: When, seed: u64) -> Report {
    let (pf, pt) = (parse_pattern(from), parse_pattern(to));
    let mut vars = BTreeSet::new();
    collect_vars(&pf, &mut vars);
    let mut to_vars = BTreeSet::new();
    collect_vars(&pt, &mut to_vars);
    assert!(
        to_vars.is_subset(&vars),
        "{name}: {to} uses variables that {from} does not bind"
    );
    let mut inverted = BTreeSet::new();
    collect_inverted(&pf, false, &mut inverted);
    collect_inverted(&pt, false, &mut inverted);

    let mut rep = Report {
        what: format!("{name}: {from} => {to} (when {when:?})"),
        ..Report::default()
    };
    let mut rng = Rng::new(seed);
    let mut seen = BTreeSet::new();
    while rep.valid < WANT_VALID && rep.draws < MAX_DRAWS {
        rep.draws += 1;
        let shapes: Shapes = vars
            .iter()
            .map(|v| (v.clone(), random_shape(&mut rng)))
            .collect();
        // Only terms the rewriter could match: the matched side is well-typed, `when` holds.
        let Ok(s_from) = shape_of(&pf, &shapes) else {
            continue;
        };
        if !holds(when, &s_from, &shapes) {
            continue;
        }
        let s_to = match shape_of(&pt, &shapes) {
            Ok(s) => s,
            Err(e) => {
                rep.ill_typed += 1;
                rep.note(format!(
                    "ill-typed rewrite: {from} has shape {s_from:?} at {} but {to} does not \
                     type-check: {e}",
                    show(&shapes)
                ));
                continue;
            }
        };
        if s_to != s_from {
            rep.shape_mismatch += 1;
            rep.note(format!(
                "shapes differ: {s_from:?} ⇒ {s_to:?} at {}",
                show(&shapes)
            ));
            continue;
        }
        rep.valid += 1;
        let values = random_values(&mut rng, &shapes, &inverted);
        compare_sides(&mut rep, &pf, &pt, &shapes, &values, &s_from);
        seen.insert(shapes);
    }
    rep.distinct_shapes = seen.len();
    rep
}

fn check_rule(r: &RuleSpec) -> Vec<Report> {
    let mut dirs = vec![(r.name.to_string(), r.lhs, r.rhs)];
    if r.bidirectional {
        dirs.push((format!("{}-rev", r.name), r.rhs, r.lhs));
    }
    dirs.into_iter()
        .map(|(name, from, to)| check_direction(&name, from, to, r.when, seed_of(&name)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Exact inverse pairs for the substitution's premise.
// ---------------------------------------------------------------------------------------------

fn mm(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            for j in 0..n {
                c[i * n + j] += a[i * n + k] * b[k * n + j];
            }
        }
    }
    c
}

fn identity(n: usize) -> Vec<f64> {
    (0..n * n)
        .map(|k| if k / n == k % n { 1.0 } else { 0.0 })
        .collect()
}

/// A random well-conditioned `W` (n×n) and its inverse, without any LU: W = D·E₁⋯E_m with D
/// diagonal (entries ±[1, 2]) and E = I + t·e_i e_jᵀ (i ≠ j, |t| ≤ 1), whose inverses are 1/d
/// and I − t·e_i e_jᵀ; so R = E_m⁻¹⋯E₁⁻¹·D⁻¹.
fn inverse_pair(rng: &mut Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut w = identity(n);
    let mut r = identity(n);
    for k in 0..n {
        let d = rng.range(1.0, 2.0) * if rng.coin() { 1.0 } else { -1.0 };
        w[k * n + k] = d;
        r[k * n + k] = 1.0 / d;
    }
    if n > 1 {
        for _ in 0..2 * n {
            let i = rng.int(0, n - 1);
            let j = (i + rng.int(1, n - 1)) % n;
            let t = rng.range(-1.0, 1.0);
            let (mut e, mut e_inv) = (identity(n), identity(n));
            e[i * n + j] = t;
            e_inv[i * n + j] = -t;
            w = mm(&w, &e, n);
            r = mm(&e_inv, &r, n);
        }
    }
    (w, r)
}

/// Check a pair rule under its premise. The rewriter instantiates it both ways (`?W` the forward
/// parameter and `?R` its learned inverse, and the other way round); `?R` has `?W`'s shape.
fn check_pair_rule(rule: &PairRule) -> Vec<Report> {
    let (pf, pt) = (parse_pattern(rule.lhs), parse_pattern(rule.rhs));
    let mut vars = BTreeSet::new();
    collect_vars(&pf, &mut vars);
    collect_vars(&pt, &mut vars);
    assert_eq!(
        vars,
        BTreeSet::from(["?R".to_string(), "?W".to_string()]),
        "{}: a pair rule binds ?W and ?R",
        rule.name
    );
    let mut reports = Vec::new();
    for (suffix, swap) in [("W⁻¹ = R", false), ("R⁻¹ = W", true)] {
        let name = format!("{} [{suffix}]", rule.name);
        let mut rep = Report {
            what: format!(
                "{name}: {} => {} (premise: R = W⁻¹ exactly)",
                rule.lhs, rule.rhs
            ),
            ..Report::default()
        };
        let mut rng = Rng::new(seed_of(&name));
        let mut seen = BTreeSet::new();
        while rep.valid < WANT_VALID && rep.draws < MAX_DRAWS {
            rep.draws += 1;
            let s = random_shape(&mut rng);
            let shapes: Shapes = [("?W".to_string(), s.clone()), ("?R".to_string(), s.clone())]
                .into_iter()
                .collect();
            let Ok(s_from) = shape_of(&pf, &shapes) else {
                continue;
            };
            let s_to = match shape_of(&pt, &shapes) {
                Ok(s) => s,
                Err(e) => {
                    rep.ill_typed += 1;
                    rep.note(format!("ill-typed rewrite at {}: {e}", show(&shapes)));
                    continue;
                }
            };
            if s_to != s_from {
                rep.shape_mismatch += 1;
                rep.note(format!(
                    "shapes differ: {s_from:?} ⇒ {s_to:?} at {}",
                    show(&shapes)
                ));
                continue;
            }
            // Both sides type-check, so ?W (and ?R) is a square matrix.
            let n = s[0];
            let (w, r) = inverse_pair(&mut rng, n);
            let (w, r) = if swap { (r, w) } else { (w, r) };
            let values: Values = [("?W".to_string(), w), ("?R".to_string(), r)]
                .into_iter()
                .collect();
            rep.valid += 1;
            compare_sides(&mut rep, &pf, &pt, &shapes, &values, &s_from);
            seen.insert(shapes);
        }
        rep.distinct_shapes = seen.len();
        reports.push(rep);
    }
    reports
}

fn assert_all_sound(reports: &[Report]) {
    let mut failures = Vec::new();
    for rep in reports {
        println!("{}", rep.summary());
        if !rep.sound() {
            failures.push(format!("UNSOUND {}", rep.summary()));
        } else if rep.executor_mismatch > 0 {
            failures.push(format!("EXECUTOR {}", rep.summary()));
        } else if rep.valid < MIN_VALID {
            failures.push(format!(
                "TOO FEW VALID ASSIGNMENTS ({} < {MIN_VALID}; the check would be vacuous) {}",
                rep.valid,
                rep.summary()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rule directions failed:\n{}",
        failures.len(),
        reports.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Convolution and spline rules: instantiated per convolution / spline, as the rewriter does.
// ---------------------------------------------------------------------------------------------

/// A diagonally dominant `c × c` matrix (invertible, well conditioned), as a 1×1 kernel's values.
fn dominant(rng: &mut Rng, c: usize) -> Vec<f64> {
    (0..c * c)
        .map(|k| {
            if k / c == k % c {
                c as f64 + rng.range(0.5, 1.5)
            } else {
                rng.range(-1.0, 1.0)
            }
        })
        .collect()
}

/// Check `rule` on random convolutions (C in 1..=3, H, W in 2..=5, K in {1, 3, 5} — 1 only for a
/// pointwise rule —, B in 1..=4), each instantiated as the rewriter instantiates it. Variables
/// take the shapes its conditions name (`flat` `[C·H·W, B]`, `image` `[C, H, W, B]`, `kernel`
/// and `?K` `[C, C, K, K]`, `scalar` `[]`); the others are the `[C·H·W, C·H·W]` operands of a
/// Toeplitz adjoint. Kernels of pointwise rules are diagonally dominant (their inverses exist).
fn check_conv_rule(rule: &ConvRule) -> Report {
    let name = rule.name;
    let mut rep = Report {
        what: format!("{name}: {} => {}", rule.lhs, rule.rhs),
        ..Report::default()
    };
    let mut rng = Rng::new(seed_of(name));
    let mut seen = BTreeSet::new();
    let pick = |rng: &mut Rng, lo: usize, hi: usize| lo + (rng.next_u64() as usize) % (hi - lo + 1);
    while rep.valid < WANT_VALID && rep.draws < MAX_DRAWS {
        rep.draws += 1;
        let (c, h, w, b) = (
            pick(&mut rng, 1, 3),
            pick(&mut rng, 2, 5),
            pick(&mut rng, 2, 5),
            pick(&mut rng, 1, 4),
        );
        let k = if rule.pointwise {
            1
        } else {
            [1, 3, 5][pick(&mut rng, 0, 2)]
        };
        let n = c * h * w;
        let (from, to) = conv_rule_instance(rule, [c, h, w, k, b]);
        let (pf, pt) = (parse_pattern(&from), parse_pattern(&to));
        let mut vars = BTreeSet::new();
        collect_vars(&pf, &mut vars);
        let shapes: Shapes = vars
            .iter()
            .map(|v| {
                let shape = if rule.flat.contains(&v.as_str()) {
                    vec![n, b]
                } else if rule.image.contains(&v.as_str()) {
                    vec![c, h, w, b]
                } else if rule.kernel.contains(&v.as_str()) || v == "?K" {
                    vec![c, c, k, k]
                } else if rule.scalar.contains(&v.as_str()) {
                    vec![]
                } else {
                    vec![n, n]
                };
                (v.clone(), shape)
            })
            .collect();
        let Ok(s_from) = shape_of(&pf, &shapes) else {
            continue;
        };
        let s_to = match shape_of(&pt, &shapes) {
            Ok(s) => s,
            Err(e) => {
                rep.ill_typed += 1;
                rep.note(format!("ill-typed rewrite at {}: {e}", show(&shapes)));
                continue;
            }
        };
        if s_to != s_from {
            rep.shape_mismatch += 1;
            rep.note(format!(
                "shapes differ: {s_from:?} ⇒ {s_to:?} at {}",
                show(&shapes)
            ));
            continue;
        }
        rep.valid += 1;
        let mut values = random_values(&mut rng, &shapes, &BTreeSet::new());
        if rule.pointwise {
            values.insert("?K".to_string(), dominant(&mut rng, c));
        }
        compare_sides(&mut rep, &pf, &pt, &shapes, &values, &s_from);
        seen.insert(shapes);
    }
    rep.distinct_shapes = seen.len();
    rep
}

/// Check a spline rule for random D, B, bin counts, bounds and every operand `wrt`.
fn check_spline_rule(rule: &RuleSpec) -> Report {
    let mut rep = Report {
        what: format!("{}: {} => {}", rule.name, rule.lhs, rule.rhs),
        ..Report::default()
    };
    let mut rng = Rng::new(seed_of(rule.name));
    let mut seen = BTreeSet::new();
    while rep.valid < WANT_VALID && rep.draws < MAX_DRAWS {
        rep.draws += 1;
        let d = 1 + (rng.next_u64() as usize) % 4;
        let b = 1 + (rng.next_u64() as usize) % 4;
        let bins = 1 + (rng.next_u64() as usize) % 5;
        let wrt = (rng.next_u64() as usize) % 4;
        let bound = rng.range(1.0, 4.0);
        let (from, to) = spline_rule_instance(rule, bins, bound.to_bits(), wrt);
        let (pf, pt) = (parse_pattern(&from), parse_pattern(&to));
        let shapes: Shapes = [
            ("?x", vec![d, b]),
            ("?w", vec![d, bins]),
            ("?h", vec![d, bins]),
            ("?d", vec![d, bins - 1]),
            ("?a", vec![d, b]),
            ("?b", vec![d, b]),
        ]
        .into_iter()
        .map(|(v, s)| (v.to_string(), s))
        .collect();
        let s_from = shape_of(&pf, &shapes).expect("the matched side type-checks");
        match shape_of(&pt, &shapes) {
            Ok(s) if s == s_from => {}
            other => {
                rep.ill_typed += 1;
                rep.note(format!("{other:?} at {}", show(&shapes)));
                continue;
            }
        }
        rep.valid += 1;
        // Inputs inside and beyond the tail bound.
        let mut values = random_values(&mut rng, &shapes, &BTreeSet::new());
        if let Some(x) = values.get_mut("?x") {
            x.iter_mut().for_each(|v| *v *= 2.0);
        }
        compare_sides(&mut rep, &pf, &pt, &shapes, &values, &s_from);
        seen.insert((bins, wrt));
    }
    rep.distinct_shapes = seen.len();
    rep
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

/// Every convolution rule of both phases — the operator identities, the substitution phase's
/// merge rules, the adjoint rules and the 1×1 rules — on random convolutions in f64.
#[test]
fn every_convolution_rule_is_sound() {
    let rules: Vec<&ConvRule> = CONV_OPERATOR
        .iter()
        .chain(CONV_MERGE)
        .chain(CONV_ADJOINT)
        .chain(CONV_POINTWISE)
        .collect();
    assert!(rules.len() >= 14, "{}", rules.len());
    let reports: Vec<Report> = rules.into_iter().map(check_conv_rule).collect();
    assert_all_sound(&reports);
}

/// The convolution checker can fail: `T(k)ᵀ = T(k)` (the flip left out) is reported unsound.
#[test]
fn a_wrong_convolution_rule_is_reported_unsound() {
    let wrong = ConvRule {
        name: "transpose-of-toeplitz-without-flip",
        lhs: "(transpose ({T} ?K))",
        rhs: "({T} ?K)",
        flat: &[],
        image: &[],
        kernel: &[],
        scalar: &[],
        pointwise: false,
    };
    let rep = check_conv_rule(&wrong);
    assert!(rep.value_mismatch > 0, "{}", rep.summary());
}

/// The spline rule (its two VJPs merged into one pass) for every operand and random shapes.
#[test]
fn every_spline_rule_is_sound() {
    let reports: Vec<Report> = SPLINE.iter().map(check_spline_rule).collect();
    assert_all_sound(&reports);
}

#[test]
fn every_algebra_rule_is_sound_in_both_directions() {
    assert!(!ALGEBRA.is_empty());
    let reports: Vec<Report> = ALGEBRA.iter().flat_map(check_rule).collect();
    let expected: usize = ALGEBRA
        .iter()
        .map(|r| if r.bidirectional { 2 } else { 1 })
        .sum();
    assert_eq!(reports.len(), expected);
    assert_all_sound(&reports);
}

#[test]
fn substitution_is_exact_under_its_premise() {
    assert!(!SUBSTITUTION.is_empty());
    let reports: Vec<Report> = SUBSTITUTION.iter().flat_map(check_pair_rule).collect();
    assert_all_sound(&reports);
}

/// The checker can fail: `(AB)ᵀ = AᵀBᵀ` is wrong (it holds only for commuting square matrices,
/// e.g. 1×1), and is reported so — with values that differ, not merely shapes.
#[test]
fn a_wrong_rule_is_reported_unsound() {
    let wrong = RuleSpec {
        name: "wrong-transpose-of-product",
        lhs: "(transpose (matmul ?a ?b))",
        rhs: "(matmul (transpose ?a) (transpose ?b))",
        bidirectional: false,
        when: When::Always,
    };
    let reports = check_rule(&wrong);
    assert_eq!(reports.len(), 1);
    let rep = &reports[0];
    println!("{}", rep.summary());
    assert!(!rep.sound(), "the wrong rule passed:\n{}", rep.summary());
    assert!(
        rep.value_mismatch > 0,
        "the wrong rule was not caught numerically:\n{}",
        rep.summary()
    );
    assert!(rep.max_err > 1e-3, "{}", rep.summary());
}

/// The checker catches the historic defect: `transpose-of-sum` without its `When::Matrices`
/// guard matches `(transpose (add A 1.0))` and would build the transpose of a scalar.
#[test]
fn an_unguarded_rule_is_reported_ill_typed() {
    let guarded = ALGEBRA
        .iter()
        .find(|r| r.name == "transpose-of-sum")
        .expect("transpose-of-sum is a rule");
    let unguarded = RuleSpec {
        when: When::Always,
        ..*guarded
    };
    let reports = check_rule(&unguarded);
    let forward = &reports[0];
    println!("{}", forward.summary());
    assert!(
        forward.ill_typed > 0 && !forward.sound(),
        "the unguarded rule passed:\n{}",
        forward.summary()
    );
    // With the guard, no direction is ill-typed (the full check is the first test).
    assert!(check_rule(guarded).iter().all(|r| r.ill_typed == 0));
}
