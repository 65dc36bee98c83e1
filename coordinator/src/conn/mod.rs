//! Connections once their hello is accepted: the client API (`client`, with freeze
//! and resume in `freeze`) and a worker's link (`worker`). What every connection
//! handler shares lives here, so the endpoint (`server`) depends on `conn` and nothing
//! here depends on the endpoint.

pub mod client;
pub mod freeze;
pub mod session;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_shared::codec::CodecError;
use berth_shared::tls;
use berth_shared::wire::{ApiError, ErrorKind};

use crate::actors::Actors;
use crate::store::StoreError;

/// Application close codes.
pub const CLOSE_DONE: u32 = 0;
pub const CLOSE_PROTOCOL: u32 = 1;
pub const CLOSE_REFUSED: u32 = 2;

/// What every connection handler shares.
pub struct Shared {
    pub actors: Actors,
    pub lease_ttl: Duration,
    pub name: String,
    pub ca: tls::Ca,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn new(actors: Actors, lease_ttl: Duration, name: String, ca: tls::Ca) -> Self {
        Shared { actors, lease_ttl, name, ca, next_conn: AtomicU64::new(1) }
    }

    /// A number for the next connection (its log span, and which connection of a
    /// worker is the newest).
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Closes a connection because of a frame it sent. A stream that failed because the
/// connection went away is not the peer's fault and is only logged.
pub fn close_for(conn: &quinn::Connection, e: &CodecError) {
    if matches!(e, CodecError::Io(_)) || conn.close_reason().is_some() {
        tracing::debug!(error = %e, "stream ended with the connection");
        return;
    }
    let reason = format!("protocol error: {e}");
    tracing::warn!(reason = %reason, "closing connection");
    conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
}

/// A store failure as the client sees it (the cause is logged here).
pub fn api(e: StoreError) -> ApiError {
    match e {
        StoreError::Api(a) => a,
        // Said as it is: the coordinator's disk is full (logged by the store).
        e @ StoreError::Unwritable { .. } => ApiError::new(ErrorKind::Internal, e.to_string()),
        other => {
            tracing::error!(error = %other, "store error");
            ApiError::new(ErrorKind::Internal, format!("the coordinator failed: {other}"))
        }
    }
}

/// An actor that did not answer: only while the coordinator shuts down.
pub fn mailbox<T>(_: T) -> ApiError {
    ApiError::new(ErrorKind::Internal, "the coordinator is shutting down")
}
