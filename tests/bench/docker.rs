//! Docker bench, one run, one table: container jobs per second
//!
//! 1. `docker run --rm --network none IMG true` in a loop (the CLI, one after another):
//!    the engine's own pace for a container that does nothing;
//! 2. the same job through berth, one slot (one container at a time, as the loop);
//! 3. through berth with 4 slots (containers side by side);
//!
//! on one worker offering the docker executor, a coordinator on loopback, and the test
//! image (Debian's busybox-static imported with `docker import`, removed at the end).
//! Run it with the release binaries built first:
//!
//! ```text
//! cargo build --release --workspace && cargo bench -p berth-e2e --bench docker
//! ```
//!
//! Every phase has a deadline; the cluster's processes are killed when it is dropped.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_e2e::docker::{available, test_image};
use berth_e2e::{run_timeout, Cluster};

/// Containers in the CLI loop and in the one-slot run.
const SEQUENTIAL: usize = 40;
/// Containers in the four-slot run.
const PARALLEL: u32 = 120;
const SLOTS: usize = 4;
const PHASE_LIMIT: Duration = Duration::from_secs(180);

fn main() -> ExitCode {
    berth_e2e::bench::exit("docker", real_main())
}

/// `docker run --rm` of `true`, `n` times in a row: containers per second.
fn docker_run_loop(image: &str, n: usize) -> Result<f64> {
    let start = Instant::now();
    for i in 0..n {
        if start.elapsed() > PHASE_LIMIT {
            bail!("the docker run loop passed {PHASE_LIMIT:?} after {i} containers");
        }
        let mut cmd = Command::new("docker");
        cmd.args(["run", "--rm", "--network", "none", "--label", "berth.test=1", image, "true"]).stdin(Stdio::null());
        let out = run_timeout(cmd, Duration::from_secs(60))?;
        if !out.status.success() {
            bail!("docker run failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// An array of `n` `true` containers through berth, timed from submission to the end
/// of `berth submit --wait`: containers per second.
fn through_berth(c: &Cluster, image: &str, n: u32) -> Result<f64> {
    let range = format!("1-{n}");
    let start = Instant::now();
    let out = c.berth(&["submit", "--wait", "--image", image, "--array", &range, "--", "true"]);
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!("berth submit --wait of {n} containers failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    if elapsed > PHASE_LIMIT {
        bail!("{n} containers through berth took {elapsed:?}, past the {PHASE_LIMIT:?} limit");
    }
    Ok(f64::from(n) / elapsed.as_secs_f64())
}

fn cluster(slots: usize) -> Result<Cluster> {
    let mut c = Cluster::start()?;
    c.spawn_worker_with("bench", slots, &["--executor", "docker"])?;
    c.wait_worker_connected("bench", true)?;
    Ok(c)
}

fn real_main() -> Result<()> {
    if !available("the docker bench") {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("no Docker engine");
        }
        return Ok(());
    }
    let image = test_image().context("the test image")?;
    let engine = Command::new("docker").args(["version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"]).output()?;
    let engine = String::from_utf8_lossy(&engine.stdout).trim().to_string();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);

    eprintln!("[1/3] docker run --rm {} true, {SEQUENTIAL} times", image.name);
    // One container first, so the engine's caches are warm for every phase alike.
    docker_run_loop(&image.name, 1)?;
    let cli = docker_run_loop(&image.name, SEQUENTIAL)?;

    eprintln!("[2/3] {SEQUENTIAL} containers through berth, 1 slot");
    let one = {
        let c = cluster(1)?;
        through_berth(&c, &image.name, 1)?;
        through_berth(&c, &image.name, SEQUENTIAL as u32)?
    };

    eprintln!("[3/3] {PARALLEL} containers through berth, {SLOTS} slots");
    let four = {
        let c = cluster(SLOTS)?;
        through_berth(&c, &image.name, 1)?;
        through_berth(&c, &image.name, PARALLEL)?
    };

    println!();
    println!("Docker bench: engine {engine}, {cores} cores");
    println!("{:<58} {:>12} {:>10}", "scenario", "containers/s", "vs CLI");
    println!("{:<58} {:>12.2} {:>10}", format!("docker run --rm IMG true, {SEQUENTIAL} in a row"), cli, "1.00x");
    println!("{:<58} {:>12.2} {:>9.2}x", format!("berth, 1 slot, array of {SEQUENTIAL} (submit to --wait end)"), one, one / cli);
    println!("{:<58} {:>12.2} {:>9.2}x", format!("berth, {SLOTS} slots, array of {PARALLEL} (submit to --wait end)"), four, four / cli);
    Ok(())
}
