//! The wire protocol between client, worker and coordinator. These are wire types,
//! not actor messages: each side converts at the connection. A change to any shape
//! here is a protocol change: bump `PROTOCOL_VERSION` and update the golden bytes.
//!
//! Connection layout: the peer opens a bi stream and sends `Hello`; the coordinator
//! answers `HelloReply`. A client then opens one bi stream per `Request` and reads
//! `Response` frames until the stream ends. A worker keeps the hello stream as its
//! control stream (`WorkerMsg` up, `CoordMsg` down) and opens one uni stream per
//! running attempt for output (`OutputFrame`).

use crate::ids::{JobId, JobSelector, LeaseId};
use crate::job::{Command, Counts, Event, JobSpec, JobState, Outcome};
use crate::session::{ExecEnd, ExecInfo, ExecSpec, SessionState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::resources::{gpu_matches, FreeResources};

/// Bumped whenever a message shape changes. 2: a worker's `Register` names its
/// process (`instance`) and the coordinator may answer `CoordMsg::InUse`.
pub const PROTOCOL_VERSION: u32 = 4;
/// The ALPN token: the framing (a hello first, then length-prefixed frames), which
/// every protocol version keeps, so a peer of another version is told so in words by
/// the hello rather than failing the TLS handshake.
pub const ALPN: &[u8] = b"berth/1";
/// Frames larger than this are refused and close the connection.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
/// The most output bytes one chunk carries.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// What a connecting peer wants to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerKind {
    Client,
    Worker,
    /// A worker without a certificate yet, enrolling with a join token.
    Enrol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub software: String,
    pub kind: PeerKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome {
        protocol: u32,
        coordinator: String,
        /// Who the coordinator thinks you are (from your certificate).
        identity: String,
        role: Role,
    },
    Refused {
        reason: String,
    },
}

/// Roles carried in certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Admin,
    Approver,
    Submitter,
    Worker,
    /// A peer without a certificate (enrolment only).
    Anonymous,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Approver => "approver",
            Role::Submitter => "submitter",
            Role::Worker => "worker",
            Role::Anonymous => "anonymous",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "approver" => Some(Role::Approver),
            "submitter" => Some(Role::Submitter),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------- client requests

// A request lives for one decode and one dispatch; boxing the spec would only add an
// allocation to the common case.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Submit a job or an array. The idempotency key makes a retried submission
    /// return the job the first one made.
    Submit {
        spec: JobSpec,
        idempotency_key: uuid::Uuid,
    },
    Status {
        job: JobSelector,
    },
    List {
        state: Option<JobState>,
        limit: u32,
    },
    /// Output of one task (the first task of an array when no index is given).
    Logs {
        job: JobSelector,
        attempt: Option<u32>,
        follow: bool,
    },
    Cancel {
        job: JobSelector,
        reason: Option<String>,
    },
    /// Stream `Progress` until every task of the job has ended, then `Finished`;
    /// with `tasks`, also a `TaskDone` as each task ends.
    Watch {
        job: JobSelector,
        tasks: bool,
    },
    Workers,
    Drain {
        worker: String,
        drain: bool,
    },
    /// Enrol a worker: only on an `Enrol` connection.
    Enrol {
        token: String,
        name: String,
        csr_pem: String,
    },
    /// Approve or reject a job waiting for approval (approver or admin).
    Decide {
        job: JobSelector,
        approve: bool,
        reason: String,
    },
    /// Set an account's caps (admin).
    SetBudget {
        account: String,
        run: rust_decimal::Decimal,
        month: rust_decimal::Decimal,
    },
    /// Caps and this month's use: one account, or every account the caller may see.
    Budgets {
        account: Option<String>,
    },
    /// Freeze a running Docker task (owner or admin): its worker stops the container and
    /// commits it, with a copy of its workspace, to `berth-frozen:TAG` (`tag`, or the
    /// job's short id). Answered once the task has ended: `Frozen`, or an error saying
    /// how it ended instead. A freeze keeps the filesystem, not process memory.
    Freeze {
        job: JobSelector,
        tag: Option<String>,
    },
    /// Submit a new job from a frozen task's image with the same command and resources
    /// (or `command`), linked to it; answered like `Submit`.
    Resume {
        job: JobSelector,
        command: Option<Command>,
        idempotency_key: uuid::Uuid,
    },
    /// Frozen images (a submitter sees its own).
    Images,
    /// Remove a frozen image from the engine of the worker that holds it (owner or admin).
    RemoveImage {
        image: String,
    },
    /// The coordinator's own state: whether its store can write (`berth status`).
    Health,
    /// Open a session (`spec.session` set): answered `Submitted` at once, then
    /// `SessionReady` once its sandbox is, or an error.
    OpenSession {
        spec: JobSpec,
        idempotency_key: uuid::Uuid,
    },
    /// Run a command in a session: `ExecStarted`, then (unless `detach`) its output
    /// live and `ExecEnded`. With `exec.stdin`, the client sends `StdinFrame`s on the
    /// same stream after this request.
    Exec {
        session: JobSelector,
        exec: ExecSpec,
        detach: bool,
    },
    /// A recorded exec's output after the first `after` chunks of stdout and of
    /// stderr (what a client printed before its connection was lost); with `follow`,
    /// until it ends (then `ExecEnded`).
    ExecOutput {
        session: JobSelector,
        exec: u32,
        follow: bool,
        after: (u64, u64),
    },
    /// Close a session (idempotent).
    CloseSession {
        session: JobSelector,
    },
    SessionStatus {
        session: JobSelector,
    },
    Sessions {
        limit: u32,
    },
    /// Copy into a session's workspace: answered `CopyReady`, after which the client
    /// sends a tar stream (raw bytes, to the end of its stream) whose entries are
    /// under `name`, then `Copied`. An existing directory `dest` receives `name` in it;
    /// otherwise `name` is saved as `dest`.
    CopyIn {
        session: JobSelector,
        dest: String,
        name: String,
    },
    /// Copy out of a session's workspace: `CopyReady`, then a tar stream of `path`
    /// (raw bytes, to the end of the stream), entries under its last component.
    CopyOut {
        session: JobSelector,
        path: String,
    },
}

/// The first frame of a stream the coordinator opens to a worker for a session's copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyRequest {
    In { lease: LeaseId, dest: String, name: String },
    Out { lease: LeaseId, path: String },
}

/// A worker's answers on a copy stream: `Ready` (then, copying out, the tar's bytes),
/// and, copying in, `Done` or `Failed` once the tar is unpacked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyReply {
    Ready,
    Done { files: u64, dirs: u64, symlinks: u64, bytes: u64 },
    Failed(String),
}

/// What a client sends after an `Exec` that reads stdin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdinFrame {
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Stdin is closed.
    End,
}

/// A session as `berth session status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub job: JobStatus,
    pub state: SessionState,
    pub execs: Vec<ExecInfo>,
    /// Money set aside for it, and spent once it closed.
    pub reserved: rust_decimal::Decimal,
    pub spent: rust_decimal::Decimal,
}

/// One row of `berth session list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: JobId,
    pub name: Option<String>,
    pub state: SessionState,
    pub owner: String,
    pub worker: Option<String>,
    pub opened_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub execs: u32,
    pub reason: Option<String>,
}

/// The coordinator's own state, for `berth status` without a job (and a warning above
/// `berth status JOB` and `berth workers` while its store cannot write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorHealth {
    pub coordinator: String,
    pub store: StoreHealth,
    /// The output cap of a job that sets none (`max_output` in its config), in bytes.
    pub default_max_output: u64,
}

/// Whether the job store takes writes. While it does not (its disk is full, say), new
/// submissions are refused; output and results wait on the workers, which send them
/// again once it does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHealth {
    pub writable: bool,
    /// It cannot write because its disk is full (otherwise another write failure).
    pub disk_full: bool,
    /// Since when it cannot write.
    pub since: Option<DateTime<Utc>>,
    /// What the last failed write said.
    pub reason: Option<String>,
}

/// An image a task was frozen into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenImage {
    /// `berth-frozen:TAG`.
    pub image: String,
    pub job: JobId,
    pub index: Option<u32>,
    /// The worker whose Docker engine holds the image.
    pub worker: String,
    pub owner: String,
    pub created_at: DateTime<Utc>,
}

/// An account's caps and this month's use of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetInfo {
    pub account: String,
    /// The calendar month (UTC), `YYYY-MM`.
    pub month: String,
    pub run_cap: rust_decimal::Decimal,
    pub month_cap: rust_decimal::Decimal,
    pub reserved: rust_decimal::Decimal,
    pub spent: rust_decimal::Decimal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Bad input: the request names something invalid (exit 2).
    Invalid,
    /// Refused by the budget or by authorisation (exit 3).
    Refused,
    /// No such job (exit 5).
    NotFound,
    /// The prefix matches several jobs (exit 2).
    Ambiguous,
    /// Something broke on the coordinator (exit 1).
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into() }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: JobId,
    pub name: Option<String>,
    pub state: JobState,
    pub counts: Counts,
    pub tasks: u64,
    pub account: Option<String>,
    pub owner: String,
    pub submitted_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Why a queued job is not running, when the coordinator knows.
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub index: Option<u32>,
    pub state: JobState,
    pub attempt: u32,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub runtime_ms: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub summary: JobSummary,
    pub spec: JobSpec,
    /// The selected task (for an array with `:INDEX`), or the single job's task.
    pub task: Option<TaskStatus>,
    pub events: Vec<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutStream {
    Stdout,
    Stderr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub connected: bool,
    pub slots: u32,
    pub running: u32,
    pub drained: bool,
    pub pool: String,
    pub labels: Vec<(String, String)>,
    pub host: HostInfo,
    pub leases: Vec<LeaseId>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Each slot's state as the worker last said (`available`, `acquired`,
    /// `executing`, `releasing`, `error (why)`).
    pub slot_states: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Submitted {
        job: JobId,
        tasks: u64,
        duplicate: bool,
        /// Why it may wait: no connected worker could run it (the job is still queued).
        warning: Option<String>,
    },
    Status(Box<JobStatus>),
    List(Vec<JobSummary>),
    Output {
        stream: OutStream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Progress {
        counts: Counts,
    },
    /// One task ended (its output is complete).
    TaskDone {
        index: Option<u32>,
        attempt: u32,
        state: JobState,
    },
    /// Every task has ended; `exit_code` is the single job's code, or for an
    /// array 0 when every task succeeded and the first failing code otherwise.
    Finished {
        state: JobState,
        counts: Counts,
        exit_code: Option<i32>,
    },
    Cancelled {
        job: JobId,
        tasks: u64,
    },
    Workers(Vec<WorkerInfo>),
    Drained {
        worker: String,
        drained: bool,
    },
    Enrolled {
        cert_pem: String,
    },
    /// The end of a stream of responses.
    End,
    Error(ApiError),
    Decided {
        job: JobId,
        state: JobState,
        tasks: u64,
    },
    BudgetSet {
        account: String,
    },
    Budgets(Vec<BudgetInfo>),
    /// The task was frozen into `image`.
    Frozen {
        job: JobId,
        index: Option<u32>,
        image: String,
    },
    Images(Vec<FrozenImage>),
    ImageRemoved {
        image: String,
    },
    Health(CoordinatorHealth),
    SessionReady {
        session: JobId,
        worker: String,
    },
    ExecStarted {
        exec: u32,
    },
    ExecEnded(ExecEnd),
    SessionClosed {
        session: JobId,
        /// It had ended already (close is idempotent).
        already: bool,
    },
    Session(Box<SessionStatus>),
    Sessions(Vec<SessionSummary>),
    /// The copy's other end is ready: the tar's bytes follow (raw, to the end of the stream).
    CopyReady,
    Copied {
        files: u64,
        dirs: u64,
        symlinks: u64,
        bytes: u64,
    },
}

// ---------------------------------------------------------------- worker protocol

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub vram_mib: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub cpus: u32,
    pub mem_mib: u64,
    pub gpus: Vec<GpuInfo>,
    pub docker: bool,
    pub kvm: bool,
    pub executors: Vec<String>,
    /// How process jobs are contained there.
    pub containment: Containment,
    /// The secrets it holds and who may use them (never their values).
    pub secrets: Vec<SecretGrant>,
}

/// How a worker contains its process jobs: who they run as, and whether cgroups
/// enforce their CPUs, memory and pids (said at its start and in `berth workers`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Containment {
    /// Who jobs run as, in words.
    pub identity: String,
    /// Jobs run as users other than the worker's (they cannot read its files).
    pub separate_users: bool,
    /// The cgroups in use, or why there are none.
    pub cgroups: String,
    /// cgroups enforce `--cpus`, `--mem` and a pids limit and end an attempt's every process.
    pub enforced: bool,
}

/// A secret declared on a worker: its name, and the accounts that may use it (empty:
/// every account).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretGrant {
    pub name: String,
    pub accounts: Vec<String>,
}

impl SecretGrant {
    /// Whether a job of `account` may use it.
    pub fn allows(&self, account: &str) -> bool {
        self.accounts.is_empty() || self.accounts.iter().any(|a| a == account || a == "*")
    }
}

/// Worker → coordinator on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerMsg {
    Register {
        name: String,
        slots: u32,
        pool: String,
        labels: Vec<(String, String)>,
        /// Boxed: the rest of the messages are small (the same bytes on the wire).
        host: Box<HostInfo>,
        /// Leases of attempts still alive on this worker (after a reconnect).
        held: Vec<LeaseId>,
        /// This worker process, made at its start: a reconnect of the same process
        /// replaces its old connection; another process presenting the same certificate
        /// (a copied work dir, a cloned machine) is answered `InUse` while this one lives.
        instance: uuid::Uuid,
    },
    /// The worker can take `n` more tasks than it has asked for so far.
    Want { n: u32 },
    /// The attempt's process started.
    Started { lease: LeaseId },
    /// The attempt ended; every output chunk up to `stdout_chunks`/`stderr_chunks`
    /// has been acknowledged already.
    Finished { lease: LeaseId, outcome: Outcome },
    /// Renew these leases.
    Heartbeat { leases: Vec<LeaseId> },
    /// The attempt was frozen into `image` (its container stopped and committed); sent
    /// instead of `Finished`, once every output chunk has been acknowledged.
    Frozen { lease: LeaseId, image: String, outcome: Outcome },
    /// The answer to `CoordMsg::RemoveImage`: removed, or why not.
    ImageRemoved { image: String, error: Option<String> },
    /// As `Want`, with what is free right now: the coordinator hands out only tasks
    /// that fit it (the worker has set aside what its running and waiting tasks use).
    WantFit { n: u32, free: FreeResources },
    /// An exec of a session ended (sent once its output is all acknowledged).
    ExecFinished { lease: LeaseId, exec: u32, outcome: Outcome },
    /// Each slot's state (sent when a session's slot changes, and with heartbeats).
    Slots { states: Vec<String> },
}

/// One task handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub lease: LeaseId,
    pub job: JobId,
    pub index: Option<u32>,
    pub attempt: u32,
    pub spec: JobSpec,
    /// Who submitted it (a session's owner: only its own sessions share a packed
    /// container).
    pub owner: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KillReason {
    Cancelled,
    /// The lease is no longer valid (expired, re-queued elsewhere, unknown).
    StaleLease,
    TimedOut,
}

/// Coordinator → worker on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordMsg {
    Registered {
        lease_ttl_ms: u64,
        /// Of the leases the worker reported, those it must kill.
        stale: Vec<LeaseId>,
    },
    Assign(Vec<Assignment>),
    Kill {
        lease: LeaseId,
        reason: KillReason,
    },
    /// Output chunks up to and including `seq` of that stream are durable.
    OutputAck {
        lease: LeaseId,
        stream: OutStream,
        seq: u64,
    },
    /// The result was recorded (`accepted`), or rejected because the lease is stale.
    FinishedAck {
        lease: LeaseId,
        accepted: bool,
    },
    HeartbeatAck {
        stale: Vec<LeaseId>,
    },
    Refused {
        reason: String,
    },
    /// Freeze this Docker attempt into `berth-frozen:TAG`.
    Freeze {
        lease: LeaseId,
        tag: String,
    },
    /// Remove this frozen image from the worker's engine; answered by `ImageRemoved`.
    RemoveImage {
        image: String,
    },
    /// Some of this attempt's output could not be stored (the coordinator's disk was
    /// full, say) and now can be: send every chunk not acknowledged again, on a new
    /// output stream.
    Resend {
        lease: LeaseId,
    },
    /// Another process of this worker (the same certificate) holds a live connection:
    /// this one is refused for now and may dial again after `retry_after_ms` (it takes
    /// over once the other has gone silent). The live one is never evicted.
    InUse {
        reason: String,
        retry_after_ms: u64,
    },
    /// Run a command in the session this lease holds.
    Exec {
        lease: LeaseId,
        exec: u32,
        spec: ExecSpec,
    },
    /// Stdin for a running exec; `eof` closes it.
    ExecStdin {
        lease: LeaseId,
        exec: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        eof: bool,
    },
    /// Kill one exec's process tree (its client went away, or asked).
    KillExec {
        lease: LeaseId,
        exec: u32,
    },
    ExecOutputAck {
        lease: LeaseId,
        exec: u32,
        stream: OutStream,
        seq: u64,
    },
    ExecFinishedAck {
        lease: LeaseId,
        exec: u32,
    },
}

/// Frames on an attempt's output stream: one `Open`, then chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputFrame {
    Open {
        lease: LeaseId,
    },
    /// `seq` counts from 1 per stream per attempt; duplicates are dropped.
    Chunk {
        stream: OutStream,
        seq: u64,
        /// As bytes, not a sequence of numbers: the same encoding, copied at once.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// As `Open`, for the output of one exec of a session.
    OpenExec {
        lease: LeaseId,
        exec: u32,
    },
}
