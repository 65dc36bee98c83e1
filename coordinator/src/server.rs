//! The QUIC endpoint: accepts connections, checks the hello and the certificate,
//! and hands each connection to `conn` (the client API, a worker's link, enrolment).
//! A bad frame closes that connection with a reason; nothing else is affected.
//!
//! Handshakes are unauthenticated work, so they are bounded (`Gate`): beyond
//! `RETRY_ABOVE` in progress, a peer must first prove it receives at its address (a
//! stateless Retry, which costs the endpoint nothing to keep); beyond `MAX_HANDSHAKES`
//! new ones are dropped unanswered; each has `HANDSHAKE_TIMEOUT` to finish. Once many
//! connections have come and gone, freed memory is handed back to the system (`trim`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::{read_frame, write_frame};
use berth_shared::tls::{self, CertKey};
use berth_shared::wire::{Hello, HelloReply, PeerKind, Role, PROTOCOL_VERSION};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::conn::{self, close_for, Shared, CLOSE_DONE, CLOSE_PROTOCOL, CLOSE_REFUSED};

/// Binds the endpoint. Its stateless-reset key is derived from the server's private
/// key, so it survives a restart: a packet a worker sends on a
/// connection the previous coordinator process held is answered with a stateless reset
/// the worker recognises, and it reconnects at once rather than after the idle timeout
/// (by which time a short lease TTL would have run out).
pub fn bind(addr: SocketAddr, ca_pem: &str, server: &CertKey) -> Result<quinn::Endpoint, std::io::Error> {
    let mut cfg = tls::server_config(ca_pem, server).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    // Connection attempts the accept loop has not looked at yet, and what they may
    // buffer: the loop takes each at once, so these only bound a burst.
    cfg.max_incoming(MAX_HANDSHAKES).incoming_buffer_size(64 << 10).incoming_buffer_size_total(8 << 20);
    let reset = ResetKey::derive(&server.key_pem);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset));
    endpoint.cid_generator(|| Box::new(RandomCids));
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(endpoint, Some(cfg), socket, runtime)
}

/// HMAC-SHA256 (RFC 2104) for stateless-reset tokens, under a key that is the same
/// for every run on one data dir.
struct ResetKey([u8; 32]);

impl ResetKey {
    fn derive(server_key_pem: &str) -> ResetKey {
        ResetKey(Sha256::new().chain_update(b"berth stateless reset\0").chain_update(server_key_pem.as_bytes()).finalize().into())
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        let (mut inner, mut outer) = ([0x36u8; 64], [0x5cu8; 64]);
        for (i, k) in self.0.iter().enumerate() {
            inner[i] ^= k;
            outer[i] ^= k;
        }
        let h = Sha256::new().chain_update(inner).chain_update(data).finalize();
        Sha256::new().chain_update(outer).chain_update(h).finalize().into()
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = self.mac(data);
        let n = signature_out.len().min(mac.len());
        signature_out[..n].copy_from_slice(&mac[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mac = self.mac(data);
        // Constant time: no early exit on the first differing byte.
        let diff = mac.iter().zip(signature).fold(signature.len() ^ mac.len(), |d, (a, b)| d | usize::from(a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// Random connection ids that any run of the endpoint accepts as its own. Quinn's
/// default ids carry a hash under a key made at start, so a restarted endpoint would
/// drop a previous run's packets silently instead of answering them with a reset.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Beyond this many handshakes in progress, a peer whose address is not validated
/// gets a Retry first. Below it (every ordinary moment: a restarted coordinator's
/// whole fleet redialling goes through a few dozen at a time) nobody pays the round
/// trip.
pub const RETRY_ABOVE: usize = 64;
/// Beyond this many handshakes in progress, new connection attempts are dropped
/// unanswered (their peers send their Initial again later).
pub const MAX_HANDSHAKES: usize = 1024;
/// A handshake not finished by then is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Freed memory is handed back once this many connections ended since the last time,
/// and none in the last `TRIM_QUIET`.
const TRIM_AFTER: u64 = 256;
const TRIM_QUIET: Duration = Duration::from_secs(5);

/// What to do with a connection attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    Accept,
    /// Ask the peer to prove its address first (stateless).
    Retry,
    /// Drop it unanswered.
    Ignore,
}

impl Gate {
    /// The policy, given the handshakes in progress and what the attempt proved.
    pub fn of(in_progress: usize, validated: bool, may_retry: bool) -> Gate {
        if in_progress >= MAX_HANDSHAKES {
            Gate::Ignore
        } else if in_progress >= RETRY_ABOVE && !validated && may_retry {
            Gate::Retry
        } else {
            Gate::Accept
        }
    }
}

/// Handshakes in progress and connections ended, counted by the accept loop and the
/// connection tasks.
#[derive(Default)]
struct Load {
    handshakes: AtomicUsize,
    ended: AtomicU64,
}

/// Counts a handshake in progress until dropped.
struct Handshake(Arc<Load>);

impl Handshake {
    fn start(load: &Arc<Load>) -> Handshake {
        load.handshakes.fetch_add(1, Ordering::Relaxed);
        Handshake(load.clone())
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(endpoint: quinn::Endpoint, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let load = Arc::new(Load::default());
    let trimmer = actix_rt::spawn(trim_when_quiet(load.clone()));
    let (mut retried, mut ignored) = (0u64, 0u64);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let in_progress = load.handshakes.load(Ordering::Relaxed);
                match Gate::of(in_progress, incoming.remote_address_validated(), incoming.may_retry()) {
                    Gate::Accept => {}
                    Gate::Retry => {
                        retried += 1;
                        if retried.is_power_of_two() {
                            tracing::warn!(in_progress, retried, "many handshakes in progress: asking new peers to validate their address first");
                        }
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().ignore();
                        }
                        continue;
                    }
                    Gate::Ignore => {
                        ignored += 1;
                        if ignored.is_power_of_two() {
                            tracing::warn!(in_progress, ignored, "too many handshakes in progress: dropping new connection attempts");
                        }
                        incoming.ignore();
                        continue;
                    }
                }
                let shared = shared.clone();
                let id = shared.next_conn_id();
                let remote = incoming.remote_address();
                let handshake = Handshake::start(&load);
                let load = load.clone();
                actix_rt::spawn(
                    async move {
                        handle(incoming, shared, id, handshake).await;
                        load.ended.fetch_add(1, Ordering::Relaxed);
                    }
                    .instrument(tracing::info_span!("conn", id, %remote)),
                );
            }
            _ = &mut shutdown => break,
        }
    }
    trimmer.abort();
    endpoint.close(CLOSE_DONE.into(), b"coordinator shutting down");
}

/// Hands freed memory back to the system once many connections have ended (a flood of
/// handshakes that timed out, a fleet that went away) and none has for a while (their
/// state is freed a few seconds after they end, once the transport drained them): the
/// allocator keeps what it freed in its heap otherwise, and the coordinator's memory
/// would stay at its peak.
async fn trim_when_quiet(load: Arc<Load>) {
    let (mut trimmed_at, mut last) = (0u64, 0u64);
    let mut tick = tokio::time::interval(TRIM_QUIET);
    loop {
        tick.tick().await;
        let ended = load.ended.load(Ordering::Relaxed);
        if ended.saturating_sub(trimmed_at) >= TRIM_AFTER && ended == last {
            trimmed_at = ended;
            let freed = trim();
            tracing::debug!(ended, freed, "handed freed memory back to the system");
        }
        last = ended;
    }
}

/// Returns the allocator's free memory to the system: glibc keeps freed blocks in its
/// heaps (handing back only a heap's top), so after a burst of connections the
/// coordinator would keep its peak size. `true` when some memory was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() -> bool {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own free
    // lists (under its locks); it is safe to call from any thread at any time.
    unsafe { malloc_trim(0) != 0 }
}

/// Other allocators return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

async fn handle(incoming: quinn::Incoming, shared: Arc<Shared>, id: u64, handshake: Handshake) {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "handshake failed");
            return;
        }
    };
    // Dropping an unfinished handshake closes it.
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(timeout = ?HANDSHAKE_TIMEOUT, "handshake not finished in time; abandoned");
            return;
        }
    };
    drop(handshake);
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
        Err(format!("protocol version {} is not supported (this coordinator speaks {PROTOCOL_VERSION}); upgrade the older side", hello.protocol))
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
            conn.set_max_concurrent_bi_streams(berth_shared::tls::CLIENT_BI_STREAMS.into());
            conn::client::serve(conn, shared, name, role).await
        }
        PeerKind::Enrol => {
            let _ = send.finish();
            conn::client::serve(conn, shared, name, Role::Anonymous).await
        }
        PeerKind::Worker => conn::worker::serve(conn, send, recv, shared, name, id).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::crypto::HmacKey;

    #[test]
    fn handshakes_are_gated_by_how_many_are_in_progress() {
        // Ordinary load: everyone is accepted, validated or not.
        assert_eq!(Gate::of(0, false, true), Gate::Accept);
        assert_eq!(Gate::of(RETRY_ABOVE - 1, false, true), Gate::Accept);
        // Under load, an address not yet validated proves itself first...
        assert_eq!(Gate::of(RETRY_ABOVE, false, true), Gate::Retry);
        // ...and one that did (it answered our Retry) goes on.
        assert_eq!(Gate::of(RETRY_ABOVE, true, false), Gate::Accept);
        // Beyond the cap nothing new starts, validated or not.
        assert_eq!(Gate::of(MAX_HANDSHAKES, true, false), Gate::Ignore);
        assert_eq!(Gate::of(MAX_HANDSHAKES + 5, false, true), Gate::Ignore);
    }

    #[test]
    fn reset_key_is_hmac_sha256_and_stable() {
        // RFC 4231 test case 2: a key shorter than the block is padded with zeros.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = ResetKey(key).mac(b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let (a, b) = (ResetKey::derive("key one"), ResetKey::derive("key one"));
        let mut sig = [0u8; 32];
        a.sign(b"cid", &mut sig);
        assert!(b.verify(b"cid", &sig).is_ok(), "the same server key gives the same tokens after a restart");
        assert!(ResetKey::derive("key two").verify(b"cid", &sig).is_err());
        assert!(b.verify(b"cid", &sig[..16]).is_err());
    }
}
