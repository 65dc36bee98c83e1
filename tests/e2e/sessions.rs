//! Sessions through the real binaries: `berth session open|status|logs|close` and
//! `berth exec` as a person uses them. Exit codes and streams, files that persist
//! across execs in a workspace of the session's own, execs at once, timeouts that kill
//! an exec's tree only, idle TTL and max lifetime, close, other users, the money a
//! session reserves and is charged, and a worker or coordinator killed under it. Every
//! wait is a condition polled with a deadline.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use berth_e2e::raw::session_spec;
use berth_e2e::{bin, group_members, wait_until, Cluster};
use serde_json::Value;

/// Runs a test body on a cluster; an error fails the test while the cluster is still
/// up, so its processes' logs are printed.
fn on(mut c: Cluster, body: impl FnOnce(&mut Cluster) -> Result<()>) {
    if let Err(e) = body(&mut c) {
        panic!("{e:?}");
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What a command printed, for a failing assertion.
fn shown(out: &Output) -> String {
    format!("exit {:?}\nstdout: {:?}\nstderr: {:?}", out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// `berth session open ARGS`: the session id it printed once the session was ready.
fn open(c: &Cluster, args: &[&str]) -> Result<String> {
    let mut all = vec!["session", "open"];
    all.extend_from_slice(args);
    let out = c.berth(&all);
    ensure!(out.status.success(), "berth session open {args:?}: {}", shown(&out));
    let id = text(&out.stdout).trim().to_string();
    ensure!(id.len() == 36, "session open printed `{id}`, not a session id");
    Ok(id)
}

/// `berth exec SID ARGS` (ARGS holds the flags, `--` and the command).
fn exec(c: &Cluster, sid: &str, args: &[&str]) -> Output {
    let mut all = vec!["exec", sid];
    all.extend_from_slice(args);
    c.berth(&all)
}

/// `berth exec SID ARGS` that must exit 0: its stdout.
fn exec_ok(c: &Cluster, sid: &str, args: &[&str]) -> Result<String> {
    let out = exec(c, sid, args);
    ensure!(out.status.code() == Some(0), "berth exec {sid} {args:?}: {}", shown(&out));
    Ok(text(&out.stdout))
}

/// `berth exec SID --detach ARGS`: the exec number it printed.
fn detach(c: &Cluster, sid: &str, args: &[&str]) -> Result<u64> {
    let mut all = vec!["--detach"];
    all.extend_from_slice(args);
    let out = exec_ok(c, sid, &all)?;
    out.trim().parse().with_context(|| format!("--detach printed `{out}`, not an exec number"))
}

fn status(c: &Cluster, sid: &str) -> Result<Value> {
    c.berth_json(&["session", "status", sid, "--json"])
}

/// Waits until the session is in `state`; its status then.
fn wait_session(c: &Cluster, sid: &str, state: &str, timeout: Duration) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(&format!("session {sid} to be {state}"), timeout, || match status(c, sid) {
        Ok(v) => {
            let ok = v["state"] == state;
            last = v;
            ok
        }
        Err(_) => false,
    })
    .with_context(|| format!("last status: {last}"))?;
    Ok(last)
}

/// Exec `n` (from 1) as `session status` lists it.
fn exec_info(st: &Value, n: u64) -> Result<Value> {
    let execs = st["execs"].as_array().context("execs")?;
    execs.iter().find(|e| e["exec"] == n).cloned().with_context(|| format!("no exec {n} in {st}"))
}

/// `berth session close SID`, which must exit 0: what it said on stderr.
fn close(c: &Cluster, sid: &str) -> Result<String> {
    let out = c.berth(&["session", "close", sid]);
    ensure!(out.status.code() == Some(0), "berth session close {sid}: {}", shown(&out));
    Ok(text(&out.stderr))
}

/// `berth ARGS` with `input` on its stdin (closed after it), bounded in time.
fn berth_with_stdin(c: &Cluster, args: &[&str], input: &[u8]) -> Result<Output> {
    let mut child = Command::new(bin("berth"))
        .args(args)
        .env("BERTH_PROFILE", &c.profile)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        // Dropped here: the command reads end of file.
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => Ok(r?),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            bail!("berth {args:?} with stdin did not finish within 60 s")
        }
    }
}

/// Whether a process runs (a zombie does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
}

/// Pids an exec wrote to `file` in the workspace, one a line, read by another exec
/// once all `n` lines are there.
fn wait_pids(c: &Cluster, sid: &str, file: &str, n: usize) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    wait_until(&format!("{n} pids in {file}"), Duration::from_secs(30), || {
        let Ok(out) = exec_ok(c, sid, &["--", "sh", "-c", &format!("cat {file} 2>/dev/null; true")]) else { return false };
        pids = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        pids.len() >= n && out.ends_with('\n')
    })?;
    Ok(pids)
}

/// Dollars as a whole number of millionths (what berth rounds charges to), exactly.
fn micro_usd(s: &str) -> Result<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    ensure!(frac.len() <= 6 && !whole.is_empty(), "`{s}` is not dollars to the millionth");
    let frac = format!("{frac:0<6}");
    Ok(whole.parse::<i64>()? * 1_000_000 + frac.parse::<i64>()?)
}

fn as_ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

#[test]
fn execs_exit_with_their_codes_and_keep_stdout_stderr_stdin_env_and_cwd() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 1)?;
        let sid = open(c, &["--env", "FROM_OPEN=opened"])?;

        // The two streams apart, and the command's own exit code.
        let out = exec(c, &sid, &["--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
        assert_eq!(out.status.code(), Some(7), "{}", shown(&out));
        assert_eq!(text(&out.stdout), "out\n", "{}", shown(&out));
        assert_eq!(text(&out.stderr), "err\n", "{}", shown(&out));

        // A program that does not exist: 127, as a shell says, and a message naming it.
        let out = exec(c, &sid, &["--", "no-such-program-berth-e2e"]);
        assert_eq!(out.status.code(), Some(127), "{}", shown(&out));
        assert!(text(&out.stderr).contains("no-such-program-berth-e2e"), "the message names the program: {}", shown(&out));

        // Stdin with -i, to its end.
        let out = berth_with_stdin(c, &["exec", &sid, "-i", "--", "tr", "a-z", "A-Z"], b"hello\nworld\n")?;
        assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
        assert_eq!(text(&out.stdout), "HELLO\nWORLD\n", "{}", shown(&out));
        // Without -i the command reads nothing (and does not wait for the caller's stdin).
        let out = berth_with_stdin(c, &["exec", &sid, "--", "sh", "-c", "cat; echo read-all"], b"not forwarded\n")?;
        assert_eq!(text(&out.stdout), "read-all\n", "{}", shown(&out));

        // The exec's env on top of the session's.
        let out = exec_ok(c, &sid, &["--env", "GREETING=hi there", "--", "sh", "-c", "echo \"$GREETING/$FROM_OPEN\""])?;
        assert_eq!(out, "hi there/opened\n");

        // --cwd into a directory an earlier exec made; the workspace by default.
        let ws = exec_ok(c, &sid, &["--", "pwd"])?.trim().to_string();
        exec_ok(c, &sid, &["--", "mkdir", "-p", "sub/dir"])?;
        let out = exec_ok(c, &sid, &["--cwd", "sub/dir", "--", "pwd"])?;
        assert_eq!(out.trim(), format!("{ws}/sub/dir"));

        // A --cwd that leaves the workspace is refused before anything runs.
        for bad in ["../x", "/tmp", "sub/../../x"] {
            let out = exec(c, &sid, &["--cwd", bad, "--", "touch", "escaped"]);
            assert_eq!(out.status.code(), Some(2), "--cwd {bad}: {}", shown(&out));
            assert!(text(&out.stderr).contains("workspace"), "--cwd {bad}: {}", shown(&out));
        }
        let st = status(c, &sid)?;
        let runs = st["execs"].as_array().map_or(0, |e| e.len());
        assert_eq!(runs, 8, "the refused execs were never numbered: {st}");
        assert_eq!(exec_info(&st, 1)?["exit_code"], 7, "{st}");
        close(c, &sid)?;
        Ok(())
    })
}

#[test]
fn files_persist_across_execs_in_a_workspace_of_the_sessions_own() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 2)?;
        let opened = c.berth_json(&["session", "open", "--json"])?;
        let a = opened["id"].as_str().context("id")?.to_string();
        assert_eq!(opened["worker"], "w1", "{opened}");
        let opened = c.berth_json(&["session", "open", "--json"])?;
        let b = opened["id"].as_str().context("id")?.to_string();
        assert_eq!(opened["worker"], "w1", "both on the one worker: {opened}");

        exec_ok(c, &a, &["--", "sh", "-c", "mkdir -p d && echo secret-of-a > d/f.txt"])?;
        assert_eq!(exec_ok(c, &a, &["--", "cat", "d/f.txt"])?, "secret-of-a\n", "a file written by one exec is read by the next");
        let ws_a = exec_ok(c, &a, &["--", "pwd"])?.trim().to_string();
        let ws_b = exec_ok(c, &b, &["--", "pwd"])?.trim().to_string();
        assert_ne!(ws_a, ws_b, "each session has a workspace of its own");

        // B's workspace holds nothing of A's, and A's is closed to B.
        assert_eq!(exec_ok(c, &b, &["--", "ls", "-A"])?, "", "a new session's workspace is empty");
        let out = exec(c, &b, &["--", "test", "-e", "d/f.txt"]);
        assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
        if nix::unistd::Uid::current().is_root() {
            let out = exec(c, &b, &["--", "cat", &format!("{ws_a}/d/f.txt")]);
            assert_ne!(out.status.code(), Some(0), "B read A's file: {}", shown(&out));
            assert!(!text(&out.stdout).contains("secret-of-a"), "{}", shown(&out));
            assert!(text(&out.stderr).contains("ermission denied"), "{}", shown(&out));
        }
        // A's file is still there for A.
        assert_eq!(exec_ok(c, &a, &["--", "cat", "d/f.txt"])?, "secret-of-a\n");
        close(c, &a)?;
        close(c, &b)?;
        Ok(())
    })
}

#[test]
fn execs_run_at_once_and_a_detached_execs_output_and_exit_code_are_followed() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 1)?;
        let sid = open(c, &[])?;
        let first = detach(c, &sid, &["--", "sleep", "30"])?;
        assert_eq!(first, 1, "execs are numbered from 1");

        // A second exec is not held up by the first.
        let t = Instant::now();
        let out = exec(c, &sid, &["--", "true"]);
        assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
        assert!(t.elapsed() < Duration::from_secs(10), "`true` took {:?} beside a running exec", t.elapsed());
        let st = status(c, &sid)?;
        assert_eq!(st["state"], "executing", "{st}");
        let one = exec_info(&st, 1)?;
        assert!(one["ended_at"].is_null() && one["exit_code"].is_null(), "the detached sleep still runs: {st}");
        assert_eq!(exec_info(&st, 2)?["exit_code"], 0, "{st}");

        // --detach, then follow its output to its end and its exit code.
        let n = detach(c, &sid, &["--", "sh", "-c", "echo one; sleep 1; echo two >&2; echo three; exit 3"])?;
        assert_eq!(n, 3);
        let n = n.to_string();
        let out = c.berth(&["session", "logs", &sid, "--exec", &n, "-f"]);
        assert_eq!(out.status.code(), Some(3), "-f exits with the exec's code: {}", shown(&out));
        assert_eq!(text(&out.stdout), "one\nthree\n", "{}", shown(&out));
        assert_eq!(text(&out.stderr), "two\n", "{}", shown(&out));
        // Once it ended, its recorded output is the same, without -f.
        let out = c.berth(&["session", "logs", &sid, "--exec", &n]);
        assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
        assert_eq!((text(&out.stdout), text(&out.stderr)), ("one\nthree\n".into(), "two\n".into()));
        let st = status(c, &sid)?;
        assert_eq!(exec_info(&st, 3)?["exit_code"], 3, "{st}");
        assert!(exec_info(&st, 1)?["ended_at"].is_null(), "the sleep runs on: {st}");
        close(c, &sid)?;
        Ok(())
    })
}

#[test]
fn an_exec_timeout_kills_that_execs_tree_and_nothing_else() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 1)?;
        let sid = open(c, &[])?;
        let neighbour = detach(c, &sid, &["--", "sh", "-c", "echo $$ > n.pid; exec sleep 60"])?;
        let npid = wait_pids(c, &sid, "n.pid", 1)?[0];
        assert!(alive(npid));

        let t = Instant::now();
        let out = exec(c, &sid, &["--timeout", "1s", "--", "sh", "-c", "echo $$ > t.pids; sleep 1000 & echo $! >> t.pids; sleep 1000"]);
        assert_eq!(out.status.code(), Some(124), "{}", shown(&out));
        assert!(t.elapsed() < Duration::from_secs(20), "a 1 s timeout took {:?}", t.elapsed());
        let st = status(c, &sid)?;
        let timed: Vec<&Value> = st["execs"].as_array().context("execs")?.iter().filter(|e| e["timed_out"] == true).collect();
        assert_eq!(timed.len(), 1, "one exec timed out: {st}");
        assert!(timed[0]["command"].to_string().contains("t.pids"), "{st}");

        // Nothing of that exec is left: its shell (the group leader) and the sleep it
        // put in the background.
        let pids = wait_pids(c, &sid, "t.pids", 2)?;
        wait_until("every process of the timed-out exec to be gone", Duration::from_secs(10), || {
            pids.iter().all(|p| !alive(*p)) && group_members(pids[0]).is_empty()
        })?;
        // The neighbour is untouched.
        assert!(alive(npid), "the detached neighbour {npid} was killed with the timed-out exec");
        let st = status(c, &sid)?;
        assert!(exec_info(&st, neighbour)?["ended_at"].is_null(), "the neighbour still runs: {st}");
        assert_eq!(st["state"], "executing", "{st}");
        close(c, &sid)?;
        wait_until("the neighbour to end with its session", Duration::from_secs(20), || !alive(npid))?;
        Ok(())
    })
}

#[test]
fn an_idle_session_expires_and_one_past_its_max_lifetime_ends_with_its_exec() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 2)?;
        // Idle TTL: nothing runs for 2 s.
        let idle = open(c, &["--idle-ttl", "2s"])?;
        let opened = Instant::now();
        let st = wait_session(c, &idle, "expired", Duration::from_secs(30))?;
        let reason = st["reason"].as_str().unwrap_or("");
        assert!(reason.contains("idle TTL"), "{st}");
        assert!(opened.elapsed() < Duration::from_secs(20), "expired after {:?}", opened.elapsed());
        let held = st["held_s"].as_f64().context("held_s")?;
        assert!((1.5..20.0).contains(&held), "held {held} s for a 2 s idle TTL: {st}");
        let out = exec(c, &idle, &["--", "true"]);
        assert_eq!(out.status.code(), Some(3), "an exec in an expired session: {}", shown(&out));

        // Max lifetime: 3 s, whatever runs.
        let t0 = Instant::now();
        let life = open(c, &["--max-lifetime", "3s", "--idle-ttl", "10m"])?;
        let n = detach(c, &life, &["--", "sleep", "30"])?;
        let (foreground, st) = std::thread::scope(|s| -> Result<(Output, Value)> {
            let fg = s.spawn(|| exec(c, &life, &["--", "sleep", "30"]));
            let st = wait_session(c, &life, "expired", Duration::from_secs(25))?;
            let fg = fg.join().map_err(|_| anyhow::anyhow!("the foreground exec's thread panicked"))?;
            Ok((fg, st))
        })?;
        assert!(t0.elapsed() < Duration::from_secs(25), "a 3 s lifetime ended after {:?}", t0.elapsed());
        assert!(st["reason"].as_str().unwrap_or("").contains("max lifetime"), "{st}");
        let held = st["held_s"].as_f64().context("held_s")?;
        assert!((2.5..20.0).contains(&held), "held {held} s for a 3 s lifetime: {st}");
        assert_ne!(foreground.status.code(), Some(0), "the foreground sleep 30 did not finish: {}", shown(&foreground));
        let ended = exec_info(&st, n)?;
        assert!(!ended["ended_at"].is_null(), "the detached exec ended with its session: {st}");
        let out = exec(c, &life, &["--", "true"]);
        assert_eq!(out.status.code(), Some(3), "{}", shown(&out));
        Ok(())
    })
}

#[test]
fn close_is_idempotent_and_a_closed_session_runs_nothing() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 1)?;
        let sid = open(c, &[])?;
        exec_ok(c, &sid, &["--", "true"])?;
        let said = close(c, &sid)?;
        assert!(said.contains(&format!("closed session {sid}")), "{said}");
        let st = status(c, &sid)?;
        assert_eq!(st["state"], "closed", "{st}");
        assert!(st["reason"].as_str().unwrap_or("").contains("closed by alice"), "{st}");
        let said = close(c, &sid)?;
        assert!(said.contains("had already ended"), "a second close: {said}");
        let out = exec(c, &sid, &["--", "true"]);
        assert_eq!(out.status.code(), Some(3), "{}", shown(&out));
        assert!(!text(&out.stderr).is_empty(), "the refusal says why");
        assert_eq!(status(c, &sid)?["execs"].as_array().map(|e| e.len()), Some(1), "the refused exec was not recorded");
        let list = c.berth_json(&["session", "list", "--json"])?;
        let row = list.as_array().and_then(|l| l.iter().find(|r| r["id"] == sid.as_str()).cloned()).context("listed")?;
        assert_eq!((row["state"].as_str(), row["execs"].as_u64()), (Some("closed"), Some(1)), "{row}");
        // The slot is free again: another session opens on the one-slot worker.
        let next = open(c, &[])?;
        exec_ok(c, &next, &["--", "true"])?;
        close(c, &next)?;
        Ok(())
    })
}

#[test]
fn another_users_session_is_not_found_and_an_admin_may_close_it() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 1)?;
        let bob = c.path("bob.toml");
        c.user("bob", "submitter", &bob)?;
        let root = c.path("root.toml");
        c.user("root", "admin", &root)?;
        let sid = open(c, &[])?;
        let n = detach(c, &sid, &["--", "sh", "-c", "echo alices"])?.to_string();
        for args in
            [vec!["exec", &sid, "--", "true"], vec!["session", "status", &sid], vec!["session", "logs", &sid, "--exec", &n], vec!["session", "close", &sid]]
        {
            let out = c.berth_as(&bob, &args);
            assert_eq!(out.status.code(), Some(5), "bob: berth {args:?}: {}", shown(&out));
            assert!(!text(&out.stdout).contains("alices"), "{}", shown(&out));
        }
        let list = c.berth_as(&bob, &["session", "list", "--json"]);
        assert!(list.status.success(), "{}", shown(&list));
        assert!(!text(&list.stdout).contains(&sid), "bob lists alice's session: {}", shown(&list));
        // Bob's attempts changed nothing: alice's session runs on.
        let st = status(c, &sid)?;
        assert_eq!(st["state"], "ready", "{st}");
        assert_eq!(st["execs"].as_array().map(|e| e.len()), Some(1), "{st}");

        let out = c.berth_as(&root, &["session", "close", &sid]);
        assert_eq!(out.status.code(), Some(0), "an admin closes it: {}", shown(&out));
        assert!(text(&out.stderr).contains(&format!("closed session {sid}")), "{}", shown(&out));
        let st = status(c, &sid)?;
        assert_eq!(st["state"], "closed", "{st}");
        assert!(st["reason"].as_str().unwrap_or("").contains("closed by root"), "{st}");
        Ok(())
    })
}

/// A paid pool without an approval threshold: $0.01 per vCPU-second.
const PAID_POOLS: &str = r#"
[[pool]]
name = "cloud"
kind = "cloud"
vcpu_usd_per_s = "0.01"
"#;

#[test]
fn a_session_reserves_its_lifetime_and_is_charged_the_time_it_was_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pools: PathBuf = dir.path().join("pools.toml");
    std::fs::write(&pools, PAID_POOLS).expect("pools file");
    let c = Cluster::start_with("30s", &["--pools", pools.to_str().expect("path")]).expect("cluster");
    on(c, |c| {
        let admin = c.path("root.toml");
        c.user("root", "admin", &admin)?;
        c.spawn_worker_with("cloud1", 1, &["--pool", "cloud"])?;
        c.wait_worker_connected("cloud1", true)?;
        let budget = |c: &Cluster| -> Result<Value> {
            let out = c.berth_as(&admin, &["budget", "show", "--account", "alice", "--json"]);
            ensure!(out.status.success(), "budget show: {}", shown(&out));
            Ok(serde_json::from_slice::<Value>(&out.stdout)?[0].clone())
        };
        let set = c.berth_as(&admin, &["budget", "set", "--account", "alice", "--run", "10", "--month", "10"]);
        assert!(set.status.success(), "{}", shown(&set));

        // Opening reserves 1 CPU × 60 s × $0.01/s = $0.60.
        let t_open = Instant::now();
        let sid = open(c, &["--cpus", "1", "--max-lifetime", "60s", "--pool", "cloud"])?;
        let t_ready = Instant::now();
        let st = status(c, &sid)?;
        assert_eq!((st["reserved_usd"].as_str(), st["spent_usd"].as_str()), (Some("0.6"), Some("0")), "{st}");
        let b = budget(c)?;
        assert_eq!((b["reserved"].as_str(), b["spent"].as_str()), (Some("0.6"), Some("0")), "{b}");

        // A short hold, then close.
        exec_ok(c, &sid, &["--", "sleep", "1"])?;
        let t_close = Instant::now();
        close(c, &sid)?;
        let t_closed = Instant::now();
        let st = wait_session(c, &sid, "closed", Duration::from_secs(10))?;
        let spent = st["spent_usd"].as_str().context("spent_usd")?.to_string();
        assert_eq!(st["reserved_usd"], "0", "the rest of the reservation is released: {st}");
        let b = budget(c)?;
        assert_eq!(b["reserved"], "0", "{b}");
        assert_eq!(b["spent"].as_str(), Some(spent.as_str()), "the ledger holds what the session was charged: {b} {st}");

        // At $0.01 per second a charge is exactly 10 millionths of a dollar per
        // millisecond held: the held time it implies lies between what the test saw.
        let micro = micro_usd(&spent)?;
        assert_eq!(micro % 10, 0, "${spent} is not a whole number of milliseconds at $0.01/s");
        let charged_ms = micro / 10;
        let (lo, hi) = (as_ms(t_close - t_ready), as_ms(t_closed - t_open));
        assert!(lo >= 1000, "the hold itself was {lo} ms");
        assert!((lo..=hi).contains(&charged_ms), "charged for {charged_ms} ms; the session was held between {lo} and {hi} ms: {st}");
        let held_ms = (st["held_s"].as_f64().context("held_s")? * 1000.0).round() as i64;
        assert!((charged_ms - held_ms).abs() <= 1000, "charged for {charged_ms} ms, status says held {held_ms} ms: {st}");

        // A session whose reservation passes a cap is refused when it opens, and
        // reserves nothing: 1 CPU × 20 min × $0.01/s = $12 > the $10 run cap.
        let out = c.berth(&["session", "open", "--cpus", "1", "--max-lifetime", "20m", "--pool", "cloud"]);
        assert_eq!(out.status.code(), Some(3), "{}", shown(&out));
        assert!(text(&out.stderr).contains("run window"), "the refusal names the window: {}", shown(&out));
        assert!(text(&out.stdout).is_empty(), "no session id: {}", shown(&out));
        let b = budget(c)?;
        assert_eq!((b["reserved"].as_str(), b["spent"].as_str()), (Some("0"), Some(spent.as_str())), "{b}");
        Ok(())
    })
}

#[test]
fn a_session_whose_worker_is_killed_ends_lost_and_runs_nothing_more() {
    on(Cluster::start_with_ttl("2s").expect("cluster"), |c| {
        c.add_worker("w1", 1)?;
        let sid = open(c, &[])?;
        exec_ok(c, &sid, &["--", "true"])?;
        c.worker("w1").context("w1")?.kill9();
        let t = Instant::now();
        let st = wait_session(c, &sid, "lost", Duration::from_secs(30))?;
        assert!(st["reason"].as_str().unwrap_or("").starts_with("lost:"), "{st}");
        assert!(t.elapsed() < Duration::from_secs(20), "lost {:?} after its worker died with a 2 s lease TTL", t.elapsed());
        let out = exec(c, &sid, &["--", "true"]);
        assert_eq!(out.status.code(), Some(3), "{}", shown(&out));
        let said = close(c, &sid)?;
        assert!(said.contains("had already ended"), "{said}");
        Ok(())
    })
}

#[test]
fn a_detached_exec_survives_a_coordinator_killed_under_it_with_its_output_once() {
    on(Cluster::start().expect("cluster"), |c| {
        c.add_worker("w1", 1)?;
        let sid = open(c, &[])?;
        let n = detach(c, &sid, &["--", "sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 1; done"])?.to_string();
        wait_until("the exec's first line to be stored", Duration::from_secs(20), || {
            let out = c.berth(&["session", "logs", &sid, "--exec", &n]);
            out.status.success() && text(&out.stdout).starts_with("1\n")
        })?;
        let before = text(&c.berth(&["session", "logs", &sid, "--exec", &n]).stdout);
        ensure!(!before.contains('5'), "the exec ended before the coordinator could be killed under it: {before:?}");
        c.kill_coordinator();
        c.restart_coordinator()?;
        let out = c.berth(&["session", "logs", &sid, "--exec", &n, "-f"]);
        assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
        assert_eq!(text(&out.stdout), "1\n2\n3\n4\n5\n", "each line once: {}", shown(&out));
        let st = status(c, &sid)?;
        let e = exec_info(&st, n.parse()?)?;
        assert_eq!(e["exit_code"], 0, "{st}");
        assert_eq!(st["state"], "ready", "the session outlived the restart: {st}");
        assert_eq!(exec_ok(c, &sid, &["--", "echo", "after"])?, "after\n");
        close(c, &sid)?;
        Ok(())
    })
}

/// A harness opening its trajectories at once on one connection, after some came and
/// went: every one is claimed (each claim looks at 16 jobs of an account, and said
/// nothing of the rest behind them, so 48 of these waited for news that never came).
#[test]
fn sessions_opened_at_once_on_one_connection_all_open() {
    let mut c = Cluster::start().expect("cluster");
    c.add_worker("w", 64).expect("worker");
    on(c, |c| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let raw = berth_e2e::raw::Raw::connect(&c.profile).await?;
            for _ in 0..11 {
                let id = raw.open_session(session_spec()).await?;
                raw.close_session(id).await?;
            }
            // Far more one-task jobs than one claim looks at: every one opens.
            futures::future::try_join_all((0..64).map(|_| raw.open_session(session_spec()))).await?;
            Ok::<_, anyhow::Error>(())
        })
    });
}
