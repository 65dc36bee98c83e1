//! Scenario 7, sessions (process executor): (a) the round trip of an exec of `true` on
//! an open session, from the client's send to the exit code back, against the harness
//! spawning `true` itself; (b) open to ready; (c) an RL-rollout shape: 64 sessions open
//! at once on one worker, each running 50 short execs one after another, against the
//! raw rate of the worker's executor at the same parallelism; (d) `berth cp` of 256 MiB
//! in and out, against the same bytes over one bare QUIC stream.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_e2e::bench::{executor_rate, median, percentile, Rounds};
use berth_e2e::raw::{session_spec, Raw};
use berth_e2e::Cluster;
use berth_shared::ids::{JobId, JobSelector};
use berth_shared::session::ExecSpec;
use berth_shared::wire::{Request, Response};
use serde_json::json;

use crate::env::Env;
use crate::table::{list, num, RatioStyle, Row, Verdict};

/// Opens a session on an open connection; its id once it is ready.
async fn open(raw: &Raw) -> Result<JobId> {
    raw.open_session(session_spec()).await
}

fn sel(id: JobId) -> JobSelector {
    JobSelector { prefix: id.to_string(), index: None }
}

/// Runs `true` in a session; the exit code must come back 0.
pub(crate) async fn exec_true(raw: &Raw, id: JobId) -> Result<()> {
    let exec = ExecSpec { argv: vec!["true".into()], env: vec![], timeout_ms: None, cwd: None, stdin: false };
    let resps = raw.request(&Request::Exec { session: sel(id), exec, detach: false }).await?;
    match resps.last() {
        Some(Response::ExecEnded(end)) if end.exit_code == Some(0) => Ok(()),
        other => bail!("the exec ended {other:?}"),
    }
}

/// `n` round trips of `true` on an open session (after 5 not timed), in ms.
pub(crate) fn exec_round_trips(env: &Env, raw: &Raw, id: JobId, n: usize) -> Result<Vec<f64>> {
    for _ in 0..5 {
        env.rt.block_on(exec_true(raw, id))?;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        env.rt.block_on(exec_true(raw, id))?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(lat)
}

/// The harness spawning `true` and waiting for it: the floor under any exec.
fn spawn_floor() -> Result<f64> {
    let t = Instant::now();
    let s = Command::new("true").stdin(Stdio::null()).status()?;
    if !s.success() {
        bail!("true failed");
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// A round's p50 and p99.
pub(crate) type P = (Option<f64>, Option<f64>);

pub(crate) fn ms(a: Option<f64>, b: Option<f64>) -> String {
    format!("p50 {} / p99 {} ms", a.map_or("n/a".into(), num), b.map_or("n/a".into(), num))
}

pub fn scenario_7(env: &Env) -> Result<Vec<Row>> {
    let quick = env.scale.jobs < 5_000;
    let end = env.clock.phase(Duration::from_secs(if quick { 60 } else { 150 }));
    let n_exec = if quick { 50 } else { 300 };
    let n_open = if quick { 10 } else { 40 };
    let (sessions, per) = (64usize, 50usize);
    eprintln!("[7] sessions: {n_exec} exec round trips and {n_open} opens a round, {sessions} sessions x {per} execs, cp of 256 MiB, x {} rounds", env.rounds);
    let mut c = Cluster::start()?;
    env.add_worker(&mut c, "ses", sessions, &[])?;
    let raw = env.rt.block_on(Raw::connect(&c.profile))?;
    let scratch = tempfile::Builder::new().prefix("berth-perf-").tempdir()?;
    let p = |v: &[f64]| (percentile(v, 50.0), percentile(v, 99.0));
    let (mut exec_p, mut floor_p, mut open_p, mut rollout, mut raw_rate) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rounds = Rounds::new(env.rounds, end);
    while let Some(r) = rounds.next_round() {
        let round = (|| -> Result<()> {
            // (a) exec round trips on one open session.
            let id = env.rt.block_on(open(&raw))?;
            let lat = exec_round_trips(env, &raw, id, n_exec)?;
            env.rt.block_on(raw.close_session(id))?;
            let floor: Vec<f64> = (0..50).map(|_| spawn_floor()).collect::<Result<_>>()?;
            exec_p.push(p(&lat));
            floor_p.push(p(&floor));
            // (b) open to ready, then close (not timed).
            let mut opens = Vec::with_capacity(n_open);
            for _ in 0..n_open {
                let t = Instant::now();
                let id = env.rt.block_on(open(&raw))?;
                opens.push(t.elapsed().as_secs_f64() * 1e3);
                env.rt.block_on(raw.close_session(id))?;
            }
            open_p.push(p(&opens));
            // (c) the rollout: 64 sessions at once, 50 execs each.
            let ids: Vec<JobId> = env.rt.block_on(async { futures::future::try_join_all((0..sessions).map(|_| open(&raw))).await })?;
            let t = Instant::now();
            env.rt.block_on(async {
                futures::future::try_join_all(ids.iter().map(|id| {
                    let raw = &raw;
                    async move {
                        for _ in 0..per {
                            exec_true(raw, *id).await?;
                        }
                        Ok::<_, anyhow::Error>(())
                    }
                }))
                .await
            })?;
            let rate = (sessions * per) as f64 / t.elapsed().as_secs_f64();
            env.rt.block_on(async { futures::future::try_join_all(ids.iter().map(|id| raw.close_session(*id))).await })?;
            let base = executor_rate(&env.rt, scratch.path(), sessions, sessions * per, Duration::from_secs(60))?;
            rollout.push(rate);
            raw_rate.push(base.per_sec());
            eprintln!(
                "    round {}: exec p50 {:.2} ms (spawn floor {:.2}), open p50 {:.2} ms, rollout {rate:.0} execs/s vs executor {:.0}/s",
                r + 1,
                exec_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
                floor_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
                open_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
                base.per_sec()
            );
            Ok(())
        })();
        if let Err(e) = round {
            rounds.failed(r, &e);
            break;
        }
    }
    // (d) cp of 256 MiB in and out through the binary, against a bare QUIC stream.
    let cp = copy_rounds(env, &c, &raw, scratch.path(), end);
    drop(raw);
    let note = rounds.note;
    let med = |v: &[P], pick: fn(&P) -> Option<f64>| median(&v.iter().filter_map(pick).collect::<Vec<_>>());
    let (e50, e99) = (med(&exec_p, |x| x.0), med(&exec_p, |x| x.1));
    let (f50, f99) = (med(&floor_p, |x| x.0), med(&floor_p, |x| x.1));
    let (o50, o99) = (med(&open_p, |x| x.0), med(&open_p, |x| x.1));

    let mut a = Row::new("7a", "session exec round trip of `true` (process)", "ms", "ms", "p50 <= 2 ms").values(e50, f50);
    a.figure_text = Some(ms(e50, e99));
    a.baseline_text = Some(ms(f50, f99));
    a.verdict = Verdict::of(e50.map(|v| v <= 2.0));
    a.note = format!(
        "figure: from the Exec frame's send on an open connection (tests/harness/raw.rs) to its ExecEnded (exit code 0), {n_exec} a round on one session. \
         baseline: the harness spawning `true` and waiting for it (50 a round){note}"
    );
    let a = a.extra("p50_ms", json!(e50)).extra("p99_ms", json!(e99));

    let mut b = Row::new("7b", "session open to ready (process)", "ms", "", "p50 <= 5 ms").values(o50, None);
    b.figure_text = Some(ms(o50, o99));
    b.verdict = Verdict::of(o50.map(|v| v <= 5.0));
    b.note = format!(
        "figure: OpenSession sent on an open connection to SessionReady (admitted, stored, claimed, the slot's workspace and cgroup ready), {n_open} a round"
    );
    let b = b.extra("p50_ms", json!(o50)).extra("p99_ms", json!(o99));

    let mut c7 = Row::new("7c", &format!("rollout: {sessions} sessions x {per} execs of `true`"), "execs/s", "spawns/s", ">= 40%")
        .values(median(&rollout), median(&raw_rate));
    c7.ratio_style = RatioStyle::Percent;
    c7.verdict = Verdict::of(c7.ratio.map(|r| r >= 0.4));
    c7.note = format!(
        "figure: {sessions} sessions open at once on one worker with {sessions} slots, each running {per} execs one after another, rounds {}. \
         baseline: the worker's executor (process::run + spool) at {sessions} concurrent, rounds {}",
        list(&rollout),
        list(&raw_rate)
    );

    let mut rows = vec![a, b, c7];
    rows.extend(cp);
    Ok(rows)
}

/// `berth cp` of 256 MiB into a session and back out, against a bare QUIC stream.
fn copy_rounds(env: &Env, c: &Cluster, raw: &Raw, dir: &std::path::Path, end: Instant) -> Vec<Row> {
    let bytes: u64 = 256 << 20;
    let mib = bytes as f64 / (1 << 20) as f64;
    let r = (|| -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let src = dir.join("big");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&src)?;
            let block: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
            for _ in 0..256 {
                f.write_all(&block)?;
            }
        }
        let id = env.rt.block_on(open(raw))?;
        let (mut ins, mut outs, mut quic) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..env.rounds {
            if Instant::now() + Duration::from_secs(20) > end {
                break;
            }
            let q = env.rt.block_on(crate::output::quic_transfer(bytes))?;
            quic.push(mib / q.as_secs_f64());
            let dest = format!("{id}:big");
            let (_, took) = env.berth_ok(c, &["cp", &src.to_string_lossy(), &dest], Duration::from_secs(60))?;
            ins.push(mib / took.as_secs_f64());
            let back = dir.join(format!("back-{round}"));
            let (_, took) = env.berth_ok(c, &["cp", &dest, &back.to_string_lossy()], Duration::from_secs(60))?;
            outs.push(mib / took.as_secs_f64());
            let got = std::fs::metadata(&back)?.len();
            if got != bytes {
                bail!("copied back {got} of {bytes} bytes");
            }
            std::fs::remove_file(&back)?;
        }
        env.rt.block_on(raw.close_session(id))?;
        if ins.is_empty() {
            return Err(anyhow!("no round fitted in the time left"));
        }
        Ok((ins, outs, quic))
    })()
    .context("cp");
    match r {
        Ok((ins, outs, quic)) => {
            let mk = |id: &str, what: &str, v: &[f64]| {
                let mut row = Row::new(id, &format!("`berth cp` {mib:.0} MiB {what} a session"), "MiB/s", "MiB/s", ">= 50%").values(median(v), median(&quic));
                row.ratio_style = RatioStyle::Percent;
                row.verdict = Verdict::of(row.ratio.map(|r| r >= 0.5));
                row.note = format!(
                    "figure: the `berth` binary from start to exit (process start, connect, tar, relay through the coordinator, unpack), rounds {}. \
                     baseline: the same bytes over one bare QUIC stream on loopback with berth's TLS and transport settings, rounds {}",
                    list(v),
                    list(&quic)
                );
                row
            };
            vec![mk("7d", "into", &ins), mk("7e", "out of", &outs)]
        }
        Err(e) => vec![Row::not_run("7d", "`berth cp` 256 MiB", Verdict::Error, format!("failed: {e:#}"))],
    }
}
