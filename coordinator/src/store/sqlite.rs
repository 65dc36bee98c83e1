//! The embedded SQLite job store (one file in the data dir, WAL, `synchronous=FULL`
//! so every acknowledged write survives power loss; group commit makes that cheap).
//!
//! Layout: a submission is one `jobs` row holding its spec once. An array's tasks are
//! not stored until they are claimed: `next_idx` is a cursor over the unclaimed
//! indices, so a 1,000,000-task array is one row until it runs. A claimed (or
//! individually cancelled) task gets a `tasks` row; every transition appends an
//! `events` row; output chunks go to `logs`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::ids::{JobId, JobSelector, LeaseId};
use berth_shared::job::{Counts, Event, JobSpec, JobState, Outcome};
use berth_shared::wire::{ApiError, Assignment, ErrorKind, JobStatus, JobSummary, OutStream, TaskStatus};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::*;
use crate::lease::{self, Expiry};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT,
    owner TEXT NOT NULL,
    account TEXT,
    idem TEXT,
    spec BLOB NOT NULL,
    is_array INTEGER NOT NULL,
    idx_start INTEGER NOT NULL,
    idx_end INTEGER NOT NULL,
    next_idx INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    state TEXT NOT NULL,
    n_pending INTEGER NOT NULL DEFAULT 0,
    n_queued INTEGER NOT NULL DEFAULT 0,
    n_running INTEGER NOT NULL DEFAULT 0,
    n_succeeded INTEGER NOT NULL DEFAULT 0,
    n_failed INTEGER NOT NULL DEFAULT 0,
    n_cancelled INTEGER NOT NULL DEFAULT 0,
    n_timed_out INTEGER NOT NULL DEFAULT 0,
    n_rejected INTEGER NOT NULL DEFAULT 0,
    n_frozen INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    ended_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs(priority DESC, seq) WHERE next_idx <= idx_end;
CREATE TABLE IF NOT EXISTS tasks(
    job_seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    lease TEXT,
    worker TEXT,
    lease_expires INTEGER,
    exit_code INTEGER,
    started_at INTEGER,
    ended_at INTEGER,
    runtime_ms INTEGER,
    reason TEXT,
    PRIMARY KEY(job_seq, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_queued ON tasks(job_seq, idx) WHERE state = 'queued';
CREATE UNIQUE INDEX IF NOT EXISTS tasks_lease ON tasks(lease) WHERE lease IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(lease_expires) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_worker ON tasks(worker) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS events(
    job_seq INTEGER NOT NULL,
    idx INTEGER,
    time INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_seq, idx);
CREATE TABLE IF NOT EXISTS logs(
    job_seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    UNIQUE(job_seq, idx, attempt, stream, seq)
);
CREATE TABLE IF NOT EXISTS tokens(
    hash TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS workers(
    name TEXT PRIMARY KEY,
    enrolled_at INTEGER NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '1');
"#;

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

fn invalid(msg: impl Into<String>) -> StoreError {
    StoreError::Api(ApiError::new(ErrorKind::Invalid, msg))
}

fn not_found(sel: &JobSelector) -> StoreError {
    StoreError::Api(ApiError::new(
        ErrorKind::NotFound,
        format!("no job matches `{}`: `berth list` shows the jobs", sel.prefix),
    ))
}

/// Opens (and creates) the database file with the settings every connection uses.
pub fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(conn)
}

/// Creates the schema if needed.
pub fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    Ok(())
}

/// What the writer keeps about a job between batches (immutable facts only).
struct JobMeta {
    id: JobId,
    is_array: bool,
    spec: Arc<JobSpec>,
}

pub struct SqliteStore {
    conn: Connection,
    jobs: HashMap<i64, Arc<JobMeta>>,
    /// The next expected output sequence per (lease, stream); rebuilt from the
    /// database when missing.
    expected_seq: HashMap<(LeaseId, OutStream), u64>,
}

type Reply = Box<dyn FnOnce(bool) + Send>;

fn reply_with<T: Send + 'static>(tx: oneshot::Sender<Result<T, StoreError>>, r: Result<T, StoreError>) -> Reply {
    Box::new(move |committed| {
        let r = if committed { r } else { Err(StoreError::Api(ApiError::new(ErrorKind::Internal, "the job store could not commit; try again"))) };
        let _ = tx.send(r);
    })
}

fn stream_code(s: OutStream) -> i64 {
    match s {
        OutStream::Stdout => 0,
        OutStream::Stderr => 1,
    }
}

fn stream_of(c: i64) -> OutStream {
    if c == 1 {
        OutStream::Stderr
    } else {
        OutStream::Stdout
    }
}

fn state_of(s: &str) -> JobState {
    s.parse().unwrap_or(JobState::Failed)
}

/// The per-batch scratch: jobs whose counts changed, notices, wake-ups.
#[derive(Default)]
struct Scratch {
    dirty: HashSet<i64>,
    notices: Vec<Notice>,
    work: bool,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = open_connection(path)?;
        migrate(&conn)?;
        Ok(SqliteStore { conn, jobs: HashMap::new(), expected_seq: HashMap::new() })
    }

    /// Applies a batch of operations in one transaction and commits once.
    pub fn apply_batch(&mut self, ops: Vec<Op>) -> BatchOutcome {
        let mut replies: Vec<Reply> = Vec::with_capacity(ops.len());
        let mut scratch = Scratch::default();
        let began = self.conn.execute_batch("BEGIN IMMEDIATE");
        if let Err(e) = began {
            tracing::error!(error = %e, "cannot begin a store transaction");
        }
        for op in ops {
            if let Err(e) = self.conn.execute_batch("SAVEPOINT op") {
                tracing::error!(error = %e, "cannot open a savepoint");
            }
            let mark = scratch.notices.len();
            let (reply, ok) = self.apply(op, &mut scratch);
            if ok {
                let _ = self.conn.execute_batch("RELEASE op");
            } else {
                let _ = self.conn.execute_batch("ROLLBACK TO op; RELEASE op");
                scratch.notices.truncate(mark);
                self.expected_seq.clear();
            }
            replies.push(reply);
        }
        // One notice per job whose counts changed, with its counts as committed.
        let dirty: Vec<i64> = scratch.dirty.drain().collect();
        for seq in dirty {
            if let Ok((id, counts)) = self.counts(seq) {
                scratch.notices.push(Notice::Job { job: id, counts, state: counts.aggregate() });
            }
        }
        let committed = match self.conn.execute_batch("COMMIT") {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; the batch is rolled back");
                let _ = self.conn.execute_batch("ROLLBACK");
                self.expected_seq.clear();
                false
            }
        };
        BatchOutcome {
            notices: if committed { scratch.notices } else { Vec::new() },
            work_available: committed && scratch.work,
            replies: replies.into_iter().map(|r| Box::new(move || r(committed)) as Box<dyn FnOnce() + Send>).collect(),
        }
    }

    fn apply(&mut self, op: Op, s: &mut Scratch) -> (Reply, bool) {
        macro_rules! run {
            ($reply:expr, $e:expr) => {{
                let r = $e;
                let ok = r.is_ok();
                if let Err(e) = &r {
                    if !matches!(e, StoreError::Api(_)) {
                        tracing::error!(error = %e, "store operation failed");
                    }
                }
                (reply_with($reply, r), ok)
            }};
        }
        match op {
            Op::Submit { spec, owner, idempotency_key, now, reply } => run!(reply, self.submit(*spec, &owner, idempotency_key, now, s)),
            Op::Claim { worker, n, caps, now, ttl, reply } => run!(reply, self.claim(&worker, n, &caps, now, ttl, s)),
            Op::Started { worker, lease, now } => {
                let r = self.conn.execute(
                    "UPDATE tasks SET started_at = ?1 WHERE lease = ?2 AND worker = ?3 AND state = 'running'",
                    params![ms(now), lease.to_string(), worker],
                );
                (Box::new(|_| {}), r.is_ok())
            }
            Op::Finish { worker, lease, outcome, now, reply } => run!(reply, self.finish(&worker, lease, &outcome, now, s)),
            Op::Heartbeat { worker, leases, now, ttl, reply } => run!(reply, self.renew(&worker, &leases, now, ttl)),
            Op::Reconcile { worker, held, now, ttl, reply } => run!(reply, self.reconcile(&worker, &held, now, ttl, s)),
            Op::AppendLogs { worker, chunks, reply } => run!(reply, self.append_logs(&worker, chunks, s)),
            Op::Cancel { job, reason, now, reply } => run!(reply, self.cancel(&job, &reason, now, s)),
            Op::ExpireLeases { now, reply } => run!(reply, self.expire(now, s)),
            Op::RestartLeases { now, ttl, reply } => run!(reply, self.restart_leases(now, ttl)),
            Op::UseToken { token, worker, now, reply } => run!(reply, self.use_token(&token, &worker, now)),
            Op::SetDrain { worker, drained, reply } => run!(reply, self.set_drain(&worker, drained)),
        }
    }

    fn meta(&mut self, job_seq: i64) -> Result<Arc<JobMeta>, StoreError> {
        if let Some(m) = self.jobs.get(&job_seq) {
            return Ok(m.clone());
        }
        let (id, is_array, blob): (String, bool, Vec<u8>) = self.conn.query_row(
            "SELECT id, is_array, spec FROM jobs WHERE seq = ?1",
            [job_seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let spec: JobSpec = berth_shared::codec::decode(&blob).map_err(|_| StoreError::Corrupt { job: id.clone() })?;
        let id: JobId = id.parse().map_err(|_| StoreError::Corrupt { job: id.clone() })?;
        if self.jobs.len() > 100_000 {
            self.jobs.clear();
        }
        let m = Arc::new(JobMeta { id, is_array, spec: Arc::new(spec) });
        self.jobs.insert(job_seq, m.clone());
        Ok(m)
    }

    fn counts(&self, job_seq: i64) -> Result<(JobId, Counts), StoreError> {
        let row = self.conn.query_row(
            "SELECT id, n_pending, n_queued, n_running, n_succeeded, n_failed, n_cancelled, n_timed_out, n_rejected, n_frozen FROM jobs WHERE seq = ?1",
            [job_seq],
            |r| {
                let id: String = r.get(0)?;
                let c = Counts {
                    pending_approval: r.get::<_, i64>(1)? as u64,
                    queued: r.get::<_, i64>(2)? as u64,
                    running: r.get::<_, i64>(3)? as u64,
                    succeeded: r.get::<_, i64>(4)? as u64,
                    failed: r.get::<_, i64>(5)? as u64,
                    cancelled: r.get::<_, i64>(6)? as u64,
                    timed_out: r.get::<_, i64>(7)? as u64,
                    rejected: r.get::<_, i64>(8)? as u64,
                    frozen: r.get::<_, i64>(9)? as u64,
                };
                Ok((id, c))
            },
        )?;
        let id = row.0.parse().map_err(|_| StoreError::Corrupt { job: row.0.clone() })?;
        Ok((id, row.1))
    }

    /// Moves `n` tasks of a job between states in its counts, and its aggregate state.
    fn shift(&self, job_seq: i64, from: JobState, to: JobState, n: u64, now: DateTime<Utc>, s: &mut Scratch) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let (_, mut c) = self.counts(job_seq)?;
        c.shift(from, to, n);
        let state = c.aggregate();
        let ended = if c.unfinished() == 0 { Some(ms(now)) } else { None };
        self.conn.execute(
            "UPDATE jobs SET n_pending = ?1, n_queued = ?2, n_running = ?3, n_succeeded = ?4, n_failed = ?5, n_cancelled = ?6,
                 n_timed_out = ?7, n_rejected = ?8, n_frozen = ?9, state = ?10, ended_at = COALESCE(ended_at, ?11) WHERE seq = ?12",
            params![
                c.pending_approval as i64,
                c.queued as i64,
                c.running as i64,
                c.succeeded as i64,
                c.failed as i64,
                c.cancelled as i64,
                c.timed_out as i64,
                c.rejected as i64,
                c.frozen as i64,
                state.as_str(),
                ended,
                job_seq
            ],
        )?;
        s.dirty.insert(job_seq);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn event(&self, job_seq: i64, idx: Option<i64>, now: DateTime<Utc>, state: JobState, attempt: u32, worker: Option<&str>, reason: Option<&str>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO events(job_seq, idx, time, state, attempt, worker, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
            .execute(params![job_seq, idx, ms(now), state.as_str(), attempt, worker, reason])?;
        Ok(())
    }

    fn task_index(meta: &JobMeta, idx: i64) -> Option<u32> {
        meta.is_array.then_some(idx as u32)
    }

    fn submit(&mut self, spec: JobSpec, owner: &str, key: uuid::Uuid, now: DateTime<Utc>, s: &mut Scratch) -> Result<Submitted, StoreError> {
        let key = key.to_string();
        let existing: Option<(String, i64, i64)> = self
            .conn
            .query_row("SELECT id, idx_start, idx_end FROM jobs WHERE owner = ?1 AND idem = ?2", params![owner, key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if let Some((id, a, b)) = existing {
            let job = id.parse().map_err(|_| StoreError::Corrupt { job: id.clone() })?;
            return Ok(Submitted { job, tasks: (b - a + 1) as u64, duplicate: true });
        }
        spec.validate().map_err(invalid)?;
        let job = JobId::new();
        let (start, end, is_array) = match spec.array {
            Some(r) => (i64::from(r.start), i64::from(r.end), true),
            None => (0, 0, false),
        };
        let tasks = spec.task_count();
        let blob = berth_shared::codec::encode(&spec).map_err(|_| invalid("the job spec is too large"))?;
        self.conn.execute(
            "INSERT INTO jobs(id, name, owner, account, idem, spec, is_array, idx_start, idx_end, next_idx, priority, max_attempts, state, n_queued, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8, ?10, ?11, 'queued', ?12, ?13)",
            params![
                job.to_string(),
                spec.name,
                owner,
                spec.account,
                key,
                &blob[4..],
                is_array,
                start,
                end,
                spec.priority,
                spec.max_attempts,
                tasks as i64,
                ms(now)
            ],
        )?;
        let seq = self.conn.last_insert_rowid();
        let what = if is_array { format!("submitted by {owner}: array {start}-{end} ({tasks} tasks)") } else { format!("submitted by {owner}") };
        self.event(seq, None, now, JobState::Queued, 0, None, Some(&what))?;
        s.dirty.insert(seq);
        s.work = true;
        Ok(Submitted { job, tasks, duplicate: false })
    }

    fn drained(&self, worker: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT drained FROM workers WHERE name = ?1")?
            .query_row([worker], |r| r.get::<_, bool>(0))
            .optional()?
            .unwrap_or(false))
    }

    fn claim(&mut self, worker: &str, n: u32, caps: &WorkerCaps, now: DateTime<Utc>, ttl: Duration, s: &mut Scratch) -> Result<Vec<Assignment>, StoreError> {
        let mut out = Vec::new();
        if n == 0 || self.drained(worker)? {
            return Ok(out);
        }
        let expires = ms(lease::expires_at(now, ttl));
        // Re-queued tasks first: they have waited longest.
        let requeued: Vec<(i64, i64, u32)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT t.job_seq, t.idx, t.attempt FROM tasks t JOIN jobs j ON j.seq = t.job_seq
                 WHERE t.state = 'queued' ORDER BY j.priority DESC, t.job_seq, t.idx LIMIT 256",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (job_seq, idx, attempt) in requeued {
            if out.len() as u32 >= n {
                break;
            }
            let meta = self.meta(job_seq)?;
            if !caps.can_run(&meta.spec) {
                continue;
            }
            let lease = LeaseId::new();
            self.conn.prepare_cached(
                "UPDATE tasks SET state = 'running', lease = ?1, worker = ?2, lease_expires = ?3, started_at = ?4, ended_at = NULL,
                     exit_code = NULL, runtime_ms = NULL, reason = NULL WHERE job_seq = ?5 AND idx = ?6",
            )?
            .execute(params![lease.to_string(), worker, expires, ms(now), job_seq, idx])?;
            self.event(job_seq, Some(idx).filter(|_| meta.is_array), now, JobState::Running, attempt, Some(worker), None)?;
            self.shift(job_seq, JobState::Queued, JobState::Running, 1, now, s)?;
            out.push(Assignment { lease, job: meta.id, index: Self::task_index(&meta, idx), attempt, spec: (*meta.spec).clone() });
        }
        if out.len() as u32 >= n {
            return Ok(out);
        }
        // Then unclaimed tasks, from each job's cursor.
        let candidates: Vec<(i64, i64, i64)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT seq, next_idx, idx_end FROM jobs WHERE next_idx <= idx_end ORDER BY priority DESC, seq LIMIT 256",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (job_seq, next, end) in candidates {
            let want = i64::from(n) - out.len() as i64;
            if want <= 0 {
                break;
            }
            let meta = self.meta(job_seq)?;
            if !caps.can_run(&meta.spec) {
                continue;
            }
            let take = want.min(end - next + 1);
            let mut claimed = 0u64;
            for idx in next..next + take {
                let lease = LeaseId::new();
                let inserted = self
                    .conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO tasks(job_seq, idx, state, attempt, lease, worker, lease_expires, started_at)
                         VALUES (?1, ?2, 'running', 1, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![job_seq, idx, lease.to_string(), worker, expires, ms(now)])?;
                if inserted == 0 {
                    // Already has a row (cancelled on its own before it ran).
                    continue;
                }
                self.event(job_seq, Some(idx).filter(|_| meta.is_array), now, JobState::Running, 1, Some(worker), None)?;
                claimed += 1;
                out.push(Assignment { lease, job: meta.id, index: Self::task_index(&meta, idx), attempt: 1, spec: (*meta.spec).clone() });
            }
            self.conn
                .prepare_cached("UPDATE jobs SET next_idx = ?1 WHERE seq = ?2")?
                .execute(params![next + take, job_seq])?;
            self.shift(job_seq, JobState::Queued, JobState::Running, claimed, now, s)?;
        }
        Ok(out)
    }

    fn finish(&mut self, worker: &str, lease: LeaseId, o: &Outcome, now: DateTime<Utc>, s: &mut Scratch) -> Result<FinishVerdict, StoreError> {
        let row: Option<(i64, i64, String, u32, Option<String>)> = self
            .conn
            .prepare_cached("SELECT job_seq, idx, state, attempt, worker FROM tasks WHERE lease = ?1")?
            .query_row([lease.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .optional()?;
        let Some((job_seq, idx, state, attempt, owner)) = row else {
            return Ok(FinishVerdict::Stale);
        };
        if owner.as_deref() != Some(worker) {
            return Ok(FinishVerdict::Stale);
        }
        let meta = self.meta(job_seq)?;
        let index = Self::task_index(&meta, idx);
        let state = state_of(&state);
        let reason = outcome_reason(o, meta.spec.max_runtime_ms);
        let mut ended_as = state;
        let verdict = if state == JobState::Running {
            let to = o.final_state();
            ended_as = to;
            self.conn.prepare_cached(
                "UPDATE tasks SET state = ?1, exit_code = ?2, ended_at = ?3, runtime_ms = ?4, reason = ?5 WHERE job_seq = ?6 AND idx = ?7",
            )?
            .execute(params![to.as_str(), o.exit_code, ms(now), o.runtime_ms as i64, reason, job_seq, idx])?;
            self.event(job_seq, index.map(i64::from), now, to, attempt, Some(worker), reason.as_deref())?;
            self.shift(job_seq, JobState::Running, to, 1, now, s)?;
            FinishVerdict::Recorded
        } else if state.is_terminal() {
            // Cancelled while running: keep the state, record what the attempt did.
            self.conn
                .prepare_cached("UPDATE tasks SET exit_code = ?1, runtime_ms = ?2 WHERE job_seq = ?3 AND idx = ?4")?
                .execute(params![o.exit_code, o.runtime_ms as i64, job_seq, idx])?;
            FinishVerdict::AfterCancel
        } else {
            return Ok(FinishVerdict::Stale);
        };
        self.expected_seq.remove(&(lease, OutStream::Stdout));
        self.expected_seq.remove(&(lease, OutStream::Stderr));
        s.notices.push(Notice::TaskEnded { job: meta.id, index, attempt, state: ended_as });
        Ok(verdict)
    }

    fn renew(&mut self, worker: &str, leases: &[LeaseId], now: DateTime<Utc>, ttl: Duration) -> Result<Vec<LeaseId>, StoreError> {
        let expires = ms(lease::expires_at(now, ttl));
        let mut stale = Vec::new();
        for l in leases {
            let n = self
                .conn
                .prepare_cached("UPDATE tasks SET lease_expires = ?1 WHERE lease = ?2 AND worker = ?3 AND state = 'running'")?
                .execute(params![expires, l.to_string(), worker])?;
            if n == 0 {
                stale.push(*l);
            }
        }
        Ok(stale)
    }

    fn reconcile(&mut self, worker: &str, held: &[LeaseId], now: DateTime<Utc>, ttl: Duration, s: &mut Scratch) -> Result<Reconciled, StoreError> {
        self.conn.execute("INSERT OR IGNORE INTO workers(name, enrolled_at) VALUES (?1, ?2)", params![worker, ms(now)])?;
        let stale = self.renew(worker, held, now, ttl)?;
        // Tasks we think run there that the worker no longer has: lost with its restart.
        let held: HashSet<String> = held.iter().map(|l| l.to_string()).collect();
        let running: Vec<(i64, i64, u32, String)> = {
            let mut st = self.conn.prepare_cached("SELECT job_seq, idx, attempt, lease FROM tasks WHERE worker = ?1 AND state = 'running'")?;
            let rows = st.query_map([worker], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut lost = 0;
        for (job_seq, idx, attempt, l) in running {
            if held.contains(&l) {
                continue;
            }
            lost += 1;
            self.lose(job_seq, idx, attempt, worker, now, &format!("lease_lost: worker {worker} came back without this attempt"), s)?;
        }
        Ok(Reconciled { stale, lost })
    }

    /// A running attempt is gone: re-queue its task or, out of attempts, fail it.
    #[allow(clippy::too_many_arguments)]
    fn lose(&mut self, job_seq: i64, idx: i64, attempt: u32, worker: &str, now: DateTime<Utc>, why: &str, s: &mut Scratch) -> Result<bool, StoreError> {
        let meta = self.meta(job_seq)?;
        let index = Self::task_index(&meta, idx).map(i64::from);
        match lease::on_expiry(attempt, meta.spec.max_attempts) {
            Expiry::Requeue { next_attempt } => {
                self.conn
                    .prepare_cached(
                        "UPDATE tasks SET state = 'queued', attempt = ?1, lease = NULL, worker = NULL, lease_expires = NULL, reason = ?2
                         WHERE job_seq = ?3 AND idx = ?4",
                    )?
                    .execute(params![next_attempt, why, job_seq, idx])?;
                self.event(job_seq, index, now, JobState::Queued, next_attempt, Some(worker), Some(why))?;
                self.shift(job_seq, JobState::Running, JobState::Queued, 1, now, s)?;
                s.work = true;
                Ok(true)
            }
            Expiry::Fail => {
                let why = format!("{why}; out of attempts ({attempt} of {})", meta.spec.max_attempts);
                self.conn
                    .prepare_cached("UPDATE tasks SET state = 'failed', lease = NULL, ended_at = ?1, reason = ?2 WHERE job_seq = ?3 AND idx = ?4")?
                    .execute(params![ms(now), why, job_seq, idx])?;
                self.event(job_seq, index, now, JobState::Failed, attempt, Some(worker), Some(&why))?;
                self.shift(job_seq, JobState::Running, JobState::Failed, 1, now, s)?;
                s.notices.push(Notice::TaskEnded { job: meta.id, index: index.map(|i| i as u32), attempt, state: JobState::Failed });
                Ok(false)
            }
        }
    }

    fn expire(&mut self, now: DateTime<Utc>, s: &mut Scratch) -> Result<Vec<Expired>, StoreError> {
        let due: Vec<(i64, i64, u32, String, String)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT job_seq, idx, attempt, lease, worker FROM tasks WHERE state = 'running' AND lease_expires <= ?1 LIMIT 10000",
            )?;
            let rows = st.query_map([ms(now)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(due.len());
        for (job_seq, idx, attempt, l, worker) in due {
            let why = format!("lease_lost: worker {worker} stopped renewing the lease");
            let requeued = self.lose(job_seq, idx, attempt, &worker, now, &why, s)?;
            let meta = self.meta(job_seq)?;
            out.push(Expired {
                job: meta.id,
                index: Self::task_index(&meta, idx),
                lease: l.parse().map_err(|_| StoreError::Corrupt { job: meta.id.to_string() })?,
                worker,
                requeued,
            });
        }
        Ok(out)
    }

    fn restart_leases(&mut self, now: DateTime<Utc>, ttl: Duration) -> Result<u64, StoreError> {
        let floor = ms(lease::after_restart(DateTime::<Utc>::MIN_UTC, now, ttl));
        let n = self.conn.execute(
            "UPDATE tasks SET lease_expires = MAX(lease_expires, ?1) WHERE state = 'running'",
            [floor],
        )?;
        Ok(n as u64)
    }

    fn resolve(&self, sel: &JobSelector) -> Result<(i64, JobId), StoreError> {
        resolve(&self.conn, sel)
    }

    fn cancel(&mut self, sel: &JobSelector, reason: &str, now: DateTime<Utc>, s: &mut Scratch) -> Result<(JobId, u64, Vec<KillOrder>), StoreError> {
        let (job_seq, job) = self.resolve(sel)?;
        let meta = self.meta(job_seq)?;
        let (next, start, end): (i64, i64, i64) =
            self.conn.query_row("SELECT next_idx, idx_start, idx_end FROM jobs WHERE seq = ?1", [job_seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut kills = Vec::new();
        let mut n = 0u64;
        let one = match sel.index {
            Some(i) if !meta.is_array => return Err(invalid(format!("job {job} is not an array: drop the `:{i}`"))),
            Some(i) if i64::from(i) < start || i64::from(i) > end => {
                return Err(StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("job {job} has no task {i} (its indices are {start}-{end})"))))
            }
            Some(i) => Some(i64::from(i)),
            None => None,
        };
        // Unclaimed tasks behind the cursor.
        match one {
            None if next <= end => {
                let k = (end - next + 1) as u64;
                self.conn.execute("UPDATE jobs SET next_idx = ?1 WHERE seq = ?2", params![end + 1, job_seq])?;
                self.shift(job_seq, JobState::Queued, JobState::Cancelled, k, now, s)?;
                if meta.is_array {
                    self.event(job_seq, None, now, JobState::Cancelled, 0, None, Some(&format!("{reason} ({k} tasks had not started)")))?;
                } else {
                    self.event(job_seq, None, now, JobState::Cancelled, 1, None, Some(reason))?;
                }
                n += k;
            }
            Some(i) if i >= next => {
                let inserted = self.conn.execute(
                    "INSERT OR IGNORE INTO tasks(job_seq, idx, state, attempt, ended_at, reason) VALUES (?1, ?2, 'cancelled', 1, ?3, ?4)",
                    params![job_seq, i, ms(now), reason],
                )?;
                if inserted > 0 {
                    self.event(job_seq, Some(i), now, JobState::Cancelled, 1, None, Some(reason))?;
                    self.shift(job_seq, JobState::Queued, JobState::Cancelled, 1, now, s)?;
                    n += 1;
                }
            }
            _ => {}
        }
        // Materialised tasks that are queued or running.
        let live: Vec<(i64, String, u32, Option<String>, Option<String>)> = {
            let mut st = self.conn.prepare(
                "SELECT idx, state, attempt, worker, lease FROM tasks WHERE job_seq = ?1 AND state IN ('queued', 'running') AND (?2 IS NULL OR idx = ?2)",
            )?;
            let rows = st.query_map(params![job_seq, one], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (idx, state, attempt, worker, l) in live {
            let from = state_of(&state);
            self.conn.execute(
                "UPDATE tasks SET state = 'cancelled', ended_at = ?1, reason = ?2 WHERE job_seq = ?3 AND idx = ?4",
                params![ms(now), reason, job_seq, idx],
            )?;
            self.event(job_seq, Self::task_index(&meta, idx).map(i64::from), now, JobState::Cancelled, attempt, worker.as_deref(), Some(reason))?;
            self.shift(job_seq, from, JobState::Cancelled, 1, now, s)?;
            n += 1;
            if let (JobState::Running, Some(w), Some(l)) = (from, worker, l.and_then(|l| l.parse().ok())) {
                kills.push(KillOrder { worker: w, lease: l });
            } else {
                s.notices.push(Notice::TaskEnded { job, index: Self::task_index(&meta, idx), attempt, state: JobState::Cancelled });
            }
        }
        if n == 0 {
            let state: String = self.conn.query_row("SELECT state FROM jobs WHERE seq = ?1", [job_seq], |r| r.get(0))?;
            let what = match sel.index {
                Some(i) => format!("task {i} of job {job}"),
                None => format!("job {job}"),
            };
            return Err(invalid(format!("{what} has already ended ({state}); nothing to cancel")));
        }
        Ok((job, n, kills))
    }

    fn use_token(&mut self, token: &str, worker: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        let hash = token_hash(token);
        let row: Option<(String, i64, Option<i64>)> = self
            .conn
            .query_row("SELECT role, expires_at, used_at FROM tokens WHERE hash = ?1", [&hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let refuse = |m: String| StoreError::Api(ApiError::new(ErrorKind::Refused, m));
        match row {
            None => Err(refuse("the join token is not valid: create one with `berth-coordinator token create --role worker`".into())),
            Some((_, _, Some(_))) => Err(refuse("the join token has already been used: a token enrols one worker; create a new one".into())),
            Some((_, exp, None)) if exp <= ms(now) => Err(refuse(format!("the join token expired at {}: create a new one", from_ms(exp).to_rfc3339()))),
            Some((role, _, None)) if role != "worker" => Err(refuse(format!("the join token is for role {role}, not worker"))),
            Some(_) => {
                self.conn.execute("UPDATE tokens SET used_at = ?1, used_by = ?2 WHERE hash = ?3", params![ms(now), worker, hash])?;
                self.conn.execute(
                    "INSERT INTO workers(name, enrolled_at) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET enrolled_at = ?2",
                    params![worker, ms(now)],
                )?;
                Ok(())
            }
        }
    }

    fn set_drain(&mut self, worker: &str, drained: bool) -> Result<bool, StoreError> {
        let n = self.conn.execute("UPDATE workers SET drained = ?1 WHERE name = ?2", params![drained, worker])?;
        if n == 0 {
            return Err(StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("no worker named `{worker}`: `berth workers` lists them"))));
        }
        Ok(drained)
    }

    fn append_logs(&mut self, worker: &str, chunks: Vec<LogChunk>, s: &mut Scratch) -> Result<Vec<ChunkVerdict>, StoreError> {
        let mut verdicts = Vec::with_capacity(chunks.len());
        let mut owners: HashMap<LeaseId, Option<(i64, i64, u32)>> = HashMap::new();
        for c in chunks {
            let owner = match owners.get(&c.lease) {
                Some(o) => *o,
                None => {
                    let o: Option<(i64, i64, u32)> = self
                        .conn
                        .prepare_cached("SELECT job_seq, idx, attempt FROM tasks WHERE lease = ?1 AND worker = ?2")?
                        .query_row(params![c.lease.to_string(), worker], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()?;
                    owners.insert(c.lease, o);
                    o
                }
            };
            let Some((job_seq, idx, attempt)) = owner else {
                verdicts.push(ChunkVerdict::StaleLease);
                continue;
            };
            let key = (c.lease, c.stream);
            let expected = match self.expected_seq.get(&key) {
                Some(e) => *e,
                None => {
                    let max: Option<i64> = self
                        .conn
                        .prepare_cached("SELECT MAX(seq) FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3 AND stream = ?4")?
                        .query_row(params![job_seq, idx, attempt, stream_code(c.stream)], |r| r.get(0))?;
                    max.map_or(1, |m| m as u64 + 1)
                }
            };
            if c.seq < expected {
                verdicts.push(ChunkVerdict::Duplicate);
                continue;
            }
            if c.seq > expected {
                verdicts.push(ChunkVerdict::OutOfOrder { expected });
                continue;
            }
            self.conn
                .prepare_cached("INSERT INTO logs(job_seq, idx, attempt, stream, seq, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
                .execute(params![job_seq, idx, attempt, stream_code(c.stream), c.seq as i64, c.data])?;
            self.expected_seq.insert(key, expected + 1);
            let meta = self.meta(job_seq)?;
            s.notices.push(Notice::Output {
                job: meta.id,
                index: Self::task_index(&meta, idx),
                attempt,
                stream: c.stream,
                seq: c.seq,
                data: Arc::new(c.data),
            });
            verdicts.push(ChunkVerdict::Stored);
        }
        if self.expected_seq.len() > 100_000 {
            self.expected_seq.clear();
        }
        Ok(verdicts)
    }
}

fn outcome_reason(o: &Outcome, max_runtime_ms: Option<u64>) -> Option<String> {
    if let Some(e) = &o.error {
        return Some(e.clone());
    }
    if o.timed_out {
        let limit = max_runtime_ms.map(|m| berth_shared::duration::format_duration(Duration::from_millis(m))).unwrap_or_default();
        return Some(format!("max runtime {limit} exceeded; the process group was killed"));
    }
    match (o.signal, o.exit_code) {
        (Some(sig), _) => Some(format!("killed by signal {sig}")),
        (None, Some(0)) => None,
        (None, Some(c)) => Some(format!("exit code {c}")),
        (None, None) => Some("ended without an exit code".into()),
    }
}

/// Tokens are stored hashed: the database never holds a usable token.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.trim().as_bytes()))
}

/// Creates a one-time join token (the `token create` command), returning it.
pub fn create_token(conn: &Connection, role: &str, ttl: Duration, now: DateTime<Utc>) -> Result<String, StoreError> {
    use rand::RngCore;
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = format!("bjt_{}", hex::encode(raw));
    conn.execute(
        "INSERT INTO tokens(hash, role, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        params![token_hash(&token), role, ms(now), ms(lease::expires_at(now, ttl))],
    )?;
    Ok(token)
}

fn resolve(conn: &Connection, sel: &JobSelector) -> Result<(i64, JobId), StoreError> {
    let hi = format!("{}~", sel.prefix);
    let rows: Vec<(i64, String)> = {
        let mut st = conn.prepare_cached("SELECT seq, id FROM jobs WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT 6")?;
        let r = st.query_map(params![sel.prefix, hi], |r| Ok((r.get(0)?, r.get(1)?)))?;
        r.collect::<Result<_, _>>()?
    };
    match rows.as_slice() {
        [] => Err(not_found(sel)),
        [(seq, id)] => Ok((*seq, id.parse().map_err(|_| StoreError::Corrupt { job: id.clone() })?)),
        many => {
            let ids: Vec<_> = many.iter().take(5).map(|(_, id)| id.as_str()).collect();
            Err(StoreError::Api(ApiError::new(
                ErrorKind::Ambiguous,
                format!("`{}` matches several jobs ({}…): give more characters", sel.prefix, ids.join(", ")),
            )))
        }
    }
}

/// A read-only view of the store for queries.
pub struct SqliteReader {
    conn: Connection,
}

impl SqliteReader {
    pub fn open(path: &Path) -> Result<SqliteReader, StoreError> {
        let conn = open_connection(path)?;
        Ok(SqliteReader { conn })
    }

    fn spec(&self, job_seq: i64) -> Result<JobSpec, StoreError> {
        let (id, blob): (String, Vec<u8>) = self.conn.query_row("SELECT id, spec FROM jobs WHERE seq = ?1", [job_seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
        berth_shared::codec::decode(&blob).map_err(|_| StoreError::Corrupt { job: id })
    }

    fn task(&self, job_seq: i64, idx: i64, is_array: bool) -> Result<Option<TaskStatus>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT state, attempt, worker, exit_code, started_at, ended_at, runtime_ms, reason FROM tasks WHERE job_seq = ?1 AND idx = ?2")?
            .query_row(params![job_seq, idx], |r| {
                Ok(TaskStatus {
                    index: is_array.then_some(idx as u32),
                    state: state_of(&r.get::<_, String>(0)?),
                    attempt: r.get(1)?,
                    worker: r.get(2)?,
                    exit_code: r.get(3)?,
                    started_at: r.get::<_, Option<i64>>(4)?.map(from_ms),
                    ended_at: r.get::<_, Option<i64>>(5)?.map(from_ms),
                    runtime_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
                    reason: r.get(7)?,
                })
            })
            .optional()?)
    }

    fn events(&self, job_seq: i64, idx: Option<i64>, all_tasks: bool) -> Result<Vec<Event>, StoreError> {
        let sql = if all_tasks {
            "SELECT idx, time, state, attempt, worker, reason FROM (SELECT rowid, * FROM events WHERE job_seq = ?1 ORDER BY rowid DESC LIMIT 200) ORDER BY rowid"
        } else {
            "SELECT idx, time, state, attempt, worker, reason FROM events WHERE job_seq = ?1 AND (idx IS NULL OR idx = ?2) ORDER BY rowid"
        };
        let mut st = self.conn.prepare_cached(sql)?;
        let bind_idx = idx.unwrap_or(-1);
        let map = |r: &rusqlite::Row<'_>| {
            Ok(Event {
                index: r.get::<_, Option<i64>>(0)?.map(|i| i as u32),
                time: from_ms(r.get(1)?),
                state: state_of(&r.get::<_, String>(2)?),
                attempt: r.get(3)?,
                worker: r.get(4)?,
                reason: r.get(5)?,
            })
        };
        let rows: Vec<Event> = if all_tasks {
            st.query_map([job_seq], map)?.collect::<Result<_, _>>()?
        } else {
            st.query_map(params![job_seq, bind_idx], map)?.collect::<Result<_, _>>()?
        };
        Ok(rows)
    }
}

const SUMMARY_COLS: &str = "seq, id, name, state, owner, account, created_at, ended_at, idx_start, idx_end,
     n_pending, n_queued, n_running, n_succeeded, n_failed, n_cancelled, n_timed_out, n_rejected, n_frozen";

fn summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, JobSummary)> {
    let id: String = r.get(1)?;
    let counts = Counts {
        pending_approval: r.get::<_, i64>(10)? as u64,
        queued: r.get::<_, i64>(11)? as u64,
        running: r.get::<_, i64>(12)? as u64,
        succeeded: r.get::<_, i64>(13)? as u64,
        failed: r.get::<_, i64>(14)? as u64,
        cancelled: r.get::<_, i64>(15)? as u64,
        timed_out: r.get::<_, i64>(16)? as u64,
        rejected: r.get::<_, i64>(17)? as u64,
        frozen: r.get::<_, i64>(18)? as u64,
    };
    Ok((
        r.get(0)?,
        JobSummary {
            id: id.parse().unwrap_or_else(|_| JobId(uuid::Uuid::nil())),
            name: r.get(2)?,
            state: state_of(&r.get::<_, String>(3)?),
            owner: r.get(4)?,
            account: r.get(5)?,
            submitted_at: from_ms(r.get(6)?),
            ended_at: r.get::<_, Option<i64>>(7)?.map(from_ms),
            tasks: (r.get::<_, i64>(9)? - r.get::<_, i64>(8)? + 1) as u64,
            counts,
            reason: None,
        },
    ))
}

impl Reader for SqliteReader {
    fn resolve(&self, sel: &JobSelector) -> Result<(i64, JobId), StoreError> {
        resolve(&self.conn, sel)
    }

    fn summary(&self, job_seq: i64) -> Result<JobSummary, StoreError> {
        let sql = format!("SELECT {SUMMARY_COLS} FROM jobs WHERE seq = ?1");
        Ok(self.conn.prepare_cached(&sql)?.query_row([job_seq], summary_row)?.1)
    }

    fn status(&self, sel: &JobSelector) -> Result<JobStatus, StoreError> {
        let (job_seq, job) = self.resolve(sel)?;
        let summary = self.summary(job_seq)?;
        let spec = self.spec(job_seq)?;
        let is_array = spec.array.is_some();
        let (task, events) = match (is_array, sel.index) {
            (false, Some(i)) => return Err(invalid(format!("job {job} is not an array: drop the `:{i}`"))),
            (false, None) => {
                let t = self.task(job_seq, 0, false)?.unwrap_or(TaskStatus {
                    index: None,
                    state: summary.state,
                    attempt: 1,
                    worker: None,
                    exit_code: None,
                    started_at: None,
                    ended_at: summary.ended_at,
                    runtime_ms: None,
                    reason: None,
                });
                (Some(t), self.events(job_seq, None, false)?)
            }
            (true, Some(i)) => {
                let r = spec.array.unwrap_or(berth_shared::job::ArrayRange { start: 0, end: 0 });
                if i < r.start || i > r.end {
                    return Err(StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("job {job} has no task {i} (its indices are {}-{})", r.start, r.end))));
                }
                let t = self.task(job_seq, i64::from(i), true)?.unwrap_or(TaskStatus {
                    index: Some(i),
                    state: if summary.state.is_terminal() { summary.state } else { JobState::Queued },
                    attempt: 1,
                    worker: None,
                    exit_code: None,
                    started_at: None,
                    ended_at: None,
                    runtime_ms: None,
                    reason: None,
                });
                (Some(t), self.events(job_seq, Some(i64::from(i)), false)?)
            }
            (true, None) => (None, self.events(job_seq, None, true)?),
        };
        Ok(JobStatus { summary, spec, task, events })
    }

    fn list(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobSummary>, StoreError> {
        let rows: Vec<JobSummary> = match state {
            Some(s) => {
                let sql = format!("SELECT {SUMMARY_COLS} FROM jobs WHERE state = ?1 ORDER BY seq DESC LIMIT ?2");
                let mut st = self.conn.prepare_cached(&sql)?;
                let r = st.query_map(params![s.as_str(), limit], summary_row)?;
                r.map(|x| x.map(|(_, s)| s)).collect::<Result<_, _>>()?
            }
            None => {
                let sql = format!("SELECT {SUMMARY_COLS} FROM jobs ORDER BY seq DESC LIMIT ?1");
                let mut st = self.conn.prepare_cached(&sql)?;
                let r = st.query_map(params![limit], summary_row)?;
                r.map(|x| x.map(|(_, s)| s)).collect::<Result<_, _>>()?
            }
        };
        Ok(rows)
    }

    fn logs(&self, job_seq: i64, index: Option<u32>, attempt: Option<u32>, after: (u64, u64)) -> Result<LogRead, StoreError> {
        let idx = i64::from(index.unwrap_or(0));
        let task: Option<(String, u32)> = self
            .conn
            .prepare_cached("SELECT state, attempt FROM tasks WHERE job_seq = ?1 AND idx = ?2")?
            .query_row(params![job_seq, idx], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((state, current)) = task else {
            // Not started yet (or cancelled before it ran).
            let job_state: String = self.conn.query_row("SELECT state FROM jobs WHERE seq = ?1", [job_seq], |r| r.get(0))?;
            let st = state_of(&job_state);
            return Ok(LogRead { attempt: 1, chunks: Vec::new(), ended: st.is_terminal(), task_state: Some(if st.is_terminal() { st } else { JobState::Queued }) });
        };
        let state = state_of(&state);
        let attempt = attempt.unwrap_or(current);
        let mut st = self.conn.prepare_cached(
            "SELECT stream, seq, data FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3
             AND ((stream = 0 AND seq > ?4) OR (stream = 1 AND seq > ?5)) ORDER BY rowid LIMIT 512",
        )?;
        let chunks: Vec<(OutStream, u64, Vec<u8>)> = st
            .query_map(params![job_seq, idx, attempt, after.0 as i64, after.1 as i64], |r| {
                Ok((stream_of(r.get(0)?), r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let ended = attempt < current || state.is_terminal();
        Ok(LogRead { attempt, chunks, ended, task_state: Some(state) })
    }

    fn exit_code(&self, job_seq: i64) -> Result<Option<i32>, StoreError> {
        let is_array: bool = self.conn.query_row("SELECT is_array FROM jobs WHERE seq = ?1", [job_seq], |r| r.get(0))?;
        if !is_array {
            return Ok(self
                .conn
                .query_row("SELECT exit_code, state FROM tasks WHERE job_seq = ?1 AND idx = 0", [job_seq], |r| {
                    let code: Option<i32> = r.get(0)?;
                    let state: String = r.get(1)?;
                    Ok(code.or(if state == "succeeded" { Some(0) } else { None }))
                })
                .optional()?
                .flatten());
        }
        let (c, _) = {
            let sql = format!("SELECT {SUMMARY_COLS} FROM jobs WHERE seq = ?1");
            let s = self.conn.query_row(&sql, [job_seq], summary_row)?.1;
            (s.counts, s.state)
        };
        if c.succeeded == c.total() {
            return Ok(Some(0));
        }
        Ok(self
            .conn
            .query_row(
                "SELECT exit_code FROM tasks WHERE job_seq = ?1 AND state != 'succeeded' AND exit_code IS NOT NULL AND exit_code != 0 ORDER BY idx LIMIT 1",
                [job_seq],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn workers(&self) -> Result<Vec<(String, bool)>, StoreError> {
        let mut st = self.conn.prepare_cached("SELECT name, drained FROM workers ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn is_drained(&self, worker: &str) -> Result<bool, StoreError> {
        Ok(self.conn.query_row("SELECT drained FROM workers WHERE name = ?1", [worker], |r| r.get(0)).optional()?.unwrap_or(false))
    }
}
