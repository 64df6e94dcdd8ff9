//! `snfc sample`: draws through the inverse, written as a PNG grid or `.npy` rows.

use crate::commands::common::*;
use crate::*;
use anyhow::{bail, Result};
use snfc_compiler::spec::GradientMode;
use snfc_runtime::cube::probe::Chosen;
use snfc_runtime::distributed;
use snfc_runtime::model::Model;
use snfc_runtime::progress::Progress;
use snfc_runtime::sample::SampleOptions;
use std::path::PathBuf;

/// The most samples a GPU draws at once (fewer where the sampling plan's memory calls for it).
const SAMPLE_BATCH: usize = 256;

/// `snfc sample` with its arguments.
pub fn run(args: SampleArgs, _comm: &distributed::Comm) -> Result<()> {
    let SampleArgs {
        checkpoint,
        n,
        out,
        exact_inverse,
        seed,
        temperature,
        spec,
        device,
        noise,
    } = args;
    if n == 0 {
        bail!("-n must be at least 1");
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("--temperature must be a positive number, got {temperature}");
    }
    let chosen = resolve_device(device)?;
    let spec = spec.as_deref().map(spec_from).transpose()?;
    checkpoint_path(&checkpoint)?;
    let (model, _) = Model::<f64>::load(&checkpoint, spec.as_ref())?;
    let exact = exact_inverse || model.spec.objective.gradient == GradientMode::Exact;
    if exact && !exact_inverse {
        eprintln!(
            "spec `{}` was trained with the exact gradient (R is not trained): sampling with W⁻¹",
            model.spec.name
        );
    }
    let limit = snfc_compiler::spec::MAX_TENSOR_ELEMENTS;
    if n.checked_mul(model.spec.input.dim())
        .is_none_or(|v| v > limit)
    {
        bail!(
            "-n {n}: {n} samples of {} values exceed the largest tensor snfc allocates ({limit} values)",
            model.spec.input.dim()
        );
    }
    let d = model.spec.input.dim();
    let image = snfc_runtime::sample::image_shape(&model.spec.input.shape);
    let eight_bit = model.spec.input.preprocess == snfc_compiler::spec::Preprocess::DequantizeLogit;
    let grid = image.filter(|_| eight_bit);
    // The file's extension decides its format, checked before anything is drawn.
    let out = out.unwrap_or_else(|| {
        PathBuf::from(if grid.is_some() {
            "samples.png"
        } else {
            "samples.npy"
        })
    });
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match (extension.as_deref(), grid) {
        (Some("npy"), _) | (Some("png"), Some(_)) => {}
        (Some("png"), None) => bail!(
            "{}: a .png grid needs an image spec with 8-bit data (`{}` has shape {:?} and preprocess {:?}); write .npy instead",
            out.display(),
            model.spec.name,
            model.spec.input.shape,
            model.spec.input.preprocess
        ),
        _ => bail!(
            "{}: unsupported output format; sample writes .png (a grid, for image specs with 8-bit data) or .npy (float rows)",
            out.display()
        ),
    }
    let rows = if chosen == Chosen::Host {
        let progress = Progress::new(model.spec.layers.len() as u64, "sampling", "layers", true);
        snfc_runtime::sample::sample_showing(&model, n, seed, exact, temperature, &progress)?
    } else {
        // A GPU samples in f32: the checkpoint's parameters rounded once.
        let opts = SampleOptions {
            n,
            seed,
            exact,
            temperature,
            batch: SAMPLE_BATCH,
            latent_on_device: noise == NoiseSource::Device,
        };
        let progress = Progress::new(n as u64, "sampling", "samples", true);
        snfc_runtime::sample::sample_on(&model.cast::<f32>(), &opts, &chosen, &progress)?
    };
    match grid {
        Some([c, h, w]) if extension.as_deref() == Some("png") => {
            let pixels = snfc_runtime::sample::to_pixels(&rows);
            snfc_runtime::image::write_png_grid(&out, &pixels, n, c, h, w)?;
            println!("wrote {n} samples to {}", out.display());
        }
        _ => {
            snfc_runtime::npy::write_npy_f64(&out, &[n, d], &rows)?;
            println!("wrote {n} samples of dimension {d} to {}", out.display());
        }
    }
    Ok(())
}
