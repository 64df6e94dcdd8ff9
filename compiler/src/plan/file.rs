//! `plan.json`: a plan with its spec and batch ([`TrainPlan`]), written by `snfc compile --emit plan`
//! and read back, checked, by `snfc train PLAN.json`.

use super::*;

/// The training step of a spec as a file: what `snfc train DIR/plan.json` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainPlan {
    /// Format marker and version.
    pub snfc_plan: u32,
    pub spec: FlowSpec,
    pub batch: usize,
    /// `none`, `substitution` or `full`.
    pub opt_level: String,
    pub step: Plan,
}

impl TrainPlan {
    /// The training step of `spec` at `batch`, compiled at `level`.
    pub fn compile(
        spec: &FlowSpec,
        batch: usize,
        level: OptLevel,
    ) -> Result<TrainPlan, crate::rewrite::RewriteError> {
        let c = crate::compile::compile_train(spec, batch, level)?;
        Ok(TrainPlan {
            snfc_plan: PLAN_FORMAT,
            spec: spec.clone(),
            batch,
            opt_level: level_name(level).to_string(),
            step: Plan::for_level(&c.step, level),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plans serialize") + "\n"
    }

    /// Whether a JSON file holds a plan (rather than a spec).
    pub fn is_plan_text(text: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(text)
            .map(|v| v.get("snfc_plan").is_some())
            .unwrap_or(false)
    }

    /// Parse and check a plan file's text: the format, the spec (as a spec file is checked),
    /// the step plan, and that the plan reads exactly the spec's parameters and batch. Every
    /// error starts with the JSON path of the offending spot.
    pub fn parse(text: &str) -> Result<TrainPlan, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Some(obj) = value.as_object() else {
            return Err(
                "/: expected a JSON object (a plan from `snfc compile --emit plan`)".into(),
            );
        };
        let field = |key: &str| obj.get(key).ok_or_else(|| format!("/{key}: missing"));
        match obj.get("snfc_plan").and_then(|v| v.as_u64()) {
            Some(v) if v == PLAN_FORMAT as u64 => {}
            Some(v) => {
                return Err(format!(
                "/snfc_plan: format {v}, this snfc reads format {PLAN_FORMAT}; recompile the spec"
            ))
            }
            None => return Err("/snfc_plan: missing or not a number".into()),
        }
        let spec = crate::spec::parse_spec(&field("spec")?.to_string())
            .map_err(|e| format!("/spec: {e}"))?;
        let batch = field("batch")?;
        let batch = batch
            .as_u64()
            .and_then(|b| usize::try_from(b).ok())
            .filter(|b| *b > 0)
            .ok_or_else(|| format!("/batch: expected a positive integer, got {batch}"))?;
        let opt_level = field("opt_level")?;
        let opt_level = opt_level
            .as_str()
            .filter(|l| level_of(l).is_some())
            .ok_or_else(|| {
                format!("/opt_level: {opt_level}; expected \"none\", \"substitution\" or \"full\"")
            })?
            .to_string();
        let step = plan_from_json(field("step")?, "/step")?;
        let plan = TrainPlan {
            snfc_plan: PLAN_FORMAT,
            spec,
            batch,
            opt_level,
            step,
        };
        plan.spec
            .check_batch(plan.batch)
            .map_err(|e| format!("/batch: {e}"))?;
        plan.step.validate("/step")?;
        let want: BTreeMap<String, Shape> = crate::ir::lower::parameters(&plan.spec)
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        let d = plan.spec.input.dim();
        let geco = crate::ir::lower::geco_inputs(&plan.spec);
        for (kind, name, shape) in plan.step.feeds() {
            use crate::ir::lower::{INPUT_NOISE, INPUT_X};
            let expected = match kind {
                "param" => want.get(&name).cloned(),
                _ if name == INPUT_X || name == INPUT_NOISE => Some(vec![d, plan.batch]),
                // GECO's λ and EMA per layer and the EMA's decay: scalars.
                _ if geco.contains(&name) => Some(vec![]),
                _ => None,
            };
            match expected {
                Some(e) if e == shape => {}
                Some(e) => {
                    return Err(format!(
                        "/step: {kind} `{name}` has shape {shape:?}, but the spec and /batch give {e:?}"
                    ))
                }
                None => {
                    return Err(format!(
                        "/step: {kind} `{name}` is not a {} of spec `{}`",
                        if kind == "param" { "parameter" } else { "graph input" },
                        plan.spec.name
                    ))
                }
            }
        }
        // A `next.*` output carries its value into an input of the same shape.
        let feeds = plan.step.feeds();
        for (name, slot) in &plan.step.outputs {
            let Some(input) = crate::ir::lower::carried_input(name) else {
                continue;
            };
            let shape = &plan.step.instrs[*slot].shape;
            if !feeds
                .iter()
                .any(|(kind, n, s)| *kind == "input" && n == input && s == shape)
            {
                return Err(format!(
                    "/step: output `{name}` (shape {shape:?}) carries into input `{input}`, which the step does not read with that shape"
                ));
            }
        }
        Ok(plan)
    }

    /// Read a plan file; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<TrainPlan, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read plan: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A plan's JSON, field by field, so that an error names the instruction (or list entry) it
/// is in rather than only what serde expected.
pub(super) fn plan_from_json(v: &serde_json::Value, at: &str) -> Result<Plan, String> {
    fn part<T: serde::de::DeserializeOwned>(
        v: &serde_json::Value,
        path: &str,
    ) -> Result<T, String> {
        T::deserialize(v).map_err(|e| format!("{path}: {e}"))
    }
    let Some(obj) = v.as_object() else {
        return Err(format!("{at}: expected an object"));
    };
    let field = |key: &str| obj.get(key).ok_or_else(|| format!("{at}/{key}: missing"));
    let instrs = field("instrs")?
        .as_array()
        .ok_or_else(|| format!("{at}/instrs: expected an array"))?
        .iter()
        .enumerate()
        .map(|(i, ins)| part(ins, &format!("{at}/instrs/{i}")))
        .collect::<Result<Vec<Instr>, String>>()?;
    Ok(Plan {
        name: part(field("name")?, &format!("{at}/name"))?,
        instrs,
        order: part(field("order")?, &format!("{at}/order"))?,
        outputs: part(field("outputs")?, &format!("{at}/outputs"))?,
        buffers: part(field("buffers")?, &format!("{at}/buffers"))?,
        all_reduce: match obj.get("all_reduce") {
            Some(v) => part(v, &format!("{at}/all_reduce"))?,
            None => None,
        },
    })
}
