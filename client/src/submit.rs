//! `berth submit`: build a job from flags or a job.toml, submit it (with an
//! idempotency key, so a retried submission does not enqueue twice), and optionally
//! wait for it or follow its output.

use std::io::IsTerminal;
use std::time::Duration;

use berth_shared::duration::{parse_duration, parse_size_bytes, parse_size_mib};
use berth_shared::ids::{JobId, JobSelector};
use berth_shared::job::{ArrayRange, Command, Executor, JobSpec, JobState};
use berth_shared::wire::{OutStream, Request, Response};
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{unexpected, Client};
use crate::exit::{Fail, EXIT_FAILURE};
use crate::out::{note, out};
use crate::show::{self, Style};

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

pub fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if c.is_finite() && c > 0.0 && c <= 4096.0 => Ok(c),
        _ => Err(format!("`{s}` is not a positive number of CPUs")),
    }
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// A name shown in listings: printable text of at most 256 bytes (no control characters).
    #[arg(long)]
    pub name: Option<String>,
    /// Submit an array of tasks START-END; each gets BERTH_ARRAY_INDEX.
    #[arg(long, value_parser = |s: &str| s.parse::<ArrayRange>())]
    pub array: Option<ArrayRange>,
    /// Set KEY=VALUE in the job's environment (repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Set NAME in the job from the worker's variable VAR, at run time (repeatable).
    #[arg(long = "secret", value_parser = parse_kv, value_name = "NAME=VAR")]
    pub secrets: Vec<(String, String)>,
    /// Kill the job after this long (30s, 5m, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub max_runtime: Option<Duration>,
    /// How many attempts before a job whose worker dies is failed.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: Option<u32>,
    /// CPUs to set aside for each task, e.g. 2 or 0.5 (default: none reserved).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// Memory, e.g. 512M or 2G.
    #[arg(long, value_parser = parse_size_mib)]
    pub mem: Option<u64>,
    /// The most output an attempt may store, e.g. 100M or 2G: past it the job fails and
    /// is killed, its output kept up to the cap (default: the coordinator's).
    #[arg(long, value_parser = parse_size_bytes, value_name = "SIZE")]
    pub max_output: Option<u64>,
    /// GPUs (whole devices); the job sees only the ones it was given.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub gpus: Option<u32>,
    /// Only GPUs whose model name contains this (case-insensitive), e.g. H100.
    #[arg(long)]
    pub gpu_model: Option<String>,
    /// Only GPUs with at least this much memory, e.g. 40G.
    #[arg(long, value_parser = parse_size_mib)]
    pub min_vram: Option<u64>,
    /// Only workers with this label KEY=VALUE (repeatable).
    #[arg(long = "label-constraint", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub constraints: Vec<(String, String)>,
    /// Wait for JOB to end first: `JOB` or `JOB:ok` (run only if it succeeded) or `JOB:any` (repeatable).
    #[arg(long = "after", value_parser = |s: &str| s.parse::<berth_shared::job::Dependency>(), value_name = "JOB[:ok|:any]")]
    pub after: Vec<berth_shared::job::Dependency>,
    /// The account the job is charged to and capped by (default: your own user).
    #[arg(long)]
    pub account: Option<String>,
    /// Only run in these pools (repeatable).
    #[arg(long = "pool")]
    pub pools: Vec<String>,
    /// Run in a container of this image, on a worker offering the docker executor, with
    /// the workspace at /workspace. Workers do not pull: the image must be on them.
    #[arg(long, value_parser = |s: &str| berth_shared::job::validate_image(s).map(|()| s.to_string()))]
    pub image: Option<String>,
    /// The container's network: `none` (the default), `bridge` or a network's name.
    #[arg(long, value_parser = |s: &str| berth_shared::job::validate_network(s).map(|()| s.to_string()))]
    pub network: Option<String>,
    /// Higher runs first among your account's queued jobs (default 0; may be negative).
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// Wait for the job and exit with its exit code (an array: 0 only if every task succeeded).
    #[arg(long)]
    pub wait: bool,
    /// Stream the job's output, then exit with its exit code.
    #[arg(long)]
    pub follow: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The submission's idempotency key (default: a new random one). Submitting again
    /// with the same key returns the first job instead of making another; the client
    /// itself resends with its key when the coordinator is lost mid-submit.
    #[arg(long, value_name = "UUID")]
    pub idempotency_key: Option<uuid::Uuid>,
    /// A job.toml describing the job (flags override its fields).
    #[arg(value_name = "JOB.toml")]
    pub job_file: Option<std::path::PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The spec from a job file or the command line; flags override the file.
pub fn build_spec(a: &SubmitArgs) -> Result<JobSpec, Fail> {
    let mut spec = match (&a.job_file, a.command.as_slice()) {
        (None, []) => return Err(Fail::usage("nothing to run: give `-- CMD ARGS...` or a job.toml")),
        (Some(_), [_, ..]) => return Err(Fail::usage("give either a job.toml or `-- CMD ARGS...`, not both")),
        (Some(f), []) if f.extension().is_some_and(|e| e == "toml") => berth_shared::jobfile::load(f).map_err(Fail::usage)?,
        (Some(f), []) => return Err(Fail::usage(format!("`{}` is not a job.toml: put the command after `--`, as in `berth submit -- CMD ARGS`", f.display()))),
        (None, argv) => JobSpec::new(Command::Argv(argv.to_vec())),
    };
    if a.name.is_some() {
        spec.name = a.name.clone();
    }
    if a.array.is_some() {
        spec.array = a.array;
    }
    spec.env.extend(a.env.iter().cloned());
    spec.secrets.extend(a.secrets.iter().cloned());
    if let Some(d) = a.max_runtime {
        if d.is_zero() {
            return Err(Fail::usage("--max-runtime must be more than zero"));
        }
        spec.max_runtime_ms = Some(d.as_millis() as u64);
    }
    if let Some(n) = a.attempts {
        spec.max_attempts = n;
    }
    if let Some(c) = a.cpus {
        spec.resources.millicpus = (c * 1000.0).round() as u32;
    }
    if let Some(m) = a.mem {
        spec.resources.mem_mib = m;
    }
    if a.max_output.is_some() {
        spec.max_output = a.max_output;
    }
    if let Some(g) = a.gpus {
        spec.resources.gpus = g;
    }
    if a.gpu_model.is_some() {
        spec.resources.gpu_model = a.gpu_model.clone();
    }
    if a.min_vram.is_some() {
        spec.resources.min_vram_mib = a.min_vram;
    }
    spec.constraints.extend(a.constraints.iter().cloned());
    spec.after.extend(a.after.iter().cloned());
    if a.account.is_some() {
        spec.account = a.account.clone();
    }
    if !a.pools.is_empty() {
        spec.pools = a.pools.clone();
    }
    if let Some(image) = &a.image {
        let network = match &spec.executor {
            Executor::Docker { network, .. } => network.clone(),
            Executor::Process => None,
        };
        spec.executor = Executor::Docker { image: image.clone(), network };
    }
    if let Some(n) = &a.network {
        match &mut spec.executor {
            Executor::Docker { network, .. } => *network = Some(n.clone()),
            Executor::Process => return Err(Fail::usage("--network applies to container jobs: give --image too")),
        }
    }
    berth_shared::job::check_user_labels(&spec.labels).map_err(Fail::usage)?;
    if let Some(p) = a.priority {
        spec.priority = p;
    }
    spec.validate().map_err(Fail::usage)?;
    Ok(spec)
}

pub async fn submit(client: &mut Client, a: &SubmitArgs, style: Style) -> Result<u8, Fail> {
    let spec = build_spec(a)?;
    let is_array = spec.array.is_some();
    let key = a.idempotency_key.unwrap_or_else(uuid::Uuid::new_v4);
    let resp = client.call_idempotent(&Request::Submit { spec, idempotency_key: key }, Duration::from_secs(60)).await?;
    let Response::Submitted { job, tasks, warning, .. } = resp else { return Err(unexpected(resp)) };
    if let Some(w) = warning {
        note!("warning: job {job} stays queued for now: {}", show::clean(&w));
    }
    if !a.wait && !a.follow {
        if a.json {
            out!("{}", serde_json::json!({ "id": job.to_string(), "tasks": tasks }))?;
        } else {
            out!("{job}")?;
        }
        return Ok(0);
    }
    note!("submitted {job}{}", if is_array { format!(" ({tasks} tasks)") } else { String::new() });
    let code = wait(client, job, is_array, a.follow, style).await?;
    if a.json {
        let st = client.call(&Request::Status { job: selector(job) }).await?;
        if let Response::Status(st) = st {
            out!("{}", show::status_json(&st))?;
        }
    }
    Ok(code)
}

pub fn selector(job: JobId) -> JobSelector {
    JobSelector { prefix: job.to_string(), index: None }
}

/// Writes output chunks where they belong, unchanged (they are the job's own bytes);
/// a closed pipe ends the command quietly (`Fail::quiet`), a follower included.
pub fn emit(stream: OutStream, data: &[u8], prefix: Option<&str>) -> Result<(), Fail> {
    let prefixed;
    let bytes = match prefix {
        None => data,
        Some(p) => {
            prefixed = data.split_inclusive(|b| *b == b'\n').flat_map(|line| p.as_bytes().iter().chain(line)).copied().collect::<Vec<u8>>();
            &prefixed
        }
    };
    match stream {
        OutStream::Stdout => crate::out::stdout(bytes),
        OutStream::Stderr => crate::out::stderr(bytes),
    }
}

/// Prints one task's output (all of it, or following it live).
pub async fn print_logs(client: &Client, sel: JobSelector, attempt: Option<u32>, follow: bool, prefix: Option<&str>) -> Result<(), Fail> {
    let mut r = client.open(&Request::Logs { job: sel, attempt, follow }).await?;
    while let Some(resp) = r.next().await? {
        match resp {
            Response::Output { stream, data } => emit(stream, &data, prefix)?,
            Response::End => break,
            other => return Err(unexpected(other)),
        }
    }
    Ok(())
}

fn exit_code_of(code: Option<i32>, state: JobState) -> u8 {
    match (code, state) {
        (Some(c), _) if (0..=255).contains(&c) => c as u8,
        (_, JobState::Succeeded) => 0,
        _ => EXIT_FAILURE,
    }
}

/// Waits until every task has ended; returns the exit code to exit with. With
/// `follow`, a single job's output streams live, and an array's tasks' output is
/// printed as each ends.
pub async fn wait(client: &Client, job: JobId, is_array: bool, follow: bool, style: Style) -> Result<u8, Fail> {
    if follow && !is_array {
        print_logs(client, selector(job), None, true, None).await?;
    }
    let mut r = client.open(&Request::Watch { job: selector(job), tasks: follow && is_array }).await?;
    let bar = (is_array && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let result = loop {
        let Some(resp) = r.next().await? else {
            break Err(Fail::new(EXIT_FAILURE, "the coordinator ended the watch early"));
        };
        match resp {
            Response::Progress { counts } => {
                if let Some(b) = &bar {
                    b.set_length(counts.total());
                    b.set_position(counts.total() - counts.unfinished());
                    b.set_message(show::counts_text(&counts));
                }
            }
            Response::TaskDone { index, attempt, state } => {
                let sel = JobSelector { prefix: job.to_string(), index };
                let label = index.map(|i| format!("[{i}] ")).unwrap_or_default();
                let print = async { print_logs(client, sel, Some(attempt), false, Some(&label)).await };
                match &bar {
                    Some(b) => {
                        b.suspend(|| note!("{label}{}", style.state(state)));
                        // Printing under suspend keeps the bar below the output.
                        print.await?;
                    }
                    None => {
                        note!("{label}{}", style.state(state));
                        print.await?;
                    }
                }
            }
            Response::Finished { state, counts, exit_code } => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let what = if is_array { format!(" ({})", show::counts_text(&counts)) } else { String::new() };
                let code = exit_code_of(exit_code, state);
                note!("job {job}: {}{what}, exit code {code}", style.state(state));
                break Ok(code);
            }
            other => break Err(unexpected(other)),
        }
    };
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SubmitArgs,
    }

    #[test]
    fn flags_build_a_spec() {
        let t = T::parse_from(["x", "--array", "1-10", "--env", "A=1", "--max-runtime", "5m", "--attempts", "2", "--", "echo", "-n", "hi"]);
        let spec = build_spec(&t.a).expect("valid");
        assert_eq!(spec.command, Command::Argv(vec!["echo".into(), "-n".into(), "hi".into()]));
        assert_eq!(spec.array.map(|r| r.len()), Some(10));
        assert_eq!(spec.max_runtime_ms, Some(300_000));
        assert_eq!(spec.max_attempts, 2);
        let empty = T::parse_from(["x"]);
        assert_eq!(build_spec(&empty.a).map_err(|f| f.code).err(), Some(crate::exit::EXIT_USAGE));
    }

    #[test]
    fn container_flags() {
        let t = T::parse_from(["x", "--image", "busybox:1.36", "--network", "bridge", "--mem", "32m", "--cpus", "0.5", "--", "true"]);
        let spec = build_spec(&t.a).expect("valid");
        assert_eq!(spec.executor, Executor::Docker { image: "busybox:1.36".into(), network: Some("bridge".into()) });
        assert_eq!((spec.resources.mem_mib, spec.resources.millicpus), (32, 500));
        assert!(T::try_parse_from(["x", "--image", "Not Valid", "--", "true"]).is_err());
        assert!(T::try_parse_from(["x", "--image", "a", "--network", "host", "--", "true"]).is_err());
        let t = T::parse_from(["x", "--network", "bridge", "--", "true"]);
        assert_eq!(build_spec(&t.a).map_err(|f| f.code).err(), Some(crate::exit::EXIT_USAGE));
    }
}
