//! The job store's behaviour, written once and run against both backends: every test
//! below becomes `NAME::sqlite` (a temporary file) and `NAME::postgres` (a fresh
//! database on the server named by `BERTH_TEST_POSTGRES`, created for the test and
//! dropped after it). Without `BERTH_TEST_POSTGRES` the PostgreSQL half is skipped with
//! a note on stderr, except under `CI=true`, where it fails.
//!
//! The tests call `Store::apply_batch` directly on the test thread (no async runtime:
//! the synchronous PostgreSQL client must not run inside one) and pass `now`
//! explicitly, so lease clocks are exact and nothing sleeps.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_coordinator::scheduler::WorkerCaps;
use berth_coordinator::store::engine::create_token;
use berth_coordinator::store::segments::{self, Segments};
use berth_coordinator::store::sql::Val;
use berth_coordinator::store::{
    Admission, BatchOutcome, ChunkVerdict, Db, Expired, FinishVerdict, KillOrder, Location, LogChunk, Op, PgDb, Reader, Reconciled, Scope, SqliteDb, Store,
    StoreError, Submitted, Tx,
};
use berth_shared::ids::{JobId, JobSelector, LeaseId};
use berth_shared::job::{ArrayRange, Command, JobSpec, JobState, Outcome, Resources};
use berth_shared::wire::{ApiError, Assignment, ErrorKind, JobStatus, JobSummary, OutStream};
use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::oneshot;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ harness

/// A store of either backend, behind one object.
trait Apply: Send {
    fn apply(&mut self, ops: Vec<Op>) -> BatchOutcome;
}

impl<D: Db> Apply for Store<D> {
    fn apply(&mut self, ops: Vec<Op>) -> BatchOutcome {
        self.apply_batch(ops)
    }
}

/// Applies a one-operation batch, delivers its reply and returns the answer.
fn call_on<T>(store: &mut dyn Apply, build: impl FnOnce(Tx<T>) -> Op) -> Result<T, StoreError> {
    let (tx, rx) = oneshot::channel();
    let out = store.apply(vec![build(Some(tx))]);
    for reply in out.replies {
        reply();
    }
    rx.blocking_recv().expect("the store sent no reply")
}

/// A PostgreSQL database made for one test, dropped when the test is over.
struct PgScratch {
    admin_url: String,
    name: String,
}

impl PgScratch {
    fn create(admin_url: &str) -> (PgScratch, String) {
        let name = format!("berth_t_{}", Uuid::new_v4().simple());
        let mut admin = postgres::Client::connect(admin_url, postgres::NoTls).unwrap_or_else(|e| panic!("cannot connect to BERTH_TEST_POSTGRES: {e}"));
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap_or_else(|e| panic!("cannot CREATE DATABASE {name}: {e}"));
        let url = with_database(admin_url, &name);
        (PgScratch { admin_url: admin_url.to_string(), name }, url)
    }
}

impl Drop for PgScratch {
    fn drop(&mut self) {
        // Best effort: the test's connections are closed by now; FORCE covers any
        // straggler (PostgreSQL 13+), the plain form older servers.
        if let Ok(mut admin) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let name = &self.name;
            if admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).is_err() {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"));
            }
        }
    }
}

/// `postgres://user@host:port/anything?opts` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..].find('/').map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{db}", &base[..path]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn postgres_url() -> Option<String> {
    std::env::var("BERTH_TEST_POSTGRES").ok().filter(|u| !u.trim().is_empty())
}

/// One test's store, its read connection, and where they live.
struct Harness {
    backend: &'static str,
    store: Box<dyn Apply>,
    reader: Box<dyn Reader + Send>,
    loc: Location,
    // Dropped after the connections above (fields drop in order).
    _dir: Option<tempfile::TempDir>,
    _pg: Option<PgScratch>,
}

impl Harness {
    fn sqlite() -> Harness {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("berth.db");
        // As the coordinator opens it: large output chunks in segment files.
        let segments = Segments::open(&segments::dir_for(&path)).expect("segments");
        let store = Store::new(SqliteDb::open(&path).expect("open sqlite")).expect("sqlite schema").with_segments(segments);
        let loc = Location::Sqlite(path);
        let reader = loc.reader().expect("sqlite reader");
        Harness { backend: "sqlite", store: Box::new(store), reader, loc, _dir: Some(dir), _pg: None }
    }

    fn postgres(admin_url: &str) -> Harness {
        let (scratch, url) = PgScratch::create(admin_url);
        let store = Store::new(PgDb::connect(&url).expect("connect to the test database")).expect("postgres schema");
        let loc = Location::Postgres(url);
        let reader = loc.reader().expect("postgres reader");
        Harness { backend: "postgres", store: Box::new(store), reader, loc, _dir: None, _pg: Some(scratch) }
    }

    /// Another coordinator's store on the same database.
    fn second_store(&self) -> Box<dyn Apply> {
        match &self.loc {
            Location::Sqlite(p) => Box::new(Store::new(SqliteDb::open(p).expect("open")).expect("schema")),
            Location::Postgres(u) => Box::new(Store::new(PgDb::connect(u).expect("connect")).expect("schema")),
        }
    }

    fn call<T>(&mut self, build: impl FnOnce(Tx<T>) -> Op) -> Result<T, StoreError> {
        call_on(self.store.as_mut(), build)
    }

    fn submit_as(&mut self, spec: &JobSpec, owner: &str, key: Uuid) -> Submitted {
        let spec = Box::new(spec.clone());
        let owner = owner.to_string();
        let admission = Admission { account: owner.clone(), ..Admission::default() };
        self.call(|reply| Op::Submit { spec, owner, idempotency_key: key, admission, now: at(0), reply }).expect("submit")
    }

    fn submit(&mut self, spec: &JobSpec) -> JobId {
        self.submit_as(spec, "alice", Uuid::new_v4()).job
    }

    fn claim_with(&mut self, worker: &str, n: u32, caps: &WorkerCaps, now: DateTime<Utc>, ttl: Duration) -> Vec<Assignment> {
        let (worker, caps) = (worker.to_string(), Arc::new(caps.clone()));
        self.call(|reply| Op::Claim { worker, n, caps, free: None, now, ttl, reply }).expect("claim").tasks
    }

    fn claim(&mut self, worker: &str, n: u32, now: DateTime<Utc>) -> Vec<Assignment> {
        self.claim_with(worker, n, &cpu_worker(), now, TTL)
    }

    fn finish(&mut self, worker: &str, lease: LeaseId, outcome: Outcome, now: DateTime<Utc>) -> FinishVerdict {
        let worker = worker.to_string();
        self.call(|reply| Op::Finish { worker, lease, outcome, now, reply }).expect("finish")
    }

    fn heartbeat(&mut self, worker: &str, leases: &[LeaseId], now: DateTime<Utc>) -> Vec<LeaseId> {
        let (worker, leases) = (worker.to_string(), leases.to_vec());
        self.call(|reply| Op::Heartbeat { worker, leases, now, ttl: TTL, reply }).expect("heartbeat")
    }

    fn reconcile(&mut self, worker: &str, held: &[LeaseId], now: DateTime<Utc>) -> Reconciled {
        let (worker, held) = (worker.to_string(), held.to_vec());
        self.call(|reply| Op::Reconcile { worker, pool: "default".into(), held, now, ttl: TTL, reply }).expect("reconcile")
    }

    fn expire(&mut self, now: DateTime<Utc>) -> Vec<Expired> {
        self.call(|reply| Op::ExpireLeases { now, reply }).expect("expire leases")
    }

    fn append(&mut self, worker: &str, chunks: Vec<LogChunk>) -> Vec<ChunkVerdict> {
        let worker = worker.to_string();
        self.call(|reply| Op::AppendLogs { worker, chunks, reply }).expect("append logs")
    }

    fn cancel(&mut self, job: JobId, index: Option<u32>, now: DateTime<Utc>) -> Result<(JobId, u64, Vec<KillOrder>), StoreError> {
        let job = sel(job, index);
        self.call(|reply| Op::Cancel { job, reason: "cancelled by alice".into(), now, reply })
    }

    fn set_drain(&mut self, worker: &str, drained: bool) -> Result<bool, StoreError> {
        let worker = worker.to_string();
        self.call(|reply| Op::SetDrain { worker, drained, reply })
    }

    fn use_token(&mut self, token: &str, worker: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.enrol(token, worker, &format!("fp-{worker}"), None, now)
    }

    /// `use_token` with the certificate's fingerprint and the registry's view of the name.
    fn enrol(&mut self, token: &str, worker: &str, cert_fp: &str, held: Option<&str>, now: DateTime<Utc>) -> Result<(), StoreError> {
        let (token, worker, cert_fp, held) = (token.to_string(), worker.to_string(), cert_fp.to_string(), held.map(String::from));
        self.call(|reply| Op::UseToken { token, worker, cert_fp, held, now, ttl: TTL, reply })
    }

    fn seq(&mut self, job: JobId) -> i64 {
        self.reader.resolve(&sel(job, None), &Scope::All).expect("resolve").0
    }

    fn summary(&mut self, job: JobId) -> JobSummary {
        let seq = self.seq(job);
        self.reader.summary(seq).expect("summary")
    }

    fn status(&mut self, job: JobId, index: Option<u32>) -> JobStatus {
        self.reader.status(&sel(job, index), &Scope::All).expect("status")
    }

    /// How many task rows the database holds (tasks are stored once claimed).
    fn task_rows(&mut self, job: JobId) -> i64 {
        let seq = self.seq(job);
        let mut db = self.loc.connect().expect("connect");
        db.query_one("SELECT COUNT(*) FROM tasks WHERE job_seq = ?1", &[Val::I64(seq)]).expect("count tasks").i64(0).expect("a count")
    }

    fn event_count(&mut self, job: JobId) -> i64 {
        let seq = self.seq(job);
        let mut db = self.loc.connect().expect("connect");
        db.query_one("SELECT COUNT(*) FROM events WHERE job_seq = ?1", &[Val::I64(seq)]).expect("count events").i64(0).expect("a count")
    }
}

fn run_sqlite(test: fn(&mut Harness)) {
    let mut h = Harness::sqlite();
    test(&mut h);
}

fn run_postgres(name: &str, test: fn(&mut Harness)) {
    match postgres_url() {
        Some(url) => {
            let mut h = Harness::postgres(&url);
            test(&mut h);
        }
        None if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "{name}: PostgreSQL is required under CI: set BERTH_TEST_POSTGRES to a server URL whose user may \
             CREATE DATABASE (scripts/test starts a throwaway one)"
        ),
        None => {
            // Straight to stderr, past the test harness's capture, so the skip is seen.
            let _ = writeln!(std::io::stderr(), "store::{name}: PostgreSQL half skipped (BERTH_TEST_POSTGRES is not set); SQLite only");
        }
    }
}

/// Each test, once per backend: `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::run_sqlite(super::$name)
            }
            #[test]
            fn postgres() {
                super::run_postgres(stringify!($name), super::$name)
            }
        }
    )*};
}

on_both_backends!(
    large_output_chunks_read_back_exactly_after_a_restart,
    a_result_without_started_dates_the_start_from_its_runtime,
    submit_is_idempotent_per_owner,
    reads_see_only_the_jobs_in_scope,
    million_task_array_is_one_row,
    claim_leases_distinct_tasks_within_caps_and_drain,
    a_claim_that_looked_at_part_of_a_long_queue_says_there_is_more,
    finish_records_once_and_only_with_the_live_lease,
    heartbeat_renews_leases,
    expiry_requeues_then_fails_and_fences_old_leases,
    restart_gives_running_leases_a_full_ttl,
    reconcile_sorts_out_a_returning_worker,
    output_chunks_in_order_per_attempt,
    cancel_whole_array,
    cancel_one_index,
    cancel_of_an_ended_job_is_refused,
    join_tokens_are_single_use_and_expire,
    a_worker_name_is_enrolled_again_only_once_its_holder_is_gone,
    group_commit_answers_every_operation,
    budget_months_roll_at_midnight_utc_and_settle_exactly,
    freeze_reserves_an_image_and_records_the_task_frozen,
    a_data_dir_an_earlier_berth_made_opens_with_its_work,
);

// ------------------------------------------------------------------ helpers

fn at(secs: i64) -> DateTime<Utc> {
    at_ms(secs * 1000)
}

fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).expect("valid time") + TimeDelta::milliseconds(ms)
}

fn ttl_ms() -> i64 {
    TTL.as_millis() as i64
}

fn sel(job: JobId, index: Option<u32>) -> JobSelector {
    JobSelector { prefix: job.to_string(), index }
}

fn job() -> JobSpec {
    JobSpec::new(Command::Argv(vec!["true".into()]))
}

fn array(start: u32, end: u32) -> JobSpec {
    JobSpec { array: Some(ArrayRange { start, end }), ..job() }
}

fn cpu_worker() -> WorkerCaps {
    WorkerCaps {
        executors: vec!["process".into()],
        cpus: 8,
        mem_mib: 16 * 1024,
        gpus: 0,
        pool: "default".into(),
        pool_free: true,
        labels: Vec::new(),
        gpu_list: Vec::new(),
        secrets: Vec::new(),
    }
}

fn exited(code: i32) -> Outcome {
    Outcome { exit_code: Some(code), signal: None, timed_out: false, killed: false, runtime_ms: 1500, error: None }
}

fn chunk(lease: LeaseId, stream: OutStream, seq: u64, data: &str) -> LogChunk {
    LogChunk { lease, exec: 0, stream, seq, data: std::sync::Arc::new(data.as_bytes().to_vec()) }
}

fn api_error<T: std::fmt::Debug>(r: Result<T, StoreError>) -> ApiError {
    match r {
        Err(StoreError::Api(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn indices(a: &[Assignment]) -> Vec<Option<u32>> {
    a.iter().map(|x| x.index).collect()
}

// ------------------------------------------------------------------ tests

fn reads_see_only_the_jobs_in_scope(h: &mut Harness) {
    let b = h.backend;
    let mine: Vec<JobId> = (0..3).map(|_| h.submit_as(&job(), "alice", Uuid::new_v4()).job).collect();
    let spec = Box::new(job());
    let admission = Admission { account: "carol".into(), needs_approval: true, ..Admission::default() };
    let pending =
        h.call(|reply| Op::Submit { spec, owner: "carol".into(), idempotency_key: Uuid::new_v4(), admission, now: at(0), reply }).expect("submit").job;
    let bobs = h.submit_as(&job(), "bob", Uuid::new_v4()).job;
    let (alice, bob, ann) = (Scope::Own("alice".into()), Scope::Own("bob".into()), Scope::OwnAndPending("ann".into()));
    let ids = |rows: Vec<JobSummary>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();

    // Filtered before the limit: a page holds the caller's newest jobs.
    assert_eq!(ids(h.reader.list(None, 2, &alice).expect("list")), vec![mine[2], mine[1]], "[{b}]");
    assert_eq!(ids(h.reader.list(Some(JobState::Queued), 10, &alice).expect("list")).len(), 3, "[{b}]");
    assert_eq!(ids(h.reader.list(None, 10, &bob).expect("list")), vec![bobs], "[{b}]");
    assert_eq!(ids(h.reader.list(None, 10, &ann).expect("list")), vec![pending], "[{b}] an approver sees what waits for approval");
    assert_eq!(h.reader.list(None, 10, &Scope::All).expect("list").len(), 5, "[{b}]");

    // Someone else's job is not found, with the words a missing one gets.
    let missing = "01900000-0000-7000-8000-000000000000";
    let absent = api_error(h.reader.resolve(&JobSelector { prefix: missing.into(), index: None }, &bob));
    for (job, scope) in [(mine[0], &bob), (pending, &bob), (mine[0], &ann)] {
        let e = api_error(h.reader.status(&sel(job, None), scope));
        assert_eq!((e.kind, e.message.replace(&job.to_string(), missing)), (absent.kind, absent.message.clone()), "[{b}] {job} for {scope:?}");
    }
    assert_eq!(absent.kind, ErrorKind::NotFound);
    assert_eq!(h.reader.status(&sel(pending, None), &ann).expect("status").summary.state, JobState::PendingApproval, "[{b}]");
    // A prefix alice's and bob's ids share names bob's job alone for bob.
    let shared: String = mine[0].to_string().chars().zip(bobs.to_string().chars()).take_while(|(x, y)| x == y).map(|(x, _)| x).collect();
    assert_eq!(h.reader.resolve(&JobSelector { prefix: shared.clone(), index: None }, &bob).expect("resolve").1, bobs, "[{b}] `{shared}`");
    assert_eq!(api_error(h.reader.resolve(&JobSelector { prefix: shared, index: None }, &Scope::All)).kind, ErrorKind::Ambiguous, "[{b}]");
}

fn submit_is_idempotent_per_owner(h: &mut Harness) {
    let key = Uuid::new_v4();
    let first = h.submit_as(&job(), "alice", key);
    assert!(!first.duplicate, "[{}] a first submission is not a duplicate", h.backend);
    assert_eq!(first.tasks, 1);

    let again = h.submit_as(&job(), "alice", key);
    assert_eq!(again.job, first.job, "[{}] the same owner and key give the same job", h.backend);
    assert!(again.duplicate, "[{}] a resent submission is reported as a duplicate", h.backend);

    let other = h.submit_as(&job(), "bob", key);
    assert_ne!(other.job, first.job, "[{}] another owner's key is another job", h.backend);
    assert!(!other.duplicate);

    let third = h.submit_as(&job(), "alice", Uuid::new_v4());
    assert_ne!(third.job, first.job, "[{}] another key is another job", h.backend);

    assert_eq!(h.reader.list(None, 100, &Scope::All).expect("list").len(), 3, "[{}] the duplicate made no job", h.backend);
    let s = h.summary(first.job);
    assert_eq!((s.counts.queued, s.counts.total(), s.state), (1, 1, JobState::Queued), "[{}] counted once", h.backend);
    assert_eq!(s.owner, "alice");
}

fn million_task_array_is_one_row(h: &mut Harness) {
    let spec = array(1, 1_000_000);
    let t = Instant::now();
    let s = h.submit_as(&spec, "alice", Uuid::new_v4());
    let took = t.elapsed();
    assert_eq!(s.tasks, 1_000_000);
    assert!(took < Duration::from_secs(5), "[{}] submitting a 1,000,000-task array took {took:?}", h.backend);

    let sum = h.summary(s.job);
    assert_eq!(sum.tasks, 1_000_000);
    assert_eq!(sum.counts.queued, 1_000_000, "[{}] every task is queued", h.backend);
    assert_eq!(sum.counts.total(), 1_000_000);
    assert_eq!(sum.state, JobState::Queued);
    assert_eq!(h.task_rows(s.job), 0, "[{}] no task is materialised at submit", h.backend);
    let st = h.status(s.job, Some(999_999));
    assert_eq!(st.task.map(|t| (t.state, t.attempt)), Some((JobState::Queued, 1)));

    let got = h.claim("w1", 10, at(1));
    assert_eq!(indices(&got), (1..=10).map(Some).collect::<Vec<_>>(), "[{}] claims start at the array's start", h.backend);
    assert!(got.iter().all(|a| a.job == s.job && a.attempt == 1));
    let sum = h.summary(s.job);
    assert_eq!((sum.counts.queued, sum.counts.running), (999_990, 10));
    assert_eq!(sum.state, JobState::Running);
    assert_eq!(h.task_rows(s.job), 10, "[{}] only claimed tasks get rows", h.backend);
}

fn claim_leases_distinct_tasks_within_caps_and_drain(h: &mut Harness) {
    let gpu_job = h.submit(&JobSpec { priority: 10, resources: Resources { gpus: 1, ..Resources::default() }, ..job() });
    let arr = h.submit(&array(0, 9));

    assert!(h.claim("w1", 0, at(1)).is_empty(), "[{}] n = 0 claims nothing", h.backend);

    // The GPU job comes first by priority, but a worker without GPUs cannot run it.
    let a = h.claim("w1", 3, at(1));
    assert_eq!(a.len(), 3, "[{}] a claim respects n", h.backend);
    assert!(a.iter().all(|x| x.job == arr && x.attempt == 1), "[{}] the GPU job is skipped: {a:?}", h.backend);
    assert_eq!(indices(&a), vec![Some(0), Some(1), Some(2)]);

    let gpu = berth_shared::wire::GpuInfo { index: 0, uuid: "GPU-0".into(), model: "NVIDIA H100".into(), vram_mib: 81559 };
    let gpu_caps = WorkerCaps { gpus: 1, gpu_list: vec![gpu], ..cpu_worker() };
    let g = h.claim_with("g1", 1, &gpu_caps, at(1), TTL);
    assert_eq!(g.len(), 1);
    assert_eq!((g[0].job, g[0].index, g[0].attempt), (gpu_job, None, 1), "[{}] a GPU worker gets the GPU job", h.backend);

    // A drained worker gets nothing until it is undrained.
    assert_eq!(api_error(h.set_drain("nobody", true)).kind, ErrorKind::NotFound);
    h.reconcile("w2", &[], at(1));
    assert!(h.set_drain("w2", true).expect("drain"));
    assert!(h.reader.is_drained("w2").expect("is_drained"));
    assert!(h.claim("w2", 5, at(2)).is_empty(), "[{}] a drained worker claims nothing", h.backend);
    assert!(!h.set_drain("w2", false).expect("undrain"));
    let b = h.claim("w2", 100, at(3));
    assert_eq!(indices(&b), (3..=9).map(Some).collect::<Vec<_>>(), "[{}] claims are bounded by what is left", h.backend);
    assert!(h.claim("w1", 5, at(4)).is_empty(), "[{}] nothing is left to claim", h.backend);

    let leases: HashSet<LeaseId> = a.iter().chain(&g).chain(&b).map(|x| x.lease).collect();
    assert_eq!(leases.len(), 11, "[{}] every claim has its own lease", h.backend);
    let tasks: HashSet<(JobId, Option<u32>)> = a.iter().chain(&g).chain(&b).map(|x| (x.job, x.index)).collect();
    assert_eq!(tasks.len(), 11, "[{}] no task is claimed twice", h.backend);

    let s = h.summary(arr);
    assert_eq!((s.counts.queued, s.counts.running), (0, 10));
    let s = h.summary(gpu_job);
    assert_eq!((s.counts.queued, s.counts.running, s.state), (0, 1, JobState::Running));
}

fn a_claim_that_looked_at_part_of_a_long_queue_says_there_is_more(h: &mut Harness) {
    // Many one-task jobs of one account (64 sessions a harness opens at once, say).
    let jobs: HashSet<JobId> = (0..40).map(|_| h.submit(&job())).collect();
    let claim = |h: &mut Harness, n: u32| {
        let (worker, caps) = ("w1".to_string(), Arc::new(cpu_worker()));
        h.call(|reply| Op::Claim { worker, n, caps, free: None, now: at(1), ttl: TTL, reply }).expect("claim")
    };
    let mut got = HashSet::new();
    let mut claims = 0;
    loop {
        let c = claim(h, 64);
        claims += 1;
        got.extend(c.tasks.iter().map(|a| a.job));
        assert!(c.tasks.len() < 64, "[{}] there are only 40", h.backend);
        if !c.more {
            break;
        }
        assert!(!c.tasks.is_empty(), "[{}] `more` only after a claim that took something", h.backend);
        assert!(claims < 10, "[{}] claims must come to an end", h.backend);
    }
    assert_eq!(got, jobs, "[{}] claiming while the store says `more` takes every queued job", h.backend);
    assert!(claims > 1, "[{}] one claim looks at part of the queue", h.backend);
    let c = claim(h, 64);
    assert!(c.tasks.is_empty() && !c.more, "[{}] nothing is left, and the store says so", h.backend);
}

fn finish_records_once_and_only_with_the_live_lease(h: &mut Harness) {
    let ok = h.submit(&job());
    let bad = h.submit(&job());
    let arr = h.submit(&array(0, 1));
    let got = h.claim("w1", 10, at(1));
    assert_eq!(got.len(), 4);
    let lease = |job: JobId, index: Option<u32>| got.iter().find(|a| a.job == job && a.index == index).map(|a| a.lease).expect("claimed");
    let (l_ok, l_bad, l_a0, l_a1) = (lease(ok, None), lease(bad, None), lease(arr, Some(0)), lease(arr, Some(1)));

    // Stale: an unknown lease, and a live lease sent under another worker's name.
    assert_eq!(h.finish("w1", LeaseId::new(), exited(0), at(2)), FinishVerdict::Stale);
    assert_eq!(h.finish("w2", l_a0, exited(0), at(2)), FinishVerdict::Stale, "[{}] another worker's lease", h.backend);
    let s = h.summary(arr);
    assert_eq!((s.counts.running, s.counts.succeeded), (2, 0), "[{}] a stale finish changes nothing", h.backend);
    assert_eq!(h.status(arr, Some(0)).task.map(|t| t.state), Some(JobState::Running));

    assert_eq!(h.finish("w1", l_ok, exited(0), at(5)), FinishVerdict::Recorded);
    let s = h.summary(ok);
    assert_eq!((s.counts.running, s.counts.succeeded, s.state), (0, 1, JobState::Succeeded), "[{}]", h.backend);
    assert!(s.ended_at.is_some(), "[{}] an ended job has an end time", h.backend);
    let seq = h.seq(ok);
    assert_eq!(h.reader.exit_code(seq).expect("exit code"), Some(0));

    assert_eq!(h.finish("w1", l_bad, exited(3), at(5)), FinishVerdict::Recorded);
    let s = h.summary(bad);
    assert_eq!((s.counts.failed, s.state), (1, JobState::Failed), "[{}]", h.backend);
    let t = h.status(bad, None).task.expect("task");
    assert_eq!((t.state, t.exit_code, t.reason.as_deref()), (JobState::Failed, Some(3), Some("exit code 3")));
    let seq = h.seq(bad);
    assert_eq!(h.reader.exit_code(seq).expect("exit code"), Some(3));

    // The array aggregates: running while a task runs, failed once one failed.
    assert_eq!(h.finish("w1", l_a0, exited(0), at(6)), FinishVerdict::Recorded);
    let s = h.summary(arr);
    assert_eq!((s.counts.running, s.counts.succeeded, s.state), (1, 1, JobState::Running));
    assert!(s.ended_at.is_none());
    assert_eq!(h.finish("w1", l_a1, exited(1), at(7)), FinishVerdict::Recorded);
    let s = h.summary(arr);
    assert_eq!((s.counts.succeeded, s.counts.failed, s.state), (1, 1, JobState::Failed), "[{}]", h.backend);
    let seq = h.seq(arr);
    assert_eq!(h.reader.exit_code(seq).expect("exit code"), Some(1));

    // A result resent for the same lease is not recorded again...
    let events = h.event_count(ok);
    let v = h.finish("w1", l_ok, exited(0), at(8));
    assert_ne!(v, FinishVerdict::Recorded, "[{}] a second finish of one lease is recorded once", h.backend);
    let s = h.summary(ok);
    assert_eq!((s.counts.succeeded, s.counts.total(), s.state), (1, 1, JobState::Succeeded), "[{}]", h.backend);
    assert_eq!(h.event_count(ok), events, "[{}] no second event", h.backend);
    // ...and cannot rewrite the recorded result either (exactly-once results).
    let v = h.finish("w1", l_ok, exited(7), at(9));
    assert_ne!(v, FinishVerdict::Recorded);
    let t = h.status(ok, None).task.expect("task");
    assert_eq!(
        (t.state, t.exit_code),
        (JobState::Succeeded, Some(0)),
        "[{}] STORE BUG: a second Finish of an already finished lease (verdict {v:?}) rewrote the recorded exit code \
         (engine.rs Store::finish treats every terminal state as `cancelled while running`)",
        h.backend
    );
    let seq = h.seq(ok);
    assert_eq!(h.reader.exit_code(seq).expect("exit code"), Some(0), "[{}] `--wait` must still exit 0", h.backend);
}

fn heartbeat_renews_leases(h: &mut Harness) {
    h.submit(&job());
    let l = h.claim("w1", 1, at(0))[0].lease;
    assert!(h.expire(at_ms(ttl_ms() - 1)).is_empty(), "[{}] a lease lives its TTL", h.backend);

    let unknown = LeaseId::new();
    let stale = h.heartbeat("w1", &[l, unknown], at(20));
    assert_eq!(stale, vec![unknown], "[{}] only the unknown lease is stale", h.backend);
    // Another worker cannot renew it.
    assert_eq!(h.heartbeat("w2", &[l], at(25)), vec![l], "[{}] another worker's heartbeat is stale", h.backend);

    assert!(h.expire(at(30)).is_empty(), "[{}] renewed: not expired at the original expiry", h.backend);
    assert!(h.expire(at_ms(20_000 + ttl_ms() - 1)).is_empty(), "[{}] not before renewal + TTL", h.backend);
    let gone = h.expire(at_ms(20_000 + ttl_ms()));
    assert_eq!(gone.len(), 1, "[{}] expires at renewal + TTL (w2's heartbeat did not extend it)", h.backend);
    assert_eq!((gone[0].lease, gone[0].worker.as_str(), gone[0].requeued), (l, "w1", true));
    assert_eq!(h.heartbeat("w1", &[l], at(60)), vec![l], "[{}] an expired lease is stale", h.backend);
}

fn expiry_requeues_then_fails_and_fences_old_leases(h: &mut Harness) {
    let arr = h.submit(&JobSpec { max_attempts: 2, ..array(0, 4) });
    let first = h.claim("w1", 1, at(0));
    assert_eq!((first[0].index, first[0].attempt), (Some(0), 1));
    let l1 = first[0].lease;

    let gone = h.expire(at_ms(ttl_ms()));
    assert_eq!(gone.len(), 1);
    assert_eq!((gone[0].job, gone[0].index, gone[0].lease, gone[0].requeued), (arr, Some(0), l1, true));
    let st = h.status(arr, Some(0));
    let t = st.task.expect("task");
    assert_eq!((t.state, t.attempt), (JobState::Queued, 2), "[{}] re-queued as attempt 2", h.backend);
    let ev = st.events.last().expect("an event");
    assert_eq!((ev.state, ev.attempt), (JobState::Queued, 2));
    assert!(ev.reason.as_deref().is_some_and(|r| r.contains("lease_lost")), "[{}] event reason {:?}", h.backend, ev.reason);
    let s = h.summary(arr);
    assert_eq!((s.counts.queued, s.counts.running), (5, 0));

    // Fencing: the expired attempt's result is refused.
    assert_eq!(h.finish("w1", l1, exited(0), at(31)), FinishVerdict::Stale, "[{}] fenced", h.backend);
    let s = h.summary(arr);
    assert_eq!((s.counts.queued, s.counts.succeeded), (5, 0), "[{}] a fenced finish changes nothing", h.backend);

    // The re-queued task goes before fresh indices.
    let second = h.claim("w2", 2, at(40));
    assert_eq!(
        second.iter().map(|a| (a.index, a.attempt)).collect::<Vec<_>>(),
        vec![(Some(0), 2), (Some(1), 1)],
        "[{}] the re-queued task is claimed first",
        h.backend
    );
    let l2 = second[0].lease;

    // Attempt 2 of 2 lost: the task fails for good; index 1 is re-queued.
    let gone = h.expire(at_ms(40_000 + ttl_ms()));
    let by_index: HashMap<Option<u32>, bool> = gone.iter().map(|e| (e.index, e.requeued)).collect();
    assert_eq!(by_index, HashMap::from([(Some(0), false), (Some(1), true)]), "[{}]", h.backend);
    let t = h.status(arr, Some(0)).task.expect("task");
    assert_eq!(t.state, JobState::Failed, "[{}] out of attempts", h.backend);
    assert!(t.reason.as_deref().is_some_and(|r| r.contains("out of attempts")), "[{}] reason {:?}", h.backend, t.reason);
    let s = h.summary(arr);
    assert_eq!((s.counts.failed, s.counts.queued, s.counts.running, s.counts.total()), (1, 4, 0, 5), "[{}]", h.backend);

    let events = h.event_count(arr);
    assert_eq!(h.finish("w2", l2, exited(0), at(80)), FinishVerdict::Stale, "[{}] fenced after failing", h.backend);
    assert_eq!(h.finish("w1", l1, exited(0), at(80)), FinishVerdict::Stale);
    let s = h.summary(arr);
    assert_eq!((s.counts.failed, s.counts.succeeded), (1, 0));
    assert_eq!(h.event_count(arr), events, "[{}] stale finishes leave no event", h.backend);
    assert!(h.expire(at(10_000)).is_empty(), "[{}] nothing runs any more", h.backend);
}

fn restart_gives_running_leases_a_full_ttl(h: &mut Harness) {
    h.submit(&array(0, 2));
    let short = h.claim("w1", 2, at(0));
    let long = h.claim_with("w1", 1, &cpu_worker(), at(0), Duration::from_secs(7200));
    let (a, b, c) = (short[0].lease, short[1].lease, long[0].lease);

    // The coordinator was down for an hour: a and b expired meanwhile, c did not.
    let up = 3_600_000;
    let n = h.call(|reply| Op::RestartLeases { now: at_ms(up), ttl: TTL, reply }).expect("restart leases");
    assert_eq!(n, 2, "[{}] the two leases that ran out get a new TTL; the long one keeps its own", h.backend);

    let grace = berth_coordinator::lease::RECONNECT_ALLOWANCE.as_millis() as i64;
    assert!(h.expire(at_ms(up + ttl_ms() + grace - 1)).is_empty(), "[{}] no lease expires before restart + TTL + reconnect allowance", h.backend);
    assert_eq!(h.finish("w1", a, exited(0), at_ms(up + 10_000)), FinishVerdict::Recorded, "[{}] a survived", h.backend);
    let gone = h.expire(at_ms(up + ttl_ms() + grace));
    assert_eq!(gone.iter().map(|e| e.lease).collect::<Vec<_>>(), vec![b], "[{}] b expires at restart + TTL + allowance", h.backend);
    assert!(h.expire(at_ms(7_200_000 - 1)).is_empty());
    assert_eq!(h.expire(at_ms(7_200_000)).iter().map(|e| e.lease).collect::<Vec<_>>(), vec![c]);
}

fn reconcile_sorts_out_a_returning_worker(h: &mut Harness) {
    let arr = h.submit(&array(0, 4));
    let mine = h.claim("w1", 3, at(0));
    let theirs = h.claim("w2", 1, at(0));
    let (l1, l2, l3, other) = (mine[0].lease, mine[1].lease, mine[2].lease, theirs[0].lease);
    let unknown = LeaseId::new();

    let r = h.reconcile("w1", &[l1, l2, unknown, other], at(20));
    let stale: BTreeSet<LeaseId> = r.stale.iter().copied().collect();
    assert_eq!(stale, BTreeSet::from([unknown, other]), "[{}] leases w1 reports but does not hold", h.backend);
    assert_eq!(r.lost, 1, "[{}] the attempt w1 came back without", h.backend);

    let s = h.summary(arr);
    assert_eq!((s.counts.running, s.counts.queued), (3, 2), "[{}]", h.backend);
    let st = h.status(arr, mine[2].index);
    let t = st.task.expect("task");
    assert_eq!((t.state, t.attempt), (JobState::Queued, 2), "[{}] the lost task is re-queued", h.backend);
    let ev = st.events.last().expect("event");
    assert!(ev.reason.as_deref().is_some_and(|r| r.contains("lease_lost")), "[{}] reason {:?}", h.backend, ev.reason);
    assert_eq!(h.finish("w1", l3, exited(0), at(21)), FinishVerdict::Stale);

    // Held leases were renewed; w2's was left alone.
    assert!(h.heartbeat("w2", &[other], at(21)).is_empty(), "[{}] w2's lease is still valid", h.backend);
    let gone = h.expire(at_ms(20_000 + ttl_ms() - 1));
    assert!(gone.is_empty(), "[{}] nothing expires before the renewals run out: {gone:?}", h.backend);
    let gone: BTreeSet<LeaseId> = h.expire(at_ms(21_000 + ttl_ms())).iter().map(|e| e.lease).collect();
    assert_eq!(gone, BTreeSet::from([l1, l2, other]));
    assert!(h.reader.workers().expect("workers").iter().any(|(w, _)| w == "w1"), "[{}] the worker is registered", h.backend);
}

fn output_chunks_in_order_per_attempt(h: &mut Harness) {
    let j = h.submit(&job());
    let l = h.claim("w1", 1, at(0))[0].lease;
    use ChunkVerdict::*;
    use OutStream::{Stderr, Stdout};

    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 1, "one\n"), chunk(l, Stdout, 2, "two\n")]), vec![Stored, Stored]);
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 2, "two\n")]), vec![Duplicate], "[{}] a resent chunk", h.backend);
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 4, "four\n")]), vec![OutOfOrder { expected: 3 }], "[{}] a gap", h.backend);
    assert_eq!(
        h.append("w1", vec![chunk(l, Stdout, 3, "three\n"), chunk(l, Stderr, 1, "err\n"), chunk(l, Stdout, 3, "three\n")]),
        vec![Stored, Stored, Duplicate],
        "[{}] streams are sequenced apart",
        h.backend
    );
    assert_eq!(h.append("w1", vec![chunk(LeaseId::new(), Stdout, 1, "x")]), vec![StaleLease], "[{}] unknown lease", h.backend);
    assert_eq!(h.append("w2", vec![chunk(l, Stdout, 4, "x")]), vec![StaleLease], "[{}] another worker", h.backend);

    let seq = h.seq(j);
    let want: Vec<(OutStream, u64, Vec<u8>)> =
        vec![(Stdout, 1, b"one\n".to_vec()), (Stdout, 2, b"two\n".to_vec()), (Stdout, 3, b"three\n".to_vec()), (Stderr, 1, b"err\n".to_vec())];
    let r = h.reader.logs(seq, None, None, (0, 0)).expect("logs");
    assert_eq!((r.attempt, r.ended), (1, false));
    assert_eq!(r.chunks, want, "[{}] stored bytes, in order", h.backend);
    let r = h.reader.logs(seq, None, None, (2, 0)).expect("logs");
    assert_eq!(r.chunks, want[2..].to_vec(), "[{}] after per-stream positions", h.backend);

    // The attempt's lease expires: its late output is refused; attempt 2 starts at 1.
    assert_eq!(h.expire(at_ms(ttl_ms())).len(), 1);
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 4, "late\n")]), vec![StaleLease], "[{}] stale lease", h.backend);
    let l2 = h.claim("w2", 1, at(31))[0].lease;
    assert_eq!(h.append("w2", vec![chunk(l2, Stdout, 1, "again\n")]), vec![Stored]);
    let r = h.reader.logs(seq, None, Some(1), (0, 0)).expect("logs");
    assert_eq!((r.attempt, r.ended), (1, true), "[{}] attempt 1 has ended", h.backend);
    assert_eq!(r.chunks, want, "[{}] attempt 1's output is kept", h.backend);
    let r = h.reader.logs(seq, None, None, (0, 0)).expect("logs");
    assert_eq!((r.attempt, r.chunks), (2, vec![(Stdout, 1, b"again\n".to_vec())]));
    // An attempt it never had is not found, naming those it had.
    for a in [0, 3] {
        match h.reader.logs(seq, None, Some(a), (0, 0)) {
            Err(StoreError::Api(e)) => assert!(e.kind == ErrorKind::NotFound && e.message.contains("attempts 1 to 2"), "[{}] {e:?}", h.backend),
            other => panic!("[{}] attempt {a}: {other:?}", h.backend),
        }
    }
}

fn large_output_chunks_read_back_exactly_after_a_restart(h: &mut Harness) {
    let j = h.submit(&job());
    let l = h.claim("w1", 1, at(0))[0].lease;
    // Random bytes, so a misplaced offset cannot read back equal.
    let big = |n: usize, seed: u64| -> Vec<u8> { (0..n as u64).map(|i| (i.wrapping_mul(0x9E37_79B9).wrapping_add(seed) >> 7) as u8).collect() };
    let (a, b, c) = (big(256 * 1024, 1), big(40_000, 2), big(300 * 1024, 3));
    let mk = |seq, stream, data: &Vec<u8>| LogChunk { lease: l, exec: 0, stream, seq, data: Arc::new(data.clone()) };
    use ChunkVerdict::Stored;
    assert_eq!(
        h.append("w1", vec![mk(1, OutStream::Stdout, &a), mk(2, OutStream::Stdout, &chunk_text("small\n")), mk(1, OutStream::Stderr, &b)]),
        vec![Stored, Stored, Stored]
    );
    let seq = h.seq(j);
    let want = vec![(OutStream::Stdout, 1, a.clone()), (OutStream::Stdout, 2, b"small\n".to_vec()), (OutStream::Stderr, 1, b.clone())];
    assert_eq!(h.reader.logs(seq, None, None, (0, 0)).expect("logs").chunks, want, "[{}] large and small chunks read back exactly", h.backend);
    if let Location::Sqlite(p) = &h.loc {
        let dir = segments::dir_for(p);
        let bytes: u64 = std::fs::read_dir(&dir).expect("segment dir").map(|e| e.expect("entry").metadata().expect("metadata").len()).sum();
        assert_eq!(bytes, (a.len() + b.len()) as u64, "the large chunks, and only they, are in segment files");
        // A restarted coordinator reads what the last one stored and appends after it.
        let segs = Segments::open(&dir).expect("segments again");
        h.store = Box::new(Store::new(SqliteDb::open(p).expect("open")).expect("schema").with_segments(segs));
        h.reader = h.loc.reader().expect("reader");
    }
    assert_eq!(h.append("w1", vec![mk(3, OutStream::Stdout, &c)]), vec![Stored]);
    let mut want = want;
    want.insert(2, (OutStream::Stdout, 3, c));
    let got = h.reader.logs(seq, None, None, (0, 0)).expect("logs").chunks;
    assert_eq!(got.len(), want.len());
    let by_key =
        |v: &Vec<(OutStream, u64, Vec<u8>)>| v.iter().map(|(s, q, d)| ((*s == OutStream::Stderr, *q), d.clone())).collect::<std::collections::BTreeMap<_, _>>();
    assert_eq!(by_key(&got), by_key(&want), "[{}] everything reads back after the restart", h.backend);
}

/// A worker says `Started` only for attempts still running after a moment; a short
/// attempt's start is its result's time less its runtime (never before the claim).
fn a_result_without_started_dates_the_start_from_its_runtime(h: &mut Harness) {
    let short = h.submit(&job());
    let l = h.claim("w1", 1, at(10))[0].lease;
    assert_eq!(h.finish("w1", l, exited(0), at(20)), FinishVerdict::Recorded);
    let t = h.status(short, None).task.expect("the task");
    assert_eq!(t.started_at, Some(at(20) - TimeDelta::milliseconds(1500)), "[{}] ended less runtime", h.backend);

    let told = h.submit(&job());
    let l = h.claim("w1", 1, at(30))[0].lease;
    for reply in h.store.apply(vec![Op::Started { worker: "w1".into(), lease: l, now: at(31) }]).replies {
        reply();
    }
    assert_eq!(h.finish("w1", l, exited(0), at(40)), FinishVerdict::Recorded);
    let t = h.status(told, None).task.expect("the task");
    assert_eq!(t.started_at, Some(at(40) - TimeDelta::milliseconds(1500)), "[{}] the later of the two", h.backend);

    let clock_skew = h.submit(&job());
    let l = h.claim("w1", 1, at(50))[0].lease;
    assert_eq!(h.finish("w1", l, exited(0), at(50)), FinishVerdict::Recorded);
    let t = h.status(clock_skew, None).task.expect("the task");
    assert_eq!(t.started_at, Some(at(50)), "[{}] never before the claim", h.backend);
}

fn chunk_text(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn cancel_whole_array(h: &mut Harness) {
    let arr = h.submit(&array(0, 9));
    let got = h.claim("w1", 3, at(1));
    assert_eq!(h.finish("w1", got[0].lease, exited(0), at(2)), FinishVerdict::Recorded);

    let (job, n, kills) = h.cancel(arr, None, at(3)).expect("cancel");
    assert_eq!(job, arr);
    assert_eq!(n, 9, "[{}] 2 running + 7 never claimed", h.backend);
    let killed: BTreeSet<(String, LeaseId)> = kills.into_iter().map(|k| (k.worker, k.lease)).collect();
    let running: BTreeSet<(String, LeaseId)> = got[1..].iter().map(|a| ("w1".to_string(), a.lease)).collect();
    assert_eq!(killed, running, "[{}] the running attempts are to be killed", h.backend);

    let s = h.summary(arr);
    assert_eq!(
        (s.counts.succeeded, s.counts.cancelled, s.counts.queued, s.counts.running, s.counts.total()),
        (1, 9, 0, 0, 10),
        "[{}] counts add up",
        h.backend
    );
    assert_eq!(s.state, JobState::Cancelled);
    assert!(s.ended_at.is_some());
    assert_eq!(h.task_rows(arr), 3, "[{}] unclaimed tasks are cancelled by the cursor, not row by row", h.backend);
    assert!(h.claim("w1", 10, at(4)).is_empty(), "[{}] nothing left to claim", h.backend);

    // The killed attempt reports back: runtime kept, state stays cancelled.
    assert_eq!(h.finish("w1", got[1].lease, exited(137), at(5)), FinishVerdict::AfterCancel);
    let s = h.summary(arr);
    assert_eq!((s.counts.cancelled, s.counts.failed, s.state), (9, 0, JobState::Cancelled));

    assert_eq!(api_error(h.cancel(arr, None, at(6))).kind, ErrorKind::Invalid, "[{}] already ended", h.backend);
}

fn cancel_one_index(h: &mut Harness) {
    // An index cancelled before it ran is never claimed.
    let other = h.submit(&array(0, 4));
    h.cancel(other, Some(1), at(1)).expect("cancel other:1");
    let more = h.claim("w2", 10, at(1));
    assert!(more.iter().all(|a| a.job == other));
    assert_eq!(indices(&more), vec![Some(0), Some(2), Some(3), Some(4)], "[{}] index 1 is skipped", h.backend);
    let s = h.summary(other);
    assert_eq!((s.counts.running, s.counts.cancelled, s.counts.queued, s.counts.total()), (4, 1, 0, 5), "[{}]", h.backend);

    let arr = h.submit(&array(0, 9));
    let got = h.claim("w1", 2, at(1));

    // A running task: one kill order.
    let (_, n, kills) = h.cancel(arr, Some(1), at(2)).expect("cancel :1");
    assert_eq!(n, 1);
    assert_eq!(kills.iter().map(|k| k.lease).collect::<Vec<_>>(), vec![got[1].lease], "[{}]", h.backend);
    // An unclaimed one: no kill order.
    let (_, n, kills) = h.cancel(arr, Some(3), at(2)).expect("cancel :3");
    assert_eq!((n, kills.len()), (1, 0), "[{}] an unclaimed task is cancelled in place", h.backend);
    assert_eq!(api_error(h.cancel(arr, Some(3), at(2))).kind, ErrorKind::Invalid, "[{}] cancelled twice", h.backend);
    assert_eq!(api_error(h.cancel(arr, Some(99), at(2))).kind, ErrorKind::NotFound, "[{}] no such index", h.backend);
    assert_eq!(h.status(arr, Some(3)).task.map(|t| t.state), Some(JobState::Cancelled));
    assert_eq!(h.status(arr, Some(1)).task.map(|t| t.state), Some(JobState::Cancelled));
    let s = h.summary(arr);
    assert_eq!((s.counts.running, s.counts.cancelled, s.counts.queued, s.counts.total(), s.state), (1, 2, 7, 10, JobState::Running), "[{}]", h.backend);

    // Then the whole first array, while index 3 (cancelled on its own) is still behind
    // the cursor: 1 running (index 0) + 7 never claimed (2, 4..=9) are cancelled.
    let (_, n, kills) = h.cancel(arr, None, at(4)).expect("cancel all");
    assert_eq!(kills.iter().map(|k| k.lease).collect::<Vec<_>>(), vec![got[0].lease], "[{}]", h.backend);
    let s = h.summary(arr);
    assert_eq!(
        (n, s.counts.cancelled, s.counts.queued, s.counts.running, s.counts.total()),
        (8, 10, 0, 0, 10),
        "[{}] STORE BUG: cancelling a whole array after one of its unclaimed indices was cancelled on its own \
         counts that index twice (engine.rs Store::cancel: the cursor part moves `end - next + 1` tasks \
         queued -> cancelled, including indices that already have a cancelled row): (n, cancelled, queued, \
         running, total) should be (8, 10, 0, 0, 10)",
        h.backend
    );
    assert_eq!(s.state, JobState::Cancelled);
}

fn cancel_of_an_ended_job_is_refused(h: &mut Harness) {
    let j = h.submit(&job());
    let l = h.claim("w1", 1, at(1))[0].lease;
    assert_eq!(h.finish("w1", l, exited(0), at(2)), FinishVerdict::Recorded);
    let e = api_error(h.cancel(j, None, at(3)));
    assert_eq!(e.kind, ErrorKind::Invalid, "[{}] {e:?}", h.backend);
    assert!(e.message.contains("already ended"), "[{}] {}", h.backend, e.message);
    assert_eq!(h.summary(j).state, JobState::Succeeded);

    // A queued single job is cancelled without a kill order.
    let q = h.submit(&job());
    let (_, n, kills) = h.cancel(q, None, at(4)).expect("cancel");
    assert_eq!((n, kills.len()), (1, 0));
    let s = h.summary(q);
    assert_eq!((s.counts.cancelled, s.counts.queued, s.state), (1, 0, JobState::Cancelled));
    assert!(h.claim("w1", 1, at(5)).is_empty());
    assert_eq!(api_error(h.cancel(q, None, at(6))).kind, ErrorKind::Invalid);
    assert_eq!(api_error(h.cancel(JobId::new(), None, at(6))).kind, ErrorKind::NotFound);
}

fn join_tokens_are_single_use_and_expire(h: &mut Harness) {
    let mut db: Box<dyn Db> = h.loc.connect().expect("connect");
    let ten_min = Duration::from_secs(600);
    let token = create_token(db.as_mut(), "worker", ten_min, at(0)).expect("token");
    let expiring = create_token(db.as_mut(), "worker", Duration::from_secs(60), at(0)).expect("token");
    let admin = create_token(db.as_mut(), "admin", ten_min, at(0)).expect("token");
    drop(db);

    h.use_token(&token, "w1", at(1)).expect("a fresh token enrols a worker");
    let e = api_error(h.use_token(&token, "w2", at(2)));
    assert_eq!(e.kind, ErrorKind::Refused, "[{}] used once only", h.backend);
    assert!(e.message.contains("already been used"), "[{}] {}", h.backend, e.message);

    let e = api_error(h.use_token(&expiring, "w3", at(60)));
    assert_eq!(e.kind, ErrorKind::Refused, "[{}] expired", h.backend);
    assert!(e.message.contains("expired"), "[{}] {}", h.backend, e.message);
    assert_eq!(api_error(h.use_token(&admin, "w4", at(1))).kind, ErrorKind::Refused, "[{}] wrong role", h.backend);
    assert_eq!(api_error(h.use_token("bjt_nonsense", "w5", at(1))).kind, ErrorKind::Refused);

    let workers: Vec<String> = h.reader.workers().expect("workers").into_iter().map(|(w, _)| w).collect();
    assert_eq!(workers, vec!["w1".to_string()], "[{}] only the enrolled worker is registered", h.backend);
    assert!(h.set_drain("w1", true).expect("drain an enrolled worker"));
}

/// A database as the berth before `workers.cert_fp` and `JobSpec::max_output` left it:
/// the coordinator opens it, adds what is missing, and every job in it still runs.
fn a_data_dir_an_earlier_berth_made_opens_with_its_work(h: &mut Harness) {
    let mut spec = array(0, 1);
    spec.max_output = None;
    let key = Uuid::new_v4();
    let old = h.submit_as(&spec, "alice", key);
    let mut db: Box<dyn Db> = h.loc.connect().expect("connect");
    let token = create_token(db.as_mut(), "worker", Duration::from_secs(3600), at(0)).expect("token");
    db.batch("ALTER TABLE workers DROP COLUMN cert_fp").expect("drop the column an earlier berth did not have");
    let mut body = berth_shared::codec::encode(&spec).expect("encode")[4..].to_vec();
    // As written before `max_output` and `session`, the last two fields (None each).
    assert_eq!(body.split_off(body.len() - 2), [0, 0]);
    db.exec("UPDATE jobs SET spec = ?1", &[Val::Blob(body)]).expect("store the spec as it was written");
    drop(db);

    // The upgrade happens when a store opens; a second start finds nothing to do.
    let _ = h.second_store();
    let mut store = h.second_store();
    let st = h.reader.status(&sel(old.job, None), &Scope::All).expect("the old job's status reads");
    assert_eq!(st.summary.counts.queued, 2, "[{}] {st:?}", h.backend);
    let again = call_on(store.as_mut(), |reply| Op::Submit {
        spec: Box::new(spec.clone()),
        owner: "alice".into(),
        idempotency_key: key,
        admission: Admission { account: "alice".into(), ..Admission::default() },
        now: at(1),
        reply,
    })
    .expect("resubmit");
    assert!(again.duplicate && again.job == old.job, "[{}] the old spec matches its resubmission", h.backend);
    let caps = Arc::new(cpu_worker());
    let claimed = call_on(store.as_mut(), |reply| Op::Claim { worker: "w1".into(), n: 2, caps, free: None, now: at(2), ttl: TTL, reply }).expect("claim").tasks;
    assert_eq!(claimed.len(), 2, "[{}] the old job's tasks are claimed", h.backend);
    assert_eq!(claimed[0].spec.max_output, None, "[{}] an old spec has no cap of its own", h.backend);
    call_on(store.as_mut(), |reply| Op::UseToken { token, worker: "w9".into(), cert_fp: "fp-9".into(), held: None, now: at(3), ttl: TTL, reply })
        .expect("enrolment records the certificate in the column added");
    assert_eq!(h.reader.worker_cert("w9").expect("read"), Some("fp-9".into()));
}

fn a_worker_name_is_enrolled_again_only_once_its_holder_is_gone(h: &mut Harness) {
    let mut db: Box<dyn Db> = h.loc.connect().expect("connect");
    let tokens: Vec<String> = (0..5).map(|_| create_token(db.as_mut(), "worker", Duration::from_secs(3600), at(0)).expect("token")).collect();
    drop(db);
    let in_use = |e: ApiError| {
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(e.message.contains("worker name w1 is in use by another worker") && e.message.contains("--name"), "{}", e.message);
        e.message
    };
    h.enrol(&tokens[0], "w1", "fp-a", None, at(1)).expect("first enrolment");
    assert_eq!(h.reader.worker_cert("w1").expect("read"), Some("fp-a".into()));
    // Within a TTL of its enrolment the name is taken (its worker may be on its way).
    let m = in_use(api_error(h.enrol(&tokens[1], "w1", "fp-b", None, at(10))));
    assert!(m.contains("enrolled 9 s ago"), "[{}] {m}", h.backend);
    // The registry saw it connected: taken, whatever the store knows.
    let m = in_use(api_error(h.enrol(&tokens[1], "w1", "fp-b", Some("connected from 10.0.0.1:5000"), at(100))));
    assert!(m.contains("connected from 10.0.0.1:5000"), "[{}] {m}", h.backend);
    // A running lease it holds keeps it taken (across a coordinator restart too).
    h.submit(&job());
    assert_eq!(h.claim("w1", 1, at(100)).len(), 1);
    let m = in_use(api_error(h.enrol(&tokens[1], "w1", "fp-b", None, at(110))));
    assert!(m.contains("1 running lease"), "[{}] {m}", h.backend);
    // Its lease ran out and it was not seen: the name is free again, for the new certificate only.
    h.enrol(&tokens[1], "w1", "fp-b", None, at(200)).expect("the holder is gone");
    assert_eq!(h.reader.worker_cert("w1").expect("read"), Some("fp-b".into()), "[{}] only the new certificate is w1's", h.backend);
    // A refusal kept its token: it enrols another name.
    let _ = in_use(api_error(h.enrol(&tokens[2], "w1", "fp-c", None, at(201))));
    h.enrol(&tokens[2], "w2", "fp-c", None, at(202)).expect("the refused token still enrols");
}

fn group_commit_answers_every_operation(h: &mut Harness) {
    let mut ops = Vec::new();
    let mut answers = Vec::new();
    for i in 0..500 {
        let (tx, rx) = oneshot::channel();
        let spec = JobSpec { name: Some(format!("job-{i}")), ..job() };
        ops.push(Op::Submit {
            spec: Box::new(spec),
            owner: "alice".into(),
            idempotency_key: Uuid::new_v4(),
            admission: Admission { account: "alice".into(), ..Admission::default() },
            now: at(0),
            reply: Some(tx),
        });
        answers.push(rx);
    }
    let out = h.store.apply(ops);
    assert_eq!(out.replies.len(), 500, "[{}] one reply per operation", h.backend);
    for reply in out.replies {
        reply();
    }
    let mut ids = HashSet::new();
    for rx in answers {
        let s = rx.blocking_recv().expect("a reply arrived").expect("submitted");
        assert!(!s.duplicate);
        ids.insert(s.job);
    }
    assert_eq!(ids.len(), 500, "[{}] 500 distinct jobs", h.backend);
    let listed = h.reader.list(None, 1000, &Scope::All).expect("list");
    assert_eq!(listed.len(), 500, "[{}] all committed", h.backend);
    assert_eq!(listed.iter().map(|s| s.counts.queued).sum::<u64>(), 500);

    // One failing operation does not undo the others in its batch.
    let mut ops = Vec::new();
    let mut answers = Vec::new();
    for spec in [job(), JobSpec::new(Command::Argv(Vec::new())), job()] {
        let (tx, rx) = oneshot::channel();
        ops.push(Op::Submit {
            spec: Box::new(spec),
            owner: "alice".into(),
            idempotency_key: Uuid::new_v4(),
            admission: Admission { account: "alice".into(), ..Admission::default() },
            now: at(1),
            reply: Some(tx),
        });
        answers.push(rx);
    }
    for reply in h.store.apply(ops).replies {
        reply();
    }
    let r: Vec<Result<Submitted, StoreError>> = answers.into_iter().map(|rx| rx.blocking_recv().expect("reply")).collect();
    assert!(r[0].is_ok() && r[2].is_ok(), "[{}] {r:?}", h.backend);
    assert!(matches!(&r[1], Err(StoreError::Api(e)) if e.kind == ErrorKind::Invalid), "[{}] {:?}", h.backend, r[1]);
    assert_eq!(h.reader.list(None, 1000, &Scope::All).expect("list").len(), 502, "[{}]", h.backend);
}

// ------------------------------------------------------------------ PostgreSQL only

/// Two coordinators on one PostgreSQL database claim and finish concurrently: every
/// task is claimed exactly once, every result recorded, and the counts on the job rows
/// are exact (no lost increments).
#[test]
fn two_coordinators_claim_each_task_exactly_once_postgres() {
    run_postgres("two_coordinators_claim_each_task_exactly_once_postgres", two_coordinators);
}

fn two_coordinators(h: &mut Harness) {
    let arr = h.submit(&array(0, 1999));
    let singles: Vec<JobId> = (0..200).map(|_| h.submit(&job())).collect();
    let mut other = h.second_store();

    fn work(store: &mut dyn Apply, worker: &str) -> Vec<(JobId, Option<u32>)> {
        let caps = Arc::new(cpu_worker());
        let mut claimed = Vec::new();
        let mut held: Vec<LeaseId> = Vec::new();
        let mut t = 0;
        loop {
            t += 1;
            let now = at(t);
            // The previous claim's results and the next claim, in one batch.
            let mut ops = Vec::new();
            let mut verdicts = Vec::new();
            for lease in held.drain(..) {
                let (tx, rx) = oneshot::channel();
                ops.push(Op::Finish { worker: worker.into(), lease, outcome: exited(0), now, reply: Some(tx) });
                verdicts.push(rx);
            }
            let (tx, next) = oneshot::channel();
            ops.push(Op::Claim { worker: worker.into(), n: 16, caps: caps.clone(), free: None, now, ttl: TTL, reply: Some(tx) });
            for reply in store.apply(ops).replies {
                reply();
            }
            for rx in verdicts {
                let v = rx.blocking_recv().expect("reply").expect("finish");
                assert_eq!(v, FinishVerdict::Recorded, "{worker}: a claimed task's result is recorded");
            }
            let got = next.blocking_recv().expect("reply").expect("claim").tasks;
            if got.is_empty() {
                return claimed;
            }
            for a in got {
                assert_eq!(a.attempt, 1);
                claimed.push((a.job, a.index));
                held.push(a.lease);
            }
        }
    }

    let (a, b) = std::thread::scope(|s| {
        let mine = h.store.as_mut();
        let theirs = other.as_mut();
        let ta = s.spawn(move || work(mine, "w-a"));
        let tb = s.spawn(move || work(theirs, "w-b"));
        (ta.join().expect("coordinator a"), tb.join().expect("coordinator b"))
    });
    assert!(!a.is_empty() && !b.is_empty(), "both coordinators claimed work (a {}, b {})", a.len(), b.len());
    let mut seen = HashSet::new();
    for t in a.iter().chain(&b) {
        assert!(seen.insert(*t), "task {t:?} was claimed twice");
    }
    assert_eq!(seen.len(), 2200, "every task claimed (a {}, b {})", a.len(), b.len());
    assert!(call_on(other.as_mut(), |reply| Op::Claim {
        worker: "w-c".into(),
        n: 10,
        caps: Arc::new(cpu_worker()),
        free: None,
        now: at(100_000),
        ttl: TTL,
        reply
    })
    .expect("claim")
    .tasks
    .is_empty());

    let s = h.summary(arr);
    assert_eq!(
        (s.counts.succeeded, s.counts.queued, s.counts.running, s.counts.total(), s.state),
        (2000, 0, 0, 2000, JobState::Succeeded),
        "the array's counts are exact"
    );
    for j in singles {
        let s = h.summary(j);
        assert_eq!((s.counts.succeeded, s.counts.total(), s.state), (1, 1, JobState::Succeeded));
    }
}

// ------------------------------------------------------------------ budget

fn paid(h: &mut Harness, account: &str, estimate: &str, now: DateTime<Utc>) -> Result<Submitted, StoreError> {
    let estimate = estimate.parse().expect("decimal");
    // One attempt of one task: the run's bound is the attempt's.
    let admission = Admission { account: account.into(), attempt_estimate: estimate, run_estimate: estimate, needs_approval: false };
    let spec = Box::new(JobSpec { max_attempts: 1, ..job() });
    h.call(|reply| Op::Submit { spec, owner: account.into(), idempotency_key: Uuid::new_v4(), admission, now, reply })
}

fn set_budget(store: &mut dyn Apply, account: &str, run: &str, month: &str) {
    call_on(store, |reply| Op::SetBudget {
        account: account.into(),
        run: run.parse().expect("decimal"),
        month: month.parse().expect("decimal"),
        by: "root".into(),
        now: at(0),
        reply,
    })
    .expect("set budget");
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
}

fn budget_months_roll_at_midnight_utc_and_settle_exactly(h: &mut Harness) {
    set_budget(h.store.as_mut(), "acme", "1", "1");
    // November fills up one second before midnight...
    let late_nov = utc("2026-11-30T23:59:59Z");
    for _ in 0..4 {
        paid(h, "acme", "0.25", late_nov).expect("fits November");
    }
    let e = api_error(paid(h, "acme", "0.0001", late_nov));
    assert_eq!(e.kind, ErrorKind::Refused, "[{}] {}", h.backend, e.message);
    assert!(e.message.contains("month window 2026-11"), "{}", e.message);
    // ...and December starts empty at 00:00 UTC on the first.
    let dec = utc("2026-12-01T00:00:00Z");
    let j = paid(h, "acme", "0.5", dec).expect("fits December").job;
    let rows = h.reader.budgets(Some("acme"), "2026-12").expect("budgets");
    assert_eq!((rows[0].reserved.to_string(), rows[0].spent.to_string()), ("0.5".into(), "0".into()), "[{}]", h.backend);
    let rows = h.reader.budgets(Some("acme"), "2026-11").expect("budgets");
    assert_eq!(rows[0].reserved.to_string(), "1", "[{}]", h.backend);
    // A run over the per-run cap is refused whatever the month holds.
    let e = api_error(paid(h, "acme", "1.000001", dec));
    assert!(e.message.contains("run window"), "{}", e.message);
    // Cancelling a queued job releases its whole reservation.
    h.cancel(j, None, dec).expect("cancel");
    let rows = h.reader.budgets(Some("acme"), "2026-12").expect("budgets");
    assert_eq!(rows[0].reserved.to_string(), "0", "[{}]", h.backend);
}

#[test]
fn the_cap_holds_across_two_coordinators_postgres() {
    run_postgres("the_cap_holds_across_two_coordinators_postgres", cap_across_coordinators);
}

fn cap_across_coordinators(h: &mut Harness) {
    // $3.70 a month, $0.10 a job: 37 fit, whichever coordinator admits them.
    set_budget(h.store.as_mut(), "acme", "1", "3.7");
    let mut stores = [h.second_store(), h.second_store()];
    let admitted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = stores
            .iter_mut()
            .map(|store| {
                s.spawn(move || {
                    let mut n = 0;
                    for _ in 0..100 {
                        let estimate = "0.1".parse().expect("decimal");
                        let admission = Admission { account: "acme".into(), attempt_estimate: estimate, run_estimate: estimate, needs_approval: false };
                        let spec = Box::new(JobSpec { max_attempts: 1, ..job() });
                        let r = call_on(store.as_mut(), |reply| Op::Submit {
                            spec,
                            owner: "acme".into(),
                            idempotency_key: Uuid::new_v4(),
                            admission,
                            now: at(0),
                            reply,
                        });
                        match r {
                            Ok(_) => n += 1,
                            Err(StoreError::Api(e)) => assert_eq!(e.kind, ErrorKind::Refused, "{}", e.message),
                            Err(e) => panic!("store error: {e}"),
                        }
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().expect("coordinator")).sum()
    });
    assert_eq!(admitted, 37);
    let month = berth_coordinator::ledger::month_of(at(0));
    let rows = h.reader.budgets(Some("acme"), &month).expect("budgets");
    assert_eq!(rows[0].reserved.to_string(), "3.7");
}

// ------------------------------------------------------------------ freeze

fn freeze_as(h: &mut Harness, job: JobId, tag: Option<&str>, by: &str, admin: bool) -> Result<berth_coordinator::store::FreezeOrder, StoreError> {
    let (tag, by) = (tag.map(String::from), by.to_string());
    h.call(|reply| Op::FreezeStart { job: sel(job, None), tag, by, admin, now: at(2), reply })
}

/// A freeze reserves its image name for a running Docker task of the caller's (or any,
/// for an admin); the worker's report ends the task `frozen` with its image; the name
/// stays taken until the image is forgotten, and a freeze that never happened does not
/// hold it.
fn freeze_reserves_an_image_and_records_the_task_frozen(h: &mut Harness) {
    let docker = JobSpec { executor: berth_shared::job::Executor::Docker { image: "busybox".into(), network: None }, ..job() };
    let caps = WorkerCaps { executors: vec!["process".into(), "docker".into()], ..cpu_worker() };
    let id = h.submit(&docker);
    let plain = h.submit(&job());
    let got = h.claim_with("w1", 2, &caps, at(1), TTL);
    assert_eq!(got.len(), 2);
    let lease = got.iter().find(|a| a.job == id).expect("the docker task").lease;

    assert_eq!(api_error(freeze_as(h, id, None, "bob", false)).kind, ErrorKind::Refused, "not bob's");
    assert_eq!(api_error(freeze_as(h, plain, None, "alice", false)).kind, ErrorKind::Invalid, "not a container");
    assert_eq!(api_error(freeze_as(h, id, Some(".bad"), "alice", false)).kind, ErrorKind::Invalid);
    let order = freeze_as(h, id, Some("t1"), "root", true).expect("an admin may freeze anyone's");
    assert_eq!((order.worker.as_str(), order.lease, order.image.as_str(), order.index), ("w1", lease, "berth-frozen:t1", None));
    assert!(api_error(freeze_as(h, id, Some("t2"), "alice", false)).message.contains("being frozen"), "one freeze at a time");

    let bad = h.call(|reply| Op::Frozen { worker: "w1".into(), lease, outcome: exited(137), image: "evil:latest".into(), now: at(3), reply });
    assert_eq!(api_error(bad).kind, ErrorKind::Invalid, "only berth-frozen:TAG is recorded");
    let v = h.call(|reply| Op::Frozen { worker: "w1".into(), lease, outcome: exited(137), image: "berth-frozen:t1".into(), now: at(3), reply });
    assert_eq!(v.expect("frozen"), FinishVerdict::Recorded);
    let st = h.status(id, None);
    assert_eq!(st.task.as_ref().map(|t| t.state), Some(JobState::Frozen));
    assert_eq!(st.summary.state, JobState::Frozen);
    assert!(st.task.as_ref().and_then(|t| t.reason.as_deref()).is_some_and(|r| r.contains("not process memory")), "{st:?}");
    assert!(st.spec.labels.contains(&(berth_shared::job::LABEL_FROZEN_IMAGE.into(), "berth-frozen:t1".into())), "{:?}", st.spec.labels);
    let seq = h.seq(id);
    let img = h.reader.frozen_image(seq, None).expect("read").expect("recorded");
    assert_eq!((img.image.as_str(), img.worker.as_str(), img.owner.as_str(), img.job), ("berth-frozen:t1", "w1", "alice", id));
    assert_eq!(h.reader.images(Some("alice")).expect("images").len(), 1);
    assert!(h.reader.images(Some("bob")).expect("images").is_empty());
    assert_eq!(h.reader.images(None).expect("images").len(), 1);

    // The name is taken while the image exists.
    let other = h.submit(&docker);
    assert_eq!(h.claim_with("w1", 1, &caps, at(4), TTL).len(), 1);
    assert!(api_error(freeze_as(h, other, Some("t1"), "alice", false)).message.contains("already exists"));
    h.call(|reply| Op::ForgetImage { image: "berth-frozen:t1".into(), only_reserved: false, reply }).expect("forget");
    assert!(h.reader.image("berth-frozen:t1").expect("read").is_none());
    let order = freeze_as(h, other, Some("t1"), "alice", false).expect("free again");
    // That task ends on its own before it is frozen: the reservation holds nothing.
    assert_eq!(h.finish("w1", order.lease, exited(0), at(5)), FinishVerdict::Recorded);
    let third = h.submit(&docker);
    assert_eq!(h.claim_with("w1", 1, &caps, at(6), TTL).len(), 1);
    freeze_as(h, third, Some("t1"), "alice", false).expect("a reservation of an ended task does not hold the name");
}

// ------------------------------------------------------------------ output caps and a full disk

on_both_backends!(an_output_cap_keeps_what_fits_and_fails_the_task);

fn an_output_cap_keeps_what_fits_and_fails_the_task(h: &mut Harness) {
    let b = h.backend;
    let j = h.submit(&JobSpec { max_output: Some(10), ..job() });
    let l = h.claim("w1", 1, at(0))[0].lease;
    use ChunkVerdict::*;
    use OutStream::{Stderr, Stdout};
    // Both streams count: 6 bytes stored, then 4 of the next 8, and the task ends.
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 1, "1234"), chunk(l, Stderr, 1, "56")]), vec![Stored, Stored], "[{b}]");
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 2, "abcdefgh"), chunk(l, Stdout, 3, "more")]), vec![OverCap, Dropped], "[{b}]");
    let st = h.status(j, None);
    let t = st.task.expect("the task");
    assert_eq!((t.state, t.attempt), (JobState::Failed, 1), "[{b}]");
    let reason = t.reason.unwrap_or_default();
    assert!(reason.contains("14 B written") && reason.contains("output cap of 10 B"), "[{b}] {reason}");
    let states: Vec<JobState> = st.events.iter().map(|e| e.state).collect();
    assert_eq!(states, [JobState::Queued, JobState::Running, JobState::Failed], "[{b}]");
    assert_eq!(h.summary(j).counts.failed, 1, "[{b}]");
    let seq = h.seq(j);
    let r = h.reader.logs(seq, None, None, (0, 0)).expect("logs");
    assert!(r.ended, "[{b}] the attempt has ended");
    assert_eq!(r.chunks, vec![(Stdout, 1, b"1234".to_vec()), (Stderr, 1, b"56".to_vec()), (Stdout, 2, b"abcd".to_vec())], "[{b}] what fits");
    // What the killed attempt still sends is acknowledged and dropped; its result and
    // heartbeats change nothing and are not answered "kill".
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 4, "late")]), vec![Dropped], "[{b}]");
    assert!(h.heartbeat("w1", &[l], at(2)).is_empty(), "[{b}]");
    assert_eq!(h.finish("w1", l, exited(143), at(3)), FinishVerdict::AlreadyRecorded, "[{b}]");
    assert_eq!(h.reader.logs(seq, None, None, (0, 0)).expect("logs").chunks.len(), 3, "[{b}]");
    // Output that reaches the cap exactly is kept whole; the next chunk ends the task.
    let j = h.submit(&JobSpec { max_output: Some(8), ..job() });
    let l = h.claim("w1", 1, at(4))[0].lease;
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 1, "12345678"), chunk(l, Stdout, 2, "9")]), vec![Stored, OverCap], "[{b}]");
    let t = h.status(j, None).task.expect("task");
    assert_eq!(t.state, JobState::Failed, "[{b}]");
    assert!(t.reason.unwrap_or_default().contains("9 B written"), "[{b}]");
    let seq = h.seq(j);
    assert_eq!(h.reader.logs(seq, None, None, (0, 0)).expect("logs").chunks, vec![(Stdout, 1, b"12345678".to_vec())], "[{b}]");
    // Without a cap nothing is cut.
    let j = h.submit(&job());
    let l = h.claim("w1", 1, at(4))[0].lease;
    assert_eq!(h.append("w1", vec![chunk(l, Stdout, 1, &"x".repeat(100_000))]), vec![Stored], "[{b}]");
    assert_eq!(h.finish("w1", l, exited(0), at(5)), FinishVerdict::Recorded, "[{b}]");
    assert_eq!(h.status(j, None).task.expect("task").state, JobState::Succeeded, "[{b}]");
}

/// A SQLite database whose disk can be made full: while it is, every write statement
/// fails with SQLITE_FULL, and so does the COMMIT of a transaction that wrote (as a full
/// WAL would); reads go on.
struct FillableDb {
    inner: SqliteDb,
    full: Arc<std::sync::atomic::AtomicBool>,
    /// Fail only COMMIT (what was written in the transaction seemed to go fine).
    only_commit: Arc<std::sync::atomic::AtomicBool>,
    /// The open transaction has written.
    wrote: bool,
}

impl FillableDb {
    fn refuses(&mut self, sql: &str) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let s = sql.trim_start().to_ascii_uppercase();
        let write = s.starts_with("INSERT") || s.starts_with("UPDATE") || s.starts_with("DELETE");
        if s.starts_with("BEGIN") {
            self.wrote = false;
        }
        if !self.full.load(SeqCst) {
            self.wrote |= write;
            return false;
        }
        if s.starts_with("COMMIT") {
            return self.wrote;
        }
        if write && self.only_commit.load(SeqCst) {
            self.wrote = true;
            return false;
        }
        write
    }

    fn full() -> StoreError {
        StoreError::Db(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), Some("database or disk is full".into())))
    }
}

impl Db for FillableDb {
    fn backend(&self) -> berth_coordinator::store::sql::Backend {
        self.inner.backend()
    }
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        if self.refuses(sql) {
            return Err(Self::full());
        }
        self.inner.exec(sql, params)
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<berth_coordinator::store::sql::Row>, StoreError> {
        if self.refuses(sql) {
            return Err(Self::full());
        }
        self.inner.query(sql, params)
    }
    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        if self.refuses(sql) {
            return Err(Self::full());
        }
        self.inner.batch(sql)
    }
}

#[test]
fn a_store_that_cannot_write_refuses_new_jobs_stops_lease_clocks_and_recovers_without_stale_state() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("berth.db");
    let (full, only_commit) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let db = FillableDb { inner: SqliteDb::open(&path).expect("open"), full: full.clone(), only_commit: only_commit.clone(), wrote: false };
    let mut store = Store::new(db).expect("schema").with_lease_ttl(TTL);
    let reader = || Location::Sqlite(path.clone()).reader().expect("reader");
    let s: &mut dyn Apply = &mut store;
    let submit = |s: &mut dyn Apply, spec: JobSpec| {
        let admission = Admission { account: "alice".into(), ..Admission::default() };
        call_on(s, |reply| Op::Submit { spec: Box::new(spec), owner: "alice".into(), idempotency_key: Uuid::new_v4(), admission, now: at(0), reply })
    };
    let claim = |s: &mut dyn Apply, now| {
        call_on(s, |reply| Op::Claim { worker: "w1".into(), n: 1, caps: Arc::new(cpu_worker()), free: None, now, ttl: TTL, reply }).expect("claim").tasks
    };
    let append = |s: &mut dyn Apply, l, seq, text: &str| {
        let chunks = vec![chunk(l, OutStream::Stdout, seq, text)];
        call_on(s, |reply| Op::AppendLogs { worker: "w1".into(), chunks, reply })
    };
    let expire = |s: &mut dyn Apply, now| call_on(s, |reply| Op::ExpireLeases { now, reply }).expect("expire");
    fn unwritable<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
        match r {
            Err(e @ StoreError::Unwritable { full: true, .. }) => e.to_string(),
            other => panic!("expected the store to be unwritable, got {other:?}"),
        }
    }

    submit(s, job()).expect("submit");
    let l = claim(s, at(0))[0].lease;
    assert_eq!(append(s, l, 1, "one\n").expect("append"), vec![ChunkVerdict::Stored]);

    // The disk fills: output is refused (the caller is told, to have it sent again),
    // and so is every new job, in words.
    full.store(true, SeqCst);
    unwritable(append(s, l, 2, "two\n"));
    assert!(store.health().as_ref().is_some_and(|h| h.full), "{:?}", store.health());
    let s: &mut dyn Apply = &mut store;
    let said = unwritable(submit(s, job()));
    assert!(said.starts_with("the coordinator's disk is full: it takes no new jobs"), "{said}");
    // Renewals cannot be stored, so no lease expires for the lack of them.
    assert!(expire(s, at_ms(ttl_ms() * 3)).is_empty());
    assert!(!store.probe(at(200)), "still full");

    // Space returns: the probe finds it, and running leases get a full TTL from then.
    full.store(false, SeqCst);
    assert!(store.probe(at(200)));
    assert!(store.health().is_none());
    let s: &mut dyn Apply = &mut store;
    assert!(expire(s, at(201)).is_empty(), "the lease counts from the recovery");
    assert_eq!(append(s, l, 2, "two\n").expect("append"), vec![ChunkVerdict::Stored], "the refused chunk is taken when sent again");

    // A batch whose COMMIT fails leaves nothing behind in the writer's memory: not the
    // next output sequence, nor a job whose row id the next submission gets again.
    let parent = submit(s, job()).expect("submit").job;
    let lp = claim(s, at(202))[0].lease;
    assert_eq!(
        call_on(s, |reply| Op::Finish { worker: "w1".into(), lease: lp, outcome: exited(1), now: at(203), reply }).expect("finish"),
        FinishVerdict::Recorded
    );
    only_commit.store(true, SeqCst);
    full.store(true, SeqCst);
    // Cancelled at once (its parent failed): the writer looks the new job up meanwhile.
    let doomed = JobSpec { after: vec![format!("{parent}:ok").parse().expect("dependency")], max_attempts: 3, ..job() };
    unwritable(submit(s, doomed));
    unwritable(append(s, l, 3, "three\n"));
    full.store(false, SeqCst);
    assert!(store.probe(at(300)));
    let s: &mut dyn Apply = &mut store;
    assert_eq!(append(s, l, 3, "three\n").expect("append"), vec![ChunkVerdict::Stored], "not taken for a duplicate");
    let next = JobSpec { max_attempts: 1, ..JobSpec::new(Command::Argv(vec!["echo".into(), "next".into()])) };
    let id = submit(s, next.clone()).expect("submit").job;
    let got = claim(s, at(301));
    assert_eq!((got.len(), got[0].job), (1, id));
    assert_eq!(got[0].spec, next, "the claim carries this job's spec, not the rolled-back one's");
    let gone = expire(s, at(301) + TimeDelta::milliseconds(ttl_ms() * 3));
    assert!(gone.iter().any(|e| e.job == id && !e.requeued), "one attempt: failed, not re-queued: {gone:?}");
    let mut r = reader();
    let seq = r.resolve(&sel(id, None), &Scope::All).expect("resolve").0;
    assert_eq!(r.summary(seq).expect("summary").counts.failed, 1);
}
