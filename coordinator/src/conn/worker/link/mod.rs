//! A worker's link as a state machine: it takes what happened (a frame from the
//! worker, the store's answer to a claim, a result or a heartbeat, the work signal, a
//! timer) with `now`, and says what to do (ask the store, tell the registry, send a
//! frame, arm a timer, close). No I/O: the driver in `conn::worker` does that.
//!
//! Invariants:
//! - at most one claim is in flight per link, for no more than the worker asked for;
//! - nothing is claimed for a worker that has been silent for half a lease TTL (it
//!   heartbeats every third of one): a dead worker's connection, which the transport
//!   keeps open until its idle timeout, would otherwise claim the tasks its lost
//!   leases just sent back to the queue, and burn their attempts;
//! - a result the store calls stale is answered "not accepted" and its attempt is
//!   killed; a result the store could not record is not acknowledged (the worker
//!   resends it after a reconnect);
//! - what is handed out is taken from what the worker said it has free, until it says
//!   again.

use std::time::Duration;

use berth_shared::ids::LeaseId;
use berth_shared::job::Outcome;
use berth_shared::wire::{CoordMsg, KillReason, WorkerMsg};
use tokio::time::Instant;

use crate::store::{Claimed, FinishVerdict, Free, StoreError};

/// The most tasks a worker may have asked for and not yet received.
const MAX_WANTED: u32 = 100_000;
/// A spill-delay retry fires this long after the delay itself, so the task is due.
const RETRY_SLACK: Duration = Duration::from_millis(20);

/// Something that happened to the link.
#[derive(Debug)]
pub enum Input {
    Frame(WorkerMsg),
    Claimed {
        asked: u32,
        result: Result<Claimed, StoreError>,
    },
    Finished {
        lease: LeaseId,
        result: Result<FinishVerdict, StoreError>,
    },
    Renewed(Result<Vec<LeaseId>, StoreError>),
    ExecFinished {
        lease: LeaseId,
        exec: u32,
        result: Result<FinishVerdict, StoreError>,
    },
    /// The store committed something that may be claimable.
    Work,
    /// A spill-delay timer fired: claim again.
    Retry,
}

/// What the driver does, in order.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Ask the store for up to `n` tasks that fit `free`.
    Claim {
        n: u32,
        free: Option<Free>,
    },
    Started {
        lease: LeaseId,
    },
    Finish {
        lease: LeaseId,
        outcome: Outcome,
    },
    Frozen {
        lease: LeaseId,
        image: String,
        outcome: Outcome,
    },
    Heartbeat {
        leases: Vec<LeaseId>,
    },
    ExecFinish {
        lease: LeaseId,
        exec: u32,
        outcome: Outcome,
    },
    SlotStates(Vec<String>),
    ImageRemoved {
        image: String,
        error: Option<String>,
    },
    /// Tell the registry which leases this worker holds now.
    Leases {
        added: Vec<LeaseId>,
        removed: Vec<LeaseId>,
        heartbeat: bool,
    },
    Send(CoordMsg),
    /// Send `Input::Retry` after this long.
    RetryIn(Duration),
    /// Close the connection with this reason.
    Close(&'static str),
}

pub struct Link {
    /// Tasks the worker asked for and has not been given.
    wanted: u32,
    /// What the worker last said it has free (`WantFit`), less what was handed out since.
    free: Option<Free>,
    claiming: bool,
    /// Work may be claimable: a claim is worth making.
    hint: bool,
    retry_armed: bool,
    last_heard: Instant,
    quiet_limit: Duration,
    quiet_logged: bool,
}

impl Link {
    pub fn new(lease_ttl: Duration, now: Instant) -> Link {
        Link { wanted: 0, free: None, claiming: false, hint: true, retry_armed: false, last_heard: now, quiet_limit: lease_ttl / 2, quiet_logged: false }
    }

    /// A claim to make now, if one is due (the connection is still open).
    pub fn claim_due(&mut self, now: Instant, open: bool) -> Option<Action> {
        let silent = now.saturating_duration_since(self.last_heard);
        let quiet = silent > self.quiet_limit;
        if quiet && self.wanted > 0 && self.hint && !self.quiet_logged {
            tracing::debug!(?silent, "worker is silent; claiming nothing for it until it speaks");
        }
        self.quiet_logged = quiet;
        if self.wanted == 0 || self.claiming || !self.hint || quiet || !open {
            return None;
        }
        self.claiming = true;
        self.hint = false;
        Some(Action::Claim { n: self.wanted, free: self.free.clone() })
    }

    /// Handles one input; the actions go to `out`, in order.
    pub fn handle(&mut self, input: Input, now: Instant, out: &mut Vec<Action>) {
        match input {
            Input::Frame(m) => {
                self.last_heard = now;
                self.frame(m, out);
            }
            Input::Work => self.hint = true,
            Input::Retry => {
                self.retry_armed = false;
                self.hint = true;
            }
            Input::Claimed { asked, result } => self.claimed(asked, result, out),
            Input::Finished { lease, result } => {
                out.push(Action::Leases { added: vec![], removed: vec![lease], heartbeat: false });
                match result {
                    Ok(FinishVerdict::Stale) => {
                        tracing::warn!(lease = %lease, "rejected a result carrying a stale lease");
                        out.push(Action::Send(CoordMsg::FinishedAck { lease, accepted: false }));
                        out.push(Action::Send(CoordMsg::Kill { lease, reason: KillReason::StaleLease }));
                    }
                    Ok(_) => out.push(Action::Send(CoordMsg::FinishedAck { lease, accepted: true })),
                    // Not acknowledged: the worker resends after a reconnect.
                    Err(e) => tracing::error!(error = %e, lease = %lease, "cannot record a result"),
                }
            }
            Input::ExecFinished { lease, exec, result } => match result {
                Ok(FinishVerdict::Stale) => {
                    tracing::warn!(lease = %lease, exec, "rejected an exec's end carrying a stale lease");
                    out.push(Action::Send(CoordMsg::ExecFinishedAck { lease, exec }));
                    out.push(Action::Send(CoordMsg::Kill { lease, reason: KillReason::StaleLease }));
                }
                Ok(_) => out.push(Action::Send(CoordMsg::ExecFinishedAck { lease, exec })),
                // Not acknowledged: the worker sends it again after a reconnect.
                Err(e) => tracing::error!(error = %e, lease = %lease, exec, "cannot record an exec's end"),
            },
            Input::Renewed(r) => {
                // Leases that turned out stale are no longer this worker's.
                let removed = r.as_ref().map(|stale| stale.clone()).unwrap_or_default();
                out.push(Action::Leases { added: vec![], removed, heartbeat: true });
                match r {
                    Ok(stale) => {
                        for l in &stale {
                            tracing::warn!(lease = %l, "heartbeat for a lease this worker does not hold; telling it to kill that attempt");
                        }
                        out.push(Action::Send(CoordMsg::HeartbeatAck { stale }));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot renew leases"),
                }
            }
        }
    }

    fn frame(&mut self, m: WorkerMsg, out: &mut Vec<Action>) {
        match m {
            WorkerMsg::Want { n } => self.want(n, None),
            WorkerMsg::WantFit { n, free } => self.want(n, Some(free)),
            WorkerMsg::Started { lease } => out.push(Action::Started { lease }),
            WorkerMsg::Finished { lease, outcome } => out.push(Action::Finish { lease, outcome }),
            WorkerMsg::Heartbeat { leases } => out.push(Action::Heartbeat { leases }),
            WorkerMsg::ExecFinished { lease, exec, outcome } => out.push(Action::ExecFinish { lease, exec, outcome }),
            WorkerMsg::Slots { states } => out.push(Action::SlotStates(states)),
            WorkerMsg::Frozen { lease, image, outcome } => out.push(Action::Frozen { lease, image, outcome }),
            WorkerMsg::ImageRemoved { image, error } => out.push(Action::ImageRemoved { image, error }),
            WorkerMsg::Register { .. } => out.push(Action::Close("Register sent twice")),
        }
    }

    fn want(&mut self, n: u32, free: Option<Free>) {
        self.wanted = self.wanted.saturating_add(n).min(MAX_WANTED);
        if free.is_some() {
            self.free = free;
        }
        self.hint = true;
    }

    fn claimed(&mut self, asked: u32, result: Result<Claimed, StoreError>, out: &mut Vec<Action>) {
        self.claiming = false;
        let claimed = match result {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "claim failed");
                return;
            }
        };
        let got = claimed.tasks;
        // A full claim may have left more behind it; so may one that took some of a
        // bounded look at the queue.
        if got.len() as u32 == asked || claimed.more {
            self.hint = true;
        }
        if let Some(f) = self.free.as_mut() {
            for g in &got {
                f.take(&g.spec.resources);
            }
        }
        if let (Some(d), false) = (claimed.retry_in, self.retry_armed) {
            // A task is waiting for cheaper pools first: look again when its spill delay is over.
            self.retry_armed = true;
            out.push(Action::RetryIn(d + RETRY_SLACK));
        }
        self.wanted = self.wanted.saturating_sub(got.len() as u32);
        if !got.is_empty() {
            out.push(Action::Leases { added: got.iter().map(|g| g.lease).collect(), removed: vec![], heartbeat: false });
            out.push(Action::Send(CoordMsg::Assign(got)));
        }
    }
}

#[cfg(test)]
mod tests;
