//! Scenario 4, output streaming: one job writing to stdout, into the coordinator's log
//! store, against the same bytes over a bare QUIC stream and against the disk's
//! durable write rate.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_e2e::bench::{median, Rounds};
use berth_e2e::Cluster;
use serde_json::json;

use crate::env::Env;
use crate::table::{list, RatioStyle, Row, Verdict};
use crate::until;

/// The harness's own QUIC transfer: `bytes` over one unidirectional stream on loopback,
/// with berth's TLS and transport settings, written in berth's chunk size; the server
/// reads and discards. Timed from the first write to the server's last byte.
pub(crate) async fn quic_transfer(bytes: u64) -> Result<Duration> {
    use berth_shared::tls::{client_config, server_config, Ca};
    let ca = Ca::generate("perf")?;
    let server = ca.issue_server(&["localhost".to_string()])?;
    let sep = quinn::Endpoint::server(server_config(ca.cert_pem(), &server)?, "127.0.0.1:0".parse()?)?;
    let addr = sep.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<(u64, Instant)>>();
    let server_task = tokio::spawn(async move {
        let r = async {
            let conn = sep.accept().await.ok_or_else(|| anyhow!("no connection"))?.await?;
            let mut s = conn.accept_uni().await?;
            let mut n = 0u64;
            while let Some(chunk) = s.read_chunk(usize::MAX, true).await? {
                n += chunk.bytes.len() as u64;
            }
            Ok::<_, anyhow::Error>((n, Instant::now(), conn))
        }
        .await;
        match r {
            Ok((n, at, conn)) => {
                let _ = tx.send(Ok((n, at)));
                // Keep the connection until the client closes it.
                conn.closed().await;
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    let cep = berth_shared::dial::client_endpoint(client_config(ca.cert_pem(), None)?, false)?;
    let conn = cep.connect(addr, "localhost")?.await?;
    let mut s = conn.open_uni().await?;
    let buf = vec![0u8; berth_shared::wire::MAX_CHUNK_BYTES];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    s.finish()?;
    let (n, at) = rx.await.map_err(|_| anyhow!("the server task ended"))??;
    conn.close(0u32.into(), b"done");
    cep.wait_idle().await;
    server_task.abort();
    if n != bytes {
        bail!("the server read {n} of {bytes} bytes");
    }
    Ok(at.duration_since(start))
}

/// Bytes of a job's output in the coordinator's log store, read from its database.
fn stored_bytes(c: &Cluster, job: &str) -> Result<u64> {
    let db = rusqlite::Connection::open_with_flags(c.data.join("berth.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    // Output lives in its own file beside the main database.
    db.execute("ATTACH DATABASE ?1 AS output", [c.data.join("berth-output.db").to_string_lossy()])?;
    let n: i64 = db.query_row(
        "SELECT COALESCE(SUM(CASE WHEN l.seg IS NULL THEN LENGTH(l.data) ELSE l.len END), 0) FROM logs l JOIN jobs j ON j.seq = l.job_seq WHERE j.id = ?1",
        [job],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// Bytes `cmd` writes to stdout, counted as they come (never held in memory).
fn count_stdout(mut cmd: Command, limit: Duration) -> Result<u64> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        let _ = tx.send(n);
    });
    match rx.recv_timeout(limit) {
        Ok(n) => {
            let st = child.wait()?;
            if !st.success() {
                bail!("exited {st}");
            }
            Ok(n)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {limit:?}")
        }
    }
}

pub fn scenario_4(env: &Env) -> Result<Vec<Row>> {
    let bytes = env.scale.stream_bytes;
    let mib = bytes as f64 / (1 << 20) as f64;
    let end = env.clock.phase(Duration::from_secs(if bytes > (512 << 20) { 150 } else { 45 }));
    eprintln!("[4] output streaming: one job writing {mib:.0} MiB to stdout, and the same bytes over a bare QUIC stream, alternating, x {} rounds", env.rounds);
    let mut quic = Vec::new();
    let mut disk = Vec::new();
    let mut c = Cluster::start()?;
    env.add_worker(&mut c, "out", env.par, &[])?;
    let count = bytes.to_string();
    let mut rates = Vec::new();
    let mut rounds = Rounds::new(env.rounds, end);
    let mut verified = Vec::new();
    while let Some(r) = rounds.next_round() {
        let took = env
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), quic_transfer(bytes)).await })
            .map_err(|_| anyhow!("the QUIC transfer took over 60 s"))??;
        quic.push(mib / took.as_secs_f64());
        eprintln!("    QUIC loopback: {mib:.0} MiB in {took:.2?} ({:.0} MiB/s)", mib / took.as_secs_f64());
        let limit = until(end).max(Duration::from_secs(30));
        let (v, wall) = match env.berth_json(&c, &["submit", "--wait", "--json", "--", "head", "-c", &count, "/dev/zero"], limit) {
            Ok(x) => x,
            Err(e) => {
                rounds.failed(r, &e);
                env.cancel_unfinished(&c);
                break;
            }
        };
        if v["state"] != "succeeded" {
            bail!("the job ended {}: {}", v["state"], Env::logs_hint(&c));
        }
        let id = v["id"].as_str().ok_or_else(|| anyhow!("no job id in {v}"))?.to_string();
        let stored = stored_bytes(&c, &id)?;
        if stored != bytes {
            bail!("the log store holds {stored} bytes of job {id}'s output, not {bytes}");
        }
        verified.push("log store");
        // Read back through the client once, at the quick size only (1 GiB would take a while).
        if r == 0 && bytes <= (256 << 20) {
            let n = count_stdout(env.berth(&c, &["logs", &id]), Duration::from_secs(60)).context("berth logs")?;
            if n != bytes {
                bail!("`berth logs {id}` printed {n} bytes, not {bytes}");
            }
            verified.push("berth logs");
        }
        rates.push(mib / wall.as_secs_f64());
        eprintln!("    berth: {mib:.0} MiB in {wall:.2?} ({:.0} MiB/s), {stored} bytes stored", mib / wall.as_secs_f64());
        let took = durable_write(&c.data, bytes)?;
        disk.push(mib / took.as_secs_f64());
        eprintln!("    disk: {mib:.0} MiB written and synced in {took:.2?} ({:.0} MiB/s)", mib / took.as_secs_f64());
    }
    let note = rounds.note;
    verified.sort_unstable();
    verified.dedup();
    let mut row = Row::new("4", &format!("output: 1 job writing {mib:.0} MiB to stdout"), "MiB/s", "MiB/s", ">= 50%").values(median(&rates), median(&quic));
    row.ratio_style = RatioStyle::Percent;
    row.verdict = Verdict::of(row.ratio.map(|r| r >= 0.5));
    row.note = format!(
        "figure: `berth submit --wait -- head -c {bytes} /dev/zero` start to exit (spool on the worker's disk, chunks committed to the coordinator's SQLite log store), \
         size checked by {}; rounds {}. baseline: the same bytes over one QUIC stream on loopback (berth's TLS/transport config, {} KiB writes, server discarding), rounds {}{note}",
        verified.join(" and "),
        list(&rates),
        berth_shared::wire::MAX_CHUNK_BYTES / 1024,
        list(&quic)
    );
    // The ceiling a durable log store meets on this machine: its disk.
    let mut ceiling = Row::new("4d", "output against the disk's durable write rate", "MiB/s", "MiB/s", "(ceiling)").values(median(&rates), median(&disk));
    ceiling.ratio_style = RatioStyle::Percent;
    ceiling.verdict = Verdict::Info;
    ceiling.note = format!(
        "figure: as 4. baseline: the same bytes written by the harness to a file beside the coordinator's database, {} KiB writes, fdatasync every 4 MiB \
         (what durable output needs at least), rounds {}; a cloud disk may write a first burst faster than it sustains",
        berth_shared::wire::MAX_CHUNK_BYTES / 1024,
        list(&disk)
    );
    Ok(vec![
        row.extra("rounds", json!(rates)).extra("baseline_rounds", json!(quic)).extra("bytes", json!(bytes)),
        ceiling.extra("rounds", json!(rates)).extra("baseline_rounds", json!(disk)),
    ])
}

/// Writes `bytes` of zeros to a file in `dir` as a durable log store must at least
/// (chunk writes, a sync every 4 MiB), and removes it; returns the time taken.
fn durable_write(dir: &Path, bytes: u64) -> Result<Duration> {
    use std::io::Write;
    let path = dir.join("disk-baseline.bin");
    let chunk = vec![0u8; berth_shared::wire::MAX_CHUNK_BYTES];
    let started = Instant::now();
    let mut f = std::fs::File::create(&path).context("disk baseline file")?;
    let (mut written, mut since_sync) = (0u64, 0u64);
    while written < bytes {
        let n = chunk.len().min((bytes - written) as usize);
        f.write_all(&chunk[..n])?;
        written += n as u64;
        since_sync += n as u64;
        if since_sync >= 4 << 20 || written == bytes {
            f.sync_data()?;
            since_sync = 0;
        }
    }
    let took = started.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(took)
}
