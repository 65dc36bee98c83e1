//! Certificates, join tokens, and a worker coming back with its work dir.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use berth_e2e::{bin, run_ok, run_timeout, Cluster};
use berth_shared::profile::Profile;

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
