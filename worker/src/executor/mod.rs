//! Executors run one attempt in its slot workspace and report its outcome.

pub mod docker;
pub mod process;

use std::path::PathBuf;
use std::time::Duration;

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
