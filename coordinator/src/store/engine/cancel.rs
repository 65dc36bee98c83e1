//! Cancel: unclaimed tasks behind the cursor, materialised queued and running tasks,
//! with running attempts charged for their time and killed on their worker.

use super::*;

impl<D: Db> Store<D> {
    pub(super) fn cancel(&mut self, sel: &JobSelector, reason: &str, now: DateTime<Utc>, s: &mut Scratch) -> Result<(JobId, u64, Vec<KillOrder>), StoreError> {
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
                self.shift(job_seq, waiting, JobState::Cancelled, k, s)?;
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
                    self.shift(job_seq, waiting, JobState::Cancelled, 1, s)?;
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
            self.shift(job_seq, from, JobState::Cancelled, 1, s)?;
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
}
