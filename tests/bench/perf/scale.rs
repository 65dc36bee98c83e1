//! Scenario 5, scale: a large array queued with no worker (submit time, coordinator
//! memory, `berth list` latency), and many simulated workers connected and
//! heartbeating (coordinator CPU).

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use berth_e2e::bench::{median, Rounds};
use berth_e2e::{run_timeout, Cluster, Proc};
use serde_json::json;

use crate::env::Env;
use crate::table::{list, num, Row, Verdict};
use crate::until;

/// Clock ticks per second of /proc/PID/stat times.
fn clk_tck() -> f64 {
    let mut c = Command::new("getconf");
    c.arg("CLK_TCK");
    run_timeout(c, Duration::from_secs(5)).ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok()).unwrap_or(100.0)
}

/// User + system CPU ticks of a process so far.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A `/proc/PID/status` size (`VmRSS`, `VmHWM`) in MiB.
fn proc_mib(pid: i32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn coord_pid(c: &Cluster) -> Result<i32> {
    c.coord.as_ref().map(Proc::pid).ok_or_else(|| anyhow!("the coordinator is not running"))
}

fn list_latency(env: &Env, c: &Cluster, n: usize) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for _ in 0..n {
        let (_, took) = env.berth_ok(c, &["list", "--state", "queued", "--limit", "20"], Duration::from_secs(10))?;
        v.push(took.as_secs_f64() * 1e3);
    }
    Ok(v)
}

pub fn scenario_5_array(env: &Env) -> Result<Vec<Row>> {
    let n = env.scale.array_tasks;
    let end = env.clock.phase(Duration::from_secs(60));
    eprintln!("[5] scale: a {n}-task array with no worker connected, x {} rounds (a fresh coordinator each)", env.rounds);
    let (mut submit, mut single, mut rss, mut idle_rss, mut hwm, mut list_q, mut list_empty) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut rounds = Rounds::new(env.rounds, end);
    let mut limit_flag = true;
    while let Some(r) = rounds.next_round() {
        let c = Cluster::start()?;
        let pid = coord_pid(&c)?;
        // `--limit` must exist: a usage error (exit 2) says it does not.
        let probe = run_timeout(env.berth(&c, &["list", "--state", "queued", "--limit", "20"]), Duration::from_secs(10))?;
        if probe.status.code() == Some(2) {
            limit_flag = false;
            rounds.note = format!(" `berth list --state queued --limit 20` is refused: {}", String::from_utf8_lossy(&probe.stderr).trim());
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        idle_rss.push(proc_mib(pid, "VmRSS").unwrap_or(f64::NAN));
        list_empty.push(median(&list_latency(env, &c, 10)?).unwrap_or(f64::NAN));
        let (_, t) = env.berth_ok(&c, &["submit", "--", "true"], Duration::from_secs(10))?;
        single.push(t.as_secs_f64() * 1e3);
        let range = format!("0-{}", n - 1);
        let (out, t) = env.berth_ok(&c, &["submit", "--array", &range, "--", "true"], Duration::from_secs(60))?;
        submit.push(t.as_secs_f64() * 1e3);
        let id = String::from_utf8_lossy(&out).trim().to_string();
        // Resident memory while it is queued: the most seen over a second.
        let mut most: f64 = 0.0;
        for _ in 0..10 {
            most = most.max(proc_mib(pid, "VmRSS").unwrap_or(0.0));
            std::thread::sleep(Duration::from_millis(100));
        }
        let (v, _) = env.berth_json(&c, &["list", "--state", "queued", "--limit", "20", "--json"], Duration::from_secs(10))?;
        let listed = v
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == id.as_str()).cloned())
            .ok_or_else(|| anyhow!("the array {id} is not listed as queued: {v}"))?;
        if listed["tasks"].as_u64() != Some(u64::from(n)) {
            bail!("the array is listed with {} tasks, not {n}", listed["tasks"]);
        }
        list_q.push(median(&list_latency(env, &c, 20)?).unwrap_or(f64::NAN));
        most = most.max(proc_mib(pid, "VmRSS").unwrap_or(0.0));
        rss.push(most);
        hwm.push(proc_mib(pid, "VmHWM").unwrap_or(f64::NAN));
        eprintln!(
            "    round {}: submit {:.1} ms (single job {:.1} ms), RSS {:.0} MiB (idle {:.0}, peak {:.0}), list {:.1} ms (empty {:.1} ms)",
            r + 1,
            submit[r],
            single[r],
            rss[r],
            idle_rss[r],
            hwm[r],
            list_q[r],
            list_empty[r]
        );
    }
    let note = rounds.note;
    let rounds = format!("{} rounds, a fresh coordinator each", submit.len());
    let mut a = Row::new("5a", &format!("scale: submit a {n}-task array"), "ms", "ms", "").values(median(&submit), median(&single));
    a.note = format!("figure: `berth submit --array 0-{}` wall time, rounds {}. baseline: `berth submit -- true` (one job) on the same coordinator, rounds {}; {rounds}{note}", n - 1, list(&submit), list(&single));
    let mut b = Row::new("5b", &format!("scale: coordinator RSS, {n} tasks queued"), "MiB", "MiB", "< 1024 MiB").values(median(&rss), median(&idle_rss));
    b.verdict = Verdict::of(b.figure.map(|f| f < 1024.0));
    b.note = format!(
        "figure: VmRSS of the coordinator while the array is queued (most seen over ~1.5 s), rounds {} (VmHWM {}). baseline: VmRSS idle before submitting; {rounds}",
        list(&rss),
        list(&hwm)
    );
    let mut c = Row::new("5c", &format!("scale: `berth list --state queued --limit 20`, {n} queued"), "ms", "ms", "< 50 ms")
        .values(median(&list_q), median(&list_empty));
    c.verdict = if limit_flag { Verdict::of(c.figure.map(|f| f < 50.0)) } else { Verdict::Error };
    c.note = format!(
        "figure: wall time of the command (process start, connect, query), median of 20 a round, rounds {}. baseline: the same on the empty coordinator; {rounds}{note}",
        list(&list_q)
    );
    Ok(vec![
        a.extra("rounds", json!(submit)).extra("baseline_rounds", json!(single)),
        b.extra("rounds", json!(rss)).extra("baseline_rounds", json!(idle_rss)).extra("hwm_mib", json!(hwm)),
        c.extra("rounds", json!(list_q)).extra("baseline_rounds", json!(list_empty)),
    ])
}

/// One simulated worker: its own endpoint and certificate (issued by the cluster's CA,
/// as `berth dev` issues its worker's), registers, says it wants one task, and
/// heartbeats every `every` (a third of the lease TTL, as berth-worker does), the first
/// after `phase`, until `stop`. `gate` (a handshake slot) is let go once registered.
struct SimWorker {
    addr: String,
    ca_pem: Arc<String>,
    cert: berth_shared::tls::CertKey,
    name: String,
    every: Duration,
    phase: Duration,
    redials: Arc<AtomicUsize>,
}

async fn sim_worker(
    w: SimWorker,
    mut stop: tokio::sync::watch::Receiver<bool>,
    registered: Arc<AtomicUsize>,
    gate: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<()> {
    let SimWorker { addr, ca_pem, cert, name, every, phase, redials } = w;
    use berth_shared::codec::{read_frame, write_frame};
    use berth_shared::dial::{client_endpoint, dial};
    use berth_shared::tls::client_config;
    use berth_shared::wire::{CoordMsg, HostInfo, PeerKind, WorkerMsg};
    let endpoint = client_endpoint(client_config(&ca_pem, Some(&cert))?, false)?;
    // A busy coordinator may not answer a handshake in time: dial again, as berth-worker does.
    let mut tries = 0;
    let d = loop {
        tries += 1;
        match dial(&endpoint, std::slice::from_ref(&addr), None, PeerKind::Worker, Duration::from_secs(20)).await {
            Ok(d) => break d,
            Err(e) if tries >= 3 => return Err(e.into()),
            Err(_) => {
                redials.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let (conn, mut send, mut recv) = (d.conn, d.send, d.recv);
    let host = HostInfo { hostname: "sim".into(), cpus: 1, mem_mib: 1024, executors: vec!["process".into()], ..HostInfo::default() };
    write_frame(
        &mut send,
        &WorkerMsg::Register {
            name: name.clone(),
            slots: 1,
            pool: "default".into(),
            labels: Vec::new(),
            host: Box::new(host),
            held: Vec::new(),
            instance: uuid::Uuid::new_v4(),
        },
    )
    .await?;
    match read_frame::<_, CoordMsg>(&mut recv).await? {
        Some(CoordMsg::Registered { .. }) => {}
        other => bail!("{name}: expected Registered, got {other:?}"),
    }
    write_frame(&mut send, &WorkerMsg::Want { n: 1 }).await?;
    registered.fetch_add(1, Ordering::Relaxed);
    drop(gate);
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = read_frame::<_, CoordMsg>(&mut recv).await {} });
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
    loop {
        tokio::select! {
            _ = tick.tick() => write_frame(&mut send, &WorkerMsg::Heartbeat { leases: Vec::new() }).await?,
            _ = stop.changed() => break,
        }
    }
    reader.abort();
    conn.close(0u32.into(), b"bench done");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

pub fn scenario_5_workers(env: &Env) -> Result<Vec<Row>> {
    use berth_shared::tls::Ca;
    use berth_shared::wire::Role;
    let n = env.scale.sim_workers;
    let window = env.scale.cpu_window;
    let windows = env.rounds;
    let connect_cap = Duration::from_secs(if n > 300 { 90 } else { 30 });
    let end = env.clock.phase(connect_cap + window * (windows as u32 + 1) + Duration::from_secs(15));
    let ttl = Duration::from_secs(30);
    let every = ttl / 3;
    eprintln!("[5] scale: {n} simulated workers connected and heartbeating every {every:?}; coordinator CPU over {windows} windows of {window:?}");
    let c = Cluster::start_with_ttl("30s")?;
    let pid = coord_pid(&c)?.to_string();
    let tck = clk_tck();
    let cores = |a: u64, b: u64, d: Duration| (b.saturating_sub(a)) as f64 / tck / d.as_secs_f64();
    // Baseline: the idle coordinator over one window.
    std::thread::sleep(Duration::from_millis(500));
    let t0 = (Instant::now(), cpu_ticks(&pid).unwrap_or(0));
    std::thread::sleep(window.min(until(end)));
    let idle = cores(t0.1, cpu_ticks(&pid).unwrap_or(0), t0.0.elapsed());
    let idle_rss = proc_mib(coord_pid(&c)?, "VmRSS");

    let ca = Ca::load(&std::fs::read_to_string(c.data.join("ca.pem"))?, &std::fs::read_to_string(c.data.join("ca.key"))?)?;
    let ca_pem = Arc::new(std::fs::read_to_string(c.data.join("ca.pem"))?);
    let mut certs = Vec::with_capacity(n);
    for i in 0..n {
        certs.push(ca.issue_client(&format!("sim-{i:05}"), Role::Worker)?);
    }
    let registered = Arc::new(AtomicUsize::new(0));
    let redials = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let connect_start = Instant::now();
    let connect_end = connect_start + connect_cap.min(until(end));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let handles: Vec<_> = {
        // At most 64 handshakes in flight: a fleet does not all dial at once either.
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        certs
            .into_iter()
            .enumerate()
            .map(|(i, cert)| {
                let (addr, ca_pem, stop, reg, gate, failures) =
                    (c.addr.clone(), ca_pem.clone(), stop_rx.clone(), registered.clone(), gate.clone(), failures.clone());
                let phase = every.mul_f64(i as f64 / n.max(1) as f64);
                let redials = redials.clone();
                env.rt.spawn(async move {
                    let permit = gate.acquire_owned().await.ok();
                    if let Err(e) = sim_worker(SimWorker { addr, ca_pem, cert, name: format!("sim-{i:05}"), every, phase, redials }, stop, reg, permit).await {
                        if let Ok(mut f) = failures.lock() {
                            f.push(format!("{e:#}"));
                        }
                    }
                })
            })
            .collect()
    };
    while registered.load(Ordering::Relaxed) < n && Instant::now() < connect_end {
        std::thread::sleep(Duration::from_millis(100));
        if failures.lock().map(|f| f.len()).unwrap_or(0) + registered.load(Ordering::Relaxed) >= n {
            break;
        }
    }
    let connect_time = connect_start.elapsed();
    let up = registered.load(Ordering::Relaxed);
    eprintln!("    {up} of {n} registered in {connect_time:.2?}");
    // Let the registrations settle (store writes, the registry), then measure.
    std::thread::sleep(Duration::from_secs(2).min(until(end)));
    let listed = env
        .berth_json(&c, &["workers", "--json"], Duration::from_secs(30))
        .ok()
        .and_then(|(v, _)| v.as_array().map(|a| a.iter().filter(|w| w["connected"] == true).count()))
        .unwrap_or(0);
    let me = std::process::id().to_string();
    let mut loads = Vec::new();
    let mut mine = Vec::new();
    for _ in 0..windows {
        if until(end) < window {
            break;
        }
        let (t, a, m) = (Instant::now(), cpu_ticks(&pid).unwrap_or(0), cpu_ticks(&me).unwrap_or(0));
        std::thread::sleep(window);
        let d = t.elapsed();
        loads.push(cores(a, cpu_ticks(&pid).unwrap_or(0), d));
        mine.push(cores(m, cpu_ticks(&me).unwrap_or(0), d));
        eprintln!("    window: coordinator {:.3} cores, harness (the simulated workers) {:.3} cores", loads[loads.len() - 1], mine[mine.len() - 1]);
    }
    let rss = proc_mib(coord_pid(&c)?, "VmRSS");
    let _ = stop_tx.send(true);
    env.rt.block_on(async {
        for h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    });
    let failed: Vec<String> = failures.lock().map(|f| f.clone()).unwrap_or_default();
    let fig = median(&loads);
    let mut row = Row::new("5d", &format!("scale: {up} simulated workers heartbeating"), "cores", "cores", "< 1 core @ 10,000").values(fig, Some(idle));
    // A target at 10,000 workers is judged only when that many were measured.
    row.verdict = if up >= 10_000 { Verdict::of(fig.map(|f| f < 1.0)) } else { Verdict::Info };
    let per_k = fig.map(|f| (f - idle).max(0.0) * 1000.0 / up.max(1) as f64);
    row.note = format!(
        "figure: coordinator utime+stime (/proc/PID/stat) per second over {} windows of {window:?}, rounds {}, with {up} of {n} workers registered ({listed} listed connected) \
         in {:.1} s ({} handshakes timed out and were dialled again), each with its own QUIC connection (keep-alive 2 s) heartbeating every {every:?} and one Want; coordinator RSS {} MiB. baseline: the same coordinator idle \
         with no worker. {}. The simulated workers ran in this harness on the same cores ({} cores){}",
        loads.len(),
        list(&loads),
        connect_time.as_secs_f64(),
        redials.load(Ordering::Relaxed),
        rss.map_or("?".into(), num),
        if up >= 10_000 {
            "Measured at the target's scale".to_string()
        } else {
            format!(
                "Measured at {up} workers, NOT at the target's 10,000: {} cores per 1,000 workers above idle; a linear extrapolation to 10,000 ({} cores) is not a measurement",
                per_k.map_or("n/a".into(), num),
                per_k.map_or("n/a".into(), |p| num(idle + p * 10.0))
            )
        },
        median(&mine).map_or("n/a".into(), num),
        if failed.is_empty() { String::new() } else { format!("; {} failed, first: {}", failed.len(), failed[0]) }
    );
    // Memory: what the connected workers cost the coordinator, each.
    let per_conn_kib = match (rss, idle_rss) {
        (Some(r), Some(i)) if up > 0 => Some((r - i).max(0.0) * 1024.0 / up as f64),
        _ => None,
    };
    let mut mem =
        Row::new("5e", &format!("scale: coordinator RSS, {up} simulated workers connected"), "MiB", "MiB", "< 1024 MiB @ 10,000").values(rss, idle_rss);
    mem.verdict = if up >= 10_000 { Verdict::of(rss.map(|r| r < 1024.0)) } else { Verdict::Info };
    mem.note = format!(
        "figure: VmRSS of the coordinator after the CPU windows, with {up} of {n} workers registered, each on its own QUIC connection with mutual TLS; {} KiB per connected worker \
         (figure less baseline, over {up}). baseline: VmRSS of the same coordinator idle with no worker{}",
        per_conn_kib.map_or("n/a".into(), num),
        if up >= 10_000 {
            String::new()
        } else {
            format!(
                ". Measured at {up} workers, NOT at the target's 10,000: a linear extrapolation ({} MiB) is not a measurement",
                match (per_conn_kib, idle_rss) {
                    (Some(k), Some(i)) => num(i + k * 10_000.0 / 1024.0),
                    _ => "n/a".into(),
                }
            )
        }
    );
    Ok(vec![
        row.extra("rounds", json!(loads))
            .extra("workers_requested", json!(n))
            .extra("workers_registered", json!(up))
            .extra("workers_listed_connected", json!(listed))
            .extra("connect_s", json!(connect_time.as_secs_f64()))
            .extra("redials", json!(redials.load(Ordering::Relaxed)))
            .extra("harness_cores", json!(mine))
            .extra("coordinator_rss_mib", json!(rss)),
        mem.extra("per_connection_kib", json!(per_conn_kib)).extra("workers_registered", json!(up)),
    ])
}
