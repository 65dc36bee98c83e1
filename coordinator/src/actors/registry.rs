//! WorkerRegistry: the connected workers, their slots, capabilities, leases,
//! heartbeats and drain flags; and the route to each worker's control stream.
//!
//! One connection holds a worker's name at a time (`Holder`, from its admission to its
//! end). A newer connection of the same process (its `instance`) replaces it; another
//! process presenting the same certificate (a copied work dir, a cloned machine) is
//! refused while the holder lives, and takes over only once the holder's transport has
//! been silent for `SILENT` (a crashed process's connection stays open until its idle
//! timeout). So two processes never evict each other in a loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use actix::prelude::*;
use berth_shared::ids::LeaseId;
use berth_shared::wire::{CoordMsg, HostInfo, KillReason, WorkerInfo};
use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;
use uuid::Uuid;

/// A live peer sends datagrams at least every keep-alive interval (2 s, each way, and
/// it acknowledges ours): a holder that sent none for this long is gone.
pub const SILENT: Duration = Duration::from_secs(5);

struct Entry {
    conn_id: u64,
    tx: Option<UnboundedSender<CoordMsg>>,
    slots: u32,
    pool: String,
    labels: Vec<(String, String)>,
    host: HostInfo,
    leases: HashSet<LeaseId>,
    last_heartbeat: Option<DateTime<Utc>>,
    drained: bool,
    slot_states: Vec<String>,
}

/// The connection that holds a worker's name, from its admission until it ends.
struct Holder {
    conn_id: u64,
    instance: Uuid,
    conn: quinn::Connection,
    /// Datagrams received on `conn` when last looked, and when.
    rx: (u64, Instant),
}

/// Whether a holder's process is still there, judged from the datagrams it sent.
#[derive(Debug, PartialEq)]
enum Alive {
    Yes,
    No {
        silent: Duration,
    },
    /// Not known yet: look again after this long.
    Unknown(Duration),
}

/// Whether a holder lives, from the datagrams it sent: `rx` is the count at the last
/// look and when, `seen` the count `now`.
fn alive(rx: &mut (u64, Instant), seen: u64, now: Instant) -> Alive {
    let quiet = now.saturating_duration_since(rx.1);
    match (seen != rx.0, quiet >= SILENT) {
        (false, true) => Alive::No { silent: quiet },
        (false, false) => Alive::Unknown(SILENT - quiet),
        (true, false) => Alive::Yes,
        // It spoke since a look long ago, which says nothing about now: look again.
        (true, true) => {
            *rx = (seen, now);
            Alive::Unknown(SILENT)
        }
    }
}

#[derive(Default)]
pub struct WorkerRegistry {
    workers: BTreeMap<String, Entry>,
    holders: HashMap<String, Holder>,
    /// Image removals asked of a worker, by (worker, image), waiting for its answer.
    removals: HashMap<(String, String), Vec<oneshot::Sender<Option<String>>>>,
}

impl Actor for WorkerRegistry {
    type Context = Context<Self>;
}

/// A worker's control stream is up.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub name: String,
    pub conn_id: u64,
    pub tx: UnboundedSender<CoordMsg>,
    pub slots: u32,
    pub pool: String,
    pub labels: Vec<(String, String)>,
    pub host: HostInfo,
    pub leases: Vec<LeaseId>,
    pub drained: bool,
}

impl Handler<Connect> for WorkerRegistry {
    type Result = ();
    fn handle(&mut self, m: Connect, _: &mut Self::Context) {
        // A connection admitted and then replaced before it got here holds nothing.
        if self.holders.get(&m.name).is_none_or(|h| h.conn_id != m.conn_id) {
            return;
        }
        self.workers.insert(
            m.name,
            Entry {
                conn_id: m.conn_id,
                tx: Some(m.tx),
                slots: m.slots,
                pool: m.pool,
                labels: m.labels,
                host: m.host,
                leases: m.leases.into_iter().collect(),
                last_heartbeat: Some(Utc::now()),
                drained: m.drained,
                slot_states: Vec::new(),
            },
        );
    }
}

/// A worker is registering on connection `conn_id` from process `instance`: this
/// connection becomes the one that holds the name, unless another process holds it
/// and lives. A connection it replaces (an older one of the same process, or one whose
/// process has gone silent) is closed now, before the new connection's leases are
/// reconciled, so it claims nothing more.
#[derive(Message)]
#[rtype(result = "Result<(), InUse>")]
pub struct Admit {
    pub name: String,
    pub conn_id: u64,
    pub instance: Uuid,
    pub conn: quinn::Connection,
    /// How long a refused process waits before it dials again while the holder lives.
    pub retry_live: Duration,
}

/// Why a worker process is refused for now, and when to try again.
#[derive(Debug)]
pub struct InUse {
    pub reason: String,
    pub retry_after: Duration,
}

impl Handler<Admit> for WorkerRegistry {
    type Result = Result<(), InUse>;
    fn handle(&mut self, m: Admit, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        if let Some(h) = self.holders.get_mut(&m.name).filter(|h| h.conn_id != m.conn_id && h.conn.close_reason().is_none()) {
            if h.instance == m.instance {
                h.conn.close(0u32.into(), b"replaced by a newer connection of the same worker");
            } else {
                let held = format!(
                    "worker {} is connected from {} as another process (instance {}) presenting the same certificate (a copied work dir or a cloned machine?)",
                    m.name,
                    h.conn.remote_address(),
                    h.instance
                );
                let fix = "give each worker its own work dir and --name";
                match alive(&mut h.rx, h.conn.stats().udp_rx.datagrams, now) {
                    Alive::Yes => {
                        tracing::warn!(worker = %m.name, holder = %h.instance, refused = %m.instance, from = %m.conn.remote_address(), "refused a second process of a connected worker");
                        let reason = format!("{held}; it is alive, so this one (instance {}) is refused: {fix}", m.instance);
                        return Err(InUse { reason, retry_after: m.retry_live.max(SILENT) });
                    }
                    Alive::Unknown(wait) => {
                        let reason = format!("{held}; this one (instance {}) waits to see whether that one is still there: {fix}", m.instance);
                        return Err(InUse { reason, retry_after: wait + Duration::from_millis(200) });
                    }
                    Alive::No { silent } => {
                        tracing::warn!(worker = %m.name, holder = %h.instance, ?silent, "a worker's connection went silent and another process of it connected: it takes over");
                        h.conn.close(0u32.into(), b"replaced: this connection went silent and another process of the same worker connected");
                    }
                }
            }
        }
        let rx = (m.conn.stats().udp_rx.datagrams, now);
        self.holders.insert(m.name.clone(), Holder { conn_id: m.conn_id, instance: m.instance, conn: m.conn, rx });
        // The replaced connection's route is gone; the new one's comes with `Connect`.
        if let Some(e) = self.workers.get_mut(&m.name) {
            e.tx = None;
        }
        Ok(())
    }
}

/// Why a worker name is in use, if it is: its connection is open, or it was heard from
/// within `ttl` (it may be on its way back). Asked when a worker enrols with that name.
#[derive(Message)]
#[rtype(result = "Option<String>")]
pub struct Held {
    pub name: String,
    pub ttl: Duration,
}

impl Handler<Held> for WorkerRegistry {
    type Result = Option<String>;
    fn handle(&mut self, m: Held, _: &mut Self::Context) -> Self::Result {
        if let Some(h) = self.holders.get(&m.name).filter(|h| h.conn.close_reason().is_none()) {
            return Some(format!("connected from {}", h.conn.remote_address()));
        }
        let heard = self.workers.get(&m.name).and_then(|e| e.last_heartbeat)?;
        let ago = (Utc::now() - heard).to_std().unwrap_or_default();
        (ago < m.ttl).then(|| format!("last heard from {} s ago", ago.as_secs()))
    }
}

/// A worker's connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub name: String,
    pub conn_id: u64,
}

impl Handler<Disconnect> for WorkerRegistry {
    type Result = ();
    fn handle(&mut self, m: Disconnect, _: &mut Self::Context) {
        if self.holders.get(&m.name).is_some_and(|h| h.conn_id == m.conn_id) {
            self.holders.remove(&m.name);
        }
        if let Some(e) = self.workers.get_mut(&m.name) {
            if e.conn_id == m.conn_id {
                e.tx = None;
                // Its answers will not come on this connection: whoever waits is told.
                self.removals.retain(|(w, _), _| *w != m.name);
            }
        }
    }
}

/// Leases handed to (`added`) or ended on (`removed`) a worker; renews its heartbeat.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leases {
    pub name: String,
    pub added: Vec<LeaseId>,
    pub removed: Vec<LeaseId>,
    pub heartbeat: bool,
}

impl Handler<Leases> for WorkerRegistry {
    type Result = ();
    fn handle(&mut self, m: Leases, _: &mut Self::Context) {
        if let Some(e) = self.workers.get_mut(&m.name) {
            e.leases.extend(m.added);
            for l in m.removed {
                e.leases.remove(&l);
            }
            if m.heartbeat {
                e.last_heartbeat = Some(Utc::now());
            }
        }
    }
}

impl WorkerRegistry {
    /// Sends a message to a connected worker; `false` when it is not connected.
    fn tell(&self, worker: &str, msg: CoordMsg) -> bool {
        match self.workers.get(worker).and_then(|e| e.tx.as_ref()) {
            Some(tx) => tx.send(msg).is_ok(),
            None => false,
        }
    }
}

/// Tell a worker to kill an attempt.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Kill {
    pub worker: String,
    pub lease: LeaseId,
    pub reason: KillReason,
}

impl Handler<Kill> for WorkerRegistry {
    type Result = bool;
    fn handle(&mut self, m: Kill, _: &mut Self::Context) -> bool {
        self.tell(&m.worker, CoordMsg::Kill { lease: m.lease, reason: m.reason })
    }
}

/// A message for a connected worker (a session's exec, its stdin, a kill of one exec);
/// `false` when the worker is not connected here.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Tell {
    pub worker: String,
    pub msg: CoordMsg,
}

impl Handler<Tell> for WorkerRegistry {
    type Result = bool;
    fn handle(&mut self, m: Tell, _: &mut Self::Context) -> bool {
        self.tell(&m.worker, m.msg)
    }
}

/// A worker said what state each of its slots is in.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SlotStates {
    pub name: String,
    pub states: Vec<String>,
}

impl Handler<SlotStates> for WorkerRegistry {
    type Result = ();
    fn handle(&mut self, m: SlotStates, _: &mut Self::Context) {
        if let Some(e) = self.workers.get_mut(&m.name) {
            // Bounded by what it registered with.
            e.slot_states = m.states.into_iter().take(e.slots as usize).map(|s| s.chars().take(200).collect()).collect();
        }
    }
}

/// The connection of a worker registered here, to open a stream on (a session's copy).
#[derive(Message)]
#[rtype(result = "Option<quinn::Connection>")]
pub struct ConnectionOf {
    pub worker: String,
}

impl Handler<ConnectionOf> for WorkerRegistry {
    type Result = Option<quinn::Connection>;
    fn handle(&mut self, m: ConnectionOf, _: &mut Self::Context) -> Self::Result {
        let live = self.workers.get(&m.worker).is_some_and(|e| e.tx.is_some());
        let h = self.holders.get(&m.worker)?;
        (live && self.workers.get(&m.worker).is_some_and(|e| e.conn_id == h.conn_id)).then(|| h.conn.clone())
    }
}

/// Record a drain flag change (the store holds the durable one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDrained {
    pub name: String,
    pub drained: bool,
}

impl Handler<SetDrained> for WorkerRegistry {
    type Result = ();
    fn handle(&mut self, m: SetDrained, _: &mut Self::Context) {
        if let Some(e) = self.workers.get_mut(&m.name) {
            e.drained = m.drained;
        }
    }
}

/// Ask the worker running an attempt to freeze it; `false` when it is not connected.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Freeze {
    pub worker: String,
    pub lease: LeaseId,
    pub tag: String,
}

impl Handler<Freeze> for WorkerRegistry {
    type Result = bool;
    fn handle(&mut self, m: Freeze, _: &mut Self::Context) -> bool {
        self.tell(&m.worker, CoordMsg::Freeze { lease: m.lease, tag: m.tag })
    }
}

/// Ask a worker to remove a frozen image from its engine. The answer (`None`: removed,
/// else why not) comes on the receiver; an error when the worker is not connected.
#[derive(Message)]
#[rtype(result = "Result<oneshot::Receiver<Option<String>>, String>")]
pub struct RemoveImage {
    pub worker: String,
    pub image: String,
}

impl Handler<RemoveImage> for WorkerRegistry {
    type Result = Result<oneshot::Receiver<Option<String>>, String>;
    fn handle(&mut self, m: RemoveImage, _: &mut Self::Context) -> Self::Result {
        let Some(tx) = self.workers.get(&m.worker).and_then(|e| e.tx.as_ref()) else {
            return Err(format!("worker {}, whose Docker engine holds {}, is not connected: start it and try again", m.worker, m.image));
        };
        if tx.send(CoordMsg::RemoveImage { image: m.image.clone() }).is_err() {
            return Err(format!("worker {} went away: try again", m.worker));
        }
        let (done, rx) = oneshot::channel();
        let waiting = self.removals.entry((m.worker, m.image)).or_default();
        waiting.retain(|w| !w.is_closed());
        waiting.push(done);
        Ok(rx)
    }
}

/// A worker's answer to `RemoveImage`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ImageRemoved {
    pub worker: String,
    pub image: String,
    pub error: Option<String>,
}

impl Handler<ImageRemoved> for WorkerRegistry {
    type Result = ();
    fn handle(&mut self, m: ImageRemoved, _: &mut Self::Context) {
        for done in self.removals.remove(&(m.worker, m.image)).unwrap_or_default() {
            let _ = done.send(m.error.clone());
        }
    }
}

/// Every worker known since start, connected or not, plus enrolled ones never seen.
#[derive(Message)]
#[rtype(result = "Vec<WorkerInfo>")]
pub struct List {
    /// Enrolled workers from the store, with their drain flags.
    pub enrolled: Vec<(String, bool)>,
}

impl Handler<List> for WorkerRegistry {
    type Result = MessageResult<List>;
    fn handle(&mut self, m: List, _: &mut Self::Context) -> Self::Result {
        let mut out: Vec<WorkerInfo> = self
            .workers
            .iter()
            .map(|(name, e)| WorkerInfo {
                name: name.clone(),
                connected: e.tx.is_some(),
                slots: e.slots,
                running: e.leases.len() as u32,
                drained: e.drained,
                pool: e.pool.clone(),
                labels: e.labels.clone(),
                host: e.host.clone(),
                leases: e.leases.iter().copied().collect(),
                last_heartbeat: e.last_heartbeat,
                slot_states: if e.tx.is_some() { e.slot_states.clone() } else { Vec::new() },
            })
            .collect();
        for (name, drained) in m.enrolled {
            if !self.workers.contains_key(&name) {
                out.push(WorkerInfo {
                    name,
                    connected: false,
                    slots: 0,
                    running: 0,
                    drained,
                    pool: String::new(),
                    labels: Vec::new(),
                    host: HostInfo::default(),
                    leases: Vec::new(),
                    last_heartbeat: None,
                    slot_states: Vec::new(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        MessageResult(out)
    }
}

/// Why no connected worker could run a job, if none could.
#[derive(Message)]
#[rtype(result = "Option<String>")]
pub struct Explain {
    pub spec: berth_shared::job::JobSpec,
}

impl Handler<Explain> for WorkerRegistry {
    type Result = Option<String>;
    fn handle(&mut self, m: Explain, _: &mut Self::Context) -> Self::Result {
        let caps: Vec<crate::scheduler::WorkerCaps> = self
            .workers
            .values()
            .filter(|e| e.tx.is_some())
            // Whether its pool is free matters only for jobs without a max runtime,
            // which the budget has already kept to free pools.
            .map(|e| crate::scheduler::WorkerCaps::of(&e.host, &e.pool, true, e.labels.clone()))
            .collect();
        crate::scheduler::explain_unrunnable(&m.spec, &caps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_lives_while_it_sends_and_is_gone_after_silent() {
        let t0 = Instant::now();
        let mut rx = (10, t0);
        // Nothing new yet, and not for long: not known.
        assert_eq!(alive(&mut rx, 10, t0 + Duration::from_secs(1)), Alive::Unknown(SILENT - Duration::from_secs(1)));
        // Datagrams since a recent look: alive.
        assert_eq!(alive(&mut rx, 12, t0 + Duration::from_secs(2)), Alive::Yes);
        // Datagrams since a look long ago say nothing about now: look again from here.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(alive(&mut rx, 40, t1), Alive::Unknown(SILENT));
        assert_eq!(rx, (40, t1));
        // Then nothing for SILENT: gone.
        assert_eq!(alive(&mut rx, 40, t1 + SILENT), Alive::No { silent: SILENT });
    }
}
