//! Several coordinators on one PostgreSQL database: they serve workers at once, never
//! assign a task twice, hand lease recovery over when its holder dies, and workers and
//! clients fail over between them.
//!
//! Needs `BERTH_TEST_POSTGRES` (a URL whose user may create databases; `scripts/test`
//! starts a throwaway server and sets it). Under `CI=true` its absence is a failure.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use berth_e2e::*;

/// A fresh database on the test server, dropped when this goes away.
struct TestDb {
    admin: String,
    name: String,
    url: String,
}

impl TestDb {
    fn create() -> Result<Option<TestDb>> {
        let Ok(admin) = std::env::var("BERTH_TEST_POSTGRES") else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                bail!("BERTH_TEST_POSTGRES is not set: under CI the PostgreSQL tests must run (scripts/test starts a server)");
            }
            eprintln!("skipped: BERTH_TEST_POSTGRES is not set (scripts/test starts a throwaway PostgreSQL)");
            return Ok(None);
        };
        let name = format!("berth_e2e_{}", uuid::Uuid::new_v4().simple());
        let mut c = postgres::Client::connect(&admin, postgres::NoTls).context("connecting to BERTH_TEST_POSTGRES")?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))?;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Ok(Some(TestDb { admin, name, url }))
    }

    fn client(&self) -> Result<postgres::Client> {
        Ok(postgres::Client::connect(&self.url, postgres::NoTls)?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

/// Two coordinators (one CA: the second head node got a copy of the first's data
/// dir) on one database, each on its own port.
struct Pair {
    dir: tempfile::TempDir,
    coords: Vec<(String, Option<Proc>)>,
    workers: Vec<Proc>,
    profile: std::path::PathBuf,
    db: TestDb,
}

impl Pair {
    fn start(db: TestDb, lease_ttl: &str) -> Result<Pair> {
        let dir = tempfile::Builder::new().prefix("berth-pg-").tempdir()?;
        let a = dir.path().join("a");
        run_ok(Command::new(bin("berth-coordinator")).args(["init", "--data-dir"]).arg(&a))?;
        copy_dir(&a, &dir.path().join("b"))?;
        let mut coords = Vec::new();
        for name in ["a", "b"] {
            let mut cmd = Command::new(bin("berth-coordinator"));
            cmd.args(["run", "--listen", "127.0.0.1:0", "--lease-ttl", lease_ttl, "--store", &db.url, "--data-dir"])
                .arg(dir.path().join(name))
                .env("BERTH_LOG", "info,berth_coordinator=debug")
                .env("NO_COLOR", "1");
            let (p, addr) =
                spawn_ready(&format!("coordinator {name}"), cmd, &dir.path().join(format!("coord-{name}.log")), "ready addr=", Duration::from_secs(30))?;
            coords.push((addr, Some(p)));
        }
        let profile = dir.path().join("alice.toml");
        run_ok(
            Command::new(bin("berth-coordinator"))
                .args(["user", "add", "alice", "--role", "submitter", "--coordinator", &coords[0].0, "--coordinator", &coords[1].0, "--data-dir"])
                .arg(&a)
                .arg("--out")
                .arg(&profile),
        )?;
        Ok(Pair { dir, coords, workers: Vec::new(), profile, db })
    }

    /// A worker that knows both coordinators, `first` first.
    fn add_worker(&mut self, name: &str, slots: usize, first: usize) -> Result<()> {
        let token = run_ok(
            Command::new(bin("berth-coordinator"))
                .args(["token", "create", "--role", "worker", "--store", &self.db.url, "--data-dir"])
                .arg(self.dir.path().join("a")),
        )?;
        let token = String::from_utf8(token.stdout)?.trim().to_string();
        let list = format!("{},{}", self.coords[first].0, self.coords[1 - first].0);
        let log = self.dir.path().join(format!("worker-{name}.log"));
        let child = Command::new(bin("berth-worker"))
            .args(["--coordinator", &list, "--ca"])
            .arg(self.dir.path().join("a").join("ca.pem"))
            .arg("--work-dir")
            .arg(self.dir.path().join(format!("w-{name}")))
            .args(["--slots", &slots.to_string(), "--name", name, "--join-token", &token])
            .env("BERTH_LOG", "info,berth_worker=debug")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        self.workers.push(Proc { name: format!("worker {name}"), child, log });
        Ok(())
    }

    fn berth(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new(bin("berth"));
        cmd.args(args).env("BERTH_PROFILE", &self.profile).env("NO_COLOR", "1");
        run_timeout(cmd, Duration::from_secs(60))
    }

    fn status(&self, job: &str) -> Result<serde_json::Value> {
        let out = self.berth(&["status", job, "--json"])?;
        if !out.status.success() {
            bail!("berth status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn log(&self, i: usize) -> String {
        self.coords[i].1.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    fn leader(&self) -> Option<usize> {
        (0..2).find(|i| self.coords[*i].1.is_some() && self.log(*i).contains("now runs lease recovery"))
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        for (i, (addr, p)) in self.coords.iter().enumerate() {
            if let Some(p) = p {
                s.push_str(&format!("--- coordinator {i} ({addr})\n{}\n", tail(&p.log_text(), 60)));
            }
        }
        for w in &self.workers {
            s.push_str(&format!("--- {}\n{}\n", w.name, tail(&w.log_text(), 40)));
        }
        s
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn counts(st: &serde_json::Value, state: &str) -> u64 {
    st["counts"][state].as_u64().unwrap_or(0)
}

#[test]
fn two_coordinators_share_the_work_and_survive_losing_one() -> Result<()> {
    let Some(db) = TestDb::create()? else { return Ok(()) };
    let mut pair = Pair::start(db, "3s")?;
    let r = (|| -> Result<()> {
        pair.add_worker("w1", 4, 0)?;
        pair.add_worker("w2", 4, 1)?;
        wait_until("a lease recovery leader", Duration::from_secs(20), || pair.leader().is_some())?;
        let leader = pair.leader().context("leader")?;
        let out = pair.berth(&["submit", "--array", "1-1000", "--", "sh", "-c", "sleep 0.02; echo task $BERTH_ARRAY_INDEX"])?;
        if !out.status.success() {
            bail!("submit failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let job = String::from_utf8(out.stdout)?.trim().to_string();
        // Both coordinators serve a worker: each must have handed out tasks.
        wait_until("both workers running tasks", Duration::from_secs(60), || pair.status(&job).map(|st| counts(&st, "succeeded") >= 300).unwrap_or(false))?;
        // Kill the coordinator that runs lease recovery, midway.
        if let Some(mut p) = pair.coords[leader].1.take() {
            p.kill9();
        }
        let survivor = 1 - leader;
        wait_until("lease recovery to move to the survivor", Duration::from_secs(20), || pair.log(survivor).contains("now runs lease recovery"))?;
        wait_until("all 1000 tasks to succeed", Duration::from_secs(120), || pair.status(&job).map(|st| counts(&st, "succeeded") == 1000).unwrap_or(false))?;
        let st = pair.status(&job)?;
        assert_eq!(st["state"], "succeeded", "{st}");
        // Exactly once: one recorded success per task, each task in the tasks table once.
        let mut c = pair.db.client()?;
        let row = c.query_one(
            "SELECT count(*), count(DISTINCT idx) FROM events e JOIN jobs j ON j.seq = e.job_seq WHERE j.id = $1 AND e.state = 'succeeded'",
            &[&job_full_id(&st)],
        )?;
        let (n, distinct): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!((n, distinct), (1000, 1000), "each task succeeded exactly once");
        let row =
            c.query_one("SELECT count(*) FROM tasks t JOIN jobs j ON j.seq = t.job_seq WHERE j.id = $1 AND t.state = 'succeeded'", &[&job_full_id(&st)])?;
        assert_eq!(row.get::<_, i64>(0), 1000);
        // Both coordinators had workers: the survivor's log names both by the end
        // (the dead one's worker failed over to it).
        let log = pair.log(survivor);
        assert!(log.contains("worker=w1") && log.contains("worker=w2"), "both workers reached the survivor:\n{}", tail(&log, 40));
        // A client whose profile lists the dead coordinator first still gets through.
        let out = pair.berth(&["list", "--json"])?;
        assert!(out.status.success(), "list through the survivor: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    })();
    if r.is_err() {
        eprintln!("{}", pair.dump());
    }
    r
}

fn job_full_id(st: &serde_json::Value) -> String {
    st["id"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_submission_through_one_coordinator_wakes_a_worker_on_the_other() -> Result<()> {
    let Some(db) = TestDb::create()? else { return Ok(()) };
    let mut pair = Pair::start(db, "30s")?;
    let r = (|| -> Result<()> {
        // The only worker is on coordinator b; the client talks to a.
        pair.add_worker("wb", 2, 1)?;
        wait_until("the worker on b", Duration::from_secs(20), || pair.log(1).contains("worker connected"))?;
        let started = std::time::Instant::now();
        let out = pair.berth(&["submit", "--wait", "--", "sh", "-c", "echo hello from b"])?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Woken by the notification, not by a periodic scan.
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        Ok(())
    })();
    if r.is_err() {
        eprintln!("{}", pair.dump());
    }
    r
}
