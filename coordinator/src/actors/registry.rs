//! WorkerRegistry: the connected workers, their slots, capabilities, leases,
//! heartbeats and drain flags; and the route to each worker's control stream.

use std::collections::{BTreeMap, HashMap, HashSet};

use actix::prelude::*;
use berth_shared::ids::LeaseId;
use berth_shared::wire::{CoordMsg, HostInfo, KillReason, WorkerInfo};
use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

struct Entry {
    conn_id: u64,
    conn: Option<quinn::Connection>,
    tx: Option<UnboundedSender<CoordMsg>>,
    slots: u32,
    pool: String,
    labels: Vec<(String, String)>,
    host: HostInfo,
    leases: HashSet<LeaseId>,
    last_heartbeat: Option<DateTime<Utc>>,
    drained: bool,
}

#[derive(Default)]
pub struct WorkerRegistry {
    workers: BTreeMap<String, Entry>,
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
    pub conn: quinn::Connection,
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
        if let Some(old) = self.workers.get(&m.name) {
            if let Some(conn) = &old.conn {
                if old.conn_id != m.conn_id {
                    conn.close(0u32.into(), b"replaced by a newer connection of the same worker");
                }
            }
        }
        self.workers.insert(
            m.name,
            Entry {
                conn_id: m.conn_id,
                conn: Some(m.conn),
                tx: Some(m.tx),
                slots: m.slots,
                pool: m.pool,
                labels: m.labels,
                host: m.host,
                leases: m.leases.into_iter().collect(),
                last_heartbeat: Some(Utc::now()),
                drained: m.drained,
            },
        );
    }
}

/// A worker is registering on connection `conn_id`: any other connection of the same
/// worker belongs to a process that is gone (or to a link it gave up on), so close it
/// now, before the new connection's leases are reconciled; a retired session claims
/// nothing more.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire {
    pub name: String,
    pub conn_id: u64,
}

impl Handler<Retire> for WorkerRegistry {
    type Result = ();
    fn handle(&mut self, m: Retire, _: &mut Self::Context) {
        if let Some(e) = self.workers.get_mut(&m.name) {
            if e.conn_id != m.conn_id {
                if let Some(conn) = e.conn.take() {
                    conn.close(0u32.into(), b"replaced by a newer connection of the same worker");
                }
                e.tx = None;
            }
        }
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
        if let Some(e) = self.workers.get_mut(&m.name) {
            if e.conn_id == m.conn_id {
                e.conn = None;
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
