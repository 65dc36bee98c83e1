//! Where a Docker session's container comes from when it is not made for the session
//! as it opens.
//!
//! A warm pool (`--warm IMG=N`) keeps N containers of an image started, each with its
//! agent ready and an empty workspace directory of its own, and no session. Opening a
//! session of that image (no GPUs, no network) takes one: its workspace directory is
//! renamed onto the slot's (the container's bind mount follows the directory), its
//! limits are set to the session's, and a replacement starts in the background. A warm
//! container carries berth's labels (`berth.role=warm`, a lease of its own that the
//! worker records in `containers/`), so the sweep treats it as any other; the worker
//! removes the idle ones as it stops.
//!
//! A pack (`--docker-pack N`) is one container shared by up to N sessions of one owner,
//! one image and one network (no GPUs). Its members' workspaces are directories of one
//! host directory bound at `/workspaces`, one per slot; the container's limits are the
//! sum of its members' resources and follow them as they join and leave. The agent
//! marks each member's processes (`BERTH_PACK_MEMBER`), so a member that leaves (close,
//! idle TTL, lost lease) ends all its processes and nothing of a neighbour's; the last
//! one's leaving removes the container.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_shared::ids::LeaseId;
use berth_shared::job::Executor;
use berth_shared::wire::Assignment;
use bollard::query_parameters::InspectContainerOptions;
use tokio::sync::watch;

use super::container::{stop, wait_exit};
use super::session::{remove, resize, run_dir, start_sandbox, ImageCfg, SOCKET};
use super::{ContainerSpec, Engine, LABEL_CLUSTER, LABEL_LEASE, LABEL_MANAGED, LABEL_ROLE, LABEL_WORKER, WORKSPACE_IN_CONTAINER};
use crate::agent::proto::Request;

/// Where a pack's members' workspaces are in its container (`/workspaces/<slot>`).
pub const PACK_ROOT_IN_CONTAINER: &str = "/workspaces";
/// The longest wait before a warm container that could not be made is tried again.
const RETRY_AT_MOST: Duration = Duration::from_secs(300);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The labels of a container berth keeps outside any attempt (`role`: warm, pack),
/// under a lease of its own (`tag`, recorded in `containers/`).
fn own_labels(worker: &str, cluster: &str, role: &str, tag: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "1".to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
        (LABEL_LEASE.to_string(), tag.to_string()),
        (LABEL_WORKER.to_string(), worker.to_string()),
        (LABEL_CLUSTER.to_string(), cluster.to_string()),
    ])
}

/// A started container with its agent ready, waiting for a session.
pub struct Sandbox {
    pub name: String,
    /// The agent's directory (its socket; the worker's record of the container).
    pub dir: PathBuf,
    /// The workspace directory bound at `/workspace`.
    pub ws: PathBuf,
    pub image: ImageCfg,
    /// The container's cgroup, where a session's limits are set at once (the engine is
    /// told after, for its own record).
    pub cgroup: Option<crate::contain::SlotCgroup>,
    /// Notices the container ending while it waits.
    watch: Option<tokio::task::JoinHandle<()>>,
}

/// The warm pools of this worker's Docker executor.
pub struct Warm {
    engine: Engine,
    worker: String,
    pids_limit: i64,
    containers: PathBuf,
    root: PathBuf,
    want: Vec<(String, usize)>,
    idle: Mutex<HashMap<String, Vec<Sandbox>>>,
    stopping: AtomicBool,
}

impl Warm {
    /// `root`: where the warm containers' workspaces are (`<work dir>/warm`).
    pub fn new(engine: Engine, worker: String, pids_limit: i64, containers: PathBuf, root: PathBuf, want: Vec<(String, usize)>) -> Arc<Warm> {
        Arc::new(Warm { engine, worker, pids_limit, containers, root, want, idle: Mutex::default(), stopping: AtomicBool::new(false) })
    }

    /// Starts filling every pool (in the background).
    pub fn fill(self: &Arc<Self>) {
        for (image, n) in &self.want {
            tracing::info!(image = %image, n, "filling the warm pool");
            for _ in 0..*n {
                self.refill(image.clone(), Duration::ZERO);
            }
        }
    }

    /// A warm container for a session of `c`, if one of its image waits and the session
    /// can use it (no GPUs, no network: those are fixed when a container is made).
    pub fn take(self: &Arc<Self>, c: &ContainerSpec) -> Option<Sandbox> {
        if !c.gpus.is_empty() || c.network != "none" {
            return None;
        }
        let mut sandbox = {
            let mut idle = lock(&self.idle);
            let list = idle.get_mut(&c.image)?;
            // A frozen image fills its workspace by a rename, which a mounted one cannot take.
            if list.last()?.image.workspace.is_some() {
                return None;
            }
            list.pop()?
        };
        if let Some(w) = sandbox.watch.take() {
            w.abort();
        }
        self.refill(c.image.clone(), Duration::ZERO);
        Some(sandbox)
    }

    /// Makes one warm container of `image` after `delay`, trying again (waiting twice as
    /// long each time, up to `RETRY_AT_MOST`) while it fails.
    fn refill(self: &Arc<Self>, image: String, delay: Duration) {
        let warm = self.clone();
        tokio::spawn(async move {
            let mut wait = delay;
            loop {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                if warm.stopping.load(Ordering::Acquire) {
                    return;
                }
                match warm.make(&image).await {
                    Ok(s) => return warm.keep(image, s),
                    Err(e) => {
                        wait = (wait * 2).clamp(Duration::from_secs(1), RETRY_AT_MOST);
                        tracing::warn!(image = %image, error = %e, retry_in = ?wait, "cannot start a warm container");
                    }
                }
            }
        });
    }

    async fn make(&self, image: &str) -> Result<Sandbox, String> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let tag = format!("warm-{id}");
        let c = ContainerSpec {
            name: format!("berth-{tag}"),
            image: image.to_string(),
            network: "none".into(),
            nano_cpus: None,
            memory_bytes: None,
            pids_limit: self.pids_limit,
            gpus: Vec::new(),
            labels: own_labels(&self.worker, self.engine.cluster(), "warm", &tag),
            worker: self.worker.clone(),
            cluster: self.engine.cluster().to_string(),
            job: String::new(),
        };
        let (dir, ws) = (run_dir(&self.containers, &tag), self.root.join(&id));
        std::fs::create_dir_all(&ws).map_err(|e| format!("cannot make {}: {e}", ws.display()))?;
        match start_sandbox(&self.engine, &c, (&ws, WORKSPACE_IN_CONTAINER), &dir, Vec::new(), None).await {
            Ok(image) => {
                let cgroup = match self.engine.client().inspect_container(&c.name, None::<InspectContainerOptions>).await {
                    Ok(i) => match i.state.and_then(|s| s.pid).filter(|p| *p > 0) {
                        Some(pid) => crate::contain::SlotCgroup::of_process(pid as i32)
                            .map_err(|e| tracing::debug!(error = %e, "a warm container's limits go through the engine"))
                            .ok(),
                        None => None,
                    },
                    Err(_) => None,
                };
                Ok(Sandbox { name: c.name, dir, ws, image, cgroup, watch: None })
            }
            Err(e) => {
                remove(&self.engine, &c.name, &dir).await;
                let _ = std::fs::remove_dir_all(&ws);
                Err(e)
            }
        }
    }

    /// Puts a made container in its pool, watched: one that ends while it waits is
    /// removed and replaced.
    fn keep(self: &Arc<Self>, image: String, mut s: Sandbox) {
        if self.stopping.load(Ordering::Acquire) {
            let engine = self.engine.clone();
            tokio::spawn(async move {
                remove(&engine, &s.name, &s.dir).await;
                let _ = std::fs::remove_dir_all(&s.ws);
            });
            return;
        }
        let (warm, name, img) = (self.clone(), s.name.clone(), image.clone());
        s.watch = Some(tokio::spawn(async move {
            let r = wait_exit(warm.engine.client(), &name).await;
            let gone = {
                let mut idle = lock(&warm.idle);
                let list = idle.entry(img.clone()).or_default();
                list.iter().position(|s| s.name == name).map(|i| list.swap_remove(i))
            };
            if let Some(s) = gone {
                tracing::warn!(container = %name, ended = ?r, "a warm container ended while it waited; replacing it");
                remove(&warm.engine, &s.name, &s.dir).await;
                let _ = std::fs::remove_dir_all(&s.ws);
                warm.refill(img, Duration::from_secs(1));
            }
        }));
        tracing::debug!(container = %s.name, image = %image, "warm container ready");
        lock(&self.idle).entry(image).or_default().push(s);
    }

    /// Removes every idle warm container (the worker is stopping); none is made after.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let all: Vec<Sandbox> = lock(&self.idle).drain().flat_map(|(_, v)| v).collect();
        for mut s in all {
            if let Some(w) = s.watch.take() {
                w.abort();
            }
            remove(&self.engine, &s.name, &s.dir).await;
            let _ = std::fs::remove_dir_all(&s.ws);
        }
    }
}

/// Which sessions may share a container: one owner, one image, one network.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PackKey {
    owner: String,
    image: String,
    network: String,
}

/// How far a pack's container is.
#[derive(Clone, Debug)]
enum PackState {
    Starting,
    Ready(ImageCfg),
    Gone(String),
}

/// What a member adds to its pack's limits.
#[derive(Clone, Copy, Debug)]
struct Share {
    nano_cpus: Option<i64>,
    memory: Option<i64>,
}

/// One packed container and its members.
pub struct Pack {
    key: PackKey,
    /// The container's name (`berth-pack-<id>`).
    pub name: String,
    /// Its agent's directory (`containers/pack-<id>`).
    pub dir: PathBuf,
    /// The host directory bound at `/workspaces` (`packs/<id>`).
    pub ws_root: PathBuf,
    tag: String,
    members: Mutex<Members>,
    creating: AtomicBool,
    state: watch::Sender<PackState>,
    /// One change of the limits at a time, each from the members of its moment.
    resizing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Members {
    by_lease: HashMap<LeaseId, Share>,
    /// No member joins once the last has left.
    closed: bool,
}

impl Pack {
    /// Resolves with why once its container is gone (never before).
    pub async fn gone(&self) -> String {
        let mut rx = self.state.subscribe();
        loop {
            if let PackState::Gone(why) = &*rx.borrow_and_update() {
                return why.clone();
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The container's limits for its members now: the sums of theirs (unlimited when
    /// one of them is), the pids limit once per member.
    fn limits(&self, pids_limit: i64) -> (Option<i64>, Option<i64>, i64) {
        let m = lock(&self.members);
        let sum = |f: fn(&Share) -> Option<i64>| m.by_lease.values().map(f).try_fold(0i64, |a, v| v.map(|v| a.saturating_add(v)));
        let n = m.by_lease.len().max(1) as i64;
        (sum(|s| s.nano_cpus), sum(|s| s.memory), pids_limit.saturating_mul(n))
    }
}

/// The packs of this worker's Docker executor.
pub struct Packs {
    /// Members per container at most (below 2: no packing).
    max: usize,
    root: PathBuf,
    containers: PathBuf,
    worker: String,
    pids_limit: i64,
    table: Mutex<PackTable>,
}

#[derive(Default)]
struct PackTable {
    open: Vec<Arc<Pack>>,
    by_lease: HashMap<LeaseId, Arc<Pack>>,
}

impl Packs {
    /// `root`: where the packs' workspace directories are (`<work dir>/packs`).
    pub fn new(max: usize, root: PathBuf, containers: PathBuf, worker: String, pids_limit: i64) -> Arc<Packs> {
        Arc::new(Packs { max, root, containers, worker, pids_limit, table: Mutex::default() })
    }

    /// Whether `workspace` is a packed member's.
    pub fn holds(&self, workspace: &Path) -> bool {
        self.max > 1 && workspace.starts_with(&self.root)
    }

    /// Places a session that may be packed in a pack with room (or a new one), and
    /// returns its workspace there; `None`: it is not packed.
    pub fn place(&self, a: &Assignment, slot: usize) -> Option<PathBuf> {
        let Executor::Docker { image, network } = &a.spec.executor else { return None };
        if self.max < 2 || a.spec.session.is_none() || a.spec.resources.gpus > 0 {
            return None;
        }
        let key = PackKey { owner: a.owner.clone(), image: image.clone(), network: network.clone().unwrap_or_else(|| "none".into()) };
        let r = &a.spec.resources;
        let share = Share {
            nano_cpus: (r.millicpus > 0).then(|| i64::from(r.millicpus) * 1_000_000),
            memory: (r.mem_mib > 0).then(|| (r.mem_mib as i64).saturating_mul(1024 * 1024)),
        };
        let mut t = lock(&self.table);
        let room = t.open.iter().find(|p| {
            let m = lock(&p.members);
            p.key == key && !m.closed && m.by_lease.len() < self.max && !matches!(&*p.state.borrow(), PackState::Gone(_))
        });
        let pack = match room {
            Some(p) => p.clone(),
            None => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let tag = format!("pack-{id}");
                let p = Arc::new(Pack {
                    key,
                    name: format!("berth-{tag}"),
                    dir: run_dir(&self.containers, &tag),
                    ws_root: self.root.join(&id),
                    tag,
                    members: Mutex::default(),
                    creating: AtomicBool::new(false),
                    state: watch::Sender::new(PackState::Starting),
                    resizing: tokio::sync::Mutex::new(()),
                });
                tracing::debug!(pack = %p.name, "a new packed container");
                t.open.push(p.clone());
                p
            }
        };
        lock(&pack.members).by_lease.insert(a.lease, share);
        t.by_lease.insert(a.lease, pack.clone());
        Some(pack.ws_root.join(slot.to_string()))
    }

    /// The pack a session was placed in.
    pub fn of(&self, lease: LeaseId) -> Option<Arc<Pack>> {
        lock(&self.table).by_lease.get(&lease).cloned()
    }

    /// Joins a member to its pack's container: the first one makes it, the others wait
    /// for it; then the limits are set for everyone placed so far.
    pub async fn join(&self, engine: &Engine, pack: &Arc<Pack>, c: &ContainerSpec) -> Result<ImageCfg, String> {
        if !pack.creating.swap(true, Ordering::AcqRel) {
            let (nano_cpus, memory_bytes, pids_limit) = pack.limits(self.pids_limit);
            let spec = ContainerSpec {
                name: pack.name.clone(),
                labels: own_labels(&self.worker, engine.cluster(), "pack", &pack.tag),
                nano_cpus,
                memory_bytes,
                pids_limit,
                gpus: Vec::new(),
                network: pack.key.network.clone(),
                ..c.clone()
            };
            let _ = std::fs::create_dir_all(&pack.ws_root);
            let made = start_sandbox(engine, &spec, (&pack.ws_root, PACK_ROOT_IN_CONTAINER), &pack.dir, Vec::new(), None).await;
            match made {
                Ok(image) => {
                    tracing::info!(pack = %pack.name, image = %c.image, "packed container started");
                    pack.state.send_replace(PackState::Ready(image));
                    let (engine, watched) = (engine.clone(), pack.clone());
                    tokio::spawn(async move {
                        let why = match wait_exit(engine.client(), &watched.name).await {
                            Ok(code) => format!("the packed container ended (exit code {code})"),
                            Err(e) => format!("lost track of the packed container: {e}"),
                        };
                        watched.state.send_replace(PackState::Gone(why));
                    });
                }
                Err(e) => {
                    pack.state.send_replace(PackState::Gone(e));
                }
            }
        }
        let mut rx = pack.state.subscribe();
        let image = loop {
            match &*rx.borrow_and_update() {
                PackState::Starting => {}
                PackState::Ready(image) => break image.clone(),
                PackState::Gone(why) => return Err(why.clone()),
            }
            if rx.changed().await.is_err() {
                return Err("the packed container was dropped".into());
            }
        };
        self.resize(engine, pack).await?;
        Ok(image)
    }

    async fn resize(&self, engine: &Engine, pack: &Pack) -> Result<(), String> {
        let _one = pack.resizing.lock().await;
        let (nano, mem, pids) = pack.limits(self.pids_limit);
        resize(engine, &pack.name, nano, mem, pids).await
    }

    /// A member leaves its pack: its processes end; the last one's leaving stops and
    /// removes the container.
    pub async fn leave(&self, engine: &Engine, lease: LeaseId, grace: Duration) {
        let (pack, last) = {
            let mut t = lock(&self.table);
            let Some(pack) = t.by_lease.remove(&lease) else { return };
            let last = {
                let mut m = lock(&pack.members);
                m.by_lease.remove(&lease);
                m.closed = m.by_lease.is_empty();
                m.closed
            };
            if last {
                t.open.retain(|p| !Arc::ptr_eq(p, &pack));
            }
            (pack, last)
        };
        if last {
            stop(engine.client(), &pack.name, grace).await;
            remove(engine, &pack.name, &pack.dir).await;
            let _ = std::fs::remove_dir_all(&pack.ws_root);
            tracing::info!(pack = %pack.name, "packed container removed: its last session left");
            return;
        }
        if matches!(&*pack.state.borrow(), PackState::Gone(_)) {
            return;
        }
        let req = Request {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: PACK_ROOT_IN_CONTAINER.into(),
            stdin: false,
            timeout_ms: None,
            grace_ms: grace.as_millis() as u64,
            member: Some(lease.to_string()),
            kill_member: true,
        };
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Err(e) = crate::agent::call(&pack.dir.join(SOCKET), &req, rx, |_, _| {}).await {
            tracing::warn!(pack = %pack.name, error = %e, "cannot end a packed session's processes");
        }
        if let Err(e) = self.resize(engine, &pack).await {
            tracing::warn!(pack = %pack.name, error = %e, "cannot shrink the packed container's limits");
        }
    }
}
