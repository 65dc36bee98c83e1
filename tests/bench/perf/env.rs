//! What every perf scenario shares: the binaries, the rounds and the scale, the run's
//! clock, the runtime; `berth` run against a cluster, a worker started with berth's
//! default logging, and an array run to its end.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_e2e::{run_timeout, Cluster, Proc};
use serde_json::Value;

use crate::{Clock, Scale};

/// What every scenario shares.
pub struct Env {
    pub bins: PathBuf,
    pub rounds: usize,
    pub par: usize,
    pub scale: Scale,
    pub clock: Clock,
    pub rt: tokio::runtime::Runtime,
}

impl Env {
    pub fn berth(&self, c: &Cluster, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bins.join("berth"));
        cmd.args(args).env("BERTH_PROFILE", &c.profile).env("NO_COLOR", "1").stdin(Stdio::null());
        cmd
    }

    /// `berth ARGS` with a deadline; it must exit 0; its stdout and how long it took.
    pub fn berth_ok(&self, c: &Cluster, args: &[&str], limit: Duration) -> Result<(Vec<u8>, Duration)> {
        let start = Instant::now();
        let out = run_timeout(self.berth(c, args), limit)?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!("berth {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok((out.stdout, took))
    }

    pub fn berth_json(&self, c: &Cluster, args: &[&str], limit: Duration) -> Result<(Value, Duration)> {
        let (out, took) = self.berth_ok(c, args, limit)?;
        Ok((serde_json::from_slice(&out).with_context(|| format!("berth {} printed no JSON", args.join(" ")))?, took))
    }

    /// Starts a worker with berth's default logging (the harness's own helpers turn on
    /// debug logs, which a benchmark should not pay for) and waits until it is listed.
    pub fn add_worker(&self, c: &mut Cluster, name: &str, slots: usize, flags: &[&str]) -> Result<()> {
        let token = c.token()?;
        let mut cmd = c.worker_cmd(name, slots, Some(&token));
        cmd.args(flags).env_remove("BERTH_LOG");
        let log = c.path(&format!("worker-{name}.{}.log", c.workers.len()));
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).stdin(Stdio::null());
        let child = cmd.spawn().context("cannot start berth-worker")?;
        c.workers.push((name.to_string(), Proc { name: format!("worker {name}"), child, log }));
        c.wait_worker_connected(name, true)
    }

    /// Cancels whatever is still queued or running (after a round ran out of time), so
    /// the next round measures an idle cluster.
    pub fn cancel_unfinished(&self, c: &Cluster) {
        let Ok((Value::Array(jobs), _)) = self.berth_json(c, &["list", "--json", "--limit", "50"], Duration::from_secs(10)) else { return };
        for j in jobs {
            if matches!(j["state"].as_str(), Some("queued" | "running")) {
                if let Some(id) = j["id"].as_str() {
                    let _ = run_timeout(self.berth(c, &["cancel", id]), Duration::from_secs(10));
                }
            }
        }
    }

    pub fn logs_hint(c: &Cluster) -> String {
        let text = c.logs_of("coordinator");
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// `berth submit --wait --json --array 0-(N-1) -- ARGV`, timed from start to exit; every
/// task must succeed. Returns the wall time and the status JSON.
pub fn array_run(env: &Env, c: &Cluster, tasks: u32, pre: &[&str], argv: &[&str], limit: Duration) -> Result<(Duration, Value)> {
    let range = format!("0-{}", tasks - 1);
    let mut args = vec!["submit", "--wait", "--json", "--array", &range];
    args.extend_from_slice(pre);
    args.push("--");
    args.extend_from_slice(argv);
    let (v, wall) = env.berth_json(c, &args, limit)?;
    let ok = v["counts"]["succeeded"].as_u64().unwrap_or(0);
    if ok != u64::from(tasks) {
        bail!("the array ended with {ok} of {tasks} tasks succeeded: {}", v["counts"]);
    }
    Ok((wall, v))
}
