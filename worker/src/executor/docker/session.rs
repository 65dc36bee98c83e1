//! Docker sessions: one container held for the session's whole life, made from its
//! image as an attempt's is (the workspace at /workspace, limits, GPUs, no network
//! unless asked, berth's labels with an expiry of open + max lifetime + grace), whose
//! entrypoint is the session agent (`crate::agent`): the worker's own binary and the
//! shared libraries it has loaded, bind-mounted read-only under `/.berth/`, run through
//! the host's dynamic loader, so it runs in any image of the host's architecture, even
//! one with nothing but busybox. The agent listens on a socket in a directory of the
//! worker's (`<work dir>/containers/<lease>/`, at `/.berth/run` inside), which is also
//! the running worker's record of the container for `berth-worker sweep`.
//!
//! An exec is one connection to that socket: no engine call, so its cost is a fork and
//! an exec in the container. The session ends when it is killed (close, idle TTL, max
//! lifetime, a lost lease): the container is stopped and removed with its directory.
//! A freeze stops it and commits it as an attempt's is, with the image's own
//! entrypoint and command put back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use berth_shared::job::Outcome;
use berth_shared::wire::{KillReason, OutStream};
use bollard::models::{ContainerCreateBody, ContainerUpdateBody};
use bollard::query_parameters::{CreateContainerOptionsBuilder, InspectContainerOptions, LogsOptionsBuilder, StartContainerOptions};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::container::{host_config, stop, wait_exit};
use super::freeze::{freeze_into, seed_workspace};
use super::pool::{Pack, Packs, Sandbox, PACK_ROOT_IN_CONTAINER};
use super::{message, status, ContainerSpec, DockerExecutor, Engine, LABEL_ROLE, LABEL_WORKSPACE, WORKSPACE_IN_CONTAINER};
use crate::agent::proto::{Bytes, Request, ToAgent};
use crate::executor::{deadline_passed, freeze_asked, kill_asked, not_started, spawn_attempt, Controls, Ended, ExecJob, Job, Launch, Report, Reports};
use crate::spool::Spool;
use berth_shared::ids::LeaseId;

/// Where the agent's directory is mounted in the container, and its socket's name.
const RUN_IN_CONTAINER: &str = "/.berth/run";
pub(super) const SOCKET: &str = "agent.sock";
const LIB_IN_CONTAINER: &str = "/.berth/lib";
const BIN_IN_CONTAINER: &str = "/.berth/bin/berth-worker";
/// How long a started container's agent has to be ready.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// What the agent needs from the host: the worker's binary, its loader (when it has
/// one: a static binary runs as it is) and the shared libraries it has loaded.
#[derive(Clone, Debug)]
pub(super) struct AgentFiles {
    exe: PathBuf,
    loader: Option<String>,
    libs: Vec<PathBuf>,
}

impl AgentFiles {
    /// This process's, read once.
    pub(super) fn of_this_process() -> Result<&'static AgentFiles, String> {
        static FILES: OnceLock<Result<AgentFiles, String>> = OnceLock::new();
        FILES
            .get_or_init(|| {
                let exe = std::env::current_exe().map_err(|e| format!("cannot find the worker's own binary: {e}"))?;
                let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
                Ok(AgentFiles::from_maps(exe, &maps))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// From `/proc/self/maps`: every mapped file whose name ends in `.so` or holds
    /// `.so.`, one per name; the loader is the one named `ld-*`.
    fn from_maps(exe: PathBuf, maps: &str) -> AgentFiles {
        let mut libs: Vec<PathBuf> = Vec::new();
        let mut loader = None;
        for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)).filter(|p| p.starts_with('/')) {
            let p = Path::new(path);
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else { continue };
            if !(name.ends_with(".so") || name.contains(".so.")) || libs.iter().any(|l| l.file_name() == p.file_name()) {
                continue;
            }
            if name.starts_with("ld-") {
                loader = Some(name.to_string());
            }
            libs.push(p.to_path_buf());
        }
        AgentFiles { exe, loader, libs }
    }

    /// The bind mounts that bring them into a container, read-only.
    fn binds(&self) -> Vec<String> {
        let mut b = vec![format!("{}:{BIN_IN_CONTAINER}:ro", self.exe.display())];
        for l in &self.libs {
            let name = l.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            b.push(format!("{}:{LIB_IN_CONTAINER}/{name}:ro", l.display()));
        }
        b
    }

    /// The container's entrypoint: the agent, through the loader.
    fn entrypoint(&self) -> Vec<String> {
        let mut e = Vec::new();
        if let Some(ld) = &self.loader {
            e.extend([format!("{LIB_IN_CONTAINER}/{ld}"), "--library-path".into(), LIB_IN_CONTAINER.into()]);
        }
        e.extend([BIN_IN_CONTAINER.into(), "agent".into(), "--socket".into(), format!("{RUN_IN_CONTAINER}/{SOCKET}")]);
        e
    }
}

/// The host directory of a session's agent (its socket; the sweep's record).
pub(super) fn run_dir(containers: &Path, lease: &str) -> PathBuf {
    containers.join(lease)
}

/// Where a session's container is and how its execs reach it.
#[derive(Clone, Debug)]
pub(super) struct Place {
    pub socket: PathBuf,
    /// The host directory bound into the container, and where it is in there.
    pub host_root: PathBuf,
    pub root_in_container: &'static str,
    /// In a packed container: the session, as the agent marks its processes.
    pub member: Option<String>,
}

/// The sessions open on this executor, by lease.
pub(super) type Places = Arc<std::sync::Mutex<std::collections::HashMap<LeaseId, Place>>>;

fn places_of(p: &Places) -> std::sync::MutexGuard<'_, std::collections::HashMap<LeaseId, Place>> {
    p.lock().unwrap_or_else(|p| p.into_inner())
}

/// `open_session` of the Docker executor: in a container of the session's own (from
/// the warm pool when one of its image waits there), or in a packed one.
pub(super) fn open(x: &DockerExecutor, job: Job<'_>, reports: Reports) {
    let lease = job.assignment.lease;
    let spec = ContainerSpec::for_attempt(job.assignment, &x.worker, x.engine.cluster(), x.pids_limit, job.launch.grace, SystemTime::now());
    let Some(mut c) = spec.map(|c| c.with_gpus(job.gpus)) else {
        job.spool.close();
        let _ = reports.send(Report::Ended(lease, Ended { outcome: not_started(Some(125), "not a docker session".into()), frozen: None }));
        return;
    };
    c.labels.insert(LABEL_ROLE.into(), "session".into());
    job.spool.close();
    let pack = x.packs.of(lease);
    let warm = if pack.is_none() { x.warm.as_ref().and_then(|w| w.take(&c)) } else { None };
    let (engine, launch, controls, started, places, packs) = (x.engine.clone(), job.launch, job.controls, reports.clone(), x.places.clone(), x.packs.clone());
    let dir = run_dir(&x.containers, &lease.to_string());
    let ready = move |place: Place| {
        places_of(&places).insert(lease, place);
        let _ = started.send(Report::Started(lease));
    };
    let places = x.places.clone();
    spawn_attempt(lease, job.span, reports, async move {
        let begin = Instant::now();
        let ended = match (pack, warm) {
            (Some(pack), _) => packed(&engine, &packs, pack, lease, c, launch, controls, ready, begin).await,
            (None, Some(sandbox)) => warmed(&engine, sandbox, c, launch, dir, controls, ready, begin).await,
            (None, None) => own(&engine, c, launch, dir, controls, ready, begin).await,
        };
        places_of(&places).remove(&lease);
        ended
    });
}

/// A session in a container made for it now.
async fn own(engine: &Engine, c: ContainerSpec, launch: Launch, dir: PathBuf, controls: Controls, ready: impl FnOnce(Place), begin: Instant) -> Ended {
    let env = launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let opened = async { start_sandbox(engine, &c, (&launch.workspace, WORKSPACE_IN_CONTAINER), &dir, env, Some(&launch.workspace)).await };
    let ended = match opened.await {
        Err(why) => Ended { outcome: not_started(Some(125), why), frozen: None },
        Ok(image) => {
            ready(Place { socket: dir.join(SOCKET), host_root: launch.workspace.clone(), root_in_container: WORKSPACE_IN_CONTAINER, member: None });
            hold(engine, &c, &launch, controls, &image, begin).await
        }
    };
    remove(engine, &c.name, &dir).await;
    ended
}

/// A session in a container taken from the warm pool: its workspace directory becomes
/// the slot's (a rename: the container's mount follows the directory), its limits
/// become the session's. (A frozen image, whose workspace would be filled by a rename
/// too, is never warm: `Warm::take`.)
#[allow(clippy::too_many_arguments)]
async fn warmed(
    engine: &Engine,
    sandbox: Sandbox,
    mut c: ContainerSpec,
    launch: Launch,
    dir: PathBuf,
    controls: Controls,
    ready: impl FnOnce(Place),
    begin: Instant,
) -> Ended {
    let adopted = async {
        std::fs::rename(&sandbox.ws, &launch.workspace).map_err(|e| format!("cannot hand the warm container's workspace to the slot: {e}"))?;
        let limits = crate::contain::Limits {
            millicpus: c.nano_cpus.map_or(0, |n| (n / 1_000_000) as u32),
            mem_mib: c.memory_bytes.map_or(0, |b| (b / (1024 * 1024)) as u64),
            pids: c.pids_limit as u64,
        };
        // Set in the container's cgroup at once; the engine's record follows (the same
        // values, so a `docker inspect` agrees). Without the cgroup, through the engine.
        match sandbox.cgroup.as_ref().map(|cg| cg.limit(limits)) {
            Some(Ok(())) => {
                let (engine, name, c) = (engine.clone(), sandbox.name.clone(), c.clone());
                tokio::spawn(async move {
                    if let Err(e) = resize(&engine, &name, c.nano_cpus, c.memory_bytes, c.pids_limit).await {
                        tracing::warn!(container = %name, error = %e, "the engine did not take the session's limits (its cgroup has them)");
                    }
                });
                Ok(())
            }
            _ => resize(engine, &sandbox.name, c.nano_cpus, c.memory_bytes, c.pids_limit).await,
        }
    };
    if let Err(why) = adopted.await {
        tracing::warn!(container = %sandbox.name, reason = %why, "a warm container could not be used; making one for the session");
        remove(engine, &sandbox.name, &sandbox.dir).await;
        return own(engine, c, launch, dir, controls, ready, begin).await;
    }
    tracing::debug!(container = %sandbox.name, "session opened in a warm container");
    c.name = sandbox.name.clone();
    ready(Place { socket: sandbox.dir.join(SOCKET), host_root: launch.workspace.clone(), root_in_container: WORKSPACE_IN_CONTAINER, member: None });
    let ended = hold(engine, &c, &launch, controls, &sandbox.image, begin).await;
    remove(engine, &sandbox.name, &sandbox.dir).await;
    ended
}

/// A session in a packed container: joins it (the first member makes it), holds its
/// membership until killed, then leaves (its processes end; the last member's leaving
/// removes the container). A neighbour's leaving does not touch it.
#[allow(clippy::too_many_arguments)]
async fn packed(
    engine: &Engine,
    packs: &Packs,
    pack: Arc<Pack>,
    lease: LeaseId,
    c: ContainerSpec,
    launch: Launch,
    controls: Controls,
    ready: impl FnOnce(Place),
    begin: Instant,
) -> Ended {
    let joined = async {
        let image = packs.join(engine, &pack, &c).await?;
        seed(engine, &c, &image, &launch.workspace).await?;
        Ok::<_, String>(image)
    };
    let ended = match joined.await {
        Err(why) => Ended { outcome: not_started(Some(125), why), frozen: None },
        Ok(_) => {
            let member = Some(lease.to_string());
            ready(Place { socket: pack.dir.join(SOCKET), host_root: pack.ws_root.clone(), root_in_container: PACK_ROOT_IN_CONTAINER, member });
            let crate::executor::Controls { mut kill, mut freeze } = controls;
            let outcome = |reason, error| session_outcome(begin, None, reason, error);
            tokio::select! {
                r = kill_asked(&mut kill) => Ended { outcome: outcome(Some(r), None), frozen: None },
                why = pack.gone() => Ended { outcome: outcome(None, Some(why)), frozen: None },
                _ = freeze_asked(&mut freeze) => Ended {
                    outcome: outcome(None, Some("freeze failed: a packed session shares its container with its neighbours, so it cannot be frozen (open it on a worker without --docker-pack)".into())),
                    frozen: None,
                },
            }
        }
    };
    packs.leave(engine, lease, launch.grace).await;
    ended
}

/// How a session held since `begin` ended: killed for `reason` (a timeout is not a
/// kill), or by itself with `exit_code` and `error`.
fn session_outcome(begin: Instant, exit_code: Option<i32>, reason: Option<KillReason>, error: Option<String>) -> Outcome {
    Outcome {
        exit_code,
        signal: None,
        timed_out: reason == Some(KillReason::TimedOut),
        killed: reason.is_some_and(|r| r != KillReason::TimedOut),
        runtime_ms: begin.elapsed().as_millis() as u64,
        error,
    }
}

/// Removes a session's container and its agent's directory.
pub(super) async fn remove(engine: &Engine, name: &str, dir: &Path) {
    if let Err(e) = engine.remove_container(name).await {
        tracing::warn!(container = %name, error = %e, "cannot remove the session's container; the next sweep removes it");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Sets a running container's CPU, memory (no swap on top) and pids limits.
pub(super) async fn resize(engine: &Engine, name: &str, nano_cpus: Option<i64>, memory: Option<i64>, pids: i64) -> Result<(), String> {
    let body = ContainerUpdateBody { nano_cpus, memory, memory_swap: memory, pids_limit: Some(pids), ..Default::default() };
    engine.client().update_container(name, body).await.map_err(|e| format!("cannot set the container's limits: {}", message(&e)))
}

/// What the session's image sets itself (put back in a frozen image), and the
/// directory a frozen image keeps its workspace in.
#[derive(Clone, Debug, Default)]
pub(super) struct ImageCfg {
    env: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    pub(super) workspace: Option<String>,
}

/// Creates and starts a container of `c` (its name, image, labels, network and limits)
/// with the agent as its entrypoint, `bind` (a host directory, where it goes) and the
/// agent's directory `dir` mounted, and waits for the agent. `seed_into`: the workspace
/// to fill first from a frozen image (filled by a rename, so before the mount exists).
pub(super) async fn start_sandbox(
    engine: &Engine,
    c: &ContainerSpec,
    bind: (&Path, &str),
    dir: &Path,
    env: Vec<String>,
    seed_into: Option<&Path>,
) -> Result<ImageCfg, String> {
    let docker = engine.client();
    let files = AgentFiles::of_this_process()?;
    let image = match docker.inspect_image(&c.image).await {
        Ok(i) => i,
        Err(e) if status(&e) == Some(404) => {
            return Err(format!("image {} is not on worker {}'s Docker engine (berth does not pull images): {}", c.image, c.worker, message(&e)))
        }
        Err(e) => return Err(format!("cannot inspect image {}: {}", c.image, message(&e))),
    };
    let cfg = image.config.unwrap_or_default();
    let image = ImageCfg {
        env: cfg.env.unwrap_or_default(),
        entrypoint: cfg.entrypoint.unwrap_or_default(),
        cmd: cfg.cmd.unwrap_or_default(),
        workspace: cfg.labels.as_ref().and_then(|l| l.get(LABEL_WORKSPACE)).filter(|d| !d.is_empty()).cloned(),
    };
    if let Some(ws) = seed_into {
        seed(engine, c, &image, ws).await?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make the session's directory {}: {e}", dir.display()))?;
    let mut binds = vec![format!("{}:{}", bind.0.display(), bind.1), format!("{}:{RUN_IN_CONTAINER}", dir.display())];
    binds.extend(files.binds());
    let body = ContainerCreateBody {
        image: Some(c.image.clone()),
        entrypoint: Some(files.entrypoint()),
        env: Some(env),
        working_dir: Some(bind.1.into()),
        labels: Some(c.labels.clone()),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(host_config(c, binds)),
        ..Default::default()
    };
    docker
        .create_container(Some(CreateContainerOptionsBuilder::new().name(&c.name).build()), body)
        .await
        .map_err(|e| format!("cannot create the session's container: {}", message(&e)))?;
    docker.start_container(&c.name, None::<StartContainerOptions>).await.map_err(|e| format!("cannot start the session's container: {}", message(&e)))?;
    agent_ready(engine, &c.name, dir).await?;
    Ok(image)
}

/// Fills a session's workspace from its image, when that is a frozen one (by a rename:
/// the workspace must not be mounted yet, or be a directory inside what is).
async fn seed(engine: &Engine, c: &ContainerSpec, image: &ImageCfg, workspace: &Path) -> Result<(), String> {
    match &image.workspace {
        Some(dir) => seed_workspace(engine, c, dir, workspace).await.map_err(|e| format!("cannot fill the workspace from image {}: {e}", c.image)),
        None => Ok(()),
    }
}

/// Waits for the agent's socket (named once it listens), or for the container to have
/// stopped (then with what it printed), for `READY_WITHIN` at most.
async fn agent_ready(engine: &Engine, name: &str, dir: &Path) -> Result<(), String> {
    let socket = dir.join(SOCKET);
    let begin = Instant::now();
    let mut looked = Instant::now();
    while !socket.exists() {
        if begin.elapsed() > READY_WITHIN {
            return Err(format!("the session's agent was not ready within {READY_WITHIN:?}{}", said(engine, name).await));
        }
        if looked.elapsed() > Duration::from_millis(250) {
            looked = Instant::now();
            let info = engine.client().inspect_container(name, None::<InspectContainerOptions>).await;
            if let Ok(state) = info.map(|i| i.state.unwrap_or_default()) {
                if state.running != Some(true) {
                    return Err(format!("the session's agent stopped (exit code {}){}", state.exit_code.unwrap_or(-1), said(engine, name).await));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tracing::debug!(ready_ms = begin.elapsed().as_millis() as u64, "session agent ready");
    Ok(())
}

/// The last lines a container printed, for a reason.
async fn said(engine: &Engine, name: &str) -> String {
    let opts = LogsOptionsBuilder::new().stdout(true).stderr(true).tail("5").build();
    let mut logs = engine.client().logs(name, Some(opts));
    let mut text = String::new();
    while let Some(Ok(l)) = logs.next().await {
        text.push_str(&String::from_utf8_lossy(&l.into_bytes()));
    }
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {}", berth_shared::text::escape(text))
    }
}

/// Holds a session's own container until the session is killed or frozen, or the
/// container ends.
async fn hold(engine: &Engine, c: &ContainerSpec, launch: &Launch, controls: Controls, image: &ImageCfg, begin: Instant) -> Ended {
    let Controls { mut kill, mut freeze } = controls;
    let docker = engine.client();
    let outcome = |exit_code, reason, error| session_outcome(begin, exit_code, reason, error);
    tokio::select! {
        r = kill_asked(&mut kill) => {
            stop(docker, &c.name, launch.grace).await;
            Ended { outcome: outcome(None, Some(r), None), frozen: None }
        }
        r = wait_exit(docker, &c.name) => {
            let (code, why) = match r {
                Ok(code) => (i32::try_from(code).ok(), format!("the session's container ended by itself (exit code {code})")),
                Err(e) => (None, format!("lost track of the session's container: {e}")),
            };
            tracing::warn!(reason = %why, "session ended");
            Ended { outcome: outcome(code, None, Some(why)), frozen: None }
        }
        tag = freeze_asked(&mut freeze) => {
            stop(docker, &c.name, launch.grace).await;
            let env = blank_env(&launch.env, &image.env);
            let launch = Launch { argv: image.cmd.clone(), ..launch.clone() };
            match freeze_into(engine, c, &launch, &tag, env, Some(image.entrypoint.clone())).await {
                Ok(image) => {
                    tracing::info!(image = %image, "session frozen");
                    Ended { outcome: outcome(None, None, None), frozen: Some(image) }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "freeze failed");
                    Ended { outcome: outcome(None, None, Some(format!("freeze failed (the container was stopped): {e}"))), frozen: None }
                }
            }
        }
    }
}

/// The environment a frozen image keeps: what the image itself sets; what the session
/// added (secrets among it) blanked.
fn blank_env(added: &[(String, String)], image: &[String]) -> Vec<String> {
    added.iter().map(|(k, _)| image.iter().find(|e| e.split_once('=').is_some_and(|(ik, _)| ik == k)).cloned().unwrap_or_else(|| format!("{k}="))).collect()
}

/// Where an exec's working directory (a host path under the container's bound
/// directory `host_root`) is in the container.
fn cwd_in_container(host_root: &Path, root_in_container: &str, cwd: &Path) -> String {
    match cwd.strip_prefix(host_root) {
        Ok(rel) if rel.as_os_str().is_empty() => root_in_container.to_string(),
        Ok(rel) => format!("{root_in_container}/{}", rel.display()),
        Err(_) => root_in_container.to_string(),
    }
}

/// `exec` of the Docker executor: one connection to the session's agent.
pub(super) fn exec(x: &DockerExecutor, e: ExecJob, reports: Reports) {
    use tracing::Instrument;
    let (lease, exec) = (e.lease, e.exec);
    let Some(place) = places_of(&x.places).get(&lease).cloned() else {
        e.spool.close();
        let _ = reports.send(Report::ExecEnded(lease, exec, not_started(Some(125), "the session's container is not open on this worker".into())));
        return;
    };
    tokio::spawn(
        async move {
            let outcome = run_exec(&place, e.launch, e.cwd, e.spool.clone(), e.kill, e.stdin).await;
            e.spool.close();
            tracing::debug!(exit = ?outcome.exit_code, "exec ended");
            let _ = reports.send(Report::ExecEnded(lease, exec, outcome));
        }
        .instrument(e.span),
    );
}

async fn run_exec(
    place: &Place,
    launch: Launch,
    cwd: PathBuf,
    spool: Arc<Spool>,
    mut kill: tokio::sync::watch::Receiver<Option<KillReason>>,
    stdin: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
) -> Outcome {
    let begin = Instant::now();
    let req = Request {
        argv: launch.argv,
        env: launch.env,
        cwd: cwd_in_container(&place.host_root, place.root_in_container, &cwd),
        stdin: stdin.is_some(),
        timeout_ms: launch.max_runtime.map(|d| d.as_millis() as u64),
        grace_ms: launch.grace.as_millis() as u64,
        member: place.member.clone(),
        kill_member: false,
    };
    let socket = place.socket.as_path();
    let (tx, rx) = mpsc::unbounded_channel();
    let forward = stdin.map(|mut input| {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(data) = input.recv().await {
                let end = data.is_empty();
                if tx.send(ToAgent::Stdin(Bytes(data))).is_err() || end {
                    return;
                }
            }
            let _ = tx.send(ToAgent::Stdin(Bytes::default()));
        })
    });
    let output = |stream: u8, data: Vec<u8>| {
        let stream = if stream == 0 { OutStream::Stdout } else { OutStream::Stderr };
        if let Err(e) = spool.append_owned(stream, data) {
            tracing::error!(error = %e, "cannot write output to the spool; output is being dropped");
        }
    };
    let call = crate::agent::call(socket, &req, rx, output);
    tokio::pin!(call);
    // The agent times the exec out itself; this is for an agent that does not answer.
    let deadline = launch.max_runtime.map(|d| tokio::time::Instant::now() + d + launch.grace + Duration::from_secs(5));
    let (mut asked, mut late, mut give_up) = (None, false, None);
    let r = loop {
        tokio::select! {
            r = &mut call => break r,
            reason = kill_asked(&mut kill), if asked.is_none() => {
                asked = Some(reason);
                let _ = tx.send(ToAgent::Kill);
                give_up.get_or_insert(tokio::time::Instant::now() + launch.grace + Duration::from_secs(10));
            }
            _ = deadline_passed(deadline), if !late => {
                late = true;
                let _ = tx.send(ToAgent::Kill);
                give_up.get_or_insert(tokio::time::Instant::now() + launch.grace + Duration::from_secs(10));
            }
            _ = deadline_passed(give_up) => break Err(std::io::Error::other("the session's agent did not end the exec after a kill")),
        }
    };
    if let Some(f) = forward {
        f.abort();
    }
    let runtime_ms = begin.elapsed().as_millis() as u64;
    let timed_out = late || asked == Some(KillReason::TimedOut);
    match r {
        Ok(exit) => {
            let timed_out = timed_out || exit.timed_out;
            Outcome {
                exit_code: exit.code,
                signal: exit.signal,
                timed_out,
                killed: (exit.killed || asked.is_some()) && !timed_out,
                runtime_ms,
                error: exit.error,
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::ConnectionRefused => {
            not_started(Some(125), format!("the session's container does not answer (its agent at {}: {e})", socket.display()))
        }
        Err(e) => Outcome {
            exit_code: None,
            signal: None,
            timed_out,
            killed: asked.is_some() && !timed_out,
            runtime_ms,
            error: Some(format!("lost the session's agent: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_files_come_from_the_maps() {
        let maps = "\
55d0-55d1 r--p 00000000 08:01 1 /opt/berth/bin/berth-worker
7f00-7f01 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f01-7f02 r--p 00001000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
7f03-7f04 r-xp 00000000 08:01 4 /usr/lib/libfoo.so
7f04-7f05 r-xp 00000000 08:01 5 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f05-7f06 rw-p 00000000 00:00 0 [heap]
7f06-7f07 r--p 00000000 08:01 6 /usr/lib/locale/C.utf8/LC_CTYPE
";
        let f = AgentFiles::from_maps(PathBuf::from("/opt/berth/bin/berth-worker"), maps);
        assert_eq!(f.loader.as_deref(), Some("ld-linux-x86-64.so.2"));
        assert_eq!(f.libs.len(), 4, "{:?}", f.libs);
        assert_eq!(
            f.entrypoint(),
            ["/.berth/lib/ld-linux-x86-64.so.2", "--library-path", "/.berth/lib", "/.berth/bin/berth-worker", "agent", "--socket", "/.berth/run/agent.sock"]
        );
        assert!(f.binds().contains(&"/usr/lib/x86_64-linux-gnu/libc.so.6:/.berth/lib/libc.so.6:ro".to_string()), "{:?}", f.binds());
        assert_eq!(f.binds()[0], "/opt/berth/bin/berth-worker:/.berth/bin/berth-worker:ro");
        // A static binary has no loader: it runs as it is.
        let f = AgentFiles::from_maps(PathBuf::from("/w"), "55d0-55d1 r--p 00000000 08:01 1 /w\n");
        assert_eq!(f.entrypoint()[0], "/.berth/bin/berth-worker");
        // This process's own, as the worker reads them.
        let mine = AgentFiles::of_this_process().expect("readable");
        assert!(mine.loader.is_some(), "{mine:?}");
    }

    #[test]
    fn cwd_and_env_for_the_container() {
        let ws = Path::new("/w/slots/0");
        assert_eq!(cwd_in_container(ws, "/workspace", ws), "/workspace");
        assert_eq!(cwd_in_container(ws, "/workspace", &ws.join("a/b")), "/workspace/a/b");
        let pack = Path::new("/w/packs/p1");
        assert_eq!(cwd_in_container(pack, "/workspaces", &pack.join("3/src")), "/workspaces/3/src");
        let env = blank_env(&[("PATH".into(), "/x".into()), ("TOKEN".into(), "secret".into())], &["PATH=/bin".into()]);
        assert_eq!(env, ["PATH=/bin", "TOKEN="]);
    }
}
