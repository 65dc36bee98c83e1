//! Leases under failure: workers killed, stopped or poisoned, the coordinator killed
//! and restarted on its address, duplicate submissions, and workers sending leases
//! they do not hold. Execution is at-least-once; the recorded result exactly-once.
//! The tests run with a 2 s lease TTL (the raw-protocol one, where the TTL plays no
//! part, with 30 s) and wait on conditions with deadlines.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_e2e::raw::RawWorker;
use berth_e2e::{group_members, wait_until, Cluster};
use berth_shared::ids::LeaseId;
use berth_shared::job::Outcome;
use berth_shared::wire::{CoordMsg, KillReason, OutStream, OutputFrame, WorkerMsg};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The lease TTL these tests run with.
const TTL: Duration = Duration::from_secs(2);
const TTL_FLAG: &str = "2s";

fn events(st: &Value) -> Vec<Value> {
    st["events"].as_array().cloned().unwrap_or_default()
}

/// How many of a task's events moved it to `state`.
fn n_events(st: &Value, state: &str) -> usize {
    events(st).iter().filter(|e| e["state"] == state).count()
}

/// Whether a task was sent back to the queue as `attempt` because a lease was lost.
fn requeued_after_lost_lease(st: &Value, attempt: u64) -> bool {
    events(st).iter().any(|e| e["state"] == "queued" && e["attempt"] == attempt && e["reason"].as_str().is_some_and(|r| r.contains("lease_lost")))
}

/// The leases the coordinator lists for a worker.
fn worker_leases(c: &Cluster, worker: &str) -> Vec<String> {
    let listed = c.berth_json(&["workers", "--json"]).ok();
    let leases = listed.as_ref().and_then(|v| v.as_array()?.iter().find(|w| w["name"] == worker)?["leases"].as_array().cloned());
    leases.unwrap_or_default().iter().filter_map(|l| l.as_str().map(String::from)).collect()
}

fn sorted(mut v: Vec<LeaseId>) -> Vec<LeaseId> {
    v.sort();
    v
}

/// A task's events that are its own (an array's events include the job's own, such as
/// its submission).
fn task_events(st: &Value, state: &str) -> usize {
    events(st).iter().filter(|e| e["state"] == state && !e["index"].is_null()).count()
}

/// `berth logs SELECTOR [ARGS]`: stdout, which must be all there is.
fn logs(c: &Cluster, sel: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["logs", sel];
    all.extend_from_slice(args);
    let out = c.berth(&all);
    if !out.status.success() {
        bail!("berth logs {sel} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The pid a job wrote to `path` (`echo $$ > path`): the process group of its attempt.
fn wait_pid(path: &Path, timeout: Duration) -> Result<i32> {
    let mut pid = None;
    wait_until(&format!("{} to be written", path.display()), timeout, || {
        pid = std::fs::read_to_string(path).ok().filter(|s| s.ends_with('\n')).and_then(|s| s.trim().parse().ok());
        pid.is_some()
    })?;
    pid.context("pid")
}

fn group_alive(pgid: i32) -> bool {
    !group_members(pgid).is_empty()
}

/// A script that records its process group in `pids/INDEX.ATTEMPT`, prints `start`,
/// sleeps (`first` seconds on attempt 1, `later` seconds after), prints `done`.
fn recording_script(pids: &Path, first: &str, later: &str) -> String {
    format!(
        "echo $$ > {}/$BERTH_ARRAY_INDEX.$BERTH_ATTEMPT; echo start; if [ $BERTH_ATTEMPT = 1 ]; then sleep {first}; else sleep {later}; fi; echo done",
        pids.display()
    )
}

/// Runs a test body on a fresh cluster; an error fails the test while the cluster
/// is still up, so its processes' logs are printed.
fn on_cluster(ttl: &str, body: impl FnOnce(&mut Cluster) -> Result<()>) {
    let mut c = Cluster::start_with_ttl(ttl).expect("the cluster starts");
    if let Err(e) = body(&mut c) {
        panic!("{e:?}");
    }
}

/// Status of every task of an array, checked to have ended `succeeded` exactly once
/// as `attempt` on `worker`, with the winning attempt's output.
fn check_won_by(c: &Cluster, job: &str, tasks: std::ops::RangeInclusive<u32>, attempt: u64, worker: &str, log: &str) -> Result<()> {
    for i in tasks {
        let sel = format!("{job}:{i}");
        let st = c.status(&sel)?;
        assert_eq!(st["state"], "succeeded", "{sel}: {st}");
        assert_eq!(st["attempts"], attempt, "{sel}: {st}");
        assert_eq!(st["worker"], worker, "{sel}: {st}");
        assert_eq!(st["exit_code"], 0, "{sel}: {st}");
        assert_eq!(n_events(&st, "succeeded"), 1, "{sel}: one recorded result: {st}");
        if attempt > 1 {
            assert!(requeued_after_lost_lease(&st, attempt), "{sel}: a lease_lost re-queue as attempt {attempt}: {st}");
        }
        assert_eq!(logs(c, &sel, &[])?, log, "{sel}: the winning attempt's output");
    }
    Ok(())
}

#[test]
fn a_killed_workers_tasks_finish_elsewhere_and_its_orphans_die_when_it_returns() {
    on_cluster(TTL_FLAG, |c| {
        c.add_worker("w1", 3)?;
        let pids = c.path("pids");
        c.job_dir(&pids)?;
        // Attempt 1 is a long computation that prints nothing for a while, so it outlives
        // its worker; the retries are short.
        let id = c.submit(&["--array", "1-3", "--", "sh", "-c", &recording_script(&pids, "60", "1")])?;
        let mut orphans = Vec::new();
        for i in 1..=3 {
            orphans.push(wait_pid(&pids.join(format!("{i}.1")), Duration::from_secs(30))?);
        }
        c.add_worker("w2", 3)?;
        c.worker("w1").context("w1")?.kill9();
        // kill -9 gives the worker no chance to clean up: its attempts run on, orphaned,
        // in their own process groups.
        assert!(orphans.iter().all(|pg| group_alive(*pg)), "the orphaned attempts survive their worker");
        c.wait_state(&id, "succeeded", TTL + Duration::from_secs(5))?;
        check_won_by(c, &id, 1..=3, 2, "w2", "start\ndone\n")?;

        // The worker comes back with its work dir (no token) and kills what it left behind.
        c.add_worker("w1", 3)?;
        wait_until("w1 to kill the attempts that outlived it", Duration::from_secs(10), || orphans.iter().all(|pg| !group_alive(*pg)))?;
        assert!(c.logs_of("worker-w1").contains("left over"), "w1 says what it killed");
        // Nothing it did changed the recorded results.
        check_won_by(c, &id, 1..=3, 2, "w2", "start\ndone\n")?;
        let st = c.status(&id)?;
        assert_eq!(st["counts"]["succeeded"], 3, "{st}");
        Ok(())
    })
}

#[test]
fn a_worker_that_is_told_to_stop_kills_its_attempts_first() {
    on_cluster(TTL_FLAG, |c| {
        c.add_worker("w1", 1)?;
        let pids = c.path("pids");
        c.job_dir(&pids)?;
        let id = c.submit(&["--array", "1-1", "--", "sh", "-c", &recording_script(&pids, "60", "60")])?;
        let group = wait_pid(&pids.join("1.1"), Duration::from_secs(30))?;
        let status = c.worker("w1").context("w1")?.stop(Duration::from_secs(10)).context("w1 exits on SIGTERM")?;
        assert!(status.success(), "{status}");
        assert!(!group_alive(group), "the attempt's process group is gone when its worker has exited");
        // Its lease is lost like any other; the task runs again on the next worker.
        c.add_worker("w2", 1)?;
        let sel = format!("{id}:1");
        wait_until("the task to run again on w2", TTL + Duration::from_secs(5), || {
            c.status(&sel).is_ok_and(|st| st["state"] == "running" && st["attempts"] == 2 && st["worker"] == "w2")
        })?;
        Ok(())
    })
}

#[test]
fn a_stopped_worker_loses_its_leases_and_its_late_output_and_results_are_rejected() {
    on_cluster(TTL_FLAG, |c| {
        c.add_worker("w1", 2)?;
        let pids = c.path("pids");
        c.job_dir(&pids)?;
        // On w1, task 1 ends while w1 is stopped (its result and last line arrive late);
        // task 2 is still running when w1 wakes up (it must be killed).
        let script = format!(
            "echo $$ > {0}/$BERTH_ARRAY_INDEX.$BERTH_ATTEMPT; echo start; if [ $BERTH_ATTEMPT != 1 ]; then sleep 1; elif [ $BERTH_ARRAY_INDEX = 1 ]; then sleep 3; else sleep 60; fi; echo done",
            pids.display()
        );
        let id = c.submit(&["--array", "1-2", "--", "sh", "-c", &script])?;
        let ended_while_stopped = wait_pid(&pids.join("1.1"), Duration::from_secs(30))?;
        let running_at_wake_up = wait_pid(&pids.join("2.1"), Duration::from_secs(30))?;
        let mut leases: Vec<String> = Vec::new();
        wait_until("w1 to list both leases", Duration::from_secs(10), || {
            leases = worker_leases(c, "w1");
            leases.len() == 2
        })?;
        let w1 = c.worker("w1").context("w1")?;
        w1.signal(Signal::SIGSTOP);
        let stopped = Instant::now();
        c.add_worker("w2", 2)?;
        let result = (|| {
            // Past the TTL the tasks go back to the queue and w2 runs them.
            c.wait_state(&id, "succeeded", TTL + Duration::from_secs(6))?;
            wait_until("task 1's first attempt to end", Duration::from_secs(10), || !group_alive(ended_while_stopped))
        })();
        let w1 = c.worker("w1").context("w1")?;
        w1.signal(Signal::SIGCONT);
        result?;
        assert!(stopped.elapsed() > TTL);
        // w1 learns its leases are stale: the running attempt is killed at once (it would
        // otherwise sleep for a minute), the ended one's result is not recorded.
        wait_until("w1 to kill its stale attempt", Duration::from_secs(5), || !group_alive(running_at_wake_up))?;
        wait_until("w1 to hold no leases", Duration::from_secs(10), || {
            c.berth_json(&["workers", "--json"])
                .ok()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|ws| ws.iter().any(|w| w["name"] == "w1" && w["connected"] == true && w["running"] == 0))
        })?;
        // Both sides say, per lease, what was refused.
        wait_until("w1 and the coordinator to log each stale lease", Duration::from_secs(10), || {
            let (worker, coord) = (c.logs_of("worker-w1"), c.logs_of("coordinator"));
            leases.iter().all(|l| {
                worker.lines().any(|x| x.contains(l.as_str()) && (x.contains("stale") || x.contains("rejected")))
                    && coord.lines().any(|x| {
                        x.contains(l.as_str()) && x.contains("worker=w1") && (x.contains("stale") || x.contains("not valid") || x.contains("does not hold"))
                    })
            })
        })?;
        check_won_by(c, &id, 1..=2, 2, "w2", "start\ndone\n")?;
        // Attempt 1 of task 1 printed `done` while its worker was stopped: refused.
        assert!(!logs(c, &format!("{id}:1"), &["--attempt", "1"])?.contains("done"));
        // w1 still serves.
        let out = c.berth(&["submit", "--wait", "--", "true"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    })
}

#[test]
fn a_coordinator_killed_during_a_500_task_array_records_each_task_once() {
    on_cluster(TTL_FLAG, |c| {
        for w in ["w1", "w2", "w3"] {
            c.add_worker(w, 4)?;
        }
        let id = c.submit(&["--array", "1-500", "--", "sh", "-c", "for i in 1 2 3; do echo line $i; done"])?;
        for at in [50, 250] {
            wait_until(&format!("{at} tasks to succeed"), Duration::from_secs(120), || {
                c.status(&id).is_ok_and(|st| st["counts"]["succeeded"].as_u64().unwrap_or(0) >= at)
            })?;
            c.kill_coordinator();
            c.restart_coordinator()?;
        }
        let st = c.wait_state(&id, "succeeded", Duration::from_secs(180))?;
        // The workers noticed each restart at once (the new process answers their
        // packets on the old connection with a reset) and renewed their leases in time.
        assert!(!c.logs_of("coordinator").contains("lease expired"), "a lease expired across a restart");
        let counts = &st["counts"];
        assert_eq!(counts["succeeded"], 500, "{st}");
        for s in ["queued", "running", "failed", "cancelled", "timed_out"] {
            assert_eq!(counts[s], 0, "{s}: {st}");
        }
        for i in 1..=500 {
            let sel = format!("{id}:{i}");
            assert_eq!(logs(c, &sel, &[])?, "line 1\nline 2\nline 3\n", "{sel}");
            if i % 20 == 0 {
                let t = c.status(&sel)?;
                assert_eq!(t["state"], "succeeded", "{sel}: {t}");
                assert_eq!(n_events(&t, "succeeded"), 1, "{sel}: {t}");
            }
        }
        Ok(())
    })
}

#[test]
fn leases_survive_a_coordinator_outage_longer_than_the_ttl() {
    on_cluster(TTL_FLAG, |c| {
        c.add_worker("w1", 2)?;
        let pids = c.path("pids");
        c.job_dir(&pids)?;
        let id = c.submit(&["--array", "1-2", "--", "sh", "-c", &recording_script(&pids, "8", "8")])?;
        let mut groups = Vec::new();
        for i in 1..=2 {
            groups.push(wait_pid(&pids.join(format!("{i}.1")), Duration::from_secs(30))?);
        }
        c.kill_coordinator();
        // The outage itself: deliberately longer than the lease TTL.
        std::thread::sleep(TTL + Duration::from_secs(1));
        assert!(groups.iter().all(|pg| group_alive(*pg)), "the jobs keep running while the coordinator is away");
        c.restart_coordinator()?;
        c.wait_state(&id, "succeeded", Duration::from_secs(20))?;
        check_won_by(c, &id, 1..=2, 1, "w1", "start\ndone\n")?;
        for i in 1..=2 {
            let st = c.status(&format!("{id}:{i}"))?;
            assert_eq!(task_events(&st, "running"), 1, "one attempt only: {st}");
            assert_eq!(task_events(&st, "queued"), 0, "never re-queued: {st}");
        }
        Ok(())
    })
}

#[test]
fn a_job_whose_worker_dies_each_attempt_fails_after_its_attempts() {
    on_cluster(TTL_FLAG, |c| {
        // A contained job cannot kill its worker (it runs as its slot's user), so the test
        // does it for it, once per attempt: a job whose every attempt loses its worker.
        let id = c.submit(&["--attempts", "3", "--", "sh", "-c", "kill -9 $PPID 2>/dev/null || echo kill-refused; sleep 60"])?;
        let mut deaths = 0;
        for round in 1..=6u64 {
            c.spawn_worker("w1", 1)?;
            let mut failed = false;
            wait_until(&format!("round {round}: the attempt to run or the job to fail"), Duration::from_secs(30), || {
                let Ok(st) = c.status(&id) else { return false };
                failed = st["state"] == "failed";
                failed || (st["state"] == "running" && st["attempts"] == round && logs(c, &id, &[]).is_ok_and(|l| l.contains("kill-refused")))
            })?;
            if failed {
                break;
            }
            c.worker("w1").context("w1")?.kill9();
            deaths += 1;
        }
        assert_eq!(deaths, 3, "one dead worker per attempt, then no more tries");
        let st = c.wait_state(&id, "failed", TTL + Duration::from_secs(5))?;
        let reason = st["reason"].as_str().unwrap_or("");
        assert!(reason.contains("lease_lost") && reason.contains("out of attempts"), "{st}");
        assert_eq!(st["attempts"], 3, "{st}");
        assert_eq!(n_events(&st, "running"), 3, "{st}");
        assert_eq!(n_events(&st, "failed"), 1, "{st}");
        // The last worker is alive and idle: nothing is handed out again.
        let w = c.berth_json(&["workers", "--json"])?;
        assert!(w.as_array().is_some_and(|ws| ws.iter().any(|w| w["name"] == "w1" && w["connected"] == true && w["running"] == 0)), "{w}");
        Ok(())
    })
}

#[test]
fn one_idempotency_key_makes_one_job() {
    on_cluster(TTL_FLAG, |c| {
        let key = uuid::Uuid::new_v4().to_string();
        let first = c.submit(&["--idempotency-key", &key, "--", "true"])?;
        let second = c.submit(&["--idempotency-key", &key, "--", "true"])?;
        assert_eq!(first, second);
        let list = c.berth_json(&["list", "--json"])?;
        let jobs = list.as_array().context("a list")?;
        assert_eq!(jobs.len(), 1, "{list}");
        assert_eq!(jobs[0]["id"], first.as_str());
        // Another key is another job.
        let third = c.submit(&["--idempotency-key", &uuid::Uuid::new_v4().to_string(), "--", "true"])?;
        assert_ne!(third, first);
        assert_eq!(c.berth_json(&["list", "--json"])?.as_array().map(Vec::len), Some(2));
        Ok(())
    })
}

#[test]
fn leases_a_worker_does_not_hold_and_chunks_out_of_order_are_rejected() {
    on_cluster("30s", |c| {
        // A real worker without prefetch, busy with a job held at a gate.
        c.spawn_worker_with("w1", 1, &["--prefetch", "0"])?;
        c.wait_worker_connected("w1", true)?;
        let gate = c.path("gate");
        let busy = c.submit(&["--", "sh", "-c", &format!("echo hi; while [ ! -e {} ]; do sleep 0.05; done; echo bye", gate.display())])?;
        c.wait_state(&busy, "running", Duration::from_secs(30))?;
        let theirs: LeaseId = {
            let mut lease = None;
            wait_until("w1 to list its lease", Duration::from_secs(10), || {
                lease = c
                    .berth_json(&["workers", "--json"])
                    .ok()
                    .and_then(|v| v.as_array()?.iter().find(|w| w["name"] == "w1")?["leases"].as_array()?.first()?.as_str().and_then(|s| s.parse().ok()));
                lease.is_some()
            })?;
            lease.context("lease")?
        };
        let token = c.token()?;
        let ca = std::fs::read_to_string(c.data.join("ca.pem"))?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let (made_up, mine) = rt.block_on(async {
            let made_up = LeaseId::new();
            // Registering with leases it never held: both called stale.
            let (mut w, reg) = RawWorker::enrol_and_register(&c.addr, &ca, &c.path("w-mallory"), "mallory", &token, vec![made_up, theirs]).await?;
            let CoordMsg::Registered { stale, .. } = reg else { bail!("{reg:?}") };
            assert_eq!(sorted(stale), sorted(vec![made_up, theirs]));

            // Heartbeats for them: stale.
            w.send(&WorkerMsg::Heartbeat { leases: vec![made_up, theirs] }).await?;
            let ack = w.expect("HeartbeatAck", |m| matches!(m, CoordMsg::HeartbeatAck { .. })).await?;
            let CoordMsg::HeartbeatAck { stale } = ack else { bail!("{ack:?}") };
            assert_eq!(sorted(stale), sorted(vec![made_up, theirs]));

            // Results for them: rejected, and told to kill.
            let ok = Outcome { exit_code: Some(0), signal: None, timed_out: false, killed: false, runtime_ms: 1, error: None };
            for lease in [made_up, theirs] {
                w.send(&WorkerMsg::Finished { lease, outcome: ok.clone() }).await?;
                w.expect("FinishedAck", |m| *m == CoordMsg::FinishedAck { lease, accepted: false }).await?;
                w.expect("Kill", |m| *m == CoordMsg::Kill { lease, reason: KillReason::StaleLease }).await?;
            }

            // Output for another worker's lease: refused, told to kill.
            let mut s = w.open_output(theirs).await?;
            berth_shared::codec::write_frame(&mut s, &OutputFrame::Chunk { stream: OutStream::Stdout, seq: 2, data: b"forged\n".to_vec() }).await?;
            w.expect("Kill for forged output", |m| *m == CoordMsg::Kill { lease: theirs, reason: KillReason::StaleLease }).await?;

            // A lease of its own, then chunks out of order and twice.
            w.send(&WorkerMsg::Want { n: 1 }).await?;
            let mine = c.submit(&["--", "true"])?;
            let assigned = w.expect("Assign", |m| matches!(m, CoordMsg::Assign(_))).await?;
            let CoordMsg::Assign(list) = assigned else { bail!("{assigned:?}") };
            assert_eq!(list.len(), 1);
            assert_eq!(list[0].job.to_string(), mine);
            let lease = list[0].lease;
            w.send(&WorkerMsg::Started { lease }).await?;
            let chunk = |seq: u64, data: &str| OutputFrame::Chunk { stream: OutStream::Stdout, seq, data: data.as_bytes().to_vec() };
            let ack = |seq: u64| CoordMsg::OutputAck { lease, stream: OutStream::Stdout, seq };
            let mut s = w.open_output(lease).await?;
            berth_shared::codec::write_frame(&mut s, &chunk(1, "one\n")).await?;
            w.expect("ack of chunk 1", |m| *m == ack(1)).await?;
            // Chunk 3 before chunk 2: dropped, not acknowledged. Chunk 1 again: already
            // stored, acknowledged again (the stream is in order, so 3 was seen first).
            berth_shared::codec::write_frame(&mut s, &chunk(3, "three\n")).await?;
            berth_shared::codec::write_frame(&mut s, &chunk(1, "one again\n")).await?;
            let next = w.expect("an ack", |m| matches!(m, CoordMsg::OutputAck { .. })).await?;
            assert_eq!(next, ack(1), "neither the gap nor the duplicate moved the ack");
            berth_shared::codec::write_frame(&mut s, &chunk(2, "two\n")).await?;
            w.expect("ack of chunk 2", |m| *m == ack(2)).await?;
            let _ = s.finish();
            w.send(&WorkerMsg::Finished { lease, outcome: ok }).await?;
            w.expect("FinishedAck", |m| *m == CoordMsg::FinishedAck { lease, accepted: true }).await?;
            assert!(!w.seen.iter().any(|m| matches!(m, CoordMsg::Kill { lease: l, .. } if *l == lease)), "{:?}", w.seen);
            w.conn.close(0u32.into(), b"done");
            anyhow::Ok((made_up, mine))
        })?;
        let st = c.wait_state(&mine, "succeeded", Duration::from_secs(10))?;
        assert_eq!(n_events(&st, "succeeded"), 1, "{st}");
        assert_eq!(logs(c, &mine, &[])?, "one\ntwo\n", "no gap, no duplicate");

        // Nothing happened to w1's job: it runs on as attempt 1 and ends on its own.
        let st = c.status(&busy)?;
        assert_eq!((st["state"].as_str(), st["attempts"].as_u64(), st["worker"].as_str()), (Some("running"), Some(1), Some("w1")), "{st}");
        std::fs::write(&gate, b"")?;
        let st = c.wait_state(&busy, "succeeded", Duration::from_secs(30))?;
        assert_eq!((st["attempts"].as_u64(), n_events(&st, "succeeded")), (Some(1), 1), "{st}");
        assert_eq!(logs(c, &busy, &[])?, "hi\nbye\n", "the forged chunk was not stored");
        assert_eq!(c.berth_json(&["list", "--json"])?.as_array().map(Vec::len), Some(2));

        // Each refusal is in the coordinator's log with the worker's name.
        let log = c.logs_of("coordinator");
        let by_mallory: Vec<&str> = log.lines().filter(|l| l.contains("worker=mallory")).collect();
        for (what, lease) in [
            ("worker reported a lease that is not valid", made_up),
            ("worker reported a lease that is not valid", theirs),
            ("heartbeat for a lease this worker does not hold", made_up),
            ("heartbeat for a lease this worker does not hold", theirs),
            ("rejected a result carrying a stale lease", made_up),
            ("rejected a result carrying a stale lease", theirs),
            ("rejected output carrying a stale lease", theirs),
        ] {
            let lease = lease.to_string();
            assert!(
                by_mallory.iter().any(|l| l.contains(what) && l.contains(&lease)),
                "`{what}` for {lease} logged with the worker's name:\n{}",
                by_mallory.join("\n")
            );
        }
        assert!(by_mallory.iter().any(|l| l.contains("out-of-order")), "{}", by_mallory.join("\n"));
        assert!(by_mallory.iter().any(|l| l.contains("duplicate")), "{}", by_mallory.join("\n"));
        Ok(())
    })
}
