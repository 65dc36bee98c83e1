//! Executors run one attempt in its slot workspace and report its outcome.
//!
//! The seam: an executor is a type implementing [`Executor`], in a file of this
//! folder, registered under its name (what `--executor` takes and what a job's spec
//! names) in [`REGISTERED`]. The run loop knows executors only through these two: it
//! opens the ones asked for at start-up, and hands each attempt to the one whose name
//! its job names.

pub mod docker;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::ids::LeaseId;
use berth_shared::job::Outcome;
use berth_shared::wire::{Assignment, GpuInfo, KillReason};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use crate::spool::Spool;
use crate::{WorkerConfig, WorkerError};

/// Every executor a worker knows, under its name: the one place a new executor is
/// registered. Opened in this order at start-up.
pub const REGISTERED: &[(&str, Open)] = &[(process::NAME, process::open), (docker::NAME, docker::open)];

/// Opens an executor at start-up: cleans up what an earlier run of this worker left
/// (whether or not it is offered now), then offers it if `Setup::asked`.
pub type Open = for<'a> fn(&'a Setup<'a>) -> BoxFuture<'a, Result<Opened, WorkerError>>;

/// What an executor is opened with.
pub struct Setup<'a> {
    pub cfg: &'a WorkerConfig,
    /// Whether the operator asked for it (`--executor`).
    pub asked: bool,
}

/// How opening went.
pub enum Opened {
    Offered(Box<dyn Executor>),
    NotAsked,
    /// Asked for, but it cannot run here (why).
    Declined(String),
}

/// The names `--executor` takes.
pub fn names() -> impl Iterator<Item = &'static str> {
    REGISTERED.iter().map(|(n, _)| *n)
}

/// An executor offered by this worker.
pub trait Executor: Send + Sync {
    /// Its name (`--executor`, and `berth_shared::job::Executor::name` of its jobs).
    fn name(&self) -> &'static str;
    /// Where its jobs see the workspace at `workspace` (`BERTH_WORKSPACE`), when not at
    /// its path on this host.
    fn workspace_in_job(&self, _workspace: &Path) -> Option<String> {
        None
    }
    /// Where a session's workspace is when the executor keeps it elsewhere than in the
    /// slot's own directory (a packed container's): asked once, as the session starts,
    /// right before `open_session`.
    fn session_workspace(&self, _a: &Assignment, _slot: usize) -> Option<PathBuf> {
        None
    }
    /// Tears down what it holds outside attempts (warm sandboxes) as the worker stops.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Starts one attempt on the runtime; what happens to it comes back on `reports`
    /// (`Report::Started` once it runs, `Report::Ended` always, once).
    fn spawn(&self, job: Job<'_>, reports: Reports);
    /// How it contains its jobs, when it does (the process executor).
    fn containment(&self) -> Option<berth_shared::wire::Containment> {
        None
    }
    /// Whether its attempts can be frozen (`Controls::freeze`).
    fn freezes(&self) -> bool {
        false
    }
    /// Opens a session in the attempt's slot: its sandbox is made ready
    /// (`Report::Started` at once) and held until `controls.kill`, then torn down with
    /// everything its execs left (`Report::Ended`).
    fn open_session(&self, job: Job<'_>, reports: Reports) {
        let error = format!("the {} executor does not hold sessions on this worker", self.name());
        job.spool.close();
        let _ = reports.send(Report::Ended(job.assignment.lease, Ended { outcome: not_started(Some(125), error), frozen: None }));
    }
    /// Who owns what is copied into a slot's workspace (the slot's user), when not the
    /// worker.
    fn workspace_owner(&self, _slot: usize) -> Option<(u32, u32)> {
        None
    }
    /// Runs one exec in a session this executor opened (`Report::ExecEnded` once).
    fn exec(&self, e: ExecJob, reports: Reports) {
        e.spool.close();
        let error = format!("the {} executor does not run execs", self.name());
        let _ = reports.send(Report::ExecEnded(e.lease, e.exec, not_started(Some(125), error)));
    }
    /// Removes an image it made (a frozen one); `false` when it makes none. With
    /// `reports`, the result comes back as `Report::ImageRemoved`.
    fn remove_image(&self, _image: String, _reports: Option<Reports>) -> bool {
        false
    }
}

/// One attempt as the run loop hands it to its executor.
pub struct Job<'a> {
    pub assignment: &'a Assignment,
    /// The GPUs set aside for it.
    pub gpus: &'a [GpuInfo],
    pub slot: usize,
    /// `record` is left for the executor to set.
    pub launch: Launch,
    pub spool: Arc<Spool>,
    pub controls: Controls,
    /// The attempt's span, for what the executor spawns.
    pub span: tracing::Span,
}

/// One exec of a session as the run loop hands it to the session's executor.
pub struct ExecJob {
    pub lease: LeaseId,
    pub exec: u32,
    pub slot: usize,
    /// `argv`, the session's env and the exec's, the workspace, the exec's timeout.
    pub launch: Launch,
    /// Where it runs (inside the workspace; checked).
    pub cwd: PathBuf,
    pub spool: Arc<Spool>,
    pub kill: watch::Receiver<Option<KillReason>>,
    pub stdin: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    pub span: tracing::Span,
}

/// Controls of a running attempt: kill (cancel, timeout, lost lease) and freeze (the tag).
pub struct Controls {
    pub kill: watch::Receiver<Option<KillReason>>,
    pub freeze: watch::Receiver<Option<String>>,
}

/// How an attempt ended: its outcome, and the image when it was frozen.
#[derive(Clone, Debug)]
pub struct Ended {
    pub outcome: Outcome,
    pub frozen: Option<String>,
}

/// What executors tell the run loop.
#[derive(Debug)]
pub enum Report {
    /// The attempt's process (or container) runs.
    Started(LeaseId),
    Ended(LeaseId, Ended),
    /// An exec of a session ended.
    ExecEnded(LeaseId, u32, Outcome),
    /// A frozen image was removed (or why not).
    ImageRemoved(String, Option<String>),
}

pub type Reports = mpsc::UnboundedSender<Report>;

/// Runs an attempt's future on the runtime in its span, reporting how it ended.
pub(crate) fn spawn_attempt(lease: LeaseId, span: tracing::Span, reports: Reports, run: impl std::future::Future<Output = Ended> + Send + 'static) {
    use tracing::Instrument;
    tokio::spawn(
        async move {
            let ended = run.await;
            tracing::debug!(exit = ?ended.outcome.exit_code, "attempt ended");
            let _ = reports.send(Report::Ended(lease, ended));
        }
        .instrument(span),
    );
}

/// The outcome of an attempt that could not be started (exit code `code`).
pub fn not_started(code: Option<i32>, error: String) -> Outcome {
    Outcome { exit_code: code, signal: None, timed_out: false, killed: false, runtime_ms: 0, error: Some(error) }
}

/// Everything an executor needs to run one attempt.
#[derive(Clone, Debug)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workspace: PathBuf,
    pub max_runtime: Option<Duration>,
    /// How long a SIGTERM'd process group gets before SIGKILL.
    pub grace: Duration,
    /// Where the attempt's process group (or container) is written down while it may be
    /// alive, so a worker restarted after a crash can kill what outlived it.
    pub record: Option<PathBuf>,
}

/// Resolves at the attempt's deadline; never when it has none.
pub(crate) async fn deadline_passed(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves with the reason once the attempt is asked to be killed (at once if it
/// already was); never if the asking side is gone.
pub(crate) async fn kill_asked(kill: &mut watch::Receiver<Option<KillReason>>) -> KillReason {
    loop {
        if let Some(r) = *kill.borrow_and_update() {
            return r;
        }
        if kill.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Resolves with the tag once a freeze is asked for (at once if it already was); never
/// if the asking side is gone.
pub(crate) async fn freeze_asked(freeze: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(tag) = freeze.borrow_and_update().clone() {
            return tag;
        }
        if freeze.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
