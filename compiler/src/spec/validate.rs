//! Semantic checks of a [`FlowSpec`]: ranges and non-empty lists. Every problem is
//! reported at the JSON pointer the offending value has in the spec's JSON form.

use super::errors::SpecError;
use super::{Augment, FlowSpec, Lambda, LayerShape, LayerSpec, MAX_TENSOR_ELEMENTS};

/// All semantic problems of `spec`, in document order. `layer_paths` gives the JSON pointer each
/// layer was written at (a layer of a `repeat` block is written once for all its copies);
/// without, layer `i` is at `/layers/i`.
/// A spec name that is safe as one path component: `runs/NAME` stays inside `runs/`.
fn is_safe_name(name: &str) -> bool {
    name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(crate) fn semantic_errors(spec: &FlowSpec, layer_paths: Option<&[String]>) -> Vec<SpecError> {
    let at = |i: usize| match layer_paths.and_then(|p| p.get(i)) {
        Some(p) => p.clone(),
        None => format!("/layers/{i}"),
    };
    let mut errors = Vec::new();
    let mut push = |pointer: String, message: String| errors.push(SpecError::new(pointer, message));

    if spec.name.trim().is_empty() {
        push("/name".into(), "name must not be empty".into());
    } else if !is_safe_name(&spec.name) {
        push(
            "/name".into(),
            format!(
                "name must be one path component of letters, digits, '-', '_' and '.' (not \
                 \".\" or \"..\"): it names the run's directory runs/NAME; got {:?}",
                spec.name
            ),
        );
    }

    let input = &spec.input;
    if input.shape.is_empty() {
        push(
            "/input/shape".into(),
            "shape must not be empty (give at least one dimension)".into(),
        );
    }
    for (i, &d) in input.shape.iter().enumerate() {
        if d == 0 {
            push(
                format!("/input/shape/{i}"),
                format!("shape dimensions must be positive, got {d}"),
            );
        }
    }
    if input
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_none()
    {
        push(
            "/input/shape".into(),
            "the product of the shape's dimensions is too large".into(),
        );
    }
    let a = input.logit_alpha;
    if !(a > 0.0 && a < 0.5) {
        push(
            "/input/logit_alpha".into(),
            format!("logit_alpha must be in (0, 0.5), got {a}"),
        );
    }

    if spec.layers.is_empty() {
        push(
            "/layers".into(),
            "layers must not be empty (give at least one layer)".into(),
        );
    }
    let shapes = spec.layer_shapes();
    for (i, layer) in spec.layers.iter().enumerate() {
        match layer {
            LayerSpec::Linear(_) => {}
            LayerSpec::Conv(c) => {
                if c.kernel_size % 2 == 0 {
                    push(
                        format!("{}/kernel_size", at(i)),
                        format!(
                            "kernel_size must be odd (stride 1, \"same\" zero padding), got {}",
                            c.kernel_size
                        ),
                    );
                }
                match shapes[i] {
                    LayerShape::Image { .. } => {}
                    s @ LayerShape::Flat(_) => push(
                        at(i),
                        format!(
                            "conv needs an image input [C, H, W]; this layer's input is flat {s} \
                             (the input shape has rank {} or a linear layer came before)",
                            spec.input.shape.len()
                        ),
                    ),
                }
            }
            LayerSpec::Spline(sp) => {
                // Bin sizes have a floor of 1e-3 of the interval: K·1e-3 must stay below 1.
                if !(1..1000).contains(&sp.bins) {
                    push(
                        format!("{}/bins", at(i)),
                        format!("bins must be in 1..1000, got {}", sp.bins),
                    );
                }
                if !(sp.tail_bound.is_finite() && sp.tail_bound > 0.0) {
                    push(
                        format!("{}/tail_bound", at(i)),
                        format!("tail_bound must be finite and > 0, got {}", sp.tail_bound),
                    );
                }
            }
            LayerSpec::Squeeze(_) => match shapes[i] {
                LayerShape::Image { h, w, .. } if h % 2 == 0 && w % 2 == 0 => {}
                s @ LayerShape::Image { .. } => push(
                    at(i),
                    format!("squeeze halves H and W: this layer's input {s} has an odd side"),
                ),
                s @ LayerShape::Flat(_) => push(
                    at(i),
                    format!(
                        "squeeze needs an image input [C, H, W]; this layer's input is flat {s}"
                    ),
                ),
            },
            LayerSpec::Actnorm(_) => {}
            LayerSpec::Split(_) => match shapes[i] {
                LayerShape::Image { c, .. } if c % 2 == 0 => {}
                s => push(
                    at(i),
                    format!(
                        "split factors out half of the channels: it needs an image input \
                         [C, H, W] with C even; this layer's input is {s}"
                    ),
                ),
            },
            LayerSpec::AffineCoupling(a) => {
                if a.width == 0 {
                    push(
                        format!("{}/width", at(i)),
                        "width must be at least 1".into(),
                    );
                }
                match shapes[i] {
                    LayerShape::Image { c, .. } if c % 2 == 0 => {}
                    s => push(
                        at(i),
                        format!(
                            "affine_coupling splits the channels in halves: it needs an image \
                             input [C, H, W] with C even; this layer's input is {s}"
                        ),
                    ),
                }
            }
            LayerSpec::SmoothLeakyRelu(s) => {
                if !(s.alpha > 0.0 && s.alpha < 1.0) {
                    push(
                        format!("{}/alpha", at(i)),
                        format!("alpha must be in (0, 1), got {}", s.alpha),
                    );
                }
            }
        }
    }

    // Sizes only once the shapes themselves are sound (an overflowing input shape is reported
    // above, and every size computed from it would be noise).
    let input_ok = input
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some();
    if input_ok {
        for (i, what, shape) in layer_tensors(spec, &shapes) {
            if elements(&shape).is_none_or(|n| n > MAX_TENSOR_ELEMENTS) {
                push(
                    at(i),
                    format!(
                        "this layer's {what} {shape:?} has more than 2^40 elements \
                         (the most any tensor may have)"
                    ),
                );
            }
        }
        if let Err(message) = batch_fits(spec, &shapes, spec.train.batch_size) {
            push("/train/batch_size".into(), message);
        }
    }

    match spec.objective.lambda {
        Lambda::Fixed(lambda) => {
            if !(lambda.is_finite() && lambda >= 0.0) {
                push(
                    "/objective/lambda".into(),
                    format!("lambda must be finite and >= 0, got {lambda}"),
                );
            }
        }
        Lambda::Geco { geco } => {
            let p = "/objective/lambda/geco";
            let mut check = |field: &str, v: f64, ok: bool, what: &str| {
                if !(v.is_finite() && ok) {
                    push(
                        format!("{p}/{field}"),
                        format!("{field} must be {what}, got {v}"),
                    );
                }
            };
            check("lambda0", geco.lambda0, geco.lambda0 > 0.0, "> 0");
            check("lr", geco.lr, geco.lr >= 0.0, ">= 0");
            check("ema", geco.ema, (0.0..1.0).contains(&geco.ema), "in [0, 1)");
            check("kappa", geco.kappa, true, "finite");
            if let Some(min) = geco.min {
                check("min", min, min >= 0.0, ">= 0");
            }
            if let Some(max) = geco.max {
                check("max", max, max > 0.0, "> 0");
            }
            let (lo, hi) = (geco.min.unwrap_or(0.0), geco.max.unwrap_or(f64::INFINITY));
            if lo > hi {
                push(
                    format!("{p}/min"),
                    format!("min ({lo}) must not exceed max ({hi})"),
                );
            } else if !(lo..=hi).contains(&geco.lambda0) {
                push(
                    format!("{p}/lambda0"),
                    format!(
                        "lambda0 ({}) must lie within [min, max] = [{lo}, {hi}]",
                        geco.lambda0
                    ),
                );
            }
        }
    }

    let train = &spec.train;
    if train.batch_size == 0 {
        push(
            "/train/batch_size".into(),
            "batch_size must be at least 1, got 0".into(),
        );
    }
    if train.epochs == 0 {
        push(
            "/train/epochs".into(),
            "epochs must be at least 1, got 0".into(),
        );
    }
    if spec.train.augment != Augment::None {
        match spec.input.shape.as_slice() {
            [_, h, w] if *h >= 2 && *w >= 2 => {}
            s => push(
                "/train/augment".into(),
                format!(
                    "{} needs an image input [C, H, W] with H, W >= 2; the input is {s:?}",
                    serde_json::to_value(spec.train.augment)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            ),
        }
    }
    if let Some(c) = spec.train.grad_clip_norm {
        if !(c.is_finite() && c > 0.0) {
            push(
                "/train/grad_clip_norm".into(),
                format!("grad_clip_norm must be a positive number, got {c}"),
            );
        }
    }
    // warmup_epochs may exceed epochs (the warmup then simply never completes).

    let adam = &train.optimizer.adam;
    let p = "/train/optimizer/adam";
    if !(adam.lr.is_finite() && adam.lr > 0.0) {
        push(
            format!("{p}/lr"),
            format!("lr must be finite and > 0, got {}", adam.lr),
        );
    }
    for (i, &b) in adam.betas.iter().enumerate() {
        if !(0.0..1.0).contains(&b) {
            push(
                format!("{p}/betas/{i}"),
                format!("betas[{i}] must be in [0, 1), got {b}"),
            );
        }
    }
    if !(adam.eps.is_finite() && adam.eps > 0.0) {
        push(
            format!("{p}/eps"),
            format!("eps must be finite and > 0, got {}", adam.eps),
        );
    }
    if !(adam.inverse_lr_scale.is_finite() && adam.inverse_lr_scale > 0.0) {
        push(
            format!("{p}/inverse_lr_scale"),
            format!(
                "inverse_lr_scale must be finite and > 0, got {}",
                adam.inverse_lr_scale
            ),
        );
    }

    errors
}

/// The product of `shape`, `None` if it overflows.
fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Each layer's parameters whose size depends on the spec's numbers (weights, spline and
/// coupling parameters), as `(layer, what, shape)`; layers whose input does not fit them (a
/// conv on a flat input) are skipped: that is reported elsewhere.
fn layer_tensors(spec: &FlowSpec, shapes: &[LayerShape]) -> Vec<(usize, &'static str, Vec<usize>)> {
    let mut out = Vec::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        let s = shapes[i];
        match (layer, s) {
            (LayerSpec::Linear(_), _) => out.push((i, "weight", vec![s.numel(), s.numel()])),
            (LayerSpec::Conv(c), LayerShape::Image { c: ch, .. }) => {
                out.push((i, "kernel", vec![ch, ch, c.kernel_size, c.kernel_size]))
            }
            (LayerSpec::Spline(sp), _) => out.push((i, "spline widths", vec![s.numel(), sp.bins])),
            (LayerSpec::AffineCoupling(a), LayerShape::Image { c, .. }) => {
                out.push((i, "first coupling kernel", vec![a.width, c / 2, 3, 3]));
                out.push((i, "second coupling kernel", vec![a.width, a.width, 1, 1]));
                out.push((i, "last coupling kernel", vec![c, a.width, 3, 3]));
            }
            _ => {}
        }
    }
    out
}

/// Whether a training step of `batch` examples keeps every batch of activations (the input,
/// each coupling network's hidden maps) within [`MAX_TENSOR_ELEMENTS`].
pub(crate) fn batch_fits(
    spec: &FlowSpec,
    shapes: &[LayerShape],
    batch: usize,
) -> Result<(), String> {
    let mut widest = spec.input.dim();
    for (layer, s) in spec.layers.iter().zip(shapes) {
        if let (LayerSpec::AffineCoupling(a), LayerShape::Image { h, w, .. }) = (layer, s) {
            widest = widest.max(a.width.saturating_mul(*h).saturating_mul(*w));
        }
    }
    match widest.checked_mul(batch) {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => Ok(()),
        _ => Err(format!(
            "a batch of {batch} examples makes activations of {widest} × {batch} values, more \
             than 2^40 elements (the most any tensor may have)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::parse_spec;

    fn errors(json: &str) -> Vec<(String, String)> {
        match parse_spec(json) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .errors
                .into_iter()
                .map(|e| (e.pointer, e.message))
                .collect(),
        }
    }

    #[test]
    fn tensors_beyond_2_pow_40_elements_are_refused_where_they_are_written() {
        let e = errors(
            r#"{"name": "x", "input": {"shape": [100000, 100000], "preprocess": "none"},
                "layers": [{"type": "smooth_leaky_relu"}, {"type": "linear"}]}"#,
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "/layers/1");
        assert!(e[0].1.contains("[10000000000, 10000000000]"), "{e:?}");
        let e = errors(
            r#"{"name": "x", "input": {"shape": [784], "preprocess": "none"},
                "layers": [{"type": "linear"}], "train": {"batch_size": 10000000000}}"#,
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "/train/batch_size");
        // A coupling's hidden maps count against the batch too.
        let e = errors(
            r#"{"name": "x", "input": {"shape": [2, 1024, 1024], "preprocess": "none"},
                "layers": [{"type": "affine_coupling", "width": 20000}]}"#,
        );
        assert!(e.iter().any(|(p, _)| p == "/train/batch_size"), "{e:?}");
    }

    #[test]
    fn overflowing_image_shapes_are_errors_not_panics() {
        for json in [
            r#"{"name": "x", "input": {"shape": [4294967296, 4294967296, 2], "preprocess": "none"}, "layers": [{"type": "linear"}]}"#,
            r#"{"name": "x", "input": {"shape": [4611686018427387904, 2, 2], "preprocess": "none"}, "layers": [{"type": "squeeze"}, {"type": "linear"}]}"#,
            r#"{"name": "x", "input": {"shape": [2, 8, 8], "preprocess": "none"}, "layers": [{"type": "conv", "kernel_size": 4294967297}]}"#,
        ] {
            let e = errors(json);
            assert!(!e.is_empty(), "{json}");
        }
    }

    #[test]
    fn a_batch_given_apart_from_the_spec_is_checked_the_same_way() {
        let spec = parse_spec(
            r#"{"name": "x", "input": {"shape": [784], "preprocess": "none"}, "layers": [{"type": "linear"}]}"#,
        )
        .unwrap();
        assert!(spec.check_batch(100).is_ok());
        let e = spec.check_batch(1 << 40).unwrap_err();
        assert!(e.contains("784 × 1099511627776"), "{e}");
    }
}
