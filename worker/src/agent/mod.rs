//! The session agent: `berth-worker agent --socket PATH`, the entrypoint (PID 1) of a
//! Docker session's container. The worker's own binary, bind-mounted read-only and run
//! through the host's dynamic loader, so it runs in any image of the host's
//! architecture. It listens on a unix socket in a directory the worker also sees; each
//! connection is one exec ([`proto`]): the command runs in a session of its own
//! (`setsid`) with a marker in its environment (`BERTH_EXEC_TOKEN`), its output is sent
//! as it comes, stdin is written as it arrives, and one exit frame ends it.
//!
//! An exec ends as a whole: when its main process exits, or it is killed (a kill frame,
//! its timeout, its connection closed), every process of it — its group, and every
//! process whose environment carries its marker (one that left the group) — gets
//! SIGTERM, the grace, then SIGKILL; nothing of another exec is touched. As PID 1 the
//! agent reaps every orphan (`waitpid(-1)`), and on SIGTERM (the container stopped) it
//! passes SIGTERM on to everything, gives the execs their grace and exits.
//!
//! One thread (a current-thread runtime): a child is registered with the reaper before
//! the reaper can run again, so no exit is missed, and nothing is shared across threads
//! but an uncontended lock.

pub mod proto;

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::codec::{read_frame, write_frame};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use proto::{Bytes, Exit, FromAgent, Request, ToAgent};

/// The marker every process of an exec carries in its environment.
pub const TOKEN_VAR: &str = "BERTH_EXEC_TOKEN";
/// The marker every process of a packed session carries (`Request::member`).
pub const MEMBER_VAR: &str = "BERTH_PACK_MEMBER";
/// What one read of an exec's pipe may take (one output frame, one spool chunk).
const READ_BUF: usize = berth_shared::wire::MAX_CHUNK_BYTES;
/// After its main process exits, an exec's output is read this long at most (a process
/// that escaped the kill and holds a pipe does not hold the exec up).
const DRAIN: Duration = Duration::from_secs(2);
/// What the agent waits for the execs on SIGTERM before it exits.
const STOP_GRACE: Duration = Duration::from_secs(2);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the agent until SIGTERM (`berth-worker agent`).
pub fn main(socket: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(serve(socket.to_path_buf()))
}

/// The running execs: their process group (= main pid) and marker, by connection.
#[derive(Default)]
struct Agent {
    base_env: Vec<(OsString, OsString)>,
    /// Who waits for which child's exit status.
    waiting: Mutex<HashMap<i32, oneshot::Sender<i32>>>,
    execs: Mutex<HashMap<u64, (i32, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn serve(socket: PathBuf) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    // Files the execs make are as `docker exec`'s would be (the worker's own umask is 077).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let pid1 = std::process::id() == 1;
    if !pid1 {
        // Outside a container of its own (tests): orphans of the execs come here too.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    // Before any child exists, so that no exit is missed.
    let mut children = signal(SignalKind::child()).map_err(|e| format!("cannot watch for children: {e}"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("cannot watch for SIGTERM: {e}"))?;
    let agent = Arc::new(Agent { base_env: std::env::vars_os().collect(), ..Default::default() });

    // Bound under another name and renamed once listening: the socket's name appearing
    // means the agent is ready.
    let tmp = socket.with_extension("sock.tmp");
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| format!("cannot listen on {}: {e}", tmp.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // The directory keeps others out; the worker may not be root.
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666));
    }
    std::fs::rename(&tmp, &socket).map_err(|e| format!("cannot name the socket {}: {e}", socket.display()))?;
    tracing::info!(socket = %socket.display(), pid1, "agent ready");

    let mut next = 0u64;
    loop {
        tokio::select! {
            _ = children.recv() => reap(&agent),
            _ = term.recv() => break,
            c = listener.accept() => match c {
                Ok((stream, _)) => {
                    next += 1;
                    tokio::spawn(connection(agent.clone(), next, stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    // Stopped: SIGTERM to everything, the grace for the execs to end (and report), then out.
    tracing::info!("SIGTERM: ending every exec");
    if pid1 {
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    }
    for (pgid, token) in lock(&agent.execs).values() {
        signal_exec(*pgid, token, Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while !lock(&agent.execs).is_empty() && Instant::now() < deadline {
        tokio::select! {
            _ = children.recv() => reap(&agent),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    for (pgid, token) in lock(&agent.execs).values() {
        signal_exec(*pgid, token, Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Collects every child that has exited: an exec's main process goes to its waiter,
/// anything else (an orphan) is only reaped.
fn reap(agent: &Agent) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(s) => {
                let (pid, raw) = match s {
                    WaitStatus::Exited(p, code) => (p, (code & 0xff) << 8),
                    WaitStatus::Signaled(p, sig, _) => (p, sig as i32),
                    _ => continue,
                };
                if let Some(tx) = lock(&agent.waiting).remove(&pid.as_raw()) {
                    let _ = tx.send(raw);
                }
            }
        }
    }
}

/// Signals every process of an exec: its group, and whatever carries its marker.
fn signal_exec(pgid: i32, token: &str, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
    for pid in marked(TOKEN_VAR, token) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Ends every process of a packed session (`Request::kill_member`): SIGTERM, up to the
/// grace for them to go, then SIGKILL to what is left.
async fn kill_member(member: &str, grace: Duration) {
    let signal_all = |sig| {
        let left = marked(MEMBER_VAR, member);
        for pid in &left {
            let _ = kill(Pid::from_raw(*pid), sig);
        }
        left.len()
    };
    // Watched by pidfd (their exits go to the reaper, not here), taken before the signal.
    let watched: Vec<_> = marked(MEMBER_VAR, member).into_iter().filter_map(exit_of).collect();
    if signal_all(Signal::SIGTERM) == 0 {
        return;
    }
    let gone = async {
        for fd in watched {
            let _ = fd.readable().await;
        }
    };
    let _ = tokio::time::timeout(grace, gone).await;
    signal_all(Signal::SIGKILL);
}

/// A pidfd of a process (readable once it has exited) on the runtime, when the
/// process still exists.
#[allow(unsafe_code)]
fn exit_of(pid: i32) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor just made for this process, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the OwnedFd stays open, and the same, for as long as the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// The processes whose environment holds `var=value`.
fn marked(var: &str, value: &str) -> Vec<i32> {
    let needle = format!("{var}={value}\0").into_bytes();
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_slice())))
        .collect()
}

/// Reads from a pipe while it is open; never resolves once it is gone.
async fn read_some(p: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match p {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One exec, from its request to its exit frame.
async fn connection(agent: Arc<Agent>, id: u64, stream: UnixStream) {
    let (mut rd, mut wr) = stream.into_split();
    let req: Request = match read_frame(&mut rd).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "a bad request frame");
            return;
        }
    };
    let exit = run(&agent, id, req, rd, &mut wr).await;
    let _ = write_frame(&mut wr, &FromAgent::Exit(exit)).await;
    let _ = wr.shutdown().await;
}

/// Has the child start a session of its own (and so a process group) before it execs.
#[allow(unsafe_code)]
fn own_session(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook only calls setsid, which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
}

fn failed(code: i32, error: String) -> Exit {
    Exit { code: Some(code), error: Some(error), ..Default::default() }
}

fn grow_pipe(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

async fn run(agent: &Agent, id: u64, req: Request, mut rd: tokio::net::unix::OwnedReadHalf, wr: &mut tokio::net::unix::OwnedWriteHalf) -> Exit {
    if req.kill_member {
        let Some(member) = &req.member else { return failed(2, "kill_member without a member".into()) };
        kill_member(member, Duration::from_millis(req.grace_ms)).await;
        return Exit { code: Some(0), ..Default::default() };
    }
    let Some(program) = req.argv.first() else { return failed(127, "an empty command".into()) };
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut cmd = std::process::Command::new(program);
    cmd.args(&req.argv[1..]).env_clear().envs(agent.base_env.iter().map(|(k, v)| (k, v))).envs(req.env.iter().map(|(k, v)| (k, v)));
    if !req.env.iter().any(|(k, _)| k == "PATH") && !agent.base_env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !req.env.iter().any(|(k, _)| k == "HOME") && !agent.base_env.iter().any(|(k, _)| k == "HOME") {
        cmd.env("HOME", "/root");
    }
    if let Some(member) = &req.member {
        cmd.env(MEMBER_VAR, member);
    }
    cmd.env(TOKEN_VAR, &token)
        .current_dir(&req.cwd)
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    own_session(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::PermissionDenied { 126 } else { 127 };
            return failed(code, format!("cannot start `{program}` in {}: {e}", req.cwd));
        }
    };
    let pid = child.id() as i32;
    // Registered before this task yields: the reaper cannot have run since the spawn.
    let (status_tx, mut status_rx) = oneshot::channel();
    lock(&agent.waiting).insert(pid, status_tx);
    lock(&agent.execs).insert(id, (pid, token.clone()));
    let pipe_of = |fd: Option<OwnedFd>| {
        fd.and_then(|fd| {
            grow_pipe(&fd);
            pipe::Receiver::from_owned_fd(fd).ok()
        })
    };
    let mut out = pipe_of(child.stdout.take().map(OwnedFd::from));
    let mut err = pipe_of(child.stderr.take().map(OwnedFd::from));
    let stdin = child.stdin.take().and_then(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s)).ok());

    // The worker's frames: stdin to a writer of its own (a command that does not read
    // must not hold up a kill), the rest to this loop.
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Option<ToAgent>>();
    let reader = tokio::spawn(async move {
        let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = stdin.map(|mut s| {
            tokio::spawn(async move {
                while let Some(data) = in_rx.recv().await {
                    if data.is_empty() || s.write_all(&data).await.is_err() {
                        break;
                    }
                }
            })
        });
        loop {
            match read_frame::<_, ToAgent>(&mut rd).await {
                Ok(Some(ToAgent::Stdin(Bytes(data)))) => {
                    let _ = in_tx.send(data);
                }
                Ok(Some(ToAgent::Kill)) => {
                    let _ = ctl_tx.send(Some(ToAgent::Kill));
                }
                // The worker is gone: so is the exec.
                Ok(None) | Err(_) => {
                    let _ = ctl_tx.send(None);
                    break;
                }
            }
        }
        drop(in_tx);
        if let Some(w) = writer {
            let _ = w.await;
        }
    });

    let grace = Duration::from_millis(req.grace_ms);
    let mut timeout_at = req.timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    let (mut obuf, mut ebuf) = (vec![0u8; READ_BUF], vec![0u8; READ_BUF]);
    let mut status: Option<i32> = None;
    let (mut timed_out, mut killed, mut ctl_open, mut conn_ok) = (false, false, true, true);
    // When SIGKILL follows the SIGTERM of a kill, and when reading the output stops.
    let (mut hard_kill_at, mut drain_until): (Option<Instant>, Option<Instant>) = (None, None);
    let begin_kill = |hard: &mut Option<Instant>, timeout: &mut Option<Instant>| {
        if hard.is_none() {
            signal_exec(pid, &token, Signal::SIGTERM);
            *hard = Some(Instant::now() + grace);
            *timeout = None;
        }
    };
    loop {
        if status.is_some() && out.is_none() && err.is_none() {
            break;
        }
        tokio::select! {
            r = read_some(&mut out, &mut obuf) => match r {
                Ok(n) if n > 0 => {
                    if conn_ok && write_frame(wr, &FromAgent::Output { stream: 0, data: Bytes(obuf[..n].to_vec()) }).await.is_err() {
                        conn_ok = false;
                    }
                }
                _ => out = None,
            },
            r = read_some(&mut err, &mut ebuf) => match r {
                Ok(n) if n > 0 => {
                    if conn_ok && write_frame(wr, &FromAgent::Output { stream: 1, data: Bytes(ebuf[..n].to_vec()) }).await.is_err() {
                        conn_ok = false;
                    }
                }
                _ => err = None,
            },
            s = &mut status_rx, if status.is_none() => {
                status = Some(s.unwrap_or(libc::SIGKILL));
                // The main process is done: so is whatever it left behind.
                signal_exec(pid, &token, Signal::SIGKILL);
                drain_until = Some(Instant::now() + DRAIN);
                hard_kill_at = None;
                timeout_at = None;
            },
            c = ctl_rx.recv(), if ctl_open => {
                if c.is_none() || c == Some(None) {
                    ctl_open = false;
                }
                if status.is_none() {
                    killed = true;
                    begin_kill(&mut hard_kill_at, &mut timeout_at);
                }
            },
            _ = until(timeout_at) => {
                timed_out = true;
                begin_kill(&mut hard_kill_at, &mut timeout_at);
            },
            _ = until(hard_kill_at) => {
                signal_exec(pid, &token, Signal::SIGKILL);
                hard_kill_at = None;
            },
            _ = until(drain_until) => break,
        }
        if !conn_ok && status.is_none() && hard_kill_at.is_none() && !killed {
            killed = true;
            begin_kill(&mut hard_kill_at, &mut timeout_at);
        }
    }
    reader.abort();
    lock(&agent.execs).remove(&id);
    let raw = status.unwrap_or(libc::SIGKILL);
    let (code, signal) = if libc::WIFEXITED(raw) {
        (libc::WEXITSTATUS(raw), None)
    } else {
        let sig = libc::WTERMSIG(raw);
        (128 + sig, Some(sig))
    };
    Exit { code: Some(code), signal, timed_out, killed: killed && !timed_out, error: None }
}

/// Runs one exec on an agent's socket (the worker's side): sends `req`, then whatever
/// comes on `input` (stdin, kill), hands each output frame to `output` (0 stdout, 1
/// stderr) and returns the exit. An error: the agent could not be reached, or the
/// connection broke before the exit.
pub async fn call(socket: &Path, req: &Request, mut input: mpsc::UnboundedReceiver<ToAgent>, mut output: impl FnMut(u8, Vec<u8>)) -> std::io::Result<Exit> {
    let stream = UnixStream::connect(socket).await?;
    let (mut rd, mut wr) = stream.into_split();
    write_frame(&mut wr, req).await.map_err(std::io::Error::other)?;
    let writer = tokio::spawn(async move {
        while let Some(m) = input.recv().await {
            if write_frame(&mut wr, &m).await.is_err() {
                break;
            }
        }
        // Kept open: closing it would kill the exec.
        std::future::pending::<()>().await;
    });
    let r = loop {
        match read_frame::<_, FromAgent>(&mut rd).await {
            Ok(Some(FromAgent::Output { stream, data })) => output(stream, data.0),
            Ok(Some(FromAgent::Exit(e))) => break Ok(e),
            Ok(None) => break Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the agent closed the connection before the exec's exit")),
            Err(e) => break Err(std::io::Error::other(e)),
        }
    };
    writer.abort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(script: &str) -> Request {
        Request {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("GREETING".into(), "hi".into())],
            cwd: "/".into(),
            stdin: false,
            timeout_ms: None,
            grace_ms: 500,
            member: None,
            kill_member: false,
        }
    }

    /// The agent in a thread of its own (as it runs in a container, on its own runtime).
    fn agent(dir: &Path) -> PathBuf {
        let socket = dir.join("agent.sock");
        let s = socket.clone();
        std::thread::spawn(move || main(&s));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(std::time::Instant::now() < deadline, "the agent is ready within 10 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        socket
    }

    async fn exec(socket: &Path, r: Request, input: Vec<ToAgent>) -> (String, String, Exit) {
        let (tx, rx) = mpsc::unbounded_channel();
        for m in input {
            tx.send(m).expect("send");
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exit = call(socket, &r, rx, |s, d| if s == 0 { out.extend(d) } else { err.extend(d) }).await.expect("the exec runs");
        drop(tx);
        (String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned(), exit)
    }

    // One test: the agent is a subreaper of the test process, and several would race
    // over the children of one another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn execs_run_apart_and_end_as_a_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = agent(dir.path());

        let (out, err, exit) = exec(&socket, req("echo $GREETING; echo oops >&2; test -n \"$PATH\" && test -n \"$HOME\" || exit 9; exit 7"), vec![]).await;
        assert_eq!((out.as_str(), err.as_str(), exit.code, exit.timed_out), ("hi\n", "oops\n", Some(7), false), "{exit:?}");

        // stdin, then end of file.
        let mut r = req("cat; echo done");
        r.stdin = true;
        let (out, _, exit) = exec(&socket, r, vec![ToAgent::Stdin(Bytes(b"in\n".to_vec())), ToAgent::Stdin(Bytes::default())]).await;
        assert_eq!((out.as_str(), exit.code), ("in\ndone\n", Some(0)));

        // A timeout kills the exec's tree, one that left its group too, and only that.
        let mut keeper = std::process::Command::new("sleep").arg("300").spawn().expect("a neighbour");
        let mut r = req("setsid sleep 300 & sleep 300");
        r.timeout_ms = Some(200);
        let t = std::time::Instant::now();
        let (_, _, exit) = exec(&socket, r, vec![]).await;
        assert!(exit.timed_out && exit.code == Some(143), "{exit:?}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(keeper.try_wait().expect("try_wait").is_none(), "a process of no exec lives on");
        let _ = keeper.kill();
        let _ = keeper.wait();

        // A kill frame, and a missing program.
        // (sent once it prints: a shell that ignores SIGTERM is ended by SIGKILL)
        let (tx, rx) = mpsc::unbounded_channel();
        let exit = call(&socket, &req("trap '' TERM; echo ready; sleep 300"), rx, |_, _| {
            let _ = tx.send(ToAgent::Kill);
        })
        .await
        .expect("the exec runs");
        assert!(exit.killed && !exit.timed_out && exit.code == Some(137), "SIGKILL after the grace: {exit:?}");
        let mut r = req("");
        r.argv = vec!["/no/such/program".into()];
        let (_, _, exit) = exec(&socket, r, vec![]).await;
        assert_eq!(exit.code, Some(127), "{exit:?}");

        // A large output arrives whole, in large frames.
        let (out, _, exit) = exec(&socket, req("head -c 3000000 /dev/zero"), vec![]).await;
        assert_eq!((out.len(), exit.code), (3_000_000, Some(0)));

        // The round trip of `true`.
        let mut times = Vec::new();
        for _ in 0..200 {
            let t = std::time::Instant::now();
            let mut r = req("");
            r.argv = vec!["true".into()];
            let (_, _, exit) = exec(&socket, r, vec![]).await;
            assert_eq!(exit.code, Some(0));
            times.push(t.elapsed());
        }
        times.sort();
        eprintln!("agent round trip of `true` on the host: p50 {:?}, p90 {:?}, max {:?}", times[100], times[180], times[199]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_members_leaving_ends_its_processes_and_no_neighbours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = agent(dir.path());
        // Two members, each with an exec whose tree also left its group.
        let run = |member: &str| {
            let mut r = req("setsid sleep 300 & echo ready; sleep 300");
            r.member = Some(member.into());
            let (socket, (tx, rx)) = (socket.clone(), mpsc::unbounded_channel::<ToAgent>());
            let (ready_tx, ready_rx) = oneshot::channel();
            let mut ready_tx = Some(ready_tx);
            let h = tokio::spawn(async move {
                let _keep = tx;
                call(&socket, &r, rx, |_, _| {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                })
                .await
            });
            (h, ready_rx)
        };
        let (a, a_ready) = run("a");
        let (mut b, b_ready) = run("b");
        a_ready.await.expect("a runs");
        b_ready.await.expect("b runs");
        // `ready` is printed before the last `sleep` is started: wait for all three.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (marked(MEMBER_VAR, "a").len(), marked(MEMBER_VAR, "b").len()) != (3, 3) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!((marked(MEMBER_VAR, "a").len(), marked(MEMBER_VAR, "b").len()), (3, 3), "sh and two sleeps each");
        let mut k = req("");
        (k.member, k.kill_member, k.grace_ms) = (Some("a".into()), true, 500);
        let (_, _, exit) = exec(&socket, k, vec![]).await;
        assert_eq!(exit.code, Some(0), "{exit:?}");
        let a_exit = tokio::time::timeout(Duration::from_secs(5), a).await.expect("a's exec ends").expect("joined").expect("answered");
        assert_eq!(a_exit.code, Some(143), "{a_exit:?}");
        assert!(marked(MEMBER_VAR, "a").is_empty(), "nothing of a is left");
        assert_eq!(marked(MEMBER_VAR, "b").len(), 3, "b runs on");
        assert!(tokio::time::timeout(Duration::from_millis(200), &mut b).await.is_err(), "b's exec is still running");
        let mut k = req("");
        (k.member, k.kill_member) = (Some("b".into()), true);
        exec(&socket, k, vec![]).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), b).await.expect("b's exec ends");
    }
}
