//! The JobStore actor: the only writer of job state. It forwards each operation to
//! the group-commit writer (`store`) and answers once the operation is durable.

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
}

impl JobStore {
    pub fn new(store: StoreHandle, lease_ttl: Duration) -> Self {
        JobStore { store, lease_ttl }
    }
}

impl Actor for JobStore {
    type Context = Context<Self>;
}

macro_rules! store_message {
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? } -> $out:ty, |$msg:ident, $store:ident, $ttl:ident| $body:expr) => {
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
                Box::pin(async move { $body })
            }
        }
    };
}

store_message!(
    /// Admit a submission (the budget has already said yes).
    Submit { spec: JobSpec, owner: String, idempotency_key: uuid::Uuid, admission: Admission } -> Submitted, |m, store, _ttl| {
    store.call(|reply| Op::Submit { spec: Box::new(m.spec), owner: m.owner, idempotency_key: m.idempotency_key, admission: m.admission, now: Utc::now(), reply }).await
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
    /// Record an attempt's result, if its lease is still the task's.
    Finish { worker: String, lease: LeaseId, outcome: Outcome } -> FinishVerdict, |m, store, _ttl| {
    store.call(|reply| Op::Finish { worker: m.worker, lease: m.lease, outcome: m.outcome, now: Utc::now(), reply }).await
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
    /// Renew leases; answers the ones that are stale.
    Heartbeat { worker: String, leases: Vec<LeaseId> } -> Vec<LeaseId>, |m, store, ttl| {
    store.call(|reply| Op::Heartbeat { worker: m.worker, leases: m.leases, now: Utc::now(), ttl, reply }).await
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
    /// Spend a one-time join token for a worker.
    UseToken { token: String, worker: String } -> (), |m, store, _ttl| {
    store.call(|reply| Op::UseToken { token: m.token, worker: m.worker, now: Utc::now(), reply }).await
});

store_message!(
    /// Record that an attempt was frozen into `image`.
    Frozen { worker: String, lease: LeaseId, outcome: Outcome, image: String } -> FinishVerdict, |m, store, _ttl| {
    store.call(|reply| Op::Frozen { worker: m.worker, lease: m.lease, outcome: m.outcome, image: m.image, now: Utc::now(), reply }).await
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
