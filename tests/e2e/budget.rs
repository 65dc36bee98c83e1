//! Budget and approvals through the real coordinator: caps hold under concurrent
//! submissions and across a restart, attempts are charged what they used, approvals
//! are recorded, and bad rates, caps and pools are refused without changing anything.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_e2e::*;

struct Budgeted {
    c: Cluster,
    pools: PathBuf,
    admin: PathBuf,
    approver: PathBuf,
    _dir: tempfile::TempDir,
}

fn cluster() -> Result<Budgeted> {
    let dir = tempfile::tempdir()?;
    let pools = dir.path().join("pools.toml");
    std::fs::write(&pools, APPROVAL_POOLS)?;
    let c = Cluster::start_with("30s", &["--pools", pools.to_str().context("path")?])?;
    let admin = c.path("root.toml");
    c.user("root", "admin", &admin)?;
    let approver = c.path("ann.toml");
    c.user("ann", "approver", &approver)?;
    Ok(Budgeted { c, pools, admin, approver, _dir: dir })
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn budget(b: &Budgeted, account: &str) -> Result<serde_json::Value> {
    let out = b.c.berth_as(&b.admin, &["budget", "show", "--account", account, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out))?;
    Ok(v[0].clone())
}

#[test]
fn two_hundred_concurrent_submissions_admit_exactly_what_the_cap_fits() -> Result<()> {
    let mut b = cluster()?;
    // Each job: 1 CPU × 10 s × $0.01/s × 1 attempt = $0.10; $3.70 a month fits 37.
    ok(&b.c.berth_as(&b.admin, &["budget", "set", "--account", "alice", "--run", "1", "--month", "3.70"]));
    let results: Vec<Option<i32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let c = &b.c;
                s.spawn(move || {
                    (0..25)
                        .map(|_| c.berth(&["submit", "--cpus", "1", "--max-runtime", "10s", "--attempts", "1", "--pool", "cloud", "--", "true"]))
                        .map(|o| {
                            if o.status.code() == Some(3) {
                                assert!(String::from_utf8_lossy(&o.stderr).contains("month window"), "{}", String::from_utf8_lossy(&o.stderr));
                            }
                            o.status.code()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    assert_eq!(results.len(), 200);
    assert_eq!(results.iter().filter(|c| **c == Some(0)).count(), 37, "{results:?}");
    assert_eq!(results.iter().filter(|c| **c == Some(3)).count(), 163, "{results:?}");
    let before = budget(&b, "alice")?;
    assert_eq!((before["reserved"].as_str(), before["spent"].as_str()), (Some("3.7"), Some("0")), "{before}");

    // The ledger survives a crash and restart unchanged.
    b.c.kill_coordinator();
    b.c.restart_coordinator()?;
    assert_eq!(budget(&b, "alice")?, before);
    // Cancelling releases: one job's $0.10 comes back.
    let list: serde_json::Value = serde_json::from_str(&ok(&b.c.berth(&["list", "--json"])))?;
    let first = list[0]["id"].as_str().context("a job")?.to_string();
    ok(&b.c.berth(&["cancel", &first]));
    assert_eq!(budget(&b, "alice")?["reserved"], "3.6");
    Ok(())
}

#[test]
fn attempts_are_charged_what_they_used_and_the_rest_is_released() -> Result<()> {
    let mut b = cluster()?;
    b.c.spawn_worker_with("gpu1", 2, &["--pool", "cloud"])?;
    b.c.wait_worker_connected("gpu1", true)?;
    ok(&b.c.berth_as(&b.admin, &["budget", "set", "--account", "alice", "--run", "10", "--month", "10"]));
    // Reserved: 1 CPU × 20 s × $0.01 × 2 attempts = $0.40; it runs about 1 s.
    let job = b.c.submit(&["--cpus", "1", "--max-runtime", "20s", "--attempts", "2", "--pool", "cloud", "--", "sleep", "1"])?;
    assert_eq!(budget(&b, "alice")?["reserved"], "0.4");
    b.c.wait_state(&job, "succeeded", Duration::from_secs(30))?;
    let after = budget(&b, "alice")?;
    assert_eq!(after["reserved"], "0", "the reservation is released: {after}");
    let spent: f64 = after["spent"].as_str().context("spent")?.parse()?;
    assert!((0.01..0.05).contains(&spent), "about one second at $0.01/s: {after}");

    // A worker may only join a pool the coordinator has.
    let token = b.c.token()?;
    let mut cmd = b.c.worker_cmd("stray", 1, Some(&token));
    cmd.args(["--pool", "nowhere"]);
    let out = run_timeout(cmd, Duration::from_secs(30))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown pool `nowhere`"), "{err}");
    Ok(())
}

#[test]
fn approvals_are_decided_by_approvers_and_recorded() -> Result<()> {
    let mut b = cluster()?;
    b.c.spawn_worker_with("w1", 1, &["--pool", "cloud"])?;
    b.c.wait_worker_connected("w1", true)?;
    ok(&b.c.berth_as(&b.admin, &["budget", "set", "--account", "alice", "--run", "100", "--month", "100"]));
    // 1 CPU × 10 min × $0.01 × 1 attempt = $6, over the $5 threshold.
    let big = ["--cpus", "1", "--max-runtime", "10m", "--attempts", "1", "--pool", "cloud", "--", "echo", "approved work"];
    let job = b.c.submit(&big)?;
    let st = b.c.status(&job)?;
    assert_eq!(st["state"], "pending_approval", "{st}");
    assert_eq!(budget(&b, "alice")?["reserved"], "0", "nothing reserved while waiting");

    let out = b.c.berth(&["approve", &job, "--reason", "mine"]);
    assert_eq!(out.status.code(), Some(3), "a submitter may not approve: {}", String::from_utf8_lossy(&out.stderr));
    let out = b.c.berth_as(&b.approver, &["approve", &job, "--reason", ""]);
    assert_eq!(out.status.code(), Some(2), "a reason is required");
    ok(&b.c.berth_as(&b.approver, &["approve", &job, "--reason", "capacity planned"]));
    let st = b.c.wait_state(&job, "succeeded", Duration::from_secs(30))?;
    let events = st["events"].to_string();
    assert!(events.contains("approved by ann: capacity planned"), "{events}");

    let job2 = b.c.submit(&big)?;
    ok(&b.c.berth_as(&b.approver, &["reject", &job2, "--reason", "too dear"]));
    let st = b.c.status(&job2)?;
    assert_eq!(st["state"], "rejected", "{st}");
    assert!(st["events"].to_string().contains("rejected by ann: too dear"));
    let out = b.c.berth_as(&b.admin, &["approve", &job2, "--reason", "changed my mind"]);
    assert_eq!(out.status.code(), Some(2), "a decided job is not waiting any more");
    // To the approver, alice's job no longer waiting is none of its business.
    let out = b.c.berth_as(&b.approver, &["approve", &job2, "--reason", "changed my mind"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));

    // An approval that no longer fits is refused and the job keeps waiting.
    ok(&b.c.berth_as(&b.admin, &["budget", "set", "--account", "alice", "--run", "100", "--month", "3"]));
    let job3 = b.c.submit(&big)?;
    let out = b.c.berth_as(&b.approver, &["approve", &job3, "--reason", "try"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("month window"));
    assert_eq!(b.c.status(&job3)?["state"], "pending_approval");
    Ok(())
}

#[test]
fn bad_rates_caps_and_pools_are_refused_and_change_nothing() -> Result<()> {
    let mut b = cluster()?;
    // Caps: negative or not a number.
    for bad in [["--run", "-1", "--month", "5"], ["--run", "abc", "--month", "5"]] {
        let mut args = vec!["budget", "set", "--account", "alice"];
        args.extend(bad);
        let out = b.c.berth_as(&b.admin, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
    // An account with no budget and no spend is named as unknown.
    let out = b.c.berth_as(&b.admin, &["budget", "show", "--account", "nosuch"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account `nosuch`"));
    // No budget: a paid-only job is refused with what to do; free work needs none.
    let out = b.c.berth(&["submit", "--max-runtime", "10s", "--cpus", "1", "--pool", "cloud", "--", "true"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("budget set"));
    ok(&b.c.berth(&["submit", "--pool", "default", "--", "true"]));
    // No max runtime on a paid pool; an unknown pool.
    let out = b.c.berth(&["submit", "--pool", "cloud", "--", "true"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no max runtime"));
    let out = b.c.berth(&["submit", "--pool", "mars", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown pool `mars`"));

    // A rates file that fails to parse on SIGHUP: the last good pools stay, the line is logged.
    std::fs::write(&b.pools, "[[pool]]\nname = \"cloud\"\nkind = \"cloud\"\nvcpu_usd_per_s = -3\n")?;
    b.c.coord.as_ref().context("coordinator")?.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the reload error in the log", Duration::from_secs(10), || {
        b.c.coord.as_ref().is_some_and(|p| p.log_text().contains("pools.toml:4: `vcpu_usd_per_s` must not be negative"))
    })?;
    ok(&b.c.berth_as(&b.admin, &["budget", "set", "--account", "alice", "--run", "1", "--month", "1"]));
    ok(&b.c.berth(&["submit", "--max-runtime", "10s", "--cpus", "1", "--pool", "cloud", "--", "true"]));
    assert_eq!(budget(&b, "alice")?["reserved"], "0.3", "still priced at the last good rates");

    // A coordinator started with a broken pools file does not start, and says where.
    b.c.kill_coordinator();
    let mut cmd = Command::new(bin("berth-coordinator"));
    cmd.args(["run", "--listen", "127.0.0.1:0", "--pools"]).arg(&b.pools).arg("--data-dir").arg(&b.c.data);
    let out = run_timeout(cmd, Duration::from_secs(20))?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":4: `vcpu_usd_per_s` must not be negative"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
