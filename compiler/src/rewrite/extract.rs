//! DAG extraction: pick one e-node per e-class so that everything the roots need, each
//! e-class counted once, is cheap.
//!
//! egg's default extractor minimizes tree cost, which counts a shared subterm once per use: for
//! a training graph, where the forward activations and `Wᵀδ` feed many gradients, that
//! overprices exactly the sharing the self-normalizing step is built on. Two steps:
//!
//! 1. greedy DAG extraction (as in extraction-gym): a candidate's cost is its own cost plus the
//!    costs of the union of the classes its children need, iterated to a fixed point;
//! 2. local search on the true objective — the cost of the DAG all roots need — switching one
//!    class at a time while that lowers it. Greedy choice cannot see that a subterm is needed
//!    anyway by another root (e.g. `(W h)ᵀ` as a view of the forward product versus a new GEMM
//!    `hᵀ Wᵀ`: equal locally, not globally).

use super::lang::{node_cost, ShapeAnalysis, TensorNode};
use egg::{EGraph, Id, Language};
use std::collections::HashMap;
use std::rc::Rc;

type TEGraph = EGraph<TensorNode, ShapeAnalysis>;

/// Bound on local-search work (candidate evaluations × classes visited), so compile time stays
/// interactive and the result does not depend on the machine's speed.
const SEARCH_BUDGET: usize = 400_000_000;

/// Bound on the exact search's expansions per extraction.
const EXACT_BUDGET: usize = 2_000_000;

/// The state of [`DagExtraction::branch_and_bound`].
struct Search {
    best: f64,
    best_choice: Vec<Option<usize>>,
    choice: Vec<Option<usize>>,
    required: Vec<bool>,
    expansions: usize,
    state: Vec<u8>,
}

struct Candidate {
    node: TensorNode,
    kids: Vec<usize>,
    own: f64,
}

/// The chosen node of every reachable e-class.
pub struct DagExtraction {
    index: HashMap<Id, usize>,
    cands: Vec<Vec<Candidate>>,
    choice: Vec<Option<usize>>,
    /// The searches that stopped on their work budget rather than finishing, so the result is
    /// the best found, not proven the cheapest (reported in the phase's stats).
    pub budgets_exhausted: Vec<&'static str>,
}

struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn or(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a |= b);
    }
    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut x = word;
            std::iter::from_fn(move || {
                if x == 0 {
                    return None;
                }
                let t = x.trailing_zeros() as usize;
                x &= x - 1;
                Some(w * 64 + t)
            })
        })
    }
}

impl DagExtraction {
    /// `original` holds the e-nodes of the graph that was rewritten: the search starts from it
    /// when it is cheaper than the greedy choice, so extraction never makes a graph worse.
    pub fn new(eg: &TEGraph, roots: &[Id], original: &[(Id, TensorNode)]) -> Self {
        let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
        ids.sort();
        let index: HashMap<Id, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let cands: Vec<Vec<Candidate>> = ids
            .iter()
            .map(|id| {
                let mut nodes: Vec<&TensorNode> = eg[*id].iter().collect();
                nodes.sort();
                nodes
                    .into_iter()
                    .map(|n| Candidate {
                        node: n.clone(),
                        kids: n.children().iter().map(|c| index[&eg.find(*c)]).collect(),
                        own: node_cost(eg, n),
                    })
                    .collect()
            })
            .collect();
        let mut ex = DagExtraction {
            index,
            cands,
            choice: vec![None; ids.len()],
            budgets_exhausted: Vec::new(),
        };
        ex.greedy(None);
        let roots: Vec<usize> = roots.iter().map(|r| ex.index[&eg.find(*r)]).collect();
        ex.prefer_original(eg, &roots, original);
        ex.local_search(&roots);
        ex.branch_and_bound(&roots);
        ex
    }

    /// Exact search for small problems (a layer's region is a few dozen e-classes): depth-first
    /// over the classes the DAG needs, each candidate in turn, pruned by a lower bound — the
    /// cost decided so far plus the cheapest candidate of every class still to decide. The
    /// heuristics above give the first upper bound. Two outputs can share work that neither
    /// reaches alone (G_W = (δ + RᵀE')hᵀ and G_R = (E' − Wᵀδ)(Wh)ᵀ together free the D×D products
    /// δhᵀ and E'hᵀ, while switching either one alone costs more than it saves), which is what
    /// local search misses. Bounded by [`EXACT_BUDGET`] expansions; the best DAG found is kept.
    fn branch_and_bound(&mut self, roots: &[usize]) {
        let n = self.cands.len();
        let mut state = vec![0u8; n];
        let mut work = 0usize;
        let Some(best) = self.dag_cost(roots, &mut state, &mut work) else {
            return;
        };
        let min_own: Vec<f64> = self
            .cands
            .iter()
            .map(|cs| cs.iter().map(|c| c.own).fold(f64::INFINITY, f64::min))
            .collect();
        let mut search = Search {
            best,
            best_choice: self.choice.clone(),
            choice: vec![None; n],
            required: vec![false; n],
            expansions: 0,
            state,
        };
        let mut pending = Vec::new();
        let mut lb = 0.0;
        for &r in roots {
            if !search.required[r] {
                search.required[r] = true;
                pending.push(r);
                lb += min_own[r];
            }
        }
        self.bnb(&mut search, &mut pending, lb, &min_own, roots);
        if search.expansions > EXACT_BUDGET {
            self.budgets_exhausted.push("branch_and_bound");
        }
        self.choice = search.best_choice;
    }

    fn bnb(
        &self,
        s: &mut Search,
        pending: &mut Vec<usize>,
        lb: f64,
        min_own: &[f64],
        roots: &[usize],
    ) {
        s.expansions += 1;
        if s.expansions > EXACT_BUDGET || lb >= s.best * (1.0 - 1e-12) - 1e-9 {
            return;
        }
        let Some(c) = pending.pop() else {
            // Every needed class decided: the DAG's cost is `lb`, if it has no cycle.
            let saved = std::mem::replace(&mut s.best_choice, s.choice.clone());
            let mut work = 0;
            let cost = self.dag_cost_with(&s.choice, roots, &mut s.state, &mut work);
            match cost {
                Some(t) if t < s.best * (1.0 - 1e-12) - 1e-9 => s.best = t,
                _ => s.best_choice = saved,
            }
            return;
        };
        let mut order: Vec<usize> = (0..self.cands[c].len()).collect();
        order.sort_by(|a, b| self.cands[c][*a].own.total_cmp(&self.cands[c][*b].own));
        for k in order {
            let cand = &self.cands[c][k];
            let mut newly = Vec::new();
            let mut lb2 = lb - min_own[c] + cand.own;
            for &q in &cand.kids {
                if !s.required[q] {
                    s.required[q] = true;
                    newly.push(q);
                    lb2 += min_own[q];
                }
            }
            s.choice[c] = Some(k);
            let mark = pending.len();
            pending.extend(newly.iter().copied());
            self.bnb(s, pending, lb2, min_own, roots);
            pending.truncate(mark);
            s.choice[c] = None;
            for q in newly {
                s.required[q] = false;
            }
            if s.expansions > EXACT_BUDGET {
                break;
            }
        }
        pending.push(c);
    }

    /// Switch to the input graph's choice if that DAG is cheaper than the greedy one.
    fn prefer_original(&mut self, eg: &TEGraph, roots: &[usize], original: &[(Id, TensorNode)]) {
        let mut alt = self.choice.clone();
        for (id, node) in original {
            let c = self.index[&eg.find(*id)];
            let canon = node.clone().map_children(|k| eg.find(k));
            if let Some(k) = self.cands[c]
                .iter()
                .position(|cand| cand.node.clone().map_children(|x| eg.find(x)) == canon)
            {
                alt[c] = Some(k);
            }
        }
        let mut state = vec![0u8; self.cands.len()];
        let mut work = 0;
        let greedy = self.dag_cost(roots, &mut state, &mut work);
        let saved = std::mem::replace(&mut self.choice, alt);
        let orig = self.dag_cost(roots, &mut state, &mut work);
        let keep_original = match (orig, greedy) {
            (Some(o), Some(g)) => o < g,
            (Some(_), None) => true,
            _ => false,
        };
        if !keep_original {
            self.choice = saved;
        }
    }

    /// Greedy DAG extraction; classes in `paid` add nothing to the cost of a candidate that
    /// needs them.
    fn greedy(&mut self, paid: Option<&Bits>) {
        let n = self.cands.len();
        self.choice = vec![None; n];
        let mut sets: Vec<Option<Rc<Bits>>> = vec![None; n];
        let mut total = vec![f64::INFINITY; n];
        let mut own = vec![0.0; n];
        for _round in 0..100 {
            let mut changed = false;
            for c in 0..n {
                for (k, cand) in self.cands[c].iter().enumerate() {
                    if cand
                        .kids
                        .iter()
                        .any(|&q| q == c || sets[q].as_ref().is_none_or(|s| s.has(c)))
                    {
                        continue;
                    }
                    let mut set = Bits::new(n);
                    for &q in &cand.kids {
                        if let Some(s) = &sets[q] {
                            set.or(s);
                        }
                    }
                    let t = cand.own
                        + set
                            .ones()
                            .filter(|&i| paid.is_none_or(|p| !p.has(i)))
                            .map(|i| own[i])
                            .sum::<f64>();
                    if t < total[c] * (1.0 - 1e-12) - 1e-9 {
                        set.set(c);
                        sets[c] = Some(Rc::new(set));
                        total[c] = t;
                        own[c] = cand.own;
                        self.choice[c] = Some(k);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// Cost of the DAG the roots need, or `None` on a cycle. `state` is scratch (all zero on
    /// entry and exit); `work` counts classes visited.
    fn dag_cost(&self, roots: &[usize], state: &mut [u8], work: &mut usize) -> Option<f64> {
        self.dag_cost_with(&self.choice, roots, state, work)
    }

    fn dag_cost_with(
        &self,
        choice: &[Option<usize>],
        roots: &[usize],
        state: &mut [u8],
        work: &mut usize,
    ) -> Option<f64> {
        let mut visited = Vec::new();
        let mut total = 0.0;
        let mut ok = true;
        let mut stack: Vec<(usize, bool)> = roots.iter().map(|r| (*r, false)).collect();
        while let Some((c, leaving)) = stack.pop() {
            if leaving {
                state[c] = 2;
                continue;
            }
            match state[c] {
                2 => continue,
                1 => {
                    ok = false;
                    break;
                }
                _ => {}
            }
            let Some(k) = choice[c] else {
                ok = false;
                break;
            };
            state[c] = 1;
            visited.push(c);
            *work += 1;
            let cand = &self.cands[c][k];
            total += cand.own;
            stack.push((c, true));
            for &q in &cand.kids {
                match state[q] {
                    2 => {}
                    1 => {
                        ok = false;
                        break;
                    }
                    _ => stack.push((q, false)),
                }
            }
            if !ok {
                break;
            }
        }
        for c in visited {
            state[c] = 0;
        }
        ok.then_some(total)
    }

    fn local_search(&mut self, roots: &[usize]) {
        let mut state = vec![0u8; self.cands.len()];
        let mut work = 0usize;
        let Some(mut best) = self.dag_cost(roots, &mut state, &mut work) else {
            return;
        };
        for _pass in 0..6 {
            let mut improved = false;
            for c in self.reachable(roots) {
                for k in 0..self.cands[c].len() {
                    let current = self.choice[c];
                    if Some(k) == current || work > SEARCH_BUDGET {
                        continue;
                    }
                    if self.cands[c][k]
                        .kids
                        .iter()
                        .any(|q| self.choice[*q].is_none())
                    {
                        continue;
                    }
                    self.choice[c] = Some(k);
                    match self.dag_cost(roots, &mut state, &mut work) {
                        Some(t) if t < best * (1.0 - 1e-12) - 1e-9 => {
                            best = t;
                            improved = true;
                        }
                        _ => self.choice[c] = current,
                    }
                }
            }
            if !improved {
                break;
            }
        }
        if work > SEARCH_BUDGET {
            self.budgets_exhausted.push("local_search");
        }
    }

    /// The classes the DAG under the current choice uses, in a deterministic order.
    fn reachable(&self, roots: &[usize]) -> Vec<usize> {
        let mut seen = vec![false; self.cands.len()];
        let mut order = Vec::new();
        let mut stack: Vec<usize> = roots.to_vec();
        while let Some(c) = stack.pop() {
            if std::mem::replace(&mut seen[c], true) {
                continue;
            }
            order.push(c);
            if let Some(k) = self.choice[c] {
                stack.extend(self.cands[c][k].kids.iter().copied());
            }
        }
        order
    }

    pub fn node(&self, eg: &TEGraph, id: Id) -> Result<&TensorNode, String> {
        let c = self.index[&eg.find(id)];
        match self.choice[c] {
            Some(k) => Ok(&self.cands[c][k].node),
            None => Err(format!("e-class {id} has no acyclic extraction")),
        }
    }
}

/// Extraction for the substitution phase, which runs on a whole (possibly very deep) graph:
/// each e-class takes the node of least *critical-path* cost (own cost plus the dearest
/// operand's), iterated over the classes in id order — creation order, so operands mostly come
/// first and few passes are needed. Linear per pass, and finite at any depth (a summed tree
/// cost doubles with every shared level). The choices there are few and clear-cut: `W` over
/// `inverse(R)`, `Rᵀ` over `inverse(W)ᵀ`.
pub struct PathExtraction {
    best: HashMap<Id, (f64, TensorNode)>,
}

impl PathExtraction {
    pub fn new(eg: &TEGraph) -> Self {
        let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
        ids.sort();
        let mut best: HashMap<Id, (f64, TensorNode)> = HashMap::new();
        loop {
            let mut changed = false;
            for &id in &ids {
                for n in eg[id].iter() {
                    let mut path: f64 = 0.0;
                    let mut ready = true;
                    for c in n.children() {
                        match best.get(&eg.find(*c)) {
                            Some((cost, _)) => path = path.max(*cost),
                            None => ready = false,
                        }
                    }
                    if !ready {
                        continue;
                    }
                    // + 1 per node: strictly increasing along every edge, so choices are acyclic.
                    let cost = node_cost(eg, n) + 1.0 + path;
                    if best.get(&id).is_none_or(|(old, _)| cost < *old) {
                        best.insert(id, (cost, n.clone()));
                        changed = true;
                    }
                }
            }
            if !changed {
                return PathExtraction { best };
            }
        }
    }

    pub fn node(&self, id: Id) -> Result<&TensorNode, String> {
        self.best
            .get(&id)
            .map(|(_, n)| n)
            .ok_or_else(|| format!("e-class {id} has no extraction"))
    }
}
