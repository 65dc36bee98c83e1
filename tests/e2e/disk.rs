//! The head node's disk: a coordinator whose data dir fills up refuses new work with a
//! clear error, says so in `berth status`, and once space returns stores every byte of
//! the output it could not take, once, with no second run of the attempt; a job's output
//! cap (`--max-output`, `max_output` in the coordinator's config) ends it failed with
//! what it wrote up to the cap.
//!
//! The data dir goes on a small tmpfs the test mounts (the tests run as root) and fills
//! with a file of its own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_e2e::{group_members, run_ok, wait_until, Cluster};

/// A tmpfs of a given size on a directory of its own, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs> {
        let dir = tempfile::Builder::new().prefix("berth-smallfs-").tempdir()?;
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "berth-e2e"]).arg(dir.path()))
            .context("mounting a small tmpfs for the coordinator's data dir (these tests run as root)")?;
        Ok(SmallFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Writes a file until the filesystem is full; returns how much it took.
    fn fill(&self) -> Result<u64> {
        let mut f = std::fs::File::create(self.filler())?;
        let mut written = 0u64;
        for block in [1 << 20, 4096, 512] {
            let buf = vec![0x5a_u8; block];
            loop {
                match f.write(&buf) {
                    Ok(n) if n > 0 => written += n as u64,
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => return Err(e.into()),
                }
                if written > 1 << 30 {
                    bail!("wrote 1 GiB into the small filesystem and it is not full");
                }
            }
        }
        Ok(written)
    }

    fn unfill(&self) -> Result<()> {
        Ok(std::fs::remove_file(self.filler())?)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(self.dir.path()).status().is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file there: detach it now, freed once let go.
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn seq(from: u32, to: u32) -> String {
    (from..=to).map(|i| format!("{i}\n")).collect()
}

#[test]
fn a_full_disk_refuses_new_work_and_loses_no_output_once_space_returns() -> Result<()> {
    let fs = SmallFs::mount("32m")?;
    // A short lease TTL: leases whose renewals could not be stored must not expire.
    let mut c = Cluster::start_on(Some(fs.path().join("coord")), "3s", &[])?;
    c.add_worker("w1", 1)?;
    let (go, done) = (c.path("go"), c.path("done"));
    let script = format!("seq 1 20000; while [ ! -e {go} ]; do sleep 0.05; done; seq 20001 300000; touch {done}", go = go.display(), done = done.display());
    let id = c.submit(&["--", "sh", "-c", &script])?;
    wait_until("the first output to be stored", Duration::from_secs(30), || text(&c.berth(&["logs", &id]).stdout).ends_with("20000\n"))?;

    let filled = fs.fill()?;
    eprintln!("filled the coordinator's filesystem with {filled} bytes");
    std::fs::write(&go, "")?;
    wait_until("the job to have written all its output", Duration::from_secs(30), || done.exists())?;
    wait_until("the coordinator to say its disk is full", Duration::from_secs(30), || {
        c.berth_json(&["status", "--json"]).is_ok_and(|v| v["store"]["writable"] == false && v["store"]["disk_full"] == true)
    })?;

    // New work is refused at once, in one line that says why.
    let t = Instant::now();
    let out = c.berth(&["submit", "--", "true"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a submission was accepted on a full disk: {}", text(&out.stdout));
    assert!(t.elapsed() < Duration::from_secs(10), "the refusal took {:?}", t.elapsed());
    assert!(err.contains("disk is full") && err.trim().lines().count() == 1, "{err}");
    // `berth status` (the coordinator) and `berth status JOB` say so.
    let out = c.berth(&["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("disk is full"), "{}", text(&out.stdout));
    let out = c.berth(&["status", &id]);
    assert!(text(&out.stderr).contains("disk is full"), "{}", text(&out.stderr));
    let out = c.berth(&["workers"]);
    assert!(text(&out.stderr).contains("disk is full"), "{}", text(&out.stderr));

    // Meanwhile the job keeps its slot and its only attempt, longer than a lease TTL.
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let st = c.status(&id)?;
        assert_eq!(st["state"], "running", "{st}");
        assert_eq!(st["attempts"], 1, "{st}");
        std::thread::sleep(Duration::from_millis(250));
    }

    fs.unfill()?;
    let st = c.wait_state(&id, "succeeded", Duration::from_secs(60))?;
    assert_eq!(st["attempts"], 1, "{st}");
    let states: Vec<&str> = st["events"].as_array().expect("events").iter().filter_map(|e| e["state"].as_str()).collect();
    assert_eq!(states, ["queued", "running", "succeeded"], "{st}");
    let out = c.berth(&["logs", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = text(&out.stdout);
    let want = seq(1, 300000);
    assert_eq!(logs.len(), want.len(), "stored output is {} bytes, the job wrote {}", logs.len(), want.len());
    assert!(logs == want, "stored output differs from what the job wrote");

    // It went the way it should: output refused, then asked of the worker again.
    let coord = c.logs_of("coordinator");
    assert!(coord.contains("cannot store output") && coord.contains("asking the worker to send the output it could not store"), "{}", c.dump());
    assert!(c.logs_of("worker-w1").contains("unacknowledged output again"), "{}", c.dump());

    let v = c.berth_json(&["status", "--json"])?;
    assert_eq!(v["store"]["writable"], true, "{v}");
    let out = c.berth(&["submit", "--wait", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    Ok(())
}

#[test]
fn an_output_cap_fails_the_job_and_keeps_its_output_up_to_the_cap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "max_output = \"2M\"\n")?;
    let config = config.display().to_string();
    let mut c = Cluster::start_with("30s", &["--config", &config])?;
    c.add_worker("w1", 1)?;

    // 10 MB against a cap of 1 MiB: failed soon, the process killed, 1 MiB kept.
    let pidfile = c.path("job.pid");
    let script = format!("echo $$ > {}; yes 0123456789abcdef | head -c 10000000; exec sleep 300", pidfile.display());
    let t = Instant::now();
    let id = c.submit(&["--max-output", "1M", "--", "sh", "-c", &script])?;
    let st = c.wait_state(&id, "failed", Duration::from_secs(30))?;
    eprintln!("ended failed {:?} after the submission", t.elapsed());
    let reason = st["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("output cap of 1 MiB") && reason.contains("MiB written"), "{st}");
    assert_eq!(st["attempts"], 1, "{st}");
    let pgid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    wait_until("the job's processes to be killed", Duration::from_secs(10), || group_members(pgid).is_empty())?;
    let out = c.berth(&["logs", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 1 << 20, "stored output is the cap");
    assert!(out.stdout.chunks(17).all(|l| l == &b"0123456789abcdef\n"[..l.len()]), "stored output is what the job wrote");
    let text_status = text(&c.berth(&["status", &id]).stdout);
    assert!(text_status.contains("output cap of 1 MiB"), "{text_status}");

    // The slot is free again, and without --max-output the config's 2 MiB applies.
    let id = c.submit(&["--", "sh", "-c", "yes 0123456789abcdef | head -c 5000000"])?;
    let st = c.wait_state(&id, "failed", Duration::from_secs(30))?;
    assert!(st["reason"].as_str().unwrap_or_default().contains("output cap of 2 MiB"), "{st}");
    assert_eq!(st["max_output"], 2 << 20, "{st}");
    assert_eq!(c.berth(&["logs", &id]).stdout.len(), 2 << 20);

    // Under its cap a job succeeds with all its output; a job file may set the cap.
    let job = c.path("small.toml");
    std::fs::write(&job, "script = \"yes 0123456789abcdef | head -c 500000\"\nmax_output = \"1M\"\n")?;
    let id = c.submit(&[job.to_str().expect("utf-8 path")])?;
    let st = c.wait_state(&id, "succeeded", Duration::from_secs(30))?;
    assert_eq!(st["max_output"], 1 << 20, "{st}");
    assert_eq!(c.berth(&["logs", &id]).stdout.len(), 500_000);

    // A cap of nothing is a usage error.
    let out = c.berth(&["submit", "--max-output", "0", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    Ok(())
}
