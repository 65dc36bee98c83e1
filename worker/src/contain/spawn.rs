//! Starting a job's process at a cost that does not grow with the worker's memory.
//!
//! `fork` copies the worker's page tables (its runtime, connections and caches) only
//! for the child to throw them away at `exec`: on a 2-core VM that was ~1.8 ms of a
//! session exec's ~8 ms round trip. `posix_spawn` avoids the copy by cloning with
//! `CLONE_VM | CLONE_VFORK`, but it cannot join cgroups or change user. So this does
//! what `posix_spawn` does and those two steps besides: the child shares the worker's
//! memory (the worker's thread waits) and makes only raw system calls until `execve`:
//! it resets signal dispositions, starts its own process group, writes `0` to each of
//! the slot's `cgroup.procs`, takes its stdio, changes directory, drops to the job's
//! user with the raw `setresuid` family (glibc's `setuid` would signal the worker's
//! threads to change theirs too) and execs. An error on the way is left in memory
//! both share, and the child exits 127.
//!
//! The child is waited for through a pidfd (`CLONE_PIDFD`), so no SIGCHLD handler and
//! no reaper of other children is involved, and its pid cannot be reused while held.
//!
//! Unsafe code, as in the agent's `pidfd_open`: each block says why it holds.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// What the child is started with.
pub struct Spawn<'a> {
    pub argv: &'a [String],
    /// The whole environment (later entries of a name win).
    pub env: Vec<(String, String)>,
    pub cwd: &'a Path,
    /// Pipe to its stdin (`false`: `/dev/null`).
    pub stdin: bool,
    /// `cgroup.procs` descriptors to join before it execs.
    pub procs: &'a [RawFd],
    /// The user and group it runs as (`None`: the worker's).
    pub identity: Option<(u32, u32)>,
}

/// A started child: its pid (also its process group), its pipes, and its pidfd.
pub struct Child {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

/// Everything the child reads, made before the clone (the child allocates nothing).
struct Args {
    program: CString,
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// `/bin/sh PROGRAM ARGS…`, for a file without a `#!` line (as `execvp` does).
    sh_ptrs: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    stdio: [RawFd; 3],
    procs: Vec<RawFd>,
    identity: Option<(u32, u32)>,
    /// The errno of the step that failed, and which step (`Step`), set by the child.
    err: AtomicI32,
    step: AtomicU8,
}

/// The steps the child takes before it execs, for saying which one failed.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Step {
    Group = 1,
    Cgroup,
    Stdio,
    Cwd,
    User,
    Exec,
}

impl Step {
    fn of(n: u8) -> Step {
        [Step::Group, Step::Cgroup, Step::Stdio, Step::Cwd, Step::User].into_iter().find(|s| *s as u8 == n).unwrap_or(Step::Exec)
    }
}

const SH: &std::ffi::CStr = c"/bin/sh";

fn cstring(what: &str, s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} holds a NUL byte")))
}

/// Finds `program` on `path` as `execvp` would (a name with a `/` is taken as it is).
fn resolve(program: &str, path: Option<&str>) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "the command is empty"));
    }
    let mut denied = false;
    for dir in std::env::split_paths(OsStr::new(path.unwrap_or("/usr/local/bin:/usr/bin:/bin"))) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let p = dir.join(program);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => {
                use std::os::unix::fs::PermissionsExt;
                if m.permissions().mode() & 0o111 != 0 {
                    return Ok(p);
                }
                denied = true;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied = true,
            Err(_) => {}
        }
    }
    Err(if denied {
        io::Error::new(io::ErrorKind::PermissionDenied, "found on the PATH, but not executable")
    } else {
        io::Error::new(io::ErrorKind::NotFound, "not found on the PATH")
    })
}

/// A descriptor numbered above 2 (so placing the three in 0, 1, 2 clobbers none).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: duplicates a descriptor this function owns; the new one is owned by the result.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` was just made and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Runs in the child, on its own stack, in the worker's memory, until `execve`.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Args` the parent keeps alive (it is suspended until the
    // child execs or exits). Only system calls follow: no allocation, no locks.
    unsafe {
        unsafe fn fail(a: &Args, step: Step) -> ! {
            a.step.store(step as u8, Ordering::SeqCst);
            a.err.store((*libc::__errno_location()).max(1), Ordering::SeqCst);
            libc::_exit(127)
        }
        let a = &*(arg as *const Args);
        // The worker's handlers must not run here (they would run in its memory), and
        // the job starts with default dispositions and nothing blocked.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::setpgid(0, 0) != 0 {
            fail(a, Step::Group);
        }
        for fd in &a.procs {
            if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(a, Step::Cgroup);
            }
        }
        for (i, fd) in a.stdio.iter().enumerate() {
            if libc::dup2(*fd, i as libc::c_int) < 0 {
                fail(a, Step::Stdio);
            }
        }
        if libc::chdir(a.cwd.as_ptr()) != 0 {
            fail(a, Step::Cwd);
        }
        if let Some((uid, gid)) = a.identity {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                fail(a, Step::User);
            }
        }
        libc::execve(a.program.as_ptr(), a.argv_ptrs.as_ptr(), a.envp.as_ptr());
        if *libc::__errno_location() == libc::ENOEXEC {
            libc::execve(SH.as_ptr(), a.sh_ptrs.as_ptr(), a.envp.as_ptr());
        }
        fail(a, Step::Exec)
    }
}

/// The child's stack: it runs only `child_main`, which makes system calls.
const STACK_BYTES: usize = 64 * 1024;

/// Starts the child. An error says which step failed (the program not found on the
/// PATH, the working directory, the cgroup, the user…), of the kind of its errno.
pub fn spawn(s: Spawn<'_>) -> io::Result<Child> {
    let program = s.argv.first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the command is empty"))?;
    // The environment, a name's last value winning.
    let mut env: Vec<(String, String)> = Vec::with_capacity(s.env.len());
    for (k, v) in s.env {
        match env.iter_mut().find(|(k2, _)| *k2 == k) {
            Some(e) => e.1 = v,
            None => env.push((k, v)),
        }
    }
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
    let resolved = resolve(program, path)?;
    let argv: Vec<CString> = s.argv.iter().map(|a| cstring("an argument", a.as_bytes())).collect::<io::Result<_>>()?;
    let envs: Vec<CString> = env.iter().map(|(k, v)| cstring("the environment", format!("{k}={v}").as_bytes())).collect::<io::Result<_>>()?;
    let program = cstring("the program's path", resolved.as_os_str().as_bytes())?;
    let cwd = cstring("the working directory", s.cwd.as_os_str().as_bytes())?;

    let (stdin_parent, stdin_child) = if s.stdin {
        let (tx, rx) = pipe::pipe()?;
        (Some(tx), above_stdio(rx.into_blocking_fd()?)?)
    } else {
        (None, above_stdio(std::fs::File::open("/dev/null")?.into())?)
    };
    let (out_tx, out_rx) = pipe::pipe()?;
    let (err_tx, err_rx) = pipe::pipe()?;
    let out_child = above_stdio(out_tx.into_blocking_fd()?)?;
    let err_child = above_stdio(err_tx.into_blocking_fd()?)?;

    let mut args = Args {
        argv_ptrs: Vec::new(),
        sh_ptrs: Vec::new(),
        envp: envs.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect(),
        program,
        argv,
        cwd,
        stdio: [stdin_child.as_raw_fd(), out_child.as_raw_fd(), err_child.as_raw_fd()],
        procs: s.procs.to_vec(),
        identity: s.identity,
        err: AtomicI32::new(0),
        step: AtomicU8::new(0),
    };
    args.argv_ptrs = args.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    args.sh_ptrs = std::iter::once(SH.as_ptr())
        .chain(std::iter::once(args.program.as_ptr()))
        .chain(args.argv.iter().skip(1).map(|a| a.as_ptr()))
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let mut stack = vec![0u8; STACK_BYTES];
    // SAFETY: the stack grows down from its (16-byte aligned) end, and outlives the
    // child's use of it: CLONE_VFORK suspends this thread until the child execs or
    // exits. All signals are blocked around the clone so that no handler runs in the
    // child before it resets them; `args` lives on until `clone` returns.
    let (pid, pidfd, err) = unsafe {
        let top = (stack.as_mut_ptr().add(STACK_BYTES) as usize & !15) as *mut libc::c_void;
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut pidfd: libc::c_int = -1;
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            &args as *const Args as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        );
        let e = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(e);
        }
        (pid, OwnedFd::from_raw_fd(pidfd), (args.err.load(Ordering::SeqCst), Step::of(args.step.load(Ordering::SeqCst))))
    };
    drop(stack);
    drop((stdin_child, out_child, err_child));
    if err.0 != 0 {
        // It exited without exec'ing: reap it and say why.
        let mut st = 0;
        // SAFETY: waits for this function's own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        let os = io::Error::from_raw_os_error(err.0);
        let what = match err.1 {
            Step::Group => "cannot start its own process group".to_string(),
            Step::Cgroup => "cannot join the slot's cgroup".to_string(),
            Step::Stdio => "cannot take its stdin, stdout and stderr".to_string(),
            Step::Cwd => format!("cannot enter the working directory {}", s.cwd.display()),
            Step::User => "cannot become the slot's user".to_string(),
            Step::Exec => return Err(os),
        };
        return Err(io::Error::new(os.kind(), format!("{what}: {os}")));
    }
    // SAFETY: the `OwnedFd` keeps its descriptor open and unchanged while the `AsyncFd`
    // holds it.
    let pidfd = match unsafe { AsyncFd::register(pidfd) } {
        Ok(fd) => fd,
        Err(e) => {
            // SAFETY: ends and reaps this function's own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(e.into());
        }
    };
    Ok(Child { pid, pidfd, status: None, stdin: stdin_parent, stdout: Some(out_rx), stderr: Some(err_rx) })
}

impl Child {
    /// Its pid, which is also its process group's id.
    pub fn id(&self) -> i32 {
        self.pid
    }

    fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let mut st = 0;
        // SAFETY: waits (without blocking) for this child only.
        let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 {
            return Ok(None);
        }
        let s = ExitStatus::from_raw(st);
        self.status = Some(s);
        Ok(Some(s))
    }

    /// Waits for it to exit (again after it has: the status is kept).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.try_reap()? {
                return Ok(s);
            }
            // A pidfd turns readable when its process exits.
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }
}

impl Drop for Child {
    /// A child dropped before it was waited for (its attempt was killed and the worker
    /// gave up on it) is reaped by a thread of its own, not left a zombie.
    fn drop(&mut self) {
        if matches!(self.try_reap(), Ok(None)) {
            let pid = self.pid;
            let _ = std::thread::Builder::new().name("reap".into()).spawn(move || {
                let mut st = 0;
                // SAFETY: waits for a child of this process that nothing else waits for.
                unsafe { libc::waitpid(pid, &mut st, 0) };
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn env() -> Vec<(String, String)> {
        vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())]
    }

    #[tokio::test]
    async fn a_child_runs_with_its_stdio_cwd_env_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let argv: Vec<String> = ["sh", "-c", "read x; echo \"$x $FOO $(pwd)\"; echo err >&2; exit 7"].map(String::from).to_vec();
        let mut e = env();
        e.push(("FOO".into(), "one".into()));
        e.push(("FOO".into(), "two".into()));
        let mut c = spawn(Spawn { argv: &argv, env: e, cwd: dir.path(), stdin: true, procs: &[], identity: None }).unwrap();
        let mut input = c.stdin.take().unwrap();
        input.write_all(b"hi\n").await.unwrap();
        drop(input);
        let (mut out, mut err) = (String::new(), String::new());
        c.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
        c.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
        let st = c.wait().await.unwrap();
        assert_eq!(st.code(), Some(7));
        assert_eq!(out.trim(), format!("hi two {}", dir.path().canonicalize().unwrap().display()));
        assert_eq!(err, "err\n");
        // Its own process group.
        assert_eq!(c.wait().await.unwrap().code(), Some(7));
    }

    #[tokio::test]
    async fn a_missing_program_and_a_missing_directory_are_errors_not_children() {
        let argv = vec!["no-such-program-berth".to_string()];
        let e = spawn(Spawn { argv: &argv, env: env(), cwd: Path::new("/"), stdin: false, procs: &[], identity: None }).err().unwrap();
        assert_eq!((e.kind(), e.to_string()), (io::ErrorKind::NotFound, "not found on the PATH".to_string()));
        let argv = vec!["true".to_string()];
        let e = spawn(Spawn { argv: &argv, env: env(), cwd: Path::new("/no/such/dir"), stdin: false, procs: &[], identity: None }).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("cannot enter the working directory /no/such/dir: No such file"), "{e}");
        let argv = vec!["/no/such/program".to_string()];
        let e = spawn(Spawn { argv: &argv, env: env(), cwd: Path::new("/"), stdin: false, procs: &[], identity: None }).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "an exec that fails says so as it is");
    }

    #[tokio::test]
    async fn a_script_without_an_interpreter_line_runs_under_sh_and_signals_show() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "echo from-sh \"$1\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let argv = vec![script.to_string_lossy().into_owned(), "arg".into()];
        let mut c = spawn(Spawn { argv: &argv, env: env(), cwd: dir.path(), stdin: false, procs: &[], identity: None }).unwrap();
        let mut out = String::new();
        c.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "from-sh arg\n");
        assert_eq!(c.wait().await.unwrap().code(), Some(0));

        let argv: Vec<String> = ["sleep", "30"].map(String::from).to_vec();
        let mut c = spawn(Spawn { argv: &argv, env: env(), cwd: dir.path(), stdin: false, procs: &[], identity: None }).unwrap();
        // Its own group: killing the group kills it and nothing of this test's.
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(c.id()), nix::sys::signal::Signal::SIGKILL).unwrap();
        let st = tokio::time::timeout(std::time::Duration::from_secs(10), c.wait()).await.unwrap().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }
}
