//! Executors run one attempt in its slot workspace and report its outcome.

pub mod docker;
pub mod process;

use std::path::PathBuf;
use std::time::Duration;

use berth_shared::wire::KillReason;
use tokio::sync::watch;

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
