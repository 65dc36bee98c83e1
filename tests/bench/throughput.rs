//! Throughput bench, one run, one table:
//!
//! 1. the raw fork/exec rate of `/bin/true` on this machine (4 drivers), through
//!    `std::process::Command` and through the worker's own executor
//!    (`berth_worker::executor::process::run`, with a spool per attempt);
//! 2. end-to-end throughput of a real cluster on loopback (one coordinator, one worker
//!    with 4 slots): a 2,000-task array of `true`, timed from `berth submit --wait`
//!    start to its exit, and compared with the raw rate;
//! 3. submit-to-start latency on an idle cluster: 200 single `true` jobs one after
//!    another, read from each job's event history.
//!
//! Run it with the release binaries built first (the bench runs in the release
//! profile and starts `target/release/berth*`):
//!
//! ```text
//! cargo build --release --workspace && cargo bench -p berth-e2e --bench throughput
//! ```
//!
//! Every phase has a deadline and the whole run is bounded (about 3 minutes at
//! most); the cluster's processes are killed when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_e2e::bench::{cpu_model, executor_rate, kernel, load_avg, median, percentile, thread_rate, Rate, Rates};
use berth_e2e::{run_timeout, Cluster};
use serde_json::Value;

/// Concurrent drivers for the raw spawn rate (the worker's slot count below).
const DRIVERS: usize = 4;
/// Spawns per raw round, and rounds (the median is reported).
const SPAWNS: usize = 2_000;
const SPAWN_ROUNDS: usize = 3;
const SPAWN_ROUND_LIMIT: Duration = Duration::from_secs(15);
/// The end-to-end array: tasks, rounds at most, and each round's deadline.
const ARRAY_TASKS: u32 = 2_000;
const ARRAY_ROUNDS: usize = 3;
const ARRAY_LIMIT: Duration = Duration::from_secs(45);
/// Sequential single jobs for the latency phase, and its deadline.
const LATENCY_JOBS: usize = 200;
const LATENCY_LIMIT: Duration = Duration::from_secs(50);
const LATENCY_JOB_LIMIT: Duration = Duration::from_secs(10);
/// The whole run: phases are skipped or cut short once this is spent.
const TOTAL_BUDGET: Duration = Duration::from_secs(170);

/// The binaries the harness starts, where it looks for them (next to the bench
/// executable's directory: `target/release/` under `cargo bench`).
fn binaries_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("bench executable path")?;
    exe.parent().and_then(Path::parent).map(Path::to_path_buf).ok_or_else(|| anyhow!("no target directory above {}", exe.display()))
}

fn missing_binaries() -> Result<Vec<PathBuf>> {
    let dir = binaries_dir()?;
    Ok(["berth", "berth-coordinator", "berth-worker"].iter().map(|n| dir.join(n)).filter(|p| !p.exists()).collect())
}

// ---------------------------------------------------------------- statistics

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "n/a".into())
}

fn fmt_list(v: &[f64], digits: usize) -> String {
    v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------- timestamps

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the epoch of an RFC 3339 time as the client prints it
/// (`2025-01-02T03:04:05.123+00:00`; fractional digits optional, `Z` accepted).
fn rfc3339_ms(s: &str) -> Option<i64> {
    let num = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let mut rest = s.get(19..)?;
    let mut frac_ms = 0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        let digits = &r[..n.min(3)];
        frac_ms = format!("{digits:0<3}").parse::<i64>().ok()?;
        rest = &r[n..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 => {
            let sign = match &o[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            sign * (o.get(1..3)?.parse::<i64>().ok()? * 60 + o.get(4..6)?.parse::<i64>().ok()?)
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1_000 + frac_ms)
}

// ---------------------------------------------------------------- 1. raw spawn rate

/// `DRIVERS` threads share `total` spawns of `/bin/true` (spawn and wait), until
/// they are done or `limit` passes.
fn spawn_rate_std(total: usize, limit: Duration) -> Rate {
    thread_rate(DRIVERS, total, limit, || {
        Command::new("/bin/true").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|st| st.success())
    })
}

// ---------------------------------------------------------------- the cluster

fn berth_cmd(c: &Cluster, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(dir.join("berth"));
    cmd.args(args).env("BERTH_PROFILE", &c.profile).env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

/// Runs `berth ARGS` with a deadline; it must exit 0; returns stdout as JSON.
fn berth_json(c: &Cluster, dir: &Path, args: &[&str], limit: Duration) -> Result<Value> {
    let out = run_timeout(berth_cmd(c, dir, args), limit)?;
    if !out.status.success() {
        bail!("berth {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("berth {args:?} printed no JSON"))
}

/// Cancels whatever is still queued or running (after a phase ran out of time), so
/// the next phase measures an idle cluster.
fn cancel_unfinished(c: &Cluster, dir: &Path) {
    let Ok(Value::Array(jobs)) = berth_json(c, dir, &["list", "--json", "--limit", "20"], Duration::from_secs(10)) else {
        return;
    };
    for j in jobs {
        if matches!(j["state"].as_str(), Some("queued" | "running")) {
            if let Some(id) = j["id"].as_str() {
                let _ = run_timeout(berth_cmd(c, dir, &["cancel", id]), Duration::from_secs(10));
            }
        }
    }
}

struct ArrayRun {
    wall: Duration,
    /// `submitted_at` → `ended_at` of the array, by the coordinator's clock.
    server_ms: Option<i64>,
}

/// `berth submit --wait --json --array 0-(N-1) -- true`, timed from start to exit.
fn array_run(c: &Cluster, dir: &Path, tasks: u32, limit: Duration) -> Result<ArrayRun> {
    let range = format!("0-{}", tasks - 1);
    let start = Instant::now();
    let v = berth_json(c, dir, &["submit", "--wait", "--json", "--array", &range, "--", "true"], limit)?;
    let wall = start.elapsed();
    let ok = v["counts"]["succeeded"].as_u64().unwrap_or(0);
    if ok != u64::from(tasks) {
        bail!("the array ended with {ok} of {tasks} tasks succeeded: {}", v["counts"]);
    }
    let t = |k: &str| v[k].as_str().and_then(rfc3339_ms);
    let server_ms = t("submitted_at").zip(t("ended_at")).map(|(a, b)| b - a);
    Ok(ArrayRun { wall, server_ms })
}

struct Latency {
    /// `queued` event → `running` event (the coordinator handed the task to the worker).
    claim_ms: f64,
    /// `queued` event → the task's `started_at` (the worker reported the process running).
    started_ms: Option<f64>,
    /// `berth submit --wait` start to exit, as a user sees it.
    round_trip_ms: f64,
}

fn event_time(v: &Value, state: &str) -> Option<i64> {
    v["events"].as_array()?.iter().find(|e| e["state"] == state).and_then(|e| e["time"].as_str()).and_then(rfc3339_ms)
}

/// One single `true` job: submit, wait for it, read its history.
fn latency_one(c: &Cluster, dir: &Path) -> Result<Latency> {
    let start = Instant::now();
    // `--wait --json` prints the job's `berth status --json` once it has ended.
    let mut v = berth_json(c, dir, &["submit", "--wait", "--json", "--", "true"], LATENCY_JOB_LIMIT)?;
    let round_trip_ms = start.elapsed().as_secs_f64() * 1e3;
    if v["state"] != "succeeded" {
        bail!("the job ended {}: {v}", v["state"]);
    }
    if event_time(&v, "running").is_none() || v["started_at"].is_null() {
        let id = v["id"].as_str().ok_or_else(|| anyhow!("no job id in {v}"))?.to_string();
        v = berth_json(c, dir, &["status", &id, "--json"], Duration::from_secs(10))?;
    }
    let queued = event_time(&v, "queued").ok_or_else(|| anyhow!("no queued event: {v}"))?;
    let running = event_time(&v, "running").ok_or_else(|| anyhow!("no running event: {v}"))?;
    let started = v["started_at"].as_str().and_then(rfc3339_ms);
    Ok(Latency { claim_ms: (running - queued) as f64, started_ms: started.map(|s| (s - queued) as f64), round_trip_ms })
}

// ---------------------------------------------------------------- the table

struct Table {
    rows: Vec<[String; 3]>,
}

impl Table {
    fn section(&mut self, title: &str) {
        self.rows.push([title.to_string(), String::new(), String::new()]);
    }

    fn row(&mut self, what: &str, value: String, detail: String) {
        self.rows.push([format!("  {what}"), value, detail]);
    }

    fn print(&self) {
        // Section titles span the row; only measurement rows set the columns.
        let rows = || self.rows.iter().filter(|r| !r[1].is_empty() || !r[2].is_empty());
        let w0 = rows().map(|r| r[0].len()).max().unwrap_or(0);
        let w1 = rows().map(|r| r[1].len()).max().unwrap_or(0);
        let rule = "-".repeat(w0 + w1 + 60);
        println!("{rule}");
        for [a, b, c] in &self.rows {
            if b.is_empty() && c.is_empty() {
                println!("{a}");
            } else {
                println!("{a:<w0$}  {b:>w1$}  {c}");
            }
        }
        println!("{rule}");
    }
}

fn main() -> ExitCode {
    berth_e2e::bench::exit("throughput", real_main())
}

fn real_main() -> Result<()> {
    let begin = Instant::now();
    let budget_end = begin + TOTAL_BUDGET;
    let left = || budget_end.saturating_duration_since(Instant::now());
    // The timestamp parser against two known instants.
    assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(rfc3339_ms("2000-03-01T01:00:00.5+01:00"), Some(951_868_800_500));

    let missing = missing_binaries()?;
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "missing {}: build the release binaries first:\n  cargo build --release --workspace && cargo bench -p berth-e2e --bench throughput",
            names.join(", ")
        );
    }
    let bins = binaries_dir()?;
    let load_at_start = load_avg();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);

    let mut t = Table { rows: Vec::new() };

    // 1. Raw spawn rate.
    eprintln!("[1/3] raw spawn rate of /bin/true: {DRIVERS} drivers x {SPAWN_ROUNDS} rounds of {SPAWNS}");
    let mut std_rates = Rates::default();
    for _ in 0..SPAWN_ROUNDS {
        let r = spawn_rate_std(SPAWNS, SPAWN_ROUND_LIMIT.min(left()));
        std_rates.add(&r);
        eprintln!("      std::process::Command: {} spawns in {:.2?} ({:.0}/s)", r.done, r.elapsed, r.per_sec());
    }
    let scratch = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut exec_rates = Rates::default();
    let mut exec_note = String::new();
    for _ in 0..SPAWN_ROUNDS {
        if left() < Duration::from_secs(100) {
            exec_note = " (rounds cut short: time budget)".into();
            break;
        }
        match executor_rate(&rt, scratch.path(), DRIVERS, SPAWNS, SPAWN_ROUND_LIMIT) {
            Ok(r) => {
                exec_rates.add(&r);
                eprintln!("      worker executor: {} spawns in {:.2?} ({:.0}/s)", r.done, r.elapsed, r.per_sec());
            }
            Err(e) => {
                exec_note = format!(" (error: {e:#})");
                break;
            }
        }
    }
    drop(rt);
    let (std_rates, std_failed) = (std_rates.per_sec, std_rates.failed);
    let (exec_rates, exec_failed) = (exec_rates.per_sec, exec_rates.failed);
    let raw_std = median(&std_rates);
    let raw_exec = median(&exec_rates);
    t.section(&format!("1. raw fork/exec rate of /bin/true ({DRIVERS} concurrent drivers, {SPAWNS} spawns a round)"));
    t.row(
        "std::process::Command (threads, spawn+wait)",
        format!("{} spawns/s", fmt_opt(raw_std, 0)),
        format!("median of {} rounds [{}], {std_failed} failed", std_rates.len(), fmt_list(&std_rates, 0)),
    );
    t.row(
        "worker executor process::run (tokio tasks)",
        format!("{} spawns/s", fmt_opt(raw_exec, 0)),
        format!("median of {} rounds [{}], {exec_failed} failed; pipes+pgroup+spool file per attempt{exec_note}", exec_rates.len(), fmt_list(&exec_rates, 0)),
    );

    // 2 and 3 need a cluster.
    eprintln!("[2/3] starting a cluster on loopback: 1 coordinator, 1 worker with {DRIVERS} slots");
    let mut c = Cluster::start()?;
    c.add_worker("bench", DRIVERS)?;
    // Warm up: connections, the SQLite store's first writes, the worker's claim loop.
    let _ = array_run(&c, &bins, 20, Duration::from_secs(20));

    let mut walls = Vec::new();
    let mut server_rates = Vec::new();
    let mut array_note = String::new();
    for round in 0..ARRAY_ROUNDS {
        let last = walls.iter().cloned().fold(0.0_f64, f64::max);
        // Keep time for phase 3 (about a minute) after this round.
        if round > 0 && left().as_secs_f64() < last * 1.5 + 70.0 {
            array_note = " (rounds cut short: time budget)".into();
            break;
        }
        match array_run(&c, &bins, ARRAY_TASKS, ARRAY_LIMIT.min(left())) {
            Ok(r) => {
                eprintln!("      array of {ARRAY_TASKS}: {:.2?} wall, server span {:?} ms", r.wall, r.server_ms);
                walls.push(r.wall.as_secs_f64());
                if let Some(ms) = r.server_ms.filter(|ms| *ms > 0) {
                    server_rates.push(f64::from(ARRAY_TASKS) * 1e3 / ms as f64);
                }
            }
            Err(e) => {
                array_note = format!(" (round {} failed: {e:#})", round + 1);
                eprintln!("      {array_note}");
                cancel_unfinished(&c, &bins);
                break;
            }
        }
    }
    let wall_rates: Vec<f64> = walls.iter().map(|w| f64::from(ARRAY_TASKS) / w).collect();
    let e2e = median(&wall_rates);
    let ratio = |raw: Option<f64>| match (e2e, raw) {
        (Some(e), Some(r)) if r > 0.0 => format!("{:.1}%", e / r * 100.0),
        _ => "n/a".into(),
    };
    t.section(&format!("2. end-to-end: array of {ARRAY_TASKS} x `true`, 1 worker x {DRIVERS} slots, coordinator + worker on loopback"));
    t.row(
        "`berth submit --wait --array` start to exit",
        format!("{} jobs/s", fmt_opt(e2e, 0)),
        format!("median of {} rounds [{}]; wall s [{}]{array_note}", wall_rates.len(), fmt_list(&wall_rates, 0), fmt_list(&walls, 2)),
    );
    t.row(
        "coordinator clock: submitted_at to ended_at",
        format!("{} jobs/s", fmt_opt(median(&server_rates), 0)),
        format!("median of {} rounds [{}] (ms timestamps)", server_rates.len(), fmt_list(&server_rates, 0)),
    );
    t.row("ratio to raw std::process::Command rate", ratio(raw_std), "end-to-end jobs/s / raw spawns/s".into());
    t.row("ratio to raw worker executor rate", ratio(raw_exec), "end-to-end jobs/s / executor spawns/s".into());

    // 3. Submit-to-start latency, one job at a time on the idle cluster.
    eprintln!("[3/3] submit-to-start latency: {LATENCY_JOBS} single jobs, one after another");
    let phase_end = Instant::now() + LATENCY_LIMIT.min(left());
    let mut claim = Vec::new();
    let mut started = Vec::new();
    let mut rtt = Vec::new();
    let mut lat_note = String::new();
    for i in 0..LATENCY_JOBS {
        if Instant::now() > phase_end {
            lat_note = format!(" (stopped after {i} jobs: time budget)");
            break;
        }
        match latency_one(&c, &bins) {
            Ok(l) => {
                claim.push(l.claim_ms);
                started.extend(l.started_ms);
                rtt.push(l.round_trip_ms);
            }
            Err(e) => {
                lat_note = format!(" (job {} failed: {e:#})", i + 1);
                eprintln!("      {lat_note}");
                break;
            }
        }
    }
    let p = |v: &[f64]| format!("p50 {} ms  p99 {} ms", fmt_opt(percentile(v, 50.0), 0), fmt_opt(percentile(v, 99.0), 0));
    t.section(&format!("3. submit-to-start latency, idle cluster, single `true` jobs one at a time (n={})", claim.len()));
    t.row("queued event -> running event", p(&claim), format!("coordinator handed the task to the worker; events are ms resolution{lat_note}"));
    t.row("queued event -> task started_at", p(&started), format!("worker reported the process running (n={}); ms resolution", started.len()));
    t.row(
        "`berth submit --wait` start to exit",
        format!("p50 {} ms  p99 {} ms", fmt_opt(percentile(&rtt, 50.0), 1), fmt_opt(percentile(&rtt, 99.0), 1)),
        "client wall clock: process start, QUIC+TLS connect, submit, run, watch".into(),
    );
    drop(c);

    println!();
    println!("berth throughput bench (release profile)");
    println!(
        "machine: {cores} cores (std::thread::available_parallelism), {}, Linux {}",
        cpu_model().unwrap_or_else(|| "unknown CPU".into()),
        kernel().unwrap_or_else(|| "?".into())
    );
    println!("load average (1 min): {} at start, {} at end", load_at_start, load_avg());
    t.print();
    println!("total bench time {:.1?}", begin.elapsed());
    Ok(())
}
