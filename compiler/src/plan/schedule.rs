//! The launch order, the last use of every value, and the static buffer assignment that reuses a
//! buffer once its value is dead.

use super::*;

/// A topological order of the instructions that run, as close to node order as possible
/// (a fused group runs once all its inputs exist). `None` if the groups form a cycle.
pub(super) fn schedule(instrs: &[Instr]) -> Option<Vec<usize>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Which instruction produces each slot.
    let mut producer: Vec<usize> = (0..instrs.len()).collect();
    for (i, ins) in instrs.iter().enumerate() {
        if let Some(gr) = &ins.group {
            for s in &gr.slots {
                producer[*s] = i;
            }
        }
    }
    let live: Vec<usize> = (0..instrs.len()).filter(|i| !instrs[*i].skip).collect();
    let mut waiting = vec![0usize; instrs.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); instrs.len()];
    for &i in &live {
        let mut deps: Vec<usize> = instrs[i].args.iter().map(|a| producer[*a]).collect();
        deps.sort();
        deps.dedup();
        waiting[i] = deps.len();
        for d in deps {
            users[d].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = live
        .iter()
        .filter(|i| waiting[**i] == 0)
        .map(|i| Reverse(*i))
        .collect();
    let mut order = Vec::with_capacity(live.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            waiting[u] -= 1;
            if waiting[u] == 0 {
                ready.push(Reverse(u));
            }
        }
    }
    (order.len() == live.len()).then_some(order)
}

pub(super) fn set_releases(instrs: &mut [Instr], order: &[usize], outputs: &[(String, usize)]) {
    let mut last_use = vec![None; instrs.len()];
    for &i in order {
        for a in &instrs[i].args {
            last_use[*a] = Some(i);
        }
    }
    for (_, o) in outputs {
        last_use[*o] = None; // outputs live to the end
    }
    for ins in instrs.iter_mut() {
        ins.release.clear();
    }
    for (v, lu) in last_use.iter().enumerate() {
        if let Some(i) = lu {
            instrs[*i].release.push(v);
        }
    }
}

/// Give every kernel-written value a buffer, reusing a dead value's buffer of the same size.
/// A buffer dies when the last value viewing it (through transposes) is released.
pub(super) fn assign_buffers(p: &Plan) -> Buffers {
    let n = p.instrs.len();
    let mut of_slot: Vec<Option<usize>> = vec![None; n];
    let mut sizes: Vec<usize> = Vec::new();
    let mut free: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    // Live views of each storage slot (itself and its transposes).
    let mut views: HashMap<usize, usize> = HashMap::new();
    let outputs: Vec<usize> = p.outputs.iter().map(|(_, s)| p.storage_slot(*s)).collect();
    for &i in &p.order {
        let ins = &p.instrs[i];
        let defined: Vec<usize> = match &ins.group {
            Some(gr) => gr.slots.clone(),
            None => vec![i],
        };
        for &s in &defined {
            *views.entry(p.storage_slot(s)).or_default() += 1;
            if !ins.is_kernel() {
                continue;
            }
            let len = numel(&p.instrs[s].shape);
            let b = match free.get_mut(&len).and_then(|v| v.pop()) {
                Some(b) => b,
                None => {
                    sizes.push(len);
                    sizes.len() - 1
                }
            };
            of_slot[s] = Some(b);
        }
        for r in &ins.release {
            let st = p.storage_slot(*r);
            let v = views.entry(st).or_default();
            *v = v.saturating_sub(1);
            if *v == 0 && !outputs.contains(&st) {
                if let Some(b) = of_slot[st] {
                    free.entry(sizes[b]).or_default().push(b);
                }
            }
        }
    }
    Buffers { sizes, of_slot }
}
