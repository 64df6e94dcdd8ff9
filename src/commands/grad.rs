//! `snfc grad`: one step's gradients for given parameters and batch, checked inputs first.

use crate::commands::common::*;
use crate::*;
use anyhow::{bail, Context, Result};
use snfc_compiler::compile::OptLevel;
use snfc_compiler::spec::FlowSpec;
use snfc_runtime::cube::probe::Chosen;
use snfc_runtime::distributed;
use snfc_runtime::host::linalg::Real;
use snfc_runtime::model::{write_safetensors, Model};
use snfc_runtime::progress::Progress;
use std::path::Path;

/// `snfc grad` with its arguments.
pub fn run(args: GradArgs, _comm: &distributed::Comm) -> Result<()> {
    let GradArgs {
        spec,
        params,
        input,
        out,
        dtype,
        seed,
        noise,
        no_fusion,
        exact,
        device,
    } = args;
    let chosen = resolve_device(device)?;
    let spec = spec_from(&spec)?;
    let args = GradInputs {
        device: chosen,
        params: &params,
        input: &input,
        noise: noise.as_deref(),
        out: &out,
        seed,
        level: if exact {
            OptLevel::None
        } else {
            level(no_fusion)
        },
    };
    match dtype {
        Dtype::F32 => grad::<f32>(&spec, &args),
        Dtype::F64 => grad::<f64>(&spec, &args),
    }
}

struct GradInputs<'a> {
    device: Chosen,
    params: &'a Path,
    input: &'a Path,
    noise: Option<&'a Path>,
    out: &'a Path,
    seed: u64,
    level: OptLevel,
}

fn grad<T: Real + 'static>(spec: &FlowSpec, args: &GradInputs) -> Result<()> {
    let GradInputs {
        params, input, out, ..
    } = *args;
    let (model, _) = Model::<T>::load(params, Some(spec))?;
    let (shape, values) = snfc_runtime::npy::read_npy(input)?;
    if let Some(k) = values
        .iter()
        .position(|v| !T::of_f64(*v).as_f64().is_finite())
    {
        bail!(
            "{}: value [{k}] = {} is not finite in {} (pass --dtype f64 for values beyond f32's range)",
            input.display(),
            values[k],
            T::NAME
        );
    }
    let d = spec.input.dim();
    let batch = shape.first().copied().unwrap_or(0);
    let per: usize = shape.iter().skip(1).product();
    if shape.len() < 2 || per != d || batch == 0 {
        bail!(
            "{}: expected a batch of shape [B, {}] (spec `{}` input shape {:?}), got {:?}",
            input.display(),
            d,
            spec.name,
            spec.input.shape,
            shape
        );
    }
    // 8-bit data, as `train` takes it: integers 0..=255 (anything else dequantizes to values
    // outside (0, 1) and every gradient is NaN).
    if spec.input.preprocess == snfc_compiler::spec::Preprocess::DequantizeLogit {
        if let Some(k) = values
            .iter()
            .position(|v| !(v.fract() == 0.0 && (0.0..=255.0).contains(v)))
        {
            bail!(
                "{}: value [{k}] = {} is not 8-bit data: spec `{}` dequantizes (/input/preprocess = \"dequantize_logit\"), which needs integers 0..=255",
                input.display(),
                values[k],
                spec.name
            );
        }
    }
    let noise_rows = match args.noise {
        Some(path) => {
            let (nshape, nvals) = snfc_runtime::npy::read_npy(path)?;
            if nshape != shape {
                bail!(
                    "{}: noise has shape {nshape:?}, but the input {} has shape {shape:?}",
                    path.display(),
                    input.display()
                );
            }
            if let Some(v) = nvals.iter().find(|v| !(0.0..1.0).contains(*v)) {
                bail!(
                    "{}: noise values must be in [0, 1), found {v}",
                    path.display()
                );
            }
            Some(nvals)
        }
        None => None,
    };
    let noise = match &noise_rows {
        Some(r) => snfc_runtime::grad::Noise::Rows(r),
        None => snfc_runtime::grad::Noise::Seed(args.seed),
    };
    let named = snfc_runtime::grad::gradients(
        &model,
        &values,
        batch,
        noise,
        args.level,
        &args.device,
        &Progress::new(3, "grad", "stages", true),
    )?;
    let meta = std::collections::HashMap::from([
        ("spec".to_string(), spec.to_json_pretty()),
        ("format".to_string(), "snfc-grad-v1".to_string()),
    ]);
    write_safetensors(out, &named, meta).with_context(|| "writing gradients")?;
    let scalar = |n: &str| {
        named
            .iter()
            .find(|(k, _, _)| k == n)
            .map(|(_, _, v)| v[0].as_f64())
            .unwrap_or(f64::NAN)
    };
    println!(
        "wrote {} gradients to {} (batch {batch}, nll {:.4} nats, recon {:.4e})",
        model.params.len(),
        out.display(),
        scalar("nll"),
        scalar("recon")
    );
    Ok(())
}
