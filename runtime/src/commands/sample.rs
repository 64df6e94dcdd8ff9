//! Sampling: z ~ N(0, I) through the learned inverse g (R, and the activation inverted by
//! Newton's method) or through the exact inverse (W⁻¹, by LU solves).

use crate::backend::{open, Draw};
use crate::cube::matmul::MatmulPrecision;
use crate::cube::probe::Chosen;
use crate::host::exec::ExecError;
use crate::host::linalg::{inverse, matmul, solve, LinalgError, MatRef, Real};
use crate::host::shape_ops::{conv2d, embed, permute, take, toeplitz};
use crate::host::spline::{Spline, SplineParams};
use crate::model::Model;
use crate::progress::Progress;
use rand::RngExt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use snfc_compiler::ir::inverse::{latent_inputs, sample_graph, OUTPUT_SAMPLES};
use snfc_compiler::ir::lower::{param_name, ParamKind};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::{LayerSpec, Preprocess};

/// s(x) = αx + (1−α) softplus(x) and s'(x).
fn slrelu(x: f64, alpha: f64) -> (f64, f64) {
    let sp = if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    };
    let sig = 1.0 / (1.0 + (-x).exp());
    (alpha * x + (1.0 - alpha) * sp, alpha + (1.0 - alpha) * sig)
}

/// Solve s(x) = y by Newton's method. s is increasing and convex with s' ∈ (α, 1), so the
/// iteration converges from x₀ = y (monotonically after the first step).
pub fn slrelu_inverse(y: f64, alpha: f64) -> f64 {
    let mut x = y;
    for _ in 0..100 {
        let (s, ds) = slrelu(x, alpha);
        let step = (s - y) / ds;
        x -= step;
        if step.abs() <= 1e-12 * (1.0 + x.abs()) {
            break;
        }
    }
    x
}

/// A coupling network's scale and shift `(log_s, t)`, each `[C/2, H, W, n]`, from its
/// conditioning half `x1` `[C/2, H, W, n]` (the forward's formula, in f64; see
/// `AffineCouplingSpec`).
pub fn coupling_net(
    param: &dyn Fn(ParamKind) -> Vec<f64>,
    x1: &[f64],
    (c, hh, ww, n): (usize, usize, usize, usize),
    width: usize,
) -> (Vec<f64>, Vec<f64>) {
    let conv_bias = |x: &[f64], cin: usize, k: u8, cout: usize, kk: usize| {
        let mut y = conv2d(
            x,
            &[cin, hh, ww, n],
            &param(ParamKind::CouplingWeight(k)),
            &[cout, cin, kk, kk],
        );
        let bias = param(ParamKind::CouplingBias(k));
        let plane = hh * ww * n;
        for (o, b) in bias.iter().enumerate() {
            y[o * plane..(o + 1) * plane]
                .iter_mut()
                .for_each(|v| *v += b);
        }
        y
    };
    let relu = |mut v: Vec<f64>| {
        v.iter_mut().for_each(|x| *x = x.max(0.0));
        v
    };
    let h0 = relu(conv_bias(x1, c / 2, 0, width, 3));
    let h1 = relu(conv_bias(&h0, width, 1, width, 1));
    let mut net = conv_bias(&h1, width, 2, c, 3);
    let logs = param(ParamKind::CouplingLogs);
    let plane = hh * ww * n;
    for (o, l) in logs.iter().enumerate() {
        let g = (3.0 * l).exp();
        net[o * plane..(o + 1) * plane]
            .iter_mut()
            .for_each(|v| *v *= g);
    }
    let shape = [c / 2, 2, hh, ww, n];
    let raw = take(&net, &shape, 1, 0);
    let t = take(&net, &shape, 1, 1);
    let log_s = raw.iter().map(|r| 2.0 * (r / 2.0).tanh()).collect();
    (log_s, t)
}

/// Map `z` (`[D, n]`, one column per sample) back to data space through the flow's inverse.
/// With splits, `z` lists the flow's final output first, then each factored half from the last
/// split to the first (rows of the `[D, n]` matrix).
pub fn invert<T: Real>(
    model: &Model<T>,
    z: &[f64],
    n: usize,
    exact: bool,
) -> Result<Vec<f64>, LinalgError> {
    invert_showing(model, z, n, exact, &Progress::hidden())
}

/// [`invert`], counting the layers inverted on `progress`.
pub fn invert_showing<T: Real>(
    model: &Model<T>,
    z: &[f64],
    n: usize,
    exact: bool,
    progress: &Progress,
) -> Result<Vec<f64>, LinalgError> {
    let spec = &model.spec;
    let shapes = spec.layer_shapes();
    let d_out = shapes.last().map_or(spec.input.dim(), |s| s.numel());
    let mut h = z[..d_out * n].to_vec();
    // Rows of `z` consumed so far.
    let mut used = d_out;
    let f64s = |name: &str| -> Vec<f64> { model.get(name).iter().map(|v| v.as_f64()).collect() };
    for (i, layer) in spec.layers.iter().enumerate().rev() {
        progress.inc(1);
        let d = shapes[i].numel();
        match layer {
            LayerSpec::Split(_) => {
                // The factored half comes back from the latent: rows [x1; x2].
                let half = d / 2;
                h.extend_from_slice(&z[used * n..(used + half) * n]);
                used += half;
            }
            LayerSpec::Linear(l) => {
                if l.bias {
                    let b = model.get(&param_name(i, ParamKind::Bias));
                    for k in 0..d {
                        let bk = b[k].as_f64();
                        h[k * n..(k + 1) * n].iter_mut().for_each(|v| *v -= bk);
                    }
                }
                h = if exact {
                    solve(&f64s(&param_name(i, ParamKind::Weight)), d, &h, n)?
                } else {
                    let r = f64s(&param_name(i, ParamKind::WeightInv));
                    let mut out = vec![0.0; d * n];
                    matmul(
                        MatRef::row_major(&r, d, d),
                        MatRef::row_major(&h, d, n),
                        &mut out,
                        1.0,
                        0.0,
                        false,
                    );
                    out
                };
            }
            LayerSpec::Conv(c) => {
                let (ch, hh, ww) = shapes[i].image();
                let plane = hh * ww * n;
                if c.bias {
                    let b = model.get(&param_name(i, ParamKind::Bias));
                    for (k, bk) in b.iter().enumerate() {
                        let bk = bk.as_f64();
                        h[k * plane..(k + 1) * plane]
                            .iter_mut()
                            .for_each(|v| *v -= bk);
                    }
                }
                let kshape = [ch, ch, c.kernel_size, c.kernel_size];
                h = if exact && c.kernel_size == 1 {
                    // T(w)⁻¹ = T(W⁻¹) for a 1×1 conv: one C × C inverse, not a (C·H·W)² LU.
                    let inv = inverse(&f64s(&param_name(i, ParamKind::Weight)), ch)?;
                    conv2d(&h, &[ch, hh, ww, n], &inv, &kshape)
                } else if exact {
                    // T(w)⁻¹ by LU (the h values are the flat [C·H·W, n] columns).
                    let t = toeplitz(&f64s(&param_name(i, ParamKind::Weight)), &kshape, hh, ww);
                    solve(&t, ch * hh * ww, &h, n)?
                } else {
                    let r = f64s(&param_name(i, ParamKind::WeightInv));
                    conv2d(&h, &[ch, hh, ww, n], &r, &kshape)
                };
            }
            LayerSpec::Spline(sp) => {
                let d = shapes[i].numel();
                let get = |kind| f64s(&param_name(i, kind));
                let (w, hh, dd) = (
                    get(ParamKind::SplineWidths),
                    get(ParamKind::SplineHeights),
                    get(ParamKind::SplineDerivatives),
                );
                let params = SplineParams {
                    widths: &w,
                    heights: &hh,
                    derivatives: &dd,
                };
                let mut x = vec![0.0; d * n];
                let mut ld = vec![0.0; d * n];
                Spline::new(sp.bins, sp.tail_bound).inverse_batch(&h, n, params, &mut x, &mut ld);
                h = x;
            }
            LayerSpec::Squeeze(_) => {
                let (ch, hh, ww) = shapes[i].image();
                // The forward map is [C, H/2, 2, W/2, 2] → [C, 2, 2, H/2, W/2]; undo it.
                h = permute(&h, &[ch, 2, 2, hh / 2, ww / 2, n], &[0, 3, 1, 4, 2, 5]);
            }
            LayerSpec::SmoothLeakyRelu(a) => {
                h.iter_mut().for_each(|v| *v = slrelu_inverse(*v, a.alpha));
            }
            LayerSpec::AffineCoupling(a) => {
                // z = [x1, x2·exp(log_s(x1)) + t(x1)]  ⇒  x2 = (z2 − t)·exp(−log_s).
                let (c, hh, ww) = shapes[i].image();
                let halves = [2, c / 2, hh, ww, n];
                let x1 = take(&h, &halves, 0, 0);
                let z2 = take(&h, &halves, 0, 1);
                let param = |kind| f64s(&param_name(i, kind));
                let (log_s, t) = coupling_net(&param, &x1, (c, hh, ww, n), a.width);
                let x2: Vec<f64> = z2
                    .iter()
                    .zip(&log_s)
                    .zip(&t)
                    .map(|((z, l), t)| (z - t) * (-l).exp())
                    .collect();
                let half = [c / 2, hh, ww, n];
                h = embed(&x1, &half, 0, 0, 2);
                let upper = embed(&x2, &half, 0, 1, 2);
                h.iter_mut().zip(&upper).for_each(|(a, b)| *a += b);
            }
            LayerSpec::Actnorm(_) => {
                // y = (x − t)·exp(−s)  ⇒  x = y·exp(s) + t, per channel.
                let (c, hw) = shapes[i].channels();
                let t = f64s(&param_name(i, ParamKind::ActnormTranslation));
                let s = f64s(&param_name(i, ParamKind::ActnormLogScale));
                let plane = hw * n;
                for k in 0..c {
                    let (scale, shift) = (s[k].exp(), t[k]);
                    h[k * plane..(k + 1) * plane]
                        .iter_mut()
                        .for_each(|v| *v = *v * scale + shift);
                }
            }
        }
    }
    Ok(h)
}

/// `n` samples in data space, as rows (`n × D`). For 8-bit specs the logit preprocessing is
/// inverted to [0, 256) (see [`to_pixels`]).
pub fn sample<T: Real>(
    model: &Model<T>,
    n: usize,
    seed: u64,
    exact: bool,
) -> Result<Vec<f64>, LinalgError> {
    sample_at(model, n, seed, exact, 1.0)
}

/// [`sample`] from the latent N(0, T² I) at temperature `temperature` = T (Glow's trick: T < 1
/// trades diversity for cleaner samples); every factored half of a multiscale flow too.
pub fn sample_at<T: Real>(
    model: &Model<T>,
    n: usize,
    seed: u64,
    exact: bool,
    temperature: f64,
) -> Result<Vec<f64>, LinalgError> {
    sample_showing(model, n, seed, exact, temperature, &Progress::hidden())
}

/// [`sample_at`], counting the layers inverted on `progress` (one per layer of the spec).
pub fn sample_showing<T: Real>(
    model: &Model<T>,
    n: usize,
    seed: u64,
    exact: bool,
    temperature: f64,
    progress: &Progress,
) -> Result<Vec<f64>, LinalgError> {
    let d = model.spec.input.dim();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let z: Vec<f64> = (0..d * n)
        .map(|_| temperature * rng.sample::<f64, _>(StandardNormal))
        .collect();
    let h = invert_showing(model, &z, n, exact, progress)?;
    progress.finish();
    let mut rows = crate::batch::columns_to_rows(&h, d, n);
    if model.spec.input.preprocess == Preprocess::DequantizeLogit {
        let a = model.spec.input.logit_alpha;
        // t = logit(s), s = α + (1−2α) y, y = x / 256
        rows.iter_mut().for_each(|t| {
            let s = 1.0 / (1.0 + (-*t).exp());
            *t = 256.0 * (s - a) / (1.0 - 2.0 * a);
        });
    }
    Ok(rows)
}

/// How [`sample_on`] samples: `n` samples through the learned inverse (or W⁻¹ with `exact`)
/// from the latent N(0, T² I) at `temperature` = T, drawn from `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    pub n: usize,
    pub seed: u64,
    pub exact: bool,
    pub temperature: f64,
    /// The most samples per batch (fewer where the memory calls for it).
    pub batch: usize,
    /// On a GPU, draw the latent there (cubek-random) instead of taking the host's stream;
    /// the host's stream gives the same samples as [`sample_at`], to the device's precision.
    pub latent_on_device: bool,
}

/// [`sample_at`] by the compiled sampling graph (`snfc_compiler::ir::inverse`) on `device`, in
/// batches that fit [`EVAL_MEMORY_BYTES`](crate::eval::EVAL_MEMORY_BYTES): every layer's
/// inverse runs there (W⁻¹ of an exact inverse by LU on the host, once per batch). Counts the
/// samples done on `progress`.
pub fn sample_on<T: Real + 'static>(
    model: &Model<T>,
    opts: &SampleOptions,
    device: &Chosen,
    progress: &Progress,
) -> Result<Vec<f64>, ExecError> {
    let spec = &model.spec;
    let d = spec.input.dim();
    let n = opts.n;
    let batch = crate::eval::graph_batch_within::<T>(
        |b| sample_graph(spec, b, opts.exact),
        opts.batch.min(n).max(1),
        crate::eval::EVAL_MEMORY_BYTES,
    );
    let plan = Plan::new(&sample_graph(spec, batch, opts.exact));
    let mut backend = open::<T>(device, plan, MatmulPrecision::F32)?;
    for (name, v) in &model.values {
        backend.set(name, v)?;
    }
    let on_device = opts.latent_on_device && backend.draws_on_device();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    // The host's latent: all of it, as `sample_at` draws it (one [D, n] column block).
    let z: Vec<f64> = if on_device {
        Vec::new()
    } else {
        (0..d * n)
            .map(|_| opts.temperature * rng.sample::<f64, _>(StandardNormal))
            .collect()
    };
    let latents = latent_inputs(spec);
    let mut rows = Vec::with_capacity(n * d);
    let mut start = 0;
    while start < n {
        let cols = batch.min(n - start);
        // Latent block `k` holds rows [row0, row0 + len) of the [D, n] latent.
        let mut row0 = 0;
        for (name, len) in &latents {
            if on_device {
                let seed = rng.random::<u64>();
                let std = opts.temperature as f32;
                backend.draw(name, seed, Draw::Normal { std })?;
            } else {
                let mut block = vec![T::zero(); len * batch];
                for r in 0..*len {
                    let src = &z[(row0 + r) * n + start..][..cols];
                    for (dst, v) in block[r * batch..][..cols].iter_mut().zip(src) {
                        *dst = T::of_f64(*v);
                    }
                }
                backend.set(name, &block)?;
            }
            row0 += len;
        }
        backend.run()?;
        let x = backend.output(OUTPUT_SAMPLES)?.data;
        for col in 0..cols {
            rows.extend((0..d).map(|k| x[k * batch + col].as_f64()));
        }
        progress.inc(cols as u64);
        start += cols;
    }
    progress.finish();
    Ok(rows)
}

/// Values on [0, 256) to 8-bit pixels (NaN and out-of-range values clamp).
pub fn to_pixels(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .map(|v| {
            if v.is_nan() {
                0
            } else {
                v.floor().clamp(0.0, 255.0) as u8
            }
        })
        .collect()
}

/// The image layout (channels, height, width) of an 8-bit spec, if it is an image: `[C, H, W]`,
/// `[H, W]`, or `[D]` with D a perfect square (a flattened grayscale image such as MNIST).
pub fn image_shape(model_shape: &[usize]) -> Option<[usize; 3]> {
    match model_shape {
        [c, h, w] if *c == 1 || *c == 3 => Some([*c, *h, *w]),
        [h, w] => Some([1, *h, *w]),
        [d] => {
            let s = (*d as f64).sqrt().round() as usize;
            (s * s == *d && s > 1).then_some([1, s, s])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newton_inverts_smooth_leaky_relu() {
        for &y in &[-30.0, -3.0, -0.1, 0.0, 0.5, 4.0, 40.0] {
            for &a in &[0.05, 0.3, 0.9] {
                let x = slrelu_inverse(y, a);
                assert!((slrelu(x, a).0 - y).abs() < 1e-9, "y={y} a={a} x={x}");
            }
        }
    }

    #[test]
    fn image_shapes() {
        assert_eq!(image_shape(&[784]), Some([1, 28, 28]));
        assert_eq!(image_shape(&[3, 32, 32]), Some([3, 32, 32]));
        assert_eq!(image_shape(&[10]), None);
    }
}
