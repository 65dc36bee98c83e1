//! The end-to-end harness: start the real binaries on loopback (port 0), read their
//! ready lines, talk to them as a user does, kill them on drop, and print what they
//! logged when a test fails. Also a raw protocol client for malformed-input tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A workspace binary, built next to the test binary's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built: run `cargo build --workspace` first", p.display());
    p
}

/// A pools file for the coordinator: one paid pool (`cloud`, $0.01 per vCPU-second)
/// whose jobs estimated at $5 or more wait for an approver.
pub const APPROVAL_POOLS: &str = r#"
[[pool]]
name = "cloud"
kind = "cloud"
vcpu_usd_per_s = "0.01"
approval_threshold_usd = "5"
"#;

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A child process that is killed (SIGKILL, by its pid) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (SIGKILL after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Spawns a process, its stderr (and stdout after the ready line) to a log file,
/// and waits for a stdout line starting with `ready_prefix`; returns the rest of it.
pub fn spawn_ready(name: &str, mut cmd: Command, log: &Path, ready_prefix: &str, timeout: Duration) -> Result<(Proc, String)> {
    let err = std::fs::File::create(log)?;
    cmd.stdout(Stdio::piped()).stderr(err).stdin(Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = mpsc::channel();
    let prefix = ready_prefix.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.starts_with(&prefix) {
                let _ = tx.send(line[prefix.len()..].to_string());
                sent = true;
            }
        }
    });
    let mut proc = Proc { name: name.into(), child, log: log.to_path_buf() };
    match rx.recv_timeout(timeout) {
        Ok(rest) => Ok((proc, rest)),
        Err(_) => {
            let status = proc.child.try_wait().ok().flatten();
            let text = proc.log_text();
            proc.kill9();
            bail!("{name} printed no `{ready_prefix}` line within {timeout:?} (exit: {status:?}); its log:\n{text}")
        }
    }
}

/// A coordinator, its workers and a user profile in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub coord: Option<Proc>,
    pub addr: String,
    pub lease_ttl: String,
    /// More flags for `berth-coordinator run`.
    pub coord_args: Vec<String>,
    pub workers: Vec<(String, Proc)>,
    pub profile: PathBuf,
}

impl Cluster {
    pub fn start() -> Result<Cluster> {
        Self::start_with_ttl("30s")
    }

    pub fn start_with_ttl(lease_ttl: &str) -> Result<Cluster> {
        Self::start_with(lease_ttl, &[])
    }

    /// A cluster whose coordinator gets more `run` flags (kept across restarts).
    pub fn start_with(lease_ttl: &str, coord_args: &[&str]) -> Result<Cluster> {
        Self::start_on(None, lease_ttl, coord_args)
    }

    /// `start_with`, the coordinator's data dir at `data` (on a filesystem the test
    /// made, say) instead of inside the cluster's temporary directory.
    pub fn start_on(data: Option<PathBuf>, lease_ttl: &str, coord_args: &[&str]) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("berth-e2e-").tempdir()?;
        // Jobs run as slot users of their own: they write the files a test waits on
        // (pids, gates) here, as in /tmp.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))?;
        }
        let data = data.unwrap_or_else(|| dir.path().join("coord"));
        run_ok(Command::new(bin("berth-coordinator")).args(["init", "--data-dir"]).arg(&data))?;
        let mut c = Cluster {
            data,
            coord: None,
            addr: String::new(),
            lease_ttl: lease_ttl.into(),
            coord_args: coord_args.iter().map(|a| a.to_string()).collect(),
            workers: Vec::new(),
            profile: dir.path().join("alice.toml"),
            dir,
        };
        c.start_coordinator("127.0.0.1:0")?;
        let profile = c.profile.clone();
        c.user("alice", "submitter", &profile)?;
        Ok(c)
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Makes a directory jobs may write to (they run as slot users of their own), as /tmp.
    pub fn job_dir(&self, p: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(p)?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o1777))?;
        Ok(())
    }

    /// (Re)starts the coordinator on `listen`.
    pub fn start_coordinator(&mut self, listen: &str) -> Result<()> {
        let mut cmd = Command::new(bin("berth-coordinator"));
        cmd.args(["run", "--data-dir"]).arg(&self.data).args(["--listen", listen, "--lease-ttl", &self.lease_ttl]).args(&self.coord_args);
        cmd.env("BERTH_LOG", "info,berth_coordinator=debug").env("NO_COLOR", "1");
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        let (p, addr) = spawn_ready("coordinator", cmd, &self.path(&format!("coordinator.{n}.log")), "ready addr=", Duration::from_secs(30))?;
        self.coord = Some(p);
        self.addr = addr;
        Ok(())
    }

    /// Kills the coordinator with SIGKILL (no shutdown, nothing flushed but what
    /// was committed).
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coord.take() {
            c.kill9();
        }
    }

    /// Starts the coordinator again on the address it had, so workers and profiles
    /// that know that address reconnect by themselves.
    pub fn restart_coordinator(&mut self) -> Result<()> {
        if let Some(mut c) = self.coord.take() {
            c.stop(Duration::from_secs(10));
        }
        let addr = self.addr.clone();
        // The port was just freed; another process could take it in between, so
        // retry a few times rather than settle for a new one.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.start_coordinator(&addr) {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restarting the coordinator on {addr}: {e:#}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e.context(format!("cannot restart the coordinator on {addr}"))),
            }
        }
        if self.addr != addr {
            bail!("the coordinator came back on {} instead of {addr}", self.addr);
        }
        Ok(())
    }

    pub fn token(&self) -> Result<String> {
        let out = run_ok(Command::new(bin("berth-coordinator")).args(["token", "create", "--role", "worker", "--data-dir"]).arg(&self.data))?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    pub fn user(&self, name: &str, role: &str, out: &Path) -> Result<()> {
        run_ok(
            Command::new(bin("berth-coordinator"))
                .args(["user", "add", name, "--role", role, "--coordinator", &self.addr, "--data-dir"])
                .arg(&self.data)
                .arg("--out")
                .arg(out),
        )?;
        Ok(())
    }

    /// The worker command line (without starting it).
    pub fn worker_cmd(&self, name: &str, slots: usize, token: Option<&str>) -> Command {
        let mut cmd = Command::new(bin("berth-worker"));
        cmd.args(["--coordinator", &self.addr, "--ca"]).arg(self.data.join("ca.pem")).arg("--work-dir").arg(self.path(&format!("w-{name}"))).args([
            "--slots",
            &slots.to_string(),
            "--name",
            name,
        ]);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        cmd.env("BERTH_LOG", "info,berth_worker=debug").env("NO_COLOR", "1");
        cmd
    }

    /// Enrols (first time) and starts a worker; waits until the coordinator lists it.
    pub fn add_worker(&mut self, name: &str, slots: usize) -> Result<()> {
        self.spawn_worker(name, slots)?;
        self.wait_worker_connected(name, true)
    }

    /// Enrols (first time) and starts a worker without waiting for it to connect
    /// (for workers that may be gone again before anyone could look).
    pub fn spawn_worker(&mut self, name: &str, slots: usize) -> Result<()> {
        self.spawn_worker_with(name, slots, &[])
    }

    /// `spawn_worker` with more `berth-worker` flags.
    pub fn spawn_worker_with(&mut self, name: &str, slots: usize, flags: &[&str]) -> Result<()> {
        self.spawn_worker_env(name, slots, flags, &[])
    }

    /// `spawn_worker_with` and environment variables (a fake `nvidia-smi` on `PATH`).
    pub fn spawn_worker_env(&mut self, name: &str, slots: usize, flags: &[&str], env: &[(&str, String)]) -> Result<()> {
        let enrolled = self.path(&format!("w-{name}")).join("worker.pem").exists();
        let token = if enrolled { None } else { Some(self.token()?) };
        let mut cmd = self.worker_cmd(name, slots, token.as_deref());
        cmd.args(flags);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let n = self.workers.len();
        let log = self.path(&format!("worker-{name}.{n}.log"));
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).stdin(Stdio::null());
        let child = cmd.spawn()?;
        self.workers.push((name.to_string(), Proc { name: format!("worker {name}"), child, log }));
        Ok(())
    }

    pub fn wait_worker_connected(&self, name: &str, connected: bool) -> Result<()> {
        wait_until(&format!("worker {name} connected={connected}"), Duration::from_secs(30), || {
            self.berth_json(&["workers", "--json"])
                .ok()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|ws| ws.iter().any(|w| w["name"] == name && w["connected"] == connected))
        })
    }

    pub fn worker(&mut self, name: &str) -> Option<&mut Proc> {
        self.workers.iter_mut().rev().find(|(n, _)| n == name).map(|(_, p)| p)
    }

    /// Runs `berth ARGS` with this cluster's profile.
    pub fn berth(&self, args: &[&str]) -> Output {
        self.berth_as(&self.profile, args)
    }

    pub fn berth_as(&self, profile: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("berth"));
        cmd.args(args).env("BERTH_PROFILE", profile).env("NO_COLOR", "1").stdin(Stdio::null());
        run_timeout(cmd, Duration::from_secs(120)).expect("berth ran")
    }

    /// Runs `berth ARGS` and parses its stdout as JSON (it must succeed).
    pub fn berth_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.berth(args);
        if !out.status.success() {
            bail!("berth {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `berth submit ARGS`, returning the job id it printed.
    pub fn submit(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["submit"];
        all.extend_from_slice(args);
        let out = self.berth(&all);
        if !out.status.success() {
            bail!("submit failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        let id = String::from_utf8(out.stdout)?.trim().to_string();
        if id.len() != 36 {
            bail!("submit printed `{id}`, not a job id");
        }
        Ok(id)
    }

    pub fn status(&self, job: &str) -> Result<serde_json::Value> {
        self.berth_json(&["status", job, "--json"])
    }

    pub fn wait_state(&self, job: &str, state: &str, timeout: Duration) -> Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        wait_until(&format!("job {job} to be {state}"), timeout, || match self.status(job) {
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

    /// Everything logged so far by the processes whose log files start with
    /// `prefix` (`coordinator`, `worker-w1`), oldest process first.
    pub fn logs_of(&self, prefix: &str) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path()).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log") && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)));
        logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.created()).ok());
        logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }

    /// Everything the processes logged, for a failing test.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            let mut logs: Vec<_> = rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
            logs.sort();
            for l in logs {
                let text = std::fs::read_to_string(&l).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(80).collect();
                out.push_str(&format!("---- {} (last {} lines)\n", l.display(), tail.len()));
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
        for (_, w) in self.workers.iter_mut() {
            w.stop(Duration::from_secs(5));
        }
        if let Some(c) = self.coord.as_mut() {
            c.stop(Duration::from_secs(5));
        }
    }
}

/// Runs a command to completion with a hard timeout.
pub fn run_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => Ok(r?),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            bail!("{cmd:?} did not finish within {timeout:?}")
        }
    }
}

pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// Processes whose process group is `pgid` (from /proc).
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command (which may hold spaces) in parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] state, f[1] ppid, f[2] pgrp
        if f.len() > 2 && f[2].parse::<i32>() == Ok(pgid) && f[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

pub mod bench;
pub mod docker;
pub mod raw;
pub mod store_sim;

/// A directory holding a fake `nvidia-smi` that reports `gpus` (index, model, MiB),
/// to put first on a worker's `PATH`: CI has no GPU.
pub fn fake_nvidia_smi(dir: &Path, gpus: &[(u32, &str, u64)]) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let mut lines = String::new();
    for (i, model, mib) in gpus {
        lines.push_str(&format!("{i}, GPU-{i:08x}-aaaa-bbbb-cccc-{:012x}, {model}, {mib} MiB\n", dir.as_os_str().len()));
    }
    let script = format!(
        "#!/bin/sh\n# A fake nvidia-smi for tests: answers the one query berth-worker makes.\ncase \"$*\" in\n  *--query-gpu=index,uuid,name,memory.total*) printf '{lines}' ;;\n  *) echo 'fake nvidia-smi' ;;\nesac\n"
    );
    let path = dir.join("nvidia-smi");
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir.to_path_buf())
}

/// `PATH` with `dir` first.
pub fn path_with(dir: &Path) -> String {
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default())
}
