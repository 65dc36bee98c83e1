//! Leases: renewal, a returning worker's reconcile, expiry and the restart grace.

use super::*;

impl<D: Db> Store<D> {
    pub(super) fn renew(&mut self, worker: &str, leases: &[LeaseId], now: DateTime<Utc>, ttl: Duration) -> Result<Vec<LeaseId>, StoreError> {
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
    pub(super) fn ended_here(&mut self, worker: &str, lease: LeaseId) -> Result<bool, StoreError> {
        let row = self.db.query_opt("SELECT state FROM tasks WHERE lease = ?1 AND worker = ?2", p![lease.to_string(), worker])?;
        Ok(match row {
            Some(r) => matches!(state_of(&r.str(0)?), JobState::Succeeded | JobState::Failed | JobState::TimedOut),
            None => false,
        })
    }

    pub(super) fn reconcile(
        &mut self,
        worker: &str,
        pool: &str,
        held: &[LeaseId],
        now: DateTime<Utc>,
        ttl: Duration,
        s: &mut Scratch,
    ) -> Result<Reconciled, StoreError> {
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
    pub(super) fn lose(
        &mut self,
        job_seq: i64,
        idx: i64,
        attempt: u32,
        worker: &str,
        now: DateTime<Utc>,
        why: &str,
        s: &mut Scratch,
    ) -> Result<bool, StoreError> {
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
                self.shift(job_seq, JobState::Running, JobState::Queued, 1, s)?;
                s.work = true;
                Ok(true)
            }
            Expiry::Fail => {
                let why = match meta.spec.session {
                    // `berth_shared::session::SessionState::of` reads a session as lost by this.
                    Some(_) => format!("lost: {why}; the session's files were on that worker"),
                    None => format!("{why}; out of attempts ({attempt} of {})", meta.spec.max_attempts),
                };
                self.db.exec(
                    "UPDATE tasks SET state = 'failed', lease = NULL, ended_at = ?1, reason = ?2 WHERE job_seq = ?3 AND idx = ?4",
                    p![ms(now), why.as_str(), job_seq, idx],
                )?;
                self.event(job_seq, index, now, JobState::Failed, attempt, Some(worker), Some(&why))?;
                self.shift(job_seq, JobState::Running, JobState::Failed, 1, s)?;
                s.notices.push(Notice::TaskEnded { job: meta.id, index: index.map(|i| i as u32), attempt, state: JobState::Failed });
                Ok(false)
            }
        }
    }

    pub(super) fn expire(&mut self, now: DateTime<Utc>, s: &mut Scratch) -> Result<Vec<Expired>, StoreError> {
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

    pub(super) fn restart_leases(&mut self, now: DateTime<Utc>, ttl: Duration) -> Result<u64, StoreError> {
        let floor = ms(lease::after_restart(DateTime::<Utc>::MIN_UTC, now, ttl));
        self.db.exec("UPDATE tasks SET lease_expires = ?1 WHERE state = 'running' AND lease_expires < ?1", p![floor])
    }
}
