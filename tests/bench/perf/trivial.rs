//! Scenario 1, end to end with trivial jobs: an array of `true` through one worker,
//! against the raw rate of `true` through the worker's own executor.

use std::time::Duration;

use anyhow::{Context, Result};
use berth_e2e::bench::{executor_rate, median, Rates, Rounds};
use berth_e2e::Cluster;
use serde_json::json;

use crate::env::{array_run, Env};
use crate::table::{list, RatioStyle, Row, Verdict};
use crate::until;

pub fn scenario_1(env: &Env) -> Result<Vec<Row>> {
    let (par, n) = (env.par, env.scale.jobs);
    let end = env.clock.phase(Duration::from_secs(if env.scale.jobs > 5_000 { 130 } else { 40 }));
    eprintln!("[1] an array of {n} `true` through one worker with {par} slots, and the raw executor rate at {par}, alternating, x {} rounds", env.rounds);
    let scratch = tempfile::Builder::new().prefix("berth-perf-").tempdir()?;
    let mut c = Cluster::start()?;
    env.add_worker(&mut c, "e2e", par, &[])?;
    // Warm up: connections, the store's first writes, the worker's claim loop.
    array_run(env, &c, 50, &[], &["true"], Duration::from_secs(30)).context("warm-up array")?;
    let (mut rates, mut server, mut raw) = (Vec::new(), Vec::new(), Rates::default());
    let mut rounds = Rounds::new(env.rounds, end);
    // Baseline and berth take turns, so drifting load on a shared machine hits both.
    while let Some(r) = rounds.next_round() {
        let rate = executor_rate(&env.rt, scratch.path(), par, n as usize, Duration::from_secs(30))?;
        raw.add(&rate);
        eprintln!("    executor: {} of {n} in {:.2?} ({:.0}/s)", rate.done, rate.elapsed, rate.per_sec());
        match array_run(env, &c, n, &[], &["true"], until(end).max(Duration::from_secs(20))) {
            Ok((wall, v)) => {
                rates.push(f64::from(n) / wall.as_secs_f64());
                let t = |k: &str| v[k].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
                if let (Some(a), Some(b)) = (t("submitted_at"), t("ended_at")) {
                    let ms = (b - a).num_milliseconds();
                    if ms > 0 {
                        server.push(f64::from(n) * 1e3 / ms as f64);
                    }
                }
                eprintln!("    berth: {n} in {wall:.2?} ({:.0}/s)", f64::from(n) / wall.as_secs_f64());
            }
            Err(e) => {
                rounds.failed(r, &e);
                env.cancel_unfinished(&c);
                break;
            }
        }
    }
    let (raw, raw_failed, note) = (raw.per_sec, raw.failed, rounds.note);
    let mut row =
        Row::new("1", &format!("e2e: {n} x `true` (array), 1 worker x {par} slots"), "jobs/s", "spawns/s", ">= 50%").values(median(&rates), median(&raw));
    row.ratio_style = RatioStyle::Percent;
    row.verdict = Verdict::of(row.ratio.map(|r| r >= 0.5));
    row.note = format!(
        "figure: `berth submit --wait --array` start to exit, rounds {} (coordinator clock submitted->ended: {}). baseline: worker executor process::run + spool, {par} concurrent, no scheduler, rounds {}, {raw_failed} failed{note}",
        list(&rates),
        list(&server),
        list(&raw)
    );
    Ok(vec![row.extra("rounds", json!(rates)).extra("baseline_rounds", json!(raw)).extra("server_clock_rounds", json!(server))])
}
