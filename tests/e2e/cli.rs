//! Small things a user meets at the command line and in its listings, each test
//! one of them, through the real binaries.

use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use berth_e2e::{bin, group_members, run_timeout, wait_until, Cluster};
use serde_json::Value;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The one line a usage error prints on stderr.
fn one_line(out: &Output) -> String {
    let err = stderr(out).trim().to_string();
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    err
}

/// `berth ARGS` with its stdout a pipe nobody reads any more (as in `berth list | head
/// -1` once head has exited): the read end is closed before berth starts, so its first
/// write fails with EPIPE.
fn berth_closed_stdout(c: &Cluster, args: &[&str]) -> Result<Output> {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe()?;
    drop(read);
    let mut cmd = Command::new(bin("berth"));
    cmd.args(args).env("BERTH_PROFILE", &c.profile).env("NO_COLOR", "1").env("RUST_BACKTRACE", "1").stdin(Stdio::null());
    // run_timeout pipes stdout itself; spawn by hand to hand berth the dead pipe.
    cmd.stdout(Stdio::from(write)).stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            anyhow::bail!("berth {args:?} did not end within 30s with its stdout closed")
        }
    }
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() -> Result<()> {
    let mut c = Cluster::start()?;
    let admin = c.path("admin.toml");
    c.user("root", "admin", &admin)?;
    let out = c.berth_as(&admin, &["budget", "set", "--account", "alice", "--run", "1", "--month", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.add_worker("w1", 2)?;
    let done = c.submit(&["--name", "done", "--", "sh", "-c", "echo out; echo err >&2"])?;
    c.wait_state(&done, "succeeded", Duration::from_secs(30))?;
    // A job that prints until it is stopped: `logs -f` must stop when its reader has.
    let chatty = c.submit(&["--max-runtime", "2m", "--", "sh", "-c", "while true; do echo line; sleep 0.05; done"])?;
    c.wait_state(&chatty, "running", Duration::from_secs(30))?;
    let commands: &[&[&str]] = &[
        &["list"],
        &["list", "--json"],
        &["status", &done],
        &["status", &done, "--json"],
        &["logs", &done],
        &["logs", "-f", &chatty],
        &["workers"],
        &["workers", "--json"],
        &["budget", "show"],
        &["budget", "show", "--json"],
        &["images"],
        &["images", "--json"],
        &["submit", "--", "true"],
        &["submit", "--json", "--", "true"],
        &["submit", "--follow", "--", "echo", "followed"],
        &["completions", "bash"],
    ];
    for args in commands {
        let out = berth_closed_stdout(&c, args)?;
        let err = stderr(&out);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "berth {args:?} with a closed stdout: {err}");
        assert_eq!(out.status.code(), Some(0), "berth {args:?} ends quietly with a closed stdout: {err}");
    }
    let out = c.berth(&["cancel", &chatty]);
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

#[test]
fn user_text_is_escaped_in_tables_and_names_are_bounded() -> Result<()> {
    let mut c = Cluster::start()?;
    // Control bytes and huge names are refused at submit, with the limit named.
    for name in ["\x1b[2Jgone", "tab\there", "line\nbreak"] {
        let out = c.berth(&["submit", "--name", name, "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "name {name:?}: {}", stderr(&out));
        assert!(one_line(&out).contains("control character"), "{}", stderr(&out));
    }
    let huge = "n".repeat(100 * 1024);
    let out = c.berth(&["submit", "--name", &huge, "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = one_line(&out);
    assert!(err.contains("256") && err.len() < 400, "the limit is named, the name not echoed whole: {err}");
    let f = c.path("named.toml");
    std::fs::write(&f, format!("command = [\"true\"]\nname = \"{huge}\"\n"))?;
    let out = c.berth(&["submit", f.to_str().context("utf8")?]);
    assert_eq!(out.status.code(), Some(2), "a job file's name is bounded too: {}", stderr(&out));
    assert_eq!(c.berth_json(&["list", "--json"])?, serde_json::json!([]), "nothing was submitted");

    // The longest name allowed is cut short in the table, not padded into every row.
    let long = "x".repeat(256);
    c.submit(&["--name", &long, "--", "true"])?;
    c.submit(&["--name", "short", "--", "true"])?;
    let out = c.berth(&["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8(out.stdout)?;
    assert!(table.contains('…'), "a long cell ends in an ellipsis: {table}");
    assert!(table.lines().all(|l| l.chars().count() < 200), "rows stay narrow: {table}");
    assert!(table.lines().any(|l| l.contains("short")), "{table}");
    assert_eq!(c.berth_json(&["list", "--json"])?.as_array().map(|a| a.iter().any(|j| j["name"] == long.as_str())), Some(true), "--json is data");

    // Control bytes in a command and a reason are shown escaped, in `status` and its
    // events table; `--json` keeps them as they are, and `logs` is the job's own output.
    let esc = "\x1b]0;owned\x07\x1b[31m";
    let id = c.submit(&["--", "printf", esc])?;
    let out = c.berth(&["cancel", &id, "--reason", &format!("bye{esc}")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!out.stderr.contains(&0x1b), "what cancel says is escaped: {:?}", stderr(&out));
    let out = c.berth(&["status", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout)?;
    assert!(!text.contains('\x1b') && !text.contains('\x07'), "no raw control bytes reach the terminal: {text:?}");
    assert!(text.contains("printf \\x1b]0;owned\\x07\\x1b[31m"), "the command is shown escaped: {text}");
    assert!(text.contains("bye\\x1b]0;owned"), "the reason is shown escaped: {text}");
    let st = c.status(&id)?;
    assert!(st["command"].as_str().is_some_and(|s| s.contains(esc)), "{st}");

    c.add_worker("w1", 1)?;
    let job = c.submit(&["--", "printf", esc])?;
    c.wait_state(&job, "succeeded", Duration::from_secs(30))?;
    let out = c.berth(&["logs", &job]);
    assert_eq!(out.stdout, esc.as_bytes(), "logs print the job's bytes unchanged");
    Ok(())
}

#[test]
fn a_job_file_too_large_for_a_frame_is_an_invalid_spec() -> Result<()> {
    let c = Cluster::start()?;
    let f = c.path("big.toml");
    std::fs::write(&f, format!("command = [\"echo\", \"{}\"]\n", "a".repeat(9 * 1024 * 1024)))?;
    let out = c.berth(&["submit", f.to_str().context("utf8")?]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = one_line(&out);
    assert!(err.contains("big.toml") && err.contains("8 MiB"), "the file and the limit are named: {err}");
    assert_eq!(c.berth_json(&["list", "--json"])?, serde_json::json!([]));
    Ok(())
}

#[test]
fn a_join_token_lives_for_a_positive_bounded_time() -> Result<()> {
    let c = Cluster::start()?;
    for ttl in ["0s", "0", "0ms", "-5m", "1000000000d"] {
        let mut cmd = Command::new(bin("berth-coordinator"));
        cmd.args(["token", "create", "--role", "worker", "--ttl", ttl, "--data-dir"]).arg(&c.data);
        let out = run_timeout(cmd, Duration::from_secs(30))?;
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("--ttl") && !err.contains("panicked"), "--ttl {ttl}: {err}");
        assert!(out.stdout.is_empty(), "no token printed for --ttl {ttl}");
    }
    // A sane one still works.
    let mut cmd = Command::new(bin("berth-coordinator"));
    cmd.args(["token", "create", "--role", "worker", "--ttl", "10m", "--data-dir"]).arg(&c.data);
    let out = run_timeout(cmd, Duration::from_secs(30))?;
    assert!(out.status.success(), "{}", stderr(&out));
    Ok(())
}

#[test]
fn logs_of_an_attempt_that_does_not_exist_is_not_found() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    let id = c.submit(&["--", "echo", "hi"])?;
    c.wait_state(&id, "succeeded", Duration::from_secs(30))?;
    let out = c.berth(&["logs", &id, "--attempt", "1"]);
    assert_eq!((out.status.code(), out.stdout.as_slice()), (Some(0), &b"hi\n"[..]), "{}", stderr(&out));
    let out = c.berth(&["logs", &id, "--attempt", "999"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let err = one_line(&out);
    assert!(err.contains("999") && err.contains("attempt 1"), "the attempts that exist are named: {err}");
    assert!(out.stdout.is_empty());
    let out = c.berth(&["logs", &id, "--attempt", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A job that has not run yet has no second attempt either.
    let queued = c.submit(&["--gpus", "8", "--", "true"])?;
    let out = c.berth(&["logs", &queued, "--attempt", "2"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    one_line(&out);
    Ok(())
}

#[test]
fn a_missing_argument_is_named() -> Result<()> {
    // Parsing happens before any profile is read: no cluster needed.
    // (`berth status` alone shows the coordinator's own state.)
    let cases: &[(&[&str], &str)] = &[
        (&["logs"], "<JOB>"),
        (&["cancel"], "<JOB>"),
        (&["approve", "--reason", "ok"], "<JOB>"),
        (&["reject", "--reason", "no"], "<JOB>"),
        (&["approve"], "--reason"),
        (&["freeze"], "<JOB>"),
        (&["resume"], "<JOB>"),
        (&["workers", "drain"], "<NAME>"),
        (&["images", "rm"], "<IMAGE>"),
    ];
    for (args, missing) in cases {
        let mut cmd = Command::new(bin("berth"));
        cmd.args(*args).env("BERTH_PROFILE", "/nonexistent/profile.toml").stdin(Stdio::null());
        let out = run_timeout(cmd, Duration::from_secs(30))?;
        assert_eq!(out.status.code(), Some(2), "berth {args:?}: {}", stderr(&out));
        let err = one_line(&out);
        assert!(err.contains("required") && err.contains(missing), "berth {args:?} names {missing}: {err}");
    }
    Ok(())
}

fn worker_row(c: &Cluster, name: &str) -> Option<Value> {
    c.berth_json(&["workers", "--json"]).ok()?.as_array()?.iter().find(|w| w["name"] == name).cloned()
}

#[test]
fn a_dead_workers_recovered_leases_are_not_listed() -> Result<()> {
    let mut c = Cluster::start_with_ttl("2s")?;
    c.add_worker("w1", 1)?;
    let pidfile = c.path("job.pid");
    let id = c.submit(&["--max-runtime", "5m", "--", "sh", "-c", &format!("echo $$ > {}; exec sleep 60", pidfile.display())])?;
    c.wait_state(&id, "running", Duration::from_secs(30))?;
    wait_until("w1 to list the job's lease", Duration::from_secs(10), || worker_row(&c, "w1").is_some_and(|w| w["running"] == 1))?;
    let mut pgid = None;
    wait_until("the job to write its pid", Duration::from_secs(10), || {
        pgid = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok());
        pgid.is_some()
    })?;
    c.worker("w1").context("w1")?.kill9();
    let result = (|| {
        // Lease recovery sends the task back to the queue (no other worker takes it).
        wait_until("the task to be re-queued", Duration::from_secs(20), || c.status(&id).is_ok_and(|st| st["state"] == "queued" && st["attempts"] == 2))?;
        let mut last = None;
        wait_until("w1 to be listed down, holding nothing", Duration::from_secs(20), || {
            last = worker_row(&c, "w1");
            last.as_ref().is_some_and(|w| w["connected"] == false && w["running"] == 0 && w["leases"].as_array().is_some_and(Vec::is_empty))
        })
        .with_context(|| format!("last listing of w1: {last:?}"))?;
        let out = c.berth(&["workers"]);
        let table = String::from_utf8(out.stdout)?;
        let row = table.lines().find(|l| l.starts_with("w1")).context("w1 in the table")?.to_string();
        assert!(row.contains("down") && row.contains("0/1"), "{table}");
        anyhow::Ok(())
    })();
    // kill -9 left the job's process group running: end it (it is this test's).
    if let Some(pg) = pgid.filter(|pg| !group_members(*pg).is_empty()) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pg), nix::sys::signal::Signal::SIGKILL);
    }
    result
}

#[test]
fn every_submit_flag_has_help() -> Result<()> {
    let mut cmd = Command::new(bin("berth"));
    cmd.args(["submit", "--help"]).stdin(Stdio::null());
    let out = run_timeout(cmd, Duration::from_secs(30))?;
    assert!(out.status.success(), "{}", stderr(&out));
    let help = String::from_utf8(out.stdout)?;
    let flags = [
        "--name",
        "--array",
        "--env",
        "--secret",
        "--max-runtime",
        "--attempts",
        "--cpus",
        "--mem",
        "--gpus",
        "--gpu-model",
        "--min-vram",
        "--label-constraint",
        "--after",
        "--account",
        "--pool",
        "--image",
        "--network",
        "--priority",
        "--wait",
        "--follow",
        "--json",
        "--idempotency-key",
    ];
    for flag in flags {
        let line = help.lines().find(|l| l.trim_start().split([' ', ',']).next() == Some(flag)).with_context(|| format!("{flag} in:\n{help}"))?;
        // `      --cpus <CPUS>  What it is`: the text follows the flag after two spaces.
        let text = line.trim().split_once("  ").map(|(_, t)| t.trim()).unwrap_or("");
        assert!(text.len() > 5, "{flag} has help text: `{line}`");
    }
    Ok(())
}
