//! Claims: the store queries the candidates, the scheduler picks, the store writes
//! the picks (task rows, leases, cursors, events).

use super::*;

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
}
