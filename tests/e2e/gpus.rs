//! GPUs, resource-aware claims and routing, with a fake `nvidia-smi` (CI has no GPU):
//! jobs get distinct GPUs and see only those, model and memory pick the worker, an
//! impossible job says why, spill waits for cheaper pools, accounts share fairly, and
//! dependencies order jobs.

use std::time::Duration;

use anyhow::{Context, Result};
use berth_e2e::*;
use serde_json::Value;

const H100: &str = "NVIDIA H100 80GB HBM3";
const A10: &str = "NVIDIA A10";

/// Starts a worker whose `nvidia-smi` reports `gpus`.
fn gpu_worker(c: &mut Cluster, name: &str, slots: usize, gpus: &[(u32, &str, u64)], flags: &[&str]) -> Result<()> {
    let bin = fake_nvidia_smi(&c.path(&format!("fake-{name}")), gpus)?;
    c.spawn_worker_env(name, slots, flags, &[("PATH", path_with(&bin)), ("BERTH_NO_NVML", "1".into())])?;
    c.wait_worker_connected(name, true)
}

fn event_time(st: &Value, state: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    st["events"].as_array()?.iter().filter(|e| e["state"] == state).filter_map(|e| e["time"].as_str()?.parse().ok()).next_back()
}

fn log(c: &Cluster, job: &str) -> String {
    String::from_utf8_lossy(&c.berth(&["logs", job]).stdout).trim().to_string()
}

#[test]
fn jobs_get_distinct_gpus_and_wait_for_free_ones() -> Result<()> {
    let mut c = Cluster::start()?;
    gpu_worker(&mut c, "g2", 4, &[(0, H100, 81559), (1, H100, 81559)], &[])?;
    // What the worker found is what `berth workers` shows.
    let ws = c.berth_json(&["workers", "--json"])?;
    assert_eq!(ws[0]["host"]["gpus"].as_array().map(Vec::len), Some(2), "{ws}");

    let job = ["--gpus", "1", "--", "sh", "-c", "echo gpus=$CUDA_VISIBLE_DEVICES; sleep 3"];
    let a = c.submit(&job)?;
    let b = c.submit(&job)?;
    let third = c.submit(&job)?;
    c.wait_state(&a, "running", Duration::from_secs(20))?;
    c.wait_state(&b, "running", Duration::from_secs(20))?;
    assert_eq!(c.status(&third)?["state"], "queued", "two GPUs, two jobs: the third waits although slots are free");
    c.wait_state(&a, "succeeded", Duration::from_secs(30))?;
    c.wait_state(&b, "succeeded", Duration::from_secs(30))?;
    let mut seen = vec![log(&c, &a), log(&c, &b)];
    seen.sort();
    assert_eq!(seen, ["gpus=0", "gpus=1"], "each job sees only its own GPU");
    c.wait_state(&third, "running", Duration::from_secs(20))?;

    // Both GPUs only when both are free.
    let both = c.submit(&["--gpus", "2", "--", "sh", "-c", "echo gpus=$CUDA_VISIBLE_DEVICES"])?;
    assert_eq!(c.status(&both)?["state"], "queued");
    c.wait_state(&third, "succeeded", Duration::from_secs(30))?;
    c.wait_state(&both, "succeeded", Duration::from_secs(30))?;
    assert_eq!(log(&c, &both), "gpus=0,1");
    // A job that asked for no GPU sees none.
    let none = c.submit(&["--", "sh", "-c", "echo gpus=[$CUDA_VISIBLE_DEVICES]"])?;
    c.wait_state(&none, "succeeded", Duration::from_secs(30))?;
    assert_eq!(log(&c, &none), "gpus=[]");
    Ok(())
}

#[test]
fn model_and_memory_pick_the_worker() -> Result<()> {
    let mut c = Cluster::start()?;
    gpu_worker(&mut c, "small", 2, &[(0, A10, 23028)], &[])?;
    gpu_worker(&mut c, "big", 2, &[(0, H100, 81559)], &[])?;
    let big = c.submit(&["--gpus", "1", "--min-vram", "40G", "--", "true"])?;
    let small = c.submit(&["--gpus", "1", "--gpu-model", "a10", "--", "true"])?;
    assert_eq!(c.wait_state(&big, "succeeded", Duration::from_secs(30))?["worker"], "big");
    assert_eq!(c.wait_state(&small, "succeeded", Duration::from_secs(30))?["worker"], "small");
    // `--gpus` on the worker restricts what it offers.
    let out = run_timeout(
        {
            let mut cmd = std::process::Command::new(bin("berth-worker"));
            let fake = fake_nvidia_smi(&c.path("fake-print"), &[(0, H100, 81559), (1, H100, 81559), (2, A10, 23028)])?;
            cmd.args(["--print-host", "--gpus", "0,2"]).env("PATH", path_with(&fake)).env("BERTH_NO_NVML", "1");
            cmd
        },
        Duration::from_secs(20),
    )?;
    let host: Value = serde_json::from_slice(&out.stdout).context("--print-host JSON")?;
    let idx: Vec<u64> = host["gpus"].as_array().context("gpus")?.iter().filter_map(|g| g["index"].as_u64()).collect();
    assert_eq!(idx, [0, 2]);
    Ok(())
}

#[test]
fn an_impossible_job_says_why_and_runs_once_a_fitting_worker_joins() -> Result<()> {
    let mut c = Cluster::start()?;
    gpu_worker(&mut c, "two", 2, &[(0, H100, 81559), (1, H100, 81559)], &[])?;
    let out = c.berth(&["submit", "--gpus", "3", "--", "echo", "three"]);
    assert!(out.status.success());
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning") && err.contains("3 GPUs") && err.contains("the most any connected worker has is 2"), "{err}");
    let st = c.status(&job)?;
    assert_eq!(st["state"], "queued");
    assert!(st["waiting"].as_str().is_some_and(|w| w.contains("3 GPUs")), "{st}");
    let list = c.berth_json(&["list", "--json"])?;
    assert!(list[0]["waiting"].as_str().is_some_and(|w| w.contains("3 GPUs")), "{list}");

    gpu_worker(&mut c, "four", 4, &[(0, H100, 81559), (1, H100, 81559), (2, H100, 81559), (3, H100, 81559)], &[])?;
    let st = c.wait_state(&job, "succeeded", Duration::from_secs(30))?;
    assert_eq!(st["worker"], "four");
    Ok(())
}

#[test]
fn work_spills_to_a_costlier_pool_only_after_its_delay() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pools = dir.path().join("pools.toml");
    std::fs::write(&pools, "[[pool]]\nname = \"lab\"\nkind = \"local\"\n\n[[pool]]\nname = \"cloud\"\nkind = \"cloud\"\nspill_after_s = 2\n")?;
    let mut c = Cluster::start_with("30s", &["--pools", pools.to_str().context("path")?])?;
    // No prefetch on the cheap pool: a task held ready there would wait for its one
    // slot instead of spilling (README: Routing).
    c.spawn_worker_with("lab1", 1, &["--pool", "lab", "--prefetch", "0"])?;
    c.wait_worker_connected("lab1", true)?;
    c.spawn_worker_with("cloud1", 2, &["--pool", "cloud"])?;
    c.wait_worker_connected("cloud1", true)?;
    let jobs: Vec<String> = (0..3).map(|_| c.submit(&["--", "sleep", "4"])).collect::<Result<_>>()?;
    let first = c.wait_state(&jobs[0], "running", Duration::from_secs(20))?;
    assert_eq!(first["worker"], "lab1", "a free slot in the cheaper kind wins at once: {first}");
    for j in &jobs[1..] {
        let st = c.wait_state(j, "running", Duration::from_secs(20))?;
        assert_eq!(st["worker"], "cloud1", "{st}");
        let waited = event_time(&st, "running").context("running")? - event_time(&st, "queued").context("queued")?;
        assert!(waited >= chrono::Duration::milliseconds(1900), "went to cloud after {waited:?}, before the 2 s spill delay: {st}");
        assert!(st["events"].to_string().contains("no cheaper slot free"), "status records why: {st}");
    }
    assert!(first["events"].to_string().contains("pool lab (local)"), "{first}");
    Ok(())
}

#[test]
fn accounts_take_turns_so_a_big_array_does_not_starve_a_small_job() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w", 2)?;
    let big = c.submit(&["--account", "a", "--array", "0-999", "--", "sleep", "0.1"])?;
    let small: Vec<String> = (0..10).map(|_| c.submit(&["--account", "b", "--", "true"])).collect::<Result<_>>()?;
    let mut last_b = None;
    for j in &small {
        let st = c.wait_state(j, "succeeded", Duration::from_secs(60))?;
        let t = event_time(&st, "running").context("b ran")?;
        last_b = Some(last_b.map_or(t, |l: chrono::DateTime<chrono::Utc>| l.max(t)));
    }
    let a99 = format!("{big}:99");
    let st = c.wait_state(&a99, "running", Duration::from_secs(60)).or_else(|_| c.wait_state(&a99, "succeeded", Duration::from_secs(1)))?;
    let a_100th = event_time(&st, "running").context("a:99 ran")?;
    assert!(last_b.context("b")? < a_100th, "all of b's jobs started ({last_b:?}) before a's 100th task ({a_100th})");
    let out = c.berth(&["cancel", &big]);
    assert!(out.status.success());
    Ok(())
}

#[test]
fn dependencies_order_jobs_and_cancel_on_a_failed_parent() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w", 4)?;
    let parent = c.submit(&["--array", "1-3", "--", "sh", "-c", "sleep 1; echo part $BERTH_ARRAY_INDEX"])?;
    let child = c.submit(&["--after", &parent, "--", "echo", "after"])?;
    let st = c.status(&child)?;
    assert!(st["waiting"].as_str().is_some_and(|w| w.contains(&parent)), "{st}");
    let pst = c.wait_state(&parent, "succeeded", Duration::from_secs(30))?;
    let cst = c.wait_state(&child, "succeeded", Duration::from_secs(30))?;
    let parent_end: chrono::DateTime<chrono::Utc> = pst["ended_at"].as_str().context("ended")?.parse()?;
    assert!(event_time(&cst, "running").context("ran")? >= parent_end, "the child ran after the whole array");

    let bad = c.submit(&["--", "false"])?;
    let on_ok = c.submit(&["--after", &format!("{bad}:ok"), "--", "echo", "never"])?;
    let on_any = c.submit(&["--after", &format!("{bad}:any"), "--", "echo", "anyway"])?;
    c.wait_state(&bad, "failed", Duration::from_secs(30))?;
    let st = c.wait_state(&on_ok, "cancelled", Duration::from_secs(30))?;
    assert!(st["events"].to_string().contains(&format!("dependency {bad} ended failed")), "{st}");
    c.wait_state(&on_any, "succeeded", Duration::from_secs(30))?;
    // A parent that ended already counts at once.
    let late = c.submit(&["--after", &format!("{bad}:ok"), "--", "echo", "never"])?;
    c.wait_state(&late, "cancelled", Duration::from_secs(10))?;
    // Bad input: an unknown parent, a bad condition.
    let out = c.berth(&["submit", "--after", "ffffffff", "--", "true"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.berth(&["submit", "--after", &format!("{bad}:maybe"), "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}
