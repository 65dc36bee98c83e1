//! The job store alone, with simulated workers (no process is spawned): claim +
//! complete throughput on SQLite and on PostgreSQL with 1 and 50 workers, and the time
//! to recover 10,000 expired leases.
//!
//! `cargo bench -p berth-coordinator --bench store`. PostgreSQL runs when
//! `BERTH_TEST_POSTGRES` names a server whose user may create databases (each run
//! makes a fresh one and drops it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_coordinator::store::{Admission, Location, Op, StoreHandle, WorkerCaps};
use berth_shared::job::{ArrayRange, Command, JobSpec, Outcome};
use chrono::Utc;

const TASKS: u32 = 10_000;
const RECOVER: u32 = 10_000;
const TTL: Duration = Duration::from_secs(30);

fn array(n: u32) -> JobSpec {
    let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
    spec.array = Some(ArrayRange { start: 0, end: n - 1 });
    spec.max_attempts = 3;
    spec
}

fn caps() -> Arc<WorkerCaps> {
    Arc::new(WorkerCaps {
        executors: vec!["process".into()],
        cpus: 64,
        mem_mib: 1 << 20,
        gpus: 0,
        pool: "default".into(),
        pool_free: true,
        labels: Vec::new(),
        gpu_list: Vec::new(),
    })
}

async fn submit(store: &StoreHandle, spec: JobSpec) {
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
        .expect("submit");
}

/// `workers` simulated workers, each holding up to 4 slots + 2 prefetched: claim, then
/// report every claimed task succeeded, until the queue is empty. Returns tasks/s.
async fn claim_complete(store: &StoreHandle, workers: usize) -> f64 {
    submit(store, array(TASKS)).await;
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..workers {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let name = format!("sim-{w}");
            let caps = caps();
            let mut done = 0u64;
            loop {
                let got = store
                    .call(|reply| Op::Claim { worker: name.clone(), n: 6, caps: caps.clone(), free: None, now: Utc::now(), ttl: TTL, reply })
                    .await
                    .expect("claim")
                    .tasks;
                if got.is_empty() {
                    return done;
                }
                let finishes = got.into_iter().map(|a| {
                    let store = store.clone();
                    let name = name.clone();
                    async move {
                        let outcome = Outcome { exit_code: Some(0), signal: None, timed_out: false, killed: false, runtime_ms: 1, error: None };
                        store.call(|reply| Op::Finish { worker: name, lease: a.lease, outcome, now: Utc::now(), reply }).await.expect("finish")
                    }
                });
                done += futures::future::join_all(finishes).await.len() as u64;
            }
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.expect("worker task");
    }
    assert_eq!(total, u64::from(TASKS), "every task claimed and completed once");
    total as f64 / started.elapsed().as_secs_f64()
}

/// Claims `RECOVER` tasks for a worker that then vanishes, and times the expiry pass
/// that re-queues them all.
async fn recover(store: &StoreHandle) -> Duration {
    submit(store, array(RECOVER)).await;
    let mut held = 0;
    while held < RECOVER {
        let got = store
            .call(|reply| Op::Claim { worker: "doomed".into(), n: 1000, caps: caps(), free: None, now: Utc::now(), ttl: TTL, reply })
            .await
            .expect("claim")
            .tasks;
        assert!(!got.is_empty(), "ran out of tasks at {held}");
        held += got.len() as u32;
    }
    let later = Utc::now() + chrono::Duration::seconds(60);
    let started = Instant::now();
    let mut recovered = 0;
    loop {
        let expired = store.call(|reply| Op::ExpireLeases { now: later, reply }).await.expect("expire");
        if expired.is_empty() {
            break;
        }
        recovered += expired.len();
    }
    let took = started.elapsed();
    assert_eq!(recovered, RECOVER as usize);
    took
}

struct PgDatabase {
    admin: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&admin, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        })
        .join();
    }
}

fn fresh_pg(admin: &str) -> (PgDatabase, String) {
    let name = format!("berth_bench_{}", uuid::Uuid::new_v4().simple());
    let mut c = postgres::Client::connect(admin, postgres::NoTls).expect("connect to BERTH_TEST_POSTGRES");
    c.batch_execute(&format!("CREATE DATABASE {name}")).expect("create database");
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    (PgDatabase { admin: admin.into(), name: name.clone() }, format!("{base}/{name}"))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!("berth store bench: {TASKS} tasks claimed+completed by simulated workers (claim 6 at a time), recovery of {RECOVER} expired leases");
    println!("{:<12} {:>20} {:>20} {:>22}", "backend", "1 worker tasks/s", "50 workers tasks/s", "recover 10k leases");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut backends: Vec<(String, Location, Option<PgDatabase>)> = Vec::new();
    backends.push(("sqlite".into(), Location::Sqlite(dir.path().join("bench.db")), None));
    match std::env::var("BERTH_TEST_POSTGRES") {
        Ok(admin) => {
            let (guard, url) = std::thread::spawn(move || fresh_pg(&admin)).join().expect("create database");
            backends.push(("postgres".into(), Location::Postgres(url), Some(guard)));
        }
        Err(_) => println!("(postgres skipped: set BERTH_TEST_POSTGRES, as scripts/test does)"),
    }
    for (name, loc, _guard) in &backends {
        let store = loc.writer(Default::default()).expect("open the store");
        let (one, fifty, rec) = rt.block_on(async {
            let one = claim_complete(&store, 1).await;
            let fifty = claim_complete(&store, 50).await;
            let rec = recover(&store).await;
            (one, fifty, rec)
        });
        println!("{name:<12} {one:>20.0} {fifty:>20.0} {:>19.0} ms", rec.as_secs_f64() * 1000.0);
    }
}
