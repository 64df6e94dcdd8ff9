//! Builds the `mnist_fc2` flow with the Rust builder, prints its JSON, and checks
//! that it equals `specs/mnist_fc2.json` parsed.
//!
//! ```text
//! cargo run --example builder
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use snfc_compiler::spec::{load_spec, parse_spec, FlowSpec, Preprocess};

fn main() -> Result<()> {
    let built = FlowSpec::builder("mnist_fc2")
        .input(&[784], Preprocess::DequantizeLogit)
        .linear(true)
        .smooth_leaky_relu(0.3)
        .linear(true)
        .self_normalizing(1.0)
        .batch_size(100)
        .epochs(100)
        .warmup_epochs(10)
        .seed(0)
        .adam(1e-4, [0.9, 0.999])
        .inverse_lr_scale(10.0)
        .build()
        .context("building mnist_fc2")?;

    let json = built.to_json_pretty();
    println!("{json}");

    let reparsed = parse_spec(&json).context("re-parsing the printed JSON")?;
    if reparsed != built {
        bail!("the printed JSON does not parse back to the built spec");
    }

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/mnist_fc2.json");
    let from_file = load_spec(&path)?;
    if from_file != built {
        bail!(
            "builder spec differs from {}:\nbuilt: {built:#?}\nfile:  {from_file:#?}",
            path.display()
        );
    }
    eprintln!("ok: builder spec equals {}", path.display());
    Ok(())
}
