//! Freeze reservations: a running Docker task's image name, checked and reserved
//! before the worker is asked to commit it.

use super::*;

impl<D: Db> Store<D> {
    /// Checks a freeze request and reserves its image name: the task must be a running
    /// Docker task of `by` (or `by` an admin), the name free (a reservation of a freeze
    /// that never finished does not hold it).
    pub(super) fn freeze_start(
        &mut self,
        sel: &JobSelector,
        tag: Option<String>,
        by: &str,
        admin: bool,
        now: DateTime<Utc>,
    ) -> Result<FreezeOrder, StoreError> {
        let (job_seq, job) = resolve(&mut self.db, sel)?;
        let meta = self.meta(job_seq)?;
        let owner = self.db.query_one("SELECT owner FROM jobs WHERE seq = ?1", p![job_seq])?.str(0)?;
        if !admin && owner != by {
            return Err(refused(format!("job {job} belongs to {owner}; only its owner or an admin may freeze it")));
        }
        if !matches!(meta.spec.executor, berth_shared::job::Executor::Docker { .. }) {
            return Err(invalid(format!("job {job} runs as a process, not in a container: only Docker jobs (--image) can be frozen")));
        }
        let idx = match (meta.is_array, sel.index) {
            (false, Some(i)) => return Err(invalid(format!("job {job} is not an array: drop the `:{i}`"))),
            (false, None) => 0,
            (true, None) => return Err(invalid(format!("job {job} is an array: freeze one task, as {}:INDEX", job.short()))),
            (true, Some(i)) => i64::from(i),
        };
        let what = match sel.index {
            Some(i) => format!("task {i} of job {job}"),
            None => format!("job {job}"),
        };
        let sql = format!("SELECT state, worker, lease FROM tasks WHERE job_seq = ?1 AND idx = ?2{}", self.db.for_update());
        let (state, worker, lease) = match self.db.query_opt(&sql, p![job_seq, idx])? {
            Some(r) => (state_of(&r.str(0)?), r.opt_str(1)?, r.opt_str(2)?),
            None => (JobState::Queued, None, None),
        };
        let (JobState::Running, Some(worker), Some(lease)) = (state, worker, lease) else {
            return Err(invalid(format!("{what} is {state}, not running: only a running task can be frozen")));
        };
        let lease = lease_of(&lease, &job)?;
        let tag = match tag {
            Some(t) => t,
            None => match sel.index {
                Some(i) => format!("{}-{i}", job.short()),
                None => job.short(),
            },
        };
        berth_shared::job::validate_tag(&tag).map_err(invalid)?;
        let image = format!("{}:{tag}", berth_shared::job::FROZEN_REPO);
        if let Some(r) = self.db.query_opt("SELECT state, job_seq, idx FROM images WHERE name = ?1", p![image.as_str()])? {
            let (st, other_seq, other_idx) = (r.str(0)?, r.i64(1)?, r.i64(2)?);
            let other = self.db.query_opt("SELECT state FROM tasks WHERE job_seq = ?1 AND idx = ?2", p![other_seq, other_idx])?;
            let other_running = other.map(|o| o.str(0)).transpose()?.is_some_and(|s| s == "running");
            if st != "freezing" || other_running {
                let from = self.db.query_one("SELECT id FROM jobs WHERE seq = ?1", p![other_seq])?.str(0)?;
                return Err(invalid(if st == "freezing" {
                    format!("image {image} is being made (a freeze of job {from} is in progress): wait for it, or give another --tag")
                } else {
                    format!("image {image} already exists (frozen from job {from}): give another --tag, or remove it with `berth images rm {image}`")
                }));
            }
            // A freeze that was asked for and never finished.
            self.db.exec("DELETE FROM images WHERE name = ?1", p![image.as_str()])?;
        }
        if let Some(r) = self.db.query_opt("SELECT name FROM images WHERE job_seq = ?1 AND idx = ?2 AND state = 'freezing'", p![job_seq, idx])? {
            return Err(invalid(format!("{what} is being frozen already (into {}): wait for it", r.str(0)?)));
        }
        self.db.exec(
            "INSERT INTO images(name, job_seq, idx, worker, owner, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'freezing', ?6)",
            p![image.as_str(), job_seq, idx, worker.as_str(), owner.as_str(), ms(now)],
        )?;
        Ok(FreezeOrder { job, index: Self::task_index(&meta, idx), worker, lease, tag, image })
    }

    pub(super) fn forget_image(&mut self, image: &str, only_reserved: bool) -> Result<(), StoreError> {
        if only_reserved {
            self.db.exec("DELETE FROM images WHERE name = ?1 AND state = 'freezing'", p![image])?;
        } else {
            self.db.exec("DELETE FROM images WHERE name = ?1", p![image])?;
        }
        Ok(())
    }
}

/// The tag of a frozen image's name (`berth-frozen:TAG`), checked.
pub(super) fn frozen_tag(image: &str) -> Result<&str, StoreError> {
    let tag = image
        .strip_prefix(berth_shared::job::FROZEN_REPO)
        .and_then(|t| t.strip_prefix(':'))
        .ok_or_else(|| invalid(format!("`{image}` is not a frozen image name ({}:TAG)", berth_shared::job::FROZEN_REPO)))?;
    berth_shared::job::validate_tag(tag).map_err(invalid)?;
    Ok(tag)
}
