//! A container's life for one attempt: inspect the image, seed the workspace from a
//! frozen image, create with limits and labels, attach before start, wait for the exit
//! (through engine restarts), stop on cancel, timeout or freeze, and remove.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_shared::job::Outcome;
use berth_shared::wire::{KillReason, OutStream, MAX_CHUNK_BYTES};
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, InspectContainerOptions, StartContainerOptions, StopContainerOptionsBuilder,
    WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;

use super::freeze::{freeze_into, seed_workspace};
use super::{message, status, ContainerSpec, Engine, LABEL_WORKSPACE, WORKSPACE_IN_CONTAINER};
use crate::executor::{Controls, Ended, Launch};
use crate::spool::Spool;

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
    let host = host_config(c, vec![format!("{}:{WORKSPACE_IN_CONTAINER}", launch.workspace.display())]);
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
    let timer = crate::executor::deadline_passed(launch.max_runtime.map(|d| tokio::time::Instant::now() + d));
    let killed = crate::executor::kill_asked(&mut kill);
    let frozen = crate::executor::freeze_asked(&mut freeze);
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
            return match freeze_into(engine, c, launch, &tag, blank_env, None).await {
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

/// The engine's side of a container berth makes: its mounts, network, limits (no swap on
/// top of the memory limit) and GPUs.
pub(super) fn host_config(c: &ContainerSpec, binds: Vec<String>) -> HostConfig {
    HostConfig {
        binds: Some(binds),
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
    }
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
pub(super) async fn wait_exit(docker: &Docker, name: &str) -> Result<i64, String> {
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
pub(super) async fn stop(docker: &Docker, name: &str, grace: Duration) {
    let t = grace.as_secs().max(1).min(i32::MAX as u64) as i32;
    if let Err(e) = docker.stop_container(name, Some(StopContainerOptionsBuilder::new().t(t).build())).await {
        // 304: already stopped.
        if status(&e) != Some(304) {
            tracing::warn!(container = name, error = %message(&e), "cannot stop the container");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_map_to_docker_exit_codes() {
        assert_eq!(start_failure_code("exec: \"nosuch\": executable file not found in $PATH: unknown"), 127);
        assert_eq!(start_failure_code("exec: \"/x\": permission denied: unknown"), 126);
        assert_eq!(start_failure_code("something else"), 125);
    }
}
