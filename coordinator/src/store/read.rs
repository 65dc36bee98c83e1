//! The read view: queries answered on a read connection of their own (status, list,
//! logs, exit codes, workers, images, budgets), never on the writer's.

use berth_shared::ids::{JobId, JobSelector};
use berth_shared::job::{Event, JobSpec, JobState};
use berth_shared::wire::{ApiError, ErrorKind, FrozenImage, JobStatus, JobSummary, TaskStatus};
use rust_decimal::Decimal;

use super::engine::{counts_from, decimal, from_ms, invalid, job_id, resolve_in, state_of, stream_of};
use super::sql::{p, Db, Row, Val};
use super::{BudgetRow, ExecRead, LogRead, Reader, Scope, StoreError};
use berth_shared::session::{ExecEnd, ExecInfo, SessionState};
use berth_shared::wire::{SessionStatus, SessionSummary};

/// A read-only view of the store for queries, on its own connection.
pub struct ReadView<D: Db> {
    db: D,
    segments: Option<super::segments::SegmentReader>,
}

impl<D: Db> ReadView<D> {
    /// Output rows (`stream, seq, data, seg, off, len`) as chunks, large ones read from
    /// their segment; `stream` is the stored code (an exec's output: its stream is the
    /// code's parity).
    fn chunks(&mut self, rows: Vec<Row>) -> Result<Vec<(berth_shared::wire::OutStream, u64, Vec<u8>)>, StoreError> {
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
            chunks.push((stream_of(r.i64(0)? % 2), r.u64(1)?, data));
        }
        Ok(chunks)
    }

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
        super::schema::decode_spec(&row.blob(1)?).ok_or(StoreError::Corrupt { job: id })
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
    fn session_ready(&mut self, job_seq: i64) -> Result<bool, StoreError> {
        let r = self.db.query_opt("SELECT ready_at FROM tasks WHERE job_seq = ?1 AND idx = 0 AND state = 'running'", p![job_seq])?;
        Ok(match r {
            Some(r) => r.opt_i64(0)?.is_some(),
            None => false,
        })
    }

    fn session_lease(&mut self, sel: &JobSelector, scope: &Scope) -> Result<(JobId, String, berth_shared::ids::LeaseId), StoreError> {
        let (job_seq, id) = self.resolve(sel, scope)?;
        if self.spec(job_seq)?.session.is_none() {
            return Err(invalid(format!("job {id} is not a session: `berth session open` makes one")));
        }
        let row = self.db.query_opt("SELECT state, worker, lease FROM tasks WHERE job_seq = ?1 AND idx = 0", p![job_seq])?;
        let (state, worker, lease) = match row {
            Some(r) => (state_of(&r.str(0)?), r.opt_str(1)?, r.opt_str(2)?),
            None => (JobState::Queued, None, None),
        };
        match (state, worker, lease.and_then(|l| l.parse::<uuid::Uuid>().ok())) {
            (JobState::Running, Some(w), Some(l)) => Ok((id, w, berth_shared::ids::LeaseId(l))),
            (s, _, _) => {
                let what = if s.is_terminal() { format!("has ended ({s})") } else { "is still opening".to_string() };
                Err(StoreError::Api(ApiError::new(ErrorKind::Refused, format!("session {id} {what}: nothing to copy to or from"))))
            }
        }
    }

    fn execs(&mut self, job_seq: i64) -> Result<Vec<ExecInfo>, StoreError> {
        let session_over = self.summary(job_seq)?.state.is_terminal();
        let rows =
            self.db.query("SELECT exec, argv, started_at, ended_at, exit_code, timed_out, reason FROM execs WHERE job_seq = ?1 ORDER BY exec", p![job_seq])?;
        rows.iter().map(|r| exec_row(r, session_over)).collect()
    }

    fn session(&mut self, sel: &JobSelector, scope: &Scope) -> Result<SessionStatus, StoreError> {
        let job = self.status(sel, scope)?;
        if job.spec.session.is_none() {
            return Err(invalid(format!("job {} is not a session: `berth status` shows it", job.summary.id)));
        }
        let (job_seq, _) = self.resolve(sel, scope)?;
        let execs = self.execs(job_seq)?;
        let task = job.task.as_ref();
        let executing = execs.iter().any(ExecInfo::running);
        let mut state = SessionState::of(task.map_or(job.summary.state, |t| t.state), task.and_then(|t| t.reason.as_deref()), executing);
        if state == SessionState::Ready && !self.session_ready(job_seq)? {
            // Claimed, its sandbox not ready yet.
            state = SessionState::Opening;
        }
        let (estimate, charged) = {
            let r = self.db.query_one("SELECT attempt_estimate FROM jobs WHERE seq = ?1", p![job_seq])?;
            let est = decimal(&r.str(0)?, &job.summary.id.to_string())?;
            let charged = match self.db.query_opt("SELECT charged FROM tasks WHERE job_seq = ?1 AND idx = 0", p![job_seq])? {
                Some(r) => decimal(&r.str(0)?, &job.summary.id.to_string())?,
                None => Decimal::ZERO,
            };
            (est, charged)
        };
        let reserved = if state.is_terminal() || job.summary.state == JobState::PendingApproval { Decimal::ZERO } else { estimate };
        Ok(SessionStatus { job, state, execs, reserved, spent: charged })
    }

    fn sessions(&mut self, limit: u32, scope: &Scope) -> Result<Vec<SessionSummary>, StoreError> {
        let mut params: Vec<Val> = vec![limit.into()];
        let (visible, by) = scope.sql(2);
        params.extend(by);
        let rows = self.db.query(
            &format!(
                "SELECT j.seq, j.id, j.name, j.state, j.owner, j.created_at, j.ended_at, t.state, t.worker, t.reason,
                        (SELECT COUNT(*) FROM execs e WHERE e.job_seq = j.seq),
                        (SELECT COUNT(*) FROM execs e WHERE e.job_seq = j.seq AND e.ended_at IS NULL), t.ready_at
                 FROM jobs j LEFT JOIN tasks t ON t.job_seq = j.seq AND t.idx = 0
                 WHERE j.kind = 'session' AND {visible} ORDER BY j.seq DESC LIMIT ?1"
            ),
            &params,
        )?;
        rows.iter()
            .map(|r| {
                let job_state = state_of(&r.str(3)?);
                let task_state = r.opt_str(7)?.map(|s| state_of(&s)).unwrap_or(job_state);
                let reason = r.opt_str(9)?;
                Ok(SessionSummary {
                    id: job_id(&r.str(1)?)?,
                    name: r.opt_str(2)?,
                    state: match SessionState::of(task_state, reason.as_deref(), r.i64(11)? > 0) {
                        SessionState::Ready if r.opt_i64(12)?.is_none() => SessionState::Opening,
                        s => s,
                    },
                    owner: r.str(4)?,
                    worker: r.opt_str(8)?,
                    opened_at: from_ms(r.i64(5)?),
                    ended_at: r.opt_i64(6)?.map(from_ms),
                    execs: r.i64(10)? as u32,
                    reason,
                })
            })
            .collect()
    }

    fn exec_logs(&mut self, job_seq: i64, exec: u32, after: (u64, u64)) -> Result<ExecRead, StoreError> {
        let session_over = self.summary(job_seq)?.state.is_terminal();
        let Some(row) = self.db.query_opt(
            "SELECT exec, argv, started_at, ended_at, exit_code, timed_out, reason, runtime_ms FROM execs WHERE job_seq = ?1 AND exec = ?2",
            p![job_seq, exec],
        )?
        else {
            let n = self.db.query_one("SELECT COUNT(*) FROM execs WHERE job_seq = ?1", p![job_seq])?.i64(0)?;
            let has = if n == 0 { "the session has run none".to_string() } else { format!("the session has execs 1 to {n}") };
            return Err(StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("there is no exec {exec}: {has}"))));
        };
        let info = exec_row(&row, session_over)?;
        let (out, err) = (
            super::engine::exec_stream_code(exec, berth_shared::wire::OutStream::Stdout),
            super::engine::exec_stream_code(exec, berth_shared::wire::OutStream::Stderr),
        );
        let rows = self.db.query(
            "SELECT stream, seq, data, seg, off, len FROM logs WHERE job_seq = ?1 AND idx = 0
             AND ((stream = ?2 AND seq > ?3) OR (stream = ?4 AND seq > ?5)) ORDER BY id LIMIT 512",
            p![job_seq, out, after.0, err, after.1],
        )?;
        let chunks = self.chunks(rows)?;
        let end = info.ended_at.map(|_| ExecEnd {
            exec,
            exit_code: info.exit_code,
            timed_out: info.timed_out,
            runtime_ms: row.opt_i64(7).ok().flatten().unwrap_or(0) as u64,
            reason: info.reason.clone(),
        });
        Ok(ExecRead { chunks, end })
    }

    fn resolve(&mut self, sel: &JobSelector, scope: &Scope) -> Result<(i64, JobId), StoreError> {
        resolve_in(&mut self.db, sel, scope)
    }

    fn summary(&mut self, job_seq: i64) -> Result<JobSummary, StoreError> {
        let sql = format!("SELECT {SUMMARY_COLS} FROM jobs WHERE seq = ?1");
        Ok(summary_row(&self.db.query_one(&sql, p![job_seq])?)?.1)
    }

    fn status(&mut self, sel: &JobSelector, scope: &Scope) -> Result<JobStatus, StoreError> {
        let (job_seq, job) = self.resolve(sel, scope)?;
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

    fn list(&mut self, state: Option<JobState>, limit: u32, scope: &Scope) -> Result<Vec<JobSummary>, StoreError> {
        // Filtered here, before the limit, so a page holds `limit` jobs the caller may see.
        let mut params: Vec<Val> = vec![limit.into()];
        let state_is = match state {
            Some(s) => {
                params.push(s.as_str().into());
                "state = ?2"
            }
            None => "1 = 1",
        };
        let (visible, by) = scope.sql(params.len() + 1);
        params.extend(by);
        let rows = self.db.query(&format!("SELECT {SUMMARY_COLS} FROM jobs WHERE {state_is} AND {visible} ORDER BY seq DESC LIMIT ?1"), &params)?;
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
            // Not started yet (or cancelled before it ran): attempt 1 is all there can be.
            if let Some(a) = attempt.filter(|a| *a != 1) {
                return Err(no_attempt(a, "the task has not run yet (its first will be attempt 1)".into()));
            }
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
        if attempt == 0 || attempt > current {
            let has = if current == 1 { "the task has attempt 1 only".to_string() } else { format!("the task has attempts 1 to {current}") };
            return Err(no_attempt(attempt, has));
        }
        let rows = self.db.query(
            "SELECT stream, seq, data, seg, off, len FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3
             AND ((stream = 0 AND seq > ?4) OR (stream = 1 AND seq > ?5)) ORDER BY id LIMIT 512",
            p![job_seq, idx, attempt, after.0, after.1],
        )?;
        let chunks = self.chunks(rows)?;
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

    fn worker_cert(&mut self, worker: &str) -> Result<Option<String>, StoreError> {
        Ok(match self.db.query_opt("SELECT cert_fp FROM workers WHERE name = ?1", p![worker])? {
            Some(r) => r.opt_str(0)?,
            None => None,
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

/// An `execs` row (`exec, argv, started_at, ended_at, exit_code, timed_out, reason`);
/// one its session outlived reads as ended with the session.
fn exec_row(r: &Row, session_over: bool) -> Result<ExecInfo, StoreError> {
    let started_at = from_ms(r.i64(2)?);
    let mut info = ExecInfo {
        exec: r.u32(0)?,
        argv: serde_json::from_str(&r.str(1)?).unwrap_or_default(),
        started_at,
        ended_at: r.opt_i64(3)?.map(from_ms),
        exit_code: r.opt_i32(4)?,
        timed_out: r.bool(5)?,
        reason: r.opt_str(6)?,
    };
    if info.ended_at.is_none() && session_over {
        info.ended_at = Some(started_at);
        info.reason = Some("the session ended while it ran".into());
    }
    Ok(info)
}

/// `berth logs --attempt N` for an attempt the task never had: not found, naming those it had.
fn no_attempt(attempt: u32, has: String) -> StoreError {
    StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("there is no attempt {attempt}: {has}")))
}
