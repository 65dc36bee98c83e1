//! The worker's run loop. Attempts live in `State` and outlive connections: when the
//! coordinator is unreachable they keep running, their output keeps going to the
//! spool, and after a reconnect the worker reports the leases it holds, kills the
//! ones the coordinator calls stale, resends unacknowledged output and results.
//!
//! Reconnecting is paced by the lease TTL: a restarted coordinator gives every running
//! lease one TTL to be renewed, so a worker must notice a dead link (three heartbeats
//! in a row without an answer) and dial again well within one TTL.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::{encode, read_frame, write_frame, write_frame_quic};
use berth_shared::dial::{client_endpoint, dial, Dialed};
use berth_shared::ids::LeaseId;
use berth_shared::job::Outcome;
use berth_shared::tls::client_config;
use berth_shared::wire::{Assignment, CoordMsg, FreeResources, GpuInfo, HostInfo, KillReason, OutputFrame, PeerKind, WorkerMsg};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::executor::{docker, process, Launch};
use crate::slot::{to_request, SlotTable};
use crate::spool::Spool;
use crate::{identity, WorkerConfig, WorkerError};

enum Phase {
    Queued,
    Running,
    Done(Outcome),
}

struct Attempt {
    a: Assignment,
    /// The GPUs set aside for it (their indices are all the job sees).
    gpus: Vec<GpuInfo>,
    /// Whether its resources are still set aside (until its process ends).
    holds: bool,
    spool: Arc<Spool>,
    kill: watch::Sender<Option<KillReason>>,
    phase: Phase,
    slot: Option<usize>,
    finish_sent: bool,
    stale: bool,
    /// Asks a Docker attempt to freeze (the tag); set once it runs.
    freeze: Option<watch::Sender<Option<String>>>,
    /// The image a frozen attempt was committed to.
    frozen: Option<String>,
}

enum RunEvent {
    Started(LeaseId),
    /// `STARTED_AFTER` has passed since the attempt's process started.
    StillRunning(LeaseId),
    Exited(LeaseId, Outcome),
    /// The attempt was frozen into this image (sent before its `Exited`).
    Frozen(LeaseId, String),
    /// A frozen image was removed (or why not), for `ImageRemoved`.
    ImageRemoved(String, Option<String>),
}

/// What the current connection carries.
struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    /// Tasks asked for on this connection and not yet assigned.
    asked: usize,
    /// The free resources last reported on this connection.
    free_sent: Option<FreeResources>,
    senders: HashMap<LeaseId, JoinHandle<()>>,
    /// Frames queued by `send`, not yet written.
    out: Vec<u8>,
}

impl Link {
    /// Queues a message; `flush` sends what is queued in one write, so the messages
    /// one turn of the session produces (a result, a request for more work, the start
    /// of the next attempt) leave in one packet rather than one each.
    async fn send(&mut self, m: &WorkerMsg) -> bool {
        match encode(m) {
            Ok(frame) => {
                self.out.extend_from_slice(&frame);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a message for the coordinator");
                false
            }
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
}

impl Drop for Link {
    fn drop(&mut self) {
        for (_, h) in self.senders.drain() {
            h.abort();
        }
    }
}

/// How long an attempt runs before the coordinator is told it started (its process
/// start time, otherwise recorded from the result's runtime).
const STARTED_AFTER: Duration = Duration::from_millis(50);

/// At most this many more frames and events are handled in one turn of the session
/// before what they produced is sent.
const COALESCE: usize = 64;

/// How long a SIGTERM'd attempt gets before its group is SIGKILLed.
const GRACE: Duration = Duration::from_secs(2);

/// Heartbeats in a row without any frame from the coordinator after which the link is
/// taken for dead (a heartbeat goes every third of the lease TTL).
const UNANSWERED_HEARTBEATS: u32 = 3;

/// How long one dial may take: long enough for a busy coordinator's handshake, short
/// enough to try again several times within a lease TTL.
fn dial_timeout(ttl: Option<Duration>) -> Duration {
    ttl.map_or(Duration::from_secs(5), |t| (t / 2).clamp(Duration::from_secs(1), Duration::from_secs(5)))
}

/// The longest wait between dials.
fn max_backoff(ttl: Option<Duration>) -> Duration {
    ttl.map_or(Duration::from_secs(5), |t| (t / 8).clamp(Duration::from_millis(100), Duration::from_secs(5)))
}

struct State {
    cfg: WorkerConfig,
    host: HostInfo,
    /// What is not set aside for running or waiting attempts.
    free: FreeResources,
    /// The lease TTL the coordinator last announced.
    lease_ttl: Option<Duration>,
    attempts: HashMap<LeaseId, Attempt>,
    queue: VecDeque<LeaseId>,
    slots: SlotTable,
    /// Slots whose workspace was emptied when their last attempt ended.
    clean: std::collections::HashSet<usize>,
    ev_tx: mpsc::UnboundedSender<RunEvent>,
    /// The Docker engine, when this worker offers the docker executor.
    engine: Option<docker::Engine>,
}

impl State {
    /// Forgets an attempt and gives back what was set aside for it.
    fn drop_attempt(&mut self, lease: LeaseId) -> Option<Attempt> {
        self.release(lease);
        self.attempts.remove(&lease)
    }

    /// Gives back what an attempt set aside (once: when its process has ended).
    fn release(&mut self, lease: LeaseId) {
        if let Some(at) = self.attempts.get_mut(&lease) {
            if at.holds {
                at.holds = false;
                self.free.give_back(&at.a.spec.resources, at.gpus.clone());
            }
        }
    }

    fn running(&self) -> usize {
        self.attempts.values().filter(|a| matches!(a.phase, Phase::Running)).count()
    }

    fn task_name(a: &Assignment) -> String {
        match a.index {
            Some(i) => format!("{}:{i}", a.job),
            None => a.job.to_string(),
        }
    }

    /// Leases the worker holds: everything not known to be stale.
    fn held(&self) -> Vec<LeaseId> {
        self.attempts.iter().filter(|(_, a)| !a.stale).map(|(l, _)| *l).collect()
    }

    async fn want_more(&mut self, link: &mut Option<Link>) {
        let Some(l) = link.as_mut() else { return };
        let n = to_request(self.slots.len(), self.cfg.prefetch, self.running(), self.queue.len(), l.asked);
        // Ask for more, or say that resources came free (the coordinator claims
        // against what it was last told).
        if n > 0 || l.free_sent.as_ref() != Some(&self.free) {
            l.asked += n as usize;
            l.free_sent = Some(self.free.clone());
            l.send(&WorkerMsg::WantFit { n, free: self.free.clone() }).await;
        }
    }

    fn assign(&mut self, list: Vec<Assignment>, link: &mut Option<Link>) {
        if let Some(l) = link.as_mut() {
            l.asked = l.asked.saturating_sub(list.len());
        }
        for a in list {
            let lease = a.lease;
            let path = self.cfg.work_dir.join("spool").join(format!("{lease}.spool"));
            let spool = match Spool::create(&path) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::error!(error = %e, path = %path.display(), "cannot create a spool file; the lease will expire and the task run elsewhere");
                    continue;
                }
            };
            let (kill, _) = watch::channel(None);
            // The coordinator handed this out against what we said was free; set it aside.
            let (gpus, holds) = match self.free.take(&a.spec.resources) {
                Some(g) => (g, true),
                None => {
                    tracing::warn!(lease = %lease, "an assigned task does not fit what is free; it runs without resources set aside");
                    (Vec::new(), false)
                }
            };
            self.attempts.insert(
                lease,
                Attempt { a, gpus, holds, spool, kill, phase: Phase::Queued, slot: None, finish_sent: false, stale: false, freeze: None, frozen: None },
            );
            self.queue.push_back(lease);
        }
    }

    /// Starts queued attempts while slots are free.
    fn start_queued(&mut self, link: &mut Option<Link>) {
        let has_gpus = !self.host.gpus.is_empty();
        while self.slots.free() > 0 {
            let Some(lease) = self.queue.pop_front() else { break };
            let Some(slot) = self.slots.acquire() else { break };
            let cfg = &self.cfg;
            let Some(at) = self.attempts.get_mut(&lease) else {
                self.slots.release(slot);
                continue;
            };
            at.slot = Some(slot);
            at.phase = Phase::Running;
            let workspace = cfg.work_dir.join("slots").join(slot.to_string());
            let prepared = if self.clean.remove(&slot) { Ok(()) } else { prepare_workspace(&workspace) };
            let cluster = self.engine.as_ref().map_or("", |e| e.cluster());
            let container = docker::ContainerSpec::for_attempt(&at.a, &cfg.name, cluster, cfg.docker_pids_limit, GRACE, std::time::SystemTime::now())
                .map(|c| c.with_gpus(&at.gpus));
            // A freeze asked for before the container ran is carried out once it runs.
            let freeze = match &at.freeze {
                Some(tx) => tx.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    at.freeze = Some(tx);
                    rx
                }
            };
            let env = job_env(&at.a, &at.gpus, has_gpus, slot, &workspace, &cfg.name);
            // In a container the workspace is at /workspace.
            let env = env.map(|mut env| {
                if container.is_some() {
                    env.iter_mut().filter(|(k, _)| k == "BERTH_WORKSPACE").for_each(|(_, v)| *v = docker::WORKSPACE_IN_CONTAINER.into());
                }
                env
            });
            let launch = Launch {
                argv: at.a.spec.command.argv(),
                env: env.clone().unwrap_or_default(),
                workspace,
                max_runtime: at.a.spec.max_runtime_ms.map(Duration::from_millis),
                grace: GRACE,
                // A process group is recorded per slot (the file is reused: creating and deleting
                // one per attempt costs more than a trivial job); a container per attempt.
                record: Some(match container {
                    Some(_) => cfg.work_dir.join("containers").join(lease.to_string()),
                    None => cfg.work_dir.join("groups").join(format!("slot-{slot}")),
                }),
            };
            let spool = at.spool.clone();
            let kill = at.kill.subscribe();
            let engine = self.engine.clone();
            let ev = self.ev_tx.clone();
            let span = tracing::info_span!("attempt", task = %Self::task_name(&at.a), attempt = at.a.attempt, lease = %lease);
            let setup_error = match (prepared, env) {
                (Err(e), _) => Some(format!("cannot prepare the slot workspace: {e}")),
                (_, Err(e)) => Some(e),
                _ => None,
            };
            tokio::spawn(
                async move {
                    let outcome = match setup_error {
                        Some(error) => {
                            spool.close();
                            Outcome { exit_code: None, signal: None, timed_out: false, killed: false, runtime_ms: 0, error: Some(error) }
                        }
                        None => {
                            let ev2 = ev.clone();
                            let started = move || {
                                let _ = ev2.send(RunEvent::Started(lease));
                            };
                            match (container, engine) {
                                (None, _) => process::run(launch, spool, kill, move |_| started()).await,
                                (Some(c), Some(engine)) => {
                                    let ended = docker::run(engine, launch, c, spool, docker::Controls { kill, freeze }, started).await;
                                    if let Some(image) = ended.frozen {
                                        let _ = ev.send(RunEvent::Frozen(lease, image));
                                    }
                                    ended.outcome
                                }
                                (Some(_), None) => {
                                    spool.close();
                                    let error = "this worker has no Docker engine: it does not offer the docker executor".to_string();
                                    Outcome { exit_code: Some(125), signal: None, timed_out: false, killed: false, runtime_ms: 0, error: Some(error) }
                                }
                            }
                        }
                    };
                    tracing::debug!(exit = ?outcome.exit_code, "attempt ended");
                    let _ = ev.send(RunEvent::Exited(lease, outcome));
                }
                .instrument(span),
            );
            if let Some(l) = link.as_mut() {
                start_sender(l, lease, self.attempts.get(&lease).map(|a| a.spool.clone()));
            }
        }
    }

    async fn on_event(&mut self, ev: RunEvent, link: &mut Option<Link>) {
        match ev {
            RunEvent::Started(lease) => {
                // Said only of an attempt still running a moment later: a trivial job's
                // result says it all, a message and a store write sooner.
                let ev = self.ev_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(STARTED_AFTER).await;
                    let _ = ev.send(RunEvent::StillRunning(lease));
                });
            }
            RunEvent::StillRunning(lease) => {
                let running = self.attempts.get(&lease).is_some_and(|a| matches!(a.phase, Phase::Running));
                if let (true, Some(l)) = (running, link.as_mut()) {
                    l.send(&WorkerMsg::Started { lease }).await;
                }
            }
            RunEvent::Exited(lease, outcome) => {
                let Some(at) = self.attempts.get_mut(&lease) else { return };
                if let Some(slot) = at.slot.take() {
                    // Emptied now (what a job leaves is not kept), the directory kept.
                    if prepare_workspace(&self.cfg.work_dir.join("slots").join(slot.to_string())).is_ok() {
                        self.clean.insert(slot);
                    }
                    self.slots.release(slot);
                }
                if at.stale {
                    at.spool.remove();
                    self.drop_attempt(lease);
                } else {
                    at.phase = Phase::Done(outcome);
                    self.release(lease);
                }
                self.start_queued(link);
                self.want_more(link).await;
                self.maybe_finish(lease, link).await;
            }
            RunEvent::Frozen(lease, image) => {
                if let Some(at) = self.attempts.get_mut(&lease) {
                    at.frozen = Some(image);
                }
            }
            RunEvent::ImageRemoved(image, error) => {
                if let Some(l) = link.as_mut() {
                    l.send(&WorkerMsg::ImageRemoved { image, error }).await;
                }
            }
        }
    }

    /// Sends the result once every output chunk is acknowledged.
    async fn maybe_finish(&mut self, lease: LeaseId, link: &mut Option<Link>) {
        let Some(l) = link.as_mut() else { return };
        let Some(at) = self.attempts.get_mut(&lease) else { return };
        if at.finish_sent || at.stale || !at.spool.settled() {
            return;
        }
        if let Phase::Done(o) = &at.phase {
            let msg = match &at.frozen {
                Some(image) => WorkerMsg::Frozen { lease, image: image.clone(), outcome: o.clone() },
                None => WorkerMsg::Finished { lease, outcome: o.clone() },
            };
            at.finish_sent = l.send(&msg).await;
        }
    }

    /// Kills an attempt; a stale one is forgotten without a result.
    fn kill(&mut self, lease: LeaseId, reason: KillReason) {
        let Some(at) = self.attempts.get_mut(&lease) else { return };
        if reason == KillReason::StaleLease {
            at.stale = true;
        }
        match at.phase {
            Phase::Queued => {
                self.queue.retain(|l| *l != lease);
                at.spool.close();
                if at.stale {
                    at.spool.remove();
                    self.drop_attempt(lease);
                } else {
                    at.phase = Phase::Done(Outcome { exit_code: None, signal: None, timed_out: false, killed: true, runtime_ms: 0, error: None });
                }
            }
            Phase::Running => {
                tracing::info!(lease = %lease, ?reason, "killing attempt");
                let _ = at.kill.send(Some(reason));
            }
            Phase::Done(_) => {
                if at.stale {
                    at.spool.remove();
                    self.drop_attempt(lease);
                }
            }
        }
    }

    async fn on_frame(&mut self, m: CoordMsg, link: &mut Option<Link>) -> Result<(), WorkerError> {
        match m {
            CoordMsg::Assign(list) => {
                self.assign(list, link);
                self.start_queued(link);
            }
            CoordMsg::Kill { lease, reason } => {
                if reason == KillReason::StaleLease {
                    tracing::warn!(lease = %lease, "the coordinator refused this attempt's output or result as stale; killing the attempt and dropping its result");
                }
                self.kill(lease, reason);
                self.maybe_finish(lease, link).await;
            }
            CoordMsg::OutputAck { lease, stream, seq } => {
                if let Some(at) = self.attempts.get(&lease) {
                    at.spool.ack(stream, seq);
                }
                self.maybe_finish(lease, link).await;
            }
            CoordMsg::FinishedAck { lease, accepted } => {
                if !accepted {
                    tracing::warn!(lease = %lease, "the coordinator rejected this attempt's result (its lease was no longer valid)");
                    // An image nobody will know of: remove it.
                    if let (Some(image), Some(engine)) = (self.attempts.get(&lease).and_then(|a| a.frozen.clone()), self.engine.clone()) {
                        tokio::spawn(async move {
                            if let Err(e) = engine.remove_frozen_image(&image).await {
                                tracing::warn!(image = %image, error = %e, "cannot remove the image of a rejected freeze");
                            }
                        });
                    }
                }
                if let Some(at) = self.drop_attempt(lease) {
                    at.spool.remove();
                }
                if let Some(h) = link.as_mut().and_then(|l| l.senders.remove(&lease)) {
                    h.abort();
                }
            }
            CoordMsg::HeartbeatAck { stale } => {
                for lease in stale {
                    tracing::warn!(lease = %lease, "the coordinator says this lease is stale; killing the attempt");
                    self.kill(lease, KillReason::StaleLease);
                }
            }
            CoordMsg::Registered { .. } => {}
            CoordMsg::Refused { reason } => return Err(WorkerError::Refused(reason)),
            CoordMsg::Freeze { lease, tag } => match self.attempts.get_mut(&lease) {
                Some(at) if !matches!(at.phase, Phase::Done(_)) && matches!(at.a.spec.executor, berth_shared::job::Executor::Docker { .. }) => {
                    tracing::info!(lease = %lease, tag = %tag, "freezing attempt");
                    match &at.freeze {
                        Some(f) => {
                            let _ = f.send(Some(tag));
                        }
                        // Not started yet: it freezes as soon as its container runs.
                        None => at.freeze = Some(watch::channel(Some(tag)).0),
                    }
                }
                _ => tracing::warn!(lease = %lease, "asked to freeze an attempt that is not a running container here; ignored"),
            },
            CoordMsg::RemoveImage { image } => {
                let ev = self.ev_tx.clone();
                match self.engine.clone() {
                    Some(engine) => {
                        tokio::spawn(async move {
                            let r = engine.remove_frozen_image(&image).await;
                            match &r {
                                Ok(how) => tracing::info!(image = %image, ?how, "frozen image removed"),
                                Err(e) => tracing::warn!(image = %image, error = %e, "cannot remove a frozen image"),
                            }
                            let _ = ev.send(RunEvent::ImageRemoved(image, r.err()));
                        });
                    }
                    None => {
                        let _ = ev.send(RunEvent::ImageRemoved(image, Some("this worker has no Docker engine".into())));
                    }
                }
            }
        }
        Ok(())
    }

    /// Kills every attempt and waits (a bounded time) for their process groups to be
    /// gone, so a worker that stops leaves nothing running behind it.
    async fn kill_all(&mut self, ev_rx: &mut mpsc::UnboundedReceiver<RunEvent>) {
        for at in self.attempts.values() {
            let _ = at.kill.send(Some(KillReason::Cancelled));
        }
        let deadline = Instant::now() + GRACE + Duration::from_secs(3);
        while self.running() > 0 {
            match tokio::time::timeout_at(deadline, ev_rx.recv()).await {
                Ok(Some(RunEvent::Exited(lease, outcome))) => {
                    if let Some(at) = self.attempts.get_mut(&lease) {
                        at.phase = Phase::Done(outcome);
                    }
                }
                Ok(Some(RunEvent::Started(_) | RunEvent::StillRunning(_) | RunEvent::Frozen(..) | RunEvent::ImageRemoved(..))) => {}
                Ok(None) | Err(_) => {
                    tracing::warn!(running = self.running(), "attempts still running as the worker stops");
                    break;
                }
            }
        }
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
/// resolved here (never sent or stored), and BERTH_* facts.
fn job_env(a: &Assignment, gpus: &[GpuInfo], has_gpus: bool, slot: usize, workspace: &std::path::Path, worker: &str) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = a.spec.env.clone();
    if has_gpus || !gpus.is_empty() {
        // Only the GPUs it was given: a job that asked for none sees none, so two jobs
        // never share a GPU.
        let list = gpus.iter().map(|g| g.index.to_string()).collect::<Vec<_>>().join(",");
        env.push(("CUDA_VISIBLE_DEVICES".into(), list.clone()));
        env.push(("NVIDIA_VISIBLE_DEVICES".into(), if list.is_empty() { "none".into() } else { list }));
    }
    for (var, name) in &a.spec.secrets {
        match std::env::var(name) {
            Ok(v) => env.push((var.clone(), v)),
            Err(_) => return Err(format!("secret `{name}` is not set on worker {worker} (export it in the worker's environment)")),
        }
    }
    env.push(("BERTH_JOB_ID".into(), a.job.to_string()));
    env.push(("BERTH_ATTEMPT".into(), a.attempt.to_string()));
    env.push(("BERTH_SLOT".into(), slot.to_string()));
    env.push(("BERTH_WORKER".into(), worker.to_string()));
    env.push(("BERTH_WORKSPACE".into(), workspace.display().to_string()));
    if let Some(i) = a.index {
        env.push(("BERTH_ARRAY_INDEX".into(), i.to_string()));
    }
    Ok(env)
}

/// Streams an attempt's spooled output on its own uni stream, from the first chunk
/// not yet acknowledged. No stream is opened for an attempt that prints nothing.
fn start_sender(link: &mut Link, lease: LeaseId, spool: Option<Arc<Spool>>) {
    let Some(spool) = spool else { return };
    if link.senders.contains_key(&lease) {
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
                    if write_frame(&mut s, &OutputFrame::Open { lease }).await.is_err() {
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
    link.senders.insert(lease, h);
}

/// How one connection ended.
enum Ended {
    Shutdown,
    Lost(String),
}

/// Runs the worker until `shutdown` resolves.
pub async fn run(mut cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
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
    // Attempts of a previous run of this worker that was killed outright are still
    // running, unknown to anyone: their leases are lost, their results would be refused.
    let left_over = process::kill_left_over(&cfg.work_dir.join("groups"));
    if left_over > 0 {
        tracing::warn!(groups = left_over, "killed attempts left over from before this worker restarted");
    }
    let docker_asked = cfg.executors.iter().any(|e| e == "docker");
    let engine = docker_at_start(&mut cfg).await?;
    for d in ["spool", "slots", "groups", "containers"] {
        let p = cfg.work_dir.join(d);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|source| WorkerError::WorkDir { path: p.clone(), source })?;
    }
    let host = crate::host::detect_limited(&cfg.executors, &cfg.limits).map(|(h, _)| h).map_err(WorkerError::Setup)?;
    // `docker` says whether the engine answered, when the docker executor was asked for.
    let host = HostInfo { docker: engine.is_some() || (host.docker && !docker_asked), ..host };
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let free = FreeResources { millicpus: host.cpus.saturating_mul(1000), mem_mib: host.mem_mib, gpus: host.gpus.clone() };
    let mut state = State {
        slots: SlotTable::new(cfg.slots),
        clean: Default::default(),
        engine,
        cfg,
        host,
        free,
        lease_ttl: None,
        attempts: HashMap::new(),
        queue: VecDeque::new(),
        ev_tx,
    };
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    let endpoint = {
        let tls = client_config(&state.cfg.ca_pem, Some(&id)).map_err(|e| WorkerError::Setup(format!("--ca or certificate: {e}")))?;
        client_endpoint(tls, false).map_err(|source| WorkerError::WorkDir { path: state.cfg.work_dir.clone(), source })?
    };
    loop {
        let dialed = tokio::select! {
            d = dial(&endpoint, &state.cfg.coordinators, state.cfg.server_name.as_deref(), PeerKind::Worker, dial_timeout(state.lease_ttl)) => Some(d),
            _ = &mut shutdown => None,
        };
        match dialed {
            None => break,
            Some(Ok(d)) => {
                let addr = d.addr.clone();
                tracing::info!(coordinator = %addr, "connected");
                match session(&mut state, d, &mut ev_rx, &mut shutdown).await {
                    Ok(Ended::Shutdown) => break,
                    Ok(Ended::Lost(why)) => {
                        tracing::warn!(coordinator = %addr, reason = %why, "lost the coordinator; attempts keep running, reconnecting");
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        state.kill_all(&mut ev_rx).await;
                        return Err(e);
                    }
                }
            }
            Some(Err(e @ (berth_shared::dial::DialError::Refused { .. } | berth_shared::dial::DialError::Auth { .. }))) => {
                state.kill_all(&mut ev_rx).await;
                return Err(e.into());
            }
            Some(Err(e)) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach a coordinator"),
        }
        // Wait before the next try, still looking after running attempts.
        let jitter = Duration::from_millis(rand_jitter(backoff.as_millis() as u64 / 4));
        let sleep = tokio::time::sleep(backoff + jitter);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                Some(ev) = ev_rx.recv() => state.on_event(ev, &mut None).await,
                _ = &mut shutdown => {
                    state.kill_all(&mut ev_rx).await;
                    return Ok(());
                }
            }
        }
        backoff = (backoff * 2).min(max_backoff(state.lease_ttl));
    }
    state.kill_all(&mut ev_rx).await;
    Ok(())
}

/// Connects to the Docker engine if the docker executor is offered, and removes what an
/// earlier run of this worker left in it. An engine that does not answer means the
/// executor is not offered (a worker left with no executor at all does not start).
async fn docker_at_start(cfg: &mut WorkerConfig) -> Result<Option<docker::Engine>, WorkerError> {
    if !cfg.executors.iter().any(|e| e == "docker") {
        return Ok(None);
    }
    let cluster = docker::cluster_id(&cfg.ca_pem).map_err(|e| WorkerError::Setup(format!("--ca: {e}")))?;
    // For `berth-worker sweep`, which has no --ca.
    let path = cfg.work_dir.join(crate::sweep::CLUSTER_FILE);
    std::fs::write(&path, format!("{cluster}\n")).map_err(|source| WorkerError::WorkDir { path, source })?;
    let engine = match docker::Engine::connect(Duration::from_secs(10), cluster).await {
        Ok(e) => e,
        Err(e) => {
            cfg.executors.retain(|x| x != "docker");
            if cfg.executors.is_empty() {
                return Err(WorkerError::Setup(format!("{}: the docker executor cannot be offered and no other was asked for", berth_shared::logs::chain(&e))));
            }
            tracing::warn!(error = %berth_shared::logs::chain(&e), "not offering the docker executor");
            return Ok(None);
        }
    };
    let mut swept = crate::sweep::Swept::default();
    crate::sweep::containers(&engine, &cfg.name, &crate::sweep::Held::Nothing, crate::sweep::now_secs(), &mut swept).await;
    crate::sweep::images(&engine, &cfg.name, &mut swept).await;
    for line in &swept.removed {
        tracing::warn!(removed = %line, "swept what an earlier run of this worker left behind");
    }
    for line in &swept.failed {
        tracing::error!(error = %line, "sweep");
    }
    Ok(Some(engine))
}

fn rand_jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0);
    if max == 0 {
        0
    } else {
        nanos % max
    }
}

async fn session(
    state: &mut State,
    d: Dialed,
    ev_rx: &mut mpsc::UnboundedReceiver<RunEvent>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Ended, WorkerError> {
    let Dialed { conn, mut send, mut recv, .. } = d;
    let register = WorkerMsg::Register {
        name: state.cfg.name.clone(),
        slots: state.cfg.slots as u32,
        pool: state.cfg.pool.clone(),
        labels: state.cfg.labels.clone(),
        host: state.host.clone(),
        held: state.held(),
    };
    if write_frame(&mut send, &register).await.is_err() {
        return Ok(Ended::Lost("cannot register".into()));
    }
    let ttl = match tokio::time::timeout(Duration::from_secs(10), read_frame::<_, CoordMsg>(&mut recv)).await {
        Ok(Ok(Some(CoordMsg::Registered { lease_ttl_ms, stale }))) => {
            for lease in stale {
                tracing::warn!(lease = %lease, "the coordinator no longer knows this attempt; killing it");
                state.kill(lease, KillReason::StaleLease);
            }
            let ttl = Duration::from_millis(lease_ttl_ms.max(300));
            state.lease_ttl = Some(ttl);
            ttl
        }
        Ok(Ok(Some(CoordMsg::Refused { reason }))) => return Err(WorkerError::Refused(reason)),
        other => return Ok(Ended::Lost(format!("no registration answer ({})", if other.is_err() { "timed out".into() } else { format!("{other:?}") }))),
    };
    let (frames_tx, mut frames) = mpsc::unbounded_channel::<CoordMsg>();
    let reader = tokio::spawn(async move {
        while let Ok(Some(m)) = read_frame::<_, CoordMsg>(&mut recv).await {
            if frames_tx.send(m).is_err() {
                break;
            }
        }
    });
    let mut link = Some(Link { conn: conn.clone(), send, asked: 0, free_sent: None, senders: HashMap::new(), out: Vec::new() });
    // Resend what the coordinator has not acknowledged.
    let leases: Vec<LeaseId> = state.attempts.keys().copied().collect();
    for lease in leases {
        let Some(at) = state.attempts.get_mut(&lease) else { continue };
        at.finish_sent = false;
        if !matches!(at.phase, Phase::Queued) {
            let spool = at.spool.clone();
            if let Some(l) = link.as_mut() {
                start_sender(l, lease, Some(spool));
            }
        }
        state.maybe_finish(lease, &mut link).await;
    }
    state.start_queued(&mut link);
    state.want_more(&mut link).await;
    if let Some(l) = link.as_mut() {
        if !l.flush().await {
            return Ok(Ended::Lost("cannot send to the coordinator".into()));
        }
    }
    let mut beat = tokio::time::interval(ttl / 3);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeats sent since the coordinator last sent anything. Counted in ticks, not
    // time, so a worker that was itself suspended reads what arrived before judging.
    let mut unanswered = 0u32;
    let ended = loop {
        tokio::select! {
            m = frames.recv() => match m {
                Some(m) => {
                    unanswered = 0;
                    state.on_frame(m, &mut link).await?
                }
                None => break Ended::Lost(conn.close_reason().map(|r| berth_shared::dial::describe(&r)).unwrap_or_else(|| "control stream closed".into())),
            },
            Some(ev) = ev_rx.recv() => state.on_event(ev, &mut link).await,
            _ = beat.tick() => {
                if unanswered >= UNANSWERED_HEARTBEATS {
                    break Ended::Lost(format!("no answer to {unanswered} heartbeats ({:?} apart)", ttl / 3));
                }
                let leases = state.held();
                if let Some(l) = link.as_mut() {
                    if !l.send(&WorkerMsg::Heartbeat { leases }).await {
                        break Ended::Lost("cannot send a heartbeat".into());
                    }
                }
                unanswered += 1;
            }
            _ = shutdown.as_mut() => break Ended::Shutdown,
        }
        // Take what else is already waiting, then send everything this turn queued.
        for _ in 0..COALESCE {
            match frames.try_recv() {
                Ok(m) => {
                    unanswered = 0;
                    state.on_frame(m, &mut link).await?
                }
                Err(_) => break,
            }
        }
        for _ in 0..COALESCE {
            match ev_rx.try_recv() {
                Ok(ev) => state.on_event(ev, &mut link).await,
                Err(_) => break,
            }
        }
        if let Some(l) = link.as_mut() {
            if !l.flush().await {
                break Ended::Lost(conn.close_reason().map(|r| berth_shared::dial::describe(&r)).unwrap_or_else(|| "cannot send to the coordinator".into()));
            }
        }
    };
    reader.abort();
    drop(link);
    match &ended {
        Ended::Shutdown => conn.close(0u32.into(), b"worker shutting down"),
        Ended::Lost(_) => conn.close(0u32.into(), b"worker gave up on this connection"),
    }
    Ok(ended)
}
