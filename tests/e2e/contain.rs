//! Containment of process jobs, through the real binaries: a job runs as its slot's own
//! user with a clean environment and cannot read the worker's files or another slot's
//! workspace; cgroups enforce memory, CPU and pids and end every process of an attempt
//! (one that left its group too); output written after SIGTERM is kept; secrets are
//! only those declared on the worker, for the accounts named there.
//!
//! These need a worker running as root on a host whose cgroups can be used (as CI's);
//! elsewhere they say why and pass only outside CI.

use std::time::Duration;

use anyhow::{bail, Result};
use berth_e2e::{wait_until, Cluster};

/// Whether this host can run the containment tests (root, cgroups); under CI it must.
fn contained_host(test: &str) -> bool {
    let root = nix::unistd::Uid::current().is_root();
    let cgroups = std::path::Path::new("/sys/fs/cgroup").exists();
    if root && cgroups {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "{test}: CI must run as root with cgroups (root={root}, cgroups={cgroups})");
    eprintln!("skipping {test}: needs root and cgroups (root={root}, cgroups={cgroups})");
    false
}

/// The job's output, stdout then stderr (`berth logs` prints each on its own).
fn logs(c: &Cluster, id: &str) -> String {
    let out = c.berth(&["logs", id]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Waits until the job's output holds `what`.
fn wait_output(c: &Cluster, id: &str, what: &str) -> Result<String> {
    let mut last = String::new();
    wait_until(&format!("job {id} to print {what:?}"), Duration::from_secs(30), || {
        last = logs(c, id);
        last.contains(what)
    })
    .map_err(|e| e.context(format!("its output so far: {last:?}")))?;
    Ok(last)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
}

/// The pids of processes owned by `uid`, zombies included (they hold their place under
/// the pids limit until reaped: orphans go to this host's init, which reaps lazily).
fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())))
        })
        .collect()
}

#[test]
fn jobs_run_as_their_slot_user_with_a_clean_environment_and_read_nothing_of_the_worker() -> Result<()> {
    if !contained_host("jobs_run_as_their_slot_user") {
        return Ok(());
    }
    let mut c = Cluster::start()?;
    let base = "931000";
    c.spawn_worker_env("w1", 2, &["--slot-uid-base", base], &[("WORKER_PRIVATE_MARKER", "do-not-leak".into())])?;
    c.wait_worker_connected("w1", true)?;
    let w1 = c.workers.iter().find(|(n, _)| n == "w1").map(|(_, p)| p.pid()).expect("worker");
    // One job holds slot 0 with a file in its workspace until the test opens a gate.
    let gate = c.path("gate");
    let holder = c.submit(&["--", "sh", "-c", &format!("echo private > mine.txt; echo held; while [ ! -e {} ]; do sleep 0.05; done", gate.display())])?;
    wait_output(&c, &holder, "held")?;
    let script = format!(
        "echo uid=$(id -u) gid=$(id -g); stat -c 'ws=%a:%u' .; \
         head -1 ../../worker.key >/dev/null 2>&1 && echo KEY-READ || echo key-refused; \
         ls ../.. >/dev/null 2>&1 && echo WORKDIR-LISTED || echo workdir-refused; \
         cat ../0/mine.txt >/dev/null 2>&1 && echo OTHER-SLOT-READ || echo other-slot-refused; \
         cat /proc/{w1}/environ >/dev/null 2>&1 && echo WORKER-ENV-READ || echo worker-env-refused; \
         env | grep -c . | sed 's/^/vars=/'; env | grep -q WORKER_PRIVATE_MARKER && echo MARKER-LEAKED; env | grep -q BERTH_JOIN_TOKEN && echo TOKEN-LEAKED; \
         echo home=$HOME user=$USER; echo done"
    );
    let out = c.berth(&["submit", "--follow", "--env", "MINE=1", "--", "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("uid=931001 gid=931001"), "slot 1 runs as its own user:\n{text}");
    assert!(text.contains("ws=700:931001"), "its workspace is 0700 and its own:\n{text}");
    for refused in ["key-refused", "workdir-refused", "other-slot-refused", "worker-env-refused"] {
        assert!(text.contains(refused), "{refused}:\n{text}");
    }
    assert!(!text.contains("LEAKED"), "nothing of the worker's environment:\n{text}");
    let vars: usize = text.lines().find_map(|l| l.strip_prefix("vars=")).and_then(|v| v.trim().parse().ok()).unwrap_or(999);
    assert!(vars <= 14, "only PATH, HOME, USER, LOGNAME, the job's own and BERTH_* ({vars}):\n{text}");
    assert!(text.contains("user=berth-slot-1") && text.contains("/slots/1"), "{text}");
    std::fs::write(&gate, "")?;
    c.wait_state(&holder, "succeeded", Duration::from_secs(30))?;
    // `berth workers` says how jobs are contained.
    let ws = c.berth_json(&["workers", "--json"])?;
    let w = &ws.as_array().expect("list")[0];
    assert_eq!(w["host"]["containment"]["separate_users"], true, "{w}");
    assert_eq!(w["host"]["containment"]["enforced"], true, "{w}");
    let table = String::from_utf8_lossy(&c.berth(&["workers"]).stdout).into_owned();
    assert!(table.contains("contained"), "{table}");
    Ok(())
}

#[test]
fn cgroups_enforce_memory_cpu_and_pids_and_end_every_process() -> Result<()> {
    if !contained_host("cgroups_enforce") {
        return Ok(());
    }
    let mut c = Cluster::start()?;
    let base = 932000u32;
    c.spawn_worker_with("w1", 1, &["--slot-uid-base", &base.to_string(), "--pids-limit", "64"])?;
    c.wait_worker_connected("w1", true)?;

    // Out of memory: 137 and oom_killed, as for containers.
    let oom = c.submit(&["--mem", "32m", "--", "sh", "-c", "x=a; while :; do x=$x$x; done"])?;
    let st = c.wait_state(&oom, "failed", Duration::from_secs(60))?;
    assert_eq!(st["exit_code"], 137, "{st}");
    assert!(st["reason"].as_str().unwrap_or("").contains("oom_killed"), "{st}");

    // A fork bomb, bounded by the test (500 forks at most), is stopped at the pids limit:
    // the shell cannot fork the 64th process and ends; what it forked dies with it.
    let bomb = c.submit(&["--", "sh", "-c", "i=0; while [ $i -lt 500 ]; do sleep 300 & i=$((i+1)); done; echo all-forked"])?;
    let st = c.wait_state(&bomb, "failed", Duration::from_secs(60))?;
    let text = logs(&c, &bomb);
    assert!(text.contains("Cannot fork") && !text.contains("all-forked"), "forks beyond the limit fail: {text} {st}");
    wait_until("every process of the bomb to be gone", Duration::from_secs(60), || processes_of(base).is_empty())?;

    // Half a CPU: a busy loop of 2 s gets at most
    // 1 s of CPU time (100 ticks a second).
    let cpu = c.submit(&[
        "--cpus",
        "0.5",
        "--",
        "sh",
        "-c",
        "p=$(grep -E '^[0-9]+:(cpu|cpu,cpuacct|cpuacct,cpu):' /proc/self/cgroup | cut -d: -f3); [ -n \"$p\" ] || p=$(grep '^0::' /proc/self/cgroup | cut -d: -f3); \
         timeout 2 sh -c 'while :; do :; done'; echo ticks $(cut -d' ' -f16,17 /proc/$$/stat); \
         echo cgroup=$p",
    ])?;
    c.wait_state(&cpu, "succeeded", Duration::from_secs(30)).map_err(|e| e.context(logs(&c, &cpu)))?;
    let text = logs(&c, &cpu);
    let ticks: u64 = text.lines().find_map(|l| l.strip_prefix("ticks ")).map(|t| t.split_whitespace().filter_map(|t| t.parse::<u64>().ok()).sum()).unwrap_or(0);
    // The job cannot read its cgroup's files (0700, the worker's); the test can: the
    // kernel holds the quota for the job's cgroup (whether the loop met it depends on
    // what else this machine runs; that it got no more than half a CPU does not).
    let cg = text.lines().find_map(|l| l.strip_prefix("cgroup=")).unwrap_or("/").trim().trim_start_matches('/').to_string();
    let v1 = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/{cg}/cpu.cfs_quota_us")).map(|q| format!("{} 100000", q.trim()));
    let quota = v1.or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{cg}/cpu.max"))).unwrap_or_default();
    assert_eq!(quota.trim(), "50000 100000", "the job's cgroup ({cg}) has half a CPU: {text}");
    assert!(ticks > 0 && ticks <= 125, "0.5 CPU for 2 s used {ticks} ticks: {text}");

    // A child that leaves the process group (setsid) dies with its attempt: on cancel,
    // and when the main process exits.
    let escape = c.submit(&["--", "sh", "-c", "setsid sh -c 'echo escaped=$$; exec sleep 300' & sleep 300"])?;
    let text = wait_output(&c, &escape, "escaped=")?;
    let pid: i32 = text.split("escaped=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse().ok()).expect("pid");
    assert!(alive(pid));
    assert!(c.berth(&["cancel", &escape]).status.success());
    wait_until("the setsid'd process to die with its attempt", Duration::from_secs(20), || !alive(pid))?;
    let quick = c.submit(&["--", "sh", "-c", "setsid sh -c 'echo left=$$; exec sleep 300' & sleep 0.2"])?;
    c.wait_state(&quick, "succeeded", Duration::from_secs(30))?;
    let text = logs(&c, &quick);
    let Some(pid) = text.split("left=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse::<i32>().ok()) else {
        bail!("no pid in {text:?}");
    };
    wait_until("what the job left behind to be killed", Duration::from_secs(20), || !alive(pid))?;
    Ok(())
}

#[test]
fn output_written_after_sigterm_is_kept() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    let id = c.submit(&["--", "sh", "-c", "trap 'echo got-TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done"])?;
    wait_output(&c, &id, "ready")?;
    assert!(c.berth(&["cancel", &id]).status.success());
    wait_output(&c, &id, "got-TERM")?;
    let stdout = String::from_utf8_lossy(&c.berth(&["logs", &id]).stdout).into_owned();
    assert_eq!(stdout, "ready\ngot-TERM\n");
    let st = c.wait_state(&id, "cancelled", Duration::from_secs(10))?;
    wait_until("the attempt's exit code to be recorded", Duration::from_secs(20), || c.status(&id).is_ok_and(|s| s["exit_code"] == 7))?;
    assert!(st["reason"].as_str().unwrap_or("").contains("cancelled"), "{st}");
    Ok(())
}

#[test]
fn secrets_are_only_those_declared_on_the_worker_for_their_accounts() -> Result<()> {
    let mut c = Cluster::start()?;
    let file = c.path("secrets.toml");
    std::fs::write(&file, "[secrets.HF]\nenv = \"HF_SOURCE\"\naccounts = [\"research\"]\n")?;
    c.spawn_worker_env("w1", 1, &["--secrets", file.to_str().expect("utf8")], &[("HF_SOURCE", "hf-value-1".into()), ("PLAIN_VAR", "worker-only".into())])?;
    c.wait_worker_connected("w1", true)?;
    let out = c.berth(&["submit", "--follow", "--account", "research", "--secret", "TOKEN=HF", "--", "sh", "-c", "echo token=$TOKEN"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("token=hf-value-1"));
    // Another account, or any variable of the worker's environment: refused, with why.
    for (account, secret, why) in [
        ("intern", "TOKEN=HF", "no connected worker holds secret `HF` for account intern"),
        ("research", "T=PLAIN_VAR", "no connected worker holds secret `PLAIN_VAR`"),
        ("research", "T=BERTH_JOIN_TOKEN", "no connected worker holds secret `BERTH_JOIN_TOKEN`"),
    ] {
        let out = c.berth(&["submit", "--account", account, "--secret", secret, "--", "sh", "-c", "echo $T $TOKEN"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        assert!(err.contains(why), "submit warns: {err}");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let st = c.status(&id)?;
        assert_eq!(st["state"], "queued", "it never runs: {st}");
        assert!(st["waiting"].as_str().unwrap_or("").contains(why), "{st}");
        assert!(c.berth(&["cancel", &id]).status.success());
    }
    let ws = c.berth_json(&["workers", "--json"])?;
    assert_eq!(ws[0]["host"]["secrets"][0]["name"], "HF", "{ws}");
    assert!(!ws.to_string().contains("hf-value-1"), "values never leave the worker: {ws}");
    Ok(())
}
