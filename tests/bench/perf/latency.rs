//! Scenario 2, submit-to-start latency on an idle cluster: through the `berth` binary
//! and through an in-process client on an open connection, against the floors under
//! each (an empty `berth --version`; the harness spawning the job's command itself).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use berth_e2e::bench::{median, percentile, Rounds};
use berth_e2e::raw::Raw;
use berth_e2e::{run_timeout, Cluster};
use berth_shared::ids::JobSelector;
use berth_shared::wire::{OutStream, Request, Response};
use serde_json::json;

use crate::env::Env;
use crate::table::{num, Row, Verdict};

fn ns_now() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

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

pub fn scenario_2(env: &Env) -> Result<Vec<Row>> {
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
    let mut results = Vec::new();
    let mut rounds = Rounds::new(env.rounds, end);
    let mut samples = 0;
    'rounds: while let Some(r) = rounds.next_round() {
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
                rounds.note = format!(" (round {} stopped after {i} jobs: time budget)", r + 1);
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
        results.push(round);
    }
    drop(raw);
    let note = rounds.note;
    let med = |f: &dyn Fn(&Round) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
    let (adj50, adj99) = (med(&|r| r.adj_p.0), med(&|r| r.adj_p.1));
    let (raw50, raw99) = (med(&|r| r.raw_p.0), med(&|r| r.raw_p.1));
    let (in50, in99) = (med(&|r| r.inproc_p.0), med(&|r| r.inproc_p.1));
    let (fl50, fl99) = (med(&|r| r.floor_p.0), med(&|r| r.floor_p.1));
    let base = med(&|r| r.base);
    let ok = |a: Option<f64>, b: Option<f64>| Verdict::of(a.zip(b).map(|(a, b)| a <= 5.0 && b <= 20.0));
    let ms = |a: Option<f64>, b: Option<f64>| format!("p50 {} / p99 {} ms", a.map_or("n/a".into(), num), b.map_or("n/a".into(), num));
    let per = format!("{} rounds of {n} jobs (n={samples})", results.len());

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
