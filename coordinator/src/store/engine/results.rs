//! Results: an attempt's outcome recorded once, fenced by its lease, and settled
//! against its reservation.

use super::*;

impl<D: Db> Store<D> {
    /// Records an attempt's result; `frozen`: the attempt was frozen into that image.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
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
            self.shift(job_seq, JobState::Running, to, 1, s)?;
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
        self.expected_seq.remove(&(lease, 0, OutStream::Stdout));
        self.expected_seq.remove(&(lease, 0, OutStream::Stderr));
        if meta.spec.session.is_some() {
            // Its execs' hints go too (rare enough to look through them all).
            self.expected_seq.retain(|(l, _, _), _| *l != lease);
        }
        self.out_bytes.remove(&lease);
        s.notices.push(Notice::TaskEnded { job: meta.id, index, attempt, state: ended_as });
        Ok(verdict)
    }

    /// Records a frozen image as ready (its reservation, or a new row).
    pub(super) fn image_ready(&mut self, image: &str, job_seq: i64, idx: i64, worker: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.db.exec(
            "INSERT INTO images(name, job_seq, idx, worker, owner, state, created_at)
             VALUES (?1, ?2, ?3, ?4, (SELECT owner FROM jobs WHERE seq = ?2), 'ready', ?5)
             ON CONFLICT(name) DO UPDATE SET job_seq = excluded.job_seq, idx = excluded.idx, worker = excluded.worker,
                 owner = excluded.owner, state = 'ready', created_at = excluded.created_at",
            p![image, job_seq, idx, worker, ms(now)],
        )?;
        Ok(())
    }
}

pub(super) fn outcome_reason(o: &Outcome, max_runtime_ms: Option<u64>) -> Option<String> {
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
