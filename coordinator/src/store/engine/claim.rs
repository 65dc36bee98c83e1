//! Claims: the store queries the candidates, the scheduler picks, the store writes
//! the picks (task rows, leases, cursors, events).

use super::*;
use crate::scheduler::{Candidate, Kind, Round};

/// Jobs with unclaimed indices one claim looks at per account (an array is one job).
const JOBS_PER_ACCOUNT: usize = 16;
/// Accounts one claim looks at.
const ACCOUNTS: usize = 1000;

impl<D: Db> Store<D> {
    pub(super) fn drained(&mut self, worker: &str) -> Result<bool, StoreError> {
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
    pub(super) fn claim(
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
        let pools = self.pools.clone();

        // Candidates per account: re-queued tasks first (they have waited longest), then
        // jobs with unclaimed indices behind their cursor.
        let mut candidates = Vec::new();
        // Whether a look at the queue stopped at its bound with more behind it.
        let mut truncated = false;
        let sql = format!(
            "SELECT t.job_seq, t.idx, t.attempt, COALESCE(t.queued_at, j.created_at), j.account, j.owner FROM tasks t JOIN jobs j ON j.seq = t.job_seq
             WHERE t.state = 'queued' ORDER BY j.priority DESC, t.job_seq, t.idx LIMIT ?1{}",
            self.db.skip_locked_of("t")
        );
        let requeued_limit = i64::from(n).clamp(1, 256) * 4;
        let requeued = self.db.query(&sql, p![requeued_limit])?;
        truncated |= requeued.len() as i64 >= requeued_limit;
        for r in requeued {
            let (job_seq, account) = (r.i64(0)?, r.opt_str(4)?.unwrap_or(r.str(5)?));
            let spec = self.meta(job_seq)?.spec.clone();
            candidates.push(Candidate { job_seq, account, spec, queued_at_ms: r.i64(3)?, kind: Kind::Requeued { idx: r.i64(1)?, attempt: r.u32(2)? } });
        }
        let accounts =
            self.db.query(&format!("SELECT DISTINCT account FROM jobs WHERE next_idx <= idx_end AND held = 0 AND blocked = 0 LIMIT {ACCOUNTS}"), p![])?;
        truncated |= accounts.len() >= ACCOUNTS;
        let sql = format!(
            "SELECT seq, next_idx, idx_end, created_at FROM jobs WHERE account = ?1 AND next_idx <= idx_end AND held = 0 AND blocked = 0
             ORDER BY priority DESC, seq LIMIT {JOBS_PER_ACCOUNT}{}",
            self.db.skip_locked()
        );
        for a in accounts {
            let account = a.str(0)?;
            let jobs = self.db.query(&sql, p![account.as_str()])?;
            truncated |= jobs.len() >= JOBS_PER_ACCOUNT;
            for r in jobs {
                let job_seq = r.i64(0)?;
                let spec = self.meta(job_seq)?.spec.clone();
                candidates.push(Candidate {
                    job_seq,
                    account: account.clone(),
                    spec,
                    queued_at_ms: r.i64(3)?,
                    kind: Kind::Cursor { next: r.i64(1)?, end: r.i64(2)? },
                });
            }
        }
        if candidates.is_empty() {
            return Ok(out);
        }
        // What each account runs now, for the turns.
        let mut running = Vec::new();
        for r in self.db.query("SELECT account, CAST(SUM(n_running) AS BIGINT) FROM jobs WHERE n_running > 0 GROUP BY account", p![])? {
            running.push((r.str(0)?, r.opt_i64(1)?.unwrap_or(0).max(0) as u64));
        }
        let mut round = Round::new(caps, &pools, free.cloned(), n, candidates, &running, ms(now));
        while let Some(pick) = round.next_pick() {
            let (job_seq, idx) = (pick.job_seq, pick.idx);
            let lease = LeaseId::new();
            if pick.requeued {
                self.db.exec(
                    "UPDATE tasks SET state = 'running', lease = ?1, worker = ?2, lease_expires = ?3, started_at = ?4, ended_at = NULL,
                         exit_code = NULL, runtime_ms = NULL, reason = NULL WHERE job_seq = ?5 AND idx = ?6",
                    p![lease.to_string(), worker, expires, ms(now), job_seq, idx],
                )?;
            } else {
                let inserted = self.db.exec(
                    "INSERT INTO tasks(job_seq, idx, state, attempt, lease, worker, lease_expires, started_at)
                     VALUES (?1, ?2, 'running', 1, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    p![job_seq, idx, lease.to_string(), worker, expires, ms(now)],
                )?;
                if inserted == 0 {
                    // Already has a row (cancelled on its own before it ran).
                    continue;
                }
            }
            round.placed(&pick);
            let meta = self.meta(job_seq)?;
            self.event(job_seq, Some(idx).filter(|_| meta.is_array), now, JobState::Running, pick.attempt, Some(worker), Some(&pick.reason))?;
            self.shift(job_seq, JobState::Queued, JobState::Running, 1, s)?;
            out.tasks.push(Assignment {
                lease,
                job: meta.id,
                index: Self::task_index(&meta, idx),
                attempt: pick.attempt,
                spec: (*meta.spec).clone(),
                owner: meta.owner.clone(),
            });
        }
        let end = round.finish();
        // Cursors that advanced (to their end, or part of the way).
        for (job_seq, next) in end.cursors {
            self.db.exec("UPDATE jobs SET next_idx = ?1 WHERE seq = ?2", p![next, job_seq])?;
        }
        out.retry_in = end.retry_in;
        // Only when it took something: a bounded look whose every task fits nowhere
        // here must not be claimed again and again.
        out.more = truncated && !out.tasks.is_empty();
        Ok(out)
    }
}
