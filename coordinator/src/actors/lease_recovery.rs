//! LeaseRecovery: re-queues (or fails, out of attempts) tasks whose lease was not
//! renewed in time, and tells the registry their workers no longer hold them. Runs on
//! an interval and on an explicit `RecoverNow`; idempotent.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;

use super::job_store::{ExpireLeases, JobStore, RestartLeases};
use super::registry::Leases;
use crate::store::cluster::Leadership;

pub struct LeaseRecovery {
    job_store: Addr<JobStore>,
    /// The registry, which lists what each worker holds.
    registry: Recipient<Leases>,
    every: Duration,
    leadership: Leadership,
    /// Whether this coordinator ran recovery last time it looked.
    leading: bool,
}

impl LeaseRecovery {
    /// `leadership` says whether this coordinator is the one that runs recovery (with
    /// SQLite always; with PostgreSQL, the holder of the advisory lock).
    pub fn new(job_store: Addr<JobStore>, registry: Recipient<Leases>, every: Duration, leadership: Leadership) -> Self {
        // A coordinator that starts has just given every lease a full TTL.
        LeaseRecovery { job_store, registry, every, leading: true, leadership }
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
        let registry = self.registry.clone();
        let leader = self.leadership.is_leader();
        let took_over = leader && !self.leading;
        self.leading = leader;
        Box::pin(async move {
            if !leader {
                return 0;
            }
            if took_over {
                // Taking over from a coordinator that died: its workers are failing over
                // to us, which is not their fault, so every lease gets a full TTL first.
                match store.send(RestartLeases {}).await {
                    Ok(Ok(n)) => tracing::info!(leases = n, "took over lease recovery; running leases get a full TTL"),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot renew leases on taking over lease recovery"),
                    Err(_) => return 0,
                }
            }
            match store.send(ExpireLeases {}).await {
                Ok(Ok(expired)) => {
                    let mut by_worker: BTreeMap<&str, Vec<_>> = BTreeMap::new();
                    for e in &expired {
                        let task = berth_shared::ids::TaskRef { job: e.job, index: e.index };
                        tracing::warn!(task = %task, lease = %e.lease, worker = %e.worker, requeued = e.requeued, "lease expired");
                        by_worker.entry(e.worker.as_str()).or_default().push(e.lease);
                    }
                    // The store no longer counts them as the worker's: neither may `berth workers`.
                    for (worker, removed) in by_worker {
                        registry.do_send(Leases { name: worker.to_string(), added: Vec::new(), removed, heartbeat: false });
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
