//! A simulated worker for the job store alone (no process spawned, no network): what
//! the store benches (`perf` scenario 3 and `store`) measure claim + complete with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_coordinator::scheduler::WorkerCaps;
use berth_coordinator::store::{Admission, Location, Op, StoreHandle};
use berth_shared::job::{ArrayRange, Command, JobSpec, Outcome};
use chrono::Utc;

pub const TTL: Duration = Duration::from_secs(30);
/// A simulated worker's claim: 4 slots + 2 prefetched.
pub const CLAIM: u32 = 6;

pub fn caps() -> Arc<WorkerCaps> {
    Arc::new(WorkerCaps {
        executors: vec!["process".into()],
        cpus: 64,
        mem_mib: 1 << 20,
        gpus: 0,
        pool: "default".into(),
        pool_free: true,
        labels: Vec::new(),
        gpu_list: Vec::new(),
        secrets: Vec::new(),
    })
}

pub fn open(loc: &Location) -> Result<StoreHandle> {
    loc.writer(Default::default(), std::time::Duration::from_secs(30)).map_err(|e| anyhow!("cannot open the store {}: {e}", loc.describe()))
}

/// `workers` simulated workers run the array of `tasks` to its end, each as a
/// worker's session does: up to `CLAIM` tasks in hand (slots + prefetch), one claim
/// in flight at a time, and each claimed task reported succeeded at once
/// (concurrently, as a worker's slots do) while the next claim is already asked
/// for, since a worker asks for more as soon as a slot frees, not when its result
/// is acknowledged. Returns tasks/s.
pub async fn claim_complete(store: &StoreHandle, workers: usize, tasks: u32) -> Result<f64> {
    let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
    spec.array = Some(ArrayRange { start: 0, end: tasks - 1 });
    store
        .call(|reply| Op::Submit {
            spec: Box::new(spec),
            owner: "bench".into(),
            idempotency_key: uuid::Uuid::new_v4(),
            admission: Admission::default(),
            now: Utc::now(),
            reply,
        })
        .await
        .map_err(|e| anyhow!("submit: {e}"))?;
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..workers {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            use futures::stream::{FuturesUnordered, StreamExt};
            use futures::FutureExt;
            let name = format!("sim-{w}");
            let caps = caps();
            let mut done = 0u64;
            let mut finishing = FuturesUnordered::new();
            loop {
                let got = store
                    .call(|reply| Op::Claim { worker: name.clone(), n: CLAIM, caps: caps.clone(), free: None, now: Utc::now(), ttl: TTL, reply })
                    .await
                    .map_err(|e| anyhow!("claim: {e}"))?
                    .tasks;
                // Results of the tasks claimed before, acknowledged by now.
                while let Some(Some(r)) = finishing.next().now_or_never() {
                    let r: Result<_, berth_coordinator::store::StoreError> = r;
                    r.map_err(|e| anyhow!("finish: {e}"))?;
                    done += 1;
                }
                if got.is_empty() {
                    while let Some(r) = finishing.next().await {
                        r.map_err(|e| anyhow!("finish: {e}"))?;
                        done += 1;
                    }
                    return Ok::<u64, anyhow::Error>(done);
                }
                for a in got {
                    let (store, name) = (store.clone(), name.clone());
                    let outcome = Outcome { exit_code: Some(0), signal: None, timed_out: false, killed: false, runtime_ms: 1, error: None };
                    // Sent now: it reaches the writer before the next claim does.
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    store.send(Op::Finish { worker: name, lease: a.lease, outcome, now: Utc::now(), reply: Some(tx) }).map_err(|e| anyhow!("finish: {e}"))?;
                    finishing.push(async move { rx.await.unwrap_or(Err(berth_coordinator::store::StoreError::Stopped)) });
                }
            }
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.context("a simulated worker panicked")??;
    }
    if total != u64::from(tasks) {
        bail!("{total} of {tasks} tasks were claimed and completed");
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// A fresh PostgreSQL database for this run, dropped with the guard.
pub struct PgDatabase {
    admin: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn create(admin: &str) -> Result<PgDatabase> {
        let name = format!("berth_perf_{}", uuid::Uuid::new_v4().simple());
        let mut c = postgres::Client::connect(admin, postgres::NoTls).context("connect to BERTH_TEST_POSTGRES")?;
        c.batch_execute(&format!("CREATE DATABASE {name}")).context("create a database")?;
        let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
        Ok(PgDatabase { admin: admin.into(), url: format!("{base}/{name}"), name })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}
