//! The QUIC endpoint: accepts connections, checks the hello and the certificate,
//! and hands each connection to the client API, a worker session or enrolment.
//! A bad frame closes that connection with a reason; nothing else is affected.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::{read_frame, write_frame, CodecError};
use berth_shared::tls::{self, CertKey};
use berth_shared::wire::{Hello, HelloReply, PeerKind, Role, PROTOCOL_VERSION};
use tracing::Instrument;

use crate::actors::Actors;
use crate::store::StoreHandle;
use crate::{client_api, worker_conn};

/// Application close codes.
pub const CLOSE_DONE: u32 = 0;
pub const CLOSE_PROTOCOL: u32 = 1;
pub const CLOSE_REFUSED: u32 = 2;

/// What every connection handler shares.
pub struct Shared {
    pub actors: Actors,
    pub store: StoreHandle,
    pub lease_ttl: Duration,
    pub name: String,
    pub ca: tls::Ca,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn new(actors: Actors, store: StoreHandle, lease_ttl: Duration, name: String, ca: tls::Ca) -> Self {
        Shared { actors, store, lease_ttl, name, ca, next_conn: AtomicU64::new(1) }
    }
}

/// Binds the endpoint.
pub fn bind(addr: SocketAddr, ca_pem: &str, server: &CertKey) -> Result<quinn::Endpoint, std::io::Error> {
    let cfg = tls::server_config(ca_pem, server).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    quinn::Endpoint::server(cfg, addr)
}

/// Serves until `shutdown` resolves.
pub async fn serve(endpoint: quinn::Endpoint, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let shared = shared.clone();
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let remote = incoming.remote_address();
                actix_rt::spawn(
                    async move { handle(incoming, shared, id).await }
                        .instrument(tracing::info_span!("conn", id, %remote)),
                );
            }
            _ = &mut shutdown => break,
        }
    }
    endpoint.close(CLOSE_DONE.into(), b"coordinator shutting down");
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

async fn handle(incoming: quinn::Incoming, shared: Arc<Shared>, id: u64) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "handshake failed");
            return;
        }
    };
    let identity = tls::peer_identity(&conn);
    let first = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await;
    let (mut send, mut recv) = match first {
        Ok(Ok(s)) => s,
        _ => {
            conn.close(CLOSE_PROTOCOL.into(), b"no hello within 10 s");
            return;
        }
    };
    let hello: Hello = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Err(e)) => return close_for(&conn, &e),
        _ => {
            conn.close(CLOSE_PROTOCOL.into(), b"no hello within 10 s");
            return;
        }
    };
    let verdict: Result<(String, Role), String> = if hello.protocol != PROTOCOL_VERSION {
        Err(format!(
            "protocol version {} is not supported (this coordinator speaks {PROTOCOL_VERSION}); upgrade the older side",
            hello.protocol
        ))
    } else {
        match (hello.kind, identity) {
            (PeerKind::Client, Some((name, role))) if role != Role::Worker => Ok((name, role)),
            (PeerKind::Client, Some((name, _))) => Err(format!("`{name}` holds a worker certificate, which cannot be used as a client")),
            (PeerKind::Worker, Some((name, Role::Worker))) => Ok((name, Role::Worker)),
            (PeerKind::Worker, Some((name, role))) => Err(format!("`{name}` has role {}, not worker", role.as_str())),
            (PeerKind::Enrol, _) => Ok(("(enrolling)".into(), Role::Anonymous)),
            (_, None) => Err("no client certificate: use a profile from `berth-coordinator user add`, or enrol the worker with a join token".into()),
        }
    };
    let (name, role) = match verdict {
        Ok(v) => v,
        Err(reason) => {
            tracing::info!(reason = %reason, "refused");
            let _ = write_frame(&mut send, &HelloReply::Refused { reason: reason.clone() }).await;
            let _ = send.finish();
            // Give the refusal time to arrive before the close.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
            return;
        }
    };
    let welcome = HelloReply::Welcome { protocol: PROTOCOL_VERSION, coordinator: shared.name.clone(), identity: name.clone(), role };
    if write_frame(&mut send, &welcome).await.is_err() {
        return;
    }
    tracing::debug!(peer = %name, role = role.as_str(), "connected");
    match hello.kind {
        PeerKind::Client => {
            let _ = send.finish();
            client_api::serve(conn, shared, name, role).await
        }
        PeerKind::Enrol => {
            let _ = send.finish();
            client_api::serve(conn, shared, name, Role::Anonymous).await
        }
        PeerKind::Worker => worker_conn::serve(conn, send, recv, shared, name, id).await,
    }
}
