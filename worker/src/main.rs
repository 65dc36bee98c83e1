//! `berth-worker`: parse flags, start tracing, run the worker until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_worker::WorkerConfig;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "berth-worker",
    version,
    about = "A berth worker: claims jobs and runs them in slots",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Coordinator address HOST:PORT (repeatable, or comma-separated, for failover).
    #[arg(long = "coordinator", value_delimiter = ',', required_unless_present = "print_host")]
    coordinators: Vec<String>,
    /// The coordinator's CA certificate (its data dir's ca.pem).
    #[arg(long, required_unless_present = "print_host")]
    ca: Option<PathBuf>,
    /// One-time join token, needed only the first time (`berth-coordinator token create`).
    #[arg(long, env = "BERTH_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Where the certificate, slot workspaces and output spool live.
    #[arg(long, required_unless_present = "print_host")]
    work_dir: Option<PathBuf>,
    /// How many tasks run at once (default: one per GPU on GPU hosts, else one per CPU).
    #[arg(long)]
    slots: Option<usize>,
    /// Claimed tasks held ready beyond the free slots, so a slot that frees starts its next task at once.
    #[arg(long, default_value_t = 2)]
    prefetch: usize,
    /// The pool this worker belongs to.
    #[arg(long, default_value = "default")]
    pool: String,
    /// A label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The worker's name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Executors offered (comma-separated): process, docker (offered only when the
    /// Docker engine answers).
    #[arg(long = "executor", value_delimiter = ',', default_value = "process")]
    executors: Vec<String>,
    /// Up to N Docker sessions of one owner and one image share one container, each in
    /// a workspace directory of its own, the container's limits the sum of theirs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    docker_pack: u32,
    /// Keep N containers of IMG started and idle for Docker sessions (repeatable), so
    /// opening one does not wait for a container to start.
    #[arg(long = "warm", value_name = "IMG=N", value_parser = parse_warm)]
    warm: Vec<(String, usize)>,
    /// The most processes (and threads) one job may hold at once, in its cgroup or container.
    #[arg(long, alias = "docker-pids-limit", default_value_t = 4096, value_parser = clap::value_parser!(i64).range(16..=4_194_304))]
    pids_limit: i64,
    /// Run every process job as this user (name or uid) instead of a user per slot.
    #[arg(long)]
    job_user: Option<String>,
    /// When the worker runs as root: slot N's process jobs run as uid and gid BASE+N.
    #[arg(long, default_value_t = berth_worker::contain::identity::DEFAULT_SLOT_UID_BASE, value_parser = clap::value_parser!(u32).range(1..=2_000_000_000))]
    slot_uid_base: u32,
    /// Do not put process jobs in cgroups (their --cpus, --mem and pids are then not enforced).
    #[arg(long)]
    no_cgroups: bool,
    /// The secrets this worker holds for jobs: a TOML file naming each, its source and
    /// the accounts that may use it (see deploy/secrets.example.toml).
    #[arg(long)]
    secrets: Option<PathBuf>,
    /// The name the coordinator's certificate is checked against (default: the address's host).
    #[arg(long)]
    server_name: Option<String>,
    /// Use only these GPUs (indices, comma-separated), e.g. `--gpus 0,2`.
    #[arg(long, value_delimiter = ',')]
    gpus: Option<Vec<u32>>,
    /// Offer this many CPUs instead of all of them.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    cpus: Option<u32>,
    /// Offer this much memory instead of all of it, e.g. 64G.
    #[arg(long, value_parser = berth_shared::duration::parse_size_mib)]
    mem: Option<u64>,
    /// Print what this host has and exit.
    #[arg(long)]
    print_host: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Remove what this worker left behind: its containers whose lease it no longer
    /// holds or whose expiry passed, unfinished freeze images, and (when the worker is
    /// not running) its slot workspaces. Prints one line per thing removed. Touches
    /// nothing without berth's labels.
    Sweep {
        /// The worker's work dir.
        #[arg(long)]
        work_dir: PathBuf,
        /// The worker's name (default: the name it enrolled with, else the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// The agent of a Docker session: PID 1 of its container, running each exec asked
    /// for on the socket (the worker starts it; not for people).
    #[command(hide = true)]
    Agent {
        /// The unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, _)) if k.starts_with(berth_shared::job::SYSTEM_LABEL_PREFIX) => {
            Err(format!("label `{k}`: labels starting with `{}` are berth's own", berth_shared::job::SYSTEM_LABEL_PREFIX))
        }
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid label `{s}`: use KEY=VALUE")),
    }
}

/// `--warm IMG=N`: an image and how many of its containers to keep warm (1 to 64).
fn parse_warm(s: &str) -> Result<(String, usize), String> {
    let Some((image, n)) = s.rsplit_once('=') else { return Err(format!("invalid --warm `{s}`: use IMAGE=N")) };
    if image.is_empty() || image.contains(char::is_whitespace) {
        return Err(format!("invalid --warm `{s}`: the image name is empty or has spaces"));
    }
    match n.parse::<usize>() {
        Ok(n @ 1..=64) => Ok((image.to_string(), n)),
        _ => Err(format!("invalid --warm `{s}`: N must be a whole number from 1 to 64")),
    }
}

fn main() -> ExitCode {
    // What the worker makes (certificate, key, spool, workspaces) is its user's alone.
    // The work dir and its `slots/` are then 0700; the code that runs jobs as other
    // users opens those two to 0711 (traverse, not list) for them: keep that there and
    // everything else private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    berth_shared::logs::init("info");
    berth_shared::logs::exit(real_main(cli))
}

use berth_shared::logs::chain;

fn real_main(cli: Cli) -> Result<(), (u8, String)> {
    match cli.command {
        Some(Sub::Sweep { work_dir, name }) => return sweep(&work_dir, name),
        Some(Sub::Agent { socket }) => return berth_worker::agent::main(&socket).map_err(|e| (1, e)),
        None => {}
    }
    for e in &cli.executors {
        if !berth_worker::executor::names().any(|n| n == e) {
            let known: Vec<String> = berth_worker::executor::names().map(|n| format!("`{n}`")).collect();
            return Err((2, format!("unknown executor `{e}`: this worker offers {}", known.join(" and "))));
        }
    }
    let limits = berth_worker::host::HostLimits { gpus: cli.gpus.clone(), cpus: cli.cpus, mem_mib: cli.mem };
    let (host, gpu_source) = berth_worker::host::detect_limited(&cli.executors, &limits).map_err(|e| (2, e))?;
    tracing::debug!(?gpu_source, gpus = host.gpus.len(), "host detected");
    if cli.print_host {
        println!("{}", serde_json::to_string_pretty(&host).map_err(|e| (1, e.to_string()))?);
        return Ok(());
    }
    let (Some(ca), Some(work_dir)) = (cli.ca, cli.work_dir) else {
        return Err((2, "--ca and --work-dir are required".into()));
    };
    let ca_pem = std::fs::read_to_string(&ca).map_err(|e| (2, format!("cannot read --ca {}: {e}", ca.display())))?;
    let slots = cli.slots.unwrap_or(if host.gpus.is_empty() { host.cpus as usize } else { host.gpus.len() });
    if slots == 0 || slots > 4096 {
        return Err((2, format!("--slots {slots} is out of range: use 1 to 4096")));
    }
    let secrets = match &cli.secrets {
        Some(p) => berth_worker::secrets::Secrets::from_file(p).map_err(|e| (2, e))?,
        None => Default::default(),
    };
    let name = cli.name.unwrap_or_else(berth_worker::host::hostname);
    berth_shared::tls::validate_name(&name).map_err(|e| (2, format!("--name: {e}")))?;
    let cfg = WorkerConfig {
        coordinators: cli.coordinators,
        ca_pem,
        join_token: cli.join_token,
        work_dir,
        name,
        slots,
        prefetch: cli.prefetch.min(1024),
        pool: cli.pool,
        labels: cli.labels,
        executors: cli.executors,
        server_name: cli.server_name,
        limits,
        contain: berth_worker::contain::ContainConfig {
            job_user: cli.job_user,
            slot_uid_base: cli.slot_uid_base,
            pids_limit: cli.pids_limit,
            cgroups: !cli.no_cgroups,
        },
        secrets,
        docker: berth_worker::executor::docker::DockerOptions { pack: cli.docker_pack as usize, warm: cli.warm },
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| (1, format!("cannot start the runtime: {e}")))?;
    rt.block_on(berth_worker::session::run_on_host(cfg, host, shutdown_signal())).map_err(|e| (1, chain(&e)))
}

/// `berth-worker sweep`: what `sweep.rs` says, on demand; one line per thing removed on
/// stdout, what could not be done on stderr (and exit 1).
fn sweep(work_dir: &std::path::Path, name: Option<String>) -> Result<(), (u8, String)> {
    use berth_worker::sweep::{self, Held, Swept};
    let work_dir = std::fs::canonicalize(work_dir).map_err(|e| (2, format!("--work-dir {}: {e}", work_dir.display())))?;
    let name = match name {
        Some(n) => n,
        None => std::fs::read_to_string(work_dir.join("worker.pem"))
            .ok()
            .and_then(|pem| berth_shared::tls::identity_of_pem(&pem))
            .map(|(n, _)| n)
            .unwrap_or_else(berth_worker::host::hostname),
    };
    berth_shared::tls::validate_name(&name).map_err(|e| (2, format!("--name: {e}")))?;
    let lock = sweep::lock_work_dir(&work_dir).map_err(|e| (1, format!("cannot open the work dir's lock: {e}")))?;
    let held = match &lock {
        Some(_) => Held::Nothing,
        None => Held::Leases(sweep::records(&work_dir)),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| (1, format!("cannot start the runtime: {e}")))?;
    let mut out = Swept::default();
    match sweep::cluster_of(&work_dir) {
        // Containers are found by worker and cluster; a worker that never offered the
        // docker executor here has made none.
        None => eprintln!("{} has no {}: this worker never ran with the docker executor; no containers to sweep", work_dir.display(), sweep::CLUSTER_FILE),
        Some(cluster) => rt.block_on(async {
            match berth_worker::executor::docker::Engine::connect(std::time::Duration::from_secs(10), cluster).await {
                Ok(engine) => {
                    sweep::containers(&engine, &name, &held, sweep::now_secs(), &mut out).await;
                    if lock.is_some() {
                        sweep::images(&engine, &name, &mut out).await;
                    }
                }
                Err(e) => out.failed.push(format!("containers not swept: {}", chain(&e))),
            }
        }),
    }
    if lock.is_some() {
        sweep::workspaces(&work_dir, &mut out);
    }
    for line in &out.removed {
        println!("removed {line}");
    }
    for line in &out.failed {
        eprintln!("error: {line}");
    }
    let running = if lock.is_none() { " (the worker is running: only what it does not hold)" } else { "" };
    eprintln!("swept {} thing{} for worker {name}{running}", out.removed.len(), if out.removed.len() == 1 { "" } else { "s" });
    if out.failed.is_empty() {
        Ok(())
    } else {
        Err((1, format!("{} thing(s) could not be swept", out.failed.len())))
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return std::future::pending().await };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of the worker says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        let missing = berth_shared::cli::arguments_without_help(&Cli::command(), "berth-worker");
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
