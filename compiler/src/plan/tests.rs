use super::*;
use crate::compile::{compile_train, OptLevel};
use crate::spec::FlowSpec;

fn fc2() -> FlowSpec {
    let text = include_str!("../../../specs/mnist_fc2.json");
    crate::spec::parse_spec(text).expect("spec")
}

#[test]
fn plans_validate_and_round_trip_through_json() {
    for level in [OptLevel::None, OptLevel::Substitution, OptLevel::Full] {
        let c = compile_train(&fc2(), 16, level).expect("the spec compiles");
        let p = Plan::for_level(&c.step, level);
        p.validate("").expect("valid plan");
        let text = serde_json::to_string(&p).expect("serialize");
        let back: Plan = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, p);
    }
}

#[test]
fn buffers_are_reused_and_never_shared_by_live_values() {
    let c = compile_train(&fc2(), 16, OptLevel::Full).expect("the spec compiles");
    let p = Plan::new(&c.step);
    let (total, naive) = p.buffers.footprint(&p);
    assert!(total < naive, "reuse saves memory: {total} vs {naive}");
    // Simulate: a buffer written while another live value still needs it is an error.
    let mut holder: HashMap<usize, usize> = HashMap::new(); // buffer -> storage slot
    let mut alive: HashMap<usize, usize> = HashMap::new(); // storage slot -> live views
    let outs: Vec<usize> = p.outputs.iter().map(|(_, s)| p.storage_slot(*s)).collect();
    for &i in &p.order {
        let ins = &p.instrs[i];
        let defined = match &ins.group {
            Some(gr) => gr.slots.clone(),
            None => vec![i],
        };
        for s in defined {
            *alive.entry(p.storage_slot(s)).or_default() += 1;
            if let Some(b) = p.buffers.of_slot[s] {
                if let Some(prev) = holder.get(&b) {
                    let live = alive.get(prev).copied().unwrap_or(0);
                    assert_eq!(live, 0, "buffer {b} reused while slot {prev} is live");
                }
                holder.insert(b, s);
            }
        }
        for r in &ins.release {
            let st = p.storage_slot(*r);
            if !outs.contains(&st) {
                let a = alive.entry(st).or_default();
                *a = a.saturating_sub(1);
            }
        }
    }
}

#[test]
fn train_plans_round_trip_and_bad_files_name_the_spot() {
    let tp = TrainPlan::compile(&fc2(), 8, OptLevel::Full).expect("the spec compiles");
    let text = tp.to_json();
    assert!(TrainPlan::is_plan_text(&text));
    assert_eq!(TrainPlan::parse(&text).expect("parses"), tp);
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["batch"] = serde_json::json!(9);
    let e = TrainPlan::parse(&v.to_string()).unwrap_err();
    assert!(e.contains("input `x`") && e.contains("[784, 9]"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["spec"]["train"]["batch_size"] = serde_json::json!(0);
    let e = TrainPlan::parse(&v.to_string()).unwrap_err();
    assert!(e.starts_with("/spec:"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["snfc_plan"] = serde_json::json!(99);
    assert!(TrainPlan::parse(&v.to_string())
        .unwrap_err()
        .contains("format 99"));
}

/// The stricter checks of files (sizes, releases, group bounds, exact buffer sizes) accept
/// every plan the compiler makes: each spec of specs/ at every optimization level.
#[test]
fn every_example_spec_compiles_to_a_plan_that_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("specs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    for path in names {
        let spec = crate::spec::load_spec(&path).expect("example spec");
        for level in [OptLevel::None, OptLevel::Full] {
            let tp = TrainPlan::compile(&spec, 2, level).expect("compiles");
            let back = TrainPlan::parse(&tp.to_json())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(back, tp);
        }
    }
}

/// Corruptions that would make an executor read or write out of bounds, or allocate
/// without limit, are errors naming the spot.
#[test]
fn corrupt_sizes_releases_and_groups_are_rejected() {
    let tp = TrainPlan::compile(&fc2(), 4, OptLevel::Full).expect("the spec compiles");
    let v: serde_json::Value = serde_json::from_str(&tp.to_json()).expect("json");
    let err = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = v.clone();
        edit(&mut v);
        TrainPlan::parse(&v.to_string()).unwrap_err()
    };
    let e = err(&|v| v["step"]["instrs"][0]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]));
    assert!(
        e.starts_with("/step/instrs/0/shape:") && e.contains("2^40"),
        "{e}"
    );
    let e = err(&|v| v["batch"] = serde_json::json!(-1));
    assert!(e.starts_with("/batch:"), "{e}");
    let e = err(&|v| v["step"]["instrs"][3]["op"] = serde_json::json!("Frobnicate"));
    assert!(
        e.starts_with("/step/instrs/3:") && e.contains("Frobnicate"),
        "{e}"
    );
    let e = err(&|v| v["step"]["buffers"]["sizes"][0] = serde_json::json!(1u64 << 50));
    assert!(e.starts_with("/step/buffers/sizes/0:"), "{e}");
    // The all-reduce packs outputs of the plan, exactly their values.
    let reduce = tp
        .step
        .all_reduce
        .as_ref()
        .expect("a training step averages its gradients");
    assert_eq!(reduce.outputs.len(), 6);
    assert_eq!(reduce.elements, 2 * (784 * 784 * 2 + 784));
    let e = err(&|v| v["step"]["all_reduce"]["outputs"][1] = serde_json::json!("grad.nope"));
    assert!(
        e.starts_with("/step/all_reduce/outputs/1:") && e.contains("grad.nope"),
        "{e}"
    );
    let e = err(&|v| v["step"]["all_reduce"]["elements"] = serde_json::json!(7));
    assert!(e.starts_with("/step/all_reduce/elements:"), "{e}");
    // A value released by the first instruction that reads it, though later ones read it too.
    let p = &tp.step;
    let (reader, slot) = p
        .order
        .iter()
        .flat_map(|&i| p.instrs[i].args.iter().map(move |&a| (i, a)))
        .find(|&(i, a)| {
            let later = p.order.iter().skip_while(|&&j| j != i).skip(1);
            later.clone().any(|&j| p.instrs[j].args.contains(&a))
        })
        .expect("a value read twice");
    let e = err(&|v| {
        v["step"]["instrs"][reader]["release"] = serde_json::json!([slot]);
    });
    assert!(
        e.contains("after an earlier instruction released it"),
        "{e}"
    );
    // A fused group that claims a smaller output than its iteration space.
    let g = p
        .instrs
        .iter()
        .position(|i| {
            i.group.as_ref().is_some_and(|g| {
                let k = &g.kernel;
                k.rows * k.cols > 1 && !matches!(k.members[k.outputs[0].0].op, Op::Sum { .. })
            })
        })
        .expect("an elementwise group");
    let e = err(&|v| {
        v["step"]["instrs"][g]["group"]["kernel"]["outputs"][0][1] = serde_json::json!([1]);
    });
    assert!(
        e.starts_with(&format!("/step/instrs/{g}/group/kernel/outputs/0:")),
        "{e}"
    );
}

#[test]
fn broken_plans_are_rejected_with_a_path() {
    let c = compile_train(&fc2(), 4, OptLevel::Full).expect("the spec compiles");
    let p = Plan::new(&c.step);
    let mut bad = p.clone();
    let i = bad.order[bad.order.len() - 1];
    bad.instrs[i].args.push(10_000);
    let e = bad.validate("/step").unwrap_err();
    assert!(e.starts_with(&format!("/step/instrs/{i}")), "{e}");
    let mut bad = p.clone();
    let last = bad.order.len() - 1;
    bad.order.swap(0, last);
    assert!(bad.validate("/step").unwrap_err().contains("/step/order/"));
}
