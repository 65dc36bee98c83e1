//! Bad input of every kind gets a one-line error and the right exit code, and
//! changes nothing.

use std::time::Duration;

use anyhow::Result;
use berth_e2e::raw::Raw;
use berth_e2e::Cluster;
use berth_shared::wire::{Request, Response};

fn one_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    err
}

#[test]
fn usage_errors_exit_2() -> Result<()> {
    let c = Cluster::start()?;
    let out = c.berth(&["submit", "--no-such-flag", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("--no-such-flag"));
    let out = c.berth(&["submit", "--max-runtime", "soon", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("soon"));
    let out = c.berth(&["submit", "--array", "9-1", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    one_line(&out);
    let out = c.berth(&["submit"]);
    assert_eq!(out.status.code(), Some(2));
    one_line(&out);
    let out = c.berth(&["status", "zz"]);
    assert_eq!(out.status.code(), Some(2));
    one_line(&out);
    // Nothing was submitted by any of that.
    assert_eq!(c.berth_json(&["list", "--json"])?, serde_json::json!([]));
    Ok(())
}

#[test]
fn bad_job_files_name_the_line_and_field() -> Result<()> {
    let c = Cluster::start()?;
    let f = c.path("bad.toml");
    std::fs::write(&f, "command = [\"true\"]\nmax_runtime = \"forever\"\n")?;
    let out = c.berth(&["submit", f.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    let err = one_line(&out);
    assert!(err.contains("bad.toml:2") && err.contains("max_runtime"), "{err}");
    std::fs::write(&f, "name = \"no command\"\n")?;
    let out = c.berth(&["submit", f.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("command"));
    std::fs::write(&f, "command = [\"true\"\nattempts = 2\n")?;
    let out = c.berth(&["submit", f.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    one_line(&out);
    let out = c.berth(&["submit", c.path("missing.toml").to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("missing.toml"));
    assert_eq!(c.berth_json(&["list", "--json"])?, serde_json::json!([]));
    Ok(())
}

#[test]
fn unreachable_coordinator_and_bad_profiles_exit_4() -> Result<()> {
    let c = Cluster::start()?;
    let missing = c.path("nope.toml");
    let out = c.berth_as(&missing, &["list"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(one_line(&out).contains("nope.toml"));
    let garbage = c.path("garbage.toml");
    std::fs::write(&garbage, "this is not a profile")?;
    let out = c.berth_as(&garbage, &["list"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(one_line(&out).contains("garbage.toml"));
    // A profile pointing at a port nobody serves.
    let mut p = berth_shared::profile::Profile::from_file(&c.profile)?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    p.coordinators = vec![sock.local_addr()?.to_string()];
    drop(sock);
    let dead = c.path("dead.toml");
    p.write(&dead)?;
    let out = c.berth_as(&dead, &["list"]);
    assert_eq!(out.status.code(), Some(4));
    one_line(&out);
    Ok(())
}

#[test]
fn bad_frames_close_only_that_connection() -> Result<()> {
    let c = Cluster::start()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // Over the size limit.
        let raw = Raw::connect(&c.profile).await?;
        raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await?;
        let why = raw.closed_reason(Duration::from_secs(10)).await?;
        assert!(why.contains("over the limit"), "{why}");
        // Bytes that do not decode.
        let raw = Raw::connect(&c.profile).await?;
        raw.send_bytes(&[0, 0, 0, 4, 0xfe, 0xfe, 0xfe, 0xfe]).await?;
        let why = raw.closed_reason(Duration::from_secs(10)).await?;
        assert!(why.contains("does not decode"), "{why}");
        // A well-behaved connection alongside still works.
        let good = Raw::connect(&c.profile).await?;
        let r = good.request(&Request::List { state: None, limit: 5 }).await?;
        assert!(matches!(r.as_slice(), [Response::List(_)]), "{r:?}");
        anyhow::Ok(())
    })?;
    assert!(c.berth(&["list"]).status.success());
    Ok(())
}
