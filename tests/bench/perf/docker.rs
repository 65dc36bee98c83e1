//! Scenario 6, Docker: container jobs through berth against a `docker run --rm IMG true`
//! loop at the same parallelism.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_e2e::bench::{median, thread_rate, Rate, Rates, Rounds};
use berth_e2e::{docker, run_timeout, Cluster};
use serde_json::json;

use crate::env::{array_run, Env};
use crate::table::{list, RatioStyle, Row, Verdict};
use crate::until;

/// `docker run --rm` of the image at `par` parallelism, `total` in all, until `limit`.
fn docker_loop(image: &str, par: usize, total: usize, limit: Duration) -> Rate {
    thread_rate(par, total, limit, || {
        let mut cmd = Command::new("docker");
        cmd.args(["run", "--rm", "--network", "none", "--label", "berth.test=1", "--label", "berth.perf=1", image, "true"]);
        run_timeout(cmd, Duration::from_secs(60)).is_ok_and(|o| o.status.success())
    })
}

pub fn scenario_6(env: &Env) -> Result<Vec<Row>> {
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
    let (mut berth, mut raw) = (Vec::new(), Rates::default());
    let mut rounds = Rounds::new(env.rounds, end);
    while let Some(r) = rounds.next_round() {
        let rate = docker_loop(img, par, n as usize, until(end).max(Duration::from_secs(30)));
        raw.add(&rate);
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
                        rounds.note.push_str(&format!(" ({} containers of {id} were left behind)", left.len()));
                    }
                }
            }
            Err(e) => {
                rounds.failed(r, &e);
                env.cancel_unfinished(&c);
                break;
            }
        }
    }
    let (raw, raw_failed, note) = (raw.per_sec, raw.failed, rounds.note);
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
