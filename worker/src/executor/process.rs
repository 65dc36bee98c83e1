//! The process executor: the command runs as a child in the slot workspace, in its
//! own process group, and the whole group is killed when the attempt is cancelled,
//! times out, or its main process exits (so nothing it started outlives it).

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_shared::job::Outcome;
use berth_shared::wire::{KillReason, OutStream};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use super::Launch;
use crate::spool::Spool;

const READ_BUF: usize = 64 * 1024;

fn signal_group(pgid: i32, sig: Signal) {
    // ESRCH (the group is already gone) is the expected case after a clean exit.
    let _ = killpg(Pid::from_raw(pgid), sig);
}

async fn pump<R: AsyncRead + Unpin>(mut r: R, stream: OutStream, spool: Arc<Spool>) {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Err(e) = spool.append(stream, &buf[..n]) {
                    tracing::error!(error = %e, "cannot write output to the spool; output is being dropped");
                }
            }
        }
    }
}

enum End {
    Exited(std::process::ExitStatus),
    TimedOut,
    Killed(KillReason),
}

/// Runs one attempt to its end. `started` is called with the process group id once
/// the child runs; `kill` asks for the group to be killed.
pub async fn run(launch: Launch, spool: Arc<Spool>, mut kill: watch::Receiver<Option<KillReason>>, started: impl FnOnce(i32)) -> Outcome {
    let begin = Instant::now();
    let fail = |code: i32, error: String| Outcome { exit_code: Some(code), signal: None, timed_out: false, killed: false, runtime_ms: 0, error: Some(error) };
    let Some(program) = launch.argv.first() else {
        return fail(127, "the command is empty".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&launch.argv[1..])
        .current_dir(&launch.workspace)
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::PermissionDenied { 126 } else { 127 };
            spool.close();
            return fail(code, format!("cannot start `{program}`: {e}"));
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    started(pgid);
    let out = child.stdout.take().map(|o| tokio::spawn(pump(o, OutStream::Stdout, spool.clone())));
    let err = child.stderr.take().map(|e| tokio::spawn(pump(e, OutStream::Stderr, spool.clone())));

    let deadline = launch.max_runtime.map(|d| tokio::time::Instant::now() + d);
    let timer = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let killed = async {
        loop {
            if let Some(r) = *kill.borrow_and_update() {
                return r;
            }
            if kill.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    let end = tokio::select! {
        s = child.wait() => match s {
            Ok(s) => End::Exited(s),
            Err(e) => {
                signal_group(pgid, Signal::SIGKILL);
                spool.close();
                return fail(1, format!("lost track of the process: {e}"));
            }
        },
        _ = timer => End::TimedOut,
        r = killed => End::Killed(r),
    };
    let status = match end {
        End::Exited(s) => {
            // The main process is done: end whatever it left behind in its group.
            signal_group(pgid, Signal::SIGKILL);
            Ok(s)
        }
        other => {
            signal_group(pgid, Signal::SIGTERM);
            let s = match tokio::time::timeout(launch.grace, child.wait()).await {
                Ok(Ok(s)) => Some(s),
                _ => None,
            };
            signal_group(pgid, Signal::SIGKILL);
            let s = match s {
                Some(s) => Some(s),
                None => child.wait().await.ok(),
            };
            Err((other, s))
        }
    };
    // The pipes close once the group is gone; a process that left the group and kept
    // them open does not hold the attempt up for long.
    for h in [out, err].into_iter().flatten() {
        let abort = h.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), h).await.is_err() {
            abort.abort();
        }
    }
    spool.close();
    let runtime_ms = begin.elapsed().as_millis() as u64;
    use std::os::unix::process::ExitStatusExt;
    let code_of = |s: &std::process::ExitStatus| s.code().or_else(|| s.signal().map(|sig| 128 + sig));
    match status {
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
    }
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
        let o = run(launch(dir.path(), "echo $GREETING; pwd; exit 7", None), spool.clone(), rx, |_| {}).await;
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
        let o = run(launch(dir.path(), "sleep 30 & sleep 30", Some(Duration::from_millis(300))), spool, rx, |_| {}).await;
        assert!(o.timed_out);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn kill_and_missing_program() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Arc::new(Spool::create(&dir.path().join("s")).expect("spool"));
        let (tx, rx) = watch::channel(None);
        let h = tokio::spawn(run(launch(dir.path(), "sleep 30", None), spool, rx, |_| {}));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Some(KillReason::Cancelled)).expect("send");
        let o = tokio::time::timeout(Duration::from_secs(5), h).await.expect("in time").expect("joined");
        assert!(o.killed);
        assert_eq!(o.exit_code, Some(128 + 15));

        let spool = Arc::new(Spool::create(&dir.path().join("t")).expect("spool"));
        let (_tx, rx) = watch::channel(None);
        let mut l = launch(dir.path(), "", None);
        l.argv = vec!["/no/such/program".into()];
        let o = run(l, spool, rx, |_| {}).await;
        assert_eq!(o.exit_code, Some(127));
        assert!(o.error.as_deref().unwrap_or("").contains("/no/such/program"));
    }
}
