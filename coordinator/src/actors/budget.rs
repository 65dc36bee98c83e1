//! Budget: the owner of the pools and their rates (reloaded on SIGHUP, keeping the
//! last good file when a new one does not parse; each new snapshot is handed to the
//! job store, which routes and charges by it), and the estimate each submission is
//! admitted with.
//! The cap check itself happens in the job store, inside the transaction that makes
//! the job, under the account's ledger row lock: that is the single serialisation
//! point for spend, on SQLite and across coordinators on PostgreSQL.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use berth_shared::job::JobSpec;
use berth_shared::wire::{ApiError, ErrorKind};
use rust_decimal::Decimal;

use crate::actors::job_store::{JobStore, UsePools};
use crate::ledger;
use crate::pools::{Pool, Pools};
use crate::store::Admission;

pub struct Budget {
    pools: Arc<Pools>,
    file: Option<PathBuf>,
    job_store: Addr<JobStore>,
}

impl Budget {
    /// `pools` is what the store was opened with.
    pub fn new(pools: Arc<Pools>, file: Option<PathBuf>, job_store: Addr<JobStore>) -> Self {
        Budget { pools, file, job_store }
    }

    pub fn snapshot(&self) -> Arc<Pools> {
        self.pools.clone()
    }
}

impl Actor for Budget {
    type Context = Context<Self>;
}

/// Works out a submission's account, estimate and whether it needs approval; the
/// spec may be narrowed (a job with no max runtime is kept to free pools).
#[derive(Message)]
#[rtype(result = "Result<(JobSpec, Admission), ApiError>")]
pub struct Admit {
    pub spec: JobSpec,
    pub owner: String,
}

impl Handler<Admit> for Budget {
    type Result = Result<(JobSpec, Admission), ApiError>;
    fn handle(&mut self, m: Admit, _: &mut Self::Context) -> Self::Result {
        admission(&self.snapshot(), m.spec, &m.owner)
    }
}

/// The admission of `spec` under `pools`: plain code, so it is tested without actors.
pub fn admission(pools: &Pools, mut spec: JobSpec, owner: &str) -> Result<(JobSpec, Admission), ApiError> {
    let account = spec.account.clone().filter(|a| !a.trim().is_empty()).unwrap_or_else(|| owner.to_string());
    // The account is named from here on: workers check a secret's accounts against it.
    spec.account = Some(account.clone());
    let eligible = pools.eligible(&spec.pools).map_err(|e| ApiError::new(ErrorKind::Invalid, e))?;
    let r = spec.resources.clone();
    let max_runtime = match spec.max_runtime_ms {
        Some(ms) => ms,
        None => {
            let free: Vec<&Pool> = eligible.iter().copied().filter(|p| p.is_free()).collect();
            if free.is_empty() {
                return Err(ApiError::new(
                    ErrorKind::Refused,
                    "refused by the budget: a job with no max runtime cannot go to a paid pool (its cost has no upper bound): give --max-runtime",
                ));
            }
            if free.len() < eligible.len() {
                // Free pools can take it: keep it there, where no bound is needed.
                spec.pools = free.iter().map(|p| p.name.clone()).collect();
            }
            return Ok((spec, Admission { account, ..Admission::default() }));
        }
    };
    // The costliest eligible pool bounds what any attempt can cost.
    let costliest = eligible
        .iter()
        .copied()
        .map(|p| (ledger::task_estimate(max_runtime, p.idle_tail_s, p.usd_per_s(r.gpus, r.millicpus, r.mem_mib), 1), p))
        .max_by(|a, b| a.0.cmp(&b.0));
    let Some((attempt_estimate, pool)) = costliest else {
        return Ok((spec, Admission { account, ..Admission::default() }));
    };
    let run = attempt_estimate * Decimal::from(spec.max_attempts) * Decimal::from(spec.task_count());
    let needs_approval = !run.is_zero() && pool.approval_threshold_usd.is_some_and(|t| run >= t);
    Ok((spec, Admission { account, attempt_estimate, run_estimate: run, needs_approval }))
}

/// The pool a worker joins, if it exists.
#[derive(Message)]
#[rtype(result = "Result<Pool, String>")]
pub struct JoinPool {
    pub pool: String,
}

impl Handler<JoinPool> for Budget {
    type Result = Result<Pool, String>;
    fn handle(&mut self, m: JoinPool, _: &mut Self::Context) -> Self::Result {
        let pools = self.snapshot();
        pools.get(&m.pool).cloned().ok_or_else(|| format!("unknown pool `{}`: the coordinator's pools are {}", m.pool, pools.names().join(", ")))
    }
}

/// Re-reads the pools file (SIGHUP). A file that does not parse changes nothing.
#[derive(Message)]
#[rtype(result = "Result<usize, String>")]
pub struct Reload;

impl Handler<Reload> for Budget {
    type Result = Result<usize, String>;
    fn handle(&mut self, _: Reload, _: &mut Self::Context) -> Self::Result {
        let Some(file) = &self.file else { return Ok(self.snapshot().pools.len()) };
        match Pools::from_file(file) {
            Ok(p) => {
                let n = p.pools.len();
                self.pools = Arc::new(p);
                self.job_store.do_send(UsePools { pools: self.pools.clone() });
                tracing::info!(pools = n, file = %file.display(), "pools reloaded");
                Ok(n)
            }
            Err(e) => {
                tracing::error!(error = %e, "the pools file does not parse; keeping the pools in use");
                Err(e)
            }
        }
    }
}

/// The pools in use.
#[derive(Message)]
#[rtype(result = "Arc<Pools>")]
pub struct Snapshot;

impl Handler<Snapshot> for Budget {
    type Result = MessageResult<Snapshot>;
    fn handle(&mut self, _: Snapshot, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::job::{ArrayRange, Command};
    use std::str::FromStr;

    fn pools() -> Pools {
        Pools::parse(
            r#"
[[pool]]
name = "lab"
kind = "lan"
[[pool]]
name = "cloud"
kind = "cloud"
gpu_usd_per_s = "0.001"
idle_tail_s = 60
approval_threshold_usd = 10
"#,
        )
        .expect("pools")
    }

    fn gpu_job(runtime_s: u64) -> JobSpec {
        let mut s = JobSpec::new(Command::Argv(vec!["train".into()]));
        s.resources.gpus = 1;
        s.max_runtime_ms = Some(runtime_s * 1000);
        s.max_attempts = 2;
        s
    }

    #[test]
    fn the_estimate_is_the_costliest_eligible_pool_times_attempts() {
        let (_, a) = admission(&pools(), gpu_job(240), "alice").expect("admitted");
        // (240 s + 60 s tail) × $0.001 = $0.30 per attempt.
        assert_eq!(a.attempt_estimate, Decimal::from_str("0.3").expect("dec"));
        assert_eq!(a.account, "alice");
        assert!(!a.needs_approval, "2 × 0.30 is under the $10 threshold");
        let mut big = gpu_job(3600);
        big.array = Some(ArrayRange { start: 1, end: 4 });
        let (_, a) = admission(&pools(), big, "alice").expect("admitted");
        assert!(a.needs_approval, "4 tasks × 2 attempts × $3.66 reaches $10");
        // Named free pools only: nothing to reserve.
        let mut lab = gpu_job(3600);
        lab.pools = vec!["lab".into()];
        assert!(admission(&pools(), lab, "alice").expect("ok").1.attempt_estimate.is_zero());
    }

    #[test]
    fn no_max_runtime_keeps_a_job_to_free_pools_or_refuses_it() {
        let mut open = gpu_job(1);
        open.max_runtime_ms = None;
        let (spec, a) = admission(&pools(), open.clone(), "bob").expect("free pools can take it");
        assert!(a.attempt_estimate.is_zero());
        assert!(!spec.pools.contains(&"cloud".to_string()), "{:?}", spec.pools);
        open.pools = vec!["cloud".into()];
        let e = admission(&pools(), open, "bob").expect_err("only paid pools");
        assert!(e.message.contains("no max runtime"), "{}", e.message);
        let mut unknown = gpu_job(1);
        unknown.pools = vec!["mars".into()];
        assert!(admission(&pools(), unknown, "bob").expect_err("unknown").message.contains("unknown pool `mars`"));
    }
}
