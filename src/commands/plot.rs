//! `snfc plot`: the curves of one or more runs.

use crate::*;
use anyhow::Result;
use snfc_runtime::distributed;

/// `snfc plot` with its arguments.
pub fn run(args: PlotArgs, _comm: &distributed::Comm) -> Result<()> {
    let PlotArgs { runs, out } = args;
    let (w, h) = snfc_runtime::plot::plot_runs(&runs, &out)?;
    println!("wrote {} ({w}×{h}, {} run(s))", out.display(), runs.len());
    Ok(())
}
