//! Docker sessions end to end, against the real engine: one container held for a
//! session's life with berth's agent as its entrypoint; execs with their exit codes and
//! streams apart, stdin, env and --cwd; files kept in /workspace across execs; an exec
//! timeout killing that exec's tree and nothing else; close removing the container; a
//! killed worker's session container swept when it returns; freeze and a session opened
//! from the frozen image; the round trip of `true` over the agent's socket and through
//! `berth exec`; packed containers shared by one owner's sessions, a neighbour closed
//! while the other runs on; warm pools. Under `CI=true` they run (an engine that does not answer is a
//! failure); elsewhere, without an engine, each prints a skip line.
//!
//! Everything these tests make in the engine carries a label (`berth.test=1` through
//! the test image, berth's own labels on berth's containers) and only that is removed.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use berth_e2e::docker::{available, containers_with, docker_ok, test_image, TestImage};
use berth_e2e::{bin, run_timeout, wait_until, Cluster};
use serde_json::Value;

const DOCKER: &[&str] = &["--executor", "process,docker"];

/// The test image and a cluster with one worker `w1` offering both executors (bound in
/// this order, so the cluster stops before the image is let go).
fn docker_cluster(test: &str, ttl: &str) -> Option<(TestImage, Cluster)> {
    if !available(test) {
        return None;
    }
    let image = test_image().expect("the test image is made");
    let mut c = Cluster::start_with_ttl(ttl).expect("the cluster starts");
    c.spawn_worker_with("w1", 4, DOCKER).expect("w1 starts");
    c.wait_worker_connected("w1", true).expect("w1 connects");
    Some((image, c))
}

fn check(c: &Cluster, r: Result<()>) {
    if let Err(e) = r {
        let _ = c;
        panic!("{e:?}");
    }
}

/// `berth session open ARGS`: the session id.
fn open(c: &Cluster, args: &[&str]) -> Result<String> {
    let mut all = vec!["session", "open"];
    all.extend_from_slice(args);
    let out = c.berth(&all);
    if !out.status.success() {
        bail!("session open failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let sid = String::from_utf8(out.stdout)?.trim().to_string();
    // Open answers once the worker said the container is ready: the first exec runs.
    let (code, _, err) = exec(c, &sid, &["true"])?;
    ensure!(code == 0, "the first exec after open: exit {code}: {err}");
    Ok(sid)
}

/// `berth exec SID [FLAGS] -- CMD`, with `input` on stdin: (exit code, stdout, stderr).
fn exec_in(c: &Cluster, sid: &str, flags: &[&str], cmd: &[&str], input: Option<&[u8]>) -> Result<(i32, String, String)> {
    let mut command = Command::new(bin("berth"));
    command.arg("exec").arg(sid).args(flags).arg("--").args(cmd).env("BERTH_PROFILE", &c.profile).env("NO_COLOR", "1");
    command.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn()?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

fn exec(c: &Cluster, sid: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
    exec_in(c, sid, &[], cmd, None)
}

fn sh(c: &Cluster, sid: &str, script: &str) -> Result<String> {
    let (code, out, err) = exec(c, sid, &["sh", "-c", script])?;
    if code != 0 {
        bail!("`{script}` exited {code}: {err}");
    }
    Ok(out)
}

fn session_containers(sid: &str) -> Vec<String> {
    containers_with(&format!("berth.job={sid}")).unwrap_or_default()
}

fn inspect(id: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(&docker_ok(&["inspect", id])?)?;
    v.as_array().and_then(|a| a.first().cloned()).context("docker inspect answered no object")
}

/// The one running container of a session.
fn the_container(sid: &str) -> Result<Value> {
    let mut ids = Vec::new();
    wait_until("the session's container to run", Duration::from_secs(30), || {
        ids = session_containers(sid);
        ids.len() == 1 && inspect(&ids[0]).is_ok_and(|i| i["State"]["Running"] == true)
    })?;
    inspect(&ids[0])
}

fn close(c: &Cluster, sid: &str) -> Result<()> {
    let out = c.berth(&["session", "close", sid]);
    if !out.status.success() {
        bail!("session close failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn percentile(times: &mut [Duration], p: usize) -> Duration {
    times.sort();
    times[(times.len() * p / 100).min(times.len() - 1)]
}

#[test]
fn a_docker_session_holds_one_container_for_its_execs() {
    let Some((img, c)) = docker_cluster("a_docker_session_holds_one_container_for_its_execs", "30s") else { return };
    let r = (|| -> Result<()> {
        let sid = open(&c, &["--image", &img.name, "--cpus", "0.5", "--mem", "64m", "--env", "GREETING=hi", "--max-lifetime", "10m"])?;
        let info = the_container(&sid)?;
        let labels = &info["Config"]["Labels"];
        assert_eq!((labels["berth.managed"].as_str(), labels["berth.worker"].as_str()), (Some("1"), Some("w1")), "{labels}");
        assert_eq!(labels["berth.role"], "session", "{labels}");
        let lease = labels["berth.lease"].as_str().context("a lease label")?.to_string();
        let expires: u64 = labels["berth.expires"].as_str().unwrap_or("0").parse()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        assert!(expires > now + 500 && expires < now + 700, "open + 10m + grace: {expires} vs now {now}");
        let host = &info["HostConfig"];
        assert_eq!(
            (host["NanoCpus"].as_i64(), host["Memory"].as_i64(), host["NetworkMode"].as_str()),
            (Some(500_000_000), Some(64 << 20), Some("none")),
            "{host}"
        );
        let binds = host["Binds"].to_string();
        assert!(binds.contains(":/workspace\"") && binds.contains(":/.berth/run\"") && binds.contains("/.berth/bin/berth-worker:ro"), "{binds}");
        let id = info["Id"].as_str().context("an id")?.to_string();

        // Exit codes and the streams apart; the session's env and the exec's.
        let (code, out, err) = exec_in(&c, &sid, &["--env", "EXTRA=x"], &["sh", "-c", "echo $GREETING $EXTRA; echo oops >&2; exit 3"], None)?;
        assert_eq!((code, out.as_str(), err.as_str()), (3, "hi x\n", "oops\n"));
        // The image's own env stays (PATH=/bin); HOME has a default.
        assert_eq!(sh(&c, &sid, "echo $PATH $HOME; pwd")?, "/bin /root\n/workspace\n");
        // Files persist across execs, in /workspace and outside it; --cwd is inside.
        sh(&c, &sid, "mkdir -p sub && echo state > sub/f && echo data > /root/g")?;
        assert_eq!(exec_in(&c, &sid, &["--cwd", "sub"], &["sh", "-c", "pwd; cat f /root/g"], None)?.1, "/workspace/sub\nstate\ndata\n");
        // stdin.
        assert_eq!(exec_in(&c, &sid, &["-i"], &["sh", "-c", "cat; echo end"], Some(b"piped\n"))?.1, "piped\nend\n");
        // A missing command is 127.
        assert_eq!(exec(&c, &sid, &["no-such-command"])?.0, 127);
        let now = session_containers(&sid);
        assert!(now.len() == 1 && id.starts_with(&now[0]), "one container all along: {now:?} vs {id}");

        // The agent's part of an exec: 200 `true`s on its socket, as the worker sends them.
        let socket = c.path("w-w1").join("containers").join(&lease).join("agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut times = rt.block_on(agent_round_trips(socket, 200))?;
        let p50 = percentile(&mut times, 50);
        eprintln!("agent socket round trip of `true` (n=200): p50 {p50:?}, p90 {:?}, max {:?}", percentile(&mut times, 90), percentile(&mut times, 100));
        // The floor: what one fork and exec of `true` costs in this container, timed inside.
        let (_, _, floor) = exec(&c, &sid, &["sh", "-c", "time sh -c 'for i in $(seq 200); do /bin/true; done'"])?;
        eprintln!("200 fork+exec of /bin/true by a shell in the container: {}", floor.lines().next().unwrap_or("").trim());
        // And through berth: client, coordinator, worker, agent and back.
        let mut times = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            assert_eq!(exec(&c, &sid, &["true"])?.0, 0);
            times.push(t.elapsed());
        }
        eprintln!("`berth exec SID -- true` in a Docker session (n=30, a client process each): p50 {:?}", percentile(&mut times, 50));
        // The same through a process session, for comparison: what is not the container's.
        let psid = open(&c, &[])?;
        let mut times = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            assert_eq!(exec(&c, &psid, &["true"])?.0, 0);
            times.push(t.elapsed());
        }
        eprintln!("`berth exec SID -- true` in a process session (n=30): p50 {:?}", percentile(&mut times, 50));
        close(&c, &psid)?;

        let dir = c.path("w-w1").join("containers").join(&lease);
        assert!(dir.is_dir());
        let t = Instant::now();
        close(&c, &sid)?;
        wait_until("the session's container to be gone", Duration::from_secs(10), || session_containers(&sid).is_empty())?;
        eprintln!("close to container gone: {:?}", t.elapsed());
        wait_until("the session's directory to be gone", Duration::from_secs(10), || !dir.exists())?;
        let (code, _, err) = exec(&c, &sid, &["true"])?;
        assert_ne!(code, 0, "a closed session runs nothing: {err}");
        Ok(())
    })();
    check(&c, r);
}

async fn agent_round_trips(socket: PathBuf, n: usize) -> Result<Vec<Duration>> {
    use berth_worker::agent::proto::Request;
    let req = Request {
        argv: vec!["true".into()],
        env: Vec::new(),
        cwd: "/workspace".into(),
        stdin: false,
        timeout_ms: None,
        grace_ms: 2000,
        member: None,
        kill_member: false,
    };
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let exit = berth_worker::agent::call(&socket, &req, rx, |_, _| {}).await?;
        anyhow::ensure!(exit.code == Some(0), "{exit:?}");
        times.push(t.elapsed());
    }
    Ok(times)
}

#[test]
fn an_exec_timeout_kills_that_exec_and_nothing_else() {
    let Some((img, c)) = docker_cluster("an_exec_timeout_kills_that_exec_and_nothing_else", "30s") else { return };
    let r = (|| -> Result<()> {
        let sid = open(&c, &["--image", &img.name])?;
        // A neighbour: a detached exec that runs on.
        let (code, out, err) = exec_in(&c, &sid, &["--detach"], &["sleep", "1000"], None)?;
        assert_eq!(code, 0, "{err}");
        assert!(out.trim().parse::<u32>().is_ok(), "the exec's number: {out}");
        wait_until("the neighbour to run", Duration::from_secs(10), || sh(&c, &sid, "ps").is_ok_and(|p| p.contains("sleep 1000")))?;
        let t = Instant::now();
        // Its tree: a child in the background, one in a session of its own.
        let (code, _, err) = exec_in(&c, &sid, &["--timeout", "1s"], &["sh", "-c", "sleep 1001 & setsid sleep 1002 & sleep 1003"], None)?;
        assert_eq!(code, 124, "{err}");
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        let ps = sh(&c, &sid, "ps")?;
        assert!(ps.contains("sleep 1000"), "the neighbour lives on:\n{ps}");
        for gone in ["sleep 1001", "sleep 1002", "sleep 1003"] {
            assert!(!ps.contains(gone), "{gone} went with its exec:\n{ps}");
        }
        // No zombie is left for PID 1 (the agent reaps them).
        assert!(!ps.lines().any(|l| l.contains(" Z ")), "{ps}");
        let st = c.berth_json(&["session", "status", &sid, "--json"])?;
        let execs = st["execs"].as_array().cloned().unwrap_or_default();
        assert!(execs.iter().any(|e| e["timed_out"] == true), "{st}");
        close(&c, &sid)?;
        wait_until("the session's container to be gone", Duration::from_secs(10), || session_containers(&sid).is_empty())?;
        Ok(())
    })();
    check(&c, r);
}

#[test]
fn a_killed_workers_session_container_is_swept_when_it_returns() {
    let Some((img, mut c)) = docker_cluster("a_killed_workers_session_container_is_swept_when_it_returns", "2s") else { return };
    let r = (|| -> Result<()> {
        let sid = open(&c, &["--image", &img.name])?;
        sh(&c, &sid, "echo x > /workspace/f")?;
        let id = the_container(&sid)?["Id"].as_str().context("an id")?.to_string();
        c.worker("w1").context("w1")?.kill9();
        assert!(inspect(&id).is_ok_and(|i| i["State"]["Running"] == true), "the container outlives its worker");
        c.spawn_worker_with("w1", 4, DOCKER)?;
        wait_until("w1 to sweep the session's container", Duration::from_secs(30), || inspect(&id).is_err())?;
        c.wait_worker_connected("w1", true)?;
        wait_until("the session to end", Duration::from_secs(30), || {
            c.berth_json(&["session", "status", &sid, "--json"]).is_ok_and(|s| s["state"] != "ready" && s["state"] != "executing")
        })?;
        Ok(())
    })();
    check(&c, r);
}

#[test]
fn a_frozen_session_opens_again_from_its_image() {
    let Some((img, c)) = docker_cluster("a_frozen_session_opens_again_from_its_image", "30s") else { return };
    let tag = format!("e2e-session-{}", std::process::id());
    let frozen = format!("berth-frozen:{tag}");
    let r = (|| -> Result<()> {
        let sid = open(&c, &["--image", &img.name])?;
        sh(&c, &sid, "echo state > /workspace/f; echo data > /root/g")?;
        let out = c.berth(&["freeze", &sid, "--tag", &tag]);
        assert!(out.status.success(), "freeze: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout)?.trim(), frozen);
        wait_until("the session's container to be gone", Duration::from_secs(10), || session_containers(&sid).is_empty())?;
        let info = inspect(&frozen)?;
        // berth's agent is not the image's entrypoint: the image's own command is back.
        let ep = info["Config"]["Entrypoint"].to_string();
        assert!(!ep.contains(".berth"), "{ep}");
        assert_eq!(info["Config"]["Cmd"], serde_json::json!(["/bin/sh"]), "{info}");

        let again = open(&c, &["--image", &frozen])?;
        assert_eq!(sh(&c, &again, "cat /workspace/f /root/g")?, "state\ndata\n");
        close(&c, &again)?;
        wait_until("the second session's container to be gone", Duration::from_secs(10), || session_containers(&again).is_empty())?;
        // A job runs from the frozen image too (its entrypoint is not the agent's).
        let out = c.berth(&["submit", "--wait", "--image", &frozen, "--", "cat", "/root/g"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    })();
    let mut rm = Command::new("docker");
    rm.args(["rmi", &frozen]);
    let _ = run_timeout(rm, Duration::from_secs(60));
    check(&c, r);
}

/// The containers the worker keeps outside attempts (`pack-…`, `warm-…` records in its
/// `containers/`), as their names.
fn kept(c: &Cluster, prefix: &str) -> Vec<String> {
    let dir = c.path("w-w1").join("containers");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().filter(|n| n.starts_with(prefix)).map(|n| format!("berth-{n}"))).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn running(name: &str) -> bool {
    inspect(name).is_ok_and(|i| i["State"]["Running"] == true)
}

#[test]
fn packed_sessions_share_a_container_and_one_closing_leaves_its_neighbour_running() {
    let test = "packed_sessions_share_a_container_and_one_closing_leaves_its_neighbour_running";
    if !available(test) {
        return;
    }
    let img = test_image().expect("the test image is made");
    let mut c = Cluster::start_with_ttl("30s").expect("the cluster starts");
    c.spawn_worker_with("w1", 4, &["--executor", "process,docker", "--docker-pack", "3"]).expect("w1 starts");
    c.wait_worker_connected("w1", true).expect("w1 connects");
    let r = (|| -> Result<()> {
        let a = open(&c, &["--image", &img.name, "--cpus", "0.5", "--mem", "64m"])?;
        let b = open(&c, &["--image", &img.name, "--cpus", "0.5", "--mem", "64m"])?;
        let packs = kept(&c, "pack-");
        ensure!(packs.len() == 1, "one packed container for both: {packs:?}");
        let pack = packs[0].clone();
        // Packed sessions have no container of their own.
        ensure!(session_containers(&a).is_empty() && session_containers(&b).is_empty(), "no container of their own");
        let info = inspect(&pack)?;
        assert_eq!(info["Config"]["Labels"]["berth.role"], "pack", "{}", info["Config"]["Labels"]);
        wait_until("the pack's limits to be both sessions'", Duration::from_secs(10), || {
            inspect(&pack).is_ok_and(|i| i["HostConfig"]["NanoCpus"].as_i64() == Some(1_000_000_000) && i["HostConfig"]["Memory"].as_i64() == Some(128 << 20))
        })?;
        // Each in a workspace of its own, as BERTH_WORKSPACE says.
        let wa = sh(&c, &a, "pwd; echo $BERTH_WORKSPACE")?;
        let wb = sh(&c, &b, "pwd; echo $BERTH_WORKSPACE")?;
        let (pa, pb) = (wa.lines().next().unwrap_or("").to_string(), wb.lines().next().unwrap_or("").to_string());
        ensure!(pa.starts_with("/workspaces/") && pb.starts_with("/workspaces/") && pa != pb, "{wa:?} {wb:?}");
        ensure!(wa.lines().nth(1) == Some(pa.as_str()) && wb.lines().nth(1) == Some(pb.as_str()), "{wa:?} {wb:?}");
        sh(&c, &a, "echo mine > f")?;
        assert_eq!(sh(&c, &b, "ls")?, "", "b's workspace is its own");
        // Copies go to the session's own workspace.
        let src = c.path("packed-in.txt");
        std::fs::write(&src, "copied\n")?;
        let out = c.berth(&["cp", &src.to_string_lossy(), &format!("{b}:in.txt")]);
        ensure!(out.status.success(), "cp: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sh(&c, &b, "cat in.txt")?, "copied\n");
        // Each runs something in the background, one of them out of its group.
        for (sid, what) in [(&a, "setsid sleep 2001 & sleep 2003"), (&b, "sleep 2002")] {
            let (code, _, err) = exec_in(&c, sid, &["--detach"], &["sh", "-c", what], None)?;
            ensure!(code == 0, "{err}");
        }
        wait_until("both to run", Duration::from_secs(10), || sh(&c, &b, "ps").is_ok_and(|p| p.contains("sleep 2001") && p.contains("sleep 2002")))?;

        // Another user's session of the same image is not packed with theirs: it gets a
        // packed container of its own.
        let bob = c.path("bob.toml");
        c.user("bob", "submitter", &bob)?;
        let out = c.berth_as(&bob, &["session", "open", "--image", &img.name]);
        ensure!(out.status.success(), "bob's open: {}", String::from_utf8_lossy(&out.stderr));
        let bobs = String::from_utf8(out.stdout)?.trim().to_string();
        let both = kept(&c, "pack-");
        ensure!(both.len() == 2 && both.contains(&pack), "bob's pack is another: {both:?}");
        let out = c.berth_as(&bob, &["session", "close", &bobs]);
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        wait_until("bob's pack to be gone", Duration::from_secs(15), || kept(&c, "pack-") == packs)?;

        // a closes: its processes end, b's run on, and so does the container.
        close(&c, &a)?;
        wait_until("a's processes to end", Duration::from_secs(15), || sh(&c, &b, "ps").is_ok_and(|p| !p.contains("sleep 2001") && !p.contains("sleep 2003")))?;
        let ps = sh(&c, &b, "ps")?;
        assert!(ps.contains("sleep 2002"), "the neighbour runs on:\n{ps}");
        assert!(running(&pack));
        assert_eq!(sh(&c, &b, "cat in.txt")?, "copied\n");
        wait_until("the pack's limits to be b's alone", Duration::from_secs(10), || {
            inspect(&pack).is_ok_and(|i| i["HostConfig"]["NanoCpus"].as_i64() == Some(500_000_000))
        })?;
        // A freeze of a packed session fails with the reason (and ends it).
        let out = c.berth(&["freeze", &b, "--tag", &format!("e2e-packed-{}", std::process::id())]);
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && err.contains("packed"), "freeze of a packed session: {} {err}", out.status);
        wait_until("the packed container to be gone with its last session", Duration::from_secs(15), || {
            inspect(&pack).is_err() && kept(&c, "pack-").is_empty()
        })?;
        let packs_dir = c.path("w-w1").join("packs");
        wait_until("the packed workspaces to be gone", Duration::from_secs(10), || std::fs::read_dir(&packs_dir).is_ok_and(|mut d| d.next().is_none()))?;
        Ok(())
    })();
    check(&c, r);
    drop(c);
    drop(img);
}

#[test]
fn a_warm_pool_opens_sessions_in_containers_already_started() {
    let test = "a_warm_pool_opens_sessions_in_containers_already_started";
    if !available(test) {
        return;
    }
    let img = test_image().expect("the test image is made");
    let mut c = Cluster::start_with_ttl("30s").expect("the cluster starts");
    let warm = format!("{}=2", img.name);
    c.spawn_worker_with("w1", 4, &["--executor", "process,docker", "--warm", &warm]).expect("w1 starts");
    c.wait_worker_connected("w1", true).expect("w1 connects");
    let r = (|| -> Result<()> {
        let ready = |c: &Cluster| {
            kept(c, "warm-").into_iter().filter(|n| c.path("w-w1").join("containers").join(&n["berth-".len()..]).join("agent.sock").exists()).count()
        };
        wait_until("two warm containers", Duration::from_secs(30), || ready(&c) == 2)?;
        let before = kept(&c, "warm-");
        let t = Instant::now();
        let out = c.berth(&["session", "open", "--image", &img.name, "--cpus", "0.5", "--mem", "64m"]);
        let took = t.elapsed();
        ensure!(out.status.success(), "open: {}", String::from_utf8_lossy(&out.stderr));
        let sid = String::from_utf8(out.stdout)?.trim().to_string();
        eprintln!("`berth session open` from the warm pool: {took:?} (a client process included)");
        // It runs in one of the warm containers: no container of its own was made.
        let host = sh(&c, &sid, "hostname")?.trim().to_string();
        let taken: Vec<&String> = before.iter().filter(|n| inspect(n).is_ok_and(|i| i["Id"].as_str().is_some_and(|id| id.starts_with(&host)))).collect();
        ensure!(taken.len() == 1, "the session's container {host} is one of the warm ones {before:?}");
        ensure!(session_containers(&sid).is_empty(), "no container made for it");
        // The session's limits hold from its first exec (set in the container's cgroup),
        // and the engine's record follows.
        let mem = sh(&c, &sid, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max")?;
        assert_eq!(mem.trim(), (64u64 << 20).to_string(), "the session's memory limit inside its container");
        wait_until("the engine to record the session's limits", Duration::from_secs(10), || {
            inspect(taken[0]).is_ok_and(|i| i["HostConfig"]["NanoCpus"].as_i64() == Some(500_000_000) && i["HostConfig"]["Memory"].as_i64() == Some(64 << 20))
        })?;
        assert_eq!(sh(&c, &sid, "pwd; echo $BERTH_WORKSPACE; echo x > f; cat f")?, "/workspace\n/workspace\nx\n");
        // Its workspace is the slot's: copies reach it.
        let src = c.path("warm-in.txt");
        std::fs::write(&src, "copied\n")?;
        let out = c.berth(&["cp", &src.to_string_lossy(), &format!("{sid}:in.txt")]);
        ensure!(out.status.success(), "cp: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sh(&c, &sid, "cat in.txt")?, "copied\n");
        // The pool refills in the background.
        wait_until("the pool to be refilled", Duration::from_secs(30), || ready(&c) == 3)?;
        let name = taken[0].clone();
        close(&c, &sid)?;
        wait_until("the session's container to be gone", Duration::from_secs(15), || inspect(&name).is_err())?;
        // A stopping worker removes its idle warm containers.
        let idle = kept(&c, "warm-");
        ensure!(idle.len() == 2, "{idle:?}");
        c.worker("w1").context("w1")?.stop(Duration::from_secs(20));
        for n in &idle {
            ensure!(inspect(n).is_err(), "warm container {n} outlived its worker");
        }
        Ok(())
    })();
    check(&c, r);
    drop(c);
    drop(img);
}

#[test]
fn berth_dev_offers_docker_sessions_when_asked() {
    let test = "berth_dev_offers_docker_sessions_when_asked";
    if !available(test) {
        return;
    }
    let img = test_image().expect("the test image is made");
    let dir = tempfile::tempdir().expect("a temp dir");
    let r = (|| -> Result<()> {
        let mut cmd = Command::new(bin("berth"));
        cmd.args(["dev", "--slots", "2", "--executor", "process,docker", "--data-dir"]).arg(dir.path().join("dev"));
        let (mut dev, profile) = berth_e2e::spawn_ready("berth dev", cmd, &dir.path().join("dev.log"), "ready profile=", Duration::from_secs(60))?;
        let berth = |args: &[&str]| -> Result<std::process::Output> {
            let mut c = Command::new(bin("berth"));
            c.args(args).env("BERTH_PROFILE", &profile).env("NO_COLOR", "1");
            run_timeout(c, Duration::from_secs(60))
        };
        let out = berth(&["session", "open", "--image", &img.name])?;
        ensure!(out.status.success(), "open: {}", String::from_utf8_lossy(&out.stderr));
        let sid = String::from_utf8(out.stdout)?.trim().to_string();
        let out = berth(&["exec", &sid, "--", "sh", "-c", "pwd; cat /etc/hostname >/dev/null && echo in-a-container"])?;
        assert_eq!(String::from_utf8(out.stdout)?, "/workspace\nin-a-container\n", "{}", String::from_utf8_lossy(&out.stderr));
        ensure!(session_containers(&sid).len() == 1, "one container for the session");
        ensure!(berth(&["session", "close", &sid])?.status.success());
        wait_until("the session's container to be gone", Duration::from_secs(15), || session_containers(&sid).is_empty())?;
        dev.signal(nix::sys::signal::Signal::SIGINT);
        dev.wait_exit(Duration::from_secs(20))?;
        Ok(())
    })();
    drop(img);
    if let Err(e) = r {
        panic!("{e:?}");
    }
}
