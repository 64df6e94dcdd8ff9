//! Structure-aware fuzzing of snfc's file readers (spec, plan, npy, IDX, safetensors):
//!
//! ```text
//! cargo run --release -p snfc-runtime --example fuzz -- N [SEED]
//! cargo run --release -p snfc-runtime --example fuzz -- replay TARGET FILE
//! ```
//!
//! Runs N generated inputs (see `driver.rs`), prints counts per target and inputs per second,
//! writes every input that made a reader panic to `target/fuzz-crashes/` and exits with status
//! 1 if there was one. `replay` runs one saved input without catching its panic.

mod driver;

use std::path::Path;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: fuzz N [SEED]  |  fuzz replay TARGET FILE   (TARGET: spec, plan, npy, idx, safetensors)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("replay") {
        let (Some(target), Some(file)) = (args.get(1), args.get(2)) else {
            return usage();
        };
        let Some(target) = driver::Target::from_name(target) else {
            return usage();
        };
        let outcome = driver::replay(target, Path::new(file));
        println!("{}: {outcome:?}, no panic", target.name());
        return ExitCode::SUCCESS;
    }
    let (Some(Ok(n)), seed) = (
        args.first().map(|a| a.parse::<u64>()),
        args.get(1).map(|a| a.parse::<u64>()),
    ) else {
        return usage();
    };
    let seed = match seed {
        None => 0,
        Some(Ok(s)) => s,
        Some(Err(_)) => return usage(),
    };
    let crashes = driver::crash_dir();
    let report = driver::run(n, seed, &crashes, &|done, secs| {
        eprintln!(
            "fuzz: {done}/{n} inputs, {secs:.1} s ({:.0}/s)",
            done as f64 / secs.max(1e-9)
        );
    });
    print!("{}", report.summary());
    if report.panics() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
