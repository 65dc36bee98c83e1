//! The scheduler: which queued tasks a worker gets now, and why the others wait. Plain
//! code with `now` passed in, no I/O: the store queries the candidates and the
//! accounts' running load, a `Round` picks, and the store writes the picks (task rows,
//! leases, cursors, events).
//!
//! Policy, in the order it is applied to each candidate:
//! - fit: the worker's executors, labels, pool and capacity can run the job at all
//!   (`WorkerCaps::can_run`, the same checks `explain_unrunnable` reports on), and its
//!   free resources hold the task now (`FreeResources::fits`);
//! - routing: a cheaper pool kind among the job's eligible pools has the first claim
//!   until this pool's spill delay has passed (`route`);
//! - fair share: accounts take turns by running work per weight, so a huge array does
//!   not starve a small job; within an account, priority then submission order (the
//!   order the candidates come in).
//!
//! Invariants (tested below, some as properties): a round never hands out more CPUs,
//! memory or GPUs than the worker reported free; a job the scheduler refuses for a
//! reason is explained with that same reason.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::job::JobSpec;
use berth_shared::resources::{gpu_matches, FreeResources};
use berth_shared::wire::{GpuInfo, HostInfo, SecretGrant};

use crate::pools::{Pool, Pools};

#[cfg(test)]
mod tests;

/// What a worker can run, for claim eligibility.
#[derive(Clone, Debug, Default)]
pub struct WorkerCaps {
    pub executors: Vec<String>,
    pub cpus: u32,
    pub mem_mib: u64,
    pub gpus: u32,
    /// The pool the worker joined, and whether it is free (a job with no max runtime
    /// may only run in free pools: its cost has no bound).
    pub pool: String,
    pub pool_free: bool,
    /// The worker's labels (jobs may require some) and its GPUs (model and memory).
    pub labels: Vec<(String, String)>,
    pub gpu_list: Vec<GpuInfo>,
    /// The secrets it holds and the accounts that may use each.
    pub secrets: Vec<SecretGrant>,
}

/// The checks that decide whether a worker could ever run a job, each on its own so
/// that `explain_unrunnable` reports exactly the ones the scheduler applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    Executor,
    Gpus,
    Cpus,
    Mem,
    Labels,
    Pool,
    /// A job with no max runtime runs only in a free pool.
    Bounded,
    /// Every secret it names is declared there for its account.
    Secrets,
}

const CHECKS: [Check; 8] = [Check::Executor, Check::Gpus, Check::Cpus, Check::Mem, Check::Labels, Check::Pool, Check::Bounded, Check::Secrets];

/// The account a spec runs under (admission names it: the owner's when none was given).
fn account_of(spec: &JobSpec) -> &str {
    spec.account.as_deref().unwrap_or("")
}

impl WorkerCaps {
    /// A connected worker's capabilities, from what it registered with.
    pub fn of(host: &HostInfo, pool: &str, pool_free: bool, labels: Vec<(String, String)>) -> WorkerCaps {
        WorkerCaps {
            executors: host.executors.clone(),
            cpus: host.cpus,
            mem_mib: host.mem_mib,
            gpus: host.gpus.len() as u32,
            pool: pool.to_string(),
            pool_free,
            labels,
            gpu_list: host.gpus.clone(),
            secrets: host.secrets.clone(),
        }
    }

    /// Whether a worker with these capabilities could ever run `spec`.
    pub fn can_run(&self, spec: &JobSpec) -> bool {
        CHECKS.iter().all(|c| self.passes(*c, spec))
    }

    fn holds_secret(&self, name: &str, account: &str) -> bool {
        self.secrets.iter().any(|g| g.name == name && g.allows(account))
    }

    fn matching_gpus(&self, spec: &JobSpec) -> usize {
        self.gpu_list.iter().filter(|g| gpu_matches(g, &spec.resources)).count()
    }

    fn passes(&self, check: Check, spec: &JobSpec) -> bool {
        let r = &spec.resources;
        match check {
            Check::Executor => self.executors.iter().any(|e| e == spec.executor.name()),
            Check::Gpus => r.gpus <= self.gpus && (r.gpus == 0 || self.matching_gpus(spec) >= r.gpus as usize),
            Check::Cpus => r.millicpus == 0 || r.millicpus <= self.cpus.saturating_mul(1000),
            Check::Mem => r.mem_mib == 0 || r.mem_mib <= self.mem_mib,
            Check::Labels => spec.constraints.iter().all(|c| self.labels.contains(c)),
            Check::Pool => spec.pools.is_empty() || spec.pools.contains(&self.pool),
            Check::Bounded => self.pool_free || spec.max_runtime_ms.is_some(),
            Check::Secrets => spec.secrets.iter().all(|(_, name)| self.holds_secret(name, account_of(spec))),
        }
    }
}

/// Why no worker among `workers` could ever run `spec` (None when one could): the
/// reason a queued job shows in `berth status` and `berth list`, and that `submit`
/// warns of. Each part names a check of `WorkerCaps::can_run` that no worker passes.
pub fn explain_unrunnable(spec: &JobSpec, workers: &[WorkerCaps]) -> Option<String> {
    if workers.iter().any(|w| w.can_run(spec)) {
        return None;
    }
    if workers.is_empty() {
        return Some("no worker is connected".into());
    }
    let r = &spec.resources;
    let mut why = Vec::new();
    for check in CHECKS {
        if workers.iter().any(|w| w.passes(check, spec)) {
            continue;
        }
        match check {
            Check::Executor => why.push(format!("it needs the {} executor, which no connected worker offers", spec.executor.name())),
            Check::Gpus => {
                let most = workers.iter().map(|w| w.matching_gpus(spec)).max().unwrap_or(0);
                let mut parts = Vec::new();
                if let Some(m) = &r.gpu_model {
                    parts.push(format!("model `{m}`"));
                }
                if let Some(v) = r.min_vram_mib {
                    parts.push(format!("at least {v} MiB"));
                }
                let what = if parts.is_empty() { String::new() } else { format!(" ({})", parts.join(", ")) };
                why.push(format!("it asks for {} GPU{}{what}; the most any connected worker has is {most}", r.gpus, if r.gpus == 1 { "" } else { "s" }));
            }
            Check::Cpus => why.push(format!(
                "it asks for {} CPUs; the most any connected worker has is {}",
                f64::from(r.millicpus) / 1000.0,
                workers.iter().map(|w| w.cpus).max().unwrap_or(0)
            )),
            Check::Mem => why.push(format!(
                "it asks for {} MiB of memory; the most any connected worker has is {}",
                r.mem_mib,
                workers.iter().map(|w| w.mem_mib).max().unwrap_or(0)
            )),
            Check::Labels => {
                for c in &spec.constraints {
                    if !workers.iter().any(|w| w.labels.contains(c)) {
                        why.push(format!("no connected worker has the label {}={}", c.0, c.1));
                    }
                }
            }
            Check::Pool => why.push(format!("no connected worker is in pool {}", spec.pools.join(" or "))),
            Check::Bounded => why.push("it has no max runtime, and every connected worker is in a paid pool (give --max-runtime)".into()),
            Check::Secrets => {
                for (_, name) in &spec.secrets {
                    if !workers.iter().any(|w| w.holds_secret(name, account_of(spec))) {
                        why.push(format!(
                            "no connected worker holds secret `{name}` for account {} (secrets are declared on workers, with the accounts that may use them)",
                            account_of(spec)
                        ));
                    }
                }
            }
        }
    }
    if why.is_empty() {
        why.push("no connected worker has everything it asks for at once".into());
    }
    Some(format!("no connected worker can run it: {}", why.join("; ")))
}

/// The routing rule for one job on a worker of pool `mine`: `Ok` carries the reason
/// for the event; `Err(d)`: a cheaper kind among the job's eligible pools still has
/// the first claim for `d`.
pub fn route(spec: &JobSpec, mine: &Pool, pools: &Pools, queued_at_ms: i64, now_ms: i64) -> Result<String, Duration> {
    let eligible = pools.eligible(&spec.pools).unwrap_or_default();
    let cheaper = eligible.iter().any(|p| p.kind < mine.kind && (p.is_free() || spec.max_runtime_ms.is_some()));
    let waited = Duration::from_millis((now_ms - queued_at_ms).max(0) as u64);
    let delay = Duration::from_secs(mine.spill_after_s);
    if cheaper && waited < delay {
        return Err(delay - waited);
    }
    let kind = format!("{:?}", mine.kind).to_lowercase();
    Ok(if cheaper {
        format!("pool {} ({kind}): waited {:.1}s with no cheaper slot free", mine.name, waited.as_secs_f64())
    } else {
        format!("pool {} ({kind})", mine.name)
    })
}

/// A task a claim may take, as the store found it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub job_seq: i64,
    pub account: String,
    pub spec: Arc<JobSpec>,
    /// When it (re-)entered the queue, for the spill delay.
    pub queued_at_ms: i64,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A task row waiting again (its attempt was lost): it has waited longest.
    Requeued { idx: i64, attempt: u32 },
    /// A job's unclaimed indices `next..=end` behind its cursor.
    Cursor { next: i64, end: i64 },
}

/// One task the round picked: the store materialises it and, if that worked, calls
/// `Round::placed`.
#[derive(Clone, Debug)]
pub struct Pick {
    pub job_seq: i64,
    pub idx: i64,
    pub attempt: u32,
    /// A requeued task's row exists already; a cursor task's row is new.
    pub requeued: bool,
    pub account: String,
    pub spec: Arc<JobSpec>,
    /// Why here (the routing reason), for the task's event.
    pub reason: String,
}

/// What a round leaves for the store besides its picks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundEnd {
    /// Cursors that moved: (job, its new `next_idx`).
    pub cursors: Vec<(i64, i64)>,
    /// A task waits for a cheaper pool's spill delay: ask again in this long.
    pub retry_in: Option<Duration>,
}

struct Queued {
    cand: Candidate,
    /// Cursor indices handed out in this round.
    taken: i64,
}

/// One claim's worth of scheduling for one worker.
pub struct Round<'a> {
    caps: &'a WorkerCaps,
    mine: Pool,
    pools: &'a Pools,
    free: Option<FreeResources>,
    now_ms: i64,
    want: u32,
    placed: u32,
    queues: BTreeMap<String, VecDeque<Queued>>,
    /// Running tasks per weight, per account.
    load: HashMap<String, f64>,
    /// Jobs found not to fit this round.
    skip: HashSet<i64>,
    end: RoundEnd,
}

impl<'a> Round<'a> {
    /// A round handing out at most `want` tasks. `candidates` in each account's order
    /// (requeued first, then by priority and submission); `running`: tasks each account
    /// runs now; `free`: what the worker reported free (None: judge by capacity alone).
    pub fn new(
        caps: &'a WorkerCaps,
        pools: &'a Pools,
        free: Option<FreeResources>,
        want: u32,
        candidates: Vec<Candidate>,
        running: &[(String, u64)],
        now_ms: i64,
    ) -> Round<'a> {
        let mine = pools.get(&caps.pool).cloned().unwrap_or_else(|| Pool::free(&caps.pool));
        let mut queues: BTreeMap<String, VecDeque<Queued>> = BTreeMap::new();
        for cand in candidates {
            queues.entry(cand.account.clone()).or_default().push_back(Queued { cand, taken: 0 });
        }
        let load = running.iter().map(|(a, n)| (a.clone(), *n as f64 / f64::from(pools.weight(a)))).collect();
        Round { caps, mine, pools, free, now_ms, want, placed: 0, queues, load, skip: HashSet::new(), end: RoundEnd::default() }
    }

    /// The next task to hand out, or None when the round is over (enough placed, or
    /// nothing left that fits).
    pub fn next_pick(&mut self) -> Option<Pick> {
        while self.placed < self.want {
            // The account with the least running work per weight that still has candidates.
            let account = self
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(a, _)| a)
                .min_by(|a, b| self.load_of(a).total_cmp(&self.load_of(b)).then(a.cmp(b)))?
                .clone();
            let queue = self.queues.get_mut(&account)?;
            let head = queue.front_mut()?;
            let cand = &head.cand;
            let unfit =
                self.skip.contains(&cand.job_seq) || !self.caps.can_run(&cand.spec) || self.free.as_ref().is_some_and(|f| !f.fits(&cand.spec.resources));
            let verdict = if unfit { Err(None) } else { route(&cand.spec, &self.mine, self.pools, cand.queued_at_ms, self.now_ms).map_err(Some) };
            let reason = match verdict {
                Ok(reason) => reason,
                Err(wait) => {
                    if let Some(w) = wait {
                        self.end.retry_in = Some(self.end.retry_in.map_or(w, |r| r.min(w)));
                    }
                    let job_seq = cand.job_seq;
                    self.skip.insert(job_seq);
                    self.pop(&account);
                    continue;
                }
            };
            let (job_seq, spec, kind) = (cand.job_seq, cand.spec.clone(), cand.kind);
            let (idx, attempt, requeued, done) = match kind {
                Kind::Requeued { idx, attempt } => (idx, attempt, true, true),
                Kind::Cursor { next, end } => {
                    let idx = next + head.taken;
                    head.taken += 1;
                    (idx, 1, false, idx >= end)
                }
            };
            if done {
                self.pop(&account);
            }
            return Some(Pick { job_seq, idx, attempt, requeued, account, spec, reason });
        }
        None
    }

    /// The store materialised `pick`: its resources are taken and its account's turn
    /// counted. (A pick the store could not materialise, a cursor index whose task was
    /// cancelled on its own before it ran, is simply not placed.)
    pub fn placed(&mut self, pick: &Pick) {
        if let Some(f) = self.free.as_mut() {
            f.take(&pick.spec.resources);
        }
        *self.load.entry(pick.account.clone()).or_default() += 1.0 / f64::from(self.pools.weight(&pick.account));
        self.placed += 1;
    }

    /// Ends the round: the cursors to write and when to ask again.
    pub fn finish(mut self) -> RoundEnd {
        for q in std::mem::take(&mut self.queues).into_values().flatten() {
            self.end.advanced(&q);
        }
        self.end
    }

    fn load_of(&self, account: &str) -> f64 {
        self.load.get(account).copied().unwrap_or(0.0)
    }

    /// Drops an account's head candidate, keeping its cursor's advance.
    fn pop(&mut self, account: &str) {
        if let Some(q) = self.queues.get_mut(account).and_then(VecDeque::pop_front) {
            self.end.advanced(&q);
        }
    }
}

impl RoundEnd {
    /// A candidate leaves the round: a cursor that handed out indices moves past them.
    fn advanced(&mut self, q: &Queued) {
        if let (Kind::Cursor { next, .. }, true) = (q.cand.kind, q.taken > 0) {
            self.cursors.push((q.cand.job_seq, next + q.taken));
        }
    }
}
