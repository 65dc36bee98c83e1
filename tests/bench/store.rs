//! The job store alone, with simulated workers (no process is spawned): claim +
//! complete throughput on SQLite and on PostgreSQL with 1 and 50 workers (the simulated
//! worker of `berth_e2e::store_sim`, as `perf` scenario 3 uses), and the time to
//! recover 10,000 expired leases.
//!
//! `cargo bench -p berth-e2e --bench store`. PostgreSQL runs when
//! `BERTH_TEST_POSTGRES` names a server whose user may create databases (each run
//! makes a fresh one and drops it).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use berth_coordinator::store::{Admission, Location, Op, StoreHandle};
use berth_e2e::store_sim::{self, PgDatabase};
use berth_shared::job::{ArrayRange, Command, JobSpec};
use chrono::Utc;

const TASKS: u32 = 10_000;
const RECOVER: u32 = 10_000;

/// Claims `RECOVER` tasks for a worker that then vanishes, and times the expiry pass
/// that re-queues them all.
async fn recover(store: &StoreHandle) -> Result<Duration> {
    let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
    spec.array = Some(ArrayRange { start: 0, end: RECOVER - 1 });
    spec.max_attempts = 3;
    let admission = Admission::default();
    store
        .call(|reply| Op::Submit { spec: Box::new(spec), owner: "bench".into(), idempotency_key: uuid::Uuid::new_v4(), admission, now: Utc::now(), reply })
        .await
        .map_err(|e| anyhow!("submit: {e}"))?;
    let mut held = 0;
    while held < RECOVER {
        let got = store
            .call(|reply| Op::Claim { worker: "doomed".into(), n: 1000, caps: store_sim::caps(), free: None, now: Utc::now(), ttl: store_sim::TTL, reply })
            .await
            .map_err(|e| anyhow!("claim: {e}"))?
            .tasks;
        if got.is_empty() {
            bail!("ran out of tasks at {held}");
        }
        held += got.len() as u32;
    }
    let later = Utc::now() + chrono::Duration::seconds(60);
    let started = Instant::now();
    let mut recovered = 0;
    loop {
        let expired = store.call(|reply| Op::ExpireLeases { now: later, reply }).await.map_err(|e| anyhow!("expire: {e}"))?;
        if expired.is_empty() {
            break;
        }
        recovered += expired.len();
    }
    let took = started.elapsed();
    if recovered != RECOVER as usize {
        bail!("{recovered} of {RECOVER} expired leases were recovered");
    }
    Ok(took)
}

fn real_main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!(
        "berth store bench: {TASKS} tasks claimed+completed by simulated workers (up to {} in hand), recovery of {RECOVER} expired leases",
        store_sim::CLAIM
    );
    println!("{:<12} {:>20} {:>20} {:>22}", "backend", "1 worker tasks/s", "50 workers tasks/s", "recover 10k leases");
    let dir = tempfile::tempdir()?;
    let mut backends: Vec<(&str, Location, Option<PgDatabase>)> = vec![("sqlite", Location::Sqlite(dir.path().join("bench.db")), None)];
    match std::env::var("BERTH_TEST_POSTGRES") {
        Ok(admin) => {
            let db = PgDatabase::create(&admin)?;
            backends.push(("postgres", Location::Postgres(db.url.clone()), Some(db)));
        }
        Err(_) => println!("(postgres skipped: set BERTH_TEST_POSTGRES, as scripts/test does)"),
    }
    for (name, loc, _db) in &backends {
        let store = store_sim::open(loc)?;
        let (one, fifty, rec) = rt.block_on(async {
            let one = store_sim::claim_complete(&store, 1, TASKS).await?;
            let fifty = store_sim::claim_complete(&store, 50, TASKS).await?;
            let rec = recover(&store).await?;
            Ok::<_, anyhow::Error>((one, fifty, rec))
        })?;
        println!("{name:<12} {one:>20.0} {fifty:>20.0} {:>19.0} ms", rec.as_secs_f64() * 1000.0);
    }
    Ok(())
}

fn main() -> ExitCode {
    berth_e2e::bench::exit("store", real_main())
}
