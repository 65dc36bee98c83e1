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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_shared::job::{Executor, Outcome, FROZEN_REPO};
use berth_shared::wire::{Assignment, KillReason, OutStream, MAX_CHUNK_BYTES};
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerConfig, ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, InspectContainerOptions,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, StartContainerOptions,
    StopContainerOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::watch;

use super::Launch;
use crate::spool::Spool;

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
        let filters: HashMap<&str, Vec<String>> = HashMap::from([("label", labels.iter().map(|(k, v)| format!("{k}={v}")).collect())]);
        let opts = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
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
        let filters: HashMap<&str, Vec<String>> = HashMap::from([("label", labels.iter().map(|(k, v)| format!("{k}={v}")).collect())]);
        let opts = ListImagesOptionsBuilder::new().filters(&filters).build();
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

/// The HTTP status the engine answered with, if it answered.
fn status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own words for an error (its message, without bollard's wrapping).
fn message(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => berth_shared::logs::chain(other),
    }
}

/// What the executor adds to a `Launch` for a container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// `berth-<lease>`: known before the container exists, so it can be recorded first.
    pub name: String,
    pub image: String,
    /// `none` unless the job asks for a network.
    pub network: String,
    pub nano_cpus: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub pids_limit: i64,
    /// The GPUs set aside for the attempt (UUIDs, or indices), requested from the
    /// engine's NVIDIA runtime: the container sees those and no others.
    pub gpus: Vec<String>,
    pub labels: HashMap<String, String>,
    /// The worker's name and cluster (on helper containers and frozen images).
    pub worker: String,
    pub cluster: String,
    pub job: String,
}

impl ContainerSpec {
    /// The container for an assigned Docker task (`None` for other executors).
    pub fn for_attempt(a: &Assignment, worker: &str, cluster: &str, pids_limit: i64, grace: Duration, now: SystemTime) -> Option<ContainerSpec> {
        let Executor::Docker { image, network } = &a.spec.executor else { return None };
        let r = &a.spec.resources;
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "1".to_string()),
            (LABEL_ROLE.to_string(), "attempt".to_string()),
            (LABEL_JOB.to_string(), a.job.to_string()),
            (LABEL_ATTEMPT.to_string(), a.attempt.to_string()),
            (LABEL_LEASE.to_string(), a.lease.to_string()),
            (LABEL_WORKER.to_string(), worker.to_string()),
            (LABEL_CLUSTER.to_string(), cluster.to_string()),
        ]);
        if let Some(i) = a.index {
            labels.insert(LABEL_INDEX.into(), i.to_string());
        }
        if let Some(max) = a.spec.max_runtime_ms {
            let start = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            let expires = start + Duration::from_millis(max) + grace;
            labels.insert(LABEL_EXPIRES.into(), expires.as_secs().to_string());
        }
        Some(ContainerSpec {
            name: container_name(&a.lease.to_string()),
            image: image.clone(),
            network: network.clone().unwrap_or_else(|| "none".into()),
            nano_cpus: (r.millicpus > 0).then(|| i64::from(r.millicpus) * 1_000_000),
            memory_bytes: (r.mem_mib > 0).then(|| (r.mem_mib as i64).saturating_mul(1024 * 1024)),
            pids_limit,
            gpus: Vec::new(),
            labels,
            worker: worker.to_string(),
            cluster: cluster.to_string(),
            job: a.job.to_string(),
        })
    }

    /// The attempt's GPUs (those its worker set aside for it).
    pub fn with_gpus(mut self, gpus: &[berth_shared::wire::GpuInfo]) -> Self {
        self.gpus = gpus.iter().map(|g| if g.uuid.is_empty() { g.index.to_string() } else { g.uuid.clone() }).collect();
        self
    }

    fn lease(&self) -> &str {
        self.labels.get(LABEL_LEASE).map_or("", String::as_str)
    }
}

/// The name of an attempt's container.
pub fn container_name(lease: &str) -> String {
    format!("berth-{lease}")
}

/// How an attempt ended: its outcome, and the image when it was frozen.
#[derive(Clone, Debug)]
pub struct Ended {
    pub outcome: Outcome,
    pub frozen: Option<String>,
}

fn failed(code: i32, error: String, begin: Instant) -> Ended {
    Ended {
        outcome: Outcome {
            exit_code: Some(code),
            signal: None,
            timed_out: false,
            killed: false,
            runtime_ms: begin.elapsed().as_millis() as u64,
            error: Some(error),
        },
        frozen: None,
    }
}

/// Docker's own exit codes for `docker run` failures: 125 the engine refused, 126 the
/// command cannot be run, 127 the command was not found.
fn start_failure_code(msg: &str) -> i32 {
    let m = msg.to_ascii_lowercase();
    if m.contains("permission denied") {
        126
    } else if m.contains("not found") || m.contains("no such file") {
        127
    } else {
        125
    }
}

/// Controls of a running attempt: kill (cancel, timeout, lost lease) and freeze (the tag).
pub struct Controls {
    pub kill: watch::Receiver<Option<KillReason>>,
    pub freeze: watch::Receiver<Option<String>>,
}

enum End {
    Exited(Result<i64, String>),
    TimedOut,
    Killed(KillReason),
    Freeze(String),
}

/// Runs one attempt in a container to its end; the container is removed whatever
/// happens. `started` is called once the container runs.
pub async fn run(engine: Engine, launch: Launch, c: ContainerSpec, spool: Arc<Spool>, controls: Controls, started: impl FnOnce()) -> Ended {
    let begin = Instant::now();
    if let Some(path) = &launch.record {
        if let Err(e) = std::fs::write(path, format!("{}\n", c.name)) {
            tracing::warn!(error = %e, path = %path.display(), "cannot record the attempt's container; `berth-worker sweep` would take it for an orphan");
        }
    }
    let ended = attempt(&engine, &launch, &c, &spool, controls, started, begin).await;
    if let Err(e) = engine.remove_container(&c.name).await {
        tracing::warn!(container = %c.name, error = %e, "cannot remove the attempt's container; the next sweep removes it");
    }
    if let Some(path) = &launch.record {
        let _ = std::fs::remove_file(path);
    }
    spool.close();
    ended
}

async fn attempt(engine: &Engine, launch: &Launch, c: &ContainerSpec, spool: &Arc<Spool>, controls: Controls, started: impl FnOnce(), begin: Instant) -> Ended {
    let docker = engine.client();
    let Controls { mut kill, mut freeze } = controls;
    let image = match docker.inspect_image(&c.image).await {
        Ok(i) => i,
        Err(e) if status(&e) == Some(404) => {
            return failed(125, format!("image {} is not on worker {}'s Docker engine (berth does not pull images): {}", c.image, c.worker, message(&e)), begin)
        }
        Err(e) => return failed(125, format!("cannot inspect image {}: {}", c.image, message(&e)), begin),
    };
    let image_config = image.config.unwrap_or_default();
    let image_labels = image_config.labels.clone().unwrap_or_default();
    if let Some(dir) = image_labels.get(LABEL_WORKSPACE).filter(|d| !d.is_empty()) {
        if let Err(e) = seed_workspace(engine, c, dir, &launch.workspace).await {
            return failed(125, format!("cannot fill the workspace from image {}: {e}", c.image), begin);
        }
    }
    let env: Vec<String> = launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let host = HostConfig {
        binds: Some(vec![format!("{}:{WORKSPACE_IN_CONTAINER}", launch.workspace.display())]),
        network_mode: Some(c.network.clone()),
        nano_cpus: c.nano_cpus,
        memory: c.memory_bytes,
        // The same as `memory`: no swap on top of the limit.
        memory_swap: c.memory_bytes,
        pids_limit: Some(c.pids_limit),
        device_requests: (!c.gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(c.gpus.clone()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        }),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(c.image.clone()),
        cmd: Some(launch.argv.clone()),
        env: Some(env),
        working_dir: Some(WORKSPACE_IN_CONTAINER.into()),
        labels: Some(c.labels.clone()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(host),
        ..Default::default()
    };
    if let Err(e) = docker.create_container(Some(CreateContainerOptionsBuilder::new().name(&c.name).build()), body).await {
        return failed(125, format!("cannot create the container: {}", message(&e)), begin);
    }
    // Attached before the start, as `docker run` does: everything it prints streams here
    // (not `logs`, which would repeat what was printed while attaching).
    let attach = AttachContainerOptionsBuilder::new().stream(true).logs(false).stdout(true).stderr(true).build();
    let output = match docker.attach_container(&c.name, Some(attach)).await {
        Ok(a) => a.output,
        Err(e) => return failed(125, format!("cannot attach to the container: {}", message(&e)), begin),
    };
    let pump = tokio::spawn(pump(output, spool.clone()));
    if let Err(e) = docker.start_container(&c.name, None::<StartContainerOptions>).await {
        pump.abort();
        let msg = message(&e);
        return failed(start_failure_code(&msg), format!("cannot start the container: {msg}"), begin);
    }
    started();

    let exited = wait_exit(docker, &c.name);
    tokio::pin!(exited);
    let timer = super::deadline_passed(launch.max_runtime.map(|d| tokio::time::Instant::now() + d));
    let killed = super::kill_asked(&mut kill);
    let frozen = async {
        loop {
            if let Some(tag) = freeze.borrow_and_update().clone() {
                return tag;
            }
            if freeze.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    let end = tokio::select! {
        r = &mut exited => End::Exited(r),
        _ = timer => End::TimedOut,
        r = killed => End::Killed(r),
        tag = frozen => End::Freeze(tag),
    };
    let code = match &end {
        End::Exited(r) => r.clone(),
        _ => {
            stop(docker, &c.name, launch.grace).await;
            match tokio::time::timeout(launch.grace + Duration::from_secs(10), &mut exited).await {
                Ok(r) => r,
                Err(_) => Err("the container did not stop".into()),
            }
        }
    };
    // The attach stream ends with the container; one that lingers does not hold the
    // attempt up.
    let abort = pump.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), pump).await.is_err() {
        abort.abort();
    }
    let code = match code {
        Ok(c) => c,
        Err(e) => return failed(1, format!("lost track of the container: {e}"), begin),
    };
    let exit_code = i32::try_from(code).unwrap_or(1);
    let mut outcome = Outcome { exit_code: Some(exit_code), signal: None, timed_out: false, killed: false, runtime_ms: 0, error: None };
    match end {
        End::Exited(_) => {
            // An OOM kill is a SIGKILL: only then is it worth asking the engine.
            if exit_code == 137 && oom_killed(docker, &c.name).await {
                let limit = c.memory_bytes.map(|b| format!(" of {} MiB", b / (1024 * 1024))).unwrap_or_default();
                outcome.error = Some(format!("oom_killed: the container ran out of its memory limit{limit} and was killed (exit code {exit_code})"));
            }
        }
        End::TimedOut => outcome.timed_out = true,
        End::Killed(reason) => {
            outcome.timed_out = reason == KillReason::TimedOut;
            outcome.killed = reason != KillReason::TimedOut;
        }
        End::Freeze(tag) => {
            outcome.runtime_ms = begin.elapsed().as_millis() as u64;
            let blank_env: Vec<String> = launch
                .env
                .iter()
                .map(|(k, _)| {
                    // Keep what the image itself sets; blank what the job added (secrets among it).
                    let from_image = image_config.env.iter().flatten().find(|e| e.split_once('=').is_some_and(|(ik, _)| ik == k));
                    from_image.cloned().unwrap_or_else(|| format!("{k}="))
                })
                .collect();
            return match freeze_into(engine, c, launch, &tag, blank_env).await {
                Ok(image) => {
                    tracing::info!(image = %image, "attempt frozen");
                    Ended { outcome, frozen: Some(image) }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "freeze failed");
                    outcome.error = Some(format!("freeze failed (the container was stopped): {e}"));
                    Ended { outcome, frozen: None }
                }
            };
        }
    }
    outcome.runtime_ms = begin.elapsed().as_millis() as u64;
    Ended { outcome, frozen: None }
}

/// Copies the container's output frames to the spool (frames over the chunk limit in
/// pieces).
async fn pump(mut output: std::pin::Pin<Box<dyn futures::Stream<Item = Result<LogOutput, BollardError>> + Send>>, spool: Arc<Spool>) {
    while let Some(item) = output.next().await {
        let (stream, data) = match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => (OutStream::Stdout, message),
            Ok(LogOutput::StdErr { message }) => (OutStream::Stderr, message),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "the container's output stream ended with an error");
                return;
            }
        };
        for piece in data.chunks(MAX_CHUNK_BYTES) {
            if let Err(e) = spool.append(stream, piece) {
                tracing::error!(error = %e, "cannot write output to the spool; output is being dropped");
            }
        }
    }
}

/// The container's exit code, once it has stopped. A broken wait (the engine
/// restarted, the connection dropped) is followed by asking the engine whether the
/// container still runs, and waiting again.
async fn wait_exit(docker: &Docker, name: &str) -> Result<i64, String> {
    let mut failures = 0u32;
    loop {
        let mut waiting = docker.wait_container(name, None::<WaitContainerOptions>);
        let why = match waiting.next().await {
            Some(Ok(r)) => return Ok(r.status_code),
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => return Ok(code),
            Some(Err(e)) => message(&e),
            None => "the wait ended without an answer".into(),
        };
        match docker.inspect_container(name, None::<InspectContainerOptions>).await {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                if state.running != Some(true) {
                    return Ok(state.exit_code.unwrap_or(1));
                }
                failures = 0;
            }
            Err(e) if status(&e) == Some(404) => return Err(format!("the container is gone ({why})")),
            Err(e) => {
                failures += 1;
                if failures >= 10 {
                    return Err(format!("the engine stopped answering: {}", message(&e)));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn oom_killed(docker: &Docker, name: &str) -> bool {
    match docker.inspect_container(name, None::<InspectContainerOptions>).await {
        Ok(i) => i.state.and_then(|s| s.oom_killed).unwrap_or(false),
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL after `grace` (the engine does both).
async fn stop(docker: &Docker, name: &str, grace: Duration) {
    let t = grace.as_secs().max(1).min(i32::MAX as u64) as i32;
    if let Err(e) = docker.stop_container(name, Some(StopContainerOptionsBuilder::new().t(t).build())).await {
        // 304: already stopped.
        if status(&e) != Some(304) {
            tracing::warn!(container = name, error = %message(&e), "cannot stop the container");
        }
    }
}

/// Labels of a frozen image: berth's container labels blanked (a container made from
/// the image must not pass for one of berth's), the image's own.
fn frozen_labels(c: &ContainerSpec, complete: bool, workspace_dir: &str) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> =
        [LABEL_JOB, LABEL_INDEX, LABEL_ATTEMPT, LABEL_LEASE, LABEL_WORKER, LABEL_EXPIRES, LABEL_ROLE].iter().map(|k| (k.to_string(), String::new())).collect();
    labels.insert(LABEL_MANAGED.into(), "1".into());
    labels.insert(LABEL_FROZEN_FROM.into(), c.job.clone());
    labels.insert(LABEL_FROZEN_BY.into(), c.worker.clone());
    labels.insert(LABEL_CLUSTER.into(), c.cluster.clone());
    labels.insert(LABEL_WORKSPACE.into(), workspace_dir.into());
    labels.insert(LABEL_FROZEN.into(), if complete { "complete".into() } else { String::new() });
    labels
}

/// A helper container's labels: berth's, so a crash leaves nothing a sweep misses.
fn helper_labels(c: &ContainerSpec, role: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "1".to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
        (LABEL_JOB.to_string(), c.job.clone()),
        (LABEL_LEASE.to_string(), c.lease().to_string()),
        (LABEL_WORKER.to_string(), c.worker.clone()),
        (LABEL_CLUSTER.to_string(), c.cluster.clone()),
    ])
}

/// Creates (never starts) a helper container from `image`, without mounts or network.
async fn create_helper(docker: &Docker, name: &str, image: &str, labels: HashMap<String, String>) -> Result<(), String> {
    let body = ContainerCreateBody {
        image: Some(image.into()),
        // Never run; a command is only needed for an image that has none.
        cmd: Some(vec!["true".into()]),
        labels: Some(labels),
        host_config: Some(HostConfig { network_mode: Some("none".into()), ..Default::default() }),
        ..Default::default()
    };
    docker.create_container(Some(CreateContainerOptionsBuilder::new().name(name).build()), body).await.map(|_| ()).map_err(|e| message(&e))
}

/// Commits the stopped container, with a copy of its workspace, to `berth-frozen:TAG`.
async fn freeze_into(engine: &Engine, c: &ContainerSpec, launch: &Launch, tag: &str, env: Vec<String>) -> Result<String, String> {
    let docker = engine.client();
    berth_shared::job::validate_tag(tag)?;
    let image = format!("{FROZEN_REPO}:{tag}");
    let workspace_dir = format!("/.berth/ws/{}", c.lease());
    // 1. The container as it is, untagged: the final image builds on it.
    let opts = CommitContainerOptionsBuilder::new().container(&c.name).pause(false).comment("berth freeze (intermediate)").build();
    let config = ContainerConfig { env: Some(env.clone()), labels: Some(frozen_labels(c, false, "")), ..Default::default() };
    let stage = docker.commit_container(opts, config).await.map_err(|e| format!("cannot commit the container: {}", message(&e)))?.id;
    let helper = format!("{}-freeze", c.name);
    let tar = launch.workspace.with_extension("freeze.tar");
    let r = async {
        // 2. The workspace, into a helper made from it (no mount hides the directory).
        create_helper(docker, &helper, &stage, helper_labels(c, "freeze")).await.map_err(|e| format!("cannot create the freeze helper: {e}"))?;
        let (dir, src, out) = (workspace_dir.trim_start_matches('/').to_string(), launch.workspace.clone(), tar.clone());
        tokio::task::spawn_blocking(move || write_tar(&out, &dir, &src))
            .await
            .map_err(|e| format!("the workspace archive task failed: {e}"))?
            .map_err(|e| format!("cannot archive the workspace: {e}"))?;
        let file = tokio::fs::File::open(&tar).await.map_err(|e| format!("cannot read the workspace archive: {e}"))?;
        let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
        docker
            .upload_to_container(&helper, Some(UploadToContainerOptionsBuilder::new().path("/").build()), body)
            .await
            .map_err(|e| format!("cannot copy the workspace into the image: {}", message(&e)))?;
        // 3. The whole, tagged, with the job's command as its own.
        let opts = CommitContainerOptionsBuilder::new().container(&helper).repo(FROZEN_REPO).tag(tag).pause(false).comment("berth freeze").build();
        let config =
            ContainerConfig { env: Some(env), cmd: Some(launch.argv.clone()), labels: Some(frozen_labels(c, true, &workspace_dir)), ..Default::default() };
        docker.commit_container(opts, config).await.map_err(|e| format!("cannot commit the frozen image: {}", message(&e)))?;
        Ok::<(), String>(())
    }
    .await;
    let _ = tokio::fs::remove_file(&tar).await;
    if let Err(e) = engine.remove_container(&helper).await {
        tracing::warn!(container = %helper, error = %e, "cannot remove the freeze helper; the next sweep removes it");
    }
    if let Err(e) = r {
        // The intermediate image is of no use on its own.
        let _ = engine.remove_image_id(&stage).await;
        return Err(e);
    }
    Ok(image)
}

/// Archives `src` as the directory `dir` (symlinks kept as links, not followed).
fn write_tar(out: &Path, dir: &str, src: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(out)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(dir, src)?;
    b.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Fills `workspace` with the directory `dir` of `image` (a frozen image's workspace).
async fn seed_workspace(engine: &Engine, c: &ContainerSpec, dir: &str, workspace: &Path) -> Result<(), String> {
    let docker = engine.client();
    let helper = format!("{}-seed", c.name);
    let tar = workspace.with_extension("seed.tar");
    let unpacked = workspace.with_extension("seed");
    let r = async {
        create_helper(docker, &helper, &c.image, helper_labels(c, "seed")).await?;
        let mut stream = docker.download_from_container(&helper, Some(DownloadFromContainerOptionsBuilder::new().path(dir).build()));
        let mut file = tokio::fs::File::create(&tar).await.map_err(|e| e.to_string())?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| message(&e))?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await.map_err(|e| e.to_string())?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| e.to_string())?;
        drop(file);
        let (tar, unpacked, workspace) = (tar.clone(), unpacked.clone(), workspace.to_path_buf());
        let base = Path::new(dir).file_name().map(PathBuf::from).ok_or_else(|| format!("`{dir}` names no directory"))?;
        tokio::task::spawn_blocking(move || unpack_into(&tar, &unpacked, &base, &workspace)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }
    .await;
    let _ = tokio::fs::remove_file(&tar).await;
    let _ = tokio::fs::remove_dir_all(&unpacked).await;
    if let Err(e) = engine.remove_container(&helper).await {
        tracing::warn!(container = %helper, error = %e, "cannot remove the seed helper; the next sweep removes it");
    }
    r
}

/// Unpacks `tar` (safely: nothing lands outside `scratch`) and puts its directory
/// `base` in the place of `workspace`.
fn unpack_into(tar: &Path, scratch: &Path, base: &Path, workspace: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch)?;
    let mut a = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(tar)?));
    a.set_preserve_permissions(true);
    a.set_overwrite(true);
    a.unpack(scratch)?;
    let from = scratch.join(base);
    if !from.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the image's workspace directory is not in the archive"));
    }
    match std::fs::remove_dir_all(workspace) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::rename(from, workspace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::ids::{JobId, LeaseId};
    use berth_shared::job::{Command, JobSpec};

    #[test]
    fn container_spec_of_an_assignment() {
        let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        spec.executor = Executor::Docker { image: "busybox:1".into(), network: None };
        spec.resources.millicpus = 1500;
        spec.resources.mem_mib = 32;
        spec.max_runtime_ms = Some(60_000);
        let a = Assignment { lease: LeaseId::new(), job: JobId::new(), index: Some(4), attempt: 2, spec };
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let c = ContainerSpec::for_attempt(&a, "w1", "c1", 512, Duration::from_secs(2), now).expect("a docker task");
        assert_eq!(c.name, format!("berth-{}", a.lease));
        assert_eq!(c.network, "none");
        assert_eq!(c.nano_cpus, Some(1_500_000_000));
        assert_eq!(c.memory_bytes, Some(32 * 1024 * 1024));
        assert_eq!(c.labels[LABEL_MANAGED], "1");
        assert_eq!(c.labels[LABEL_WORKER], "w1");
        assert_eq!(c.labels[LABEL_INDEX], "4");
        assert_eq!(c.labels[LABEL_ATTEMPT], "2");
        assert_eq!(c.labels[LABEL_LEASE], a.lease.to_string());
        assert_eq!(c.labels[LABEL_EXPIRES], "1062");
        let mut p = a.clone();
        p.spec.executor = Executor::Process;
        assert_eq!(c.labels[LABEL_CLUSTER], "c1");
        assert!(c.gpus.is_empty());
        let g = |index: u32, uuid: &str| berth_shared::wire::GpuInfo { index, uuid: uuid.into(), ..Default::default() };
        assert_eq!(c.clone().with_gpus(&[g(1, "GPU-1111"), g(3, "")]).gpus, ["GPU-1111", "3"]);
        assert!(ContainerSpec::for_attempt(&p, "w1", "c1", 512, Duration::from_secs(2), now).is_none());
    }

    #[test]
    fn frozen_images_carry_no_attempt_labels() {
        let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        spec.executor = Executor::Docker { image: "busybox:1".into(), network: None };
        let a = Assignment { lease: LeaseId::new(), job: JobId::new(), index: None, attempt: 1, spec };
        let c = ContainerSpec::for_attempt(&a, "w1", "c1", 512, Duration::from_secs(2), UNIX_EPOCH).expect("a docker task");
        let l = frozen_labels(&c, true, "/.berth/ws/x");
        // A container made from the image must not pass for an attempt of w1's.
        for k in [LABEL_JOB, LABEL_ATTEMPT, LABEL_LEASE, LABEL_WORKER, LABEL_EXPIRES, LABEL_ROLE] {
            assert_eq!(l[k], "", "{k}");
        }
        assert_eq!((l[LABEL_MANAGED].as_str(), l[LABEL_FROZEN].as_str(), l[LABEL_WORKSPACE].as_str()), ("1", "complete", "/.berth/ws/x"));
        assert_eq!((l[LABEL_FROZEN_FROM].as_str(), l[LABEL_FROZEN_BY].as_str(), l[LABEL_CLUSTER].as_str()), (a.job.to_string().as_str(), "w1", "c1"));
        assert_eq!(frozen_labels(&c, false, "")[LABEL_FROZEN], "", "an unfinished freeze is not complete");
        let h = helper_labels(&c, "seed");
        assert_eq!((h[LABEL_MANAGED].as_str(), h[LABEL_WORKER].as_str(), h[LABEL_LEASE].as_str()), ("1", "w1", a.lease.to_string().as_str()));
    }

    #[test]
    fn start_failures_map_to_docker_exit_codes() {
        assert_eq!(start_failure_code("exec: \"nosuch\": executable file not found in $PATH: unknown"), 127);
        assert_eq!(start_failure_code("exec: \"/x\": permission denied: unknown"), 126);
        assert_eq!(start_failure_code("something else"), 125);
    }

    #[test]
    fn workspace_archives_round_trip_without_escaping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("sub")).expect("mkdir");
        std::fs::write(ws.join("sub/f"), b"state\n").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", ws.join("link")).expect("symlink");
        let tar = dir.path().join("a.tar");
        write_tar(&tar, ".berth/ws/x", &ws).expect("archive");
        let target = dir.path().join("slot");
        std::fs::create_dir_all(&target).expect("mkdir");
        std::fs::write(target.join("stale"), b"old").expect("write");
        // The archive holds `.berth/ws/x/...`; what the engine sends back for that path
        // holds `x/...`, so unpack a re-rooted copy.
        let rerooted = dir.path().join("b.tar");
        write_tar(&rerooted, "x", &ws).expect("archive");
        unpack_into(&rerooted, &dir.path().join("scratch"), Path::new("x"), &target).expect("unpack");
        assert_eq!(std::fs::read_to_string(target.join("sub/f")).expect("read"), "state\n");
        assert!(!target.join("stale").exists(), "the workspace is replaced, not merged");
        assert_eq!(std::fs::read_link(target.join("link")).expect("a link"), Path::new("/etc/passwd"));
        assert!(unpack_into(&rerooted, &dir.path().join("scratch2"), Path::new("y"), &target).is_err());
    }
}
