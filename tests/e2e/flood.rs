//! Floods on the coordinator's endpoint: thousands of QUIC handshakes started and never
//! completed (unauthenticated Initial packets, about 1,200 bytes each, from a loopback
//! socket that never answers) must leave its memory bounded and give it back, and real
//! workers and clients must still connect and run jobs during and after the flood.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use berth_e2e::{wait_until, Cluster};

/// The coordinator's resident memory in MiB (`VmRSS` of /proc/PID/status).
fn rss_mib(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok());
    kb.unwrap_or(f64::NAN) / 1024.0
}

/// Sends the first flight (one Initial) of `n` QUIC connections to `to`, each with
/// its own connection id, from one socket that never reads an answer: `n` handshakes
/// the server starts and no client finishes. Bounded: `n` datagrams, within `within`.
/// Returns the bytes sent.
fn half_open_handshakes(to: SocketAddr, ca_pem: &str, n: usize, within: Duration) -> Result<usize> {
    let mut cfg = berth_shared::tls::client_config(ca_pem, None)?;
    // The test's own side keeps no per-connection stream tables worth the name.
    cfg.transport_config(Arc::new(quinn_proto::TransportConfig::default()));
    let mut ep = quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, None);
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let (start, mut bytes, mut buf) = (Instant::now(), 0, Vec::new());
    for _ in 0..n {
        if start.elapsed() > within {
            break;
        }
        let (_, mut conn) = ep.connect(Instant::now(), cfg.clone(), to, "localhost")?;
        buf.clear();
        if let Some(t) = conn.poll_transmit(Instant::now(), 1, &mut buf) {
            bytes += sock.send_to(&buf[..t.size], to)?;
        }
    }
    Ok(bytes)
}

#[test]
fn a_flood_of_half_open_handshakes_keeps_memory_bounded_and_the_service_up() -> Result<()> {
    let mut c = Cluster::start()?;
    let pid = c.coord.as_ref().context("coordinator")?.pid();
    let to: SocketAddr = c.addr.parse()?;
    let ca = std::fs::read_to_string(c.data.join("ca.pem"))?;
    c.add_worker("w1", 2)?;
    assert_eq!(c.berth(&["submit", "--wait", "--", "true"]).status.code(), Some(0));
    let before = rss_mib(pid);

    let mut peak = before;
    for round in 0..2 {
        let sent = half_open_handshakes(to, &ca, 2_000, Duration::from_secs(10))?;
        assert!(sent >= 2_000 * 1_200, "round {round}: 2,000 Initials sent ({sent} bytes)");
        // Service goes on during the flood: a job through the connected worker, from a
        // new client connection.
        let out = c.berth(&["submit", "--wait", "--", "sh", "-c", "echo during the flood"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        peak = peak.max(rss_mib(pid));
    }
    // The half-open handshakes cost no more than a bounded amount while they last.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        peak = peak.max(rss_mib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("coordinator RSS: {before:.1} MiB before, {peak:.1} MiB at most during 2 x 2,000 half-open handshakes");
    assert!(peak < before + 32.0, "RSS {peak:.1} MiB during the flood, {before:.1} MiB before it");

    // And gives it back once they are over (the handshake timeout).
    wait_until("the coordinator to give its memory back", Duration::from_secs(40), || rss_mib(pid) < before + 16.0)
        .with_context(|| format!("RSS {:.1} MiB, {before:.1} MiB before the flood", rss_mib(pid)))?;

    // A worker that connects after the flood runs work too.
    c.add_worker("w2", 1)?;
    c.worker("w1").context("w1")?.stop(Duration::from_secs(10));
    let out = c.berth(&["submit", "--wait", "--", "sh", "-c", "echo after the flood"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
