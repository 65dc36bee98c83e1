//! The Docker executor: each attempt runs in a container of its own, made from the
//! job's image through the engine's API (bollard), with the slot workspace bind-mounted
//! at `/workspace` as its working directory, CPU, memory and pids limits, no network
//! unless the job names one, and labels that say whose it is (`berth.managed=1`, job,
//! attempt, lease, worker, expiry) so that a restarted worker, or `berth-worker sweep`,
//! removes what a crash left behind and never touches anything else.
//!
//! Output is attached before the container starts, so nothing it prints is missed, and
//! goes to the attempt's spool like a process's. The exit code is the container's own;
//! an OOM kill ends with 137 and `oom_killed` as the reason. Cancel, timeout and a lost
//! lease stop the container (SIGTERM, then SIGKILL after the grace time) and remove it.
//!
//! A freeze stops the container and commits it twice: first as it is (an untagged
//! intermediate image), then, from a helper container made from that image without the
//! workspace mount, with a copy of the workspace added at `/.berth/ws/<lease>` (a
//! directory of its own, so what an earlier freeze left in the image cannot come back),
//! as `berth-frozen:TAG`. The image's label `berth.workspace` names that directory, and
//! an attempt whose image carries it starts with its workspace filled from it. The
//! job's environment and berth's labels are blanked in the image: secrets never land
//! in it. A freeze keeps the filesystem, never process memory.
//!
//! The worker never pulls: an image must already be on its engine.
//!
//! Here: the engine connection and berth's label names. `spec`: the container spec of an
//! attempt and the labels put on containers and images; `container`: one attempt's
//! container from create to remove; `freeze`: commits to an image, and seeding a
//! workspace from one; `session`: a session's container, held with berth's agent as its
//! entrypoint, and its execs; `pool`: warm containers waiting for sessions, and
//! containers packed with several sessions.

mod container;
mod freeze;
mod pool;
mod session;
mod spec;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use bollard::errors::Error as BollardError;
use bollard::query_parameters::{ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder};
use bollard::Docker;

use super::{Executor, Job, Opened, Report, Reports, Setup};
use crate::WorkerError;

pub use crate::executor::{Controls, Ended};
pub use container::run;
pub use spec::{container_name, ContainerSpec};

/// Every container and image berth makes carries this label (`1`).
pub const LABEL_MANAGED: &str = "berth.managed";
pub const LABEL_JOB: &str = "berth.job";
pub const LABEL_INDEX: &str = "berth.index";
pub const LABEL_ATTEMPT: &str = "berth.attempt";
pub const LABEL_LEASE: &str = "berth.lease";
pub const LABEL_WORKER: &str = "berth.worker";
/// Which cluster (its CA) the worker belongs to: two clusters may have workers of the
/// same name on one engine, and neither sweeps the other's.
pub const LABEL_CLUSTER: &str = "berth.cluster";
/// When the container is overdue (unix seconds): start + max runtime + grace. Absent
/// for jobs without a max runtime.
pub const LABEL_EXPIRES: &str = "berth.expires";
/// What a container is for: `attempt`, or a helper of a freeze or of a workspace seed.
pub const LABEL_ROLE: &str = "berth.role";
/// On frozen images: the job it was frozen from, the worker that froze it, the
/// directory inside it that holds the workspace, and `complete` once the image is whole.
pub const LABEL_FROZEN_FROM: &str = "berth.frozen_from";
pub const LABEL_FROZEN_BY: &str = "berth.frozen_by";
pub const LABEL_WORKSPACE: &str = "berth.workspace";
pub const LABEL_FROZEN: &str = "berth.frozen";

/// Where the slot workspace is mounted in the container (and its working directory).
pub const WORKSPACE_IN_CONTAINER: &str = "/workspace";

/// The engine's answer to one call may take this long (a `wait` is a long poll and is
/// not bound by it).
const CALL_TIMEOUT_S: u64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot connect to the Docker engine")]
    Connect(#[source] BollardError),
    #[error("the Docker engine does not answer")]
    Unanswered(#[source] BollardError),
    #[error("the Docker engine did not answer within {0:?}")]
    Timeout(Duration),
}

/// A connection to the local Docker engine, for one cluster's worker; cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    docker: Docker,
    cluster: String,
}

/// The executor's name (`--executor docker`).
pub const NAME: &str = "docker";

/// How the Docker executor holds sessions.
#[derive(Clone, Debug, Default)]
pub struct DockerOptions {
    /// Up to this many sessions of one owner, image and network share one container
    /// (`--docker-pack`; below 2: none does).
    pub pack: usize,
    /// Containers kept started and idle for sessions, per image (`--warm IMG=N`).
    pub warm: Vec<(String, usize)>,
}

/// The docker executor as a worker offers it: its engine, and where it records the
/// containers of running attempts (`containers/<lease>`).
pub struct DockerExecutor {
    engine: Engine,
    worker: String,
    pids_limit: i64,
    containers: PathBuf,
    places: session::Places,
    warm: Option<std::sync::Arc<pool::Warm>>,
    packs: std::sync::Arc<pool::Packs>,
}

/// Connects to the engine when the executor is asked for (an engine that does not
/// answer declines it) and removes what an earlier run of this worker left in it.
pub fn open<'a>(s: &'a Setup<'a>) -> BoxFuture<'a, Result<Opened, WorkerError>> {
    Box::pin(open_engine(s))
}

async fn open_engine(s: &Setup<'_>) -> Result<Opened, WorkerError> {
    if !s.asked {
        return Ok(Opened::NotAsked);
    }
    let cfg = s.cfg;
    let cluster = cluster_id(&cfg.ca_pem).map_err(|e| WorkerError::Setup(format!("--ca: {e}")))?;
    // For `berth-worker sweep`, which has no --ca.
    let path = cfg.work_dir.join(crate::sweep::CLUSTER_FILE);
    std::fs::write(&path, format!("{cluster}\n")).map_err(|source| WorkerError::WorkDir { path, source })?;
    let engine = match Engine::connect(Duration::from_secs(10), cluster).await {
        Ok(e) => e,
        Err(e) => return Ok(Opened::Declined(berth_shared::logs::chain(&e))),
    };
    let mut swept = crate::sweep::Swept::default();
    crate::sweep::containers(&engine, &cfg.name, &crate::sweep::Held::Nothing, crate::sweep::now_secs(), &mut swept).await;
    crate::sweep::images(&engine, &cfg.name, &mut swept).await;
    // The directories of sessions an earlier run held (their containers went above).
    let containers = cfg.work_dir.join("containers");
    if let Ok(rd) = std::fs::read_dir(&containers) {
        for e in rd.flatten().filter(|e| e.path().is_dir()) {
            if std::fs::remove_dir_all(e.path()).is_ok() {
                swept.removed.push(format!("session directory {}", e.path().display()));
            }
        }
    }
    for line in &swept.removed {
        tracing::warn!(removed = %line, "swept what an earlier run of this worker left behind");
    }
    for line in &swept.failed {
        tracing::error!(error = %line, "sweep");
    }
    let pids_limit = cfg.contain.pids_limit;
    let packs = pool::Packs::new(cfg.docker.pack, cfg.work_dir.join("packs"), containers.clone(), cfg.name.clone(), pids_limit);
    let warm = (!cfg.docker.warm.is_empty())
        .then(|| pool::Warm::new(engine.clone(), cfg.name.clone(), pids_limit, containers.clone(), cfg.work_dir.join("warm"), cfg.docker.warm.clone()));
    if let Some(w) = &warm {
        w.fill();
    }
    Ok(Opened::Offered(Box::new(DockerExecutor { engine, worker: cfg.name.clone(), pids_limit, containers, places: Default::default(), warm, packs })))
}

impl Executor for DockerExecutor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn workspace_in_job(&self, workspace: &std::path::Path) -> Option<String> {
        match workspace.file_name() {
            Some(slot) if self.packs.holds(workspace) => Some(format!("{}/{}", pool::PACK_ROOT_IN_CONTAINER, slot.to_string_lossy())),
            _ => Some(WORKSPACE_IN_CONTAINER.into()),
        }
    }

    fn session_workspace(&self, a: &berth_shared::wire::Assignment, slot: usize) -> Option<PathBuf> {
        self.packs.place(a, slot)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if let Some(w) = &self.warm {
                w.shutdown().await;
            }
        })
    }

    fn spawn(&self, job: Job<'_>, reports: Reports) {
        let lease = job.assignment.lease;
        let spec = ContainerSpec::for_attempt(job.assignment, &self.worker, self.engine.cluster(), self.pids_limit, job.launch.grace, SystemTime::now());
        let Some(c) = spec.map(|c| c.with_gpus(job.gpus)) else {
            job.spool.close();
            let outcome = super::not_started(Some(125), "not a docker job".into());
            let _ = reports.send(Report::Ended(lease, Ended { outcome, frozen: None }));
            return;
        };
        let mut launch = job.launch;
        // A container is recorded per attempt, by lease.
        launch.record = Some(self.containers.join(lease.to_string()));
        let (engine, started) = (self.engine.clone(), reports.clone());
        let (spool, controls) = (job.spool, job.controls);
        super::spawn_attempt(lease, job.span, reports, async move {
            run(engine, launch, c, spool, controls, move || {
                let _ = started.send(Report::Started(lease));
            })
            .await
        });
    }

    fn freezes(&self) -> bool {
        true
    }

    fn open_session(&self, job: Job<'_>, reports: Reports) {
        session::open(self, job, reports);
    }

    fn exec(&self, e: super::ExecJob, reports: Reports) {
        session::exec(self, e, reports);
    }

    fn remove_image(&self, image: String, reports: Option<Reports>) -> bool {
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let r = engine.remove_frozen_image(&image).await;
            match reports {
                Some(reports) => {
                    match &r {
                        Ok(how) => tracing::info!(image = %image, ?how, "frozen image removed"),
                        Err(e) => tracing::warn!(image = %image, error = %e, "cannot remove a frozen image"),
                    }
                    let _ = reports.send(Report::ImageRemoved(image, r.err()));
                }
                // An image nobody will know of (its freeze's result was rejected).
                None => {
                    if let Err(e) = r {
                        tracing::warn!(image = %image, error = %e, "cannot remove the image of a rejected freeze");
                    }
                }
            }
        });
        true
    }
}

/// A short, stable name of a cluster: the SHA-256 of its CA certificate (DER), in hex,
/// first 16 digits.
pub fn cluster_id(ca_pem: &str) -> Result<String, String> {
    use sha2::Digest;
    let certs = berth_shared::tls::parse_certs(ca_pem, "the CA certificate").map_err(|e| e.to_string())?;
    let first = certs.first().ok_or("the CA file holds no certificate")?;
    Ok(hex::encode(sha2::Sha256::digest(first.as_ref()))[..16].to_string())
}

impl Engine {
    /// Connects (`DOCKER_HOST`, or the default socket), negotiates the API version down
    /// to what the engine speaks, and pings it. `cluster` is the worker's `cluster_id`.
    pub async fn connect(timeout: Duration, cluster: String) -> Result<Engine, EngineError> {
        let docker = Docker::connect_with_defaults().map_err(EngineError::Connect)?.with_timeout(Duration::from_secs(CALL_TIMEOUT_S));
        let ready = async {
            let docker = docker.negotiate_version().await.map_err(EngineError::Unanswered)?;
            docker.ping().await.map_err(EngineError::Unanswered)?;
            Ok(docker)
        };
        let docker = tokio::time::timeout(timeout, ready).await.map_err(|_| EngineError::Timeout(timeout))??;
        Ok(Engine { docker, cluster })
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// The cluster this worker belongs to (`berth.cluster` on what it makes).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Force-removes a container (and its anonymous volumes); one that is already gone
    /// is fine.
    pub async fn remove_container(&self, name: &str) -> Result<(), String> {
        let opts = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match self.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            // Removal of this container is already in progress.
            Err(e) if status(&e) == Some(409) && message(&e).contains("already in progress") => Ok(()),
            Err(e) => Err(message(&e)),
        }
    }

    /// Containers carrying every `KEY=VALUE` label given (running or not).
    pub async fn containers_labelled(&self, labels: &[(&str, &str)]) -> Result<Vec<LabelledContainer>, String> {
        let opts = ListContainersOptionsBuilder::new().all(true).filters(&label_filter(labels)).build();
        let list = self.docker.list_containers(Some(opts)).await.map_err(|e| message(&e))?;
        Ok(list
            .into_iter()
            .map(|c| LabelledContainer {
                id: c.id.unwrap_or_default(),
                name: c.names.and_then(|n| n.first().map(|n| n.trim_start_matches('/').to_string())).unwrap_or_default(),
                labels: c.labels.unwrap_or_default(),
            })
            .filter(|c| !c.id.is_empty())
            .collect())
    }

    /// Top-level images carrying every `KEY=VALUE` label given: (id, tags, labels).
    pub async fn images_labelled(&self, labels: &[(&str, &str)]) -> Result<Vec<(String, Vec<String>, HashMap<String, String>)>, String> {
        let opts = ListImagesOptionsBuilder::new().filters(&label_filter(labels)).build();
        let list = self.docker.list_images(Some(opts)).await.map_err(|e| message(&e))?;
        Ok(list.into_iter().map(|i| (i.id, i.repo_tags, i.labels)).collect())
    }

    /// Removes an image berth made (a frozen one). Refused for anything else, and by the
    /// engine while a container uses it; untagged parents go with it.
    pub async fn remove_frozen_image(&self, image: &str) -> Result<RemovedImage, String> {
        let info = match self.docker.inspect_image(image).await {
            Ok(i) => i,
            Err(e) if status(&e) == Some(404) => return Ok(RemovedImage::AlreadyGone),
            Err(e) => return Err(message(&e)),
        };
        let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
        if labels.get(LABEL_MANAGED).map(String::as_str) != Some("1") || !labels.contains_key(LABEL_FROZEN_FROM) {
            return Err(format!("image {image} was not made by berth (it has no {LABEL_MANAGED}/{LABEL_FROZEN_FROM} labels); it was left alone"));
        }
        let opts = RemoveImageOptionsBuilder::new().force(false).noprune(false).build();
        match self.docker.remove_image(image, Some(opts), None).await {
            Ok(_) => Ok(RemovedImage::Removed),
            Err(e) if status(&e) == Some(404) => Ok(RemovedImage::AlreadyGone),
            Err(e) => Err(message(&e)),
        }
    }

    /// Removes an image by id without force (an image other images build on stays).
    pub async fn remove_image_id(&self, id: &str) -> Result<(), String> {
        let opts = RemoveImageOptionsBuilder::new().force(false).noprune(false).build();
        self.docker.remove_image(id, Some(opts), None).await.map(|_| ()).map_err(|e| message(&e))
    }
}

/// What `remove_frozen_image` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovedImage {
    Removed,
    AlreadyGone,
}

/// A container found by its labels.
#[derive(Clone, Debug)]
pub struct LabelledContainer {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
}

/// The engine's filter for things carrying every `KEY=VALUE` label given.
fn label_filter<'a>(labels: &[(&str, &str)]) -> HashMap<&'a str, Vec<String>> {
    HashMap::from([("label", labels.iter().map(|(k, v)| format!("{k}={v}")).collect())])
}

/// The HTTP status the engine answered with, if it answered.
pub(super) fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own words for an error (its message, without bollard's wrapping).
pub(super) fn message(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => berth_shared::logs::chain(other),
    }
}
