//! What the benches share: medians and percentiles, rounds run until a deadline, the
//! rate of a command run by several drivers at once, the raw rate of running `true`
//! through the worker's own executor (the baseline berth is measured against), and a
//! few facts about the machine to print beside the figures.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// Nearest-rank percentile (`p` in 0..=100).
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

/// How many of a run's attempts succeeded or failed, and in how long.
pub struct Rate {
    pub done: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Rounds of a measurement until a deadline: another round starts only while the
/// longest so far, with a fifth to spare, still fits before it.
///
/// ```text
/// let mut rounds = Rounds::new(n, end);
/// while let Some(r) = rounds.next_round() { ... }
/// ```
///
/// A round is timed from its `next_round` to the next; a body that `break`s after a
/// failure sets `note` (see `failed`) and its time is not counted.
pub struct Rounds {
    total: usize,
    end: Instant,
    next: usize,
    started: Option<Instant>,
    taken: Vec<Duration>,
    /// Empty, or why fewer rounds ran than asked (with a leading space, for a note).
    pub note: String,
}

impl Rounds {
    pub fn new(total: usize, end: Instant) -> Rounds {
        Rounds { total, end, next: 0, started: None, taken: Vec::new(), note: String::new() }
    }

    /// The next round's number (from 0), or `None` once all have run or the next would
    /// not fit before the deadline (the note then says so).
    pub fn next_round(&mut self) -> Option<usize> {
        if let Some(s) = self.started.take() {
            self.taken.push(s.elapsed());
        }
        let r = self.next;
        if r >= self.total {
            return None;
        }
        let longest = self.taken.iter().max().copied().unwrap_or_default();
        if r > 0 && Instant::now() + longest.mul_f64(1.2) >= self.end {
            self.note = format!(" (rounds cut short at {r}: time budget)");
            return None;
        }
        self.next += 1;
        self.started = Some(Instant::now());
        Some(r)
    }

    /// Round `r` failed: the note says how (the caller then stops).
    pub fn failed(&mut self, r: usize, e: &anyhow::Error) {
        self.note = format!(" (round {} failed: {e:#})", r + 1);
    }
}

/// `par` threads share `total` runs of `run` (true when the run succeeded), until all
/// are done or `limit` passes.
pub fn thread_rate(par: usize, total: usize, limit: Duration, run: impl Fn() -> bool + Sync) -> Rate {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let start = Instant::now();
    let deadline = start + limit;
    std::thread::scope(|s| {
        for _ in 0..par {
            s.spawn(|| {
                while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < total {
                    if run() {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Rate { done: done.into_inner(), failed: failed.into_inner(), elapsed: start.elapsed() }
}

/// A baseline's rate, round by round (a round in which nothing succeeded is left out),
/// and its failed attempts in all.
#[derive(Default)]
pub struct Rates {
    pub per_sec: Vec<f64>,
    pub failed: usize,
}

impl Rates {
    pub fn add(&mut self, r: &Rate) {
        self.failed += r.failed;
        if r.done > 0 {
            self.per_sec.push(r.per_sec());
        }
    }
}

/// `par` drivers on the runtime share `total` attempts of `/bin/true` through the
/// worker's executor, each attempt with its own spool file in its driver's workspace,
/// as a slot runs it; until done or `limit`.
pub fn executor_rate(rt: &tokio::runtime::Runtime, dir: &Path, par: usize, total: usize, limit: Duration) -> anyhow::Result<Rate> {
    use berth_worker::executor::{process, Launch};
    use berth_worker::spool::Spool;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workspaces = Vec::new();
    for d in 0..par {
        let ws = dir.join(format!("slot-{d}"));
        std::fs::create_dir_all(&ws)?;
        workspaces.push(ws);
    }
    let start = Instant::now();
    let deadline = start + limit;
    rt.block_on(async {
        let mut handles = Vec::new();
        for ws in workspaces {
            let (next, done, failed) = (next.clone(), done.clone(), failed.clone());
            handles.push(tokio::spawn(async move {
                let spool_path = ws.join("attempt.spool");
                while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < total {
                    let Ok(spool) = Spool::create(&spool_path).map(Arc::new) else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let launch = Launch {
                        argv: vec!["/bin/true".into()],
                        env: Vec::new(),
                        workspace: ws.clone(),
                        max_runtime: None,
                        grace: Duration::from_secs(1),
                        record: None,
                    };
                    let (_kill_tx, kill_rx) = tokio::sync::watch::channel(None);
                    let o = process::run(launch, Default::default(), spool.clone(), kill_rx, |_| {}).await;
                    spool.remove();
                    if o.exit_code == Some(0) && o.error.is_none() {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for h in handles {
            let left = (deadline + Duration::from_secs(5)).saturating_duration_since(Instant::now());
            let abort = h.abort_handle();
            if tokio::time::timeout(left, h).await.is_err() {
                abort.abort();
            }
        }
    });
    Ok(Rate { done: done.load(Ordering::Relaxed), failed: failed.load(Ordering::Relaxed), elapsed: start.elapsed() })
}

pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, m)| m.trim().to_string())
}

pub fn kernel() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string())
}

/// The load averages (1, 5, 15 minutes): other work on the machine skews every figure.
pub fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_else(|_| "?".into())
}

/// A bench's exit: its failure as one line (with its causes), and a failing status.
pub fn exit(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} bench failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
