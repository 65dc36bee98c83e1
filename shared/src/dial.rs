//! Dialling a coordinator: try each address in turn, TLS handshake, hello. Used by
//! the worker and the client alike.

use std::net::SocketAddr;
use std::time::Duration;

use crate::codec::{read_frame, write_frame, CodecError};
use crate::wire::{Hello, HelloReply, PeerKind, Role, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve coordinator address `{addr}`: {message}")]
    Resolve { addr: String, message: String },
    #[error("cannot reach the coordinator at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the coordinator at {addr} did not answer within {secs} s")]
    Timeout { addr: String, secs: u64 },
    #[error("the coordinator at {addr} refused: {reason}")]
    Refused { addr: String, reason: String },
    #[error("cannot authenticate to the coordinator at {addr}: {message}")]
    Auth { addr: String, message: String },
    #[error("protocol error talking to {addr}: {source}")]
    Protocol {
        addr: String,
        #[source]
        source: CodecError,
    },
    #[error("no coordinator address given")]
    NoAddress,
}

/// A connection that passed the hello.
pub struct Dialed {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub addr: String,
    pub identity: String,
    pub role: Role,
    pub coordinator: String,
}

/// Splits `host:port` (or `[v6]:port`) into the host part.
pub fn host_of(addr: &str) -> &str {
    let h = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    h.trim_start_matches('[').trim_end_matches(']')
}

async fn resolve(addr: &str) -> Result<Vec<SocketAddr>, DialError> {
    match tokio::net::lookup_host(addr).await {
        Ok(it) => {
            let v: Vec<_> = it.collect();
            if v.is_empty() {
                Err(DialError::Resolve { addr: addr.into(), message: "no addresses".into() })
            } else {
                Ok(v)
            }
        }
        Err(e) => Err(DialError::Resolve { addr: addr.into(), message: e.to_string() }),
    }
}

/// Connects to the first coordinator in `addrs` that answers and says hello as `kind`.
/// `server_name` defaults to each address's host part.
pub async fn dial(endpoint: &quinn::Endpoint, addrs: &[String], server_name: Option<&str>, kind: PeerKind, timeout: Duration) -> Result<Dialed, DialError> {
    let mut last = DialError::NoAddress;
    for addr in addrs {
        match dial_one(endpoint, addr, server_name, kind, timeout).await {
            Ok(d) => return Ok(d),
            // A refusal is an answer: trying the next coordinator will not change it.
            Err(e @ (DialError::Refused { .. } | DialError::Auth { .. })) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn dial_one(endpoint: &quinn::Endpoint, addr: &str, server_name: Option<&str>, kind: PeerKind, timeout: Duration) -> Result<Dialed, DialError> {
    let sockets = resolve(addr).await?;
    let name = server_name.unwrap_or_else(|| host_of(addr));
    let mut last = DialError::NoAddress;
    for sock in sockets {
        let attempt = async {
            let connecting = endpoint.connect(sock, name).map_err(|e| DialError::Connect { addr: addr.into(), message: e.to_string() })?;
            let conn = connecting.await.map_err(|e| connect_error(addr, &e))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect_error(addr, &e))?;
            let hello = Hello { protocol: PROTOCOL_VERSION, software: crate::VERSION.into(), kind };
            write_frame(&mut send, &hello).await.map_err(|source| connect_or_protocol(addr, &conn, source))?;
            match read_frame::<_, HelloReply>(&mut recv).await {
                Ok(Some(HelloReply::Welcome { identity, role, coordinator, .. })) => {
                    Ok(Dialed { conn, send, recv, addr: addr.into(), identity, role, coordinator })
                }
                Ok(Some(HelloReply::Refused { reason })) => Err(DialError::Refused { addr: addr.into(), reason }),
                Ok(None) => Err(closed(addr, &conn)),
                Err(source) => Err(connect_or_protocol(addr, &conn, source)),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(d)) => return Ok(d),
            Ok(Err(e @ (DialError::Refused { .. } | DialError::Auth { .. }))) => return Err(e),
            Ok(Err(e)) => last = e,
            Err(_) => last = DialError::Timeout { addr: addr.into(), secs: timeout.as_secs().max(1) },
        }
    }
    Err(last)
}

/// A TLS failure is an answer (this certificate or CA is wrong), not an outage.
fn connect_error(addr: &str, e: &quinn::ConnectionError) -> DialError {
    let crypto = match e {
        quinn::ConnectionError::TransportError(t) => is_crypto(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => is_crypto(c.error_code),
        _ => false,
    };
    if crypto {
        DialError::Auth { addr: addr.into(), message: describe(e) }
    } else {
        DialError::Connect { addr: addr.into(), message: describe(e) }
    }
}

fn closed(addr: &str, conn: &quinn::Connection) -> DialError {
    match conn.close_reason() {
        Some(r) => connect_error(addr, &r),
        None => DialError::Connect { addr: addr.into(), message: "the connection closed during the hello".into() },
    }
}

fn connect_or_protocol(addr: &str, conn: &quinn::Connection, source: CodecError) -> DialError {
    match (conn.close_reason(), &source) {
        (Some(r), _) => connect_error(addr, &r),
        (None, CodecError::Io(_)) => closed(addr, conn),
        _ => DialError::Protocol { addr: addr.into(), source },
    }
}

/// A connection error in words a user can act on.
pub fn describe(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!("closed by the coordinator: {}", String::from_utf8_lossy(&c.reason))
        }
        quinn::ConnectionError::TimedOut => "no answer (is the coordinator running and the address right?)".into(),
        quinn::ConnectionError::TransportError(t) if is_crypto(t.code) => {
            format!("TLS handshake failed ({t}): the CA file or the certificate does not belong to this coordinator")
        }
        quinn::ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
            format!("TLS handshake failed ({c}): the coordinator did not accept this certificate (was it issued by this coordinator's CA?)")
        }
        other => other.to_string(),
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100-0x1ff.
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// A client endpoint on an ephemeral port (IPv4 or IPv6 to match the targets).
pub fn client_endpoint(cfg: quinn::ClientConfig, v6: bool) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if v6 { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.map_err(|_| std::io::Error::other("bad bind address"))?;
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part() {
        assert_eq!(host_of("head:7447"), "head");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7447"), "::1");
    }
}
