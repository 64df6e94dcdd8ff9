//! The rules, as data: the self-normalizing substitution per pair (W, R), the conv forms, the
//! exact algebra and the spline identities — each a name and two s-expression patterns.

/// When a rule may fire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    Always,
    /// The pattern variable is bound to a scalar (shape `[]`).
    Scalar(&'static str),
    /// The matched term is a matrix. Keeps sum reordering to the gradient sums, where factoring
    /// needs it, and away from the long scalar sums of the loss (whose every reordering an AC
    /// rule would otherwise enumerate).
    Matrix,
    /// Every listed pattern variable is bound to a matrix.
    Matrices(&'static [&'static str]),
}

/// A rewrite rule as data: `lhs ⇒ rhs` (and back when `bidirectional`), when `when` holds.
#[derive(Debug, Clone, Copy)]
pub struct RuleSpec {
    pub name: &'static str,
    pub lhs: &'static str,
    pub rhs: &'static str,
    pub bidirectional: bool,
    pub when: When,
}

pub(super) const fn rule(name: &'static str, lhs: &'static str, rhs: &'static str) -> RuleSpec {
    RuleSpec {
        name,
        lhs,
        rhs,
        bidirectional: false,
        when: When::Always,
    }
}

pub(super) const fn both(name: &'static str, lhs: &'static str, rhs: &'static str) -> RuleSpec {
    RuleSpec {
        name,
        lhs,
        rhs,
        bidirectional: true,
        when: When::Always,
    }
}

pub(super) const fn when(r: RuleSpec, when: When) -> RuleSpec {
    RuleSpec { when, ..r }
}

/// A rule whose right-hand side names the declared learned inverse of a matched parameter:
/// `?R` is bound to the partner of the parameter in `?W`'s e-class, from the graph's
/// [`InversePair`]s (both directions: R ≈ W⁻¹ and W ≈ R⁻¹).
#[derive(Debug, Clone, Copy)]
pub struct PairRule {
    pub name: &'static str,
    pub lhs: &'static str,
    pub rhs: &'static str,
}

/// DESIGN.md §2: the self-normalizing substitution, one rule for every declared pair. With
/// `inverse(W) ⇒ R`, the log-det gradient `W⁻ᵀ` becomes `Rᵀ` (eq. 10) by congruence; with
/// `inverse(R) ⇒ W`, the g-flow's forward pass becomes the f-flow's (eq. 11), so the e-graph
/// merges them and the g-flow's backpropagated error *is* δ^f (A.1).
pub const SUBSTITUTION: &[PairRule] = &[PairRule {
    name: "snf-inverse-of-pair",
    lhs: "(inverse ?W)",
    rhs: "?R",
}];

/// The substitution for convolutions: `inverse(op(W)) ⇒ op(R)` with `op` the Toeplitz matrix
/// of a conv (placeholders as in [`CONV_OPERATOR`]).
pub const CONV_SUBSTITUTION: &[PairRule] = &[PairRule {
    name: "snf-inverse-of-pair-conv",
    lhs: "(inverse ({T} ?W))",
    rhs: "({T} ?R)",
}];

/// A convolution identity, written with holes for the ops that carry sizes (`rewrite/holes.rs`:
/// on the left a hole matches its op at any size and binds the sizes, on the right it is built
/// from them): `{T}` a Toeplitz op (`toeplitz:HxW`), `{ADJ}` the adjoint
/// (`toeplitz_adjoint:HxW:K`), `{IMG}` / `{FLAT}` the reshapes between the flat batch
/// `[C·H·W, B]` and the image batch `[C, H, W, B]`, `{KG}` the kernel gradient
/// (`conv_kernel_grad:K`), `{MULT}` the multiplicity (`multiplicity:HxW`), `{MAT}` / `{KER}`
/// the reshapes between a 1×1 kernel `[C, C, 1, 1]` and its `C × C` matrix, `{HW}` the constant
/// H·W. `flat` and `image` name the variables that must have those shapes (so the reshapes are
/// well-formed), `kernel` the variables that must be this conv's kernel shape, `scalar` the
/// scalar ones; a `pointwise` rule holds for 1×1 convolutions only.
#[derive(Debug, Clone, Copy)]
pub struct ConvRule {
    pub name: &'static str,
    pub lhs: &'static str,
    pub rhs: &'static str,
    pub flat: &'static [&'static str],
    pub image: &'static [&'static str],
    pub kernel: &'static [&'static str],
    pub scalar: &'static [&'static str],
    pub pointwise: bool,
}

pub(super) const fn conv_rule(
    name: &'static str,
    lhs: &'static str,
    rhs: &'static str,
) -> ConvRule {
    ConvRule {
        name,
        lhs,
        rhs,
        flat: &[],
        image: &[],
        kernel: &[],
        scalar: &[],
        pointwise: false,
    }
}

/// DESIGN.md §7: a convolution is a linear operator. These identities turn its dense Toeplitz
/// form (which the exact graph and the substitution produce) back into convolutions; they run
/// with the substitution, so the g-flow's layers merge into the f-flow's, and with the algebra.
pub const CONV_OPERATOR: &[ConvRule] = &[
    // T(k) x = conv(x, k) on each example.
    ConvRule {
        flat: &["?x"],
        kernel: &["?K"],
        ..conv_rule(
            "toeplitz-is-conv",
            "(matmul ({T} ?K) ?x)",
            "({FLAT} (conv2d ({IMG} ?x) ?K))",
        )
    },
    // T(k)ᵀ = T(flip_kernel(k)).
    conv_rule(
        "transpose-of-toeplitz",
        "(transpose ({T} ?K))",
        "({T} (flip_kernel ?K))",
    ),
    conv_rule("flip-involution", "(flip_kernel (flip_kernel ?K))", "?K"),
    ConvRule {
        image: &["?y"],
        ..conv_rule("reshape-round-trip-image", "({IMG} ({FLAT} ?y))", "?y")
    },
    ConvRule {
        flat: &["?x"],
        ..conv_rule("reshape-round-trip-flat", "({FLAT} ({IMG} ?x))", "?x")
    },
];

/// The operator identities of the substitution phase: each convolution of the graph gains its
/// dense form `T(k) x` (the reverse of `toeplitz-is-conv`), so the g-flow's `T(R)⁻¹ x`, which
/// the substitution makes `T(W) x`, merges into the f-flow's convolution of the same `x`.
/// Products that are not convolutions (a gradient's `T(W)ᵀ (δ hᵀ)`) stay products here: turned
/// into convolutions this early, they would hide from the algebra phase the reassociation to
/// `(T(W)ᵀ δ)(T(W) h)ᵀ` — and at a batch equal to C·H·W a `[C·H·W, C·H·W]` product has the
/// shape of a batch.
pub const CONV_MERGE: &[ConvRule] = &[
    ConvRule {
        flat: &["?x"],
        kernel: &["?K"],
        ..conv_rule(
            "conv-is-toeplitz",
            "({FLAT} (conv2d ({IMG} ?x) ?K))",
            "(matmul ({T} ?K) ?x)",
        )
    },
    conv_rule(
        "transpose-of-toeplitz",
        "(transpose ({T} ?K))",
        "({T} (flip_kernel ?K))",
    ),
    conv_rule("flip-involution", "(flip_kernel (flip_kernel ?K))", "?K"),
];

/// The 1×1 convolution's Toeplitz matrix is block diagonal, I_{H·W} ⊗ W (in the (c, h, w)
/// order, a permutation of it): ln|det T| = H·W·ln|det W| and T⁻¹ = T(W⁻¹) — C × C work, not
/// (C·H·W)³ (Glow's invertible 1×1 convolution; the exact baseline's step and log-dets). With
/// the algebra only (region by region): in the global substitution phase they would only grow
/// the e-graph of a self-normalizing step, whose inverses the substitution removes anyway.
pub const CONV_POINTWISE: &[ConvRule] = &[
    ConvRule {
        kernel: &["?K"],
        pointwise: true,
        ..conv_rule(
            "logdet-of-pointwise-conv",
            "(logdet ({T} ?K))",
            "(mul {HW} (logdet ({MAT} ?K)))",
        )
    },
    ConvRule {
        kernel: &["?K"],
        pointwise: true,
        ..conv_rule(
            "inverse-of-pointwise-conv",
            "(inverse ({T} ?K))",
            "({T} ({KER} (inverse ({MAT} ?K))))",
        )
    },
];

/// The adjoint side (paper A.2): the kernel gradient of a rank-B outer product is a
/// convolution's kernel gradient, and `adjoint(T(k)) = k ⊙ m`.
pub const CONV_ADJOINT: &[ConvRule] = &[
    ConvRule {
        flat: &["?a", "?c"],
        ..conv_rule(
            "adjoint-of-outer-product",
            "({ADJ} (matmul ?a (transpose ?c)))",
            "({KG} ({IMG} ?a) ({IMG} ?c))",
        )
    },
    conv_rule("adjoint-of-toeplitz", "({ADJ} ({T} ?K))", "({MULT} ?K)"),
    ConvRule {
        scalar: &["?s"],
        ..conv_rule(
            "scalar-out-of-adjoint",
            "({ADJ} (mul ?s ?A))",
            "(mul ?s ({ADJ} ?A))",
        )
    },
    conv_rule("neg-out-of-adjoint", "({ADJ} (neg ?A))", "(neg ({ADJ} ?A))"),
    conv_rule(
        "adjoint-of-sum",
        "({ADJ} (add ?A ?B))",
        "(add ({ADJ} ?A) ({ADJ} ?B))",
    ),
    conv_rule(
        "adjoint-of-difference",
        "({ADJ} (sub ?A ?B))",
        "(sub ({ADJ} ?A) ({ADJ} ?B))",
    ),
];

/// Exact identities of matrix algebra, valid for any operands. Grouped by family: products
/// (associativity), transposes, signs, sums (commutativity, associativity), factoring
/// (distributivity of matmul over add/sub) and scalars.
pub const ALGEBRA: &[RuleSpec] = &[
    both(
        "matmul-assoc",
        "(matmul (matmul ?a ?b) ?c)",
        "(matmul ?a (matmul ?b ?c))",
    ),
    both(
        "transpose-of-product",
        "(transpose (matmul ?a ?b))",
        "(matmul (transpose ?b) (transpose ?a))",
    ),
    rule("transpose-involution", "(transpose (transpose ?a))", "?a"),
    rule("inverse-involution", "(inverse (inverse ?a))", "?a"),
    both(
        "neg-out-of-matmul-left",
        "(matmul (neg ?a) ?b)",
        "(neg (matmul ?a ?b))",
    ),
    both(
        "neg-out-of-matmul-right",
        "(matmul ?a (neg ?b))",
        "(neg (matmul ?a ?b))",
    ),
    rule("neg-involution", "(neg (neg ?a))", "?a"),
    when(
        both("sub-is-add-neg", "(sub ?a ?b)", "(add ?a (neg ?b))"),
        When::Matrix,
    ),
    when(
        rule("add-commute", "(add ?a ?b)", "(add ?b ?a)"),
        When::Matrix,
    ),
    when(
        both("add-assoc", "(add (add ?a ?b) ?c)", "(add ?a (add ?b ?c))"),
        When::Matrix,
    ),
    rule(
        "factor-right",
        "(add (matmul ?a ?c) (matmul ?b ?c))",
        "(matmul (add ?a ?b) ?c)",
    ),
    rule(
        "factor-left",
        "(add (matmul ?a ?b) (matmul ?a ?c))",
        "(matmul ?a (add ?b ?c))",
    ),
    rule(
        "factor-right-sub",
        "(sub (matmul ?a ?c) (matmul ?b ?c))",
        "(matmul (sub ?a ?b) ?c)",
    ),
    rule(
        "factor-left-sub",
        "(sub (matmul ?a ?b) (matmul ?a ?c))",
        "(matmul ?a (sub ?b ?c))",
    ),
    // Only for matrix summands: `(transpose (add A 1.0))` has a scalar summand, whose
    // transpose would be ill-shaped.
    when(
        both(
            "transpose-of-sum",
            "(transpose (add ?a ?b))",
            "(add (transpose ?a) (transpose ?b))",
        ),
        When::Matrices(&["?a", "?b"]),
    ),
    when(
        rule("mul-commute", "(mul ?a ?b)", "(mul ?b ?a)"),
        When::Matrix,
    ),
    when(
        both(
            "scalar-into-matmul",
            "(mul ?k (matmul ?a ?b))",
            "(matmul (mul ?k ?a) ?b)",
        ),
        When::Scalar("?k"),
    ),
    when(
        both(
            "scalar-into-matmul-right",
            "(mul ?k (matmul ?a ?b))",
            "(matmul ?a (mul ?k ?b))",
        ),
        When::Scalar("?k"),
    ),
    when(
        both(
            "scalar-through-neg",
            "(mul ?k (neg ?a))",
            "(neg (mul ?k ?a))",
        ),
        When::Scalar("?k"),
    ),
];

/// A spline identity, with holes (as in [`ConvRule`]) for its `spline_grad` ops of one spline
/// (bins, bound) and one operand `wrt`: `{VALUE}`, `{LOGDET}` and `{BOTH}`, for the value's
/// cotangent, the log-det's, and both at once.
pub const SPLINE: &[RuleSpec] = &[rule(
    // The VJP is linear in the cotangents: the value's and the log-det's VJPs, summed, are one
    // pass over the spline with both cotangents.
    "spline-vjps-merge",
    "(add ({VALUE} ?x ?w ?h ?d ?a) ({LOGDET} ?x ?w ?h ?d ?b))",
    "({BOTH} ?x ?w ?h ?d ?a ?b)",
)];
