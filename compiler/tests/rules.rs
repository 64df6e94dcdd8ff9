//! The rewrite rules, one family at a time, on small expression graphs: a snapshot of each graph
//! before and after the phase (`self_normalize` for the substitution, `optimize` for the exact
//! algebra), plus an assertion of the property the family exists for. Then the whole pipeline
//! on FC specs: the self-normalizing step needs exactly 6 GEMMs per linear layer and no O(D³) op.

use petgraph::stable_graph::NodeIndex;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::{Graph, GraphBuilder, Op};
use snfc_compiler::rewrite::{op_counts, optimize, self_normalize, EGraphStats, Limits};
use snfc_compiler::spec::{load_spec, FlowSpec, LayerSpec, Preprocess};
use std::path::Path;

/// Side of the square matrices of the algebra tests: large enough that a GEMM (2n³ FLOPs)
/// dominates the cost model's memory and launch terms.
const N: usize = 32;

/// An output as an s-expression (`(matmul A (add B C))`), leaves by name: the key property of
/// a rewrite, independent of node numbering.
fn sexpr(g: &Graph, output: &str) -> String {
    fn go(g: &Graph, n: NodeIndex) -> String {
        match &g.node(n).op {
            Op::Param { name, .. } | Op::Input { name, .. } => name.clone(),
            Op::Const { bits } => format!("{:?}", f64::from_bits(*bits)),
            op => {
                let args: Vec<String> = g.inputs(n).into_iter().map(|i| go(g, i)).collect();
                format!("({op} {})", args.join(" "))
            }
        }
    }
    let n = g
        .output(output)
        .unwrap_or_else(|| panic!("no output {output}"));
    go(g, n)
}

/// The snapshot text of one rewrite: the graph before, the graph after.
fn before_after(before: &Graph, after: &Graph) -> String {
    format!("before:\n{}\nafter:\n{}", before.to_text(), after.to_text())
}

/// `optimize` with the default limits; the small graphs must saturate.
fn algebra(g: &Graph) -> Graph {
    let (out, stats) = optimize(g, Limits::default()).expect("optimizes");
    assert_saturated(&stats);
    out
}

#[track_caller]
fn assert_saturated(stats: &EGraphStats) {
    assert_eq!(stats.stop_reason, "saturated", "{stats:?}");
}

fn square(b: &mut GraphBuilder, name: &str) -> NodeIndex {
    b.param(name, vec![N, N])
}

// ---------------------------------------------------------------------------------------------
// Substitution (phase 1).
// ---------------------------------------------------------------------------------------------

#[test]
fn substitution_replaces_inverses_of_a_pair_only() {
    let mut b = GraphBuilder::new("substitution");
    let w = b.param("layers.0.weight", vec![3, 3]);
    let r = b.param("layers.0.weight_inv", vec![3, 3]);
    let u = b.param("other.weight", vec![3, 3]);
    // Only the declared pair is substituted: names play no part (`other.weight` has a
    // `other.weight_inv` look-alike that is not declared).
    b.declare_inverse_pair("layers.0.weight", "layers.0.weight_inv");
    let _lookalike = b.param("other.weight_inv", vec![3, 3]);
    let wi = b.inverse(w);
    let wit = b.transpose(wi);
    b.output("logdet_grad", wit);
    let ri = b.inverse(r);
    b.output("inverse_of_inverse", ri);
    let ui = b.inverse(u);
    b.output("unpaired", ui);
    let g = b.finish();

    let (after, stats) = self_normalize(&g, Limits::default()).expect("substitutes");
    assert_saturated(&stats);
    insta::assert_snapshot!("substitution", before_after(&g, &after));
    assert_eq!(
        sexpr(&after, "logdet_grad"),
        "(transpose layers.0.weight_inv)"
    );
    assert_eq!(sexpr(&after, "inverse_of_inverse"), "layers.0.weight");
    assert_eq!(sexpr(&after, "unpaired"), "(inverse other.weight)");
    assert_eq!(op_counts(&after).inverse, 1);
}

// ---------------------------------------------------------------------------------------------
// Exact algebra (phase 2), by family.
// ---------------------------------------------------------------------------------------------

#[test]
fn associativity_multiplies_the_vector_first() {
    let mut b = GraphBuilder::new("associativity");
    let a = b.param("A", vec![64, 64]);
    let bb = b.param("B", vec![64, 64]);
    let x = b.input("x", vec![64, 1]);
    let ab = b.matmul(a, bb);
    let abx = b.matmul(ab, x);
    b.output("y", abx);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("associativity", before_after(&g, &after));
    assert_eq!(sexpr(&after, "y"), "(matmul A (matmul B x))");
    let (before, now) = (op_counts(&g).flops, op_counts(&after).flops);
    assert_eq!(before, 2.0 * 64.0 * 64.0 * 64.0 + 2.0 * 64.0 * 64.0);
    assert_eq!(now, 2.0 * (2.0 * 64.0 * 64.0));
}

#[test]
fn transpose_involution_cancels() {
    let mut b = GraphBuilder::new("transpose_involution");
    let a = square(&mut b, "A");
    let t = b.transpose(a);
    let tt = b.transpose(t);
    b.output("y", tt);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("transpose_involution", before_after(&g, &after));
    assert_eq!(sexpr(&after, "y"), "A");
    assert_eq!(after.node_count(), 1);
}

/// `(A B)ᵀ C` next to `A B`: the transpose is a view of the product already computed, not a new
/// GEMM `Bᵀ Aᵀ`.
#[test]
fn transposed_product_as_gemm_operand_costs_nothing_extra() {
    let mut b = GraphBuilder::new("transpose_operand");
    let a = square(&mut b, "A");
    let bb = square(&mut b, "B");
    let c = square(&mut b, "C");
    let ab = b.matmul(a, bb);
    b.output("p", ab);
    let abt = b.transpose(ab);
    let q = b.matmul(abt, c);
    b.output("q", q);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("transpose_operand", before_after(&g, &after));
    let counts = op_counts(&after);
    assert_eq!(counts.gemm, 2, "{}", after.to_text());
    assert_eq!(counts.flops, 2.0 * (2.0 * (N as f64).powi(3)));
    assert_eq!(counts.flops, op_counts(&g).flops);
}

#[test]
fn factoring_right_sums_the_left_operands() {
    let mut b = GraphBuilder::new("factor_right");
    let a = square(&mut b, "A");
    let bb = square(&mut b, "B");
    let c = square(&mut b, "C");
    let ac = b.matmul(a, c);
    let bc = b.matmul(bb, c);
    let y = b.add2(ac, bc);
    b.output("y", y);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("factor_right", before_after(&g, &after));
    assert_eq!(op_counts(&g).gemm, 2);
    assert_eq!(op_counts(&after).gemm, 1);
    let y = sexpr(&after, "y");
    assert!(
        y == "(matmul (add A B) C)" || y == "(matmul (add B A) C)",
        "{y}"
    );
}

#[test]
fn factoring_left_of_a_difference() {
    let mut b = GraphBuilder::new("factor_left_sub");
    let a = square(&mut b, "A");
    let bb = square(&mut b, "B");
    let c = square(&mut b, "C");
    let ab = b.matmul(a, bb);
    let ac = b.matmul(a, c);
    let y = b.sub(ab, ac);
    b.output("y", y);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("factor_left_sub", before_after(&g, &after));
    assert_eq!(op_counts(&after).gemm, 1);
    assert_eq!(sexpr(&after, "y"), "(matmul A (sub B C))");
}

/// `(K + A C) + B C`: the two products are not siblings until the sum is reordered.
#[test]
fn factoring_across_a_three_term_sum() {
    let mut b = GraphBuilder::new("factor_three_terms");
    let k = square(&mut b, "K");
    let a = square(&mut b, "A");
    let bb = square(&mut b, "B");
    let c = square(&mut b, "C");
    let ac = b.matmul(a, c);
    let bc = b.matmul(bb, c);
    let kac = b.add2(k, ac);
    let y = b.add2(kac, bc);
    b.output("y", y);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("factor_three_terms", before_after(&g, &after));
    assert_eq!(op_counts(&g).gemm, 2);
    assert_eq!(op_counts(&after).gemm, 1, "{}", after.to_text());
    let y = sexpr(&after, "y");
    assert!(
        y.contains("(matmul (add A B) C)") || y.contains("(matmul (add B A) C)"),
        "{y}"
    );
}

/// `0.5 (A B) + A C`: the scalar moves into the product, then `A` factors out.
#[test]
fn scalars_move_into_products_so_they_factor() {
    let mut b = GraphBuilder::new("scalar_factor");
    let a = square(&mut b, "A");
    let bb = square(&mut b, "B");
    let c = square(&mut b, "C");
    let half = b.constant(0.5);
    let ab = b.matmul(a, bb);
    let hab = b.mul(half, ab);
    let ac = b.matmul(a, c);
    let y = b.add2(hab, ac);
    b.output("y", y);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("scalar_factor", before_after(&g, &after));
    assert_eq!(op_counts(&after).gemm, 1, "{}", after.to_text());
    let y = sexpr(&after, "y");
    assert!(y.starts_with("(matmul A "), "{y}");
}

/// `0.5 (B A) + C A`: the same with the shared operand on the right, where
/// `scalar-into-matmul` (which moves the scalar into the *left* operand) already suffices.
#[test]
fn scalars_factor_with_the_shared_operand_on_the_right() {
    let mut b = GraphBuilder::new("scalar_factor_right");
    let a = square(&mut b, "A");
    let bb = square(&mut b, "B");
    let c = square(&mut b, "C");
    let half = b.constant(0.5);
    let ba = b.matmul(bb, a);
    let hba = b.mul(half, ba);
    let ca = b.matmul(c, a);
    let y = b.add2(hba, ca);
    b.output("y", y);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("scalar_factor_right", before_after(&g, &after));
    assert_eq!(op_counts(&after).gemm, 1, "{}", after.to_text());
    let y = sexpr(&after, "y");
    assert!(y.starts_with("(matmul ") && y.ends_with(" A)"), "{y}");
}

/// `A (−B) + A C`: the negation moves out of (or stays in) the product, then `A` factors out.
#[test]
fn negations_do_not_block_factoring() {
    let mut b = GraphBuilder::new("negation_factor");
    let a = square(&mut b, "A");
    let bb = square(&mut b, "B");
    let c = square(&mut b, "C");
    let nb = b.neg(bb);
    let anb = b.matmul(a, nb);
    let ac = b.matmul(a, c);
    let y = b.add2(anb, ac);
    b.output("y", y);
    let g = b.finish();

    let after = algebra(&g);
    insta::assert_snapshot!("negation_factor", before_after(&g, &after));
    assert_eq!(op_counts(&after).gemm, 1, "{}", after.to_text());
    let y = sexpr(&after, "y");
    assert!(y.starts_with("(matmul A "), "{y}");
}

// ---------------------------------------------------------------------------------------------
// The whole pipeline on FC specs.
// ---------------------------------------------------------------------------------------------

fn linear_count(spec: &FlowSpec) -> usize {
    spec.layers
        .iter()
        .filter(|l| matches!(l, LayerSpec::Linear(_)))
        .count()
}

/// Per linear layer, the self-normalizing step needs: the forward `W h`, the reconstruction
/// `R z`, backprop's `Wᵀ δ`, and the gradients `δ hᵀ`, `(Wᵀδ)(Wh)ᵀ`-style rank-B products for W
/// and R: 6 GEMMs, and no inverse or log-det.
#[track_caller]
fn assert_six_gemms_per_layer(spec: &FlowSpec, batch: usize) {
    let c = compile_train(spec, batch, OptLevel::Full).expect("the spec compiles");
    let counts = op_counts(&c.step);
    let layers = linear_count(spec);
    assert_eq!(
        counts.gemm,
        6 * layers,
        "{}: {layers} linear layers; {counts:?}; e-graphs {:?}",
        spec.name,
        c.egraph
    );
    assert_eq!(counts.inverse, 0, "{}: {counts:?}", spec.name);
    assert_eq!(counts.logdet, 0, "{}: {counts:?}", spec.name);
}

#[test]
fn mnist_fc2_step_has_six_gemms_per_layer_and_no_cubic_op() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/mnist_fc2.json");
    let spec = load_spec(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(linear_count(&spec), 2);
    assert_six_gemms_per_layer(&spec, spec.train.batch_size);
    let c = compile_train(&spec, spec.train.batch_size, OptLevel::Full).expect("the spec compiles");
    assert_eq!(op_counts(&c.step).gemm, 12);
    assert!(
        op_counts(&c.exact).inverse >= 2,
        "{:?}",
        op_counts(&c.exact)
    );
}

#[test]
fn fc8_step_has_six_gemms_per_layer() {
    let mut b = FlowSpec::builder("fc8").input(&[784], Preprocess::DequantizeLogit);
    for i in 0..8 {
        if i > 0 {
            b = b.smooth_leaky_relu(0.3);
        }
        b = b.linear(true);
    }
    let spec = b
        .self_normalizing(1.0)
        .batch_size(100)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_six_gemms_per_layer(&spec, 100);
}
