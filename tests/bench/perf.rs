//! The performance harness of issue 8: berth against the machine itself, in one run,
//! one table. Every figure is set against a baseline that this same run measures on
//! this same machine (these machines are shared and noisy), and every figure is the
//! median of several rounds.
//!
//! 1. End to end, trivial jobs: an array of `true` through one worker with 2 x CPUs
//!    slots, against the raw rate of `true` through the worker's own executor
//!    (`berth_worker::executor::process::run`, a spool per attempt) at the same
//!    parallelism with no scheduler.
//! 2. Submit-to-start latency on an idle cluster: single jobs one at a time, from the
//!    client's send to the job's first instruction (the job is `date +%s%N`; its clock
//!    reading is compared with the harness's reading just before it sends): (a) through
//!    the `berth` binary, raw and with the time of an empty `berth --version` subtracted;
//!    (b) through an in-process client on an open connection, against the harness
//!    spawning `date +%s%N` itself.
//! 3. The job store alone with simulated workers (no process spawned): claim + complete
//!    per second with 1 and 50 workers on SQLite (and PostgreSQL when
//!    `BERTH_TEST_POSTGRES` names a server), against the same rows written raw, one
//!    transaction per operation with the same durability (`synchronous=FULL`).
//! 4. Output streaming: one job writing 1 GiB to stdout, bytes per second into the
//!    coordinator's log store (checked in its database), against the same bytes sent by
//!    the harness over one QUIC stream on loopback with berth's TLS and transport
//!    settings, the server reading and discarding.
//! 5. Scale: a 1,000,000-task array with no worker — time to submit, coordinator
//!    resident memory while it is queued, `berth list --state queued --limit 20`
//!    latency; and simulated workers (10,000; 1,000 with `--quick`) connected and
//!    heartbeating as a real worker does — coordinator CPU over fixed windows.
//! 6. Docker: container jobs through berth against a `docker run --rm IMG true` loop at
//!    the same parallelism, with the test image of the end-to-end harness.
//!
//! ```text
//! cargo build --release --workspace && cargo bench -p berth-e2e --bench perf [-- --quick] [-- --json FILE]
//! ```
//!
//! Flags: `--quick` (counts about a tenth: a fast check), `--rounds N` (default 3),
//! `--json FILE` (the table as JSON, for comparison across commits; a relative path is
//! taken from the directory `cargo bench` was started in), `--only 1,3` (some
//! scenarios), `--sim-workers N`. Every phase has a deadline and the whole run is
//! bounded (about 10 minutes; `--quick` about 4); processes, containers and the test
//! image made here are removed at the end.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use berth_e2e::bench::{cpu_model, executor_rate, kernel, load_avg, median, percentile, Rate};
use berth_e2e::raw::Raw;
use berth_e2e::store_sim;
use berth_e2e::{run_timeout, Cluster, Proc};
use berth_shared::ids::JobSelector;
use berth_shared::wire::{OutStream, Request, Response};
use serde_json::{json, Value};

// ---------------------------------------------------------------- options and scale

struct Opts {
    quick: bool,
    rounds: usize,
    json: Option<PathBuf>,
    only: Option<Vec<u8>>,
    sim_workers: Option<usize>,
}

const USAGE: &str = "usage: cargo bench -p berth-e2e --bench perf -- [--quick] [--rounds N] [--json FILE] [--only 1,2,...] [--sim-workers N]";

/// A path given on the command line, from the directory the user ran `cargo bench` in
/// (cargo starts a bench in its package's directory; `$PWD` still names the user's).
fn user_path(p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        return p;
    }
    match std::env::var_os("PWD").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.is_dir() => d.join(p),
        _ => p,
    }
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts { quick: false, rounds: 3, json: None, only: None, sim_workers: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            // `cargo bench` passes `--bench` to every bench binary.
            "--bench" => {}
            "--quick" => o.quick = true,
            "--rounds" => o.rounds = value("--rounds")?.parse().context("--rounds N")?,
            "--json" => o.json = Some(user_path(&value("--json")?)),
            "--only" => {
                let v = value("--only")?;
                o.only =
                    Some(v.split(',').map(|s| s.trim().parse::<u8>().with_context(|| format!("--only `{v}`: scenario numbers 1-6"))).collect::<Result<_>>()?);
            }
            "--sim-workers" => o.sim_workers = Some(value("--sim-workers")?.parse().context("--sim-workers N")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if o.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(o)
}

/// Counts for a full run and for `--quick` (about a tenth).
struct Scale {
    jobs: u32,
    latency_jobs: usize,
    store_tasks: u32,
    raw_store_limit: Duration,
    stream_bytes: u64,
    array_tasks: u32,
    sim_workers: usize,
    cpu_window: Duration,
    docker_jobs: u32,
    /// The whole run: later phases are cut short or skipped once it is spent.
    budget: Duration,
}

impl Scale {
    fn new(o: &Opts) -> Scale {
        let mut s = if o.quick {
            Scale {
                jobs: 1_000,
                latency_jobs: 20,
                store_tasks: 1_000,
                raw_store_limit: Duration::from_secs(1),
                stream_bytes: 256 << 20,
                array_tasks: 100_000,
                sim_workers: 1_000,
                cpu_window: Duration::from_secs(5),
                docker_jobs: 20,
                budget: Duration::from_secs(240),
            }
        } else {
            Scale {
                jobs: 10_000,
                latency_jobs: 200,
                store_tasks: 10_000,
                raw_store_limit: Duration::from_secs(4),
                stream_bytes: 1 << 30,
                array_tasks: 1_000_000,
                sim_workers: 10_000,
                cpu_window: Duration::from_secs(10),
                docker_jobs: 200,
                budget: Duration::from_secs(570),
            }
        };
        if let Some(n) = o.sim_workers {
            s.sim_workers = n;
        }
        s
    }
}

/// Deadlines: the run's, and each phase's within it.
struct Clock {
    end: Instant,
}

impl Clock {
    fn left(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }
    /// A phase's deadline: `cap` from now, or the run's end if that comes first.
    fn phase(&self, cap: Duration) -> Instant {
        Instant::now() + cap.min(self.left())
    }
}

fn until(t: Instant) -> Duration {
    t.saturating_duration_since(Instant::now())
}

/// Whether another round fits before `end`, judged by the longest round so far.
fn round_fits(end: Instant, taken: &[Duration]) -> bool {
    let longest = taken.iter().max().copied().unwrap_or_default();
    Instant::now() + longest.mul_f64(1.2) < end
}

// ---------------------------------------------------------------- statistics

/// A number with as many decimals as its size deserves.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn list(v: &[f64]) -> String {
    format!("[{}]", v.iter().map(|x| num(*x)).collect::<Vec<_>>().join(", "))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

// ---------------------------------------------------------------- the table

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Miss,
    /// Measured, but there is no target (or not at the target's scale).
    Info,
    Skipped,
    Error,
}

impl Verdict {
    fn of(ok: Option<bool>) -> Verdict {
        match ok {
            Some(true) => Verdict::Pass,
            Some(false) => Verdict::Miss,
            None => Verdict::Error,
        }
    }
    fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::Info => "-",
            Verdict::Skipped => "skipped",
            Verdict::Error => "error",
        }
    }
}

/// How the ratio of a row reads: a percentage (throughput against its baseline) or a
/// factor (anything else).
#[derive(Clone, Copy)]
enum RatioStyle {
    Percent,
    Times,
}

struct Row {
    id: String,
    scenario: String,
    figure: Option<f64>,
    unit: String,
    /// Shown instead of `figure unit` (latency rows show p50 and p99).
    figure_text: Option<String>,
    baseline: Option<f64>,
    baseline_unit: String,
    baseline_text: Option<String>,
    ratio: Option<f64>,
    ratio_style: RatioStyle,
    target: String,
    verdict: Verdict,
    /// What the figure and the baseline are, rounds, caveats.
    note: String,
    extra: serde_json::Map<String, Value>,
}

impl Row {
    fn new(id: &str, scenario: &str, unit: &str, baseline_unit: &str, target: &str) -> Row {
        Row {
            id: id.into(),
            scenario: scenario.into(),
            figure: None,
            unit: unit.into(),
            figure_text: None,
            baseline: None,
            baseline_unit: baseline_unit.into(),
            baseline_text: None,
            ratio: None,
            ratio_style: RatioStyle::Times,
            target: target.into(),
            verdict: Verdict::Info,
            note: String::new(),
            extra: serde_json::Map::new(),
        }
    }

    fn not_run(id: &str, scenario: &str, verdict: Verdict, why: String) -> Row {
        let mut r = Row::new(id, scenario, "", "", "");
        r.verdict = verdict;
        r.note = why;
        r
    }

    fn values(mut self, figure: Option<f64>, baseline: Option<f64>) -> Row {
        self.figure = figure;
        self.baseline = baseline;
        self.ratio = ratio(figure, baseline);
        self
    }

    fn extra(mut self, k: &str, v: Value) -> Row {
        self.extra.insert(k.into(), v);
        self
    }

    fn figure_cell(&self) -> String {
        if self.verdict == Verdict::Skipped || (self.verdict == Verdict::Error && self.figure.is_none()) {
            return String::new();
        }
        match (&self.figure_text, self.figure) {
            (Some(t), _) => t.clone(),
            (None, Some(v)) => format!("{} {}", num(v), self.unit),
            (None, None) => "n/a".into(),
        }
    }

    fn baseline_cell(&self) -> String {
        match (&self.baseline_text, self.baseline) {
            (Some(t), _) => t.clone(),
            (None, Some(v)) => format!("{} {}", num(v), self.baseline_unit),
            (None, None) if self.baseline_unit.is_empty() => String::new(),
            (None, None) => "n/a".into(),
        }
    }

    fn ratio_cell(&self) -> String {
        match (self.ratio, self.ratio_style) {
            (Some(r), RatioStyle::Percent) => format!("{:.1}%", r * 100.0),
            (Some(r), RatioStyle::Times) => format!("{}x", num(r)),
            (None, _) => String::new(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "scenario": self.scenario,
            "figure": self.figure,
            "unit": self.unit,
            "figure_text": self.figure_cell(),
            "baseline": self.baseline,
            "baseline_unit": self.baseline_unit,
            "baseline_text": self.baseline_cell(),
            "ratio": self.ratio,
            "target": self.target,
            "result": self.verdict.word(),
            "note": self.note,
            "detail": Value::Object(self.extra.clone()),
        })
    }
}

fn print_table(rows: &[Row]) {
    let head = ["#", "scenario", "figure", "baseline", "ratio", "target", "result"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| [r.id.clone(), r.scenario.clone(), r.figure_cell(), r.baseline_cell(), r.ratio_cell(), r.target.clone(), r.verdict.word().to_string()])
        .collect();
    let mut w = head.map(str::len);
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String; 7]| {
        let mut s = String::new();
        for (i, x) in c.iter().enumerate() {
            let pad = w[i].saturating_sub(x.chars().count());
            // Numbers right-aligned, words left-aligned.
            if (2..=4).contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(x);
            } else {
                s.push_str(x);
                s.push_str(&" ".repeat(pad));
            }
            s.push_str("  ");
        }
        s.trim_end().to_string()
    };
    let rule = "-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1));
    println!("{rule}");
    println!("{}", line(&head.map(String::from)));
    println!("{rule}");
    for c in &cells {
        println!("{}", line(c));
    }
    println!("{rule}");
    println!("notes:");
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        println!("  {:<3} {}", r.id, r.note);
    }
}

// ---------------------------------------------------------------- the machine

/// The commit the run measured, `+dirty` with uncommitted changes (for the JSON).
fn git_describe() -> Option<String> {
    let mut c = Command::new("git");
    c.args(["rev-parse", "--short=12", "HEAD"]);
    let head = run_timeout(c, Duration::from_secs(5)).ok().filter(|o| o.status.success())?;
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let mut c = Command::new("git");
    c.args(["status", "--porcelain", "--untracked-files=no"]);
    let dirty = run_timeout(c, Duration::from_secs(10)).ok().is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty { format!("{head}+dirty") } else { head })
}

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

fn ns_now() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

// ---------------------------------------------------------------- the cluster

/// What every scenario shares.
struct Env {
    bins: PathBuf,
    rounds: usize,
    par: usize,
    scale: Scale,
    clock: Clock,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn berth(&self, c: &Cluster, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bins.join("berth"));
        cmd.args(args).env("BERTH_PROFILE", &c.profile).env("NO_COLOR", "1").stdin(Stdio::null());
        cmd
    }

    /// `berth ARGS` with a deadline; it must exit 0; its stdout and how long it took.
    fn berth_ok(&self, c: &Cluster, args: &[&str], limit: Duration) -> Result<(Vec<u8>, Duration)> {
        let start = Instant::now();
        let out = run_timeout(self.berth(c, args), limit)?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!("berth {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok((out.stdout, took))
    }

    fn berth_json(&self, c: &Cluster, args: &[&str], limit: Duration) -> Result<(Value, Duration)> {
        let (out, took) = self.berth_ok(c, args, limit)?;
        Ok((serde_json::from_slice(&out).with_context(|| format!("berth {} printed no JSON", args.join(" ")))?, took))
    }

    /// Starts a worker with berth's default logging (the harness's own helpers turn on
    /// debug logs, which a benchmark should not pay for) and waits until it is listed.
    fn add_worker(&self, c: &mut Cluster, name: &str, slots: usize, flags: &[&str]) -> Result<()> {
        let token = c.token()?;
        let mut cmd = c.worker_cmd(name, slots, Some(&token));
        cmd.args(flags).env_remove("BERTH_LOG");
        let log = c.path(&format!("worker-{name}.{}.log", c.workers.len()));
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).stdin(Stdio::null());
        let child = cmd.spawn().context("cannot start berth-worker")?;
        c.workers.push((name.to_string(), Proc { name: format!("worker {name}"), child, log }));
        c.wait_worker_connected(name, true)
    }

    /// Cancels whatever is still queued or running (after a round ran out of time), so
    /// the next round measures an idle cluster.
    fn cancel_unfinished(&self, c: &Cluster) {
        let Ok((Value::Array(jobs), _)) = self.berth_json(c, &["list", "--json", "--limit", "50"], Duration::from_secs(10)) else { return };
        for j in jobs {
            if matches!(j["state"].as_str(), Some("queued" | "running")) {
                if let Some(id) = j["id"].as_str() {
                    let _ = run_timeout(self.berth(c, &["cancel", id]), Duration::from_secs(10));
                }
            }
        }
    }

    fn logs_hint(c: &Cluster) -> String {
        let text = c.logs_of("coordinator");
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

// ---------------------------------------------------------------- 1. end to end, trivial jobs

/// `berth submit --wait --json --array 0-(N-1) -- ARGV`, timed from start to exit; every
/// task must succeed. Returns the wall time and the status JSON.
fn array_run(env: &Env, c: &Cluster, tasks: u32, pre: &[&str], argv: &[&str], limit: Duration) -> Result<(Duration, Value)> {
    let range = format!("0-{}", tasks - 1);
    let mut args = vec!["submit", "--wait", "--json", "--array", &range];
    args.extend_from_slice(pre);
    args.push("--");
    args.extend_from_slice(argv);
    let (v, wall) = env.berth_json(c, &args, limit)?;
    let ok = v["counts"]["succeeded"].as_u64().unwrap_or(0);
    if ok != u64::from(tasks) {
        bail!("the array ended with {ok} of {tasks} tasks succeeded: {}", v["counts"]);
    }
    Ok((wall, v))
}

fn scenario_1(env: &Env) -> Result<Vec<Row>> {
    let (par, n) = (env.par, env.scale.jobs);
    let end = env.clock.phase(Duration::from_secs(if env.scale.jobs > 5_000 { 130 } else { 40 }));
    eprintln!("[1] an array of {n} `true` through one worker with {par} slots, and the raw executor rate at {par}, alternating, x {} rounds", env.rounds);
    let scratch = tempfile::Builder::new().prefix("berth-perf-").tempdir()?;
    let mut c = Cluster::start()?;
    env.add_worker(&mut c, "e2e", par, &[])?;
    // Warm up: connections, the store's first writes, the worker's claim loop.
    array_run(env, &c, 50, &[], &["true"], Duration::from_secs(30)).context("warm-up array")?;
    let (mut rates, mut server, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let mut raw_failed = 0;
    let mut taken = Vec::new();
    let mut note = String::new();
    // Baseline and berth take turns, so drifting load on a shared machine hits both.
    for r in 0..env.rounds {
        if r > 0 && !round_fits(end, &taken) {
            note = format!(" (rounds cut short at {r}: time budget)");
            break;
        }
        let started = Instant::now();
        let rate = executor_rate(&env.rt, scratch.path(), par, n as usize, Duration::from_secs(30))?;
        raw_failed += rate.failed;
        eprintln!("    executor: {} of {n} in {:.2?} ({:.0}/s)", rate.done, rate.elapsed, rate.per_sec());
        if rate.done > 0 {
            raw.push(rate.per_sec());
        }
        match array_run(env, &c, n, &[], &["true"], until(end).max(Duration::from_secs(20))) {
            Ok((wall, v)) => {
                rates.push(f64::from(n) / wall.as_secs_f64());
                let t = |k: &str| v[k].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
                if let (Some(a), Some(b)) = (t("submitted_at"), t("ended_at")) {
                    let ms = (b - a).num_milliseconds();
                    if ms > 0 {
                        server.push(f64::from(n) * 1e3 / ms as f64);
                    }
                }
                eprintln!("    berth: {n} in {wall:.2?} ({:.0}/s)", f64::from(n) / wall.as_secs_f64());
            }
            Err(e) => {
                note = format!(" (round {} failed: {e:#})", r + 1);
                env.cancel_unfinished(&c);
                break;
            }
        }
        taken.push(started.elapsed());
    }
    let mut row =
        Row::new("1", &format!("e2e: {n} x `true` (array), 1 worker x {par} slots"), "jobs/s", "spawns/s", ">= 50%").values(median(&rates), median(&raw));
    row.ratio_style = RatioStyle::Percent;
    row.verdict = Verdict::of(row.ratio.map(|r| r >= 0.5));
    row.note = format!(
        "figure: `berth submit --wait --array` start to exit, rounds {} (coordinator clock submitted->ended: {}). baseline: worker executor process::run + spool, {par} concurrent, no scheduler, rounds {}, {raw_failed} failed{note}",
        list(&rates),
        list(&server),
        list(&raw)
    );
    Ok(vec![row.extra("rounds", json!(rates)).extra("baseline_rounds", json!(raw)).extra("server_clock_rounds", json!(server))])
}

// ---------------------------------------------------------------- 2. submit-to-start latency

fn parse_ns(out: &[u8]) -> Result<i128> {
    let s = String::from_utf8_lossy(out);
    s.trim().parse::<i128>().with_context(|| format!("the job printed `{}`, not a clock reading in ns", s.trim()))
}

/// A job's stdout, once it has ended (`Logs` with `follow` answers until then).
async fn job_stdout(raw: &Raw, job: &str) -> Result<Vec<u8>> {
    let resps = raw.request(&Request::Logs { job: JobSelector { prefix: job.to_string(), index: None }, attempt: None, follow: true }).await?;
    let mut out = Vec::new();
    for r in resps {
        match r {
            Response::Output { stream: OutStream::Stdout, data } => out.extend_from_slice(&data),
            Response::Error(e) => bail!("logs of {job}: {e}"),
            _ => {}
        }
    }
    Ok(out)
}

/// Through the binary: the clock just before `berth submit` is started, to the job's.
fn latency_binary(env: &Env, c: &Cluster, raw: &Raw) -> Result<f64> {
    let t0 = ns_now();
    let (v, _) = env.berth_json(c, &["submit", "--wait", "--json", "--", "date", "+%s%N"], Duration::from_secs(15))?;
    if v["state"] != "succeeded" {
        bail!("the job ended {}: {v}", v["state"]);
    }
    let id = v["id"].as_str().ok_or_else(|| anyhow!("no job id in {v}"))?;
    let out = env.rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), job_stdout(raw, id)).await }).context("logs")??;
    Ok((parse_ns(&out)? - t0) as f64 / 1e6)
}

/// In-process, on an open connection: the clock just before the Submit frame is written,
/// to the job's.
fn latency_inproc(env: &Env, raw: &Raw) -> Result<f64> {
    use berth_shared::job::{Command as JobCommand, JobSpec};
    env.rt.block_on(async {
        let spec = JobSpec::new(JobCommand::Argv(vec!["date".into(), "+%s%N".into()]));
        let req = Request::Submit { spec, idempotency_key: uuid::Uuid::new_v4() };
        let t0 = ns_now();
        let resps = tokio::time::timeout(Duration::from_secs(15), raw.request(&req)).await.context("submit")??;
        let job = match resps.first() {
            Some(Response::Submitted { job, .. }) => job.to_string(),
            other => bail!("submit answered {other:?}"),
        };
        let out = tokio::time::timeout(Duration::from_secs(15), job_stdout(raw, &job)).await.context("logs")??;
        Ok((parse_ns(&out)? - t0) as f64 / 1e6)
    })
}

/// The harness spawning `date +%s%N` itself: the floor under any scheduler.
fn latency_floor() -> Result<f64> {
    let t0 = ns_now();
    let out = Command::new("date").arg("+%s%N").stdin(Stdio::null()).stderr(Stdio::null()).output()?;
    Ok((parse_ns(&out.stdout)? - t0) as f64 / 1e6)
}

/// Wall time of one `berth --version`: the process start and exit a `berth` call pays.
fn empty_berth(env: &Env) -> Result<f64> {
    let start = Instant::now();
    let out = run_timeout(
        {
            let mut c = Command::new(env.bins.join("berth"));
            c.arg("--version").stdin(Stdio::null());
            c
        },
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        bail!("berth --version failed");
    }
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn scenario_2(env: &Env) -> Result<Vec<Row>> {
    let (par, n) = (env.par, env.scale.latency_jobs);
    let end = env.clock.phase(Duration::from_secs(if n > 50 { 90 } else { 30 }));
    eprintln!("[2] submit-to-start latency: {n} single `date +%s%N` jobs one at a time, x {} rounds, through `berth` and in-process", env.rounds);
    let mut c = Cluster::start()?;
    env.add_worker(&mut c, "lat", par, &[])?;
    let raw = env.rt.block_on(Raw::connect(&c.profile))?;
    for _ in 0..3 {
        latency_binary(env, &c, &raw).context("warm-up")?;
        latency_inproc(env, &raw).context("warm-up")?;
    }
    struct Round {
        raw_p: (f64, f64),
        adj_p: (f64, f64),
        base: f64,
        inproc_p: (f64, f64),
        floor_p: (f64, f64),
    }
    let p = |v: &[f64]| (percentile(v, 50.0).unwrap_or(f64::NAN), percentile(v, 99.0).unwrap_or(f64::NAN));
    let mut rounds = Vec::new();
    let mut taken = Vec::new();
    let mut note = String::new();
    let mut samples = 0;
    'rounds: for r in 0..env.rounds {
        if r > 0 && !round_fits(end, &taken) {
            note = format!(" (rounds cut short at {r}: time budget)");
            break;
        }
        let started = Instant::now();
        let mut base = Vec::new();
        let mut floor = Vec::new();
        for _ in 0..20 {
            base.push(empty_berth(env)?);
            floor.push(latency_floor()?);
        }
        let base_p50 = percentile(&base, 50.0).unwrap_or(0.0);
        let (mut bin, mut inproc) = (Vec::new(), Vec::new());
        for i in 0..n {
            if Instant::now() > end {
                note = format!(" (round {} stopped after {i} jobs: time budget)", r + 1);
                if bin.len() < 2 {
                    break 'rounds;
                }
                break;
            }
            bin.push(latency_binary(env, &c, &raw).with_context(|| format!("job {} of round {}", i + 1, r + 1))?);
            inproc.push(latency_inproc(env, &raw).with_context(|| format!("in-process job {} of round {}", i + 1, r + 1))?);
        }
        samples += bin.len();
        let adj: Vec<f64> = bin.iter().map(|x| x - base_p50).collect();
        let round = Round { raw_p: p(&bin), adj_p: p(&adj), base: base_p50, inproc_p: p(&inproc), floor_p: p(&floor) };
        eprintln!(
            "    round {}: berth raw p50 {:.2} p99 {:.2} ms, --version {:.2} ms, adjusted p50 {:.2} p99 {:.2}; in-process p50 {:.2} p99 {:.2}; floor p50 {:.2}",
            r + 1,
            round.raw_p.0,
            round.raw_p.1,
            round.base,
            round.adj_p.0,
            round.adj_p.1,
            round.inproc_p.0,
            round.inproc_p.1,
            round.floor_p.0
        );
        rounds.push(round);
        taken.push(started.elapsed());
    }
    drop(raw);
    let med = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let (adj50, adj99) = (med(&|r| r.adj_p.0), med(&|r| r.adj_p.1));
    let (raw50, raw99) = (med(&|r| r.raw_p.0), med(&|r| r.raw_p.1));
    let (in50, in99) = (med(&|r| r.inproc_p.0), med(&|r| r.inproc_p.1));
    let (fl50, fl99) = (med(&|r| r.floor_p.0), med(&|r| r.floor_p.1));
    let base = med(&|r| r.base);
    let ok = |a: Option<f64>, b: Option<f64>| Verdict::of(a.zip(b).map(|(a, b)| a <= 5.0 && b <= 20.0));
    let ms = |a: Option<f64>, b: Option<f64>| format!("p50 {} / p99 {} ms", a.map_or("n/a".into(), num), b.map_or("n/a".into(), num));
    let per = format!("{} rounds of {n} jobs (n={samples})", rounds.len());

    let mut a = Row::new("2a", "submit-to-start, `berth submit` (adjusted)", "ms", "ms", "p50<=5, p99<=20 ms").values(adj50, base);
    a.figure_text = Some(ms(adj50, adj99));
    a.baseline_text = base.map(|b| format!("{} ms", num(b)));
    a.verdict = ok(adj50, adj99);
    a.note = format!(
        "figure: harness clock before spawning `berth submit --wait -- date +%s%N` to the job's own clock reading, minus the baseline (p50 of an empty `berth --version`: \
         process start and exit); what remains still includes the client's profile load and QUIC+TLS connect. raw (not adjusted): {}. {per}, medians of per-round percentiles{note}",
        ms(raw50, raw99)
    );
    let a = a
        .extra("p50_ms", json!(adj50))
        .extra("p99_ms", json!(adj99))
        .extra("raw_p50_ms", json!(raw50))
        .extra("raw_p99_ms", json!(raw99))
        .extra("samples", json!(samples));

    let mut b = Row::new("2b", "submit-to-start, in-process client", "ms", "ms", "p50<=5, p99<=20 ms").values(in50, fl50);
    b.figure_text = Some(ms(in50, in99));
    b.baseline_text = Some(ms(fl50, fl99));
    b.verdict = ok(in50, in99);
    b.note = format!(
        "figure: harness clock just before the Submit frame is written on an open connection (tests/harness/raw.rs) to the job's clock reading. \
         baseline: the harness spawning `date +%s%N` itself (20 a round). {per}"
    );
    let b = b.extra("p50_ms", json!(in50)).extra("p99_ms", json!(in99)).extra("baseline_p99_ms", json!(fl99)).extra("samples", json!(samples));
    Ok(vec![a, b])
}

// ---------------------------------------------------------------- 3. the store alone

/// The raw baselines of scenario 3 (the simulated worker is `berth_e2e::store_sim`).
mod store {
    use std::time::{Duration, Instant};

    use anyhow::Result;
    use chrono::Utc;

    /// The rows one claim and one completion write (a task row, its event, the job's
    /// counts), in the shape of berth's tables. `ROW_ID` is the backend's row id type;
    /// the statements below use `$N` placeholders, `?N` for SQLite.
    const RAW_TABLES: &str = "
        CREATE TABLE jobs(seq INTEGER PRIMARY KEY, n_queued INTEGER NOT NULL, n_running INTEGER NOT NULL, n_succeeded INTEGER NOT NULL);
        CREATE TABLE tasks(job_seq INTEGER NOT NULL, idx INTEGER NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, lease TEXT, worker TEXT,
            lease_expires BIGINT, exit_code INTEGER, started_at BIGINT, ended_at BIGINT, runtime_ms BIGINT, PRIMARY KEY(job_seq, idx));
        CREATE TABLE events(id ROW_ID PRIMARY KEY, job_seq INTEGER NOT NULL, idx INTEGER, time BIGINT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, worker TEXT, reason TEXT);
        INSERT INTO jobs(seq, n_queued, n_running, n_succeeded) VALUES (1, 1000000000, 0, 0);";

    const CLAIM_SQL: [&str; 3] = [
        "INSERT INTO tasks(job_seq, idx, state, attempt, lease, worker, lease_expires, started_at) VALUES (1, $1, 'running', 1, $2, 'sim-0', $3, $3)",
        "INSERT INTO events(job_seq, idx, time, state, attempt, worker) VALUES (1, $1, $2, 'running', 1, 'sim-0')",
        "UPDATE jobs SET n_queued = n_queued - 1, n_running = n_running + 1 WHERE seq = 1",
    ];
    const FINISH_SQL: [&str; 3] = [
        "UPDATE tasks SET state = 'succeeded', exit_code = 0, ended_at = $2, runtime_ms = 1, lease = NULL WHERE job_seq = 1 AND idx = $1",
        "INSERT INTO events(job_seq, idx, time, state, attempt, worker) VALUES (1, $1, $2, 'succeeded', 1, 'sim-0')",
        "UPDATE jobs SET n_running = n_running - 1, n_succeeded = n_succeeded + 1 WHERE seq = 1",
    ];

    /// The baseline: the same rows through raw SQLite (WAL, `synchronous=FULL`, as
    /// berth opens it), one transaction per operation — a claim, then a completion — on
    /// one connection, until `tasks` are done or `limit` passes. Returns tasks/s.
    pub fn raw_sqlite(path: &std::path::Path, tasks: u32, limit: Duration) -> Result<f64> {
        let mut conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(&RAW_TABLES.replace("ROW_ID", "INTEGER"))?;
        let start = Instant::now();
        let mut done = 0u32;
        while done < tasks && start.elapsed() < limit {
            let now = Utc::now().timestamp_millis();
            let lease = uuid::Uuid::new_v4().to_string();
            let tx = conn.transaction()?;
            tx.prepare_cached(&CLAIM_SQL[0].replace('$', "?"))?.execute(rusqlite::params![done, lease, now + 30_000])?;
            tx.prepare_cached(&CLAIM_SQL[1].replace('$', "?"))?.execute(rusqlite::params![done, now])?;
            tx.prepare_cached(&CLAIM_SQL[2].replace('$', "?"))?.execute([])?;
            tx.commit()?;
            let tx = conn.transaction()?;
            tx.prepare_cached(&FINISH_SQL[0].replace('$', "?"))?.execute(rusqlite::params![done, now])?;
            tx.prepare_cached(&FINISH_SQL[1].replace('$', "?"))?.execute(rusqlite::params![done, now])?;
            tx.prepare_cached(&FINISH_SQL[2].replace('$', "?"))?.execute([])?;
            tx.commit()?;
            done += 1;
        }
        Ok(f64::from(done) / start.elapsed().as_secs_f64())
    }

    /// The same through raw PostgreSQL (its default durability), in a fresh database.
    pub fn raw_postgres(url: &str, tasks: u32, limit: Duration) -> Result<f64> {
        let mut c = postgres::Client::connect(url, postgres::NoTls)?;
        c.batch_execute("DROP TABLE IF EXISTS jobs, tasks, events")?;
        c.batch_execute(&RAW_TABLES.replace("ROW_ID", "BIGSERIAL"))?;
        let claim: Vec<_> = CLAIM_SQL.iter().map(|s| c.prepare(s)).collect::<Result<_, _>>()?;
        let finish: Vec<_> = FINISH_SQL.iter().map(|s| c.prepare(s)).collect::<Result<_, _>>()?;
        let start = Instant::now();
        let mut done = 0i32;
        while (done as u32) < tasks && start.elapsed() < limit {
            let now = Utc::now().timestamp_millis();
            let lease = uuid::Uuid::new_v4().to_string();
            let mut tx = c.transaction()?;
            tx.execute(&claim[0], &[&done, &lease, &(now + 30_000)])?;
            tx.execute(&claim[1], &[&done, &now])?;
            tx.execute(&claim[2], &[])?;
            tx.commit()?;
            let mut tx = c.transaction()?;
            tx.execute(&finish[0], &[&done, &now])?;
            tx.execute(&finish[1], &[&done, &now])?;
            tx.execute(&finish[2], &[])?;
            tx.commit()?;
            done += 1;
        }
        Ok(f64::from(done) / start.elapsed().as_secs_f64())
    }

    /// The server's durability settings, in words.
    pub fn pg_durability(url: &str) -> Result<String> {
        let mut c = postgres::Client::connect(url, postgres::NoTls)?;
        let mut show = |k: &str| -> Result<String> { Ok(c.query_one(&format!("SHOW {k}"), &[])?.get::<_, String>(0)) };
        Ok(format!("server fsync={}, synchronous_commit={}", show("fsync")?, show("synchronous_commit")?))
    }
}

/// Where the raw baseline of scenario 3 writes.
#[derive(Clone, Copy)]
enum RawTarget<'a> {
    /// A directory for a fresh SQLite file each round.
    Sqlite(&'a Path),
    /// A database of its own.
    Postgres(&'a str),
}

/// Scenario 3 on one backend: per-round rates with 1 and 50 workers, the raw baseline's,
/// the durability in words, and a note on rounds cut short.
#[allow(clippy::type_complexity)]
fn store_backend(
    env: &Env,
    name: &str,
    loc: &berth_coordinator::store::Location,
    raw_target: RawTarget<'_>,
    end: Instant,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, String, String)> {
    let n = env.scale.store_tasks;
    eprintln!(
        "[3] store alone on {name}: {n} tasks claimed (6 at a time) and completed by 1 and by 50 simulated workers, x {} rounds; raw baseline",
        env.rounds
    );
    let durability = match raw_target {
        RawTarget::Sqlite(_) => "WAL, synchronous=FULL".to_string(),
        RawTarget::Postgres(url) => store::pg_durability(url).unwrap_or_else(|e| format!("settings unknown: {e:#}")),
    };
    let handle = store_sim::open(loc)?;
    let (mut one, mut fifty, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let mut taken = Vec::new();
    let mut note = String::new();
    for r in 0..env.rounds {
        if r > 0 && !round_fits(end, &taken) {
            note = format!(" (rounds cut short at {r}: time budget)");
            break;
        }
        let started = Instant::now();
        let limit = until(end).max(Duration::from_secs(10));
        let (a, b) = env
            .rt
            .block_on(async {
                tokio::time::timeout(limit, async {
                    Ok::<_, anyhow::Error>((store_sim::claim_complete(&handle, 1, n).await?, store_sim::claim_complete(&handle, 50, n).await?))
                })
                .await
            })
            .map_err(|_| anyhow!("a round did not finish within {limit:?}"))??;
        one.push(a);
        fifty.push(b);
        let rate = match raw_target {
            RawTarget::Postgres(url) => store::raw_postgres(url, n, env.scale.raw_store_limit)?,
            RawTarget::Sqlite(dir) => store::raw_sqlite(&dir.join(format!("raw-{r}.db")), n, env.scale.raw_store_limit)?,
        };
        raw.push(rate);
        taken.push(started.elapsed());
        eprintln!("    round {}: 1 worker {a:.0}/s, 50 workers {b:.0}/s, raw one-tx-per-op {rate:.0}/s", r + 1);
    }
    Ok((one, fifty, raw, durability, note))
}

fn scenario_3(env: &Env) -> Result<Vec<Row>> {
    use berth_coordinator::store::Location;
    let n = env.scale.store_tasks;
    let dir = tempfile::Builder::new().prefix("berth-perf-store-").tempdir()?;
    let mut backends: Vec<(&str, Location, Option<store_sim::PgDatabase>, Option<store_sim::PgDatabase>)> = Vec::new();
    backends.push(("SQLite", Location::Sqlite(dir.path().join("store.db")), None, None));
    let mut pg_note = "PostgreSQL not measured: set BERTH_TEST_POSTGRES to a server whose user may create databases".to_string();
    if let Ok(admin) = std::env::var("BERTH_TEST_POSTGRES") {
        match store_sim::PgDatabase::create(&admin).and_then(|a| Ok((a, store_sim::PgDatabase::create(&admin)?))) {
            Ok((db, raw_db)) => {
                backends.push(("PostgreSQL", Location::Postgres(db.url.clone()), Some(db), Some(raw_db)));
                pg_note = String::new();
            }
            Err(e) => pg_note = format!("PostgreSQL not measured: {e:#}"),
        }
    }
    let mut rows = Vec::new();
    for (name, loc, _guard, raw_db) in &backends {
        let sqlite = *name == "SQLite";
        let ids = if sqlite { ["3a", "3b"] } else { ["3c", "3d"] };
        let raw_target = match raw_db {
            Some(db) => RawTarget::Postgres(&db.url),
            None => RawTarget::Sqlite(dir.path()),
        };
        // PostgreSQL (with fsync) is slower: it gets longer.
        let end = env.clock.phase(Duration::from_secs(match (sqlite, n > 5_000) {
            (true, true) => 60,
            (true, false) => 20,
            (false, true) => 100,
            (false, false) => 30,
        }));
        match store_backend(env, name, loc, raw_target, end) {
            Ok((one, fifty, raw, durability, note)) => {
                for (id, workers, v) in [(ids[0], 1, &one), (ids[1], 50, &fifty)] {
                    let mut row = Row::new(
                        id,
                        &format!("store: claim+complete, {name}, {workers} worker{}", if workers == 1 { "" } else { "s" }),
                        "jobs/s",
                        "jobs/s",
                        if sqlite { ">= 20000/s" } else { "" },
                    )
                    .values(median(v), median(&raw));
                    row.verdict = if sqlite { Verdict::of(row.figure.map(|f| f >= 20_000.0)) } else { Verdict::Info };
                    row.note = format!(
                        "figure: {n} tasks through the store's group-commit writer ({durability}), claims of up to 6 with completions of the claim before in the same round trip (as a worker session); rounds {}. \
                         baseline: the same rows (task, event, job counts) one transaction per claim and per completion on one connection, raw, same durability; rounds {}{note}",
                        list(v),
                        list(&raw)
                    );
                    rows.push(row.extra("rounds", json!(v)).extra("baseline_rounds", json!(raw)));
                }
            }
            Err(e) => rows.push(Row::not_run(ids[0], &format!("store: claim+complete, {name}"), Verdict::Error, format!("failed: {e:#}"))),
        }
    }
    if !pg_note.is_empty() {
        rows.push(Row::not_run("3c", "store: claim+complete, PostgreSQL", Verdict::Skipped, pg_note));
    }
    Ok(rows)
}

// ---------------------------------------------------------------- 4. output streaming

/// The harness's own QUIC transfer: `bytes` over one unidirectional stream on loopback,
/// with berth's TLS and transport settings, written in berth's chunk size; the server
/// reads and discards. Timed from the first write to the server's last byte.
async fn quic_transfer(bytes: u64) -> Result<Duration> {
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

fn scenario_4(env: &Env) -> Result<Vec<Row>> {
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
    let mut taken = Vec::new();
    let mut note = String::new();
    let mut verified = Vec::new();
    for r in 0..env.rounds {
        if r > 0 && !round_fits(end, &taken) {
            note = format!(" (rounds cut short at {r}: time budget)");
            break;
        }
        let started = Instant::now();
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
                note = format!(" (round {} failed: {e:#})", r + 1);
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
        taken.push(started.elapsed());
    }
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

// ---------------------------------------------------------------- 5. scale

fn list_latency(env: &Env, c: &Cluster, n: usize) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for _ in 0..n {
        let (_, took) = env.berth_ok(c, &["list", "--state", "queued", "--limit", "20"], Duration::from_secs(10))?;
        v.push(took.as_secs_f64() * 1e3);
    }
    Ok(v)
}

fn scenario_5_array(env: &Env) -> Result<Vec<Row>> {
    let n = env.scale.array_tasks;
    let end = env.clock.phase(Duration::from_secs(60));
    eprintln!("[5] scale: a {n}-task array with no worker connected, x {} rounds (a fresh coordinator each)", env.rounds);
    let (mut submit, mut single, mut rss, mut idle_rss, mut hwm, mut list_q, mut list_empty) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut taken = Vec::new();
    let mut note = String::new();
    let mut limit_flag = true;
    for r in 0..env.rounds {
        if r > 0 && !round_fits(end, &taken) {
            note = format!(" (rounds cut short at {r}: time budget)");
            break;
        }
        let started = Instant::now();
        let c = Cluster::start()?;
        let pid = coord_pid(&c)?;
        // `--limit` must exist: a usage error (exit 2) says it does not.
        let probe = run_timeout(env.berth(&c, &["list", "--state", "queued", "--limit", "20"]), Duration::from_secs(10))?;
        if probe.status.code() == Some(2) {
            limit_flag = false;
            note = format!(" `berth list --state queued --limit 20` is refused: {}", String::from_utf8_lossy(&probe.stderr).trim());
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
        taken.push(started.elapsed());
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
    write_frame(&mut send, &WorkerMsg::Register { name: name.clone(), slots: 1, pool: "default".into(), labels: Vec::new(), host, held: Vec::new() }).await?;
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

fn scenario_5_workers(env: &Env) -> Result<Vec<Row>> {
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
    Ok(vec![row
        .extra("rounds", json!(loads))
        .extra("workers_requested", json!(n))
        .extra("workers_registered", json!(up))
        .extra("workers_listed_connected", json!(listed))
        .extra("connect_s", json!(connect_time.as_secs_f64()))
        .extra("redials", json!(redials.load(Ordering::Relaxed)))
        .extra("harness_cores", json!(mine))
        .extra("coordinator_rss_mib", json!(rss))])
}

// ---------------------------------------------------------------- 6. docker

/// `docker run --rm` of the image at `par` parallelism, `total` in all, until `limit`.
fn docker_loop(image: &str, par: usize, total: usize, limit: Duration) -> Rate {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let start = Instant::now();
    let deadline = start + limit;
    std::thread::scope(|s| {
        for _ in 0..par {
            s.spawn(|| {
                while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < total {
                    let mut cmd = Command::new("docker");
                    cmd.args(["run", "--rm", "--network", "none", "--label", "berth.test=1", "--label", "berth.perf=1", image, "true"]);
                    match run_timeout(cmd, Duration::from_secs(60)) {
                        Ok(o) if o.status.success() => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    Rate { done: done.into_inner(), failed: failed.into_inner(), elapsed: start.elapsed() }
}

fn scenario_6(env: &Env) -> Result<Vec<Row>> {
    use berth_e2e::docker;
    let scenario = "docker: container jobs `true`";
    let version = docker::docker(&["version", "--format", "{{.Server.Version}}"]);
    match &version {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Ok(vec![Row::not_run("6", scenario, Verdict::Skipped, format!("no Docker engine answers: {}", String::from_utf8_lossy(&o.stderr).trim()))])
        }
        Err(e) => return Ok(vec![Row::not_run("6", scenario, Verdict::Skipped, format!("no Docker engine answers: {e:#}"))]),
    }
    let (par, n) = (env.par, env.scale.docker_jobs);
    if env.clock.left() < Duration::from_secs(30) {
        return Ok(vec![Row::not_run("6", scenario, Verdict::Skipped, "not run: the time budget was spent".into())]);
    }
    let end = env.clock.phase(Duration::from_secs(300));
    eprintln!("[6] docker: {n} container jobs through berth (1 worker x {par} slots) and a `docker run --rm` loop at {par}, x {} rounds", env.rounds);
    let image = docker::test_image().context("the test image (tests/harness/docker.rs)")?;
    let mut c = Cluster::start()?;
    env.add_worker(&mut c, "dock", par, &["--executor", "process,docker"])?;
    let (ws, _) = env.berth_json(&c, &["workers", "--json"], Duration::from_secs(10))?;
    let offers = ws.as_array().and_then(|a| a.iter().find(|w| w["name"] == "dock").cloned()).unwrap_or_default();
    if !offers["host"]["executors"].as_array().is_some_and(|e| e.iter().any(|x| x == "docker")) {
        return Ok(vec![Row::not_run("6", scenario, Verdict::Skipped, format!("the worker does not offer the docker executor: {}", offers["host"]))]);
    }
    let img = image.name.as_str();
    array_run(env, &c, par as u32, &["--image", img], &["true"], Duration::from_secs(120)).context("warm-up array")?;
    let _ = docker_loop(img, par, par, Duration::from_secs(60));
    let (mut berth, mut raw) = (Vec::new(), Vec::new());
    let mut taken = Vec::new();
    let mut note = String::new();
    let mut raw_failed = 0;
    for r in 0..env.rounds {
        if r > 0 && !round_fits(end, &taken) {
            note = format!(" (rounds cut short at {r}: time budget)");
            break;
        }
        let started = Instant::now();
        let rate = docker_loop(img, par, n as usize, until(end).max(Duration::from_secs(30)));
        raw_failed += rate.failed;
        if rate.done > 0 {
            raw.push(rate.per_sec());
        }
        match array_run(env, &c, n, &["--image", img], &["true"], until(end).max(Duration::from_secs(60))) {
            Ok((wall, v)) => {
                berth.push(f64::from(n) / wall.as_secs_f64());
                eprintln!(
                    "    round {}: docker loop {:.2}/s ({} failed), berth {:.2}/s",
                    r + 1,
                    rate.per_sec(),
                    rate.failed,
                    f64::from(n) / wall.as_secs_f64()
                );
                if let Some(id) = v["id"].as_str() {
                    // berth removes its containers; anything of this job left is a bug to see.
                    let left = docker::containers_with(&format!("berth.job={id}")).unwrap_or_default();
                    if !left.is_empty() {
                        note.push_str(&format!(" ({} containers of {id} were left behind)", left.len()));
                    }
                }
            }
            Err(e) => {
                note = format!(" (round {} failed: {e:#})", r + 1);
                env.cancel_unfinished(&c);
                break;
            }
        }
        taken.push(started.elapsed());
    }
    drop(c);
    // The loop's containers are `--rm`; remove any a timeout left behind.
    for id in docker::containers_with("berth.perf=1").unwrap_or_default() {
        let _ = docker::docker(&["rm", "-f", &id]);
    }
    drop(image);
    let mut row = Row::new("6", &format!("docker: {n} container jobs `true`, {par} slots"), "jobs/s", "runs/s", ">= 90%").values(median(&berth), median(&raw));
    row.ratio_style = RatioStyle::Percent;
    row.verdict = Verdict::of(row.ratio.map(|r| r >= 0.9));
    row.note = format!(
        "figure: `berth submit --wait --image IMG --array` of {n} start to exit, 1 worker `--executor process,docker` x {par} slots, rounds {}. baseline: `docker run --rm --network none \
         IMG true` loop, {par} concurrent, rounds {} ({raw_failed} failed). IMG: the e2e harness's busybox test image (Docker {}){note}",
        list(&berth),
        list(&raw),
        version.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    );
    Ok(vec![row.extra("rounds", json!(berth)).extra("baseline_rounds", json!(raw))])
}

// ---------------------------------------------------------------- main

fn main() -> ExitCode {
    berth_e2e::bench::exit("perf", real_main())
}

fn real_main() -> Result<()> {
    let opts = parse_args()?;
    let begin = Instant::now();
    let started_at = chrono::Utc::now();
    let exe = std::env::current_exe().context("bench executable path")?;
    let bins = exe.parent().and_then(Path::parent).map(Path::to_path_buf).ok_or_else(|| anyhow!("no target directory above {}", exe.display()))?;
    let missing: Vec<String> =
        ["berth", "berth-coordinator", "berth-worker"].iter().map(|n| bins.join(n)).filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
    if !missing.is_empty() {
        bail!(
            "missing {}: build the release binaries first:\n  cargo build --release --workspace && cargo bench -p berth-e2e --bench perf",
            missing.join(", ")
        );
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let scale = Scale::new(&opts);
    let load_start = load_avg();
    let env = Env {
        bins,
        rounds: opts.rounds,
        par: 2 * cores,
        clock: Clock { end: begin + scale.budget },
        scale,
        rt: tokio::runtime::Builder::new_multi_thread().worker_threads(cores.max(2)).enable_all().build()?,
    };
    eprintln!(
        "berth perf: {} run, {} rounds, {cores} cores, load average {load_start}, budget {:?}",
        if opts.quick { "quick" } else { "full" },
        env.rounds,
        env.scale.budget
    );
    type Scenario = fn(&Env) -> Result<Vec<Row>>;
    let scenarios: [(u8, &str, &str, Scenario); 7] = [
        (1, "1", "e2e: trivial jobs", scenario_1),
        (2, "2", "submit-to-start latency", scenario_2),
        (3, "3", "store alone", scenario_3),
        (4, "4", "output streaming", scenario_4),
        (5, "5a", "scale: 1M array", scenario_5_array),
        (5, "5d", "scale: simulated workers", scenario_5_workers),
        (6, "6", "docker", scenario_6),
    ];
    let mut rows = Vec::new();
    for (n, id, name, f) in scenarios {
        if opts.only.as_ref().is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        if env.clock.left() < Duration::from_secs(10) {
            rows.push(Row::not_run(id, name, Verdict::Skipped, "not run: the time budget was spent".into()));
            continue;
        }
        let t = Instant::now();
        match f(&env) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("    [{id}] failed: {e:#}");
                rows.push(Row::not_run(id, name, Verdict::Error, format!("failed: {e:#}")));
            }
        }
        eprintln!("    [{id}] took {:.1?}", t.elapsed());
    }
    let load_end = load_avg();
    let took = begin.elapsed();

    println!();
    println!("berth perf ({} run, release profile, medians of {} rounds)", if opts.quick { "quick" } else { "full" }, env.rounds);
    println!("machine: {cores} cores, {}, Linux {}", cpu_model().unwrap_or_else(|| "unknown CPU".into()), kernel().unwrap_or_else(|| "?".into()));
    println!("load average (1 5 15 min): {load_start} at start, {load_end} at end");
    print_table(&rows);
    println!("total {:.1?}", took);

    if let Some(path) = &opts.json {
        let doc = json!({
            "bench": "berth perf (issue 8)",
            "commit": git_describe(),
            "started_at": started_at.to_rfc3339(),
            "quick": opts.quick,
            "rounds": env.rounds,
            "machine": { "cores": cores, "cpu": cpu_model(), "kernel": kernel() },
            "load_average": { "start": load_start, "end": load_end },
            "duration_s": took.as_secs_f64(),
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
