//! The coordinator's actors: one per responsibility, each the single writer of its
//! state. Handlers are thin: the logic lives in `store`, `lease` and friends.

pub mod budget;
pub mod job_store;
pub mod lease_recovery;
pub mod log_store;
pub mod reader;
pub mod registry;

use actix::Addr;

/// Addresses of every actor, handed to each connection.
#[derive(Clone)]
pub struct Actors {
    pub job_store: Addr<job_store::JobStore>,
    pub reader: Addr<reader::StoreReader>,
    pub budget: Addr<budget::Budget>,
    pub registry: Addr<registry::WorkerRegistry>,
    pub log_store: Addr<log_store::LogStore>,
    pub lease_recovery: Addr<lease_recovery::LeaseRecovery>,
}
