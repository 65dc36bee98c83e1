//! The store's logic, written once over the `Db` seam and run on SQLite (embedded, one
//! file, WAL, `synchronous=FULL`) or PostgreSQL (several coordinators on one database).
//!
//! Writes arrive as batches of `Op`s from the writer thread and are applied in one
//! transaction with a savepoint per operation, so one failing operation does not undo
//! the others. Task counts are kept on the job row; a batch collects their changes and
//! applies them at the end as increments, in job order, so two coordinators never lose
//! each other's updates. When PostgreSQL reports a deadlock or a serialisation failure
//! the whole batch is rolled back and applied again; the callers never see it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::ids::{JobId, JobSelector, LeaseId};
use berth_shared::job::{Counts, Event, JobSpec, JobState, Outcome};
use berth_shared::wire::{ApiError, Assignment, ErrorKind, JobStatus, JobSummary, OutStream, TaskStatus};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::sql::{p, Db, Row, Val};
use super::*;
use crate::lease::{self, Expiry};
use crate::ledger::{self, Caps, Usage};

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
    StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("no job matches `{}`: `berth list` shows the jobs", sel.prefix)))
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

fn lease_of(s: &str, job: &JobId) -> Result<LeaseId, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt { job: job.to_string() })
}

fn decimal(s: &str, job: &str) -> Result<Decimal, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt { job: format!("{job} (amount `{s}`)") })
}

fn refused(msg: impl Into<String>) -> StoreError {
    StoreError::Api(ApiError::new(ErrorKind::Refused, msg))
}

fn job_id(s: &str) -> Result<JobId, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt { job: s.to_string() })
}

/// The PostgreSQL channel on which coordinators tell each other of changes.
pub const CHANNEL: &str = "berth_changes";

/// The column of each state's count, in `JobState::ALL` order.
const COUNT_COLS: [&str; 9] = ["n_pending", "n_queued", "n_running", "n_succeeded", "n_failed", "n_cancelled", "n_timed_out", "n_rejected", "n_frozen"];

fn state_pos(s: JobState) -> usize {
    JobState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

fn counts_from(row: &Row, first: usize) -> Result<Counts, StoreError> {
    let mut c = Counts::default();
    for (i, s) in JobState::ALL.iter().enumerate() {
        *c.slot(*s) = row.u64(first + i)?;
    }
    Ok(c)
}

/// What the writer keeps about a job between batches (immutable facts only, so the
/// cache is right even with other coordinators writing the same database).
struct JobMeta {
    id: JobId,
    is_array: bool,
    spec: Arc<JobSpec>,
    /// The account charged and the month its reservation was made in.
    account: String,
    month: String,
    /// The reserved upper bound of one attempt of one task (zero: nothing reserved).
    attempt_estimate: Decimal,
}

/// A task a claim may take.
#[derive(Clone, Copy)]
enum Candidate {
    Requeued { job_seq: i64, idx: i64, attempt: u32, queued_at: i64 },
    Cursor { job_seq: i64, next: i64, end: i64, queued_at: i64, taken: i64 },
}

impl Candidate {
    fn job_seq(&self) -> i64 {
        match self {
            Candidate::Requeued { job_seq, .. } | Candidate::Cursor { job_seq, .. } => *job_seq,
        }
    }
    fn queued_at(&self) -> i64 {
        match self {
            Candidate::Requeued { queued_at, .. } | Candidate::Cursor { queued_at, .. } => *queued_at,
        }
    }
}

/// Whether this worker may take a task of `spec` now. `Ok` carries the routing reason
/// for the event; `Err(Some(d))` means "not yet: a cheaper pool may still take it, ask
/// again in `d`"; `Err(None)` means "not here".
fn fits(
    spec: &JobSpec,
    caps: &WorkerCaps,
    mine: &crate::pools::Pool,
    pools: &crate::pools::Pools,
    free: Option<&Free>,
    queued_at: i64,
    now: i64,
) -> Result<Option<String>, Option<Duration>> {
    if !caps.can_run(spec) {
        return Err(None);
    }
    if let Some(f) = free {
        if !f.fits(&spec.resources) {
            return Err(None);
        }
    }
    // Routing: a cheaper kind among the job's eligible pools has the first claim until
    // this pool's spill delay has passed.
    let eligible = pools.eligible(&spec.pools).unwrap_or_default();
    let cheaper = eligible.iter().any(|p| p.kind < mine.kind && (p.is_free() || spec.max_runtime_ms.is_some()));
    let waited = Duration::from_millis((now - queued_at).max(0) as u64);
    let delay = Duration::from_secs(mine.spill_after_s);
    if cheaper && waited < delay {
        return Err(Some(delay - waited));
    }
    let kind = format!("{:?}", mine.kind).to_lowercase();
    Ok(Some(if cheaper {
        format!("pool {} ({kind}): waited {:.1}s with no cheaper slot free", mine.name, waited.as_secs_f64())
    } else {
        format!("pool {} ({kind})", mine.name)
    }))
}

/// The reply of one applied operation, sent once the batch's fate is known.
type Pending = Box<dyn FnOnce(&mut Op, bool) + Send>;

/// The per-batch scratch: count changes, notices, wake-ups.
#[derive(Default)]
struct Scratch {
    /// (job, from, to, n), applied as increments at the end of the batch.
    moves: Vec<(i64, JobState, JobState, u64)>,
    /// Jobs whose counts changed other than by `moves` (a submission).
    touched: BTreeSet<i64>,
    notices: Vec<Notice>,
    work: bool,
}

pub struct Store<D: Db> {
    db: D,
    /// With a shared database: this coordinator's name in change notifications, so its
    /// own listener can skip them.
    notify_as: Option<String>,
    pools: SharedPools,
    /// Worker → pool, as each worker last registered.
    worker_pools: HashMap<String, String>,
    jobs: HashMap<i64, Arc<JobMeta>>,
    /// The next expected output sequence per (lease, stream); a hint, checked against
    /// the database whenever a chunk disagrees with it.
    expected_seq: HashMap<(LeaseId, OutStream), u64>,
    /// Where large output chunks go (SQLite only).
    segments: Option<super::segments::Segments>,
}

fn send<T: Send + 'static>(reply: &mut Tx<T>, r: Result<T, StoreError>, committed: bool) {
    let r = if committed { r } else { Err(StoreError::Api(ApiError::new(ErrorKind::Internal, "the job store could not commit; try again"))) };
    if let Some(tx) = reply.take() {
        let _ = tx.send(r);
    }
}

impl<D: Db> Store<D> {
    pub fn new(mut db: D) -> Result<Store<D>, StoreError> {
        super::schema::migrate(&mut db)?;
        let pools = Arc::new(std::sync::RwLock::new(Arc::new(crate::pools::Pools::default())));
        Ok(Store { db, notify_as: None, pools, worker_pools: HashMap::new(), jobs: HashMap::new(), expected_seq: HashMap::new(), segments: None })
    }

    /// Keeps large output chunks in segment files (see `segments`).
    pub fn with_segments(mut self, segments: super::segments::Segments) -> Self {
        self.segments = Some(segments);
        self
    }

    /// The pools whose rates finished attempts are charged at.
    pub fn with_pools(mut self, pools: SharedPools) -> Self {
        self.pools = pools;
        self
    }

    /// Publishes every commit's changes to the other coordinators on the database
    /// (PostgreSQL NOTIFY, delivered when the transaction commits).
    pub fn notify_as(mut self, instance: String) -> Self {
        self.notify_as = Some(instance);
        self
    }

    pub fn db(&mut self) -> &mut D {
        &mut self.db
    }

    /// Applies a batch of operations in one transaction and commits once; retried as a
    /// whole when the database asks for it (deadlock, serialisation failure).
    pub fn apply_batch(&mut self, mut ops: Vec<Op>) -> BatchOutcome {
        const TRIES: u32 = 8;
        for attempt in 1..=TRIES {
            match self.try_batch(&mut ops) {
                Ok((pending, scratch)) => {
                    let replies = ops.into_iter().zip(pending).map(|(mut op, p)| Box::new(move || p(&mut op, true)) as Box<dyn FnOnce() + Send>).collect();
                    return BatchOutcome { notices: scratch.notices, work_available: scratch.work, replies };
                }
                Err(e) if e.is_retryable() && attempt < TRIES => {
                    tracing::debug!(error = %e, attempt, "store batch conflicted with another coordinator; applying it again");
                    std::thread::sleep(Duration::from_millis(u64::from(attempt) * 5));
                }
                Err(e) => {
                    tracing::error!(error = %e, "store batch failed; it is rolled back");
                    break;
                }
            }
        }
        let replies = ops
            .into_iter()
            .map(|mut op| {
                Box::new(move || {
                    fail_op(&mut op);
                }) as Box<dyn FnOnce() + Send>
            })
            .collect();
        BatchOutcome { notices: Vec::new(), work_available: false, replies }
    }

    fn try_batch(&mut self, ops: &mut [Op]) -> Result<(Vec<Pending>, Scratch), StoreError> {
        let mut scratch = Scratch::default();
        let mut pending = Vec::with_capacity(ops.len());
        let begin = self.db.begin();
        self.db.batch(begin)?;
        let r = (|| {
            for op in ops.iter_mut() {
                self.db.batch("SAVEPOINT op")?;
                let marks = (scratch.notices.len(), scratch.moves.len());
                let (p, outcome) = self.apply(op, &mut scratch);
                match outcome {
                    Ok(()) => self.db.batch("RELEASE op")?,
                    Err(e) => {
                        self.db.batch("ROLLBACK TO op; RELEASE op")?;
                        scratch.notices.truncate(marks.0);
                        scratch.moves.truncate(marks.1);
                        self.expected_seq.clear();
                        if let Some(e) = e {
                            return Err(e);
                        }
                    }
                }
                pending.push(p);
            }
            self.flush_counts(&mut scratch)?;
            self.publish(&scratch)?;
            // Output bytes in segments are durable before the rows that point at them.
            if let Some(seg) = self.segments.as_mut() {
                seg.sync().map_err(|source| StoreError::Segment { what: "cannot be synced".into(), source })?;
            }
            self.db.batch("COMMIT")
        })();
        if let Err(e) = r {
            let _ = self.db.batch("ROLLBACK");
            self.expected_seq.clear();
            return Err(e);
        }
        Ok((pending, scratch))
    }

    /// Applies the batch's count changes as increments, one job at a time in job order
    /// (so concurrent coordinators lock job rows in the same order), then sets each
    /// job's aggregate state from the counts as they now stand.
    fn flush_counts(&mut self, s: &mut Scratch) -> Result<(), StoreError> {
        // Ending a job may release or cancel its dependants, which moves counts again.
        for _ in 0..1000 {
            if s.moves.is_empty() && s.touched.is_empty() {
                return Ok(());
            }
            let ended = self.flush_once(s)?;
            for (seq, state) in ended {
                self.release_children(seq, state, s)?;
            }
        }
        Err(StoreError::Api(ApiError::new(ErrorKind::Internal, "dependency chain too long to settle in one batch")))
    }

    /// One pass of `flush_counts`; returns the jobs that have just ended.
    fn flush_once(&mut self, s: &mut Scratch) -> Result<Vec<(i64, JobState)>, StoreError> {
        let mut deltas: BTreeMap<i64, [i64; 9]> = BTreeMap::new();
        for (seq, from, to, n) in s.moves.drain(..) {
            let d = deltas.entry(seq).or_default();
            d[state_pos(from)] -= n as i64;
            d[state_pos(to)] += n as i64;
        }
        for seq in std::mem::take(&mut s.touched) {
            deltas.entry(seq).or_default();
        }
        let set: Vec<String> = COUNT_COLS.iter().enumerate().map(|(i, c)| format!("{c} = {c} + ?{}", i + 1)).collect();
        let sql = format!("UPDATE jobs SET {} WHERE seq = ?10 RETURNING id, state, ended_at, {}", set.join(", "), COUNT_COLS.join(", "));
        let mut ended_now = Vec::new();
        for (seq, d) in deltas {
            let mut params: Vec<Val> = d.iter().map(|v| Val::I64(*v)).collect();
            params.push(Val::I64(seq));
            let row = self.db.query_one(&sql, &params)?;
            let id = job_id(&row.str(0)?)?;
            let counts = counts_from(&row, 3)?;
            let state = counts.aggregate();
            let before = state_of(&row.str(1)?);
            let ended = row.opt_i64(2)?;
            let now_ended = if counts.unfinished() == 0 { ended.or_else(|| Some(ms(Utc::now()))) } else { None };
            if state != before || now_ended != ended {
                self.db.exec("UPDATE jobs SET state = ?1, ended_at = ?2 WHERE seq = ?3", p![state.as_str(), now_ended, seq])?;
            }
            if state.is_terminal() && !before.is_terminal() {
                ended_now.push((seq, state));
            }
            s.notices.push(Notice::Job { job: id, counts, state });
        }
        Ok(ended_now)
    }

    /// A parent ended: children waiting with `:any`, or with `:ok` on a success, lose
    /// one blocker; children waiting with `:ok` on anything else are cancelled.
    fn release_children(&mut self, parent: i64, state: JobState, s: &mut Scratch) -> Result<(), StoreError> {
        let children = self.db.query("SELECT child_seq, cond FROM deps WHERE parent_seq = ?1", p![parent])?;
        if children.is_empty() {
            return Ok(());
        }
        self.db.exec("DELETE FROM deps WHERE parent_seq = ?1", p![parent])?;
        let parent_id = self.meta(parent)?.id;
        for c in children {
            let (child, cond) = (c.i64(0)?, c.str(1)?);
            if cond == "ok" && state != JobState::Succeeded {
                let id = self.meta(child)?.id;
                let why = format!("dependency {parent_id} ended {state}, and this job ran only after it succeeded");
                match self.cancel(&JobSelector { prefix: id.to_string(), index: None }, &why, Utc::now(), s) {
                    Ok((_, _, kills)) => debug_assert!(kills.is_empty(), "a blocked job runs nothing"),
                    Err(StoreError::Api(_)) => {}
                    Err(e) => return Err(e),
                }
            } else {
                self.db.exec("UPDATE jobs SET blocked = blocked - 1 WHERE seq = ?1", p![child])?;
                self.event(child, None, Utc::now(), JobState::Queued, 0, None, Some(&format!("dependency {parent_id} ended {state}")))?;
                s.work = true;
            }
        }
        Ok(())
    }

    /// Tells the other coordinators what this batch changed: `INSTANCE|w|JOB,JOB,…`
    /// (`w` when there may be new work to claim).
    fn publish(&mut self, s: &Scratch) -> Result<(), StoreError> {
        let Some(me) = &self.notify_as else { return Ok(()) };
        let mut jobs = String::new();
        for n in &s.notices {
            if let Notice::Job { job, .. } = n {
                if jobs.len() > 7000 {
                    break;
                }
                if !jobs.is_empty() {
                    jobs.push(',');
                }
                jobs.push_str(&job.to_string());
            }
        }
        if jobs.is_empty() && !s.work {
            return Ok(());
        }
        let payload = format!("{me}|{}|{jobs}", if s.work { "w" } else { "" });
        self.db.exec(&format!("SELECT pg_notify('{CHANNEL}', ?1)"), p![payload])?;
        Ok(())
    }

    /// Applies one operation. The error, if any, is `Some` when the whole batch must be
    /// retried, `None` when only this operation failed (its reply carries the error).
    fn apply(&mut self, op: &mut Op, s: &mut Scratch) -> (Pending, Result<(), Option<StoreError>>) {
        macro_rules! run {
            ($variant:ident, $e:expr) => {{
                let r = $e;
                let outcome = match &r {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_retryable() => Err(Some(StoreError::Retry(e.to_string()))),
                    Err(e) => {
                        if !matches!(e, StoreError::Api(_)) {
                            tracing::error!(error = %e, "store operation failed");
                        }
                        Err(None)
                    }
                };
                let p: Pending = Box::new(move |op: &mut Op, committed: bool| {
                    if let Op::$variant { reply, .. } = op {
                        send(reply, r, committed);
                    }
                });
                (p, outcome)
            }};
        }
        match op {
            Op::Submit { spec, owner, idempotency_key, admission, now, .. } => {
                let (spec, owner, key, admission, now) = (spec.clone(), owner.clone(), *idempotency_key, admission.clone(), *now);
                run!(Submit, self.submit(*spec, &owner, key, &admission, now, s))
            }
            Op::Decide { job, approve, by, reason, now, .. } => {
                let (job, approve, by, reason, now) = (job.clone(), *approve, by.clone(), reason.clone(), *now);
                run!(Decide, self.decide(&job, approve, &by, &reason, now, s))
            }
            Op::SetBudget { account, run, month, by, now, .. } => {
                let (account, run, month, by, now) = (account.clone(), *run, *month, by.clone(), *now);
                run!(SetBudget, self.set_budget(&account, run, month, &by, now))
            }
            Op::Claim { worker, n, caps, free, now, ttl, .. } => {
                let (worker, n, caps, free, now, ttl) = (worker.clone(), *n, caps.clone(), free.clone(), *now, *ttl);
                run!(Claim, self.claim(&worker, n, &caps, free.as_ref(), now, ttl, s))
            }
            Op::Started { worker, lease, now } => {
                let r = self.db.exec(
                    "UPDATE tasks SET started_at = ?1 WHERE lease = ?2 AND worker = ?3 AND state = 'running'",
                    p![ms(*now), lease.to_string(), worker.as_str()],
                );
                let outcome = match r {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_retryable() => Err(Some(e)),
                    Err(_) => Err(None),
                };
                (Box::new(|_: &mut Op, _| {}), outcome)
            }
            Op::Finish { worker, lease, outcome, now, .. } => {
                let (worker, lease, outcome, now) = (worker.clone(), *lease, outcome.clone(), *now);
                run!(Finish, self.finish(&worker, lease, &outcome, None, now, s))
            }
            Op::Heartbeat { worker, leases, now, ttl, .. } => {
                let (worker, leases, now, ttl) = (worker.clone(), leases.clone(), *now, *ttl);
                run!(Heartbeat, self.renew(&worker, &leases, now, ttl))
            }
            Op::Reconcile { worker, pool, held, now, ttl, .. } => {
                let (worker, pool, held, now, ttl) = (worker.clone(), pool.clone(), held.clone(), *now, *ttl);
                run!(Reconcile, self.reconcile(&worker, &pool, &held, now, ttl, s))
            }
            Op::AppendLogs { worker, chunks, .. } => {
                let worker = worker.clone();
                let r = self.append_logs(&worker, chunks, s);
                run!(AppendLogs, r)
            }
            Op::Cancel { job, reason, now, .. } => {
                let (job, reason, now) = (job.clone(), reason.clone(), *now);
                run!(Cancel, self.cancel(&job, &reason, now, s))
            }
            Op::ExpireLeases { now, .. } => {
                let now = *now;
                run!(ExpireLeases, self.expire(now, s))
            }
            Op::RestartLeases { now, ttl, .. } => {
                let (now, ttl) = (*now, *ttl);
                run!(RestartLeases, self.restart_leases(now, ttl))
            }
            Op::UseToken { token, worker, now, .. } => {
                let (token, worker, now) = (token.clone(), worker.clone(), *now);
                run!(UseToken, self.use_token(&token, &worker, now))
            }
            Op::SetDrain { worker, drained, .. } => {
                let (worker, drained) = (worker.clone(), *drained);
                run!(SetDrain, self.set_drain(&worker, drained, s))
            }
            Op::Frozen { worker, lease, outcome, image, now, .. } => {
                let (worker, lease, outcome, image, now) = (worker.clone(), *lease, outcome.clone(), image.clone(), *now);
                let r = match frozen_tag(&image) {
                    Ok(_) => self.finish(&worker, lease, &outcome, Some(&image), now, s),
                    Err(e) => Err(e),
                };
                run!(Frozen, r)
            }
            Op::FreezeStart { job, tag, by, admin, now, .. } => {
                let (job, tag, by, admin, now) = (job.clone(), tag.clone(), by.clone(), *admin, *now);
                run!(FreezeStart, self.freeze_start(&job, tag, &by, admin, now))
            }
            Op::ForgetImage { image, only_reserved, .. } => {
                let (image, only_reserved) = (image.clone(), *only_reserved);
                run!(ForgetImage, self.forget_image(&image, only_reserved))
            }
        }
    }

    fn meta(&mut self, job_seq: i64) -> Result<Arc<JobMeta>, StoreError> {
        if let Some(m) = self.jobs.get(&job_seq) {
            return Ok(m.clone());
        }
        let mut row = self.db.query_one("SELECT id, is_array, spec, owner, account, month, attempt_estimate FROM jobs WHERE seq = ?1", p![job_seq])?;
        let id = row.str(0)?;
        let spec: JobSpec = berth_shared::codec::decode(&row.blob(2)?).map_err(|_| StoreError::Corrupt { job: id.clone() })?;
        let account = row.opt_str(4)?.unwrap_or(row.str(3)?);
        let attempt_estimate = decimal(&row.str(6)?, &id)?;
        let m = Arc::new(JobMeta { id: job_id(&id)?, is_array: row.bool(1)?, spec: Arc::new(spec), account, month: row.str(5)?, attempt_estimate });
        if self.jobs.len() > 100_000 {
            self.jobs.clear();
        }
        self.jobs.insert(job_seq, m.clone());
        Ok(m)
    }

    /// Moves `n` tasks of a job between states (applied to its counts at the end of
    /// the batch).
    fn shift(&self, job_seq: i64, from: JobState, to: JobState, n: u64, s: &mut Scratch) {
        if n > 0 {
            s.moves.push((job_seq, from, to, n));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        job_seq: i64,
        idx: Option<i64>,
        now: DateTime<Utc>,
        state: JobState,
        attempt: u32,
        worker: Option<&str>,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.db.exec(
            "INSERT INTO events(job_seq, idx, time, state, attempt, worker, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            p![job_seq, idx, ms(now), state.as_str(), attempt, worker, reason],
        )?;
        Ok(())
    }

    fn task_index(meta: &JobMeta, idx: i64) -> Option<u32> {
        meta.is_array.then_some(idx as u32)
    }

    fn submit(
        &mut self,
        spec: JobSpec,
        owner: &str,
        key: uuid::Uuid,
        admission: &Admission,
        now: DateTime<Utc>,
        s: &mut Scratch,
    ) -> Result<Submitted, StoreError> {
        let key = key.to_string();
        if let Some(mut row) = self.db.query_opt("SELECT id, idx_start, idx_end, spec FROM jobs WHERE owner = ?1 AND idem = ?2", p![owner, key.as_str()])? {
            let job = job_id(&row.str(0)?)?;
            // The same key is the same submission; a different job under it is a mistake.
            let stored: Option<JobSpec> = berth_shared::codec::decode(&row.blob(3)?).ok();
            if stored.as_ref() != Some(&spec) {
                return Err(invalid(format!("idempotency key {key} was already used for job {job}, a different submission: use a new key")));
            }
            return Ok(Submitted { job, tasks: (row.i64(2)? - row.i64(1)? + 1) as u64, duplicate: true });
        }
        spec.validate().map_err(invalid)?;
        let job = JobId::new();
        let (start, end, is_array) = match spec.array {
            Some(r) => (i64::from(r.start), i64::from(r.end), true),
            None => (0, 0, false),
        };
        let tasks = spec.task_count();
        let blob = berth_shared::codec::encode(&spec).map_err(|_| invalid("the job spec is too large"))?;
        let month = ledger::month_of(now);
        let held = admission.needs_approval;
        let run_estimate = admission.attempt_estimate * Decimal::from(spec.max_attempts) * Decimal::from(tasks);
        if !held {
            // The cap check and the reservation happen here, under the account's ledger
            // row lock, in the transaction that makes the job.
            self.reserve(&admission.account, &month, run_estimate)?;
        }
        let (state, n_pending, n_queued) = if held { ("pending_approval", tasks, 0) } else { ("queued", 0, tasks) };
        // Two coordinators may race on one key: the unique index decides, and the loser
        // answers with the winner's job (and its reservation is rolled back with this op).
        let inserted = self.db.query_opt(
            "INSERT INTO jobs(id, name, owner, account, idem, spec, is_array, idx_start, idx_end, next_idx, priority, max_attempts, state, n_pending, n_queued, created_at,
                              month, attempt_estimate, held)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
             ON CONFLICT DO NOTHING RETURNING seq",
            p![
                job.to_string(),
                spec.name.as_deref(),
                owner,
                admission.account.as_str(),
                key.as_str(),
                &blob[4..],
                is_array,
                start,
                end,
                spec.priority,
                spec.max_attempts,
                state,
                n_pending,
                n_queued,
                ms(now),
                month.as_str(),
                admission.attempt_estimate.to_string(),
                held
            ],
        )?;
        let Some(row) = inserted else {
            let row = self.db.query_one("SELECT id FROM jobs WHERE owner = ?1 AND idem = ?2", p![owner, key.as_str()])?;
            return Err(StoreError::Retry(format!("idempotency key raced with job {}", row.str(0)?)));
        };
        let seq = row.i64(0)?;
        let doomed = self.link_parents(seq, &spec)?;
        let mut what = if is_array { format!("submitted by {owner}: array {start}-{end} ({tasks} tasks)") } else { format!("submitted by {owner}") };
        if !run_estimate.is_zero() {
            what.push_str(&format!("; account {}: ", admission.account));
            let est = run_estimate.normalize();
            what.push_str(&if held { format!("estimate up to ${est}: waits for approval") } else { format!("reserved up to ${est}") });
        }
        let state = if held { JobState::PendingApproval } else { JobState::Queued };
        self.event(seq, None, now, state, 0, None, Some(&what))?;
        s.touched.insert(seq);
        s.work |= !held;
        if let Some(why) = doomed {
            self.cancel(&JobSelector { prefix: job.to_string(), index: None }, &why, now, s)?;
        }
        Ok(Submitted { job, tasks, duplicate: false })
    }

    /// Records a new job's parents. A parent that has ended already counts at once;
    /// returns why the job must be cancelled when an `:ok` parent did not succeed.
    fn link_parents(&mut self, seq: i64, spec: &JobSpec) -> Result<Option<String>, StoreError> {
        let mut blocked = 0;
        let mut doomed = None;
        for d in &spec.after {
            let (parent, parent_id) = resolve(&mut self.db, &JobSelector { prefix: d.job.clone(), index: None }).map_err(|e| match e {
                StoreError::Api(a) => StoreError::Api(ApiError::new(a.kind, format!("--after {}: {}", d.job, a.message))),
                other => other,
            })?;
            let state = state_of(&self.db.query_one("SELECT state FROM jobs WHERE seq = ?1", p![parent])?.str(0)?);
            let cond = match d.on {
                berth_shared::job::AfterCond::Ok => "ok",
                berth_shared::job::AfterCond::Any => "any",
            };
            if !state.is_terminal() {
                self.db.exec("INSERT INTO deps(child_seq, parent_seq, cond) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING", p![seq, parent, cond])?;
                blocked += 1;
            } else if cond == "ok" && state != JobState::Succeeded {
                doomed = Some(format!("dependency {parent_id} ended {state}, and this job ran only after it succeeded"));
            }
        }
        if blocked > 0 {
            self.db.exec("UPDATE jobs SET blocked = ?1 WHERE seq = ?2", p![blocked, seq])?;
        }
        Ok(doomed)
    }

    fn drained(&mut self, worker: &str) -> Result<bool, StoreError> {
        Ok(match self.db.query_opt("SELECT drained FROM workers WHERE name = ?1", p![worker])? {
            Some(r) => r.bool(0)?,
            None => false,
        })
    }

    /// Claims up to `n` tasks that fit this worker: its executors, labels and pool, its
    /// free resources (when it reported them), the routing rule (a costlier pool kind
    /// takes a job only once it has waited that pool's spill delay), dependencies and
    /// approvals. Accounts take turns by weight, so a huge array does not starve a
    /// small job; within an account, priority then submission order.
    #[allow(clippy::too_many_arguments)]
    fn claim(
        &mut self,
        worker: &str,
        n: u32,
        caps: &WorkerCaps,
        free: Option<&Free>,
        now: DateTime<Utc>,
        ttl: Duration,
        s: &mut Scratch,
    ) -> Result<Claimed, StoreError> {
        let mut out = Claimed::default();
        if n == 0 || self.drained(worker)? {
            return Ok(out);
        }
        let expires = ms(lease::expires_at(now, ttl));
        let pools = self.pools.read().map(|p| p.clone()).unwrap_or_default();
        let my_pool = pools.get(&caps.pool).cloned().unwrap_or_else(|| crate::pools::Pool::free(&caps.pool));
        let mut free = free.cloned();

        // Candidates per account: re-queued tasks first (they have waited longest), then
        // jobs with unclaimed indices behind their cursor.
        let mut per_account: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        let sql = format!(
            "SELECT t.job_seq, t.idx, t.attempt, COALESCE(t.queued_at, j.created_at), j.account, j.owner FROM tasks t JOIN jobs j ON j.seq = t.job_seq
             WHERE t.state = 'queued' ORDER BY j.priority DESC, t.job_seq, t.idx LIMIT ?1{}",
            self.db.skip_locked_of("t")
        );
        for r in self.db.query(&sql, p![(i64::from(n)).clamp(1, 256) * 4])? {
            let account = r.opt_str(4)?.unwrap_or(r.str(5)?);
            per_account.entry(account).or_default().push(Candidate::Requeued { job_seq: r.i64(0)?, idx: r.i64(1)?, attempt: r.u32(2)?, queued_at: r.i64(3)? });
        }
        let accounts = self.db.query("SELECT DISTINCT account FROM jobs WHERE next_idx <= idx_end AND held = 0 AND blocked = 0 LIMIT 1000", p![])?;
        let sql = format!(
            "SELECT seq, next_idx, idx_end, created_at FROM jobs WHERE account = ?1 AND next_idx <= idx_end AND held = 0 AND blocked = 0
             ORDER BY priority DESC, seq LIMIT 16{}",
            self.db.skip_locked()
        );
        for a in accounts {
            let account = a.str(0)?;
            let list = per_account.entry(account.clone()).or_default();
            for r in self.db.query(&sql, p![account.as_str()])? {
                list.push(Candidate::Cursor { job_seq: r.i64(0)?, next: r.i64(1)?, end: r.i64(2)?, queued_at: r.i64(3)?, taken: 0 });
            }
        }
        if per_account.values().all(Vec::is_empty) {
            return Ok(out);
        }
        // What each account runs now, for the turns.
        let mut load: HashMap<String, f64> = HashMap::new();
        for r in self.db.query("SELECT account, CAST(SUM(n_running) AS BIGINT) FROM jobs WHERE n_running > 0 GROUP BY account", p![])? {
            let account = r.str(0)?;
            let w = f64::from(pools.weight(&account));
            load.insert(account, r.opt_i64(1)?.unwrap_or(0) as f64 / w);
        }
        let mut skip: HashSet<i64> = HashSet::new();
        while (out.tasks.len() as u32) < n {
            // The account with the least running work per weight that still has candidates.
            let Some(account) = per_account
                .iter()
                .filter(|(_, c)| !c.is_empty())
                .map(|(a, _)| a.clone())
                .min_by(|a, b| load.get(a).copied().unwrap_or(0.0).total_cmp(&load.get(b).copied().unwrap_or(0.0)).then(a.cmp(b)))
            else {
                break;
            };
            let Some(cand) = per_account.get(&account).and_then(|c| c.first()).copied() else { break };
            let job_seq = cand.job_seq();
            let meta = self.meta(job_seq)?;
            let verdict = if skip.contains(&job_seq) { Err(None) } else { fits(&meta.spec, caps, &my_pool, &pools, free.as_ref(), cand.queued_at(), ms(now)) };
            let why = match verdict {
                Ok(why) => why,
                Err(wait) => {
                    if let Some(w) = wait {
                        out.retry_in = Some(out.retry_in.map_or(w, |r: Duration| r.min(w)));
                    }
                    if let Candidate::Cursor { next, taken, .. } = cand {
                        if taken > 0 {
                            self.db.exec("UPDATE jobs SET next_idx = ?1 WHERE seq = ?2", p![next + taken, job_seq])?;
                        }
                    }
                    skip.insert(job_seq);
                    if let Some(list) = per_account.get_mut(&account) {
                        list.remove(0);
                    }
                    continue;
                }
            };
            let lease = LeaseId::new();
            let (idx, attempt, done) = match cand {
                Candidate::Requeued { idx, attempt, .. } => {
                    self.db.exec(
                        "UPDATE tasks SET state = 'running', lease = ?1, worker = ?2, lease_expires = ?3, started_at = ?4, ended_at = NULL,
                             exit_code = NULL, runtime_ms = NULL, reason = NULL WHERE job_seq = ?5 AND idx = ?6",
                        p![lease.to_string(), worker, expires, ms(now), job_seq, idx],
                    )?;
                    (idx, attempt, true)
                }
                Candidate::Cursor { next, end, taken, .. } => {
                    let idx = next + taken;
                    if let Some(Candidate::Cursor { taken, .. }) = per_account.get_mut(&account).and_then(|c| c.first_mut()) {
                        *taken += 1;
                    }
                    let done = idx >= end;
                    let inserted = self.db.exec(
                        "INSERT INTO tasks(job_seq, idx, state, attempt, lease, worker, lease_expires, started_at)
                         VALUES (?1, ?2, 'running', 1, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                        p![job_seq, idx, lease.to_string(), worker, expires, ms(now)],
                    )?;
                    if done {
                        self.db.exec("UPDATE jobs SET next_idx = ?1 WHERE seq = ?2", p![idx + 1, job_seq])?;
                    }
                    if inserted == 0 {
                        // Already has a row (cancelled on its own before it ran).
                        if done {
                            if let Some(list) = per_account.get_mut(&account) {
                                list.remove(0);
                            }
                        }
                        continue;
                    }
                    (idx, 1, done)
                }
            };
            if let Some(f) = free.as_mut() {
                f.take(&meta.spec.resources);
            }
            self.event(job_seq, Some(idx).filter(|_| meta.is_array), now, JobState::Running, attempt, Some(worker), why.as_deref())?;
            self.shift(job_seq, JobState::Queued, JobState::Running, 1, s);
            out.tasks.push(Assignment { lease, job: meta.id, index: Self::task_index(&meta, idx), attempt, spec: (*meta.spec).clone() });
            *load.entry(account.clone()).or_default() += 1.0 / f64::from(pools.weight(&account));
            if done {
                if let Some(list) = per_account.get_mut(&account) {
                    list.remove(0);
                }
            }
        }
        // Cursors that advanced without reaching their end.
        for list in per_account.values() {
            for c in list {
                if let Candidate::Cursor { job_seq, next, taken, .. } = c {
                    if *taken > 0 {
                        self.db.exec("UPDATE jobs SET next_idx = ?1 WHERE seq = ?2", p![*next + *taken, *job_seq])?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Records an attempt's result; `frozen`: the attempt was frozen into that image.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        worker: &str,
        lease: LeaseId,
        o: &Outcome,
        frozen: Option<&str>,
        now: DateTime<Utc>,
        s: &mut Scratch,
    ) -> Result<FinishVerdict, StoreError> {
        let sql = format!("SELECT job_seq, idx, state, attempt, worker FROM tasks WHERE lease = ?1{}", self.db.for_update());
        let Some(row) = self.db.query_opt(&sql, p![lease.to_string()])? else {
            return Ok(FinishVerdict::Stale);
        };
        let (job_seq, idx, state, attempt, owner) = (row.i64(0)?, row.i64(1)?, state_of(&row.str(2)?), row.u32(3)?, row.opt_str(4)?);
        if owner.as_deref() != Some(worker) {
            return Ok(FinishVerdict::Stale);
        }
        let meta = self.meta(job_seq)?;
        let index = Self::task_index(&meta, idx);
        let reason = match frozen {
            Some(image) => Some(format!("frozen into image {image} (its filesystem and workspace, not process memory)")),
            None => outcome_reason(o, meta.spec.max_runtime_ms),
        };
        let mut ended_as = state;
        let verdict = if state == JobState::Running {
            let to = if frozen.is_some() { JobState::Frozen } else { o.final_state() };
            ended_as = to;
            self.db.exec(
                // A short attempt's worker sends no `Started`: its process started
                // `runtime_ms` before the result (never before the claim).
                "UPDATE tasks SET state = ?1, exit_code = ?2, ended_at = ?3, runtime_ms = ?4, reason = ?5,
                     started_at = CASE WHEN started_at IS NULL OR started_at < ?8 THEN ?8 ELSE started_at END
                 WHERE job_seq = ?6 AND idx = ?7",
                p![to.as_str(), o.exit_code, ms(now), o.runtime_ms, reason.as_deref(), job_seq, idx, ms(now) - o.runtime_ms as i64],
            )?;
            self.event(job_seq, index.map(i64::from), now, to, attempt, Some(worker), reason.as_deref())?;
            self.shift(job_seq, JobState::Running, to, 1, s);
            // The task is done: charge this attempt, release the attempts it did not use.
            let actual = self.attempt_charge(&meta, worker, o.runtime_ms);
            let unused = meta.spec.max_attempts.saturating_sub(attempt);
            self.settle(&meta, job_seq, idx, 1 + unused, actual)?;
            FinishVerdict::Recorded
        } else if state != JobState::Cancelled && state.is_terminal() {
            // The same result, resent: the first one stands.
            return Ok(FinishVerdict::AlreadyRecorded);
        } else if state == JobState::Cancelled {
            // Cancelled while running: keep the state, record what the attempt did.
            self.db.exec("UPDATE tasks SET exit_code = ?1, runtime_ms = ?2 WHERE job_seq = ?3 AND idx = ?4", p![o.exit_code, o.runtime_ms, job_seq, idx])?;
            FinishVerdict::AfterCancel
        } else {
            return Ok(FinishVerdict::Stale);
        };
        if let Some(image) = frozen {
            // The image exists on the worker's engine whatever became of the task.
            self.image_ready(image, job_seq, idx, worker, now)?;
        }
        self.expected_seq.remove(&(lease, OutStream::Stdout));
        self.expected_seq.remove(&(lease, OutStream::Stderr));
        s.notices.push(Notice::TaskEnded { job: meta.id, index, attempt, state: ended_as });
        Ok(verdict)
    }

    /// Records a frozen image as ready (its reservation, or a new row).
    fn image_ready(&mut self, image: &str, job_seq: i64, idx: i64, worker: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.db.exec(
            "INSERT INTO images(name, job_seq, idx, worker, owner, state, created_at)
             VALUES (?1, ?2, ?3, ?4, (SELECT owner FROM jobs WHERE seq = ?2), 'ready', ?5)
             ON CONFLICT(name) DO UPDATE SET job_seq = excluded.job_seq, idx = excluded.idx, worker = excluded.worker,
                 owner = excluded.owner, state = 'ready', created_at = excluded.created_at",
            p![image, job_seq, idx, worker, ms(now)],
        )?;
        Ok(())
    }

    /// Checks a freeze request and reserves its image name: the task must be a running
    /// Docker task of `by` (or `by` an admin), the name free (a reservation of a freeze
    /// that never finished does not hold it).
    fn freeze_start(&mut self, sel: &JobSelector, tag: Option<String>, by: &str, admin: bool, now: DateTime<Utc>) -> Result<FreezeOrder, StoreError> {
        let (job_seq, job) = resolve(&mut self.db, sel)?;
        let meta = self.meta(job_seq)?;
        let owner = self.db.query_one("SELECT owner FROM jobs WHERE seq = ?1", p![job_seq])?.str(0)?;
        if !admin && owner != by {
            return Err(refused(format!("job {job} belongs to {owner}; only its owner or an admin may freeze it")));
        }
        if !matches!(meta.spec.executor, berth_shared::job::Executor::Docker { .. }) {
            return Err(invalid(format!("job {job} runs as a process, not in a container: only Docker jobs (--image) can be frozen")));
        }
        let idx = match (meta.is_array, sel.index) {
            (false, Some(i)) => return Err(invalid(format!("job {job} is not an array: drop the `:{i}`"))),
            (false, None) => 0,
            (true, None) => return Err(invalid(format!("job {job} is an array: freeze one task, as {}:INDEX", job.short()))),
            (true, Some(i)) => i64::from(i),
        };
        let what = match sel.index {
            Some(i) => format!("task {i} of job {job}"),
            None => format!("job {job}"),
        };
        let sql = format!("SELECT state, worker, lease FROM tasks WHERE job_seq = ?1 AND idx = ?2{}", self.db.for_update());
        let (state, worker, lease) = match self.db.query_opt(&sql, p![job_seq, idx])? {
            Some(r) => (state_of(&r.str(0)?), r.opt_str(1)?, r.opt_str(2)?),
            None => (JobState::Queued, None, None),
        };
        let (JobState::Running, Some(worker), Some(lease)) = (state, worker, lease) else {
            return Err(invalid(format!("{what} is {state}, not running: only a running task can be frozen")));
        };
        let lease = lease_of(&lease, &job)?;
        let tag = match tag {
            Some(t) => t,
            None => match sel.index {
                Some(i) => format!("{}-{i}", job.short()),
                None => job.short(),
            },
        };
        berth_shared::job::validate_tag(&tag).map_err(invalid)?;
        let image = format!("{}:{tag}", berth_shared::job::FROZEN_REPO);
        if let Some(r) = self.db.query_opt("SELECT state, job_seq, idx FROM images WHERE name = ?1", p![image.as_str()])? {
            let (st, other_seq, other_idx) = (r.str(0)?, r.i64(1)?, r.i64(2)?);
            let other = self.db.query_opt("SELECT state FROM tasks WHERE job_seq = ?1 AND idx = ?2", p![other_seq, other_idx])?;
            let other_running = other.map(|o| o.str(0)).transpose()?.is_some_and(|s| s == "running");
            if st != "freezing" || other_running {
                let from = self.db.query_one("SELECT id FROM jobs WHERE seq = ?1", p![other_seq])?.str(0)?;
                return Err(invalid(if st == "freezing" {
                    format!("image {image} is being made (a freeze of job {from} is in progress): wait for it, or give another --tag")
                } else {
                    format!("image {image} already exists (frozen from job {from}): give another --tag, or remove it with `berth images rm {image}`")
                }));
            }
            // A freeze that was asked for and never finished.
            self.db.exec("DELETE FROM images WHERE name = ?1", p![image.as_str()])?;
        }
        if let Some(r) = self.db.query_opt("SELECT name FROM images WHERE job_seq = ?1 AND idx = ?2 AND state = 'freezing'", p![job_seq, idx])? {
            return Err(invalid(format!("{what} is being frozen already (into {}): wait for it", r.str(0)?)));
        }
        self.db.exec(
            "INSERT INTO images(name, job_seq, idx, worker, owner, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'freezing', ?6)",
            p![image.as_str(), job_seq, idx, worker.as_str(), owner.as_str(), ms(now)],
        )?;
        Ok(FreezeOrder { job, index: Self::task_index(&meta, idx), worker, lease, tag, image })
    }

    fn forget_image(&mut self, image: &str, only_reserved: bool) -> Result<(), StoreError> {
        if only_reserved {
            self.db.exec("DELETE FROM images WHERE name = ?1 AND state = 'freezing'", p![image])?;
        } else {
            self.db.exec("DELETE FROM images WHERE name = ?1", p![image])?;
        }
        Ok(())
    }

    fn renew(&mut self, worker: &str, leases: &[LeaseId], now: DateTime<Utc>, ttl: Duration) -> Result<Vec<LeaseId>, StoreError> {
        let expires = ms(lease::expires_at(now, ttl));
        let mut stale = Vec::new();
        // In lease order, so that two transactions renewing overlapping sets lock rows
        // in the same order.
        let mut sorted = leases.to_vec();
        sorted.sort();
        for l in sorted {
            let n = self
                .db
                .exec("UPDATE tasks SET lease_expires = ?1 WHERE lease = ?2 AND worker = ?3 AND state = 'running'", p![expires, l.to_string(), worker])?;
            if n == 0 && !self.ended_here(worker, l)? {
                stale.push(l);
            }
        }
        Ok(stale)
    }

    /// Whether `lease` was this worker's attempt and its result is already recorded (a
    /// heartbeat that crossed the result on the wire: late, not stale). A cancelled
    /// attempt is not: its worker must kill it.
    fn ended_here(&mut self, worker: &str, lease: LeaseId) -> Result<bool, StoreError> {
        let row = self.db.query_opt("SELECT state FROM tasks WHERE lease = ?1 AND worker = ?2", p![lease.to_string(), worker])?;
        Ok(match row {
            Some(r) => matches!(state_of(&r.str(0)?), JobState::Succeeded | JobState::Failed | JobState::TimedOut),
            None => false,
        })
    }

    fn reconcile(&mut self, worker: &str, pool: &str, held: &[LeaseId], now: DateTime<Utc>, ttl: Duration, s: &mut Scratch) -> Result<Reconciled, StoreError> {
        self.db.exec("INSERT INTO workers(name, enrolled_at, pool) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING", p![worker, ms(now), pool])?;
        self.db.exec("UPDATE workers SET pool = ?1 WHERE name = ?2 AND pool != ?1", p![pool, worker])?;
        self.worker_pools.insert(worker.to_string(), pool.to_string());
        let stale = self.renew(worker, held, now, ttl)?;
        // Tasks we think run there that the worker no longer has: lost with its restart.
        let held: HashSet<String> = held.iter().map(|l| l.to_string()).collect();
        let sql =
            format!("SELECT job_seq, idx, attempt, lease FROM tasks WHERE worker = ?1 AND state = 'running' ORDER BY job_seq, idx{}", self.db.for_update());
        let running = self.db.query(&sql, p![worker])?;
        let mut lost = 0;
        for row in running {
            if held.contains(&row.str(3)?) {
                continue;
            }
            lost += 1;
            let why = format!("lease_lost: worker {worker} came back without this attempt");
            self.lose(row.i64(0)?, row.i64(1)?, row.u32(2)?, worker, now, &why, s)?;
        }
        Ok(Reconciled { stale, lost })
    }

    /// A running attempt is gone: re-queue its task or, out of attempts, fail it.
    #[allow(clippy::too_many_arguments)]
    fn lose(&mut self, job_seq: i64, idx: i64, attempt: u32, worker: &str, now: DateTime<Utc>, why: &str, s: &mut Scratch) -> Result<bool, StoreError> {
        let meta = self.meta(job_seq)?;
        let index = Self::task_index(&meta, idx).map(i64::from);
        // The lost attempt is charged for the time it held its slot.
        let actual = self.ran_for(&meta, job_seq, idx, worker, now)?;
        self.settle(&meta, job_seq, idx, 1, actual)?;
        match lease::on_expiry(attempt, meta.spec.max_attempts) {
            Expiry::Requeue { next_attempt } => {
                self.db.exec(
                    "UPDATE tasks SET state = 'queued', attempt = ?1, lease = NULL, worker = NULL, lease_expires = NULL, reason = ?2, queued_at = ?3
                     WHERE job_seq = ?4 AND idx = ?5",
                    p![next_attempt, why, ms(now), job_seq, idx],
                )?;
                self.event(job_seq, index, now, JobState::Queued, next_attempt, Some(worker), Some(why))?;
                self.shift(job_seq, JobState::Running, JobState::Queued, 1, s);
                s.work = true;
                Ok(true)
            }
            Expiry::Fail => {
                let why = format!("{why}; out of attempts ({attempt} of {})", meta.spec.max_attempts);
                self.db.exec(
                    "UPDATE tasks SET state = 'failed', lease = NULL, ended_at = ?1, reason = ?2 WHERE job_seq = ?3 AND idx = ?4",
                    p![ms(now), why.as_str(), job_seq, idx],
                )?;
                self.event(job_seq, index, now, JobState::Failed, attempt, Some(worker), Some(&why))?;
                self.shift(job_seq, JobState::Running, JobState::Failed, 1, s);
                s.notices.push(Notice::TaskEnded { job: meta.id, index: index.map(|i| i as u32), attempt, state: JobState::Failed });
                Ok(false)
            }
        }
    }

    fn expire(&mut self, now: DateTime<Utc>, s: &mut Scratch) -> Result<Vec<Expired>, StoreError> {
        let sql = format!(
            "SELECT job_seq, idx, attempt, lease, worker FROM tasks WHERE state = 'running' AND lease_expires <= ?1
             ORDER BY job_seq, idx LIMIT 10000{}",
            self.db.skip_locked()
        );
        let due = self.db.query(&sql, p![ms(now)])?;
        let mut out = Vec::with_capacity(due.len());
        for row in due {
            let (job_seq, idx, attempt, l, worker) = (row.i64(0)?, row.i64(1)?, row.u32(2)?, row.str(3)?, row.str(4)?);
            let why = format!("lease_lost: worker {worker} stopped renewing the lease");
            let requeued = self.lose(job_seq, idx, attempt, &worker, now, &why, s)?;
            let meta = self.meta(job_seq)?;
            out.push(Expired { job: meta.id, index: Self::task_index(&meta, idx), lease: lease_of(&l, &meta.id)?, worker, requeued });
        }
        Ok(out)
    }

    fn restart_leases(&mut self, now: DateTime<Utc>, ttl: Duration) -> Result<u64, StoreError> {
        let floor = ms(lease::after_restart(DateTime::<Utc>::MIN_UTC, now, ttl));
        self.db.exec("UPDATE tasks SET lease_expires = ?1 WHERE state = 'running' AND lease_expires < ?1", p![floor])
    }

    fn cancel(&mut self, sel: &JobSelector, reason: &str, now: DateTime<Utc>, s: &mut Scratch) -> Result<(JobId, u64, Vec<KillOrder>), StoreError> {
        let (job_seq, job) = resolve(&mut self.db, sel)?;
        let meta = self.meta(job_seq)?;
        let sql = format!("SELECT next_idx, idx_start, idx_end, state, held FROM jobs WHERE seq = ?1{}", self.db.for_update());
        let row = self.db.query_one(&sql, p![job_seq])?;
        let (next, start, end, job_state, held) = (row.i64(0)?, row.i64(1)?, row.i64(2)?, row.str(3)?, row.bool(4)?);
        // A job held for approval has reserved nothing; its tasks wait in pending.
        let waiting = if held { JobState::PendingApproval } else { JobState::Queued };
        let attempts = meta.spec.max_attempts;
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
                // Tasks behind the cursor that were cancelled one by one have rows already.
                let sql = "SELECT COUNT(*) FROM tasks WHERE job_seq = ?1 AND idx >= ?2 AND idx <= ?3";
                let had_rows = self.db.query_one(sql, p![job_seq, next, end])?.u64(0)?;
                let k = (end - next + 1) as u64 - had_rows;
                self.db.exec("UPDATE jobs SET next_idx = ?1 WHERE seq = ?2", p![end + 1, job_seq])?;
                self.shift(job_seq, waiting, JobState::Cancelled, k, s);
                if !held {
                    self.settle(&meta, job_seq, -1, attempts.saturating_mul(k as u32), Decimal::ZERO)?;
                }
                if meta.is_array {
                    self.event(job_seq, None, now, JobState::Cancelled, 0, None, Some(&format!("{reason} ({k} tasks had not started)")))?;
                } else {
                    self.event(job_seq, None, now, JobState::Cancelled, 1, None, Some(reason))?;
                }
                n += k;
            }
            Some(i) if i >= next => {
                let inserted = self.db.exec(
                    "INSERT INTO tasks(job_seq, idx, state, attempt, ended_at, reason) VALUES (?1, ?2, 'cancelled', 1, ?3, ?4) ON CONFLICT DO NOTHING",
                    p![job_seq, i, ms(now), reason],
                )?;
                if inserted > 0 {
                    self.event(job_seq, Some(i), now, JobState::Cancelled, 1, None, Some(reason))?;
                    self.shift(job_seq, waiting, JobState::Cancelled, 1, s);
                    if !held {
                        self.settle(&meta, job_seq, -1, attempts, Decimal::ZERO)?;
                    }
                    n += 1;
                }
            }
            _ => {}
        }
        // Materialised tasks that are queued or running.
        let sql = format!(
            "SELECT idx, state, attempt, worker, lease FROM tasks WHERE job_seq = ?1 AND state IN ('queued', 'running') AND (?2 < 0 OR idx = ?2) ORDER BY idx{}",
            self.db.for_update()
        );
        let live = self.db.query(&sql, p![job_seq, one.unwrap_or(-1)])?;
        for row in live {
            let (idx, from, attempt, worker, l) = (row.i64(0)?, state_of(&row.str(1)?), row.u32(2)?, row.opt_str(3)?, row.opt_str(4)?);
            self.db
                .exec("UPDATE tasks SET state = 'cancelled', ended_at = ?1, reason = ?2 WHERE job_seq = ?3 AND idx = ?4", p![ms(now), reason, job_seq, idx])?;
            self.event(job_seq, Self::task_index(&meta, idx).map(i64::from), now, JobState::Cancelled, attempt, worker.as_deref(), Some(reason))?;
            self.shift(job_seq, from, JobState::Cancelled, 1, s);
            // A running attempt is charged for its time so far; what is left is released.
            let actual = match (&worker, from) {
                (Some(w), JobState::Running) => self.ran_for(&meta, job_seq, idx, w, now)?,
                _ => Decimal::ZERO,
            };
            let left = attempts.saturating_sub(attempt) + 1;
            self.settle(&meta, job_seq, idx, left, actual)?;
            n += 1;
            if let (JobState::Running, Some(w), Some(l)) = (from, worker, l.and_then(|l| l.parse().ok())) {
                kills.push(KillOrder { worker: w, lease: l });
            } else {
                s.notices.push(Notice::TaskEnded { job, index: Self::task_index(&meta, idx), attempt, state: JobState::Cancelled });
            }
        }
        if n == 0 {
            let what = match sel.index {
                Some(i) => format!("task {i} of job {job}"),
                None => format!("job {job}"),
            };
            return Err(invalid(format!("{what} has already ended ({job_state}); nothing to cancel")));
        }
        Ok((job, n, kills))
    }

    fn use_token(&mut self, token: &str, worker: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        let hash = token_hash(token);
        let sql = format!("SELECT role, expires_at, used_at FROM tokens WHERE hash = ?1{}", self.db.for_update());
        let row = self.db.query_opt(&sql, p![hash.as_str()])?;
        let refuse = |m: String| StoreError::Api(ApiError::new(ErrorKind::Refused, m));
        let Some(row) = row else {
            return Err(refuse("the join token is not valid: create one with `berth-coordinator token create --role worker`".into()));
        };
        let (role, exp, used) = (row.str(0)?, row.i64(1)?, row.opt_i64(2)?);
        if used.is_some() {
            return Err(refuse("the join token has already been used: a token enrols one worker; create a new one".into()));
        }
        if exp <= ms(now) {
            return Err(refuse(format!("the join token expired at {}: create a new one", from_ms(exp).to_rfc3339())));
        }
        if role != "worker" {
            return Err(refuse(format!("the join token is for role {role}, not worker")));
        }
        self.db.exec("UPDATE tokens SET used_at = ?1, used_by = ?2 WHERE hash = ?3", p![ms(now), worker, hash.as_str()])?;
        self.db.exec(
            "INSERT INTO workers(name, enrolled_at) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET enrolled_at = excluded.enrolled_at",
            p![worker, ms(now)],
        )?;
        Ok(())
    }

    fn set_drain(&mut self, worker: &str, drained: bool, s: &mut Scratch) -> Result<bool, StoreError> {
        let n = self.db.exec("UPDATE workers SET drained = ?1 WHERE name = ?2", p![drained, worker])?;
        if n == 0 {
            return Err(StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("no worker named `{worker}`: `berth workers` lists them"))));
        }
        // An undrained worker may claim again: wake it.
        s.work |= !drained;
        Ok(drained)
    }

    /// The account's usage in `month`, its ledger row locked for this transaction.
    fn usage(&mut self, account: &str, month: &str) -> Result<Usage, StoreError> {
        self.db.exec("INSERT INTO ledger(account, month, reserved, spent) VALUES (?1, ?2, '0', '0') ON CONFLICT DO NOTHING", p![account, month])?;
        let sql = format!("SELECT reserved, spent FROM ledger WHERE account = ?1 AND month = ?2{}", self.db.for_update());
        let row = self.db.query_one(&sql, p![account, month])?;
        Ok(Usage { reserved: decimal(&row.str(0)?, account)?, spent: decimal(&row.str(1)?, account)? })
    }

    fn write_usage(&mut self, account: &str, month: &str, u: Usage) -> Result<(), StoreError> {
        self.db.exec(
            "UPDATE ledger SET reserved = ?1, spent = ?2 WHERE account = ?3 AND month = ?4",
            p![u.reserved.normalize().to_string(), u.spent.normalize().to_string(), account, month],
        )?;
        Ok(())
    }

    fn caps(&mut self, account: &str) -> Result<Caps, StoreError> {
        Ok(match self.db.query_opt("SELECT run_cap, month_cap FROM budgets WHERE account = ?1", p![account])? {
            Some(r) => Caps { run: decimal(&r.str(0)?, account)?, month: decimal(&r.str(1)?, account)? },
            None => Caps::default(),
        })
    }

    /// Checks `estimate` against the account's caps and reserves it, or refuses with
    /// the window and the numbers.
    fn reserve(&mut self, account: &str, month: &str, estimate: Decimal) -> Result<(), StoreError> {
        if estimate.is_zero() {
            return Ok(());
        }
        let usage = self.usage(account, month)?;
        let caps = self.caps(account)?;
        match ledger::admit(account, month, caps, usage, estimate) {
            Ok(next) => self.write_usage(account, month, next),
            Err(r) => Err(refused(r.to_string())),
        }
    }

    /// Turns `attempts` attempts' worth of a task's reservation into `actual` spend
    /// (the rest released); `idx` < 0 for tasks that never got a row.
    fn settle(&mut self, meta: &JobMeta, job_seq: i64, idx: i64, attempts: u32, actual: Decimal) -> Result<(), StoreError> {
        if meta.attempt_estimate.is_zero() || attempts == 0 {
            return Ok(());
        }
        let part = meta.attempt_estimate * Decimal::from(attempts);
        let usage = self.usage(&meta.account, &meta.month)?;
        let (next, charged) = ledger::settle(usage, part, actual);
        self.write_usage(&meta.account, &meta.month, next)?;
        if idx >= 0 && !charged.is_zero() {
            let before = self.db.query_one("SELECT charged FROM tasks WHERE job_seq = ?1 AND idx = ?2", p![job_seq, idx])?.str(0)?;
            let total = decimal(&before, &meta.id.to_string())? + charged;
            self.db.exec("UPDATE tasks SET charged = ?1 WHERE job_seq = ?2 AND idx = ?3", p![total.normalize().to_string(), job_seq, idx])?;
        }
        Ok(())
    }

    fn worker_pool(&mut self, worker: &str) -> Result<String, StoreError> {
        if let Some(p) = self.worker_pools.get(worker) {
            return Ok(p.clone());
        }
        let pool = match self.db.query_opt("SELECT pool FROM workers WHERE name = ?1", p![worker])? {
            Some(r) => r.str(0)?,
            None => "default".to_string(),
        };
        self.worker_pools.insert(worker.to_string(), pool.clone());
        Ok(pool)
    }

    /// What an attempt that ran `runtime_ms` on `worker` costs at its pool's rates.
    fn attempt_charge(&mut self, meta: &JobMeta, worker: &str, runtime_ms: u64) -> Decimal {
        if meta.attempt_estimate.is_zero() {
            return Decimal::ZERO;
        }
        let pool = self.worker_pool(worker).unwrap_or_else(|_| "default".into());
        let pools = self.pools.read().map(|p| p.clone()).unwrap_or_default();
        let r = &meta.spec.resources;
        pools.get(&pool).map_or(Decimal::ZERO, |p| p.charge(r.gpus, r.millicpus, r.mem_mib, runtime_ms))
    }

    /// The charge for a running attempt that ends now without a result (lost lease,
    /// cancel): the time since it was claimed, at most its max runtime.
    fn ran_for(&mut self, meta: &JobMeta, job_seq: i64, idx: i64, worker: &str, now: DateTime<Utc>) -> Result<Decimal, StoreError> {
        if meta.attempt_estimate.is_zero() {
            return Ok(Decimal::ZERO);
        }
        let started = self.db.query_opt("SELECT started_at FROM tasks WHERE job_seq = ?1 AND idx = ?2", p![job_seq, idx])?;
        let started = match started {
            Some(r) => r.opt_i64(0)?.unwrap_or(ms(now)),
            None => ms(now),
        };
        let mut ran = (ms(now) - started).max(0) as u64;
        if let Some(max) = meta.spec.max_runtime_ms {
            ran = ran.min(max);
        }
        Ok(self.attempt_charge(meta, worker, ran))
    }

    /// An approver's decision on a job held for approval. Approval reserves now (and is
    /// refused if the job no longer fits); rejection ends the job `rejected`.
    fn decide(&mut self, sel: &JobSelector, approve: bool, by: &str, reason: &str, now: DateTime<Utc>, s: &mut Scratch) -> Result<Decided, StoreError> {
        let (job_seq, job) = resolve(&mut self.db, sel)?;
        if sel.index.is_some() {
            return Err(invalid("approval is for a whole submission: drop the `:INDEX`"));
        }
        let sql = format!("SELECT held, state, idx_start, idx_end FROM jobs WHERE seq = ?1{}", self.db.for_update());
        let row = self.db.query_one(&sql, p![job_seq])?;
        if !row.bool(0)? {
            return Err(invalid(format!("job {job} is not waiting for approval (it is {})", row.str(1)?)));
        }
        let tasks = (row.i64(3)? - row.i64(2)? + 1) as u64;
        let meta = self.meta(job_seq)?;
        let verb = if approve { "approved" } else { "rejected" };
        let why = format!("{verb} by {by}: {reason}");
        let state = if approve {
            let month = ledger::month_of(now);
            let estimate = meta.attempt_estimate * Decimal::from(meta.spec.max_attempts) * Decimal::from(tasks);
            self.reserve(&meta.account, &month, estimate)?;
            self.db.exec("UPDATE jobs SET held = 0, month = ?1, decision = ?2 WHERE seq = ?3", p![month.as_str(), why.as_str(), job_seq])?;
            self.jobs.remove(&job_seq);
            s.work = true;
            JobState::Queued
        } else {
            let end = row.i64(3)?;
            self.db.exec("UPDATE jobs SET held = 0, next_idx = ?1, decision = ?2 WHERE seq = ?3", p![end + 1, why.as_str(), job_seq])?;
            JobState::Rejected
        };
        self.shift(job_seq, JobState::PendingApproval, state, tasks, s);
        self.event(job_seq, None, now, state, 0, None, Some(&why))?;
        if state == JobState::Rejected {
            s.notices.push(Notice::TaskEnded { job, index: None, attempt: 0, state });
        }
        Ok(Decided { job, state, tasks })
    }

    fn set_budget(&mut self, account: &str, run: Decimal, month: Decimal, by: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        if account.trim().is_empty() {
            return Err(invalid("the account name is empty"));
        }
        if run.is_sign_negative() || month.is_sign_negative() {
            return Err(invalid("caps must not be negative"));
        }
        self.db.exec(
            "INSERT INTO budgets(account, run_cap, month_cap, set_by, set_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(account) DO UPDATE SET run_cap = excluded.run_cap, month_cap = excluded.month_cap, set_by = excluded.set_by, set_at = excluded.set_at",
            p![account, run.normalize().to_string(), month.normalize().to_string(), by, ms(now)],
        )?;
        Ok(())
    }

    /// The last stored sequence number of a stream of one attempt, plus one.
    fn next_seq(&mut self, job_seq: i64, idx: i64, attempt: u32, stream: OutStream) -> Result<u64, StoreError> {
        let row = self.db.query_one(
            "SELECT MAX(seq) FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3 AND stream = ?4",
            p![job_seq, idx, attempt, stream_code(stream)],
        )?;
        Ok(row.opt_i64(0)?.map_or(1, |m| m as u64 + 1))
    }

    fn append_logs(&mut self, worker: &str, chunks: &mut [LogChunk], s: &mut Scratch) -> Result<Vec<ChunkVerdict>, StoreError> {
        let mut verdicts = Vec::with_capacity(chunks.len());
        let mut owners: HashMap<LeaseId, Option<(i64, i64, u32)>> = HashMap::new();
        for c in chunks.iter() {
            let owner = match owners.get(&c.lease) {
                Some(o) => *o,
                None => {
                    let o = match self.db.query_opt(
                        "SELECT job_seq, idx, attempt FROM tasks WHERE lease = ?1 AND worker = ?2 AND state = 'running'",
                        p![c.lease.to_string(), worker],
                    )? {
                        Some(r) => Some((r.i64(0)?, r.i64(1)?, r.u32(2)?)),
                        None => None,
                    };
                    owners.insert(c.lease, o);
                    o
                }
            };
            let Some((job_seq, idx, attempt)) = owner else {
                verdicts.push(ChunkVerdict::StaleLease);
                continue;
            };
            let key = (c.lease, c.stream);
            let mut expected = match self.expected_seq.get(&key) {
                Some(e) => *e,
                None => self.next_seq(job_seq, idx, attempt, c.stream)?,
            };
            if c.seq != expected {
                // The cached hint may be behind: another coordinator may have stored
                // chunks of this attempt while its worker was connected there.
                expected = self.next_seq(job_seq, idx, attempt, c.stream)?;
            }
            if c.seq < expected {
                self.expected_seq.insert(key, expected);
                verdicts.push(ChunkVerdict::Duplicate);
                continue;
            }
            if c.seq > expected {
                verdicts.push(ChunkVerdict::OutOfOrder { expected });
                continue;
            }
            let stored = match self.segments.as_mut() {
                Some(seg) if c.data.len() >= super::segments::MIN_SEGMENT_CHUNK => {
                    let (id, off) = seg.append(&c.data).map_err(|source| StoreError::Segment { what: "cannot be written".into(), source })?;
                    self.db.exec(
                        "INSERT INTO logs(job_seq, idx, attempt, stream, seq, data, seg, off, len) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
                        p![job_seq, idx, attempt, stream_code(c.stream), c.seq, &[][..], id as i64, off as i64, c.data.len() as i64],
                    )?
                }
                _ => self.db.exec(
                    "INSERT INTO logs(job_seq, idx, attempt, stream, seq, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    p![job_seq, idx, attempt, stream_code(c.stream), c.seq, c.data.as_slice()],
                )?,
            };
            self.expected_seq.insert(key, expected + 1);
            if stored == 0 {
                verdicts.push(ChunkVerdict::Duplicate);
                continue;
            }
            let meta = self.meta(job_seq)?;
            s.notices.push(Notice::Output { job: meta.id, index: Self::task_index(&meta, idx), attempt, stream: c.stream, seq: c.seq, data: c.data.clone() });
            verdicts.push(ChunkVerdict::Stored);
        }
        if self.expected_seq.len() > 100_000 {
            self.expected_seq.clear();
        }
        Ok(verdicts)
    }
}

/// Answers an operation whose batch could not be committed.
fn fail_op(op: &mut Op) {
    macro_rules! fail {
        ($($variant:ident),*) => {
            match op {
                $(Op::$variant { reply, .. } => send(reply, Err(StoreError::Stopped), false),)*
                Op::Started { .. } => {}
            }
        };
    }
    fail!(
        Submit,
        Decide,
        SetBudget,
        Claim,
        Finish,
        Heartbeat,
        Reconcile,
        AppendLogs,
        Cancel,
        ExpireLeases,
        RestartLeases,
        UseToken,
        SetDrain,
        Frozen,
        FreezeStart,
        ForgetImage
    );
}

/// The tag of a frozen image's name (`berth-frozen:TAG`), checked.
fn frozen_tag(image: &str) -> Result<&str, StoreError> {
    let tag = image
        .strip_prefix(berth_shared::job::FROZEN_REPO)
        .and_then(|t| t.strip_prefix(':'))
        .ok_or_else(|| invalid(format!("`{image}` is not a frozen image name ({}:TAG)", berth_shared::job::FROZEN_REPO)))?;
    berth_shared::job::validate_tag(tag).map_err(invalid)?;
    Ok(tag)
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
pub fn create_token(db: &mut dyn Db, role: &str, ttl: Duration, now: DateTime<Utc>) -> Result<String, StoreError> {
    use rand::RngCore;
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = format!("bjt_{}", hex::encode(raw));
    db.exec(
        "INSERT INTO tokens(hash, role, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        p![token_hash(&token), role, ms(now), ms(lease::expires_at(now, ttl))],
    )?;
    Ok(token)
}

fn resolve(db: &mut dyn Db, sel: &JobSelector) -> Result<(i64, JobId), StoreError> {
    let hi = format!("{}~", sel.prefix);
    let rows = db.query("SELECT seq, id FROM jobs WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT 6", p![sel.prefix.as_str(), hi])?;
    match rows.as_slice() {
        [] => Err(not_found(sel)),
        [r] => Ok((r.i64(0)?, job_id(&r.str(1)?)?)),
        many => {
            let ids: Vec<String> = many.iter().take(5).filter_map(|r| r.str(1).ok()).collect();
            Err(StoreError::Api(ApiError::new(
                ErrorKind::Ambiguous,
                format!("`{}` matches several jobs ({}…): give more characters", sel.prefix, ids.join(", ")),
            )))
        }
    }
}

/// A read-only view of the store for queries, on its own connection.
pub struct ReadView<D: Db> {
    db: D,
    segments: Option<super::segments::SegmentReader>,
}

impl<D: Db> ReadView<D> {
    pub fn new(db: D) -> ReadView<D> {
        ReadView { db, segments: None }
    }

    /// Reads large chunks back from segment files (see `segments`).
    pub fn with_segments(mut self, segments: super::segments::SegmentReader) -> Self {
        self.segments = Some(segments);
        self
    }

    fn spec(&mut self, job_seq: i64) -> Result<JobSpec, StoreError> {
        let mut row = self.db.query_one("SELECT id, spec FROM jobs WHERE seq = ?1", p![job_seq])?;
        let id = row.str(0)?;
        berth_shared::codec::decode(&row.blob(1)?).map_err(|_| StoreError::Corrupt { job: id })
    }

    fn task(&mut self, job_seq: i64, idx: i64, is_array: bool) -> Result<Option<TaskStatus>, StoreError> {
        let Some(r) = self.db.query_opt(
            "SELECT state, attempt, worker, exit_code, started_at, ended_at, runtime_ms, reason FROM tasks WHERE job_seq = ?1 AND idx = ?2",
            p![job_seq, idx],
        )?
        else {
            return Ok(None);
        };
        Ok(Some(TaskStatus {
            index: is_array.then_some(idx as u32),
            state: state_of(&r.str(0)?),
            attempt: r.u32(1)?,
            worker: r.opt_str(2)?,
            exit_code: r.opt_i32(3)?,
            started_at: r.opt_i64(4)?.map(from_ms),
            ended_at: r.opt_i64(5)?.map(from_ms),
            runtime_ms: r.opt_i64(6)?.map(|v| v as u64),
            reason: r.opt_str(7)?,
        }))
    }

    fn events(&mut self, job_seq: i64, idx: Option<i64>, all_tasks: bool) -> Result<Vec<Event>, StoreError> {
        let rows = if all_tasks {
            self.db.query(
                "SELECT idx, time, state, attempt, worker, reason FROM (SELECT * FROM events WHERE job_seq = ?1 ORDER BY id DESC LIMIT 200) e ORDER BY id",
                p![job_seq],
            )?
        } else {
            self.db.query(
                "SELECT idx, time, state, attempt, worker, reason FROM events WHERE job_seq = ?1 AND (idx IS NULL OR idx = ?2) ORDER BY id",
                p![job_seq, idx.unwrap_or(-1)],
            )?
        };
        rows.iter()
            .map(|r| {
                Ok(Event {
                    index: r.opt_i64(0)?.map(|i| i as u32),
                    time: from_ms(r.i64(1)?),
                    state: state_of(&r.str(2)?),
                    attempt: r.u32(3)?,
                    worker: r.opt_str(4)?,
                    reason: r.opt_str(5)?,
                })
            })
            .collect()
    }
}

const IMAGE_COLS: &str = "i.name, j.id, j.is_array, i.idx, i.worker, i.owner, i.created_at";

fn image_row(r: &Row) -> Result<FrozenImage, StoreError> {
    Ok(FrozenImage {
        image: r.str(0)?,
        job: job_id(&r.str(1)?)?,
        index: if r.bool(2)? { Some(r.u32(3)?) } else { None },
        worker: r.str(4)?,
        owner: r.str(5)?,
        created_at: from_ms(r.i64(6)?),
    })
}

const SUMMARY_COLS: &str = "seq, id, name, state, owner, account, created_at, ended_at, idx_start, idx_end,
     n_pending, n_queued, n_running, n_succeeded, n_failed, n_cancelled, n_timed_out, n_rejected, n_frozen";

fn summary_row(r: &Row) -> Result<(i64, JobSummary), StoreError> {
    Ok((
        r.i64(0)?,
        JobSummary {
            id: job_id(&r.str(1)?)?,
            name: r.opt_str(2)?,
            state: state_of(&r.str(3)?),
            owner: r.str(4)?,
            account: r.opt_str(5)?,
            submitted_at: from_ms(r.i64(6)?),
            ended_at: r.opt_i64(7)?.map(from_ms),
            tasks: (r.i64(9)? - r.i64(8)? + 1) as u64,
            counts: counts_from(r, 10)?,
            reason: None,
        },
    ))
}

impl<D: Db> ReadView<D> {
    /// For a queued job held by dependencies: which parents it waits for.
    fn waiting_for(&mut self, job_seq: i64, state: JobState) -> Result<Option<String>, StoreError> {
        if state != JobState::Queued {
            return Ok(None);
        }
        let rows = self.db.query("SELECT j.id, d.cond FROM deps d JOIN jobs j ON j.seq = d.parent_seq WHERE d.child_seq = ?1 ORDER BY j.seq", p![job_seq])?;
        if rows.is_empty() {
            return Ok(None);
        }
        let parents: Vec<String> = rows.iter().map(|r| Ok(format!("{} ({})", r.str(0)?, r.str(1)?))).collect::<Result<_, StoreError>>()?;
        Ok(Some(format!("waiting for {} to end", parents.join(", "))))
    }
}

impl<D: Db> Reader for ReadView<D> {
    fn resolve(&mut self, sel: &JobSelector) -> Result<(i64, JobId), StoreError> {
        resolve(&mut self.db, sel)
    }

    fn summary(&mut self, job_seq: i64) -> Result<JobSummary, StoreError> {
        let sql = format!("SELECT {SUMMARY_COLS} FROM jobs WHERE seq = ?1");
        Ok(summary_row(&self.db.query_one(&sql, p![job_seq])?)?.1)
    }

    fn status(&mut self, sel: &JobSelector) -> Result<JobStatus, StoreError> {
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
                    return Err(StoreError::Api(ApiError::new(
                        ErrorKind::NotFound,
                        format!("job {job} has no task {i} (its indices are {}-{})", r.start, r.end),
                    )));
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
        let mut summary = summary;
        summary.reason = self.waiting_for(job_seq, summary.state)?;
        // A frozen task says which image it was frozen into.
        let mut spec = spec;
        if let Some(t) = task.as_ref().filter(|t| t.state == JobState::Frozen) {
            if let Some(img) = self.frozen_image(job_seq, t.index)? {
                spec.labels.push((berth_shared::job::LABEL_FROZEN_IMAGE.into(), img.image));
            }
        }
        Ok(JobStatus { summary, spec, task, events })
    }

    fn list(&mut self, state: Option<JobState>, limit: u32) -> Result<Vec<JobSummary>, StoreError> {
        let rows = match state {
            Some(s) => self.db.query(&format!("SELECT {SUMMARY_COLS} FROM jobs WHERE state = ?1 ORDER BY seq DESC LIMIT ?2"), p![s.as_str(), limit])?,
            None => self.db.query(&format!("SELECT {SUMMARY_COLS} FROM jobs ORDER BY seq DESC LIMIT ?1"), p![limit])?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let (seq, mut summary) = summary_row(r)?;
            summary.reason = self.waiting_for(seq, summary.state)?;
            out.push(summary);
        }
        Ok(out)
    }

    fn logs(&mut self, job_seq: i64, index: Option<u32>, attempt: Option<u32>, after: (u64, u64)) -> Result<LogRead, StoreError> {
        let idx = i64::from(index.unwrap_or(0));
        let Some(task) = self.db.query_opt("SELECT state, attempt FROM tasks WHERE job_seq = ?1 AND idx = ?2", p![job_seq, idx])? else {
            // Not started yet (or cancelled before it ran).
            let st = state_of(&self.db.query_one("SELECT state FROM jobs WHERE seq = ?1", p![job_seq])?.str(0)?);
            return Ok(LogRead {
                attempt: 1,
                chunks: Vec::new(),
                ended: st.is_terminal(),
                task_state: Some(if st.is_terminal() { st } else { JobState::Queued }),
            });
        };
        let (state, current) = (state_of(&task.str(0)?), task.u32(1)?);
        let attempt = attempt.unwrap_or(current);
        let rows = self.db.query(
            "SELECT stream, seq, data, seg, off, len FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3
             AND ((stream = 0 AND seq > ?4) OR (stream = 1 AND seq > ?5)) ORDER BY id LIMIT 512",
            p![job_seq, idx, attempt, after.0, after.1],
        )?;
        let mut chunks = Vec::with_capacity(rows.len());
        for mut r in rows {
            let data = match r.opt_i64(3)? {
                Some(id) => {
                    let (off, len) = (r.i64(4)?, r.i64(5)?);
                    let seg = self.segments.as_mut().ok_or_else(|| StoreError::Segment {
                        what: format!("{id} is referenced but this reader has no segment directory"),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    })?;
                    seg.read(id as u64, off as u64, len as usize)
                        .map_err(|source| StoreError::Segment { what: format!("{id} at {off} cannot be read"), source })?
                }
                None => r.blob(2)?,
            };
            chunks.push((stream_of(r.i64(0)?), r.u64(1)?, data));
        }
        let ended = attempt < current || state.is_terminal();
        Ok(LogRead { attempt, chunks, ended, task_state: Some(state) })
    }

    fn exit_code(&mut self, job_seq: i64) -> Result<Option<i32>, StoreError> {
        let is_array = self.db.query_one("SELECT is_array FROM jobs WHERE seq = ?1", p![job_seq])?.bool(0)?;
        if !is_array {
            let Some(r) = self.db.query_opt("SELECT exit_code, state FROM tasks WHERE job_seq = ?1 AND idx = 0", p![job_seq])? else {
                return Ok(None);
            };
            let code = r.opt_i32(0)?;
            return Ok(code.or(if r.str(1)? == "succeeded" { Some(0) } else { None }));
        }
        let c = self.summary(job_seq)?.counts;
        if c.succeeded == c.total() {
            return Ok(Some(0));
        }
        let r = self.db.query_opt(
            "SELECT exit_code FROM tasks WHERE job_seq = ?1 AND state != 'succeeded' AND exit_code IS NOT NULL AND exit_code != 0 ORDER BY idx LIMIT 1",
            p![job_seq],
        )?;
        match r {
            Some(r) => r.opt_i32(0),
            None => Ok(None),
        }
    }

    fn workers(&mut self) -> Result<Vec<(String, bool)>, StoreError> {
        self.db.query("SELECT name, drained FROM workers ORDER BY name", p![])?.iter().map(|r| Ok((r.str(0)?, r.bool(1)?))).collect()
    }

    fn is_drained(&mut self, worker: &str) -> Result<bool, StoreError> {
        Ok(match self.db.query_opt("SELECT drained FROM workers WHERE name = ?1", p![worker])? {
            Some(r) => r.bool(0)?,
            None => false,
        })
    }

    fn images(&mut self, owner: Option<&str>) -> Result<Vec<FrozenImage>, StoreError> {
        let rows = self.db.query(
            &format!("SELECT {IMAGE_COLS} FROM images i JOIN jobs j ON j.seq = i.job_seq WHERE i.state = 'ready' AND (?1 = '' OR i.owner = ?1) ORDER BY i.created_at, i.name"),
            p![owner.unwrap_or("")],
        )?;
        rows.iter().map(image_row).collect()
    }

    fn image(&mut self, name: &str) -> Result<Option<FrozenImage>, StoreError> {
        let row = self.db.query_opt(&format!("SELECT {IMAGE_COLS} FROM images i JOIN jobs j ON j.seq = i.job_seq WHERE i.name = ?1"), p![name])?;
        row.as_ref().map(image_row).transpose()
    }

    fn frozen_image(&mut self, job_seq: i64, index: Option<u32>) -> Result<Option<FrozenImage>, StoreError> {
        let row = self.db.query_opt(
            &format!(
                "SELECT {IMAGE_COLS} FROM images i JOIN jobs j ON j.seq = i.job_seq WHERE i.job_seq = ?1 AND i.idx = ?2 AND i.state = 'ready'
                 ORDER BY i.created_at DESC LIMIT 1"
            ),
            p![job_seq, i64::from(index.unwrap_or(0))],
        )?;
        row.as_ref().map(image_row).transpose()
    }

    fn budgets(&mut self, account: Option<&str>, month: &str) -> Result<Vec<BudgetRow>, StoreError> {
        let rows = self.db.query(
            "SELECT a.account, b.run_cap, b.month_cap, l.reserved, l.spent FROM
               (SELECT account FROM budgets UNION SELECT account FROM ledger WHERE month = ?1) a
               LEFT JOIN budgets b ON b.account = a.account
               LEFT JOIN ledger l ON l.account = a.account AND l.month = ?1
             WHERE (?2 = '' OR a.account = ?2) ORDER BY a.account",
            p![month, account.unwrap_or("")],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let account = r.str(0)?;
            let amount = |i: usize| -> Result<Decimal, StoreError> { r.opt_str(i)?.map_or(Ok(Decimal::ZERO), |v| decimal(&v, &account)) };
            out.push(BudgetRow {
                account: account.clone(),
                month: month.to_string(),
                run_cap: amount(1)?,
                month_cap: amount(2)?,
                reserved: amount(3)?,
                spent: amount(4)?,
            });
        }
        if out.is_empty() {
            if let Some(a) = account {
                return Err(StoreError::Api(ApiError::new(
                    ErrorKind::NotFound,
                    format!("no account `{a}`: it has no budget and no spend this month (`berth budget set --account {a} …` makes one)"),
                )));
            }
        }
        Ok(out)
    }
}
