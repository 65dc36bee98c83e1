//! The process executor: the command runs as a child in the slot workspace, in its
//! own process group and, where cgroups can be used, in its slot's cgroup, as the
//! slot's own unprivileged user with a clean environment (`crate::contain`). The
//! attempt ends as a whole: when its main process exits, or it is cancelled or times
//! out, every process it started is killed (by its cgroup, so one that left the group
//! dies too), and its output is read until the last of them is gone.
//!
//! A worker that is killed outright (SIGKILL, OOM killer, power cut on a VM that comes
//! back) cannot kill its attempts: they run on, orphaned. So each attempt's group is
//! written down (`Launch::record`) until it is gone, and a starting worker kills the
//! groups its previous run left (`kill_left_over`) and empties the slots' cgroups.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_shared::job::Outcome;
use berth_shared::wire::{Containment as Summary, KillReason, OutStream};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::fd::AsRawFd;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use futures::future::BoxFuture;

use super::{Ended, Executor, Job, Launch, Opened, Report, Reports, Setup};
use crate::contain::{Containment, JobIdentity, Limits, SlotContainment};
use crate::spool::Spool;
use crate::WorkerError;

/// The executor's name (`--executor process`).
pub const NAME: &str = "process";

/// The process executor as a worker offers it: how its slots are contained, and where
/// it records the process group of each slot's attempt (`groups/slot-<n>`, rewritten in
/// place per attempt: creating and deleting a file per attempt costs more than a
/// trivial job).
pub struct ProcessExecutor {
    groups: PathBuf,
    contain: Arc<Containment>,
}

/// Kills the process groups an earlier run of this worker left running (whether or
/// not the executor is offered now), then offers it if asked, with its slots contained.
pub fn open<'a>(s: &'a Setup<'a>) -> BoxFuture<'a, Result<Opened, WorkerError>> {
    Box::pin(async move {
        let groups = s.cfg.work_dir.join("groups");
        // Attempts of a previous run of this worker that was killed outright are still
        // running, unknown to anyone: their leases are lost, their results would be refused.
        let left_over = kill_left_over(&groups);
        if left_over > 0 {
            tracing::warn!(groups = left_over, "killed attempts left over from before this worker restarted");
        }
        if !s.asked {
            return Ok(Opened::NotAsked);
        }
        let contain = Containment::open(&s.cfg.contain, &s.cfg.name, &s.cfg.work_dir, s.cfg.slots).map_err(WorkerError::Setup)?;
        Ok(Opened::Offered(Box::new(ProcessExecutor { groups, contain: Arc::new(contain) })))
    })
}

impl Executor for ProcessExecutor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn containment(&self) -> Option<Summary> {
        Some(self.contain.summary())
    }

    fn workspace_owner(&self, slot: usize) -> Option<(u32, u32)> {
        self.contain.slot(slot).identity.map(|i| (i.uid, i.gid))
    }

    fn open_session(&self, job: Job<'_>, reports: Reports) {
        let lease = job.assignment.lease;
        let slot = self.contain.slot(job.slot);
        let r = &job.assignment.spec.resources;
        let limits = Limits { millicpus: r.millicpus, mem_mib: r.mem_mib, pids: slot.pids_limit };
        let (workspace, mut kill, started) = (job.launch.workspace, job.controls.kill, reports.clone());
        job.spool.close();
        super::spawn_attempt(lease, job.span, reports, async move {
            let begin = Instant::now();
            let fail = |error: String| Ended { outcome: super::not_started(Some(1), error), frozen: None };
            if let Err(e) = crate::contain::own_workspace(&workspace, slot.identity.as_ref()) {
                return fail(format!("cannot give the workspace {} to the session's user: {e}", workspace.display()));
            }
            if let Some(cg) = &slot.cgroup {
                if let Err(e) = cg.limit(limits) {
                    return fail(format!("cannot set the session's limits: {e}"));
                }
            }
            let _ = started.send(Report::Started(lease));
            let reason = super::kill_asked(&mut kill).await;
            // Whatever its execs left behind goes with it.
            if let Some(cg) = &slot.cgroup {
                cg.kill();
                if !cg.emptied(Duration::from_secs(10)).await {
                    tracing::warn!(left = cg.members().len(), "processes of the session outlived a kill of its cgroup for 10 s");
                }
            }
            let runtime_ms = begin.elapsed().as_millis() as u64;
            let timed_out = reason == KillReason::TimedOut;
            Ended { outcome: Outcome { exit_code: None, signal: None, timed_out, killed: !timed_out, runtime_ms, error: None }, frozen: None }
        });
    }

    fn exec(&self, e: super::ExecJob, reports: Reports) {
        use tracing::Instrument;
        let slot = self.contain.slot(e.slot);
        let (lease, exec) = (e.lease, e.exec);
        let child = match slot.cgroup.as_ref().map(|cg| cg.child(&format!("exec-{exec}"))) {
            Some(Err(why)) => {
                e.spool.close();
                let _ = reports.send(Report::ExecEnded(lease, exec, super::not_started(Some(125), format!("cannot contain the exec: {why}"))));
                return;
            }
            Some(Ok(c)) => Some(Arc::new(c)),
            None => None,
        };
        let confine = Confine { slot: SlotContainment { cgroup: child, ..slot }, limits: None };
        let io = ExecIo { cwd: e.cwd, stdin: e.stdin };
        tokio::spawn(
            async move {
                let outcome = run_exec(e.launch, confine, e.spool, e.kill, io).await;
                tracing::debug!(exit = ?outcome.exit_code, "exec ended");
                let _ = reports.send(Report::ExecEnded(lease, exec, outcome));
            }
            .instrument(e.span),
        );
    }

    fn spawn(&self, job: Job<'_>, reports: Reports) {
        let lease = job.assignment.lease;
        let mut launch = job.launch;
        launch.record = Some(self.groups.join(format!("slot-{}", job.slot)));
        let slot = self.contain.slot(job.slot);
        let r = &job.assignment.spec.resources;
        let limits = Limits { millicpus: r.millicpus, mem_mib: r.mem_mib, pids: slot.pids_limit };
        let confine = Confine { slot, limits: Some(limits) };
        let (spool, kill, started) = (job.spool, job.controls.kill, reports.clone());
        super::spawn_attempt(lease, job.span, reports, async move {
            let outcome = run(launch, confine, spool, kill, move |_| {
                let _ = started.send(Report::Started(lease));
            })
            .await;
            Ended { outcome, frozen: None }
        });
    }
}

/// How one attempt is contained: its slot's identity and cgroup, and its limits.
#[derive(Clone, Debug, Default)]
pub struct Confine {
    pub slot: SlotContainment,
    /// Written to the slot's cgroup before the process starts (`None`: as they are,
    /// for an exec in a session whose limits were set when it opened).
    pub limits: Option<Limits>,
}

/// What one read may take from a job's pipe: a whole chunk, so a job that prints fast
/// sends few large chunks (each is a spool record, a frame and a stored row).
const READ_BUF: usize = berth_shared::wire::MAX_CHUNK_BYTES;

/// The pipe buffer asked for (the unprivileged limit by default): a fast writer keeps
/// writing while the worker spools what it read, instead of blocking on 64 KiB.
const PIPE_BYTES: i32 = 1 << 20;

fn signal_group(pgid: i32, sig: Signal) {
    // ESRCH (the group is already gone) is the expected case after a clean exit.
    let _ = killpg(Pid::from_raw(pgid), sig);
}

/// Grows a pipe's buffer; a smaller pipe only costs speed, so failure is ignored.
fn grow_pipe(fd: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
}

/// Copies a pipe into the spool. A read returns what is there; whatever more is
/// already waiting is taken too (without waiting), so a chunk holds up to `READ_BUF`
/// while a line printed now and then still goes out at once.
async fn pump<R: AsyncRead + Unpin>(mut r: R, stream: OutStream, spool: Arc<Spool>) {
    loop {
        // Read into spare capacity (nothing zeroed); the buffer becomes the chunk.
        let mut buf = Vec::with_capacity(READ_BUF);
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut ended = false;
        while buf.len() < READ_BUF {
            match r.read_buf(&mut buf).now_or_never() {
                Some(Ok(0)) | Some(Err(_)) => {
                    ended = true;
                    break;
                }
                Some(Ok(_)) => {}
                None => break,
            }
        }
        if let Err(e) = spool.append_owned(stream, buf) {
            tracing::error!(error = %e, "cannot write output to the spool; output is being dropped");
        }
        if ended {
            return;
        }
    }
}

enum End {
    Exited(std::process::ExitStatus),
    TimedOut,
    Killed(KillReason),
}

/// The variables every job gets before its own: a `PATH`, and `HOME`, `USER` and
/// `LOGNAME` for its identity. Nothing else of the worker's environment reaches it.
fn base_env(workspace: &Path, id: Option<&JobIdentity>) -> Vec<(String, String)> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut env = vec![("PATH".to_string(), path), ("HOME".to_string(), workspace.to_string_lossy().into_owned())];
    if let Some(id) = id {
        env.push(("USER".into(), id.name.clone()));
        env.push(("LOGNAME".into(), id.name.clone()));
    }
    env
}

/// Runs one attempt to its end. `started` is called with the process group id once
/// the child runs; `kill` asks for the attempt to be killed.
pub async fn run(launch: Launch, confine: Confine, spool: Arc<Spool>, kill: watch::Receiver<Option<KillReason>>, started: impl FnOnce(i32)) -> Outcome {
    run_inner(launch, confine, spool, kill, None, started).await
}

/// What an exec of a session has that an attempt has not: a working directory inside
/// the workspace, and stdin from its client (each message a piece; an empty one, or
/// the sender gone, closes it).
pub struct ExecIo {
    pub cwd: PathBuf,
    pub stdin: Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>,
}

/// Runs one exec of a session to its end: as `run`, in the session's workspace (made
/// its user's when it opened) and in the exec's own cgroup inside the slot's, whose
/// limits the session set.
pub async fn run_exec(launch: Launch, confine: Confine, spool: Arc<Spool>, kill: watch::Receiver<Option<KillReason>>, io: ExecIo) -> Outcome {
    run_inner(launch, confine, spool, kill, Some(io), |_| {}).await
}

async fn run_inner(
    launch: Launch,
    confine: Confine,
    spool: Arc<Spool>,
    mut kill: watch::Receiver<Option<KillReason>>,
    io: Option<ExecIo>,
    started: impl FnOnce(i32),
) -> Outcome {
    let begin = Instant::now();
    let fail = |code: i32, error: String| Outcome { exit_code: Some(code), signal: None, timed_out: false, killed: false, runtime_ms: 0, error: Some(error) };
    let Some(program) = launch.argv.first() else {
        spool.close();
        return fail(127, "the command is empty".into());
    };
    let identity = confine.slot.identity.clone();
    let cgroup = confine.slot.cgroup.clone();
    if io.is_none() {
        if let Err(e) = crate::contain::own_workspace(&launch.workspace, identity.as_ref()) {
            spool.close();
            return fail(1, format!("cannot give the workspace {} to the job's user: {e}", launch.workspace.display()));
        }
    }
    let oom_before = match &cgroup {
        Some(cg) => {
            if let Some(limits) = confine.limits {
                if let Err(e) = cg.limit(limits) {
                    spool.close();
                    return fail(1, format!("cannot set the attempt's limits: {e}"));
                }
            }
            cg.oom_kills()
        }
        None => 0,
    };
    let (cwd, stdin_rx) = match io {
        Some(io) => (io.cwd, io.stdin),
        None => (launch.workspace.clone(), None),
    };
    let procs = cgroup.as_ref().map(|c| c.procs_fds()).unwrap_or_default();
    let env: Vec<(String, String)> = base_env(&launch.workspace, identity.as_ref()).into_iter().chain(launch.env.iter().cloned()).collect();
    let spawned = crate::contain::spawn::spawn(crate::contain::spawn::Spawn {
        argv: &launch.argv,
        env,
        cwd: &cwd,
        stdin: stdin_rx.is_some(),
        procs: &procs,
        identity: identity.as_ref().map(|i| (i.uid, i.gid)),
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            spool.close();
            // As a shell says it: 126 found but not runnable, 127 not found (or not started).
            let code = if e.kind() == std::io::ErrorKind::PermissionDenied { 126 } else { 127 };
            return fail(code, format!("cannot start `{program}`: {e}"));
        }
    };
    let pgid = child.id();
    if let Some(path) = &launch.record {
        record_group(path, pgid);
    }
    started(pgid);
    if let Some(o) = child.stdout.as_ref() {
        grow_pipe(o);
    }
    if let Some(e) = child.stderr.as_ref() {
        grow_pipe(e);
    }
    if let (Some(mut input), Some(mut rx)) = (child.stdin.take(), stdin_rx) {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(data) = rx.recv().await {
                if data.is_empty() || input.write_all(&data).await.is_err() {
                    break;
                }
            }
            // Dropped: the command reads end of file.
        });
    }
    let out = child.stdout.take().map(|o| tokio::spawn(pump(o, OutStream::Stdout, spool.clone())));
    let err = child.stderr.take().map(|e| tokio::spawn(pump(e, OutStream::Stderr, spool.clone())));

    // Every process of the attempt: its group and, with a cgroup, whatever left it.
    let signal_all = |sig: Signal| {
        signal_group(pgid, sig);
        if let Some(cg) = &cgroup {
            if sig == Signal::SIGKILL {
                cg.kill();
            } else {
                cg.signal(sig);
            }
        }
    };
    let timer = super::deadline_passed(launch.max_runtime.map(|d| tokio::time::Instant::now() + d));
    let killed = super::kill_asked(&mut kill);
    let end = tokio::select! {
        s = child.wait() => match s {
            Ok(s) => End::Exited(s),
            Err(e) => {
                signal_all(Signal::SIGKILL);
                forget_group(&launch.record);
                spool.close();
                return fail(1, format!("lost track of the process: {e}"));
            }
        },
        _ = timer => End::TimedOut,
        r = killed => End::Killed(r),
    };
    let status = match end {
        End::Exited(s) => {
            // The main process is done: end whatever it left behind.
            signal_all(Signal::SIGKILL);
            Ok(s)
        }
        other => {
            // SIGTERM to all of it; within the grace, the main process and (with a
            // cgroup) everything it started may finish, and what they print is read.
            signal_all(Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + launch.grace;
            let s = match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(Ok(s)) => Some(s),
                _ => None,
            };
            if let Some(cg) = &cgroup {
                cg.emptied(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
            }
            signal_all(Signal::SIGKILL);
            let s = match s {
                Some(s) => Some(s),
                None => child.wait().await.ok(),
            };
            Err((other, s))
        }
    };
    forget_group(&launch.record);
    // Output is read until the last process of the attempt is gone: with a cgroup, the
    // kernel says when; without, the pipes close once the group is gone, and a process
    // that left the group and kept them open holds the attempt up for 2 s at most.
    let mut bound = Duration::from_secs(2);
    if let Some(cg) = &cgroup {
        if !cg.emptied(Duration::from_secs(10)).await {
            tracing::warn!(left = cg.members().len(), "processes of the attempt outlived a kill of its cgroup for 10 s");
        }
        bound = Duration::from_secs(10);
    }
    for h in [out, err].into_iter().flatten() {
        let abort = h.abort_handle();
        if tokio::time::timeout(bound, h).await.is_err() {
            abort.abort();
        }
    }
    spool.close();
    let runtime_ms = begin.elapsed().as_millis() as u64;
    use std::os::unix::process::ExitStatusExt;
    let code_of = |s: &std::process::ExitStatus| s.code().or_else(|| s.signal().map(|sig| 128 + sig));
    let mut outcome = match status {
        Ok(s) => Outcome { exit_code: code_of(&s), signal: s.signal(), timed_out: false, killed: false, runtime_ms, error: None },
        Err((End::TimedOut | End::Exited(_), s)) => Outcome {
            exit_code: s.as_ref().and_then(code_of).or(Some(137)),
            signal: s.as_ref().and_then(|s| s.signal()),
            timed_out: true,
            killed: false,
            runtime_ms,
            error: None,
        },
        Err((End::Killed(reason), s)) => Outcome {
            exit_code: s.as_ref().and_then(code_of).or(Some(137)),
            signal: s.as_ref().and_then(|s| s.signal()),
            timed_out: reason == KillReason::TimedOut,
            killed: reason != KillReason::TimedOut,
            runtime_ms,
            error: None,
        },
    };
    // The kernel killed for memory in this attempt, and that is how it ended (the counter
    // is read only for an attempt that ended as an OOM kill does).
    if let Some(cg) = &cgroup {
        if outcome.exit_code == Some(137) && !outcome.killed && !outcome.timed_out && cg.oom_kills() > oom_before {
            outcome.error = Some(format!(
                "oom_killed: the attempt ran out of {} and was killed (exit code 137)",
                confine.limits.map_or_else(|| "its session's memory limit".to_string(), |l| format!("its memory limit of {} MiB", l.mem_mib))
            ));
        }
    }
    outcome
}

/// When a process started, in clock ticks since boot (field 22 of `/proc/PID/stat`):
/// with the pid, it names one process for good, as pids are reused.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command, which is in parentheses and may hold anything.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether any live process is in process group `pgid`.
fn group_has_members(pgid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else { return false };
    rd.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).any(|pid| {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return false };
        let f: Vec<&str> = rest.split_whitespace().take(3).collect();
        // state, ppid, pgrp
        f.len() == 3 && f[0] != "Z" && f[2].parse::<i32>() == Ok(pgid)
    })
}

/// Writes `PGID START_TIME` to `path`. Best effort: an attempt whose group cannot be
/// recorded still runs; only the clean-up after a crash would miss it.
fn record_group(path: &Path, pgid: i32) {
    let Some(started) = start_time(pgid) else { return };
    if let Err(e) = write_record(path, &format!("{pgid} {started}")) {
        tracing::warn!(error = %e, path = %path.display(), "cannot record the attempt's process group; a crash of this worker would leave it running");
    }
}

/// A record's fixed size: a pid and a start time in clock ticks, padded.
const RECORD_BYTES: usize = 40;

/// Writes a record over the previous one in place, padded to `RECORD_BYTES`: the
/// file keeps its size and its block, where truncating and rewriting it cost the
/// file system a block freed and allocated per attempt.
fn write_record(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    f.write_all_at(format!("{text:<width$}\n", width = RECORD_BYTES - 1).as_bytes(), 0)
}

/// Blanks the record (the file stays for the slot's next attempt: creating and
/// deleting a file per attempt costs more than the attempt of a trivial job).
fn forget_group(path: &Option<PathBuf>) {
    if let Some(p) = path {
        let _ = write_record(p, "");
    }
}

/// Kills the process groups recorded in `dir` by a previous run of this worker that
/// did not end them (it was killed), and empties `dir`. A group is killed only if it
/// is provably the one recorded: its leader is alive with the recorded start time, or
/// the leader is gone but members remain (a pid is not reused while its group lives).
/// Returns how many groups were killed.
pub fn kill_left_over(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut killed = 0;
    for e in rd.flatten() {
        let path = e.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut f = text.split_whitespace();
        let pgid = f.next().and_then(|v| v.parse::<i32>().ok()).filter(|p| *p > 1);
        let started = f.next().and_then(|v| v.parse::<u64>().ok());
        if let (Some(pgid), Some(started)) = (pgid, started) {
            let ours = match start_time(pgid) {
                Some(t) => t == started,
                None => group_has_members(pgid),
            };
            if ours {
                signal_group(pgid, Signal::SIGKILL);
                killed += 1;
                let attempt = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                tracing::warn!(pgid, lease = %attempt, "killed the process group of an attempt left over from before this worker restarted");
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(dir: &std::path::Path, script: &str, max: Option<Duration>) -> Launch {
        Launch {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("GREETING".into(), "hi".into())],
            workspace: dir.to_path_buf(),
            max_runtime: max,
            grace: Duration::from_millis(500),
            record: None,
        }
    }

    fn output(s: &Spool) -> String {
        let mut out = String::new();
        for i in 0..s.len() {
            out.push_str(&String::from_utf8_lossy(&s.read(i).expect("read").expect("chunk").data));
        }
        out
    }

    #[tokio::test]
    async fn exit_codes_output_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Arc::new(Spool::create(&dir.path().join("s")).expect("spool"));
        let (_tx, rx) = watch::channel(None);
        let o = run(launch(dir.path(), "echo $GREETING; pwd; exit 7", None), Confine::default(), spool.clone(), rx, |_| {}).await;
        assert_eq!(o.exit_code, Some(7));
        assert_eq!(o.final_state(), berth_shared::JobState::Failed);
        let text = output(&spool);
        assert!(text.starts_with("hi\n"), "{text}");
        assert!(text.contains(dir.path().to_str().expect("utf8")), "{text}");
        assert!(spool.is_closed());
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Arc::new(Spool::create(&dir.path().join("s")).expect("spool"));
        let (_tx, rx) = watch::channel(None);
        let t = Instant::now();
        let o = run(launch(dir.path(), "sleep 30 & sleep 30", Some(Duration::from_millis(300))), Confine::default(), spool, rx, |_| {}).await;
        assert!(o.timed_out);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn left_over_groups_are_killed_and_only_those() {
        let dir = tempfile::tempdir().expect("tempdir");
        use std::os::unix::process::CommandExt;
        let spawn = || std::process::Command::new("sleep").arg("30").process_group(0).spawn().expect("spawn");
        let (mut left, mut other) = (spawn(), spawn());
        record_group(&dir.path().join("left"), left.id() as i32);
        // A record whose pid is now another process (its start time differs).
        std::fs::write(dir.path().join("reused"), format!("{} 1\n", other.id())).expect("write");
        std::fs::write(dir.path().join("garbage"), "not a record").expect("write");
        assert_eq!(kill_left_over(dir.path()), 1);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(left.wait().expect("wait").signal(), Some(9));
        assert!(other.try_wait().expect("try_wait").is_none(), "a process that is not the recorded one lives");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 0, "the records are gone");
        let _ = other.kill();
        let _ = other.wait();
    }

    #[tokio::test]
    async fn kill_and_missing_program() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Arc::new(Spool::create(&dir.path().join("s")).expect("spool"));
        let (tx, rx) = watch::channel(None);
        let h = tokio::spawn(run(launch(dir.path(), "sleep 30", None), Confine::default(), spool, rx, |_| {}));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Some(KillReason::Cancelled)).expect("send");
        let o = tokio::time::timeout(Duration::from_secs(5), h).await.expect("in time").expect("joined");
        assert!(o.killed);
        assert_eq!(o.exit_code, Some(128 + 15));

        let spool = Arc::new(Spool::create(&dir.path().join("t")).expect("spool"));
        let (_tx, rx) = watch::channel(None);
        let mut l = launch(dir.path(), "", None);
        l.argv = vec!["/no/such/program".into()];
        let o = run(l, Confine::default(), spool, rx, |_| {}).await;
        assert_eq!(o.exit_code, Some(127));
        assert!(o.error.as_deref().unwrap_or("").contains("/no/such/program"));
    }
}
