//! Sessions' execs: numbered per session when they start, recorded once when they
//! end (fenced by the session's lease, as a task's result is). A session itself is a
//! one-task job: its claim, lease, end and money are the job paths'.

use berth_shared::session::{ExecEnd, ExecSpec};

use super::*;

/// An exec to send to the session's worker.
#[derive(Clone, Debug)]
pub struct ExecOrder {
    pub exec: u32,
    pub job: JobId,
    pub worker: String,
    pub lease: LeaseId,
    /// The session's row, for reading the exec's output back.
    pub job_seq: i64,
}

/// Output of exec `exec` is stored under this stream code (the session's own task
/// output, if any, under 0 and 1).
pub(crate) fn exec_stream_code(exec: u32, stream: OutStream) -> i64 {
    2 * i64::from(exec) + stream_code(stream)
}

impl<D: Db> Store<D> {
    /// An attempt's process started, or a session's sandbox is ready (said at once, so
    /// whoever waits on the session's open is told).
    pub(super) fn started(&mut self, worker: &str, lease: LeaseId, now: DateTime<Utc>, s: &mut Scratch) -> Result<(), StoreError> {
        let row = self.db.query_opt(
            "UPDATE tasks SET started_at = ?1 WHERE lease = ?2 AND worker = ?3 AND state = 'running' RETURNING job_seq",
            p![ms(now), lease.to_string(), worker],
        )?;
        if let Some(r) = row {
            let job_seq = r.i64(0)?;
            let meta = self.meta(job_seq)?;
            if meta.spec.session.is_some() {
                // The claim dates a task's start; a session is ready only once its worker says so.
                self.db.exec("UPDATE tasks SET ready_at = ?1 WHERE job_seq = ?2 AND idx = 0", p![ms(now), job_seq])?;
                s.notices.push(Notice::SessionReady { job: meta.id, worker: worker.to_string() });
            }
        }
        Ok(())
    }

    /// Numbers and records an exec of a ready session (`job`, among those in the
    /// caller's `scope`: its own, or any for an admin), and says where to send it.
    pub(super) fn exec_start(&mut self, job: &JobSelector, scope: &Scope, spec: &ExecSpec, now: DateTime<Utc>) -> Result<ExecOrder, StoreError> {
        let (job_seq, id) = resolve_in(&mut self.db, job, scope)?;
        let meta = self.meta(job_seq)?;
        if meta.spec.session.is_none() {
            return Err(invalid(format!("job {id} is not a session: `berth session open` makes one")));
        }
        let sql = format!("SELECT state, worker, lease FROM tasks WHERE job_seq = ?1 AND idx = 0{}", self.db.for_update());
        let task = self.db.query_opt(&sql, p![job_seq])?;
        let (state, worker, lease) = match task {
            Some(r) => (state_of(&r.str(0)?), r.opt_str(1)?, r.opt_str(2)?),
            None => (state_of(&self.db.query_one("SELECT state FROM jobs WHERE seq = ?1", p![job_seq])?.str(0)?), None, None),
        };
        let (JobState::Running, Some(worker), Some(lease)) = (state, worker, lease) else {
            let what = match state {
                JobState::PendingApproval | JobState::Queued => "is still opening (waiting for a slot or an approval)".to_string(),
                s => format!("has ended ({s})"),
            };
            return Err(StoreError::Api(ApiError::new(ErrorKind::Refused, format!("session {id} {what}: it runs no command"))));
        };
        let lease = lease_of(&lease, &id)?;
        let running = self.db.query_one("SELECT COUNT(*) FROM execs WHERE job_seq = ?1 AND ended_at IS NULL", p![job_seq])?.i64(0)?;
        if running as usize >= berth_shared::session::MAX_CONCURRENT_EXECS {
            return Err(StoreError::Api(ApiError::new(
                ErrorKind::Refused,
                format!("session {id} already runs {running} execs, the most at once: wait for one to end"),
            )));
        }
        let exec = self.db.query_one("SELECT COALESCE(MAX(exec), 0) FROM execs WHERE job_seq = ?1", p![job_seq])?.i64(0)? as u32 + 1;
        let argv = serde_json::to_string(&spec.argv).map_err(|e| invalid(format!("the command cannot be recorded: {e}")))?;
        self.db.exec(
            "INSERT INTO execs(job_seq, exec, lease, argv, started_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            p![job_seq, exec, lease.to_string(), argv, ms(now)],
        )?;
        Ok(ExecOrder { exec, job: id, worker, lease, job_seq })
    }

    /// Records how an exec ended, if `lease` is still its session's (or the session was
    /// just closed and this is its last word).
    pub(super) fn exec_finish(
        &mut self,
        worker: &str,
        lease: LeaseId,
        exec: u32,
        o: &Outcome,
        now: DateTime<Utc>,
        s: &mut Scratch,
    ) -> Result<FinishVerdict, StoreError> {
        let Some(task) = self.db.query_opt(
            "SELECT job_seq FROM tasks WHERE lease = ?1 AND worker = ?2
               AND (state = 'running' OR (state = 'cancelled' AND exit_code IS NULL AND runtime_ms IS NULL))",
            p![lease.to_string(), worker],
        )?
        else {
            return Ok(if self.ended_here(worker, lease)? { FinishVerdict::AlreadyRecorded } else { FinishVerdict::Stale });
        };
        let job_seq = task.i64(0)?;
        let end = ExecEnd::of(exec, o);
        let n = self.db.exec(
            "UPDATE execs SET ended_at = ?1, exit_code = ?2, timed_out = ?3, reason = ?4, runtime_ms = ?5
             WHERE job_seq = ?6 AND exec = ?7 AND lease = ?8 AND ended_at IS NULL",
            p![ms(now), end.exit_code, end.timed_out, end.reason.as_deref(), o.runtime_ms, job_seq, exec, lease.to_string()],
        )?;
        if n == 0 {
            return Ok(FinishVerdict::AlreadyRecorded);
        }
        let meta = self.meta(job_seq)?;
        s.notices.push(Notice::ExecEnded { job: meta.id, end });
        Ok(FinishVerdict::Recorded)
    }
}
