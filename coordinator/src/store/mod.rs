//! The job store: the only writer of job state. Writes go to one thread that groups
//! every operation waiting in its queue into a single transaction and commits once
//! (group commit), so throughput is not one fsync per job; each caller is answered
//! only after its operation is durable. Reads use their own connections.
//!
//! After every commit the store publishes what changed (`Notice`) so watchers, log
//! followers and idle workers learn of it without polling.

pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use berth_shared::ids::{JobId, JobSelector, LeaseId};
use berth_shared::job::{Counts, JobSpec, JobState, Outcome};
use berth_shared::wire::{Assignment, ApiError, JobStatus, JobSummary, OutStream};
use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, oneshot, watch};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Db(#[from] rusqlite::Error),
    #[error("stored job {job} does not decode")]
    Corrupt { job: String },
    #[error("{0}")]
    Api(ApiError),
    #[error("the job store has stopped")]
    Stopped,
    #[error("cannot open the store at {path}")]
    Open { path: String, #[source] source: rusqlite::Error },
}

impl From<ApiError> for StoreError {
    fn from(e: ApiError) -> Self {
        StoreError::Api(e)
    }
}

/// What a worker can run, for claim eligibility.
#[derive(Clone, Debug, Default)]
pub struct WorkerCaps {
    pub executors: Vec<String>,
    pub cpus: u32,
    pub mem_mib: u64,
    pub gpus: u32,
}

impl WorkerCaps {
    /// Whether a worker with these capabilities could ever run `spec`.
    pub fn can_run(&self, spec: &JobSpec) -> bool {
        let exec = match spec.executor {
            berth_shared::job::Executor::Process => "process",
            berth_shared::job::Executor::Docker { .. } => "docker",
        };
        let r = &spec.resources;
        self.executors.iter().any(|e| e == exec)
            && (r.millicpus == 0 || r.millicpus <= self.cpus.saturating_mul(1000))
            && (r.mem_mib == 0 || r.mem_mib <= self.mem_mib)
            && r.gpus <= self.gpus
    }
}

/// One output chunk to store.
#[derive(Clone, Debug)]
pub struct LogChunk {
    pub lease: LeaseId,
    pub stream: OutStream,
    pub seq: u64,
    pub data: Vec<u8>,
}

/// Per chunk: stored (or a duplicate, already stored), or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkVerdict {
    Stored,
    Duplicate,
    /// The lease is unknown or no longer the task's: kill that attempt.
    StaleLease,
    /// A gap in the sequence: the chunk is dropped and must be resent in order.
    OutOfOrder { expected: u64 },
}

#[derive(Clone, Debug)]
pub struct Submitted {
    pub job: JobId,
    pub tasks: u64,
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishVerdict {
    /// The result was recorded.
    Recorded,
    /// The task had been cancelled; the attempt's runtime was recorded, the state kept.
    AfterCancel,
    /// The lease is stale: nothing recorded, kill the attempt.
    Stale,
}

/// A lease that expired and what became of its task.
#[derive(Clone, Debug)]
pub struct Expired {
    pub job: JobId,
    pub index: Option<u32>,
    pub lease: LeaseId,
    pub worker: String,
    pub requeued: bool,
}

/// A running attempt that must be killed on its worker.
#[derive(Clone, Debug)]
pub struct KillOrder {
    pub worker: String,
    pub lease: LeaseId,
}

/// What a worker that (re)registers held, sorted out.
#[derive(Clone, Debug, Default)]
pub struct Reconciled {
    /// Leases the worker reported that are no longer valid: kill them.
    pub stale: Vec<LeaseId>,
    /// Tasks the store had running on this worker that it no longer holds: re-queued.
    pub lost: u64,
}

/// The write operations. Each is applied inside the batch transaction.
pub enum Op {
    Submit { spec: Box<JobSpec>, owner: String, idempotency_key: uuid::Uuid, now: DateTime<Utc>, reply: oneshot::Sender<Result<Submitted, StoreError>> },
    Claim { worker: String, n: u32, caps: Arc<WorkerCaps>, now: DateTime<Utc>, ttl: Duration, reply: oneshot::Sender<Result<Vec<Assignment>, StoreError>> },
    Started { worker: String, lease: LeaseId, now: DateTime<Utc> },
    Finish { worker: String, lease: LeaseId, outcome: Outcome, now: DateTime<Utc>, reply: oneshot::Sender<Result<FinishVerdict, StoreError>> },
    Heartbeat { worker: String, leases: Vec<LeaseId>, now: DateTime<Utc>, ttl: Duration, reply: oneshot::Sender<Result<Vec<LeaseId>, StoreError>> },
    Reconcile { worker: String, held: Vec<LeaseId>, now: DateTime<Utc>, ttl: Duration, reply: oneshot::Sender<Result<Reconciled, StoreError>> },
    AppendLogs { worker: String, chunks: Vec<LogChunk>, reply: oneshot::Sender<Result<Vec<ChunkVerdict>, StoreError>> },
    Cancel { job: JobSelector, reason: String, now: DateTime<Utc>, reply: oneshot::Sender<Result<(JobId, u64, Vec<KillOrder>), StoreError>> },
    ExpireLeases { now: DateTime<Utc>, reply: oneshot::Sender<Result<Vec<Expired>, StoreError>> },
    /// Coordinator start: every running lease gets a full TTL from now.
    RestartLeases { now: DateTime<Utc>, ttl: Duration, reply: oneshot::Sender<Result<u64, StoreError>> },
    UseToken { token: String, worker: String, now: DateTime<Utc>, reply: oneshot::Sender<Result<(), StoreError>> },
    SetDrain { worker: String, drained: bool, reply: oneshot::Sender<Result<bool, StoreError>> },
}

/// What the store tells the rest of the coordinator after a commit.
#[derive(Clone, Debug)]
pub enum Notice {
    /// A job's counts changed.
    Job { job: JobId, counts: Counts, state: JobState },
    /// A task's attempt ended (its output is complete).
    TaskEnded { job: JobId, index: Option<u32>, attempt: u32, state: JobState },
    /// Output was stored.
    Output { job: JobId, index: Option<u32>, attempt: u32, stream: OutStream, seq: u64, data: Arc<Vec<u8>> },
}

/// Read queries, answered from a read connection.
pub trait Reader {
    fn resolve(&self, sel: &JobSelector) -> Result<(i64, JobId), StoreError>;
    fn status(&self, sel: &JobSelector) -> Result<JobStatus, StoreError>;
    fn list(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobSummary>, StoreError>;
    fn summary(&self, job_seq: i64) -> Result<JobSummary, StoreError>;
    /// Output of one attempt after the given per-stream sequence numbers, in arrival order.
    fn logs(&self, job_seq: i64, index: Option<u32>, attempt: Option<u32>, after: (u64, u64)) -> Result<LogRead, StoreError>;
    /// For `--wait`: the exit code of a finished job (the first failing task's for an array).
    fn exit_code(&self, job_seq: i64) -> Result<Option<i32>, StoreError>;
    fn workers(&self) -> Result<Vec<(String, bool)>, StoreError>;
    fn is_drained(&self, worker: &str) -> Result<bool, StoreError>;
}

/// Output read back, and whether the attempt has ended (so a follower may stop).
#[derive(Debug, Default)]
pub struct LogRead {
    pub attempt: u32,
    pub chunks: Vec<(OutStream, u64, Vec<u8>)>,
    pub ended: bool,
    pub task_state: Option<JobState>,
}

/// A handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: std::sync::mpsc::Sender<Op>,
    pub notices: broadcast::Sender<Arc<Notice>>,
    /// Bumped whenever claimable work may have appeared (submit, requeue).
    pub work: Arc<watch::Sender<u64>>,
}

impl StoreHandle {
    pub fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).map_err(|_| StoreError::Stopped)
    }

    /// Sends an operation built around a reply channel and waits for its answer.
    pub async fn call<T>(&self, build: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(build(tx))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

/// Starts the writer thread over `store`.
pub fn spawn_writer(mut store: SqliteStore) -> StoreHandle {
    let (tx, rx) = std::sync::mpsc::channel::<Op>();
    let (notices, _) = broadcast::channel(8192);
    let (work, _) = watch::channel(0u64);
    let handle = StoreHandle { tx, notices: notices.clone(), work: Arc::new(work) };
    let work = handle.work.clone();
    std::thread::Builder::new()
        .name("job-store".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < 4096 {
                    match rx.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                let out = store.apply_batch(batch);
                for n in out.notices {
                    let _ = notices.send(Arc::new(n));
                }
                if out.work_available {
                    work.send_modify(|g| *g += 1);
                }
                for reply in out.replies {
                    reply();
                }
            }
            tracing::debug!("job store writer stopped");
        })
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the job store thread"));
    handle
}

/// What one committed batch produced.
#[derive(Default)]
pub struct BatchOutcome {
    pub notices: Vec<Notice>,
    pub work_available: bool,
    /// Answers, sent only after the commit.
    pub replies: Vec<Box<dyn FnOnce() + Send>>,
}
