//! `snfc eval`: the exact likelihood of a checkpoint on a split or a `.npy` file.

use crate::commands::common::*;
use crate::*;
use anyhow::{bail, Result};
use snfc_compiler::spec::FlowSpec;
use snfc_runtime::cube::probe::Chosen;
use snfc_runtime::data::{load_data, Split};
use snfc_runtime::distributed;
use snfc_runtime::model::Model;
use snfc_runtime::progress::Progress;
use std::path::Path;

/// `snfc eval` with its arguments.
pub fn run(args: EvalArgs, _comm: &distributed::Comm) -> Result<()> {
    let EvalArgs {
        checkpoint,
        data,
        spec,
        split,
        json,
        device,
    } = args;
    let spec = spec.as_deref().map(spec_from).transpose()?;
    checkpoint_path(&checkpoint)?;
    let chosen = resolve_device_quietly(device, json)?;
    let (model, _) = Model::<f64>::load(&checkpoint, spec.as_ref())?;
    let (split, measured) = eval_split(&model.spec, data.as_deref(), split.as_deref())?;
    let progress = Progress::new(split.n as u64, "evaluating", "examples", !json);
    let r = if chosen == Chosen::Host {
        snfc_runtime::eval::evaluate_sharded(&model, &split, 500, 0, &distributed::Solo, &progress)?
    } else {
        // A GPU evaluates in f32: the checkpoint's parameters rounded once, the log-dets
        // still by LU in f64 on the host.
        let (model32, _) = Model::<f32>::load(&checkpoint, spec.as_ref())?;
        let options = snfc_runtime::eval::EvalOptions {
            batch: 500,
            noise_seed: 0,
            device: &chosen,
            comm: &distributed::Solo,
            progress: &progress,
        };
        snfc_runtime::eval::evaluate_on(&model32, &split, &options)?
    };
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["data"] = serde_json::Value::String(measured);
        println!("{v}");
    } else {
        println!(
            "{}: NLL {:.3} nats, {:.5} bits/dim over {} examples of {measured}{}",
            model.spec.name,
            r.nll_nats,
            r.bits_per_dim,
            r.examples,
            r.recon
                .map(|x| format!(" (reconstruction error {x:.3e})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn eval_split(
    spec: &FlowSpec,
    data: Option<&Path>,
    split: Option<&str>,
) -> Result<(Split, String)> {
    if let Some(p) = data {
        if p.extension().is_some_and(|e| e == "npy") {
            if let Some(s) = split {
                bail!(
                    "--split {s}: {} is evaluated whole (a .npy file has no splits); leave --split out",
                    p.display()
                );
            }
            // A .npy file is evaluated whole: any number of rows, no split.
            let all = snfc_runtime::data::load_npy_examples(p)?;
            let ds = snfc_runtime::data::Dataset {
                name: p.display().to_string(),
                dim: all.dim,
                image_shape: None,
                discrete: snfc_runtime::data::first_non_eight_bit(&all.values).is_none(),
                train: all.clone(),
                valid: all.take(0),
                test: all.take(0),
            };
            snfc_runtime::train::check_data(spec, &ds)?;
            return Ok((all, format!("all of {}", p.display())));
        }
    }
    let ds = load_data(data)?;
    snfc_runtime::train::check_data(spec, &ds)?;
    let split = split.unwrap_or("test");
    let (chosen, name) = match split {
        "test" => (ds.test, "test"),
        "valid" | "validation" => (ds.valid, "validation"),
        "train" => (ds.train, "training"),
        other => bail!("--split {other}: expected test, valid or train"),
    };
    Ok((chosen, format!("the {name} split of {}", ds.name)))
}
