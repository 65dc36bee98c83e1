//! The ledger in the store: reservations, settlement, approvals and caps, under the
//! account's ledger row lock (the single serialisation point for spend).

use super::*;

impl<D: Db> Store<D> {
    /// The account's usage in `month`, its ledger row locked for this transaction.
    pub(super) fn usage(&mut self, account: &str, month: &str) -> Result<Usage, StoreError> {
        self.db.exec("INSERT INTO ledger(account, month, reserved, spent) VALUES (?1, ?2, '0', '0') ON CONFLICT DO NOTHING", p![account, month])?;
        let sql = format!("SELECT reserved, spent FROM ledger WHERE account = ?1 AND month = ?2{}", self.db.for_update());
        let row = self.db.query_one(&sql, p![account, month])?;
        Ok(Usage { reserved: decimal(&row.str(0)?, account)?, spent: decimal(&row.str(1)?, account)? })
    }

    pub(super) fn write_usage(&mut self, account: &str, month: &str, u: Usage) -> Result<(), StoreError> {
        self.db.exec(
            "UPDATE ledger SET reserved = ?1, spent = ?2 WHERE account = ?3 AND month = ?4",
            p![u.reserved.normalize().to_string(), u.spent.normalize().to_string(), account, month],
        )?;
        Ok(())
    }

    pub(super) fn caps(&mut self, account: &str) -> Result<Caps, StoreError> {
        Ok(match self.db.query_opt("SELECT run_cap, month_cap FROM budgets WHERE account = ?1", p![account])? {
            Some(r) => Caps { run: decimal(&r.str(0)?, account)?, month: decimal(&r.str(1)?, account)? },
            None => Caps::default(),
        })
    }

    /// Checks `estimate` against the account's caps and reserves it, or refuses with
    /// the window and the numbers.
    pub(super) fn reserve(&mut self, account: &str, month: &str, estimate: Decimal) -> Result<(), StoreError> {
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
    pub(super) fn settle(&mut self, meta: &JobMeta, job_seq: i64, idx: i64, attempts: u32, actual: Decimal) -> Result<(), StoreError> {
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

    pub(super) fn worker_pool(&mut self, worker: &str) -> Result<String, StoreError> {
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
    pub(super) fn attempt_charge(&mut self, meta: &JobMeta, worker: &str, runtime_ms: u64) -> Decimal {
        if meta.attempt_estimate.is_zero() {
            return Decimal::ZERO;
        }
        let pool = self.worker_pool(worker).unwrap_or_else(|_| "default".into());
        let pools = &self.pools;
        let r = &meta.spec.resources;
        pools.get(&pool).map_or(Decimal::ZERO, |p| p.charge(r.gpus, r.millicpus, r.mem_mib, runtime_ms))
    }

    /// The charge for a running attempt that ends now without a result (lost lease,
    /// cancel): the time since it was claimed, at most its max runtime.
    pub(super) fn ran_for(&mut self, meta: &JobMeta, job_seq: i64, idx: i64, worker: &str, now: DateTime<Utc>) -> Result<Decimal, StoreError> {
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
    pub(super) fn decide(
        &mut self,
        sel: &JobSelector,
        approve: bool,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
        s: &mut Scratch,
    ) -> Result<Decided, StoreError> {
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
        self.shift(job_seq, JobState::PendingApproval, state, tasks, s)?;
        self.event(job_seq, None, now, state, 0, None, Some(&why))?;
        if state == JobState::Rejected {
            s.notices.push(Notice::TaskEnded { job, index: None, attempt: 0, state });
        }
        Ok(Decided { job, state, tasks })
    }

    pub(super) fn set_budget(&mut self, account: &str, run: Decimal, month: Decimal, by: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
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
}
