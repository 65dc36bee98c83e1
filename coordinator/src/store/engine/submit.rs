//! Submission: a new job row (one row for a whole array), its reservation under the
//! account's ledger lock, its parents, and the idempotency key that makes a resend the
//! same submission.

use super::*;

impl<D: Db> Store<D> {
    pub(super) fn submit(
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
            let stored = super::super::schema::decode_spec(&row.blob(3)?);
            if stored.as_ref() != Some(&spec) {
                return Err(invalid(format!("idempotency key {key} was already used for job {job}, a different submission: use a new key")));
            }
            return Ok(Submitted { job, tasks: (row.i64(2)? - row.i64(1)? + 1) as u64, duplicate: true });
        }
        // The writer's own guard for operations that do not come through the client API
        // (which validates every submission, resumes included, before the budget sees it).
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
        let run_estimate = admission.run_estimate;
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
                              month, attempt_estimate, held, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)
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
                held,
                if spec.session.is_some() { "session" } else { "job" },
            ],
        )?;
        let Some(row) = inserted else {
            let row = self.db.query_one("SELECT id FROM jobs WHERE owner = ?1 AND idem = ?2", p![owner, key.as_str()])?;
            return Err(StoreError::Retry(format!("idempotency key raced with job {}", row.str(0)?)));
        };
        let seq = row.i64(0)?;
        self.fresh_jobs.insert(seq);
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
    pub(super) fn link_parents(&mut self, seq: i64, spec: &JobSpec) -> Result<Option<String>, StoreError> {
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
}
