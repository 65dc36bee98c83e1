//! The worker's session logic as a plain state machine: attempts, slots, resources set
//! aside, prefetch credit, heartbeats and the pace of reconnecting. No I/O: its methods
//! take what happened (a frame from the coordinator, a report from an executor, a timer)
//! and `now`, and queue [`Action`]s that the driver in `session/mod.rs` carries out.
//!
//! Invariants: an attempt holds a slot only while it is `Running`; resources are set
//! aside from its assignment until its process ends; a result is sent once per
//! connection and only once its output is all acknowledged; a stale attempt never sends
//! a result and is forgotten once it has ended; at most `slots + prefetch` tasks are
//! running, waiting or asked for.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::ids::LeaseId;
use berth_shared::job::Outcome;
use berth_shared::session::ExecSpec;
use berth_shared::wire::{Assignment, CoordMsg, FreeResources, GpuInfo, KillReason, WorkerMsg};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::executor::{Ended, Report};
use crate::slot::{to_request, SlotTable};
use crate::spool::Spool;
use crate::WorkerError;

/// How long an attempt runs before the coordinator is told it started (its process
/// start time, otherwise recorded from the result's runtime).
pub const STARTED_AFTER: Duration = Duration::from_millis(50);

/// Heartbeats in a row without any frame from the coordinator after which the link is
/// taken for dead (a heartbeat goes every third of the lease TTL).
pub const UNANSWERED_HEARTBEATS: u32 = 3;

/// The first wait before dialling again.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How long one dial may take: long enough for a busy coordinator's handshake, short
/// enough to try again several times within a lease TTL.
pub fn dial_timeout(ttl: Option<Duration>) -> Duration {
    ttl.map_or(Duration::from_secs(5), |t| (t / 2).clamp(Duration::from_secs(1), Duration::from_secs(5)))
}

/// The longest wait between dials.
pub fn max_backoff(ttl: Option<Duration>) -> Duration {
    ttl.map_or(Duration::from_secs(5), |t| (t / 8).clamp(Duration::from_millis(100), Duration::from_secs(5)))
}

#[derive(Debug)]
pub enum Phase {
    Queued,
    Running,
    Done(Outcome),
}

/// One attempt the worker holds.
pub struct Attempt {
    pub a: Assignment,
    /// The GPUs set aside for it (their indices are all the job sees).
    pub gpus: Vec<GpuInfo>,
    /// Whether its resources are still set aside (until its process ends).
    holds: bool,
    pub spool: Arc<Spool>,
    /// Asks its executor to kill it (the driver sends what `Action::Kill` says).
    pub kill: watch::Sender<Option<KillReason>>,
    /// Asks its executor to freeze it (the tag); a tag set before it runs is seen once it runs.
    pub freeze: watch::Sender<Option<String>>,
    pub phase: Phase,
    slot: Option<usize>,
    finish_sent: bool,
    stale: bool,
    /// The image a frozen attempt was committed to.
    frozen: Option<String>,
    /// Set when the attempt is a session: its execs and clocks.
    pub session: Option<SessionRun>,
}

impl Attempt {
    /// The slot it holds while it runs.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }
}

/// A session the worker holds: its execs, and when it goes by itself.
pub struct SessionRun {
    idle_ttl: Duration,
    max_lifetime: Duration,
    /// When its sandbox became ready.
    ready_at: Option<Instant>,
    /// Since when no exec has run (`None` while one does).
    idle_since: Option<Instant>,
    /// Why it is being closed by itself (its idle TTL or max lifetime), once it is.
    expired: Option<String>,
    pub execs: HashMap<u32, ExecRun>,
}

/// One exec of a session.
pub struct ExecRun {
    pub spec: ExecSpec,
    pub spool: Arc<Spool>,
    pub kill: watch::Sender<Option<KillReason>>,
    /// Its stdin (while open), and the other end, for the executor, until it starts.
    stdin: Option<mpsc::UnboundedSender<Vec<u8>>>,
    pub stdin_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>,
    done: Option<Outcome>,
    finish_sent: bool,
}

/// What the driver is to do, in order.
#[derive(Debug)]
pub enum Action {
    /// Queue a message for the coordinator (what one turn queues leaves in one write).
    Send(WorkerMsg),
    /// Start the attempt in this slot (its workspace, its executor).
    Start {
        lease: LeaseId,
        slot: usize,
    },
    /// Stream the attempt's spooled output on the connection, from the first chunk not
    /// acknowledged.
    Stream(LeaseId),
    /// As `Stream`, on a new stream in place of the attempt's current one (the
    /// coordinator could not store some of what it sent).
    Restream(LeaseId),
    Kill {
        lease: LeaseId,
        reason: KillReason,
    },
    Freeze {
        lease: LeaseId,
        tag: String,
    },
    /// The attempt is forgotten: stop streaming it and delete its spool file.
    Forget {
        lease: LeaseId,
        spool: Arc<Spool>,
    },
    /// Run an exec of a session (its spool and controls are in the attempt's session).
    Exec {
        lease: LeaseId,
        exec: u32,
    },
    /// Stream an exec's spooled output, from the first chunk not acknowledged
    /// (`restart`: on a new stream in place of its current one).
    StreamExec {
        lease: LeaseId,
        exec: u32,
        restart: bool,
    },
    /// An exec is forgotten: stop streaming it and delete its spool.
    ForgetExec {
        lease: LeaseId,
        exec: u32,
        spool: Arc<Spool>,
    },
    /// Empty the slot's workspace (its attempt ended).
    CleanSlot(usize),
    /// Remove a frozen image; with `report`, tell the coordinator how it went.
    RemoveImage {
        image: String,
        report: bool,
    },
}

/// What the current connection carries.
struct Link {
    /// Tasks asked for on this connection and not yet assigned.
    asked: usize,
    /// The free resources last reported on this connection.
    free_sent: Option<FreeResources>,
    /// Heartbeats sent since the coordinator last sent anything. Counted in beats, not
    /// time, so a worker that was itself suspended reads what arrived before judging.
    unanswered: u32,
    beat_at: Instant,
    beat_every: Duration,
}

pub struct State {
    slots: SlotTable,
    prefetch: usize,
    /// What is not set aside for running or waiting attempts.
    free: FreeResources,
    /// The lease TTL the coordinator last announced.
    lease_ttl: Option<Duration>,
    attempts: HashMap<LeaseId, Attempt>,
    queue: VecDeque<LeaseId>,
    link: Option<Link>,
    /// Attempts that started, and when to say so if they still run (in time order).
    started: VecDeque<(Instant, LeaseId)>,
    backoff: Duration,
    /// The worker stops: nothing more starts.
    stopping: bool,
    /// A session's slot changed state since the coordinator was last told.
    slots_changed: bool,
    actions: VecDeque<Action>,
}

impl State {
    pub fn new(slots: usize, prefetch: usize, free: FreeResources) -> State {
        State {
            slots: SlotTable::new(slots),
            prefetch,
            free,
            lease_ttl: None,
            attempts: HashMap::new(),
            queue: VecDeque::new(),
            link: None,
            started: VecDeque::new(),
            backoff: FIRST_BACKOFF,
            stopping: false,
            slots_changed: false,
            actions: VecDeque::new(),
        }
    }

    /// The next thing for the driver to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() && self.slots_changed {
            self.slots_changed = false;
            if self.link.is_some() {
                return Some(Action::Send(WorkerMsg::Slots { states: self.slot_states() }));
            }
        }
        self.actions.pop_front()
    }

    /// Each slot's state, as the coordinator is told.
    pub fn slot_states(&self) -> Vec<String> {
        self.slots.states().iter().map(ToString::to_string).collect()
    }

    /// Moves a slot, logging a move its table refuses (a bug: the state is kept).
    fn slot_to(&mut self, slot: usize, next: crate::slot::SlotState, session: bool) {
        if self.slots.state(slot) == &next {
            return;
        }
        if let Err(e) = self.slots.set(slot, next) {
            tracing::error!(error = %e, "a slot move the slot table refuses (a bug in berth)");
        }
        self.slots_changed |= session;
    }

    pub fn attempt(&self, lease: LeaseId) -> Option<&Attempt> {
        self.attempts.get(&lease)
    }

    pub fn lease_ttl(&self) -> Option<Duration> {
        self.lease_ttl
    }

    pub fn running(&self) -> usize {
        self.attempts.values().filter(|a| matches!(a.phase, Phase::Running)).count()
    }

    /// Leases the worker holds: everything not known to be stale.
    pub fn held(&self) -> Vec<LeaseId> {
        self.attempts.iter().filter(|(_, a)| !a.stale).map(|(l, _)| *l).collect()
    }

    /// The coordinator accepted a registration (a new connection): kill what it calls
    /// stale, resend what it has not acknowledged, start what waits, ask for more.
    pub fn registered(&mut self, now: Instant, lease_ttl_ms: u64, stale: Vec<LeaseId>) {
        for lease in stale {
            tracing::warn!(lease = %lease, "the coordinator no longer knows this attempt; killing it");
            self.kill(lease, KillReason::StaleLease);
        }
        let ttl = Duration::from_millis(lease_ttl_ms.max(300));
        self.lease_ttl = Some(ttl);
        // The first heartbeat goes at once.
        self.link = Some(Link { asked: 0, free_sent: None, unanswered: 0, beat_at: now, beat_every: ttl / 3 });
        let leases: Vec<LeaseId> = self.attempts.keys().copied().collect();
        for lease in leases {
            let Some(at) = self.attempts.get_mut(&lease) else { continue };
            at.finish_sent = false;
            if !matches!(at.phase, Phase::Queued) {
                self.actions.push_back(Action::Stream(lease));
            }
            if let Some(ses) = at.session.as_mut() {
                for (exec, run) in ses.execs.iter_mut() {
                    run.finish_sent = false;
                    self.actions.push_back(Action::StreamExec { lease, exec: *exec, restart: false });
                }
                let execs: Vec<u32> = ses.execs.keys().copied().collect();
                for exec in execs {
                    self.maybe_finish_exec(lease, exec);
                }
            }
            self.maybe_finish(lease);
        }
        self.start_queued();
        self.want_more();
    }

    /// The connection is gone; the next dial waits the shortest backoff.
    pub fn disconnected(&mut self) {
        self.link = None;
        self.backoff = FIRST_BACKOFF;
    }

    /// The coordinator refused this process for now (another process of this worker
    /// holds the name and lives): the next dial waits what it said.
    pub fn in_use(&mut self, retry_after: Duration) {
        self.link = None;
        self.backoff = retry_after.max(FIRST_BACKOFF);
    }

    /// When to dial again after a failed dial or a lost connection (`random` picks the
    /// jitter, up to a quarter of the wait); each wait doubles, up to `max_backoff`.
    pub fn retry_at(&mut self, now: Instant, random: u64) -> Instant {
        let quarter = self.backoff.as_millis() as u64 / 4;
        let jitter = if quarter == 0 { 0 } else { random % quarter };
        let at = now + self.backoff + Duration::from_millis(jitter);
        self.backoff = (self.backoff * 2).min(max_backoff(self.lease_ttl));
        at
    }

    /// When `timeout` is next due.
    pub fn next_timeout(&self) -> Option<Instant> {
        let started = self.started.front().map(|(t, _)| *t);
        let beat = self.link.as_ref().map(|l| l.beat_at);
        let sessions = self.attempts.values().filter_map(|a| a.session.as_ref()).filter_map(SessionRun::deadline).min();
        [started, beat, sessions].into_iter().flatten().min()
    }

    /// Sessions whose idle TTL or max lifetime has passed are closed.
    fn expire_sessions(&mut self, now: Instant) {
        let due: Vec<(LeaseId, String)> =
            self.attempts.iter().filter(|(_, a)| matches!(a.phase, Phase::Running)).filter_map(|(l, a)| Some((*l, a.session.as_ref()?.expiry(now)?))).collect();
        for (lease, why) in due {
            tracing::info!(lease = %lease, reason = %why, "closing a session by itself");
            if let Some(ses) = self.attempts.get_mut(&lease).and_then(|a| a.session.as_mut()) {
                ses.expired = Some(why);
            }
            self.kill(lease, KillReason::TimedOut);
        }
    }

    /// Timers: says which attempts still run `STARTED_AFTER` after they started, and
    /// heartbeats. `Err` (why) when the link is to be taken for dead.
    pub fn timeout(&mut self, now: Instant) -> Result<(), String> {
        self.expire_sessions(now);
        while let Some(&(at, lease)) = self.started.front() {
            if at > now {
                break;
            }
            self.started.pop_front();
            // Said only of an attempt still running a moment later: a trivial job's
            // result says it all, a message and a store write sooner.
            let running = self.attempts.get(&lease).is_some_and(|a| matches!(a.phase, Phase::Running));
            if running && self.link.is_some() {
                self.actions.push_back(Action::Send(WorkerMsg::Started { lease }));
            }
        }
        let Some(l) = self.link.as_mut() else { return Ok(()) };
        if now < l.beat_at {
            return Ok(());
        }
        if l.unanswered >= UNANSWERED_HEARTBEATS {
            return Err(format!("no answer to {} heartbeats ({:?} apart)", l.unanswered, l.beat_every));
        }
        l.unanswered += 1;
        l.beat_at = now + l.beat_every;
        let leases = self.held();
        self.actions.push_back(Action::Send(WorkerMsg::Heartbeat { leases }));
        self.actions.push_back(Action::Send(WorkerMsg::Slots { states: self.slot_states() }));
        Ok(())
    }

    /// A frame from the coordinator. `spool` makes an assigned attempt's spool (`None`:
    /// it could not, and the task is left to its lease's expiry).
    /// `spool` makes the spool of an attempt (exec 0) or of an exec of a session.
    pub fn frame(&mut self, _now: Instant, m: CoordMsg, mut spool: impl FnMut(LeaseId, u32) -> Option<Arc<Spool>>) -> Result<(), WorkerError> {
        if let Some(l) = self.link.as_mut() {
            l.unanswered = 0;
        }
        match m {
            CoordMsg::Assign(list) => {
                self.assign(list, |l| spool(l, 0));
                self.start_queued();
            }
            CoordMsg::Kill { lease, reason } => {
                if reason == KillReason::StaleLease {
                    tracing::warn!(lease = %lease, "the coordinator refused this attempt's output or result as stale; killing the attempt and dropping its result");
                }
                self.kill(lease, reason);
                self.maybe_finish(lease);
            }
            CoordMsg::OutputAck { lease, stream, seq } => {
                if let Some(at) = self.attempts.get(&lease) {
                    at.spool.ack(stream, seq);
                }
                self.maybe_finish(lease);
            }
            CoordMsg::FinishedAck { lease, accepted } => match self.attempts.get(&lease) {
                Some(at) if at.finish_sent => {
                    if !accepted {
                        tracing::warn!(lease = %lease, "the coordinator rejected this attempt's result (its lease was no longer valid)");
                        // An image nobody will know of: remove it.
                        if let Some(image) = at.frozen.clone() {
                            self.actions.push_back(Action::RemoveImage { image, report: false });
                        }
                    }
                    self.forget(lease);
                }
                Some(_) => tracing::warn!(lease = %lease, "an acknowledgement of a result not sent; ignored"),
                None => tracing::debug!(lease = %lease, "an acknowledgement of a result for an attempt not held; ignored"),
            },
            CoordMsg::HeartbeatAck { stale } => {
                for lease in stale {
                    tracing::warn!(lease = %lease, "the coordinator says this lease is stale; killing the attempt");
                    self.kill(lease, KillReason::StaleLease);
                }
            }
            CoordMsg::Registered { .. } => {}
            CoordMsg::Refused { reason } => return Err(WorkerError::Refused(reason)),
            CoordMsg::Freeze { lease, tag } => match self.attempts.get(&lease) {
                Some(at) if !matches!(at.phase, Phase::Done(_)) => self.actions.push_back(Action::Freeze { lease, tag }),
                _ => tracing::warn!(lease = %lease, "asked to freeze an attempt that is not a running container here; ignored"),
            },
            CoordMsg::RemoveImage { image } => self.actions.push_back(Action::RemoveImage { image, report: true }),
            CoordMsg::Resend { lease } => match self.attempts.get(&lease) {
                Some(at) if !matches!(at.phase, Phase::Queued) && !at.stale => {
                    tracing::info!(lease = %lease, "the coordinator asks for this attempt's unacknowledged output again");
                    self.actions.push_back(Action::Restream(lease));
                    for exec in at.session.iter().flat_map(|s| s.execs.keys()) {
                        self.actions.push_back(Action::StreamExec { lease, exec: *exec, restart: true });
                    }
                }
                _ => tracing::debug!(lease = %lease, "asked to resend output of an attempt not streaming here; ignored"),
            },
            CoordMsg::Exec { lease, exec, spec } => self.exec(lease, exec, spec, &mut spool),
            CoordMsg::ExecStdin { lease, exec, data, eof } => {
                if let Some(run) = self.exec_run(lease, exec) {
                    if let Some(tx) = run.stdin.as_ref() {
                        if !data.is_empty() {
                            let _ = tx.send(data);
                        }
                    }
                    if eof {
                        run.stdin = None;
                    }
                }
            }
            CoordMsg::KillExec { lease, exec } => {
                if let Some(run) = self.exec_run(lease, exec) {
                    tracing::info!(lease = %lease, exec, "killing an exec (its client went away)");
                    run.kill.send_replace(Some(KillReason::Cancelled));
                }
            }
            CoordMsg::ExecOutputAck { lease, exec, stream, seq } => {
                if let Some(run) = self.exec_run(lease, exec) {
                    run.spool.ack(stream, seq);
                }
                self.maybe_finish_exec(lease, exec);
            }
            CoordMsg::ExecFinishedAck { lease, exec } => {
                let gone = self.attempts.get_mut(&lease).and_then(|a| a.session.as_mut()).and_then(|s| s.execs.remove(&exec));
                if let Some(run) = gone {
                    self.actions.push_back(Action::ForgetExec { lease, exec, spool: run.spool });
                }
                self.maybe_finish(lease);
            }
            // Answered only to a registration, which the driver reads itself.
            CoordMsg::InUse { reason, .. } => {
                tracing::warn!(%reason, "the coordinator says another process holds this worker's identity; ignored once registered")
            }
        }
        Ok(())
    }

    /// A report from an executor.
    pub fn report(&mut self, now: Instant, r: Report) {
        match r {
            Report::Started(lease) => {
                let session = self.attempts.get_mut(&lease).and_then(|a| a.session.as_mut());
                match session {
                    // Said at once: whoever opened it is waiting.
                    Some(ses) => {
                        ses.ready_at = Some(now);
                        ses.idle_since = Some(now);
                        if self.link.is_some() {
                            self.actions.push_back(Action::Send(WorkerMsg::Started { lease }));
                        }
                    }
                    None if !self.stopping => self.started.push_back((now + STARTED_AFTER, lease)),
                    None => {}
                }
            }
            Report::ExecEnded(lease, exec, outcome) => {
                if let Some(ses) = self.attempts.get_mut(&lease).and_then(|a| a.session.as_mut()) {
                    if let Some(run) = ses.execs.get_mut(&exec) {
                        run.done = Some(outcome);
                        run.stdin = None;
                    }
                    let idle = ses.execs.values().all(|r| r.done.is_some());
                    if idle {
                        ses.idle_since = Some(now);
                    }
                    let slot =
                        self.attempts.get(&lease).and_then(|a| if idle && a.session.as_ref().is_some_and(|s| s.expired.is_none()) { a.slot } else { None });
                    if let Some(slot) = slot {
                        if self.slots.state(slot) == &crate::slot::SlotState::Executing {
                            self.slot_to(slot, crate::slot::SlotState::Acquired, true);
                        }
                    }
                }
                self.maybe_finish_exec(lease, exec);
            }
            Report::Ended(lease, ended) => self.ended(lease, ended),
            Report::ImageRemoved(image, error) => {
                if self.link.is_some() {
                    self.actions.push_back(Action::Send(WorkerMsg::ImageRemoved { image, error }));
                }
            }
        }
    }

    /// The worker stops: kill every running attempt; nothing more starts.
    pub fn stop(&mut self) {
        self.stopping = true;
        for (lease, at) in &self.attempts {
            if matches!(at.phase, Phase::Running) {
                self.actions.push_back(Action::Kill { lease: *lease, reason: KillReason::Cancelled });
            }
        }
    }

    fn ended(&mut self, lease: LeaseId, mut ended: Ended) {
        let Some(at) = self.attempts.get_mut(&lease) else { return };
        if let Some(why) = at.session.as_ref().and_then(|s| s.expired.clone()) {
            ended.outcome.timed_out = true;
            ended.outcome.killed = false;
            ended.outcome.error = Some(why);
        }
        if self.stopping {
            at.phase = Phase::Done(ended.outcome);
            return;
        }
        if ended.frozen.is_some() {
            at.frozen = ended.frozen;
        }
        if let Some(slot) = at.slot.take() {
            // Emptied now (what a job leaves is not kept), the directory kept.
            self.actions.push_back(Action::CleanSlot(slot));
            self.slots.release(slot);
            self.slots_changed |= at.session.is_some();
        }
        if at.stale {
            self.forget(lease);
        } else {
            at.phase = Phase::Done(ended.outcome);
            self.release(lease);
        }
        self.start_queued();
        self.want_more();
        self.maybe_finish(lease);
    }

    fn assign(&mut self, list: Vec<Assignment>, mut spool: impl FnMut(LeaseId) -> Option<Arc<Spool>>) {
        if let Some(l) = self.link.as_mut() {
            l.asked = l.asked.saturating_sub(list.len());
        }
        for a in list {
            let lease = a.lease;
            if self.attempts.contains_key(&lease) {
                tracing::warn!(lease = %lease, "assigned an attempt this worker already holds; ignored");
                continue;
            }
            let Some(spool) = spool(lease) else { continue };
            // The coordinator handed this out against what we said was free; set it aside.
            let (gpus, holds) = match self.free.take(&a.spec.resources) {
                Some(g) => (g, true),
                None => {
                    tracing::warn!(lease = %lease, "an assigned task does not fit what is free; it runs without resources set aside");
                    (Vec::new(), false)
                }
            };
            let attempt = Attempt {
                a,
                gpus,
                holds,
                spool,
                kill: watch::channel(None).0,
                freeze: watch::channel(None).0,
                phase: Phase::Queued,
                slot: None,
                finish_sent: false,
                stale: false,
                frozen: None,
                session: None,
            };
            let mut attempt = attempt;
            attempt.session = attempt.a.spec.session.as_ref().map(|s| SessionRun {
                idle_ttl: Duration::from_millis(s.idle_ttl_ms),
                max_lifetime: Duration::from_millis(s.max_lifetime_ms),
                ready_at: None,
                idle_since: None,
                expired: None,
                execs: HashMap::new(),
            });
            self.attempts.insert(lease, attempt);
            self.queue.push_back(lease);
        }
    }

    /// Starts queued attempts while slots are free.
    fn start_queued(&mut self) {
        if self.stopping {
            return;
        }
        while self.slots.free() > 0 {
            let Some(lease) = self.queue.pop_front() else { break };
            let Some(slot) = self.slots.acquire() else { break };
            let Some(at) = self.attempts.get_mut(&lease) else {
                self.slots.release(slot);
                continue;
            };
            at.slot = Some(slot);
            at.phase = Phase::Running;
            let session = at.session.is_some();
            self.actions.push_back(Action::Start { lease, slot });
            if session {
                // Held for the session, executing only while an exec runs.
                self.slots_changed = true;
            } else {
                self.slot_to(slot, crate::slot::SlotState::Executing, false);
            }
            if self.link.is_some() {
                self.actions.push_back(Action::Stream(lease));
            }
        }
    }

    fn want_more(&mut self) {
        let running = self.running();
        let Some(l) = self.link.as_mut() else { return };
        let n = to_request(self.slots.len(), self.prefetch, running, self.queue.len(), l.asked);
        // Ask for more, or say that resources came free (the coordinator claims
        // against what it was last told).
        if n > 0 || l.free_sent.as_ref() != Some(&self.free) {
            l.asked += n as usize;
            l.free_sent = Some(self.free.clone());
            self.actions.push_back(Action::Send(WorkerMsg::WantFit { n, free: self.free.clone() }));
        }
    }

    /// Sends the result once every output chunk is acknowledged.
    fn maybe_finish(&mut self, lease: LeaseId) {
        if self.link.is_none() {
            return;
        }
        let Some(at) = self.attempts.get_mut(&lease) else { return };
        if at.finish_sent || at.stale || !at.spool.settled() {
            return;
        }
        // A session's end goes after every exec's (acknowledged, then forgotten).
        if at.session.as_ref().is_some_and(|s| !s.execs.is_empty()) {
            return;
        }
        if let Phase::Done(o) = &at.phase {
            let msg = match &at.frozen {
                Some(image) => WorkerMsg::Frozen { lease, image: image.clone(), outcome: o.clone() },
                None => WorkerMsg::Finished { lease, outcome: o.clone() },
            };
            at.finish_sent = true;
            self.actions.push_back(Action::Send(msg));
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
                    self.forget(lease);
                } else {
                    at.phase = Phase::Done(Outcome { exit_code: None, signal: None, timed_out: false, killed: true, runtime_ms: 0, error: None });
                }
            }
            Phase::Running => {
                tracing::info!(lease = %lease, ?reason, "killing attempt");
                for run in at.session.iter().flat_map(|s| s.execs.values()) {
                    if run.done.is_none() {
                        run.kill.send_replace(Some(reason));
                    }
                }
                let session_slot = if at.session.is_some() { at.slot } else { None };
                self.actions.push_back(Action::Kill { lease, reason });
                if let Some(slot) = session_slot {
                    self.slot_to(slot, crate::slot::SlotState::Releasing, true);
                }
            }
            Phase::Done(_) => {
                if at.stale {
                    self.forget(lease);
                }
            }
        }
    }

    /// Forgets an attempt, gives back what was set aside for it, and has its spool deleted.
    fn forget(&mut self, lease: LeaseId) {
        self.release(lease);
        if let Some(at) = self.attempts.remove(&lease) {
            for (exec, run) in at.session.into_iter().flat_map(|s| s.execs) {
                self.actions.push_back(Action::ForgetExec { lease, exec, spool: run.spool });
            }
            self.actions.push_back(Action::Forget { lease, spool: at.spool });
        }
    }

    fn exec_run(&mut self, lease: LeaseId, exec: u32) -> Option<&mut ExecRun> {
        self.attempts.get_mut(&lease)?.session.as_mut()?.execs.get_mut(&exec)
    }

    /// The coordinator asks for an exec in a session this worker holds.
    fn exec(&mut self, lease: LeaseId, exec: u32, spec: ExecSpec, spool: &mut impl FnMut(LeaseId, u32) -> Option<Arc<Spool>>) {
        let refuse = |why: &str| berth_shared::job::Outcome {
            exit_code: None,
            signal: None,
            timed_out: false,
            killed: false,
            runtime_ms: 0,
            error: Some(why.to_string()),
        };
        let at = self.attempts.get_mut(&lease);
        let why = match &at {
            None => Some("the session is not held by this worker"),
            Some(a) if a.stale => Some("the session's lease is no longer valid"),
            Some(a) if !matches!(a.phase, Phase::Running) => Some("the session is not open"),
            Some(a) => match &a.session {
                None => Some("the lease is a job's, not a session's"),
                Some(s) if s.expired.is_some() => Some("the session is closing"),
                Some(s) if s.ready_at.is_none() => Some("the session is still opening"),
                Some(s) if s.execs.contains_key(&exec) => return,
                Some(s) if s.execs.len() >= berth_shared::session::MAX_CONCURRENT_EXECS => Some("the session runs the most execs it may at once"),
                Some(_) => None,
            },
        };
        if let Some(why) = why {
            tracing::warn!(lease = %lease, exec, reason = why, "refusing an exec");
            if self.link.is_some() {
                self.actions.push_back(Action::Send(WorkerMsg::ExecFinished { lease, exec, outcome: refuse(why) }));
            }
            return;
        }
        let Some(file) = spool(lease, exec) else {
            if self.link.is_some() {
                self.actions.push_back(Action::Send(WorkerMsg::ExecFinished { lease, exec, outcome: refuse("the worker cannot spool its output") }));
            }
            return;
        };
        let Some(ses) = self.attempts.get_mut(&lease).and_then(|a| a.session.as_mut()) else { return };
        let (stdin, stdin_rx) = if spec.stdin {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        ses.idle_since = None;
        ses.execs.insert(
            exec,
            ExecRun { spec, spool: file, kill: watch::channel(None).0, stdin, stdin_rx: std::sync::Mutex::new(stdin_rx), done: None, finish_sent: false },
        );
        self.actions.push_back(Action::Exec { lease, exec });
        if self.link.is_some() {
            self.actions.push_back(Action::StreamExec { lease, exec, restart: false });
        }
        if let Some(slot) = self.attempts.get(&lease).and_then(|a| a.slot) {
            self.slot_to(slot, crate::slot::SlotState::Executing, true);
        }
    }

    /// Sends an exec's end once its output is all acknowledged.
    fn maybe_finish_exec(&mut self, lease: LeaseId, exec: u32) {
        if self.link.is_none() {
            return;
        }
        let Some(at) = self.attempts.get_mut(&lease) else { return };
        if at.stale {
            return;
        }
        let Some(run) = at.session.as_mut().and_then(|s| s.execs.get_mut(&exec)) else { return };
        if run.finish_sent || !run.spool.settled() {
            return;
        }
        if let Some(outcome) = run.done.clone() {
            run.finish_sent = true;
            self.actions.push_back(Action::Send(WorkerMsg::ExecFinished { lease, exec, outcome }));
        }
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
}

impl SessionRun {
    /// When it closes by itself next, if nothing happens meanwhile.
    fn deadline(&self) -> Option<Instant> {
        let ready = self.ready_at?;
        if self.expired.is_some() {
            return None;
        }
        let lifetime = ready + self.max_lifetime;
        Some(match self.idle_since {
            Some(idle) => lifetime.min(idle + self.idle_ttl),
            None => lifetime,
        })
    }

    /// Why it closes by itself now, if it does.
    fn expiry(&self, now: Instant) -> Option<String> {
        let ready = self.ready_at?;
        if self.expired.is_some() {
            return None;
        }
        let fmt = berth_shared::duration::format_duration;
        if now >= ready + self.max_lifetime {
            return Some(format!("expired: it reached its max lifetime of {}", fmt(self.max_lifetime)));
        }
        match self.idle_since {
            Some(idle) if now >= idle + self.idle_ttl => Some(format!("expired: no exec ran for its idle TTL of {}", fmt(self.idle_ttl))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
