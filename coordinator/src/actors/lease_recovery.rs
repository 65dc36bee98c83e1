//! LeaseRecovery: re-queues (or fails, out of attempts) tasks whose lease was not
//! renewed in time. Runs on an interval and on an explicit `RecoverNow`; idempotent.

use std::time::Duration;

use actix::prelude::*;

use super::job_store::{ExpireLeases, JobStore};

pub struct LeaseRecovery {
    job_store: Addr<JobStore>,
    every: Duration,
}

impl LeaseRecovery {
    pub fn new(job_store: Addr<JobStore>, every: Duration) -> Self {
        LeaseRecovery { job_store, every }
    }
}

impl Actor for LeaseRecovery {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.every, |_, ctx| ctx.notify(RecoverNow));
    }
}

/// Look for expired leases now.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct RecoverNow;

impl Handler<RecoverNow> for LeaseRecovery {
    type Result = ResponseFuture<usize>;
    fn handle(&mut self, _: RecoverNow, _: &mut Self::Context) -> Self::Result {
        let store = self.job_store.clone();
        Box::pin(async move {
            match store.send(ExpireLeases {}).await {
                Ok(Ok(expired)) => {
                    for e in &expired {
                        let task = match e.index {
                            Some(i) => format!("{}:{i}", e.job),
                            None => e.job.to_string(),
                        };
                        tracing::warn!(task = %task, lease = %e.lease, worker = %e.worker, requeued = e.requeued, "lease expired");
                    }
                    expired.len()
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "lease recovery failed");
                    0
                }
                Err(_) => 0,
            }
        })
    }
}
