//! Scenario 8, Docker sessions: (a) the round trip of an exec of `true` on an open
//! Docker session (client → coordinator → worker → the agent in the container and
//! back) against `docker exec CONTAINER true` on the same engine; (b) open to ready
//! against a raw create + start of the same image through the engine's API; (c) open
//! to ready from a warm pool (`--warm IMG=N`).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_e2e::bench::{median, percentile, Rounds};
use berth_e2e::raw::{session_spec, Raw};
use berth_e2e::{docker, run_timeout, wait_until, Cluster};
use berth_shared::ids::JobId;
use berth_shared::job::{Executor, JobSpec};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, StartContainerOptions};
use serde_json::json;

use crate::env::Env;
use crate::sessions::{exec_round_trips, ms, P};
use crate::table::{Row, Verdict};

const WARM: usize = 4;

fn spec(image: &str, role: &str) -> JobSpec {
    let mut s = session_spec();
    s.executor = Executor::Docker { image: image.into(), network: None };
    s.constraints = vec![("role".into(), role.into())];
    s
}

/// One `docker create` + `docker start` of `image` through the engine's API (what a
/// session's open cannot go below), in ms; the container is removed after, untimed.
async fn raw_start(docker: &bollard::Docker, image: &str, n: usize) -> Result<f64> {
    let name = format!("berth-perf-raw-{}-{n}", std::process::id());
    let body = ContainerCreateBody {
        image: Some(image.into()),
        cmd: Some(vec!["sleep".into(), "600".into()]),
        labels: Some([("berth.test".to_string(), "1".to_string()), ("berth.perf".to_string(), "1".to_string())].into()),
        host_config: Some(HostConfig { network_mode: Some("none".into()), ..Default::default() }),
        ..Default::default()
    };
    let t = Instant::now();
    let made = async {
        docker.create_container(Some(CreateContainerOptionsBuilder::new().name(&name).build()), body).await?;
        docker.start_container(&name, None::<StartContainerOptions>).await
    }
    .await;
    let took = t.elapsed().as_secs_f64() * 1e3;
    let _ = docker.remove_container(&name, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await;
    made.context("raw create + start")?;
    Ok(took)
}

/// `docker exec CONTAINER true`, in ms.
fn docker_exec(container: &str) -> Result<f64> {
    let mut cmd = Command::new("docker");
    cmd.args(["exec", container, "true"]);
    let t = Instant::now();
    let out = run_timeout(cmd, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!("docker exec failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// The warm containers of worker `name` whose agent is ready.
fn warm_ready(c: &Cluster, name: &str) -> usize {
    let dir = c.path(&format!("w-{name}")).join("containers");
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("warm-")) && e.path().join("agent.sock").exists()).count())
        .unwrap_or(0)
}

pub fn scenario_8(env: &Env) -> Result<Vec<Row>> {
    let scenario = "docker sessions";
    match docker::docker(&["version", "--format", "{{.Server.Version}}"]) {
        Ok(o) if o.status.success() => {}
        _ => return Ok(vec![Row::not_run("8", scenario, Verdict::Skipped, "no Docker engine answers".into())]),
    }
    let quick = env.scale.jobs < 5_000;
    let end = env.clock.phase(Duration::from_secs(if quick { 90 } else { 180 }));
    let (n_exec, n_open) = if quick { (50, 8) } else { (200, 20) };
    eprintln!("[8] docker sessions: {n_exec} exec round trips, {n_open} cold and {n_open} warm opens a round, x {} rounds", env.rounds);
    let image = docker::test_image().context("the test image (tests/harness/docker.rs)")?;
    let img = image.name.clone();
    let mut c = Cluster::start()?;
    env.add_worker(&mut c, "cold", 8, &["--executor", "process,docker", "--label", "role=cold"])?;
    let warm_flag = format!("{img}={WARM}");
    env.add_worker(&mut c, "warm", 8, &["--executor", "process,docker", "--label", "role=warm", "--warm", &warm_flag])?;
    let raw = env.rt.block_on(Raw::connect(&c.profile))?;
    let docker = bollard::Docker::connect_with_defaults()?;
    let p = |v: &[f64]| (percentile(v, 50.0), percentile(v, 99.0));
    let (mut exec_p, mut dexec_p, mut open_p, mut raw_p, mut warm_p) = (Vec::<P>::new(), Vec::<P>::new(), Vec::<P>::new(), Vec::<P>::new(), Vec::<P>::new());
    let mut rounds = Rounds::new(env.rounds, end);
    while let Some(r) = rounds.next_round() {
        let round = (|| -> Result<()> {
            // (a) exec round trips on one open session, and `docker exec` into its container.
            let id: JobId = env.rt.block_on(raw.open_session(spec(&img, "cold")))?;
            let container = docker::containers_with(&format!("berth.job={id}"))?.into_iter().next().context("the session's container")?;
            let lat = exec_round_trips(env, &raw, id, n_exec)?;
            let dexec: Vec<f64> = (0..n_exec.min(50)).map(|_| docker_exec(&container)).collect::<Result<_>>()?;
            env.rt.block_on(raw.close_session(id))?;
            exec_p.push(p(&lat));
            dexec_p.push(p(&dexec));
            // (b) cold opens, against raw create + start.
            let (mut opens, mut raws) = (Vec::new(), Vec::new());
            for i in 0..n_open {
                let t = Instant::now();
                let id = env.rt.block_on(raw.open_session(spec(&img, "cold")))?;
                opens.push(t.elapsed().as_secs_f64() * 1e3);
                env.rt.block_on(raw.close_session(id))?;
                raws.push(env.rt.block_on(raw_start(&docker, &img, i))?);
            }
            open_p.push(p(&opens));
            raw_p.push(p(&raws));
            // (c) opens from the warm pool, each once the pool is full again.
            let mut warm = Vec::new();
            for _ in 0..n_open {
                wait_until("the warm pool to be full", Duration::from_secs(60), || warm_ready(&c, "warm") >= WARM)?;
                let t = Instant::now();
                let id = env.rt.block_on(raw.open_session(spec(&img, "warm")))?;
                warm.push(t.elapsed().as_secs_f64() * 1e3);
                env.rt.block_on(raw.close_session(id))?;
            }
            warm_p.push(p(&warm));
            eprintln!(
                "    round {}: exec p50 {:.2} ms (docker exec {:.2}), open p50 {:.1} ms (raw create+start {:.1}), warm open p50 {:.2} ms",
                r + 1,
                exec_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
                dexec_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
                open_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
                raw_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
                warm_p.last().and_then(|x| x.0).unwrap_or(f64::NAN),
            );
            Ok(())
        })();
        if let Err(e) = round {
            rounds.failed(r, &e);
            break;
        }
    }
    drop(raw);
    drop(c);
    for id in docker::containers_with("berth.perf=1").unwrap_or_default() {
        let _ = docker::docker(&["rm", "-f", &id]);
    }
    drop(image);
    let note = rounds.note;
    let med = |v: &[P], pick: fn(&P) -> Option<f64>| median(&v.iter().filter_map(pick).collect::<Vec<_>>());
    let p50 = |v: &[P]| med(v, |x| x.0);
    let p99 = |v: &[P]| med(v, |x| x.1);

    let mut a = Row::new("8a", "session exec round trip of `true` (docker)", "ms", "ms", "p50 <= 3 ms").values(p50(&exec_p), p50(&dexec_p));
    a.figure_text = Some(ms(p50(&exec_p), p99(&exec_p)));
    a.baseline_text = Some(ms(p50(&dexec_p), p99(&dexec_p)));
    a.verdict = Verdict::of(p50(&exec_p).map(|v| v <= 3.0));
    a.note = format!(
        "figure: from the Exec frame's send on an open connection to its ExecEnded (exit code 0), through the coordinator, the worker and the agent in the container, \
         {n_exec} a round. baseline: `docker exec CONTAINER true` into the same session's container{note}"
    );
    let a = a.extra("p50_ms", json!(p50(&exec_p))).extra("docker_exec_p50_ms", json!(p50(&dexec_p)));

    let mut b = Row::new("8b", "session open to ready (docker)", "ms", "ms", "<= 1.1x raw").values(p50(&open_p), p50(&raw_p));
    b.figure_text = Some(ms(p50(&open_p), p99(&open_p)));
    b.baseline_text = Some(ms(p50(&raw_p), p99(&raw_p)));
    b.verdict = Verdict::of(p50(&open_p).zip(p50(&raw_p)).map(|(f, r)| f <= 1.1 * r));
    b.note = format!(
        "figure: OpenSession to SessionReady (admitted, stored, claimed, container created and started, its agent listening), {n_open} a round. \
         baseline: create + start of a container of the same image through the engine's API (bollard), nothing else"
    );
    let b = b.extra("p50_ms", json!(p50(&open_p))).extra("raw_p50_ms", json!(p50(&raw_p)));

    let mut w = Row::new("8c", &format!("session open to ready from a warm pool of {WARM}"), "ms", "", "p50 <= 10 ms").values(p50(&warm_p), None);
    w.figure_text = Some(ms(p50(&warm_p), p99(&warm_p)));
    w.verdict = Verdict::of(p50(&warm_p).map(|v| v <= 10.0));
    w.note = format!(
        "figure: OpenSession to SessionReady on a worker with `--warm IMG={WARM}` (a warm container taken: workspace handed over, limits set), each open once the pool is full, {n_open} a round"
    );
    let w = w.extra("p50_ms", json!(p50(&warm_p)));
    Ok(vec![a, b, w])
}
