//! Running jobs: arrays, exit codes, cancel, timeouts, output.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use berth_e2e::{bin, group_members, wait_until, Cluster};

#[test]
fn array_of_100_tasks_each_logs_its_own_line() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 4)?;
    let id = c.submit(&["--array", "1-100", "--", "sh", "-c", "echo task $BERTH_ARRAY_INDEX"])?;
    let st = c.wait_state(&id, "succeeded", Duration::from_secs(120))?;
    assert_eq!(st["counts"]["succeeded"], 100, "{st}");
    for i in 1..=100 {
        let out = c.berth(&["logs", &format!("{id}:{i}")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("task {i}\n"), "task {i}");
    }
    // The array as a whole: `list` shows it once, with all tasks counted.
    let list = c.berth_json(&["list", "--json"])?;
    let row = list.as_array().and_then(|a| a.iter().find(|j| j["id"] == id.as_str()).cloned()).expect("listed");
    assert_eq!(row["tasks"], 100);
    assert_eq!(row["state"], "succeeded");
    Ok(())
}

#[test]
fn wait_exits_with_the_jobs_exit_code() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 2)?;
    for (cmd, code) in [("exit 0", 0), ("exit 1", 1), ("exit 7", 7), ("kill -9 $$", 137), ("kill -TERM $$", 143)] {
        let out = c.berth(&["submit", "--wait", "--", "sh", "-c", cmd]);
        assert_eq!(out.status.code(), Some(code), "`{cmd}`: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.is_empty(), "--wait prints nothing on stdout");
    }
    // An array exits 0 only if every task succeeded.
    let ok = c.berth(&["submit", "--wait", "--array", "1-5", "--", "true"]);
    assert_eq!(ok.status.code(), Some(0));
    let bad = c.berth(&["submit", "--wait", "--array", "1-5", "--", "sh", "-c", "test $BERTH_ARRAY_INDEX -ne 3 || exit 9"]);
    assert_eq!(bad.status.code(), Some(9), "{}", String::from_utf8_lossy(&bad.stderr));
    // A failed job's status says why.
    let id = c.submit(&["--", "sh", "-c", "exit 7"])?;
    let st = c.wait_state(&id, "failed", Duration::from_secs(30))?;
    assert_eq!(st["exit_code"], 7);
    assert_eq!(st["attempts"], 1);
    assert_eq!(st["worker"], "w1");
    let states: Vec<&str> = st["events"].as_array().expect("events").iter().filter_map(|e| e["state"].as_str()).collect();
    assert_eq!(states, ["queued", "running", "failed"]);
    Ok(())
}

#[test]
fn cancel_kills_the_whole_process_group() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    let pidfile = c.path("job.pid");
    let script = format!("echo $$ > {}; sleep 1000 & sleep 1000", pidfile.display());
    let id = c.submit(&["--", "sh", "-c", &script])?;
    wait_until("the job to start", Duration::from_secs(30), || std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n')))?;
    let pgid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    wait_until("both sleeps to run", Duration::from_secs(10), || group_members(pgid).len() >= 3)?;
    let out = c.berth(&["cancel", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("every process of the job to be gone", Duration::from_secs(5), || group_members(pgid).is_empty())?;
    let st = c.wait_state(&id, "cancelled", Duration::from_secs(5))?;
    assert!(st["reason"].as_str().unwrap_or("").contains("cancelled by alice"), "{st}");
    // Cancelling again is an error that names the state.
    let again = c.berth(&["cancel", &id]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended"));
    // The worker still serves.
    let out = c.berth(&["submit", "--wait", "--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    Ok(())
}

#[test]
fn max_runtime_times_out() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    let id = c.submit(&["--max-runtime", "1s", "--", "sleep", "30"])?;
    let st = c.wait_state(&id, "timed_out", Duration::from_secs(20))?;
    assert!(st["reason"].as_str().unwrap_or("").contains("max runtime"), "{st}");
    Ok(())
}

#[test]
fn ten_megabytes_of_random_output_come_back_byte_identical() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    let expected = c.path("expected.bin");
    let script = format!("head -c 10000000 /dev/urandom > {0}; cat {0}; echo to-stderr >&2", expected.display());
    let id = c.submit(&["--", "sh", "-c", &script])?;
    c.wait_state(&id, "succeeded", Duration::from_secs(60))?;
    let out = c.berth(&["logs", &id]);
    assert!(out.status.success());
    let want = std::fs::read(&expected)?;
    assert_eq!(out.stdout.len(), want.len());
    assert!(out.stdout == want, "stdout differs from what the job printed");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
    Ok(())
}

#[test]
fn logs_follow_shows_lines_as_they_are_printed() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 1)?;
    let gate = c.path("gate");
    let script = format!("echo first; while [ ! -e {} ]; do sleep 0.05; done; echo second", gate.display());
    let id = c.submit(&["--", "sh", "-c", &script])?;
    let mut follow =
        Command::new(bin("berth")).args(["logs", "-f", &id]).env("BERTH_PROFILE", &c.profile).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut lines = BufReader::new(follow.stdout.take().expect("stdout")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Some(Ok(l)) = lines.next() {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30))?;
    assert_eq!(first, "first");
    // The job is still running: it waits for the gate.
    assert_eq!(c.status(&id)?["state"], "running");
    std::fs::write(&gate, b"")?;
    let second = rx.recv_timeout(Duration::from_secs(30))?;
    assert_eq!(second, "second");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = follow.try_wait()? {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "logs -f did not end with the job");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    Ok(())
}

#[test]
fn job_file_and_follow() -> Result<()> {
    let mut c = Cluster::start()?;
    c.add_worker("w1", 2)?;
    let file = c.path("job.toml");
    std::fs::write(
        &file,
        "name = \"from-file\"\nscript = \"echo $GREETING from $BERTH_ARRAY_INDEX\"\narray = \"1-3\"\nenv = { GREETING = \"hello\" }\nmax_runtime = \"1m\"\n",
    )?;
    let out = c.berth(&["submit", "--follow", file.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 1..=3 {
        assert!(text.contains(&format!("[{i}] hello from {i}")), "{text}");
    }
    let single = c.berth(&["submit", "--follow", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(single.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&single.stdout), "out\n");
    assert!(String::from_utf8_lossy(&single.stderr).contains("err\n"));
    Ok(())
}
