//! One identity, one worker: two workers that would share a name (both unnamed on one
//! host, or a work dir copied to a second machine) must not evict each other and burn
//! their tasks' attempts. A name a live worker holds is refused at enrolment; a second
//! process presenting the same certificate waits while the first lives and takes over
//! only once it is gone; a name enrolled again leaves the old certificate refused.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use berth_e2e::{bin, wait_until, Cluster, Proc};
use serde_json::Value;

/// A `berth-worker` in `work_dir`, named `name` (none: the host name, its default),
/// logging to `log` in the cluster's directory.
fn worker(c: &Cluster, work_dir: &Path, name: Option<&str>, token: Option<&str>, log: &str) -> Result<Proc> {
    let mut cmd = Command::new(bin("berth-worker"));
    cmd.args(["--coordinator", &c.addr, "--ca"]).arg(c.data.join("ca.pem")).arg("--work-dir").arg(work_dir).args(["--slots", "2"]);
    if let Some(n) = name {
        cmd.args(["--name", n]);
    }
    if let Some(t) = token {
        cmd.args(["--join-token", t]);
    }
    let log = c.path(log);
    cmd.env("BERTH_LOG", "info,berth_worker=debug").env("NO_COLOR", "1");
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).stdin(Stdio::null());
    let child = cmd.spawn()?;
    Ok(Proc { name: format!("worker in {}", work_dir.display()), child, log })
}

fn workers(c: &Cluster) -> Vec<Value> {
    c.berth_json(&["workers", "--json"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// How many times the coordinator registered worker `name`'s connection.
fn connections(c: &Cluster, name: &str) -> usize {
    c.logs_of("coordinator").lines().filter(|l| l.contains("worker connected") && l.contains(&format!("worker={name}"))).count()
}

/// Submits an array of `n` short tasks with two attempts each and checks that every
/// task succeeded on its first attempt, on worker `name`.
fn array_runs_once_each(c: &Cluster, n: u32, name: &str) -> Result<()> {
    let id = c.submit(&["--array", &format!("1-{n}"), "--attempts", "2", "--", "sh", "-c", "sleep 0.2; echo ran $BERTH_ARRAY_INDEX"])?;
    let st = c.wait_state(&id, "succeeded", Duration::from_secs(90))?;
    assert_eq!(st["counts"]["succeeded"], n, "{st}");
    for i in 1..=n {
        let t = c.status(&format!("{id}:{i}"))?;
        assert_eq!(t["attempts"], 1, "task {i} ran once, no attempt burned: {t}");
        assert_eq!(t["worker"], name, "{t}");
    }
    Ok(())
}

#[test]
fn a_second_unnamed_worker_on_one_host_is_refused_at_enrolment_and_the_first_keeps_its_tasks() -> Result<()> {
    let c = Cluster::start()?;
    let mut first = worker(&c, &c.path("w-first"), None, Some(&c.token()?), "worker-first.log")?;
    wait_until("the first worker to connect", Duration::from_secs(30), || workers(&c).iter().any(|w| w["connected"] == true))?;
    let name = workers(&c)[0]["name"].as_str().context("a name")?.to_string();

    // The second one, unnamed too, gets the host name as well: refused with the reason,
    // at once and for good (a token is one enrolment: no retry loop).
    let token = c.token()?;
    let mut second = worker(&c, &c.path("w-second"), None, Some(&token), "worker-second.log")?;
    let status = second.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success(), "the second worker stops: {status}");
    let said = second.log_text();
    assert!(said.contains(&format!("worker name {name} is in use by another worker")) && said.contains("--name"), "{said}");
    assert!(!c.path("w-second").join("worker.pem").exists(), "no certificate was issued to it");

    // The first keeps its name and runs everything, each task once.
    array_runs_once_each(&c, 20, &name)?;
    assert_eq!(connections(&c, &name), 1, "the first worker's connection was never replaced");
    assert!(first.child.try_wait()?.is_none(), "the first worker runs on");

    // The refused token was not spent: with a name of its own the second one enrols.
    let mut named = worker(&c, &c.path("w-second"), Some("second"), Some(&token), "worker-second-named.log")?;
    c.wait_worker_connected("second", true)?;
    named.stop(Duration::from_secs(10));
    first.stop(Duration::from_secs(10));
    Ok(())
}

#[test]
fn two_processes_with_one_certificate_do_not_evict_each_other() -> Result<()> {
    let mut c = Cluster::start_with_ttl("4s")?;
    c.add_worker("w1", 2)?;
    // A copy of the work dir (a cloned machine): the same certificate and key.
    let copy = c.path("w-w1-copy");
    std::fs::create_dir(&copy)?;
    for f in ["worker.pem", "worker.key"] {
        std::fs::copy(c.path("w-w1").join(f), copy.join(f))?;
    }
    let mut clone = worker(&c, &copy, Some("w1"), None, "worker-clone.log")?;
    wait_until("the clone to be told the name is in use", Duration::from_secs(20), || clone.log_text().contains("refused this process for now"))?;
    assert!(clone.log_text().contains("presenting the same certificate"), "{}", clone.log_text());

    array_runs_once_each(&c, 20, "w1")?;
    assert_eq!(connections(&c, "w1"), 1, "the live worker was never evicted:\n{}", c.logs_of("coordinator"));
    assert!(clone.child.try_wait()?.is_none(), "the clone waits, it does not give up");

    // Once the first is gone (killed: its connection stays open on the coordinator until
    // it idles out), the clone takes over within a few seconds and runs the work.
    c.worker("w1").context("w1")?.kill9();
    wait_until("the clone to take over", Duration::from_secs(30), || connections(&c, "w1") == 2)?;
    let out = c.berth(&["submit", "--wait", "--", "sh", "-c", "echo on the clone"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    clone.stop(Duration::from_secs(10));
    Ok(())
}

#[test]
fn a_name_enrolled_again_after_its_worker_left_refuses_the_old_certificate() -> Result<()> {
    let mut c = Cluster::start_with_ttl("1s")?;
    c.add_worker("w1", 1)?;
    c.worker("w1").context("w1")?.stop(Duration::from_secs(10));
    c.wait_worker_connected("w1", false)?;
    // Gone for longer than the TTL: the name may be enrolled again, by a new machine.
    let fresh = c.path("w-new");
    let mut new = None;
    wait_until("the name to be free", Duration::from_secs(20), || {
        let Ok(token) = c.token() else { return false };
        let Ok(mut p) = worker(&c, &fresh, Some("w1"), Some(&token), "worker-new.log") else { return false };
        let quit = p.wait_exit(Duration::from_secs(3)).is_ok();
        if !quit {
            new = Some(p);
        }
        !quit
    })?;
    let mut new = new.context("the new worker")?;
    c.wait_worker_connected("w1", true)?;
    new.stop(Duration::from_secs(10));
    c.wait_worker_connected("w1", false)?;

    // The old machine comes back with the certificate the new enrolment replaced.
    let mut old = worker(&c, &c.path("w-w1"), Some("w1"), None, "worker-old.log")?;
    let status = old.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success(), "{status}");
    let said = old.log_text();
    if !said.contains("was replaced") {
        bail!("the old certificate is refused with a reason: {said}");
    }
    Ok(())
}
