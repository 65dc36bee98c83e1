//! The JobStore actor: the only writer of job state. It forwards each operation to
//! the group-commit writer (`store`) and answers once the operation is durable.
//!
//! While the store cannot write (`store::health`): a result waits here and is applied
//! once it can (the worker is answered then), and a heartbeat is answered without
//! renewing (lease expiry waits too, and every running lease gets a full TTL once the
//! store writes again), so a full disk neither loses a result nor ends a worker's link.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use berth_shared::ids::{JobId, JobSelector, LeaseId};
use berth_shared::job::{JobSpec, Outcome};
use chrono::Utc;

use crate::scheduler::WorkerCaps;
use crate::store::{Admission, Decided, Expired, FinishVerdict, FreezeOrder, KillOrder, Op, Reconciled, StoreError, StoreHandle, Submitted};

pub struct JobStore {
    store: StoreHandle,
    lease_ttl: Duration,
    /// The output cap of a job that sets none, in bytes.
    max_output: u64,
}

impl JobStore {
    pub fn new(store: StoreHandle, lease_ttl: Duration, max_output: u64) -> Self {
        JobStore { store, lease_ttl, max_output }
    }
}

/// Runs an operation until the store takes it: while the store cannot write, it waits
/// until the store can and is applied then (`build` makes it again each time).
async fn until_written<T>(store: &StoreHandle, build: impl Fn(crate::store::Tx<T>) -> Op) -> Result<T, StoreError> {
    loop {
        match store.call(&build).await {
            Err(e) if e.write_failure().is_some() => {
                tracing::debug!(error = %e, "the store cannot write; the operation waits until it can");
                store.writable().await;
                // The store may fail the same way again at once; do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

impl Actor for JobStore {
    type Context = Context<Self>;
}

macro_rules! store_message {
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? } -> $out:ty, |$msg:ident, $store:ident, $ttl:ident| $body:expr) => {
        store_message!($(#[$doc])* $name { $($field: $ty),* } -> $out, |$msg, $store, $ttl, _max_output| $body);
    };
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? } -> $out:ty, |$msg:ident, $store:ident, $ttl:ident, $max_output:ident| $body:expr) => {
        $(#[$doc])*
        pub struct $name { $(pub $field: $ty),* }

        impl Message for $name {
            type Result = Result<$out, StoreError>;
        }

        impl Handler<$name> for JobStore {
            type Result = ResponseFuture<Result<$out, StoreError>>;
            fn handle(&mut self, $msg: $name, _: &mut Self::Context) -> Self::Result {
                let $store = self.store.clone();
                let $ttl = self.lease_ttl;
                let $max_output = self.max_output;
                Box::pin(async move { $body })
            }
        }
    };
}

store_message!(
    /// Admit a submission (the budget has already said yes). A job that sets no output
    /// cap gets the coordinator's default, kept with it.
    Submit { spec: JobSpec, owner: String, idempotency_key: uuid::Uuid, admission: Admission } -> Submitted, |m, store, _ttl, max_output| {
    let mut spec = m.spec;
    spec.max_output.get_or_insert(max_output);
    store.call(|reply| Op::Submit { spec: Box::new(spec), owner: m.owner, idempotency_key: m.idempotency_key, admission: m.admission, now: Utc::now(), reply }).await
});

store_message!(
    /// Approve or reject a job held for approval.
    Decide { job: JobSelector, approve: bool, by: String, reason: String } -> Decided, |m, store, _ttl| {
    store.call(|reply| Op::Decide { job: m.job, approve: m.approve, by: m.by, reason: m.reason, now: Utc::now(), reply }).await
});

store_message!(
    /// Set an account's caps.
    SetBudget { account: String, run: rust_decimal::Decimal, month: rust_decimal::Decimal, by: String } -> (), |m, store, _ttl| {
    store.call(|reply| Op::SetBudget { account: m.account, run: m.run, month: m.month, by: m.by, now: Utc::now(), reply }).await
});

store_message!(
    /// Claim up to `n` tasks for a worker; each comes with a fresh lease.
    Claim { worker: String, n: u32, caps: Arc<WorkerCaps>, free: Option<crate::store::Free> } -> crate::store::Claimed, |m, store, ttl| {
    store.call(|reply| Op::Claim { worker: m.worker, n: m.n, caps: m.caps, free: m.free, now: Utc::now(), ttl, reply }).await
});

store_message!(
    /// Record an attempt's result, if its lease is still the task's (waiting while the
    /// store cannot write).
    Finish { worker: String, lease: LeaseId, outcome: Outcome } -> FinishVerdict, |m, store, _ttl| {
    until_written(&store, |reply| Op::Finish { worker: m.worker.clone(), lease: m.lease, outcome: m.outcome.clone(), now: Utc::now(), reply }).await
});

store_message!(
    /// Number and record an exec of a ready session, and say where to send it.
    ExecStart { job: JobSelector, scope: crate::store::Scope, spec: berth_shared::session::ExecSpec } -> crate::store::engine::ExecOrder, |m, store, _ttl| {
    store.call(|reply| Op::ExecStart { job: m.job, scope: m.scope, spec: m.spec, now: Utc::now(), reply }).await
});

store_message!(
    /// Record how an exec ended, if its lease is still its session's (waiting while the
    /// store cannot write).
    ExecFinish { worker: String, lease: LeaseId, exec: u32, outcome: Outcome } -> FinishVerdict, |m, store, _ttl| {
    until_written(&store, |reply| Op::ExecFinish { worker: m.worker.clone(), lease: m.lease, exec: m.exec, outcome: m.outcome.clone(), now: Utc::now(), reply }).await
});

/// Record that an attempt's process started (no answer needed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Started {
    pub worker: String,
    pub lease: LeaseId,
}

impl Handler<Started> for JobStore {
    type Result = ();
    fn handle(&mut self, m: Started, _: &mut Self::Context) {
        let _ = self.store.send(Op::Started { worker: m.worker, lease: m.lease, now: Utc::now() });
    }
}

store_message!(
    /// Renew leases; answers the ones that are stale. While the store cannot write,
    /// answered with none stale and nothing renewed: lease expiry waits too.
    Heartbeat { worker: String, leases: Vec<LeaseId> } -> Vec<LeaseId>, |m, store, ttl| {
    match store.call(|reply| Op::Heartbeat { worker: m.worker, leases: m.leases, now: Utc::now(), ttl, reply }).await {
        Err(e) if e.write_failure().is_some() => Ok(Vec::new()),
        other => other,
    }
});

store_message!(
    /// A worker (re)registered holding these leases.
    Reconcile { worker: String, pool: String, held: Vec<LeaseId> } -> Reconciled, |m, store, ttl| {
    store.call(|reply| Op::Reconcile { worker: m.worker, pool: m.pool, held: m.held, now: Utc::now(), ttl, reply }).await
});

store_message!(
    /// Cancel a job or one task of an array.
    Cancel { job: JobSelector, reason: String } -> (JobId, u64, Vec<KillOrder>), |m, store, _ttl| {
    store.call(|reply| Op::Cancel { job: m.job, reason: m.reason, now: Utc::now(), reply }).await
});

store_message!(
    /// Re-queue or fail tasks whose lease ran out.
    ExpireLeases {} -> Vec<Expired>, |_m, store, _ttl| {
    store.call(|reply| Op::ExpireLeases { now: Utc::now(), reply }).await
});

store_message!(
    /// On start-up: give every running lease a full TTL.
    RestartLeases {} -> u64, |_m, store, ttl| {
    store.call(|reply| Op::RestartLeases { now: Utc::now(), ttl, reply }).await
});

store_message!(
    /// Spend a one-time join token for a worker whose certificate has fingerprint
    /// `cert_fp`; `held` says why the registry thinks the name is in use, if it does.
    UseToken { token: String, worker: String, cert_fp: String, held: Option<String> } -> (), |m, store, ttl| {
    store.call(|reply| Op::UseToken { token: m.token, worker: m.worker, cert_fp: m.cert_fp, held: m.held, now: Utc::now(), ttl, reply }).await
});

store_message!(
    /// Record that an attempt was frozen into `image` (waiting while the store cannot
    /// write).
    Frozen { worker: String, lease: LeaseId, outcome: Outcome, image: String } -> FinishVerdict, |m, store, _ttl| {
    until_written(&store, |reply| Op::Frozen { worker: m.worker.clone(), lease: m.lease, outcome: m.outcome.clone(), image: m.image.clone(), now: Utc::now(), reply }).await
});

store_message!(
    /// Check a freeze request and reserve its image name.
    FreezeStart { job: JobSelector, tag: Option<String>, by: String, admin: bool } -> FreezeOrder, |m, store, _ttl| {
    store.call(|reply| Op::FreezeStart { job: m.job, tag: m.tag, by: m.by, admin: m.admin, now: Utc::now(), reply }).await
});

store_message!(
    /// Forget a frozen image (removed, or only a reservation when `only_reserved`).
    ForgetImage { image: String, only_reserved: bool } -> (), |m, store, _ttl| {
    store.call(|reply| Op::ForgetImage { image: m.image, only_reserved: m.only_reserved, reply }).await
});

store_message!(
    /// Drain or undrain a worker.
    SetDrain { worker: String, drained: bool } -> bool, |m, store, _ttl| {
    store.call(|reply| Op::SetDrain { worker: m.worker, drained: m.drained, reply }).await
});

/// The store's work signal: bumped after every commit that may have made work
/// claimable (a submission, a requeue, an undrain), so idle worker links wake.
#[derive(Message)]
#[rtype(result = "tokio::sync::watch::Receiver<u64>")]
pub struct WorkSignal;

impl Handler<WorkSignal> for JobStore {
    type Result = MessageResult<WorkSignal>;
    fn handle(&mut self, _: WorkSignal, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.store.work.subscribe())
    }
}

/// Whether the store can write, from now on (`store::health`).
#[derive(Message)]
#[rtype(result = "tokio::sync::watch::Receiver<crate::store::health::Health>")]
pub struct HealthWatch;

impl Handler<HealthWatch> for JobStore {
    type Result = MessageResult<HealthWatch>;
    fn handle(&mut self, _: HealthWatch, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.store.health.subscribe())
    }
}

/// The coordinator's default output cap (bytes), for `berth status`.
#[derive(Message)]
#[rtype(result = "u64")]
pub struct DefaultMaxOutput;

impl Handler<DefaultMaxOutput> for JobStore {
    type Result = u64;
    fn handle(&mut self, _: DefaultMaxOutput, _: &mut Self::Context) -> u64 {
        self.max_output
    }
}

/// Route and charge by these pools from now on (the Budget actor, their owner, sends
/// each snapshot it loads).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UsePools {
    pub pools: crate::store::PoolsSnapshot,
}

impl Handler<UsePools> for JobStore {
    type Result = ();
    fn handle(&mut self, m: UsePools, _: &mut Self::Context) {
        let _ = self.store.send(Op::UsePools { pools: m.pools });
    }
}
