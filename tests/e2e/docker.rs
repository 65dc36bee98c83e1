//! Docker jobs end to end, against the real engine: containers per attempt with the
//! workspace at /workspace, limits and labels; exact exit codes, OOM kills and
//! timeouts; cancel removing the container; a killed worker's orphans swept when it
//! comes back and its tasks run again; freeze and resume; image errors as job errors;
//! `berth-worker sweep`. Under `CI=true` they run (an engine that does not answer is a
//! failure); elsewhere, without an engine, each prints a skip line.
//!
//! Everything these tests make in the engine carries a label (`berth.test=1` through
//! the test image, berth's own labels on berth's containers) and only that is removed.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_e2e::docker::{available, containers_with, docker, docker_ok, test_image, TestImage, TEST_LABEL};
use berth_e2e::{bin, run_timeout, wait_until, Cluster};
use serde_json::Value;

const DOCKER: &[&str] = &["--executor", "process,docker"];

/// The test image and a cluster with one worker `w1` offering both executors (bound in
/// this order, so the cluster stops before the image is let go).
fn docker_cluster(test: &str, ttl: &str, slots: usize) -> Option<(TestImage, Cluster)> {
    if !available(test) {
        return None;
    }
    let image = test_image().expect("the test image is made");
    let mut c = Cluster::start_with_ttl(ttl).expect("the cluster starts");
    // The secret the tests pass is the worker's PATH, declared as one for every account.
    let secrets = c.path("secrets.toml");
    std::fs::write(&secrets, "[secrets.PATH]\nenv = \"PATH\"\naccounts = [\"*\"]\n").expect("the secrets file is written");
    let mut flags: Vec<&str> = DOCKER.to_vec();
    flags.extend(["--secrets", secrets.to_str().expect("utf8")]);
    c.spawn_worker_with("w1", slots, &flags).expect("w1 starts");
    c.wait_worker_connected("w1", true).expect("w1 connects");
    assert_eq!(executors_of(&c, "w1"), ["process", "docker"], "w1 offers docker (its engine answers):\n{}", c.logs_of("worker-w1"));
    Some((image, c))
}

/// Runs a test body; an error fails the test while the cluster is up (its logs print).
fn check(c: &Cluster, r: Result<()>) {
    if let Err(e) = r {
        let _ = c;
        panic!("{e:?}");
    }
}

fn logs(c: &Cluster, sel: &str) -> Result<(String, String)> {
    let out = c.berth(&["logs", sel]);
    if !out.status.success() {
        bail!("berth logs {sel} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

/// The ids of a job's containers (any state).
fn job_containers(job: &str) -> Vec<String> {
    containers_with(&format!("berth.job={job}")).unwrap_or_default()
}

fn wait_no_containers(job: &str, within: Duration) -> Result<()> {
    wait_until(&format!("the containers of job {job} to be gone"), within, || job_containers(job).is_empty())
}

fn inspect(id: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(&docker_ok(&["inspect", id])?)?;
    v.as_array().and_then(|a| a.first().cloned()).context("docker inspect answered no object")
}

fn executors_of(c: &Cluster, worker: &str) -> Vec<String> {
    let ws = c.berth_json(&["workers", "--json"]).unwrap_or_default();
    let w = ws.as_array().and_then(|a| a.iter().find(|w| w["name"] == worker).cloned()).unwrap_or_default();
    w["host"]["executors"].as_array().map(|a| a.iter().filter_map(|e| e.as_str().map(String::from)).collect()).unwrap_or_default()
}

#[test]
fn an_array_of_20_runs_in_containers_that_are_gone_afterwards() {
    let Some((img, c)) = docker_cluster("an_array_of_20_runs_in_containers_that_are_gone_afterwards", "30s", 4) else { return };
    check(
        &c,
        (|| {
            let script = "test \"$(pwd)\" = /workspace && test \"$BERTH_WORKSPACE\" = /workspace || exit 9; \
                      echo $BERTH_ARRAY_INDEX > /workspace/out; cat /workspace/out";
            let id = c.submit(&["--image", &img.name, "--array", "1-20", "--cpus", "0.5", "--mem", "64m", "--", "sh", "-c", script])?;
            let st = c.wait_state(&id, "succeeded", Duration::from_secs(180))?;
            assert_eq!(st["counts"]["succeeded"], 20, "{st}");
            for i in 1..=20 {
                let (out, err) = logs(&c, &format!("{id}:{i}"))?;
                assert_eq!(out, format!("{i}\n"), "task {i}");
                assert_eq!(err, "", "task {i}");
            }
            let task = c.status(&format!("{id}:7"))?;
            assert_eq!(task["image"], img.name.as_str(), "{task}");
            assert_eq!(task["network"], "none", "{task}");
            wait_no_containers(&id, Duration::from_secs(10))?;
            Ok(())
        })(),
    );
}

#[test]
fn exit_codes_oom_kills_and_timeouts_are_reported_exactly() {
    let Some((img, c)) = docker_cluster("exit_codes_oom_kills_and_timeouts_are_reported_exactly", "30s", 4) else { return };
    check(
        &c,
        (|| {
            let image = img.name.as_str();
            // Streams kept apart; env and secrets passed (the secret is the worker's PATH).
            let ok = c.submit(&["--image", image, "--env", "GREETING=hi", "--secret", "S=PATH", "--", "sh", "-c", "echo $GREETING; echo \"s=$S\" >&2"])?;
            let three = c.submit(&["--image", image, "--", "sh", "-c", "exit 3"])?;
            let oom = c.submit(&["--image", image, "--mem", "32m", "--", "sh", "-c", "x=a; while :; do x=$x$x; done"])?;
            let late = c.submit(&["--image", image, "--max-runtime", "1s", "--", "sleep", "30"])?;

            let st = c.wait_state(&ok, "succeeded", Duration::from_secs(60))?;
            assert_eq!(st["exit_code"], 0, "{st}");
            let (out, err) = logs(&c, &ok)?;
            assert_eq!(out, "hi\n");
            let path = std::env::var("PATH").unwrap_or_default();
            assert_eq!(err, format!("s={path}\n"), "the secret is resolved on the worker");

            let st = c.wait_state(&three, "failed", Duration::from_secs(60))?;
            assert_eq!(st["exit_code"], 3, "{st}");
            assert_eq!(st["attempts"], 1, "{st}");
            assert!(st["reason"].as_str().unwrap_or("").contains("exit code 3"), "{st}");

            let st = c.wait_state(&oom, "failed", Duration::from_secs(60))?;
            assert_eq!(st["exit_code"], 137, "{st}");
            assert!(st["reason"].as_str().unwrap_or("").contains("oom_killed"), "{st}");
            let text = String::from_utf8(c.berth(&["status", &oom]).stdout)?;
            assert!(text.contains("oom_killed"), "`berth status` shows it:\n{text}");

            let st = c.wait_state(&late, "timed_out", Duration::from_secs(60))?;
            assert!(st["reason"].as_str().unwrap_or("").contains("max runtime"), "{st}");
            let code = st["exit_code"].as_i64().unwrap_or(0);
            assert!(code == 137 || code == 143, "killed by SIGTERM or SIGKILL: {st}");

            // `--wait` exits with the container's own code.
            let out = c.berth(&["submit", "--wait", "--image", image, "--", "sh", "-c", "exit 42"]);
            assert_eq!(out.status.code(), Some(42), "{}", String::from_utf8_lossy(&out.stderr));
            for j in [&ok, &three, &oom, &late] {
                wait_no_containers(j, Duration::from_secs(10))?;
            }
            Ok(())
        })(),
    );
}

#[test]
fn cancel_removes_the_container_within_5_seconds() {
    let Some((img, c)) = docker_cluster("cancel_removes_the_container_within_5_seconds", "30s", 2) else { return };
    check(
        &c,
        (|| {
            let id = c.submit(&["--image", &img.name, "--cpus", "0.5", "--mem", "64m", "--max-runtime", "10m", "--", "sleep", "300"])?;
            c.wait_state(&id, "running", Duration::from_secs(30))?;
            let mut running = Vec::new();
            wait_until("the container to run", Duration::from_secs(30), || {
                running = containers_with(&format!("berth.job={id}")).unwrap_or_default();
                running.len() == 1 && inspect(&running[0]).is_ok_and(|i| i["State"]["Running"] == true)
            })?;
            let info = inspect(&running[0])?;
            let labels = &info["Config"]["Labels"];
            assert_eq!(labels["berth.managed"], "1", "{labels}");
            assert_eq!(labels["berth.job"], id.as_str(), "{labels}");
            assert_eq!(labels["berth.worker"], "w1", "{labels}");
            assert_eq!(labels["berth.attempt"], "1", "{labels}");
            assert!(labels["berth.lease"].as_str().is_some_and(|l| l.len() == 36), "{labels}");
            let expires: u64 = labels["berth.expires"].as_str().unwrap_or("0").parse()?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            assert!(expires > now + 500 && expires < now + 700, "start + 10m + grace: {expires} vs now {now}");
            let host = &info["HostConfig"];
            assert_eq!(host["NanoCpus"], 500_000_000i64, "{host}");
            assert_eq!(host["Memory"], 64 * 1024 * 1024, "{host}");
            assert_eq!(host["MemorySwap"], 64 * 1024 * 1024, "no swap on top: {host}");
            assert_eq!(host["PidsLimit"], 4096, "{host}");
            assert_eq!(host["NetworkMode"], "none", "{host}");
            assert_eq!(info["Config"]["WorkingDir"], "/workspace");
            let binds = host["Binds"].to_string();
            assert!(binds.contains(":/workspace"), "{binds}");

            let t = Instant::now();
            let out = c.berth(&["cancel", &id]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            wait_no_containers(&id, Duration::from_secs(5))?;
            eprintln!("cancel to container gone: {:?}", t.elapsed());
            let st = c.wait_state(&id, "cancelled", Duration::from_secs(10))?;
            assert!(st["reason"].as_str().unwrap_or("").contains("cancelled by alice"), "{st}");
            // The worker carries on.
            let out = c.berth(&["submit", "--wait", "--image", &img.name, "--", "true"]);
            assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        })(),
    );
}

#[test]
fn a_killed_workers_containers_are_swept_when_it_returns_and_its_tasks_run_again() {
    let Some((img, mut c)) = docker_cluster("a_killed_workers_containers_are_swept_when_it_returns_and_its_tasks_run_again", "2s", 2) else { return };
    let r = (|| -> Result<()> {
        // Attempt 1 outlives its worker; later attempts are quick.
        let script = "echo attempt $BERTH_ATTEMPT; if [ $BERTH_ATTEMPT = 1 ]; then sleep 300; fi; echo done";
        let id = c.submit(&["--image", &img.name, "--array", "1-2", "--", "sh", "-c", script])?;
        wait_until("both containers to run", Duration::from_secs(60), || {
            job_containers(&id).iter().filter(|cid| inspect(cid).is_ok_and(|i| i["State"]["Running"] == true)).count() == 2
        })?;
        let orphans = job_containers(&id);
        c.worker("w1").context("w1")?.kill9();
        // kill -9 leaves the containers running: nobody removed them.
        assert!(orphans.iter().all(|o| inspect(o).is_ok_and(|i| i["State"]["Running"] == true)), "the orphans outlive their worker");

        // Another worker takes the tasks once their leases run out.
        c.spawn_worker_with("w2", 2, DOCKER)?;
        let st = c.wait_state(&id, "succeeded", Duration::from_secs(60))?;
        assert_eq!(st["counts"]["succeeded"], 2, "{st}");
        for i in 1..=2 {
            let t = c.status(&format!("{id}:{i}"))?;
            assert_eq!(t["worker"], "w2", "{t}");
            assert_eq!(t["attempts"], 2, "{t}");
            assert_eq!(logs(&c, &format!("{id}:{i}"))?.0, "attempt 2\ndone\n");
        }
        assert!(orphans.iter().all(|o| inspect(o).is_ok()), "w1's orphans are still there until w1 returns");

        // w1 comes back (same work dir, no token) and removes what it left.
        c.spawn_worker_with("w1", 2, DOCKER)?;
        wait_until("w1 to sweep its orphans", Duration::from_secs(30), || orphans.iter().all(|o| inspect(o).is_err()))?;
        c.wait_worker_connected("w1", true)?;
        assert!(c.logs_of("worker-w1").contains("swept what an earlier run of this worker left behind"), "w1 says what it swept");
        // Nothing it did changed the recorded results.
        let st = c.status(&id)?;
        assert_eq!(st["counts"]["succeeded"], 2, "{st}");
        wait_no_containers(&id, Duration::from_secs(10))?;
        Ok(())
    })();
    check(&c, r);
}

#[test]
fn a_restarted_worker_requeues_what_it_ran_and_runs_it_again() {
    let Some((img, mut c)) = docker_cluster("a_restarted_worker_requeues_what_it_ran_and_runs_it_again", "30s", 2) else { return };
    let r = (|| -> Result<()> {
        let script = "if [ $BERTH_ATTEMPT = 1 ]; then sleep 300; fi; echo ran attempt $BERTH_ATTEMPT";
        let id = c.submit(&["--image", &img.name, "--", "sh", "-c", script])?;
        wait_until("the container to run", Duration::from_secs(60), || job_containers(&id).len() == 1)?;
        let orphan = job_containers(&id);
        c.worker("w1").context("w1")?.kill9();
        // Back long before the 30 s lease runs out: the worker reports no leases, so the
        // coordinator re-queues the task at once and the worker runs it again.
        c.spawn_worker_with("w1", 2, DOCKER)?;
        let st = c.wait_state(&id, "succeeded", Duration::from_secs(60))?;
        assert_eq!(st["attempts"], 2, "{st}");
        assert_eq!(logs(&c, &id)?.0, "ran attempt 2\n");
        assert!(inspect(&orphan[0]).is_err(), "the orphan was removed");
        let reasons = st["events"].to_string();
        assert!(reasons.contains("lease_lost"), "{reasons}");
        Ok(())
    })();
    check(&c, r);
}

#[test]
fn a_frozen_job_resumes_with_its_files() {
    let Some((img, c)) = docker_cluster("a_frozen_job_resumes_with_its_files", "30s", 2) else { return };
    let tag = format!("e2e-{}", std::process::id());
    let frozen_image = format!("berth-frozen:{tag}");
    let r = (|| -> Result<()> {
        let script = "echo state > /workspace/f; echo data > /root/g; echo started; sleep 300";
        let id = c.submit(&["--image", &img.name, "--mem", "64m", "--secret", "TOKEN=PATH", "--", "sh", "-c", script])?;
        wait_until("the job to start", Duration::from_secs(60), || logs(&c, &id).is_ok_and(|(o, _)| o == "started\n"))?;
        // Only the owner or an admin may freeze: to bob, alice's job does not exist.
        let bob = c.path("bob.toml");
        c.user("bob", "submitter", &bob)?;
        let out = c.berth_as(&bob, &["freeze", &id]);
        assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));

        let out = c.berth(&["freeze", &id, "--tag", &tag]);
        assert!(out.status.success(), "freeze: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout)?.trim(), frozen_image);
        let note = String::from_utf8(out.stderr)?;
        assert!(note.contains("not the memory"), "freeze says what it keeps: {note}");
        let st = c.status(&id)?;
        assert_eq!(st["state"], "frozen", "{st}");
        assert_eq!(st["frozen_image"], frozen_image.as_str(), "{st}");
        wait_no_containers(&id, Duration::from_secs(10))?;

        let info = inspect(&frozen_image)?;
        let labels = &info["Config"]["Labels"];
        assert_eq!(labels["berth.managed"], "1", "{labels}");
        assert_eq!(labels["berth.frozen_from"], id.as_str(), "{labels}");
        assert_eq!(labels["berth.worker"], "", "a container made from the image does not pass for one of berth's: {labels}");
        let env = info["Config"]["Env"].to_string();
        let path = std::env::var("PATH").unwrap_or_default();
        assert!(!env.contains(&path) && env.contains("\"TOKEN=\""), "no secret in the image: {env}");
        let images = c.berth_json(&["images", "--json"])?;
        assert!(images.as_array().is_some_and(|a| a.iter().any(|i| i["image"] == frozen_image.as_str() && i["job"] == id.as_str())), "{images}");
        // The same tag again is refused while the image exists.
        let again = c.submit(&["--image", &img.name, "--", "sleep", "300"])?;
        c.wait_state(&again, "running", Duration::from_secs(30))?;
        let out = c.berth(&["freeze", &again, "--tag", &tag]);
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
        c.berth(&["cancel", &again]);

        // Resumed with another command: it sees the workspace and the container's files.
        let out = c.berth(&["resume", &id, "--cmd", "cat", "/workspace/f", "/root/g"]);
        assert!(out.status.success(), "resume: {}", String::from_utf8_lossy(&out.stderr));
        let resumed = String::from_utf8(out.stdout)?.trim().to_string();
        let st = c.wait_state(&resumed, "succeeded", Duration::from_secs(60))?;
        assert_eq!(logs(&c, &resumed)?.0, "state\ndata\n");
        assert_eq!(st["resumed_from"], id.as_str(), "{st}");
        assert_eq!(st["image"], frozen_image.as_str(), "{st}");
        let text = String::from_utf8(c.berth(&["status", &resumed]).stdout)?;
        assert!(text.contains("resumed from") && text.contains(&id), "{text}");
        wait_no_containers(&resumed, Duration::from_secs(10))?;

        let out = c.berth(&["images", "rm", &frozen_image]);
        assert!(out.status.success(), "images rm: {}", String::from_utf8_lossy(&out.stderr));
        assert!(inspect(&frozen_image).is_err(), "the image is gone from the engine");
        let images = c.berth_json(&["images", "--json"])?;
        assert_eq!(images, serde_json::json!([]), "{images}");
        Ok(())
    })();
    // Whatever happened, leave no frozen image behind.
    let _ = docker(&["rmi", &frozen_image]);
    check(&c, r);
}

#[test]
fn a_missing_image_or_command_fails_the_job_and_the_worker_carries_on() {
    let Some((img, c)) = docker_cluster("a_missing_image_or_command_fails_the_job_and_the_worker_carries_on", "30s", 2) else { return };
    check(
        &c,
        (|| {
            let missing = format!("berth-test-missing:{}", std::process::id());
            let id = c.submit(&["--image", &missing, "--", "true"])?;
            let st = c.wait_state(&id, "failed", Duration::from_secs(60))?;
            let reason = st["reason"].as_str().unwrap_or("").to_string();
            assert!(reason.contains("No such image") && reason.contains(&missing), "the engine's reason: {st}");
            assert_eq!(st["attempts"], 1, "{st}");

            let id = c.submit(&["--image", &img.name, "--", "no-such-command", "arg"])?;
            let st = c.wait_state(&id, "failed", Duration::from_secs(60))?;
            assert_eq!(st["exit_code"], 127, "{st}");
            assert!(st["reason"].as_str().unwrap_or("").contains("executable file not found"), "the engine's reason: {st}");
            wait_no_containers(&id, Duration::from_secs(10))?;

            let out = c.berth(&["submit", "--wait", "--image", &img.name, "--", "sh", "-c", "echo still serving"]);
            assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
            // Bad input is one line and exit 2, before anything is sent.
            for bad in [vec!["--image", "Bad Image"], vec!["--image", &img.name, "--network", "host"], vec!["--network", "bridge"]] {
                let mut args = vec!["submit"];
                args.extend(bad.iter().copied());
                args.extend(["--", "true"]);
                let out = c.berth(&args);
                assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
                assert_eq!(String::from_utf8_lossy(&out.stderr).trim().lines().count(), 1, "{args:?}");
            }
            Ok(())
        })(),
    );
}

#[test]
fn docker_is_offered_only_when_the_engine_answers() {
    if !available("docker_is_offered_only_when_the_engine_answers") {
        return;
    }
    let mut c = Cluster::start().expect("the cluster starts");
    let r = (|| -> Result<()> {
        let token = c.token()?;
        let mut cmd = c.worker_cmd("nodocker", 1, Some(&token));
        cmd.args(DOCKER).env("DOCKER_HOST", format!("unix://{}", c.path("no-such-docker.sock").display()));
        let log = c.path("worker-nodocker.0.log");
        cmd.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn()?;
        c.workers.push(("nodocker".into(), berth_e2e::Proc { name: "worker nodocker".into(), child, log }));
        c.wait_worker_connected("nodocker", true)?;
        assert_eq!(executors_of(&c, "nodocker"), ["process"], "no engine, no docker");
        assert!(c.logs_of("worker-nodocker").contains("not offering the docker executor"));
        // A container job never lands there: it stays queued while a process job runs.
        let id = c.submit(&["--image", "busybox", "--", "true"])?;
        let out = c.berth(&["submit", "--wait", "--", "true"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let st = c.status(&id)?;
        assert_eq!(st["state"], "queued", "{st}");
        assert!(st["events"].as_array().is_some_and(|e| e.iter().all(|e| e["state"] == "queued")), "never claimed: {st}");
        // And says why, in `berth status`.
        assert!(st["waiting"].as_str().is_some_and(|w| w.contains("docker executor")), "{st}");
        let text = String::from_utf8(c.berth(&["status", &id]).stdout)?;
        assert!(text.contains("waiting") && text.contains("docker executor"), "{text}");
        Ok(())
    })();
    check(&c, r);
}

/// `berth-worker sweep --work-dir D --name N`.
fn sweep(c: &Cluster, worker: &str) -> Result<(bool, String, String)> {
    let mut cmd = Command::new(bin("berth-worker"));
    cmd.args(["sweep", "--work-dir"]).arg(c.path(&format!("w-{worker}"))).args(["--name", worker]);
    let out = run_timeout(cmd, Duration::from_secs(60))?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

#[test]
fn sweep_removes_only_what_carries_the_workers_labels() {
    let Some((img, mut c)) = docker_cluster("sweep_removes_only_what_carries_the_workers_labels", "30s", 2) else { return };
    let run = std::process::id();
    let unlabelled = format!("berth-e2e-unlabelled-{run}");
    let other = format!("berth-e2e-other-worker-{run}");
    let other_cluster = format!("berth-e2e-other-cluster-{run}");
    let orphan = format!("berth-e2e-orphan-{run}");
    let r = (|| -> Result<()> {
        // Not berth's (only the test image's label), another worker's, a worker of the
        // same name in another cluster, and one of w1's.
        let cluster = std::fs::read_to_string(c.path("w-w1/cluster-id"))?.trim().to_string();
        let ours = format!("berth.cluster={cluster}");
        docker_ok(&["create", "--name", &unlabelled, "--network", "none", &img.name, "true"])?;
        docker_ok(&[
            "create",
            "--name",
            &other,
            "--network",
            "none",
            "--label",
            "berth.managed=1",
            "--label",
            "berth.worker=someone-else",
            "--label",
            &ours,
            &img.name,
            "true",
        ])?;
        docker_ok(&[
            "create",
            "--name",
            &other_cluster,
            "--network",
            "none",
            "--label",
            "berth.managed=1",
            "--label",
            "berth.worker=w1",
            "--label",
            "berth.cluster=0000000000000000",
            &img.name,
            "true",
        ])?;
        let make_orphan = || {
            docker_ok(&[
                "create",
                "--name",
                &orphan,
                "--network",
                "none",
                "--label",
                "berth.managed=1",
                "--label",
                "berth.worker=w1",
                "--label",
                &ours,
                "--label",
                "berth.lease=00000000-0000-0000-0000-000000000000",
                "--label",
                "berth.job=00000000-0000-0000-0000-000000000001",
                &img.name,
                "sleep",
                "300",
            ])
        };
        make_orphan()?;

        // While w1 runs, its held attempt stays; what it does not hold goes.
        let id = c.submit(&["--image", &img.name, "--", "sleep", "300"])?;
        wait_until("the job's container", Duration::from_secs(60), || job_containers(&id).len() == 1)?;
        let (ok, out, err) = sweep(&c, "w1")?;
        assert!(ok, "sweep: {err}");
        assert_eq!(out.lines().count(), 1, "one line per thing removed:\n{out}");
        assert!(out.contains(&orphan) && out.contains("no longer held"), "{out}");
        assert!(err.contains("the worker is running"), "{err}");
        assert_eq!(job_containers(&id).len(), 1, "the running attempt's container is left alone");
        assert!(inspect(&unlabelled).is_ok() && inspect(&other).is_ok());

        // With w1 stopped, everything of w1's goes, with its workspaces.
        c.berth(&["cancel", &id]);
        c.worker("w1").context("w1")?.stop(Duration::from_secs(20));
        make_orphan()?;
        let stale = c.path("w-w1/slots/0");
        std::fs::create_dir_all(&stale)?;
        std::fs::write(stale.join("junk"), "x")?;
        let (ok, out, err) = sweep(&c, "w1")?;
        assert!(ok, "sweep: {err}");
        assert!(out.lines().all(|l| l.starts_with("removed ")), "{out}");
        assert!(out.contains(&orphan), "{out}");
        assert!(out.contains(&format!("workspace {}", stale.display())), "{out}");
        assert!(!stale.exists());
        assert!(inspect(&orphan).is_err(), "w1's orphan is gone");
        assert!(inspect(&unlabelled).is_ok(), "a container without berth's labels is never touched");
        assert!(inspect(&other).is_ok(), "another worker's container is not this sweep's business");
        assert!(inspect(&other_cluster).is_ok(), "nor is a container of a worker of the same name in another cluster");
        // Nothing left: a second sweep removes nothing.
        let (ok, out, _) = sweep(&c, "w1")?;
        assert!(ok && out.is_empty(), "{out}");
        Ok(())
    })();
    for name in [&unlabelled, &other, &other_cluster, &orphan] {
        let _ = docker(&["rm", "-f", name]);
    }
    assert!(containers_with(&format!("{TEST_LABEL}=1")).is_ok());
    check(&c, r);
}
