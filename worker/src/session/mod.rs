//! The worker's run loop: the driver of `state::State`. Attempts live in the state and
//! outlive connections: when the coordinator is unreachable they keep running, their
//! output keeps going to the spool, and after a reconnect the worker reports the leases
//! it holds, kills the ones the coordinator calls stale, resends unacknowledged output
//! and results.
//!
//! This file does the I/O and nothing else: it dials (QUIC), reads frames and writes
//! what the state queued in one write per turn, arms the state's timer, makes spools and
//! workspaces, and hands attempts to their executors (`executor::Executor`).
//!
//! Reconnecting is paced by the lease TTL: a restarted coordinator gives every running
//! lease one TTL to be renewed, so a worker must notice a dead link (three heartbeats
//! in a row without an answer) and dial again well within one TTL.

pub mod state;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::{encode, read_frame, write_frame, write_frame_quic};
use berth_shared::dial::{client_endpoint, dial, Dialed};
use berth_shared::ids::{LeaseId, TaskRef};
use berth_shared::tls::client_config;
use berth_shared::wire::{Assignment, CoordMsg, FreeResources, GpuInfo, HostInfo, OutputFrame, PeerKind, WorkerMsg};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::state::{Action, State};
use crate::executor::{self, Controls, Ended, Executor, Job, Launch, Opened, Report, Reports, Setup};
use crate::spool::Spool;
use crate::{identity, WorkerConfig, WorkerError};

/// At most this many more frames and reports are handled in one turn of the session
/// before what they produced is sent.
const COALESCE: usize = 64;

/// How long a SIGTERM'd attempt gets before its group is SIGKILLed.
const GRACE: Duration = Duration::from_secs(2);

/// What the current connection carries.
struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    /// Output senders by attempt and exec (0: the attempt's own output).
    senders: HashMap<(LeaseId, u32), JoinHandle<()>>,
    /// Frames queued by `send`, not yet written.
    out: Vec<u8>,
}

impl Link {
    /// Queues a message; `flush` sends what is queued in one write, so the messages
    /// one turn of the session produces (a result, a request for more work, the start
    /// of the next attempt) leave in one packet rather than one each.
    fn send(&mut self, m: &WorkerMsg) {
        match encode(m) {
            Ok(frame) => self.out.extend_from_slice(&frame),
            Err(e) => tracing::error!(error = %e, "cannot encode a message for the coordinator"),
        }
    }

    /// Sends what `send` queued; `false` when the connection is gone.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let out = bytes::Bytes::from(std::mem::take(&mut self.out));
        self.send.write_chunk(out).await.is_ok()
    }

    fn lost(&self, otherwise: &str) -> Closed {
        Closed::Lost(self.conn.close_reason().map(|r| berth_shared::dial::describe(&r)).unwrap_or_else(|| otherwise.into()))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for (_, h) in self.senders.drain() {
            h.abort();
        }
    }
}

/// How one connection ended.
enum Closed {
    Shutdown,
    Lost(String),
    /// Refused for now: another process of this worker holds the name.
    InUse {
        reason: String,
        retry_after: Duration,
    },
}

/// The I/O side: what the state's actions are carried out with.
struct Driver {
    cfg: WorkerConfig,
    host: HostInfo,
    executors: Vec<Box<dyn Executor>>,
    /// Slots whose workspace was emptied when their last attempt ended.
    clean: HashSet<usize>,
    reports: Reports,
    /// This process, for the coordinator (`Register::instance`).
    instance: uuid::Uuid,
    /// The sessions open here, for copies into and out of their workspaces.
    sessions: crate::copy::Sessions,
    /// Slots whose session's workspace is not the slot's own directory (packed).
    elsewhere: std::collections::HashMap<usize, std::path::PathBuf>,
}

/// Runs the worker until `shutdown` resolves.
pub async fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    run_on(cfg, None, shutdown).await
}

/// `run`, with the host as the caller already detected it (`host::detect_limited` with
/// the config's executors and limits), so it is not detected twice.
pub async fn run_on_host(cfg: WorkerConfig, host: HostInfo, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    run_on(cfg, Some(host), shutdown).await
}

async fn run_on(mut cfg: WorkerConfig, host: Option<HostInfo>, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    let id = identity::load_or_enrol(&cfg).await?;
    // The engine mounts slot workspaces by absolute path.
    cfg.work_dir = std::fs::canonicalize(&cfg.work_dir).map_err(|source| WorkerError::WorkDir { path: cfg.work_dir.clone(), source })?;
    // One worker per work dir, held for the worker's whole life (`berth-worker sweep`
    // reads it to know whether the containers there are still someone's).
    let _lock = match crate::sweep::lock_work_dir(&cfg.work_dir) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Err(WorkerError::Setup(format!("work dir {} is in use by another berth-worker", cfg.work_dir.display()))),
        Err(source) => return Err(WorkerError::WorkDir { path: cfg.work_dir.join("worker.lock"), source }),
    };
    let asked = cfg.executors.clone();
    let executors = open_executors(&mut cfg).await?;
    for d in ["spool", "slots", "groups", "containers", "packs", "warm"] {
        let p = cfg.work_dir.join(d);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|source| WorkerError::WorkDir { path: p.clone(), source })?;
    }
    let host = match host {
        Some(h) => h,
        None => crate::host::detect_limited(&cfg.executors, &cfg.limits).map(|(h, _)| h).map_err(WorkerError::Setup)?,
    };
    let mut host = offered(host, &asked, &cfg.executors);
    host.containment = executors.iter().find_map(|e| e.containment()).unwrap_or_default();
    host.secrets = cfg.secrets.grants();
    crate::contain::work_dir_modes(&cfg.work_dir, host.containment.separate_users)
        .map_err(|source| WorkerError::WorkDir { path: cfg.work_dir.clone(), source })?;
    let (reports, mut reports_rx) = mpsc::unbounded_channel();
    let free = FreeResources { millicpus: host.cpus.saturating_mul(1000), mem_mib: host.mem_mib, gpus: host.gpus.clone() };
    let mut state = State::new(cfg.slots, cfg.prefetch, free);
    let endpoint = {
        let tls = client_config(&cfg.ca_pem, Some(&id)).map_err(|e| WorkerError::Setup(format!("--ca or certificate: {e}")))?;
        client_endpoint(tls, false).map_err(|source| WorkerError::WorkDir { path: cfg.work_dir.clone(), source })?
    };
    let instance = uuid::Uuid::new_v4();
    tracing::info!(%instance, "this worker process");
    let mut driver = Driver { cfg, host, executors, clean: HashSet::new(), reports, instance, sessions: Default::default(), elsewhere: Default::default() };
    tokio::pin!(shutdown);
    loop {
        let dialed = tokio::select! {
            d = dial(&endpoint, &driver.cfg.coordinators, driver.cfg.server_name.as_deref(), PeerKind::Worker, state::dial_timeout(state.lease_ttl())) => Some(d),
            _ = &mut shutdown => None,
        };
        match dialed {
            None => break,
            Some(Ok(d)) => {
                let addr = d.addr.clone();
                tracing::info!(coordinator = %addr, "connected");
                let ended = driver.session(&mut state, d, &mut reports_rx, &mut shutdown).await;
                state.disconnected();
                match ended {
                    Ok(Closed::Shutdown) => break,
                    Ok(Closed::Lost(why)) => tracing::warn!(coordinator = %addr, reason = %why, "lost the coordinator; attempts keep running, reconnecting"),
                    Ok(Closed::InUse { reason, retry_after }) => {
                        tracing::warn!(coordinator = %addr, reason = %reason, ?retry_after, "the coordinator refused this process for now; trying again later");
                        state.in_use(retry_after);
                    }
                    Err(e) => {
                        driver.kill_all(&mut state, &mut reports_rx).await;
                        return Err(e);
                    }
                }
            }
            Some(Err(e @ (berth_shared::dial::DialError::Refused { .. } | berth_shared::dial::DialError::Auth { .. }))) => {
                driver.kill_all(&mut state, &mut reports_rx).await;
                return Err(e.into());
            }
            Some(Err(e)) => tracing::warn!(error = %e, "cannot reach a coordinator"),
        }
        // Wait before the next try, still looking after running attempts.
        let retry = tokio::time::sleep_until(state.retry_at(Instant::now(), random()));
        tokio::pin!(retry);
        let mut timer = Timer::new();
        loop {
            timer.arm(state.next_timeout());
            tokio::select! {
                _ = &mut retry => break,
                Some(r) = reports_rx.recv() => state.report(Instant::now(), r),
                _ = timer.sleep.as_mut(), if timer.armed.is_some() => {
                    timer.fired();
                    // Without a link there is no heartbeat to miss.
                    let _ = state.timeout(Instant::now());
                }
                _ = &mut shutdown => {
                    driver.kill_all(&mut state, &mut reports_rx).await;
                    return Ok(());
                }
            }
            driver.apply(&mut state, &mut None);
        }
    }
    driver.kill_all(&mut state, &mut reports_rx).await;
    // Let the close reach the coordinator, which otherwise counts this worker connected
    // until its connection idles out (and a restarted worker would find it still there).
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// The state's timer: one sleep, moved when the state's next deadline moves.
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
}

impl Timer {
    fn new() -> Timer {
        Timer { sleep: Box::pin(tokio::time::sleep(Duration::ZERO)), armed: None }
    }

    fn arm(&mut self, next: Option<Instant>) {
        if next != self.armed {
            if let Some(t) = next {
                self.sleep.as_mut().reset(t);
            }
            self.armed = next;
        }
    }

    fn fired(&mut self) {
        self.armed = None;
    }
}

/// Opens the executors asked for (each registered one is opened, so it can clean up
/// what an earlier run left even if not offered now). `cfg.executors` keeps those
/// offered; a worker left with none does not start.
async fn open_executors(cfg: &mut WorkerConfig) -> Result<Vec<Box<dyn Executor>>, WorkerError> {
    let mut offered = Vec::new();
    let mut declined = Vec::new();
    for (name, open) in executor::REGISTERED {
        let asked = cfg.executors.iter().any(|e| e == name);
        match open(&Setup { cfg, asked }).await? {
            Opened::Offered(e) => offered.push(e),
            Opened::NotAsked => {}
            Opened::Declined(why) => declined.push((*name, why)),
        }
    }
    for (name, why) in declined {
        cfg.executors.retain(|x| x != name);
        if cfg.executors.is_empty() {
            return Err(WorkerError::Setup(format!("{why}: the {name} executor cannot be offered and no other was asked for")));
        }
        tracing::warn!(error = %why, "not offering the {name} executor");
    }
    Ok(offered)
}

/// What the worker tells the coordinator it offers: the host as detected, with the
/// executors that could be opened, and `docker` saying whether the engine answered when
/// the docker executor was asked for. The one place a worker's capabilities are assembled.
fn offered(host: HostInfo, asked: &[String], executors: &[String]) -> HostInfo {
    let docker_asked = asked.iter().any(|e| e == executor::docker::NAME);
    let docker_offered = executors.iter().any(|e| e == executor::docker::NAME);
    HostInfo { docker: docker_offered || (host.docker && !docker_asked), executors: executors.to_vec(), ..host }
}

/// A little randomness for the jitter of reconnects.
fn random() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0)
}

impl Driver {
    /// Carries out what the state queued.
    fn apply(&mut self, state: &mut State, link: &mut Option<Link>) {
        while let Some(a) = state.poll_action() {
            match a {
                Action::Send(m) => {
                    if let Some(l) = link.as_mut() {
                        l.send(&m);
                    }
                }
                Action::Start { lease, slot } => self.start(state, lease, slot),
                Action::Stream(lease) => {
                    if let (Some(l), Some(at)) = (link.as_mut(), state.attempt(lease)) {
                        start_sender(l, lease, 0, at.spool.clone());
                    }
                }
                Action::Restream(lease) => {
                    if let (Some(l), Some(at)) = (link.as_mut(), state.attempt(lease)) {
                        if let Some(h) = l.senders.remove(&(lease, 0)) {
                            h.abort();
                        }
                        start_sender(l, lease, 0, at.spool.clone());
                    }
                }
                Action::Exec { lease, exec } => self.exec(state, lease, exec),
                Action::StreamExec { lease, exec, restart } => {
                    let spool = state.attempt(lease).and_then(|a| a.session.as_ref()?.execs.get(&exec)).map(|r| r.spool.clone());
                    if let (Some(l), Some(spool)) = (link.as_mut(), spool) {
                        if restart {
                            if let Some(h) = l.senders.remove(&(lease, exec)) {
                                h.abort();
                            }
                        }
                        start_sender(l, lease, exec, spool);
                    }
                }
                Action::ForgetExec { lease, exec, spool } => {
                    spool.remove();
                    if let Some(h) = link.as_mut().and_then(|l| l.senders.remove(&(lease, exec))) {
                        h.abort();
                    }
                }
                Action::Kill { lease, reason } => {
                    if let Some(at) = state.attempt(lease) {
                        at.kill.send_replace(Some(reason));
                    }
                }
                Action::Freeze { lease, tag } => match state.attempt(lease) {
                    Some(at) if self.executor(&at.a).is_some_and(|e| e.freezes()) => {
                        tracing::info!(lease = %lease, tag = %tag, "freezing attempt");
                        // Kept even while nothing listens: an attempt not started yet freezes
                        // as soon as its container runs.
                        at.freeze.send_replace(Some(tag));
                    }
                    _ => tracing::warn!(lease = %lease, "asked to freeze an attempt that is not a running container here; ignored"),
                },
                Action::Forget { lease, spool } => {
                    spool.remove();
                    if let Some(h) = link.as_mut().and_then(|l| l.senders.remove(&(lease, 0))) {
                        h.abort();
                    }
                }
                Action::CleanSlot(slot) => {
                    self.sessions.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, d| d.slot != slot);
                    if let Some(elsewhere) = self.elsewhere.remove(&slot) {
                        if let Err(e) = std::fs::remove_dir_all(&elsewhere) {
                            if e.kind() != std::io::ErrorKind::NotFound {
                                tracing::warn!(error = %e, dir = %elsewhere.display(), "cannot remove a session's workspace");
                            }
                        }
                    }
                    if prepare_workspace(&self.workspace(slot)).is_ok() {
                        self.clean.insert(slot);
                    }
                }
                Action::RemoveImage { image, report } => {
                    let reports = report.then(|| self.reports.clone());
                    let removed = self.executors.iter().any(|e| e.remove_image(image.clone(), reports.clone()));
                    if !removed && report {
                        let _ = self.reports.send(Report::ImageRemoved(image, Some("this worker has no Docker engine".into())));
                    }
                }
            }
        }
    }

    fn executor(&self, a: &Assignment) -> Option<&dyn Executor> {
        let name = a.spec.executor.name();
        self.executors.iter().find(|e| e.name() == name).map(|e| e.as_ref())
    }

    /// The workspace of what runs in `slot`: the slot's own directory, or where its
    /// session's executor keeps it (`Executor::session_workspace`).
    fn workspace(&self, slot: usize) -> std::path::PathBuf {
        match self.elsewhere.get(&slot) {
            Some(p) => p.clone(),
            None => self.cfg.work_dir.join("slots").join(slot.to_string()),
        }
    }

    /// Hands an attempt to its executor in its slot's workspace.
    fn start(&mut self, state: &State, lease: LeaseId, slot: usize) {
        let Some(at) = state.attempt(lease) else { return };
        let workspace = self.workspace(slot);
        let prepared = if self.clean.remove(&slot) { Ok(()) } else { prepare_workspace(&workspace) };
        let exec = self.executor(&at.a);
        let seen = exec.and_then(|e| e.workspace_in_job(&workspace)).unwrap_or_else(|| workspace.to_string_lossy().into_owned());
        let env = job_env(&at.a, &at.gpus, !self.host.gpus.is_empty(), slot, &seen, &self.cfg.name, &self.cfg.secrets);
        let refused = match (prepared, env, exec) {
            (Err(e), _, _) => Err((None, format!("cannot prepare the slot workspace: {e}"))),
            (_, Err(e), _) => Err((None, e)),
            (_, _, None) => Err((
                Some(125),
                format!(
                    "worker {} does not offer the {} executor (it offers {}): start it with `--executor {}`, or see its log at start for why that executor was declined",
                    self.cfg.name,
                    at.a.spec.executor.name(),
                    self.cfg.executors.join(", "),
                    at.a.spec.executor.name()
                ),
            )),
            (Ok(()), Ok(env), Some(exec)) => Ok((env, exec)),
        };
        let (mut env, exec) = match refused {
            Ok(ok) => ok,
            Err((code, error)) => {
                at.spool.close();
                let _ = self.reports.send(Report::Ended(lease, Ended { outcome: executor::not_started(code, error), frozen: None }));
                return;
            }
        };
        let (mut workspace, mut placed) = (workspace, None);
        if at.a.spec.session.is_some() {
            if let Some(elsewhere) = exec.session_workspace(&at.a, slot) {
                if let Err(e) = std::fs::create_dir_all(&elsewhere) {
                    tracing::warn!(error = %e, dir = %elsewhere.display(), "cannot make the session's workspace; its open fails");
                }
                let seen = exec.workspace_in_job(&elsewhere).unwrap_or_else(|| elsewhere.to_string_lossy().into_owned());
                for (k, v) in env.iter_mut() {
                    if k == "BERTH_WORKSPACE" {
                        *v = seen.clone();
                    }
                }
                placed = Some(elsewhere.clone());
                workspace = elsewhere;
            }
        }
        let workspace_of_session = workspace.clone();
        let launch = Launch {
            argv: at.a.spec.command.argv(),
            env,
            workspace,
            max_runtime: at.a.spec.max_runtime_ms.map(Duration::from_millis),
            grace: GRACE,
            record: None,
        };
        let span = tracing::info_span!("attempt", task = %TaskRef { job: at.a.job, index: at.a.index }, attempt = at.a.attempt, lease = %lease);
        let controls = Controls { kill: at.kill.subscribe(), freeze: at.freeze.subscribe() };
        let job = Job { assignment: &at.a, gpus: &at.gpus, slot, launch, spool: at.spool.clone(), controls, span };
        if at.a.spec.session.is_some() {
            let dir = crate::copy::SessionDir { slot, workspace: workspace_of_session, owner: exec.workspace_owner(slot) };
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(lease, dir);
            exec.open_session(job, self.reports.clone());
            if let Some(p) = placed {
                self.elsewhere.insert(slot, p);
            }
        } else {
            exec.spawn(job, self.reports.clone());
        }
    }

    /// Hands an exec of a session to the session's executor, in its slot's workspace.
    fn exec(&mut self, state: &State, lease: LeaseId, exec: u32) {
        let Some(at) = state.attempt(lease) else { return };
        let (Some(slot), Some(run)) = (at.slot(), at.session.as_ref().and_then(|s| s.execs.get(&exec))) else { return };
        let ended = |error: String| {
            run.spool.close();
            let _ = self.reports.send(Report::ExecEnded(lease, exec, executor::not_started(None, error)));
        };
        let Some(executor) = self.executor(&at.a) else { return ended("the session's executor is gone".into()) };
        let workspace = self.workspace(slot);
        let cwd = match run.spec.cwd.as_deref() {
            None => workspace.clone(),
            Some(rel) => match berth_shared::archive::resolve_in(&workspace, rel) {
                Ok(p) if p.is_dir() => p,
                Ok(_) => return ended(format!("--cwd {}: no such directory in the workspace", berth_shared::text::escape(rel))),
                Err(e) => return ended(format!("--cwd: {e}")),
            },
        };
        let seen = executor.workspace_in_job(&workspace).unwrap_or_else(|| workspace.to_string_lossy().into_owned());
        let mut env = match job_env(&at.a, &at.gpus, !self.host.gpus.is_empty(), slot, &seen, &self.cfg.name, &self.cfg.secrets) {
            Ok(env) => env,
            Err(e) => return ended(e),
        };
        env.push(("BERTH_SESSION_ID".into(), at.a.job.to_string()));
        env.push(("BERTH_EXEC".into(), exec.to_string()));
        env.extend(run.spec.env.iter().cloned());
        let launch =
            Launch { argv: run.spec.argv.clone(), env, workspace, max_runtime: run.spec.timeout_ms.map(Duration::from_millis), grace: GRACE, record: None };
        let stdin = run.stdin_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let span = tracing::info_span!("exec", session = %at.a.job, exec, lease = %lease);
        let job = executor::ExecJob { lease, exec, slot, launch, cwd, spool: run.spool.clone(), kill: run.kill.subscribe(), stdin, span };
        executor.exec(job, self.reports.clone());
    }

    /// Kills every attempt and waits (a bounded time) for their process groups to be
    /// gone, so a worker that stops leaves nothing running behind it.
    async fn kill_all(&mut self, state: &mut State, reports: &mut mpsc::UnboundedReceiver<Report>) {
        state.stop();
        self.apply(state, &mut None);
        let deadline = Instant::now() + GRACE + Duration::from_secs(3);
        while state.running() > 0 {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(r)) => state.report(Instant::now(), r),
                Ok(None) | Err(_) => {
                    tracing::warn!(running = state.running(), "attempts still running as the worker stops");
                    break;
                }
            }
            self.apply(state, &mut None);
        }
        for e in &self.executors {
            e.shutdown().await;
        }
    }

    async fn session(
        &mut self,
        state: &mut State,
        d: Dialed,
        reports: &mut mpsc::UnboundedReceiver<Report>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Closed, WorkerError> {
        let Dialed { conn, mut send, mut recv, .. } = d;
        let register = WorkerMsg::Register {
            name: self.cfg.name.clone(),
            slots: self.cfg.slots as u32,
            pool: self.cfg.pool.clone(),
            labels: self.cfg.labels.clone(),
            host: Box::new(self.host.clone()),
            held: state.held(),
            instance: self.instance,
        };
        if write_frame(&mut send, &register).await.is_err() {
            return Ok(Closed::Lost("cannot register".into()));
        }
        match tokio::time::timeout(Duration::from_secs(10), read_frame::<_, CoordMsg>(&mut recv)).await {
            Ok(Ok(Some(CoordMsg::Registered { lease_ttl_ms, stale }))) => state.registered(Instant::now(), lease_ttl_ms, stale),
            Ok(Ok(Some(CoordMsg::Refused { reason }))) => return Err(WorkerError::Refused(reason)),
            Ok(Ok(Some(CoordMsg::InUse { reason, retry_after_ms }))) => {
                conn.close(0u32.into(), b"refused for now");
                return Ok(Closed::InUse { reason, retry_after: Duration::from_millis(retry_after_ms) });
            }
            other => return Ok(Closed::Lost(format!("no registration answer ({})", if other.is_err() { "timed out".into() } else { format!("{other:?}") }))),
        };
        let (frames_tx, mut frames) = mpsc::unbounded_channel::<CoordMsg>();
        let reader = tokio::spawn(async move {
            while let Ok(Some(m)) = read_frame::<_, CoordMsg>(&mut recv).await {
                if frames_tx.send(m).is_err() {
                    break;
                }
            }
        });
        let copies = tokio::spawn(crate::copy::accept(conn.clone(), self.sessions.clone()));
        let mut link = Some(Link { conn: conn.clone(), send, senders: HashMap::new(), out: Vec::new() });
        self.apply(state, &mut link);
        let spool_dir = self.cfg.work_dir.join("spool");
        let spool = |lease: LeaseId, exec: u32| {
            let path = match exec {
                0 => spool_dir.join(format!("{lease}.spool")),
                n => spool_dir.join(format!("{lease}-{n}.spool")),
            };
            match Spool::create(&path) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::error!(error = %e, path = %path.display(), "cannot create a spool file; the lease will expire and the task run elsewhere");
                    None
                }
            }
        };
        let mut timer = Timer::new();
        let ended = loop {
            let Some(l) = link.as_mut() else { break Closed::Lost("no link".into()) };
            if !l.flush().await {
                break l.lost("cannot send to the coordinator");
            }
            timer.arm(state.next_timeout());
            tokio::select! {
                m = frames.recv() => match m {
                    Some(m) => state.frame(Instant::now(), m, spool)?,
                    None => break l.lost("control stream closed"),
                },
                Some(r) = reports.recv() => state.report(Instant::now(), r),
                _ = timer.sleep.as_mut(), if timer.armed.is_some() => {
                    timer.fired();
                    if let Err(why) = state.timeout(Instant::now()) {
                        break Closed::Lost(why);
                    }
                }
                _ = shutdown.as_mut() => break Closed::Shutdown,
            }
            self.apply(state, &mut link);
            // Take what else is already waiting, then send everything this turn queued.
            for _ in 0..COALESCE {
                match frames.try_recv() {
                    Ok(m) => state.frame(Instant::now(), m, spool)?,
                    Err(_) => break,
                }
                self.apply(state, &mut link);
            }
            for _ in 0..COALESCE {
                match reports.try_recv() {
                    Ok(r) => state.report(Instant::now(), r),
                    Err(_) => break,
                }
                self.apply(state, &mut link);
            }
        };
        reader.abort();
        copies.abort();
        drop(link);
        match &ended {
            Closed::Shutdown => conn.close(0u32.into(), b"worker shutting down"),
            Closed::Lost(_) | Closed::InUse { .. } => conn.close(0u32.into(), b"worker gave up on this connection"),
        }
        Ok(ended)
    }
}

/// Empties a slot's workspace (keeping the directory: an empty workspace, the common
/// case, costs one `readdir`), when an attempt ends and, if that failed, before the
/// slot's next attempt.
fn prepare_workspace(dir: &std::path::Path) -> std::io::Result<()> {
    let emptied = (|| -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                std::fs::remove_dir_all(e.path())?;
            } else {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    })();
    match emptied {
        Ok(()) => Ok(()),
        // Missing, or a job changed its permissions: start it afresh.
        Err(_) => {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            std::fs::create_dir_all(dir)
        }
    }
}

/// The job's environment on top of the worker's: its own variables, secrets
/// resolved here (never sent or stored), and BERTH_* facts. `workspace` is where the
/// job sees its workspace.
fn job_env(
    a: &Assignment,
    gpus: &[GpuInfo],
    has_gpus: bool,
    slot: usize,
    workspace: &str,
    worker: &str,
    secrets: &crate::secrets::Secrets,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = a.spec.env.clone();
    if has_gpus || !gpus.is_empty() {
        // Only the GPUs it was given: a job that asked for none sees none, so two jobs
        // never share a GPU.
        let list = gpus.iter().map(|g| g.index.to_string()).collect::<Vec<_>>().join(",");
        env.push(("CUDA_VISIBLE_DEVICES".into(), list.clone()));
        env.push(("NVIDIA_VISIBLE_DEVICES".into(), if list.is_empty() { "none".into() } else { list }));
    }
    // The coordinator names the account (the owner's when the job gave none).
    let account = a.spec.account.as_deref().unwrap_or("");
    for (var, name) in &a.spec.secrets {
        env.push((var.clone(), secrets.resolve(name, account, worker)?));
    }
    env.push(("BERTH_JOB_ID".into(), a.job.to_string()));
    env.push(("BERTH_ATTEMPT".into(), a.attempt.to_string()));
    env.push(("BERTH_SLOT".into(), slot.to_string()));
    env.push(("BERTH_WORKER".into(), worker.to_string()));
    env.push(("BERTH_WORKSPACE".into(), workspace.to_string()));
    if let Some(i) = a.index {
        env.push(("BERTH_ARRAY_INDEX".into(), i.to_string()));
    }
    Ok(env)
}

/// Streams an attempt's spooled output on its own uni stream, from the first chunk
/// not yet acknowledged. No stream is opened for an attempt that prints nothing.
fn start_sender(link: &mut Link, lease: LeaseId, exec: u32, spool: Arc<Spool>) {
    if link.senders.contains_key(&(lease, exec)) {
        return;
    }
    let conn = link.conn.clone();
    let h = tokio::spawn(async move {
        let mut next = spool.first_unacked();
        let mut stream: Option<quinn::SendStream> = None;
        loop {
            let notified = spool.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            loop {
                let chunk = match spool.read(next) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the spool");
                        return;
                    }
                };
                if stream.is_none() {
                    let Ok(mut s) = conn.open_uni().await else { return };
                    let open = match exec {
                        0 => OutputFrame::Open { lease },
                        exec => OutputFrame::OpenExec { lease, exec },
                    };
                    if write_frame(&mut s, &open).await.is_err() {
                        return;
                    }
                    stream = Some(s);
                }
                let Some(s) = stream.as_mut() else { return };
                if write_frame_quic(s, &OutputFrame::Chunk { stream: chunk.stream, seq: chunk.seq, data: chunk.data }).await.is_err() {
                    return;
                }
                next += 1;
            }
            if spool.is_closed() && next >= spool.len() {
                if let Some(mut s) = stream.take() {
                    let _ = s.finish();
                }
                return;
            }
            notified.await;
        }
    });
    link.senders.insert((lease, exec), h);
}
