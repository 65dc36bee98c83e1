//! A network partition between hosts, on the cluster `deploy/compose.yaml` describes:
//! a coordinator and three workers, each its own container on the compose project's
//! private network, from the image `deploy/build-image.sh` makes out of the binaries
//! this workspace built. One worker that runs tasks is cut off the network
//! (`docker network disconnect`) past the lease TTL: its tasks go back to the queue and
//! finish on the other workers, each recorded once; when it rejoins (`docker network
//! connect`), the coordinator refuses its stale leases and the results it brings, and
//! the recorded results stay as they were.
//!
//! Under `CI=true` it runs (a Docker engine or `docker-compose` that does not answer is
//! a failure); elsewhere, without them, it prints a skip line. Each run uses its own
//! compose project (`berth-e2e-part-PID-N`) and image tag, and removes exactly those
//! (`docker-compose down -v`, `docker rmi`) when it ends, failed or not; projects and
//! images a killed run left are removed by the next run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_e2e::docker::{available, busybox_deb, docker, docker_ok, TEST_LABEL};
use berth_e2e::{bin, run_timeout, wait_until};
use serde_json::Value;

/// The lease TTL the compose cluster runs with here.
const TTL: Duration = Duration::from_secs(3);
/// What every project this test makes is called, before `PID-N`.
const PROJECT_PREFIX: &str = "berth-e2e-part-";
/// The image this test builds, tagged `PID-N`.
const IMAGE: &str = "berth-e2e-compose";
const WORKERS: [&str; 3] = ["worker-1", "worker-2", "worker-3"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy")
}

/// Whether `docker-compose` answers. Under `CI=true` it must (panics); elsewhere the
/// test prints a skip line and returns.
fn compose_available(test: &str) -> bool {
    static UP: OnceLock<Result<String, String>> = OnceLock::new();
    let up = UP.get_or_init(|| {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["version", "--short"]).stdin(Stdio::null());
        match run_timeout(cmd, Duration::from_secs(60)) {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Err(format!("{e:#}")),
        }
    });
    match up {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("CI=true and `docker-compose version` does not answer: {e}"),
        Err(e) => {
            eprintln!("skipped {test}: `docker-compose version` does not answer ({e})");
            false
        }
    }
}

/// A compose project of `deploy/compose.yaml` that this test started: taken down with
/// its volumes, and its image removed, when dropped (the logs printed first when the
/// test is failing).
struct Compose {
    project: String,
    image: String,
    env: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
}

impl Compose {
    /// Builds the image from the workspace's binaries and brings the cluster up.
    fn up(ttl: &str) -> Result<Compose> {
        remove_leftovers();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let project = format!("{PROJECT_PREFIX}{pid}-{n}");
        let image = format!("{IMAGE}:{pid}-{n}");
        let dir = tempfile::Builder::new().prefix("berth-e2e-compose-").tempdir()?;
        let env = vec![
            ("BERTH_IMAGE", image.clone()),
            // Set but empty: a free host port on 127.0.0.1.
            ("BERTH_PORT", String::new()),
            ("BERTH_LEASE_TTL", ttl.to_string()),
            ("BERTH_SLOTS", "2".to_string()),
            // No prefetch: each worker claims exactly what its slots run.
            ("BERTH_WORKER_ARGS", "--prefetch 0".to_string()),
        ];
        // Bound before anything exists, so whatever exists is removed again.
        let c = Compose { project, image, env, dir };

        let started = Instant::now();
        let bin_dir = bin("berth-worker").parent().context("the binaries' directory")?.to_path_buf();
        let mut build = Command::new(deploy_dir().join("build-image.sh"));
        build
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(["--tag", &c.image, "--label", &format!("{TEST_LABEL}=1"), "--label", &format!("berth.test.pid={pid}")])
            .arg("--busybox-deb")
            .arg(busybox_deb()?)
            .stdin(Stdio::null());
        let out = run_timeout(build, Duration::from_secs(120))?;
        if !out.status.success() {
            bail!("deploy/build-image.sh failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        eprintln!("image {} built in {:?}", c.image, started.elapsed());
        c.compose(&["up", "-d", "--no-build"])?;
        eprintln!("compose project {} up after {:?}", c.project, started.elapsed());
        Ok(c)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["--no-ansi", "-p", &self.project, "-f"]).arg(deploy_dir().join("compose.yaml")).args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// `docker-compose ARGS` for this project, which must succeed: its stdout.
    fn compose(&self, args: &[&str]) -> Result<String> {
        let out = run_timeout(self.command(args), Duration::from_secs(120))?;
        if !out.status.success() {
            bail!("docker-compose {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The container id of a service.
    fn container(&self, service: &str) -> Result<String> {
        let id = self.compose(&["ps", "-q", service])?;
        if id.is_empty() {
            bail!("service {service} has no container");
        }
        Ok(id)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = run_timeout(self.command(&["logs", "--no-color", "--tail", "150"]), Duration::from_secs(60)) {
                eprintln!("---- docker-compose logs of {}\n{}", self.project, String::from_utf8_lossy(&out.stdout));
            }
        }
        take_down(&self.project);
        let _ = docker(&["rmi", &self.image]);
    }
}

/// Removes a compose project: its containers, network and volumes (`down -v`), then
/// whatever still carries its project label (a `down` that failed half-way).
fn take_down(project: &str) {
    let mut cmd = Command::new("docker-compose");
    cmd.args(["--no-ansi", "-p", project, "-f"]).arg(deploy_dir().join("compose.yaml")).args(["down", "-v", "--remove-orphans", "--timeout", "2"]);
    // The file's variables need values to parse; nothing is started.
    cmd.env("BERTH_IMAGE", "unused").env("BERTH_PORT", "").stdin(Stdio::null());
    let _ = run_timeout(cmd, Duration::from_secs(120));
    let label = format!("label=com.docker.compose.project={project}");
    for (list, rm) in [
        (&["ps", "-aq", "--filter"][..], &["rm", "-f"][..]),
        (&["network", "ls", "-q", "--filter"], &["network", "rm"]),
        (&["volume", "ls", "-q", "--filter"], &["volume", "rm", "-f"]),
    ] {
        let mut args = list.to_vec();
        args.push(&label);
        let ids = docker_ok(&args).unwrap_or_default();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let mut a = rm.to_vec();
            a.push(id);
            let _ = docker(&a);
        }
    }
}

/// Projects of earlier runs of this test whose process is gone (a killed run), found by
/// the project label on their containers, networks and volumes.
fn remove_leftovers() {
    let format = "{{.Label \"com.docker.compose.project\"}}";
    let mut seen = Vec::new();
    for list in [&["ps", "-a"][..], &["network", "ls"], &["volume", "ls"]] {
        let mut args = list.to_vec();
        args.extend(["--filter", "label=com.docker.compose.project", "--format", format]);
        seen.extend(docker_ok(&args).unwrap_or_default().lines().filter(|p| p.starts_with(PROJECT_PREFIX)).map(String::from));
    }
    seen.sort();
    seen.dedup();
    let gone = |pid: &str| pid.parse::<u32>().is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists());
    for project in seen {
        if project[PROJECT_PREFIX.len()..].split('-').next().is_some_and(gone) {
            take_down(&project);
        }
    }
    // Their images, tagged PID-N (after their containers, which held them).
    let tags = docker_ok(&["images", "--filter", &format!("reference={IMAGE}"), "--format", "{{.Tag}}"]).unwrap_or_default();
    for tag in tags.lines().filter(|t| t.split('-').next().is_some_and(gone)) {
        let _ = docker(&["rmi", &format!("{IMAGE}:{tag}")]);
    }
}

/// The host's `berth` against the published port, with a profile `user add` wrote in
/// the coordinator's container.
struct Client {
    profile: PathBuf,
}

impl Client {
    fn berth(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new(bin("berth"));
        cmd.args(args).env("BERTH_PROFILE", &self.profile).env("NO_COLOR", "1").stdin(Stdio::null());
        run_timeout(cmd, Duration::from_secs(60))
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let out = self.berth(args)?;
        if !out.status.success() {
            bail!("berth {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn status(&self, sel: &str) -> Result<Value> {
        self.json(&["status", sel, "--json"])
    }

    fn logs(&self, sel: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["logs", sel];
        all.extend_from_slice(args);
        let out = self.berth(&all)?;
        if !out.status.success() {
            bail!("berth logs {sel} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn workers(&self) -> Vec<Value> {
        self.json(&["workers", "--json"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    }

    fn worker(&self, name: &str) -> Option<Value> {
        self.workers().into_iter().find(|w| w["name"] == name)
    }
}

fn events(st: &Value) -> Vec<Value> {
    st["events"].as_array().cloned().unwrap_or_default()
}

/// What the store recorded of a task, to compare before and after the worker rejoins.
fn recorded(c: &Client, sel: &str) -> Result<(Value, String)> {
    let st = c.status(sel)?;
    let kept = serde_json::json!({
        "state": st["state"], "worker": st["worker"], "attempts": st["attempts"], "exit_code": st["exit_code"], "events": st["events"],
    });
    Ok((kept, c.logs(sel, &[])?))
}

#[test]
fn a_partitioned_worker_loses_its_tasks_to_the_others_and_its_late_results_are_refused() {
    let test = "a_partitioned_worker_loses_its_tasks_to_the_others_and_its_late_results_are_refused";
    if !available(test) || !compose_available(test) {
        return;
    }
    let t0 = Instant::now();
    let cluster = Compose::up(&format!("{}s", TTL.as_secs())).expect("the compose cluster comes up");
    if let Err(e) = partition(&cluster) {
        panic!("{e:?}");
    }
    drop(cluster);
    eprintln!("whole test, teardown included: {:?}", t0.elapsed());
}

fn partition(cluster: &Compose) -> Result<()> {
    let coord = cluster.container("coordinator")?;
    let coord_logs =
        || docker(&["logs", &coord]).map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))).unwrap_or_default();
    wait_until("the coordinator to be ready", Duration::from_secs(30), || coord_logs().contains("ready addr="))?;
    // The published port: 127.0.0.1 only.
    let published = docker_ok(&["port", &coord, "7447/udp"])?;
    let addr = published.lines().next().context("no published port")?.to_string();
    assert!(addr.starts_with("127.0.0.1:"), "the coordinator is published on loopback only: {published}");

    // A profile for the host, written inside the coordinator's container.
    let out = "/var/lib/berth/profiles/alice.toml";
    cluster.compose(&[
        "exec",
        "-T",
        "coordinator",
        "berth-coordinator",
        "user",
        "add",
        "alice",
        "--role",
        "submitter",
        "--data-dir",
        "/var/lib/berth",
        "--coordinator",
        &addr,
        "--server-name",
        "localhost",
        "--out",
        out,
    ])?;
    let profile = cluster.path("alice.toml");
    berth_shared::profile::write_private(&profile, cluster.compose(&["exec", "-T", "coordinator", "cat", out])?.as_bytes())?;
    let c = Client { profile };

    wait_until("the three workers to connect", Duration::from_secs(60), || {
        let ws = c.workers();
        WORKERS.iter().all(|n| ws.iter().any(|w| w["name"] == *n && w["connected"] == true))
    })?;
    let containers: BTreeMap<&str, String> = WORKERS.iter().map(|w| Ok((*w, cluster.container(w)?))).collect::<Result<_>>()?;

    // Six tasks for six slots. Attempt 1 prints, works a while, prints again; a later
    // attempt is quick. Each line says which host ran it.
    let script =
        "echo start $BERTH_ARRAY_INDEX.$BERTH_ATTEMPT on $(hostname); if [ $BERTH_ATTEMPT = 1 ]; then sleep 5; fi; echo done $BERTH_ARRAY_INDEX.$BERTH_ATTEMPT";
    let submitted = c.berth(&["submit", "--array", "1-6", "--cpus", "0.1", "--mem", "16m", "--", "sh", "-c", script])?;
    if !submitted.status.success() {
        bail!("submit failed: {}", String::from_utf8_lossy(&submitted.stderr));
    }
    let job = String::from_utf8(submitted.stdout)?.trim().to_string();
    let task = |i: u32| format!("{job}:{i}");

    // Every task runs, two on each worker; pick one whose attempts have started.
    let mut on: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    wait_until("all six tasks to run, two on each worker", Duration::from_secs(30), || {
        on.clear();
        for i in 1..=6 {
            match c.status(&task(i)) {
                Ok(st) if st["state"] == "running" => on.entry(st["worker"].as_str().unwrap_or_default().to_string()).or_default().push(i),
                _ => return false,
            }
        }
        on.len() == 3 && on.values().all(|t| t.len() == 2)
    })?;
    let victim = WORKERS[0];
    let lost = on.get(victim).cloned().context("the first worker's tasks")?;
    wait_until(&format!("{victim}'s attempts to start"), Duration::from_secs(20), || {
        lost.iter().all(|i| c.logs(&task(*i), &[]).is_ok_and(|l| l.starts_with(&format!("start {i}.1 on {victim}\n"))))
    })?;
    let leases: Vec<String> =
        c.worker(victim).and_then(|w| w["leases"].as_array().cloned()).unwrap_or_default().iter().filter_map(|l| l.as_str().map(String::from)).collect();
    assert_eq!(leases.len(), 2, "{victim} holds a lease per running task");

    // The partition: the victim's container keeps running, off the network.
    let victim_id = &containers[victim];
    let network = docker_ok(&["inspect", "--format", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}\n{{end}}", victim_id])?;
    let network = network.lines().next().context("the victim's network")?.to_string();
    assert!(network.ends_with("_cluster"), "the project's own network, not {network}");
    docker_ok(&["network", "disconnect", &network, victim_id])?;
    let cut = Instant::now();
    eprintln!("{victim} cut off {network} holding tasks {lost:?}");

    // Past the TTL its tasks go back to the queue and finish on the other two workers.
    let finished = (|| -> Result<()> {
        wait_until("every task to succeed", TTL + Duration::from_secs(30), || c.status(&job).is_ok_and(|st| st["state"] == "succeeded"))?;
        // The victim's own attempts end too, while it is still cut off: their results wait
        // on it for a coordinator it cannot reach.
        wait_until(&format!("{victim}'s attempts to end while cut off"), Duration::from_secs(20), || {
            let top = docker_ok(&["top", victim_id]).unwrap_or_default();
            !top.contains("sleep")
        })?;
        Ok(())
    })();
    let partition = cut.elapsed();
    if let Err(e) = finished {
        docker_ok(&["network", "connect", &network, victim_id])?;
        return Err(e);
    }
    assert!(partition > TTL, "the partition outlasted the lease TTL ({partition:?})");

    let st = c.status(&job)?;
    assert_eq!(st["counts"]["succeeded"], 6, "{st}");
    let mut before = BTreeMap::new();
    for i in 1..=6 {
        let sel = task(i);
        let st = c.status(&sel)?;
        assert_eq!(st["state"], "succeeded", "{sel}: {st}");
        assert_eq!(st["exit_code"], 0, "{sel}: {st}");
        let succeeded = events(&st).iter().filter(|e| e["state"] == "succeeded").count();
        assert_eq!(succeeded, 1, "{sel}: one recorded result: {st}");
        let worker = st["worker"].as_str().unwrap_or_default().to_string();
        if lost.contains(&i) {
            assert_eq!(st["attempts"], 2, "{sel}: {st}");
            assert_ne!(worker, victim, "{sel} finished elsewhere: {st}");
            let requeued =
                events(&st).iter().any(|e| e["state"] == "queued" && e["attempt"] == 2 && e["reason"].as_str().is_some_and(|r| r.contains("lease_lost")));
            assert!(requeued, "{sel}: re-queued as attempt 2 once its lease was lost: {st}");
            let ran = events(&st).iter().filter(|e| e["state"] == "running").map(|e| (e["attempt"].clone(), e["worker"].clone())).collect::<Vec<_>>();
            assert_eq!(ran, [(1.into(), victim.into()), (2.into(), worker.as_str().into())], "{sel}: attempt 1 on {victim}, attempt 2 elsewhere: {st}");
            assert_eq!(c.logs(&sel, &[])?, format!("start {i}.2 on {worker}\ndone {i}.2\n"), "{sel}: the recorded output is attempt 2's");
        } else {
            assert_eq!(st["attempts"], 1, "{sel}: {st}");
            assert_eq!(c.logs(&sel, &[])?, format!("start {i}.1 on {worker}\ndone {i}.1\n"), "{sel}");
        }
        before.insert(i, recorded(&c, &sel)?);
    }

    // The victim rejoins with two finished attempts whose leases are gone.
    docker_ok(&["network", "connect", &network, victim_id])?;
    wait_until(&format!("{victim} to reconnect holding nothing"), Duration::from_secs(30), || {
        c.worker(victim).is_some_and(|w| w["connected"] == true && w["running"] == 0 && w["leases"].as_array().is_some_and(Vec::is_empty))
    })?;
    let victim_logs = || docker(&["logs", victim_id]).map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    wait_until("both sides to log each stale lease", Duration::from_secs(10), || {
        let (coordinator, worker) = (coord_logs(), victim_logs());
        leases.iter().all(|l| {
            coordinator.lines().any(|x| x.contains(l.as_str()) && x.contains(&format!("worker={victim}")) && (x.contains("not valid") || x.contains("stale")))
                && worker.lines().any(|x| x.contains(l.as_str()) && (x.contains("no longer knows") || x.contains("stale") || x.contains("rejected")))
        })
    })
    .with_context(|| format!("coordinator:\n{}\n{victim}:\n{}", coord_logs(), victim_logs()))?;
    for line in coord_logs().lines().chain(victim_logs().lines()).filter(|x| leases.iter().any(|l| x.contains(l.as_str())) && x.contains("WARN")) {
        eprintln!("refused: {line}");
    }

    // Nothing it brought changed what was recorded; its attempts' late lines are not kept.
    for i in 1..=6 {
        let sel = task(i);
        assert_eq!(recorded(&c, &sel)?, before[&i], "{sel}: the recorded result is unchanged after {victim} rejoined");
    }
    for i in &lost {
        let sel = task(*i);
        assert_eq!(c.logs(&sel, &["--attempt", "1"])?, format!("start {i}.1 on {victim}\n"), "{sel}: attempt 1's late output was refused");
    }
    // And the victim serves again: six tasks for six free slots, two on each worker.
    let out = c.berth(&["submit", "--wait", "--array", "1-6", "--cpus", "0.1", "--mem", "16m", "--", "sh", "-c", "sleep 1; hostname"])?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let again = c.json(&["list", "--json"])?;
    let newest =
        again.as_array().and_then(|a| a.iter().find(|j| j["id"] != job.as_str())).and_then(|j| j["id"].as_str()).context("the second job")?.to_string();
    let hosts: Vec<String> = (1..=6).map(|i| c.logs(&format!("{newest}:{i}"), &[]).unwrap_or_default()).collect();
    assert!(hosts.iter().any(|h| h.trim() == victim), "{victim} ran some of the second array: {hosts:?}");
    eprintln!("partition held {partition:?}");
    Ok(())
}
