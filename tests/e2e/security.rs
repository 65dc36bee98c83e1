//! Certificates, join tokens, a worker coming back with its work dir; users kept apart
//! (each sees its own jobs, an approver also what waits for approval, an admin all, and
//! nobody but a job's owner sees its env values); and files on the head node and the
//! workers that nobody else can read.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use berth_e2e::raw::Raw;
use berth_e2e::{bin, run_ok, run_timeout, wait_until, Cluster};
use berth_shared::ids::JobSelector;
use berth_shared::profile::Profile;
use berth_shared::wire::{ErrorKind, Request, Response};

#[test]
fn foreign_certificates_are_refused() -> Result<()> {
    let c = Cluster::start()?;
    // Another coordinator's CA issues a user certificate.
    let other = c.path("other");
    run_ok(Command::new(bin("berth-coordinator")).args(["init", "--data-dir"]).arg(&other))?;
    let foreign = c.path("foreign.toml");
    run_ok(
        Command::new(bin("berth-coordinator"))
            .args(["user", "add", "mallory", "--role", "admin", "--coordinator", &c.addr, "--data-dir"])
            .arg(&other)
            .arg("--out")
            .arg(&foreign),
    )?;
    // Trust our coordinator's CA, but present the foreign certificate.
    let mut p = Profile::from_file(&foreign)?;
    p.ca = std::fs::read_to_string(c.data.join("ca.pem"))?;
    p.write(&foreign)?;
    let out = c.berth_as(&foreign, &["list"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("certificate") || err.contains("TLS"), "{err}");
    // Our own user is fine.
    assert!(c.berth(&["list"]).status.success());
    Ok(())
}

#[test]
fn a_join_token_works_once_and_expires() -> Result<()> {
    let mut c = Cluster::start()?;
    let token = c.token()?;
    let mut first = c.worker_cmd("w1", 1, Some(&token));
    let log = std::fs::File::create(c.path("w1.log"))?;
    first.stderr(log);
    let child = first.spawn()?;
    c.workers.push(("w1".into(), berth_e2e::Proc { name: "worker w1".into(), child, log: c.path("w1.log") }));
    c.wait_worker_connected("w1", true)?;
    // The same token for a second worker is refused.
    let second = run_timeout(c.worker_cmd("w2", 1, Some(&token)), Duration::from_secs(30))?;
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already been used"), "{err}");
    assert!(!c.path("w-w2").join("worker.pem").exists());
    // An expired token is refused too.
    let short = String::from_utf8(
        run_ok(Command::new(bin("berth-coordinator")).args(["token", "create", "--role", "worker", "--ttl", "1s", "--data-dir"]).arg(&c.data))?.stdout,
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let late = run_timeout(c.worker_cmd("w3", 1, Some(short.trim())), Duration::from_secs(30))?;
    assert_eq!(late.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&late.stderr).contains("expired"), "{}", String::from_utf8_lossy(&late.stderr));
    // A made-up token is refused.
    let bogus = run_timeout(c.worker_cmd("w4", 1, Some("bjt_0000")), Duration::from_secs(30))?;
    assert_eq!(bogus.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bogus.stderr).contains("not valid"));
    Ok(())
}

#[test]
fn a_restarted_worker_reconnects_without_a_token() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    assert_eq!(c.berth(&["submit", "--wait", "--", "true"]).status.code(), Some(0));
    c.worker("w1").expect("worker").stop(Duration::from_secs(10));
    c.wait_worker_connected("w1", false)?;
    // No token this time: the certificate in the work dir is enough.
    c.add_worker("w1", 1)?;
    let out = c.berth(&["submit", "--wait", "--", "sh", "-c", "echo back"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn a_worker_certificate_from_another_ca_is_refused() -> Result<()> {
    let mut other = Cluster::start()?;
    other.add_worker("w9", 1)?;
    let c = Cluster::start()?;
    // The worker enrolled with `other`; point its work dir at `c`.
    let mut cmd = Command::new(bin("berth-worker"));
    cmd.args(["--coordinator", &c.addr, "--ca"]).arg(c.data.join("ca.pem")).arg("--work-dir").arg(other.path("w-w9")).args(["--slots", "1", "--name", "w9"]);
    other.worker("w9").expect("worker").stop(Duration::from_secs(10));
    let out = run_timeout(cmd, Duration::from_secs(60))?;
    assert_ne!(out.status.code(), Some(0));
    let listed = c.berth_json(&["workers", "--json"])?;
    assert!(listed.as_array().is_some_and(|a| a.is_empty()), "{listed}");
    Ok(())
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// `berth ARGS` must succeed; its stdout.
fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn listed(c: &Cluster, profile: &Path, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["list", "--json"];
    all.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&ok(c.berth_as(profile, &all)))?;
    Ok(v.as_array().map(|a| a.iter().filter_map(|j| j["id"].as_str().map(String::from)).collect()).unwrap_or_default())
}

/// The env of a job as the raw Status reply carries it to `profile`'s user.
fn raw_env(profile: &Path, job: &str) -> Result<Vec<(String, String)>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let raw = Raw::connect(profile).await?;
        let sel = JobSelector { prefix: job.to_string(), index: None };
        match raw.request(&Request::Status { job: sel }).await?.as_slice() {
            [Response::Status(st)] => Ok(st.spec.env.clone()),
            other => Err(anyhow::anyhow!("status {job}: {other:?}")),
        }
    })
}

/// What the raw client gets for one request about a job: its error kind, if any.
fn raw_error(profile: &Path, req: Request) -> Result<Option<ErrorKind>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let raw = Raw::connect(profile).await?;
        let r = raw.request(&req).await?;
        Ok(r.iter().find_map(|r| match r {
            Response::Error(e) => Some(e.kind),
            _ => None,
        }))
    })
}

/// The error a user gets about someone else's job, with its id written as `instead`:
/// the same text as for a job that does not exist.
fn as_if_missing(out: &std::process::Output, job: &str, instead: &str) -> String {
    stderr(out).replace(job, instead)
}

#[test]
fn users_are_kept_apart() -> Result<()> {
    let pools = tempfile::tempdir()?;
    let pools_file = pools.path().join("pools.toml");
    std::fs::write(&pools_file, berth_e2e::APPROVAL_POOLS)?;
    let mut c = Cluster::start_with("30s", &["--pools", pools_file.to_str().expect("utf8")])?;
    let alice = c.profile.clone();
    let (bob, ann, root) = (c.path("bob.toml"), c.path("ann.toml"), c.path("root.toml"));
    c.user("bob", "submitter", &bob)?;
    c.user("ann", "approver", &ann)?;
    c.user("root", "admin", &root)?;
    c.add_worker("w1", 2)?;
    ok(c.berth_as(&root, &["budget", "set", "--account", "alice", "--run", "100", "--month", "100"]));

    // Alice: a running job with a secret in its env, and one waiting for approval.
    let a = c.submit(&["--env", "API_TOKEN=alice-secret", "--", "sh", "-c", "echo alice-out; sleep 300"])?;
    wait_until("alice's job to print", Duration::from_secs(30), || c.berth(&["logs", &a]).stdout == b"alice-out\n")?;
    let big = ["--env", "PENDING_TOKEN=pending-secret", "--cpus", "1", "--max-runtime", "10m", "--attempts", "1", "--pool", "cloud", "--", "true"];
    let p = c.submit(&big)?;
    assert_eq!(c.status(&p)?["state"], "pending_approval");
    // Bob's job is the newest of all.
    let out = c.berth_as(&bob, &["submit", "--wait", "--", "true"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let b = listed(&c, &bob, &[])?.first().cloned().expect("bob lists his job");
    let missing = "01900000-0000-7000-8000-000000000000";

    // Bob sees his own job only; alice's answer as jobs that do not exist (exit 5).
    assert_eq!(listed(&c, &bob, &[])?, vec![b.clone()]);
    assert_eq!(listed(&c, &bob, &["--state", "running"])?, Vec::<String>::new());
    for job in [&a, &p] {
        for args in [vec!["status", job], vec!["logs", job], vec!["logs", "-f", job], vec!["cancel", job], vec!["freeze", job], vec!["resume", job]] {
            let theirs = c.berth_as(&bob, &args);
            let nobodys = c.berth_as(&bob, &args.iter().map(|s| if *s == job.as_str() { missing } else { s }).collect::<Vec<_>>());
            assert_eq!(code(&theirs), Some(5), "bob {args:?}: {}", stderr(&theirs));
            assert_eq!(as_if_missing(&theirs, job, missing), stderr(&nobodys), "bob {args:?} learns nothing a missing job would not say");
        }
        let out = c.berth_as(&bob, &["submit", "--after", job, "--", "true"]);
        assert_eq!(code(&out), Some(5), "bob may not wait for alice's job: {}", stderr(&out));
        assert!(!stderr(&out).contains("alice"), "{}", stderr(&out));
        for req in [
            Request::Watch { job: JobSelector { prefix: job.clone(), index: None }, tasks: false },
            Request::Logs { job: JobSelector { prefix: job.clone(), index: None }, attempt: None, follow: false },
            Request::Cancel { job: JobSelector { prefix: job.clone(), index: None }, reason: None },
        ] {
            assert_eq!(raw_error(&bob, req.clone())?, Some(ErrorKind::NotFound), "bob {req:?}");
        }
    }
    // A prefix alice's and bob's ids share names bob's job alone for bob.
    let shared_prefix: String = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).map(|(x, _)| x).collect();
    assert!(!shared_prefix.is_empty(), "{a} and {b} share a first character (UUIDv7 time)");
    let st: serde_json::Value = serde_json::from_str(&ok(c.berth_as(&bob, &["status", &shared_prefix, "--json"])))?;
    assert_eq!(st["id"], b.as_str(), "{st}");
    assert_eq!(c.status(&a)?["state"], "running", "bob's cancel changed nothing");

    // Alice sees her own, with her env values; paging counts her jobs only.
    assert_eq!(listed(&c, &alice, &[])?, vec![p.clone(), a.clone()]);
    assert_eq!(listed(&c, &alice, &["--limit", "1"])?, vec![p.clone()]);
    assert_eq!(raw_env(&alice, &a)?, vec![("API_TOKEN".to_string(), "alice-secret".to_string())]);
    let out = c.berth(&["status", &b]);
    assert_eq!(code(&out), Some(5), "{}", stderr(&out));

    // Ann, an approver, also sees what waits for approval, with env values masked.
    assert_eq!(listed(&c, &ann, &[])?, vec![p.clone()]);
    let st: serde_json::Value = serde_json::from_str(&ok(c.berth_as(&ann, &["status", &p, "--json"])))?;
    assert_eq!(st["state"], "pending_approval", "{st}");
    let env = raw_env(&ann, &p)?;
    assert_eq!(env.len(), 1, "{env:?}");
    assert_eq!(env[0].0, "PENDING_TOKEN");
    assert!(!env[0].1.contains("pending-secret"), "an approver does not see env values: {env:?}");
    for args in [vec!["status", &a], vec!["logs", &a], vec!["cancel", &a], vec!["approve", &a, "--reason", "probe"]] {
        let out = c.berth_as(&ann, &args);
        assert_eq!(code(&out), Some(5), "ann {args:?}: {}", stderr(&out));
    }

    // Root, an admin, sees everything, env values masked, and may cancel.
    assert_eq!(listed(&c, &root, &[])?, vec![b.clone(), p.clone(), a.clone()]);
    let env = raw_env(&root, &a)?;
    assert_eq!(env.len(), 1, "{env:?}");
    assert_eq!(env[0].0, "API_TOKEN");
    assert!(!env[0].1.contains("alice-secret"), "an admin does not see env values: {env:?}");
    assert_eq!(ok(c.berth_as(&root, &["logs", &a])), "alice-out");
    ok(c.berth_as(&root, &["cancel", &a]));
    c.wait_state(&a, "cancelled", Duration::from_secs(30))?;

    // Once decided, the job no longer waits for approval: ann no longer sees it.
    ok(c.berth_as(&ann, &["reject", &p, "--reason", "too dear"]));
    assert_eq!(c.status(&p)?["state"], "rejected");
    assert_eq!(code(&c.berth_as(&ann, &["status", &p])), Some(5));
    assert_eq!(listed(&c, &ann, &[])?, Vec::<String>::new());
    Ok(())
}

/// What under `root` (itself included) others could read, write or enter: a file with
/// any group or other permission, a directory with any, except those in `traversable`
/// (a worker's work dir and `slots/`, which job users must pass through: 0711 at most).
fn loose(root: &Path, traversable: &[std::path::PathBuf]) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            continue;
        }
        let allowed = if meta.is_dir() && traversable.contains(&p) { 0o011 } else { 0 };
        if mode & 0o077 & !allowed != 0 {
            out.push(format!("{} is {mode:o}", p.display()));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(out)
}

#[test]
fn the_head_nodes_and_workers_files_are_private() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 2)?;
    // Output large enough to go to segment files, and a job still running (its spool
    // and workspace exist) with a secret in its env.
    let big = "head -c 1048576 /dev/zero | tr '\\0' a; echo";
    let out = c.berth(&["submit", "--wait", "--env", "API_TOKEN=s3cret", "--", "sh", "-c", big]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let id = c.submit(&["--env", "API_TOKEN=s3cret", "--", "sh", "-c", "echo up > out.txt; echo up; sleep 300"])?;
    wait_until("the job to print", Duration::from_secs(30), || c.berth(&["logs", &id]).stdout == b"up\n")?;

    let segments = c.data.join("berth-output");
    assert!(std::fs::read_dir(&segments)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "seg")), "segment files exist");
    for f in ["berth.db", "berth.db-wal", "berth-output.db", "ca.key", "ca.pem", "server.key", "server.pem", "coordinator.addr"] {
        assert!(c.data.join(f).exists(), "{f} is there to be checked");
    }
    assert_eq!(loose(&c.data, &[])?, Vec::<String>::new(), "the coordinator's data dir is its user's alone");
    let work = c.path("w-w1");
    assert!(work.join("slots").is_dir());
    assert_eq!(loose(&work, &[work.clone(), work.join("slots")])?, Vec::<String>::new(), "the worker's work dir is its user's alone");
    Ok(())
}

#[test]
fn a_data_dir_from_an_older_version_is_tightened() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    let out = c.berth(&["submit", "--wait", "--env", "API_TOKEN=s3cret", "--", "sh", "-c", "head -c 100000 /dev/zero | tr '\\0' a"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let id = c.berth_json(&["list", "--json"])?[0]["id"].as_str().map(String::from).expect("the job is listed");
    if let Some(mut coord) = c.coord.take() {
        coord.stop(Duration::from_secs(10));
    }
    // What an older version left: a world-readable directory and files.
    let segments = c.data.join("berth-output");
    let mut loosened = 0;
    for dir in [&c.data, &segments] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_file() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
                loosened += 1;
            }
        }
    }
    assert!(loosened >= 5, "{loosened} files loosened");
    assert_ne!(loose(&c.data, &[])?, Vec::<String>::new());

    c.restart_coordinator()?;
    assert_eq!(loose(&c.data, &[])?, Vec::<String>::new(), "a start tightens the data dir");
    let log = c.logs_of("coordinator");
    let said: Vec<&str> = log.lines().filter(|l| l.contains("tightened permissions")).collect();
    assert!(said.iter().any(|l| l.contains("berth.db") && l.contains("644") && l.contains("600")), "each change is logged: {said:?}");
    assert!(said.iter().any(|l| l.contains("755") && l.contains("700")), "{said:?}");
    // And the data is all there.
    assert_eq!(c.status(&id)?["state"], "succeeded");
    assert_eq!(c.berth(&["logs", &id]).stdout.len(), 100_000);
    Ok(())
}
