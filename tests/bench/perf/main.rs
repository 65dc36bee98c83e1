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
//!    heartbeating as a real worker does — coordinator CPU over fixed windows, and its
//!    resident memory with them connected (and per connection).
//! 6. Docker: container jobs through berth against a `docker run --rm IMG true` loop at
//!    the same parallelism, with the test image of the end-to-end harness.
//! 7. Sessions (process): an exec's round trip on an open session against spawning
//!    `true`; open to ready; 64 sessions x 50 execs against the executor's raw rate at
//!    64; `berth cp` of 256 MiB in and out against a bare QUIC stream.
//! 8. Docker sessions: an exec's round trip against `docker exec CONTAINER true`; open
//!    to ready against a raw create + start of the same image; open from a warm pool.
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
//!
//! This file holds the options, the scale, the run's clock and the output; `table`
//! the rows; `env` what the scenarios share; one module per scenario.

mod docker;
mod docker_sessions;
mod env;
mod latency;
mod output;
mod scale;
mod sessions;
mod store;
mod table;
mod trivial;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_e2e::bench::{cpu_model, kernel, load_avg};
use berth_e2e::run_timeout;
use serde_json::json;

use crate::env::Env;
use crate::table::{print_table, Row, Verdict};

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
                    Some(v.split(',').map(|s| s.trim().parse::<u8>().with_context(|| format!("--only `{v}`: scenario numbers 1-8"))).collect::<Result<_>>()?);
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
    let scenarios: [(u8, &str, &str, Scenario); 9] = [
        (1, "1", "e2e: trivial jobs", trivial::scenario_1),
        (2, "2", "submit-to-start latency", latency::scenario_2),
        (3, "3", "store alone", store::scenario_3),
        (4, "4", "output streaming", output::scenario_4),
        (5, "5a", "scale: 1M array", scale::scenario_5_array),
        (5, "5d", "scale: simulated workers", scale::scenario_5_workers),
        (6, "6", "docker", docker::scenario_6),
        (7, "7", "sessions", sessions::scenario_7),
        (8, "8", "docker sessions", docker_sessions::scenario_8),
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
