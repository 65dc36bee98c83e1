//! The job store: the only writer of job state. Writes go to one thread that groups
//! every operation waiting in its queue into a single transaction and commits once
//! (group commit), so throughput is not one fsync per job; each caller is answered
//! only after its operation is durable. Reads use their own connections.
//!
//! After every commit the store publishes what changed (`Notice`) so watchers, log
//! followers and idle workers learn of it without polling.

pub mod cluster;
pub mod engine;
pub mod health;
pub mod read;
pub mod schema;
pub mod segments;
#[macro_use]
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use berth_shared::ids::{JobId, JobSelector, LeaseId};
use berth_shared::job::{Counts, JobSpec, JobState, Outcome};
use berth_shared::wire::{ApiError, Assignment, FrozenImage, JobStatus, JobSummary, OutStream};
use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, oneshot, watch};

pub use engine::Store;
pub use read::ReadView;
pub use sql::{Db, PgDb, SqliteDb};

pub type SqliteStore = Store<SqliteDb>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database error: {}", sql::pg_message(.0))]
    Pg(#[from] postgres::Error),
    #[error("stored job {job} does not decode")]
    Corrupt { job: String },
    /// A data dir an older berth made that this one cannot bring up to its schema.
    #[error("cannot upgrade the store: {0}")]
    Upgrade(String),
    #[error("an expected row is missing")]
    Missing,
    #[error("{0}")]
    Api(ApiError),
    #[error("the job store has stopped")]
    Stopped,
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("conflict with another coordinator: {0}")]
    Retry(String),
    #[error("output segment {what}: {source}")]
    Segment {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The disk refused a write (see `health`): what submitters are told.
    #[error("{}", if *.full {
        format!("the coordinator's disk is full: it takes no new jobs until space is freed where its store is kept ({reason})")
    } else {
        format!("the coordinator cannot write its store: it takes no new jobs until that is fixed ({reason})")
    })]
    Unwritable { full: bool, reason: String },
}

impl StoreError {
    /// Whether the database asks for the transaction to be run again (PostgreSQL
    /// deadlock or serialisation failure; SQLite busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Retry(_) => true,
            StoreError::Pg(e) => {
                e.code().is_some_and(|c| *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED || *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
            }
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) => e.code == rusqlite::ErrorCode::DatabaseBusy,
            _ => false,
        }
    }
}

/// Where an operation's answer goes (taken when the answer is sent).
pub type Tx<T> = Option<oneshot::Sender<Result<T, StoreError>>>;

impl From<ApiError> for StoreError {
    fn from(e: ApiError) -> Self {
        StoreError::Api(e)
    }
}

pub use berth_shared::resources::FreeResources as Free;

use crate::scheduler::WorkerCaps;

/// What a claim took: the tasks (with the GPU indices each was given), when to ask
/// again if some task is waiting for a cheaper pool's spill delay, and whether it took
/// some of a bounded look at the queue with more queued behind it (so fewer than asked
/// does not mean the queue is empty: claim again).
#[derive(Clone, Debug, Default)]
pub struct Claimed {
    pub tasks: Vec<Assignment>,
    pub retry_in: Option<Duration>,
    pub more: bool,
}

/// One output chunk to store.
#[derive(Clone, Debug)]
pub struct LogChunk {
    pub lease: LeaseId,
    /// The exec of a session it is output of; 0 for a task's own output.
    pub exec: u32,
    pub stream: OutStream,
    pub seq: u64,
    /// Shared with the notice that live followers get: stored and sent without a copy.
    pub data: Arc<Vec<u8>>,
}

/// Per chunk: stored (or a duplicate, already stored), or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkVerdict {
    Stored,
    Duplicate,
    /// The task has ended (its output is complete): acknowledged, not stored.
    Dropped,
    /// Stored up to the attempt's output cap, which it passed: the task has failed, and
    /// the attempt is to be killed.
    OverCap,
    /// The lease is unknown or no longer the task's: kill that attempt.
    StaleLease,
    /// A gap in the sequence: the chunk is dropped and must be resent in order.
    OutOfOrder {
        expected: u64,
    },
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
    /// This attempt's result was already recorded (a resend after a reconnect):
    /// acknowledged, nothing changed.
    AlreadyRecorded,
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

/// What the Budget actor decided about a submission before the store admits it.
#[derive(Clone, Debug, Default)]
pub struct Admission {
    /// The account charged (the submitter's name unless the job names one).
    pub account: String,
    /// The upper bound of one attempt of one task on the costliest eligible pool
    /// (zero when only free pools are eligible).
    pub attempt_estimate: rust_decimal::Decimal,
    /// The whole submission's upper bound: every attempt of every task (what is
    /// reserved, or what an approver is asked to approve).
    pub run_estimate: rust_decimal::Decimal,
    /// The estimate reaches an approval threshold: hold the job for an approver.
    pub needs_approval: bool,
}

/// An approver's decision on a held job.
#[derive(Clone, Debug)]
pub struct Decided {
    pub job: JobId,
    pub state: JobState,
    pub tasks: u64,
}

/// An account's budget and this month's use of it.
pub use berth_shared::wire::BudgetInfo as BudgetRow;

/// The pools and their rates as the Budget actor last loaded them: it owns them, and
/// hands the store each new snapshot (`Op::UsePools`) for routing and charging.
pub type PoolsSnapshot = Arc<crate::pools::Pools>;

/// The write operations. Each is applied inside the batch transaction.
pub enum Op {
    Submit {
        spec: Box<JobSpec>,
        owner: String,
        idempotency_key: uuid::Uuid,
        admission: Admission,
        now: DateTime<Utc>,
        reply: Tx<Submitted>,
    },
    /// Approve (reserving then) or reject a job held for approval.
    Decide {
        job: JobSelector,
        approve: bool,
        by: String,
        reason: String,
        now: DateTime<Utc>,
        reply: Tx<Decided>,
    },
    SetBudget {
        account: String,
        run: rust_decimal::Decimal,
        month: rust_decimal::Decimal,
        by: String,
        now: DateTime<Utc>,
        reply: Tx<()>,
    },
    Claim {
        worker: String,
        n: u32,
        caps: Arc<WorkerCaps>,
        /// What the worker has free (None: judge by its capacity alone).
        free: Option<Free>,
        now: DateTime<Utc>,
        ttl: Duration,
        reply: Tx<Claimed>,
    },
    Started {
        worker: String,
        lease: LeaseId,
        now: DateTime<Utc>,
    },
    /// The pools the Budget actor loaded (at start, and on each reload): operations
    /// after this one route and charge by them.
    UsePools {
        pools: PoolsSnapshot,
    },
    Finish {
        worker: String,
        lease: LeaseId,
        outcome: Outcome,
        now: DateTime<Utc>,
        reply: Tx<FinishVerdict>,
    },
    Heartbeat {
        worker: String,
        leases: Vec<LeaseId>,
        now: DateTime<Utc>,
        ttl: Duration,
        reply: Tx<Vec<LeaseId>>,
    },
    Reconcile {
        worker: String,
        pool: String,
        held: Vec<LeaseId>,
        now: DateTime<Utc>,
        ttl: Duration,
        reply: Tx<Reconciled>,
    },
    AppendLogs {
        worker: String,
        chunks: Vec<LogChunk>,
        reply: Tx<Vec<ChunkVerdict>>,
    },
    Cancel {
        job: JobSelector,
        reason: String,
        now: DateTime<Utc>,
        reply: Tx<(JobId, u64, Vec<KillOrder>)>,
    },
    ExpireLeases {
        now: DateTime<Utc>,
        reply: Tx<Vec<Expired>>,
    },
    /// Coordinator start: every running lease gets a full TTL from now.
    RestartLeases {
        now: DateTime<Utc>,
        ttl: Duration,
        reply: Tx<u64>,
    },
    /// Enrol `worker` with a join token and the fingerprint of the certificate it is
    /// issued; refused while the name is held (`held`: the registry's view of it, the
    /// store adds its own: a recent enrolment, running leases).
    UseToken {
        token: String,
        worker: String,
        cert_fp: String,
        held: Option<String>,
        now: DateTime<Utc>,
        ttl: Duration,
        reply: Tx<()>,
    },
    SetDrain {
        worker: String,
        drained: bool,
        reply: Tx<bool>,
    },
    /// An attempt was frozen into `image`: its result is recorded as `frozen` (when the
    /// lease is still the task's) and the image as ready.
    Frozen {
        worker: String,
        lease: LeaseId,
        outcome: Outcome,
        image: String,
        now: DateTime<Utc>,
        reply: Tx<FinishVerdict>,
    },
    /// Reserve `berth-frozen:TAG` for a running Docker task (its owner's or an admin's
    /// request) and say which worker and lease to ask.
    FreezeStart {
        job: JobSelector,
        tag: Option<String>,
        by: String,
        admin: bool,
        now: DateTime<Utc>,
        reply: Tx<FreezeOrder>,
    },
    /// Number and record an exec of a ready session.
    ExecStart {
        job: JobSelector,
        /// The caller's: a session outside it is not found.
        scope: Scope,
        spec: berth_shared::session::ExecSpec,
        now: DateTime<Utc>,
        reply: Tx<engine::ExecOrder>,
    },
    /// An exec ended (fenced by the session's lease).
    ExecFinish {
        worker: String,
        lease: LeaseId,
        exec: u32,
        outcome: Outcome,
        now: DateTime<Utc>,
        reply: Tx<FinishVerdict>,
    },
    /// Forget a frozen image: removed from its engine, or its freeze was never asked for
    /// (a reservation only, unless the freeze completed meanwhile).
    ForgetImage {
        image: String,
        only_reserved: bool,
        reply: Tx<()>,
    },
}

/// A freeze to ask of a worker.
#[derive(Clone, Debug)]
pub struct FreezeOrder {
    pub job: JobId,
    pub index: Option<u32>,
    pub worker: String,
    pub lease: LeaseId,
    pub tag: String,
    /// `berth-frozen:TAG`, reserved for this task.
    pub image: String,
}

/// What the store tells the rest of the coordinator after a commit.
#[derive(Clone, Debug)]
pub enum Notice {
    /// A job's counts changed.
    Job { job: JobId, counts: Counts, state: JobState },
    /// A task's attempt ended (its output is complete).
    TaskEnded { job: JobId, index: Option<u32>, attempt: u32, state: JobState },
    /// Output was stored.
    Output { job: JobId, index: Option<u32>, attempt: u32, exec: u32, stream: OutStream, seq: u64, data: Arc<Vec<u8>> },
    /// A session's worker said its sandbox is ready.
    SessionReady { job: JobId, worker: String },
    /// An exec of a session ended (its output is complete).
    ExecEnded { job: JobId, end: berth_shared::session::ExecEnd },
}

/// The jobs a caller may see, and so name: its own; an approver also every job waiting
/// for approval; an admin every job. A job outside the scope answers exactly as a job
/// that does not exist (the same error, the same text), so ids cannot be probed, and a
/// prefix resolves among the jobs in scope only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every job (admins, and the coordinator's own reads).
    All,
    /// The jobs this user submitted (submitters).
    Own(String),
    /// The jobs this user submitted and every job waiting for approval (approvers).
    OwnAndPending(String),
}

impl Scope {
    /// The scope of a caller with this certificate.
    pub fn of(who: &str, role: berth_shared::wire::Role) -> Scope {
        use berth_shared::wire::Role;
        match role {
            Role::Admin => Scope::All,
            Role::Approver => Scope::OwnAndPending(who.to_string()),
            _ => Scope::Own(who.to_string()),
        }
    }

    /// A condition on `jobs` (its columns unqualified) whose one parameter, if any, is
    /// `?n`; and that parameter.
    pub fn sql(&self, n: usize) -> (String, Vec<sql::Val>) {
        match self {
            Scope::All => ("1 = 1".into(), Vec::new()),
            Scope::Own(who) => (format!("owner = ?{n}"), vec![who.as_str().into()]),
            Scope::OwnAndPending(who) => (format!("(owner = ?{n} OR state = 'pending_approval')"), vec![who.as_str().into()]),
        }
    }
}

/// Read queries, answered from a read connection. Those that name jobs take the
/// caller's `Scope`.
pub trait Reader {
    /// Whether a session's worker has said its sandbox is ready.
    fn session_ready(&mut self, job_seq: i64) -> Result<bool, StoreError>;
    /// A ready session's worker and lease (`Refused` while it opens or once it ended).
    fn session_lease(&mut self, sel: &JobSelector, scope: &Scope) -> Result<(JobId, String, LeaseId), StoreError>;
    /// A session's execs, in order.
    fn execs(&mut self, job_seq: i64) -> Result<Vec<berth_shared::session::ExecInfo>, StoreError>;
    /// A session: its status, execs and money.
    fn session(&mut self, sel: &JobSelector, scope: &Scope) -> Result<berth_shared::wire::SessionStatus, StoreError>;
    /// The newest `limit` sessions in `scope`.
    fn sessions(&mut self, limit: u32, scope: &Scope) -> Result<Vec<berth_shared::wire::SessionSummary>, StoreError>;
    /// Output of one exec after the given per-stream sequence numbers, and its end once it has one.
    fn exec_logs(&mut self, job_seq: i64, exec: u32, after: (u64, u64)) -> Result<ExecRead, StoreError>;
    fn resolve(&mut self, sel: &JobSelector, scope: &Scope) -> Result<(i64, JobId), StoreError>;
    fn status(&mut self, sel: &JobSelector, scope: &Scope) -> Result<JobStatus, StoreError>;
    /// The newest `limit` jobs in `scope` (and in `state`, if given).
    fn list(&mut self, state: Option<JobState>, limit: u32, scope: &Scope) -> Result<Vec<JobSummary>, StoreError>;
    fn summary(&mut self, job_seq: i64) -> Result<JobSummary, StoreError>;
    /// Output of one attempt after the given per-stream sequence numbers, in arrival order.
    fn logs(&mut self, job_seq: i64, index: Option<u32>, attempt: Option<u32>, after: (u64, u64)) -> Result<LogRead, StoreError>;
    /// For `--wait`: the exit code of a finished job (the first failing task's for an array).
    fn exit_code(&mut self, job_seq: i64) -> Result<Option<i32>, StoreError>;
    fn workers(&mut self) -> Result<Vec<(String, bool)>, StoreError>;
    fn is_drained(&mut self, worker: &str) -> Result<bool, StoreError>;
    /// The fingerprint of the certificate the worker's latest enrolment was issued, if
    /// it was enrolled with a join token.
    fn worker_cert(&mut self, worker: &str) -> Result<Option<String>, StoreError>;
    /// Budgets and their use in `month`: one account, or all that have a budget or a
    /// ledger row.
    fn budgets(&mut self, account: Option<&str>, month: &str) -> Result<Vec<BudgetRow>, StoreError>;
    /// Frozen images that are ready: one owner's, or everyone's.
    fn images(&mut self, owner: Option<&str>) -> Result<Vec<FrozenImage>, StoreError>;
    /// One frozen image by name (ready or still being made).
    fn image(&mut self, name: &str) -> Result<Option<FrozenImage>, StoreError>;
    /// The image a task was frozen into.
    fn frozen_image(&mut self, job_seq: i64, index: Option<u32>) -> Result<Option<FrozenImage>, StoreError>;
}

/// Output read back, and whether the attempt has ended (so a follower may stop).
#[derive(Debug, Default)]
pub struct LogRead {
    pub attempt: u32,
    pub chunks: Vec<(OutStream, u64, Vec<u8>)>,
    pub ended: bool,
    pub task_state: Option<JobState>,
}

/// What `Reader::exec_logs` found.
#[derive(Debug)]
pub struct ExecRead {
    pub chunks: Vec<(OutStream, u64, Vec<u8>)>,
    /// How it ended; an exec left running by a session that ended reads as ended with it.
    pub end: Option<berth_shared::session::ExecEnd>,
}

/// A handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: std::sync::mpsc::Sender<Op>,
    pub notices: broadcast::Sender<Arc<Notice>>,
    /// Bumped whenever claimable work may have appeared (submit, requeue).
    pub work: Arc<watch::Sender<u64>>,
    /// Whether the store can write; changed before the answers of the batch that
    /// changed it are sent.
    pub health: Arc<watch::Sender<health::Health>>,
}

impl StoreHandle {
    /// Resolves once the store can write (at once if it can).
    pub async fn writable(&self) {
        let mut rx = self.health.subscribe();
        let _ = rx.wait_for(|h| h.is_none()).await;
    }

    pub fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).map_err(|_| StoreError::Stopped)
    }

    /// Sends an operation built around a reply channel and waits for its answer.
    pub async fn call<T>(&self, build: impl FnOnce(Tx<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(build(Some(tx)))?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }
}

/// Starts the writer thread over `store`. While the store cannot write, it is probed
/// every `health::PROBE_EVERY` between batches (see `health`).
pub fn spawn_writer<D: Db + 'static>(mut store: Store<D>, committed: impl Fn() + Send + 'static) -> StoreHandle {
    let (tx, rx) = std::sync::mpsc::channel::<Op>();
    let (notices, _) = broadcast::channel(8192);
    let (work, _) = watch::channel(0u64);
    let (health, _) = watch::channel(None);
    let handle = StoreHandle { tx, notices: notices.clone(), work: Arc::new(work), health: Arc::new(health) };
    let work = handle.work.clone();
    let health = handle.health.clone();
    let publish = move |store: &Store<D>| {
        health.send_if_modified(|h| {
            if h != store.health() {
                h.clone_from(store.health());
                true
            } else {
                false
            }
        })
    };
    std::thread::Builder::new()
        .name("job-store".into())
        .spawn(move || {
            let mut probe_at = std::time::Instant::now();
            loop {
                let first = if store.health().is_some() {
                    match rx.recv_timeout(probe_at.saturating_duration_since(std::time::Instant::now())) {
                        Ok(op) => Some(op),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                } else {
                    match rx.recv() {
                        Ok(op) => Some(op),
                        Err(_) => break,
                    }
                };
                if store.health().is_some() && std::time::Instant::now() >= probe_at {
                    probe_at = std::time::Instant::now() + health::PROBE_EVERY;
                    if store.probe(Utc::now()) {
                        committed();
                        publish(&store);
                        // Claims that failed meanwhile are worth making again.
                        work.send_modify(|g| *g += 1);
                    }
                }
                let Some(first) = first else { continue };
                let mut batch = vec![first];
                while batch.len() < 4096 {
                    match rx.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                let was_writable = store.health().is_none();
                let out = store.apply_batch(batch);
                // A checkpoint cannot write either while the store cannot.
                if store.health().is_none() {
                    committed();
                }
                if publish(&store) && was_writable {
                    probe_at = std::time::Instant::now() + health::PROBE_EVERY;
                }
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

/// Where the job store lives: the embedded SQLite file, or a PostgreSQL database that
/// several coordinators share.
#[derive(Clone, Debug)]
pub enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Location {
    /// `--store`: a `postgres://` (or `postgresql://`) URL, `sqlite:PATH`, or nothing
    /// for the data dir's `berth.db`.
    pub fn parse(flag: Option<&str>, default_db: &std::path::Path) -> Result<Location, String> {
        match flag.map(str::trim) {
            None | Some("") => Ok(Location::Sqlite(default_db.to_path_buf())),
            Some(s) if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
                s.parse::<postgres::Config>().map_err(|e| format!("--store `{}` is not a valid PostgreSQL URL: {e}", sql::redact(s)))?;
                Ok(Location::Postgres(s.to_string()))
            }
            Some(s) => match s.strip_prefix("sqlite:") {
                Some(path) if !path.is_empty() => Ok(Location::Sqlite(path.into())),
                _ => Err(format!("--store `{}` is neither postgres://USER@HOST/DB nor sqlite:PATH", sql::redact(s))),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => format!("sqlite:{}", p.display()),
            Location::Postgres(u) => sql::redact(u),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }

    /// A connection with the schema in place.
    pub fn connect(&self) -> Result<Box<dyn Db>, StoreError> {
        off_runtime(|| {
            let mut db: Box<dyn Db> = match self {
                Location::Sqlite(p) => Box::new(SqliteDb::open(p)?),
                Location::Postgres(u) => Box::new(PgDb::connect(u)?),
            };
            schema::migrate(db.as_mut())?;
            Ok(db)
        })
    }

    /// Starts the group-commit writer; `lease_ttl` is what every running lease gets
    /// when the store can write again after it could not.
    pub fn writer(&self, pools: PoolsSnapshot, lease_ttl: Duration) -> Result<StoreHandle, StoreError> {
        off_runtime(|| {
            Ok(match self {
                Location::Sqlite(p) => {
                    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
                    let mut store = Store::new(SqliteDb::open_writer(p)?)?.with_pools(pools).with_lease_ttl(lease_ttl).with_probe_dir(dir);
                    // A database from before segments keeps every chunk in its rows.
                    if !store.db().has_legacy_logs()? {
                        let dir = segments::dir_for(p);
                        let seg = segments::Segments::open(&dir).map_err(|e| StoreError::Open { path: dir.display().to_string(), message: e.to_string() })?;
                        store = store.with_segments(seg);
                    }
                    let checkpoint = SqliteDb::spawn_checkpointer(p)?;
                    spawn_writer(store, move || {
                        let _ = checkpoint.try_send(());
                    })
                }
                Location::Postgres(u) => {
                    let me = uuid::Uuid::new_v4().to_string();
                    let store = Store::new(PgDb::connect(u)?)?.with_pools(pools).with_lease_ttl(lease_ttl).notify_as(me.clone());
                    let handle = spawn_writer(store, || {});
                    cluster::spawn_listener(u.clone(), me, handle.clone());
                    handle
                }
            })
        })
    }

    /// A read connection.
    pub fn reader(&self) -> Result<Box<dyn Reader + Send>, StoreError> {
        off_runtime(|| {
            Ok(match self {
                Location::Sqlite(p) => {
                    Box::new(ReadView::new(SqliteDb::open(p)?).with_segments(segments::SegmentReader::new(&segments::dir_for(p)))) as Box<dyn Reader + Send>
                }
                Location::Postgres(u) => Box::new(ReadView::new(PgDb::connect(u)?)),
            })
        })
    }
}

/// Runs blocking database work on a thread of its own: the PostgreSQL client drives
/// its own runtime and must not be called from an async task's thread. The store only
/// does this while starting; afterwards its connections live on their own threads.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T, StoreError> + Send) -> Result<T, StoreError> {
    std::thread::scope(|s| s.spawn(f).join().unwrap_or(Err(StoreError::Stopped)))
}
