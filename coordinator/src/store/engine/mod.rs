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
use berth_shared::job::{Counts, JobSpec, JobState, Outcome};
use berth_shared::wire::{ApiError, Assignment, ErrorKind, OutStream};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::sql::{p, Db, Row, Val};
use super::*;
use crate::lease::{self, Expiry};
use crate::ledger::{self, Caps, Usage};

mod cancel;
mod claim;
mod freeze;
use freeze::frozen_tag;
mod leases;
mod money;
mod output;
mod results;
mod sessions;
pub(crate) use sessions::exec_stream_code;
pub use sessions::ExecOrder;
mod submit;
mod workers;

pub use workers::{create_token, token_hash};

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(super) fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

pub(super) fn invalid(msg: impl Into<String>) -> StoreError {
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

pub(super) fn stream_of(c: i64) -> OutStream {
    if c == 1 {
        OutStream::Stderr
    } else {
        OutStream::Stdout
    }
}

pub(super) fn state_of(s: &str) -> JobState {
    s.parse().unwrap_or(JobState::Failed)
}

fn lease_of(s: &str, job: &JobId) -> Result<LeaseId, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt { job: job.to_string() })
}

pub(super) fn decimal(s: &str, job: &str) -> Result<Decimal, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt { job: format!("{job} (amount `{s}`)") })
}

fn refused(msg: impl Into<String>) -> StoreError {
    StoreError::Api(ApiError::new(ErrorKind::Refused, msg))
}

pub(super) fn job_id(s: &str) -> Result<JobId, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt { job: s.to_string() })
}

/// The PostgreSQL channel on which coordinators tell each other of changes.
pub const CHANNEL: &str = "berth_changes";

/// The column of each state's count, in `JobState::ALL` order.
const COUNT_COLS: [&str; 9] = ["n_pending", "n_queued", "n_running", "n_succeeded", "n_failed", "n_cancelled", "n_timed_out", "n_rejected", "n_frozen"];

fn state_pos(s: JobState) -> usize {
    JobState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

pub(super) fn counts_from(row: &Row, first: usize) -> Result<Counts, StoreError> {
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
    owner: String,
    account: String,
    month: String,
    /// The reserved upper bound of one attempt of one task (zero: nothing reserved).
    attempt_estimate: Decimal,
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
    /// The Budget actor's pools, as it last sent them.
    pools: PoolsSnapshot,
    /// Worker → pool, as each worker last registered.
    worker_pools: HashMap<String, String>,
    jobs: HashMap<i64, Arc<JobMeta>>,
    /// The next expected output sequence per (lease, stream); a hint, checked against
    /// the database whenever a chunk disagrees with it.
    expected_seq: HashMap<(LeaseId, u32, OutStream), u64>,
    /// Where large output chunks go (SQLite only).
    segments: Option<super::segments::Segments>,
    /// Output bytes stored per attempt (a hint, as `expected_seq`), for output caps.
    out_bytes: HashMap<LeaseId, u64>,
    /// Jobs made by the batch being applied: not cached until it commits (a rolled-back
    /// job's row id is handed out again).
    fresh_jobs: HashSet<i64>,
    /// Whether the database took its last writes (see `health`).
    health: super::health::Health,
    /// What every running lease gets once the store can write again.
    lease_ttl: Option<Duration>,
    /// Where the database's files are (SQLite): probed for free space.
    probe_dir: Option<std::path::PathBuf>,
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
        Ok(Store {
            db,
            notify_as: None,
            pools: PoolsSnapshot::default(),
            worker_pools: HashMap::new(),
            jobs: HashMap::new(),
            expected_seq: HashMap::new(),
            segments: None,
            out_bytes: HashMap::new(),
            fresh_jobs: HashSet::new(),
            health: None,
            lease_ttl: None,
            probe_dir: None,
        })
    }

    /// Running leases get this TTL when the store can write again after it could not.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// Checks for `health::HEADROOM` free bytes here before calling the store writable.
    pub fn with_probe_dir(mut self, dir: &std::path::Path) -> Self {
        self.probe_dir = Some(dir.to_path_buf());
        self
    }

    /// Whether the store took its last writes.
    pub fn health(&self) -> &super::health::Health {
        &self.health
    }

    /// Notes a write the disk refused: the store is unwritable from now (or still).
    fn note_failure(&mut self, e: &StoreError) {
        let Some(full) = e.write_failure() else { return };
        let reason = match e {
            StoreError::Unwritable { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        match &mut self.health {
            Some(h) => {
                h.full = full;
                h.reason = reason;
            }
            None => {
                tracing::error!(
                    error = %e,
                    "the job store cannot write: new submissions are refused, lease expiry waits, and output and results are taken again once it can"
                );
                self.health = Some(super::health::Unwritable { since: Utc::now(), full, reason });
            }
        }
    }

    /// Tries whether an unwritable store writes again: room beside the database, then a
    /// transaction that gives every running lease a full TTL from now (their renewals
    /// may not have been stored). `true` once it is writable.
    pub fn probe(&mut self, now: DateTime<Utc>) -> bool {
        let r = (|| -> Result<u64, StoreError> {
            if let Some(dir) = &self.probe_dir {
                super::health::headroom(dir, super::health::HEADROOM).map_err(|e| StoreError::Unwritable {
                    full: super::health::io_full(&e),
                    reason: format!("cannot write {} in {}: {e}", berth_shared::duration::format_size(super::health::HEADROOM), dir.display()),
                })?;
            }
            let begin = self.db.begin();
            self.db.batch(begin)?;
            let r = (|| -> Result<u64, StoreError> {
                self.db.exec(
                    "INSERT INTO meta(key, value) VALUES ('write_probe', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    p![now.to_rfc3339()],
                )?;
                let renewed = match self.lease_ttl {
                    Some(ttl) => self.restart_leases(now, ttl)?,
                    None => 0,
                };
                self.db.batch("COMMIT")?;
                Ok(renewed)
            })();
            if r.is_err() {
                let _ = self.db.batch("ROLLBACK");
            }
            r
        })();
        match r {
            Ok(renewed) => {
                let since = self.health.take().map(|h| h.since);
                tracing::info!(?since, leases = renewed, "the job store can write again; running leases get a full TTL from now");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "the job store still cannot write");
                if e.write_failure().is_some() {
                    self.note_failure(&e);
                }
                false
            }
        }
    }

    /// Forgets what the writer learnt from writes that were rolled back.
    fn forget_uncommitted(&mut self) {
        self.expected_seq.clear();
        self.out_bytes.clear();
        self.worker_pools.clear();
    }

    /// Keeps large output chunks in segment files (see `segments`).
    pub fn with_segments(mut self, segments: super::segments::Segments) -> Self {
        self.segments = Some(segments);
        self
    }

    /// The pools whose rates finished attempts are charged at.
    pub fn with_pools(mut self, pools: PoolsSnapshot) -> Self {
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
        let mut failure = None;
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
                    if e.write_failure().is_some() {
                        tracing::debug!(error = %e, "store batch failed; it is rolled back");
                    } else {
                        tracing::error!(error = %e, "store batch failed; it is rolled back");
                    }
                    self.note_failure(&e);
                    failure = e.unwritable();
                    break;
                }
            }
        }
        let replies = ops
            .into_iter()
            .map(|mut op| {
                let why = match &failure {
                    Some(StoreError::Unwritable { full, reason }) => StoreError::Unwritable { full: *full, reason: reason.clone() },
                    _ => StoreError::Api(ApiError::new(ErrorKind::Internal, "the job store could not commit; try again")),
                };
                Box::new(move || {
                    fail_op(&mut op, why);
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
                        self.forget_uncommitted();
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
        self.fresh_jobs.clear();
        if let Err(e) = r {
            let _ = self.db.batch("ROLLBACK");
            self.forget_uncommitted();
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
                let mut r = $e;
                if let Err(e) = &r {
                    self.note_failure(e);
                    if let Some(u) = e.unwritable() {
                        r = Err(u);
                    }
                }
                let outcome = match &r {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_retryable() => Err(Some(StoreError::Retry(e.to_string()))),
                    Err(e) => {
                        if e.write_failure().is_some() {
                            // Said once, when the store became unwritable.
                            tracing::debug!(error = %e, "store operation failed");
                        } else if !matches!(e, StoreError::Api(_)) {
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
                // No new work while the disk refuses writes: it would be refused on the
                // way, or crowd out the output and results of what runs.
                let refused = self.health.as_ref().map(|h| StoreError::Unwritable { full: h.full, reason: h.reason.clone() });
                run!(
                    Submit,
                    match refused {
                        Some(e) => Err(e),
                        None => self.submit(*spec, &owner, key, &admission, now, s),
                    }
                )
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
                let r = self.started(worker, *lease, *now, s);
                let outcome = match r {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_retryable() => Err(Some(e)),
                    Err(_) => Err(None),
                };
                (Box::new(|_: &mut Op, _| {}), outcome)
            }
            Op::UsePools { pools } => {
                self.pools = pools.clone();
                (Box::new(|_: &mut Op, _| {}), Ok(()))
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
                // Renewals could not be stored while the store could not write: lease
                // clocks stop until it can (and then every running lease gets a full TTL).
                if self.health.is_some() {
                    tracing::debug!("lease expiry waits until the store can write");
                    run!(ExpireLeases, Ok(Vec::new()))
                } else {
                    run!(ExpireLeases, self.expire(now, s))
                }
            }
            Op::RestartLeases { now, ttl, .. } => {
                let (now, ttl) = (*now, *ttl);
                run!(RestartLeases, self.restart_leases(now, ttl))
            }
            Op::UseToken { token, worker, cert_fp, held, now, ttl, .. } => {
                let (token, worker, cert_fp, held, now, ttl) = (token.clone(), worker.clone(), cert_fp.clone(), held.clone(), *now, *ttl);
                run!(UseToken, self.use_token(&token, &worker, &cert_fp, held.as_deref(), now, ttl))
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
            Op::ExecStart { job, scope, spec, now, .. } => {
                let (job, scope, spec, now) = (job.clone(), scope.clone(), spec.clone(), *now);
                run!(ExecStart, self.exec_start(&job, &scope, &spec, now))
            }
            Op::ExecFinish { worker, lease, exec, outcome, now, .. } => {
                let (worker, lease, exec, outcome, now) = (worker.clone(), *lease, *exec, outcome.clone(), *now);
                run!(ExecFinish, self.exec_finish(&worker, lease, exec, &outcome, now, s))
            }
        }
    }

    fn meta(&mut self, job_seq: i64) -> Result<Arc<JobMeta>, StoreError> {
        if let Some(m) = self.jobs.get(&job_seq) {
            return Ok(m.clone());
        }
        let mut row = self.db.query_one("SELECT id, is_array, spec, owner, account, month, attempt_estimate FROM jobs WHERE seq = ?1", p![job_seq])?;
        let id = row.str(0)?;
        let spec = super::schema::decode_spec(&row.blob(2)?).ok_or_else(|| StoreError::Corrupt { job: id.clone() })?;
        let account = row.opt_str(4)?.unwrap_or(row.str(3)?);
        let attempt_estimate = decimal(&row.str(6)?, &id)?;
        let m = Arc::new(JobMeta {
            id: job_id(&id)?,
            is_array: row.bool(1)?,
            spec: Arc::new(spec),
            owner: row.str(3)?,
            account,
            month: row.str(5)?,
            attempt_estimate,
        });
        if self.fresh_jobs.contains(&job_seq) {
            return Ok(m);
        }
        if self.jobs.len() > 100_000 {
            self.jobs.clear();
        }
        self.jobs.insert(job_seq, m.clone());
        Ok(m)
    }

    /// Moves `n` tasks of a job between states (applied to its counts at the end of
    /// the batch). Every move of a task's state passes here, checked against the one
    /// table of legal moves (`JobState::can_move_to`).
    fn shift(&self, job_seq: i64, from: JobState, to: JobState, n: u64, s: &mut Scratch) -> Result<(), StoreError> {
        if !from.can_move_to(to) {
            return Err(StoreError::Api(ApiError::new(
                ErrorKind::Internal,
                format!(
                    "internal error: a task of job #{job_seq} cannot move from {from} to {to} (nothing was changed; this is a bug in berth, please report it)"
                ),
            )));
        }
        if n > 0 {
            s.moves.push((job_seq, from, to, n));
        }
        Ok(())
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
}

/// Answers an operation whose batch could not be committed, with why.
fn fail_op(op: &mut Op, why: StoreError) {
    macro_rules! fail {
        ($($variant:ident),*) => {
            match op {
                $(Op::$variant { reply, .. } => send(reply, Err(why), true),)*
                Op::Started { .. } | Op::UsePools { .. } => {}
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
        ForgetImage,
        ExecStart,
        ExecFinish
    );
}

pub(super) fn resolve(db: &mut dyn Db, sel: &JobSelector) -> Result<(i64, JobId), StoreError> {
    resolve_in(db, sel, &super::Scope::All)
}

/// `resolve` among the jobs in `scope`: one outside it is not found, with the same text.
pub(super) fn resolve_in(db: &mut dyn Db, sel: &JobSelector, scope: &super::Scope) -> Result<(i64, JobId), StoreError> {
    let hi = format!("{}~", sel.prefix);
    let (visible, by) = scope.sql(3);
    let mut params: Vec<Val> = vec![sel.prefix.as_str().into(), hi.into()];
    params.extend(by);
    let rows = db.query(&format!("SELECT seq, id FROM jobs WHERE id >= ?1 AND id < ?2 AND {visible} ORDER BY id LIMIT 6"), &params)?;
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
