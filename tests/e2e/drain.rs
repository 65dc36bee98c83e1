//! `berth workers drain NAME` stops new claims on that worker while its running jobs
//! finish; `undrain` lets it claim again; `berth workers` shows slots, leases and the
//! last heartbeat.

use std::time::Duration;

use anyhow::Result;
use berth_e2e::*;

#[test]
fn drain_stops_new_claims_and_lets_running_jobs_finish() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 2)?;
    let long = c.submit(&["--", "sh", "-c", "sleep 2; echo long done"])?;
    c.wait_state(&long, "running", Duration::from_secs(20))?;

    let admin = c.path("admin.toml");
    c.user("root", "admin", &admin)?;
    let out = c.berth_as(&admin, &["workers", "drain", "w1"]);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    let ws: serde_json::Value = serde_json::from_slice(&c.berth_as(&admin, &["workers", "--json"]).stdout)?;
    let w1 = ws.as_array().and_then(|a| a.iter().find(|w| w["name"] == "w1")).cloned().unwrap_or_default();
    assert_eq!(w1["drained"], true, "{ws}");
    assert_eq!(w1["slots"], 2, "{ws}");
    assert_eq!(w1["leases"].as_array().map(Vec::len), Some(1), "the running job's lease is listed: {ws}");
    assert!(w1["last_heartbeat"].is_string(), "{ws}");

    // A free slot, but drained: the new job waits.
    let short = c.submit(&["--", "echo", "short"])?;
    let st = c.wait_state(&long, "succeeded", Duration::from_secs(30))?;
    assert_eq!(st["attempts"], 1, "the running job finished where it was: {st}");
    assert_eq!(c.status(&short)?["state"], "queued", "a drained worker claims nothing");

    let out = c.berth_as(&admin, &["workers", "undrain", "w1"]);
    assert!(out.status.success(), "undrain: {}", String::from_utf8_lossy(&out.stderr));
    c.wait_state(&short, "succeeded", Duration::from_secs(20))?;

    // Draining is the admin's business, and an unknown worker is named.
    let out = c.berth(&["workers", "drain", "w1"]);
    assert_eq!(out.status.code(), Some(3), "a submitter may not drain: {}", String::from_utf8_lossy(&out.stderr));
    let out = c.berth_as(&admin, &["workers", "drain", "nosuch"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
    Ok(())
}
