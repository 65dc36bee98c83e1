//! Scenario 3, the job store alone with simulated workers (`berth_e2e::store_sim`),
//! against the same rows written raw, one transaction per operation, with the same
//! durability.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use berth_e2e::bench::{median, Rounds};
use berth_e2e::store_sim;
use chrono::Utc;
use serde_json::json;

use crate::env::Env;
use crate::table::{list, Row, Verdict};
use crate::until;

// The raw baselines (the simulated worker is `berth_e2e::store_sim`).

/// The rows one claim and one completion write (a task row, its event, the job's
/// counts), in the shape of berth's tables. `ROW_ID` is the backend's row id type;
/// the statements below use `$N` placeholders, `?N` for SQLite.
const RAW_TABLES: &str = "
    CREATE TABLE jobs(seq INTEGER PRIMARY KEY, n_queued INTEGER NOT NULL, n_running INTEGER NOT NULL, n_succeeded INTEGER NOT NULL);
    CREATE TABLE tasks(job_seq INTEGER NOT NULL, idx INTEGER NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, lease TEXT, worker TEXT,
        lease_expires BIGINT, exit_code INTEGER, started_at BIGINT, ended_at BIGINT, runtime_ms BIGINT, PRIMARY KEY(job_seq, idx));
    CREATE TABLE events(id ROW_ID PRIMARY KEY, job_seq INTEGER NOT NULL, idx INTEGER, time BIGINT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, worker TEXT, reason TEXT);
    INSERT INTO jobs(seq, n_queued, n_running, n_succeeded) VALUES (1, 1000000000, 0, 0);";

const CLAIM_SQL: [&str; 3] = [
    "INSERT INTO tasks(job_seq, idx, state, attempt, lease, worker, lease_expires, started_at) VALUES (1, $1, 'running', 1, $2, 'sim-0', $3, $3)",
    "INSERT INTO events(job_seq, idx, time, state, attempt, worker) VALUES (1, $1, $2, 'running', 1, 'sim-0')",
    "UPDATE jobs SET n_queued = n_queued - 1, n_running = n_running + 1 WHERE seq = 1",
];
const FINISH_SQL: [&str; 3] = [
    "UPDATE tasks SET state = 'succeeded', exit_code = 0, ended_at = $2, runtime_ms = 1, lease = NULL WHERE job_seq = 1 AND idx = $1",
    "INSERT INTO events(job_seq, idx, time, state, attempt, worker) VALUES (1, $1, $2, 'succeeded', 1, 'sim-0')",
    "UPDATE jobs SET n_running = n_running - 1, n_succeeded = n_succeeded + 1 WHERE seq = 1",
];

/// The baseline: the same rows through raw SQLite (WAL, `synchronous=FULL`, as
/// berth opens it), one transaction per operation — a claim, then a completion — on
/// one connection, until `tasks` are done or `limit` passes. Returns tasks/s.
fn raw_sqlite(path: &Path, tasks: u32, limit: Duration) -> Result<f64> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(&RAW_TABLES.replace("ROW_ID", "INTEGER"))?;
    let start = Instant::now();
    let mut done = 0u32;
    while done < tasks && start.elapsed() < limit {
        let now = Utc::now().timestamp_millis();
        let lease = uuid::Uuid::new_v4().to_string();
        let tx = conn.transaction()?;
        tx.prepare_cached(&CLAIM_SQL[0].replace('$', "?"))?.execute(rusqlite::params![done, lease, now + 30_000])?;
        tx.prepare_cached(&CLAIM_SQL[1].replace('$', "?"))?.execute(rusqlite::params![done, now])?;
        tx.prepare_cached(&CLAIM_SQL[2].replace('$', "?"))?.execute([])?;
        tx.commit()?;
        let tx = conn.transaction()?;
        tx.prepare_cached(&FINISH_SQL[0].replace('$', "?"))?.execute(rusqlite::params![done, now])?;
        tx.prepare_cached(&FINISH_SQL[1].replace('$', "?"))?.execute(rusqlite::params![done, now])?;
        tx.prepare_cached(&FINISH_SQL[2].replace('$', "?"))?.execute([])?;
        tx.commit()?;
        done += 1;
    }
    Ok(f64::from(done) / start.elapsed().as_secs_f64())
}

/// The same through raw PostgreSQL (its default durability), in a fresh database.
fn raw_postgres(url: &str, tasks: u32, limit: Duration) -> Result<f64> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute("DROP TABLE IF EXISTS jobs, tasks, events")?;
    c.batch_execute(&RAW_TABLES.replace("ROW_ID", "BIGSERIAL"))?;
    let claim: Vec<_> = CLAIM_SQL.iter().map(|s| c.prepare(s)).collect::<Result<_, _>>()?;
    let finish: Vec<_> = FINISH_SQL.iter().map(|s| c.prepare(s)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let mut done = 0i32;
    while (done as u32) < tasks && start.elapsed() < limit {
        let now = Utc::now().timestamp_millis();
        let lease = uuid::Uuid::new_v4().to_string();
        let mut tx = c.transaction()?;
        tx.execute(&claim[0], &[&done, &lease, &(now + 30_000)])?;
        tx.execute(&claim[1], &[&done, &now])?;
        tx.execute(&claim[2], &[])?;
        tx.commit()?;
        let mut tx = c.transaction()?;
        tx.execute(&finish[0], &[&done, &now])?;
        tx.execute(&finish[1], &[&done, &now])?;
        tx.execute(&finish[2], &[])?;
        tx.commit()?;
        done += 1;
    }
    Ok(f64::from(done) / start.elapsed().as_secs_f64())
}

/// The server's durability settings, in words.
fn pg_durability(url: &str) -> Result<String> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    let mut show = |k: &str| -> Result<String> { Ok(c.query_one(&format!("SHOW {k}"), &[])?.get::<_, String>(0)) };
    Ok(format!("server fsync={}, synchronous_commit={}", show("fsync")?, show("synchronous_commit")?))
}

/// Where the raw baseline of scenario 3 writes.
#[derive(Clone, Copy)]
enum RawTarget<'a> {
    /// A directory for a fresh SQLite file each round.
    Sqlite(&'a Path),
    /// A database of its own.
    Postgres(&'a str),
}

/// Scenario 3 on one backend: per-round rates with 1 and 50 workers, the raw baseline's,
/// the durability in words, and a note on rounds cut short.
#[allow(clippy::type_complexity)]
fn store_backend(
    env: &Env,
    name: &str,
    loc: &berth_coordinator::store::Location,
    raw_target: RawTarget<'_>,
    end: Instant,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, String, String)> {
    let n = env.scale.store_tasks;
    eprintln!(
        "[3] store alone on {name}: {n} tasks claimed (6 at a time) and completed by 1 and by 50 simulated workers, x {} rounds; raw baseline",
        env.rounds
    );
    let durability = match raw_target {
        RawTarget::Sqlite(_) => "WAL, synchronous=FULL".to_string(),
        RawTarget::Postgres(url) => pg_durability(url).unwrap_or_else(|e| format!("settings unknown: {e:#}")),
    };
    let handle = store_sim::open(loc)?;
    let (mut one, mut fifty, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let mut rounds = Rounds::new(env.rounds, end);
    while let Some(r) = rounds.next_round() {
        let limit = until(end).max(Duration::from_secs(10));
        let (a, b) = env
            .rt
            .block_on(async {
                tokio::time::timeout(limit, async {
                    Ok::<_, anyhow::Error>((store_sim::claim_complete(&handle, 1, n).await?, store_sim::claim_complete(&handle, 50, n).await?))
                })
                .await
            })
            .map_err(|_| anyhow!("a round did not finish within {limit:?}"))??;
        one.push(a);
        fifty.push(b);
        let rate = match raw_target {
            RawTarget::Postgres(url) => raw_postgres(url, n, env.scale.raw_store_limit)?,
            RawTarget::Sqlite(dir) => raw_sqlite(&dir.join(format!("raw-{r}.db")), n, env.scale.raw_store_limit)?,
        };
        raw.push(rate);
        eprintln!("    round {}: 1 worker {a:.0}/s, 50 workers {b:.0}/s, raw one-tx-per-op {rate:.0}/s", r + 1);
    }
    Ok((one, fifty, raw, durability, rounds.note))
}

pub fn scenario_3(env: &Env) -> Result<Vec<Row>> {
    use berth_coordinator::store::Location;
    let n = env.scale.store_tasks;
    let dir = tempfile::Builder::new().prefix("berth-perf-store-").tempdir()?;
    let mut backends: Vec<(&str, Location, Option<store_sim::PgDatabase>, Option<store_sim::PgDatabase>)> = Vec::new();
    backends.push(("SQLite", Location::Sqlite(dir.path().join("store.db")), None, None));
    let mut pg_note = "PostgreSQL not measured: set BERTH_TEST_POSTGRES to a server whose user may create databases".to_string();
    if let Ok(admin) = std::env::var("BERTH_TEST_POSTGRES") {
        match store_sim::PgDatabase::create(&admin).and_then(|a| Ok((a, store_sim::PgDatabase::create(&admin)?))) {
            Ok((db, raw_db)) => {
                backends.push(("PostgreSQL", Location::Postgres(db.url.clone()), Some(db), Some(raw_db)));
                pg_note = String::new();
            }
            Err(e) => pg_note = format!("PostgreSQL not measured: {e:#}"),
        }
    }
    let mut rows = Vec::new();
    for (name, loc, _guard, raw_db) in &backends {
        let sqlite = *name == "SQLite";
        let ids = if sqlite { ["3a", "3b"] } else { ["3c", "3d"] };
        let raw_target = match raw_db {
            Some(db) => RawTarget::Postgres(&db.url),
            None => RawTarget::Sqlite(dir.path()),
        };
        // PostgreSQL (with fsync) is slower: it gets longer.
        let end = env.clock.phase(Duration::from_secs(match (sqlite, n > 5_000) {
            (true, true) => 60,
            (true, false) => 20,
            (false, true) => 100,
            (false, false) => 30,
        }));
        match store_backend(env, name, loc, raw_target, end) {
            Ok((one, fifty, raw, durability, note)) => {
                for (id, workers, v) in [(ids[0], 1, &one), (ids[1], 50, &fifty)] {
                    let mut row = Row::new(
                        id,
                        &format!("store: claim+complete, {name}, {workers} worker{}", if workers == 1 { "" } else { "s" }),
                        "jobs/s",
                        "jobs/s",
                        if sqlite { ">= 20000/s" } else { "" },
                    )
                    .values(median(v), median(&raw));
                    row.verdict = if sqlite { Verdict::of(row.figure.map(|f| f >= 20_000.0)) } else { Verdict::Info };
                    row.note = format!(
                        "figure: {n} tasks through the store's group-commit writer ({durability}), claims of up to 6 with completions of the claim before in the same round trip (as a worker session); rounds {}. \
                         baseline: the same rows (task, event, job counts) one transaction per claim and per completion on one connection, raw, same durability; rounds {}{note}",
                        list(v),
                        list(&raw)
                    );
                    rows.push(row.extra("rounds", json!(v)).extra("baseline_rounds", json!(raw)));
                }
            }
            Err(e) => rows.push(Row::not_run(ids[0], &format!("store: claim+complete, {name}"), Verdict::Error, format!("failed: {e:#}"))),
        }
    }
    if !pg_note.is_empty() {
        rows.push(Row::not_run("3c", "store: claim+complete, PostgreSQL", Verdict::Skipped, pg_note));
    }
    Ok(rows)
}
