//! berth-worker: connects to a coordinator over QUIC with mutual TLS, claims tasks for
//! its free slots, runs them (process or Docker executor), streams their output through an
//! on-disk spool, heartbeats its leases, and reconnects with backoff keeping its
//! attempts alive.

pub mod agent;
pub mod contain;
pub mod copy;
pub mod executor;
pub mod host;
pub mod identity;
pub mod secrets;
pub mod session;
pub mod slot;
pub mod spool;
pub mod sweep;

use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub coordinators: Vec<String>,
    pub ca_pem: String,
    pub join_token: Option<String>,
    pub work_dir: PathBuf,
    pub name: String,
    pub slots: usize,
    pub prefetch: usize,
    pub pool: String,
    pub labels: Vec<(String, String)>,
    pub executors: Vec<String>,
    pub server_name: Option<String>,
    /// What the operator allows this worker to use.
    pub limits: host::HostLimits,
    /// How process jobs are contained (identities, cgroups, the pids limit).
    pub contain: contain::ContainConfig,
    /// The secrets this worker holds for jobs (`--secrets`).
    pub secrets: secrets::Secrets,
    /// How the Docker executor holds sessions (packing, warm pools).
    pub docker: executor::docker::DockerOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Dial(#[from] berth_shared::dial::DialError),
    #[error("cannot use work dir {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
}

pub use session::run;
