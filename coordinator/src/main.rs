//! `berth-coordinator`: parse flags, start tracing, call the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use berth_coordinator::config::{ConfigFile, RunConfig};
use berth_shared::duration::parse_duration;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "berth-coordinator", version, about = "The berth coordinator: job store, leases, budget, workers and logs")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make the CA and the server certificate in a new data directory.
    Init {
        /// The new data directory (CA, keys, database).
        #[arg(long)]
        data_dir: PathBuf,
        /// A host name or address clients use to reach this coordinator (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Join tokens for workers.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Client users.
    User {
        #[command(subcommand)]
        command: UserCmd,
    },
    /// Serve clients and workers.
    Run {
        /// The data directory made by `init`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// How long a lease lives without a heartbeat.
        #[arg(long, value_parser = parse_duration)]
        lease_ttl: Option<Duration>,
        /// The job store: `postgres://USER@HOST/DB` to share one database among
        /// several coordinators (default: the embedded SQLite file in the data dir).
        #[arg(long, env = "BERTH_STORE", hide_env_values = true)]
        store: Option<String>,
        /// The pools file: `[[pool]]` tables with kinds and rates (default: one free
        /// pool named `default`). Reloaded on SIGHUP.
        #[arg(long)]
        pools: Option<PathBuf>,
        /// A coordinator.toml; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a one-time join token alone on stdout.
    Create {
        /// The coordinator's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The role the token enrols: worker.
        #[arg(long)]
        role: String,
        /// How long the token can be used: more than zero, at most 365d.
        #[arg(long, default_value = "1h", value_parser = parse_token_ttl, allow_hyphen_values = true)]
        ttl: Duration,
        /// The job store, as for `run --store`.
        #[arg(long, env = "BERTH_STORE", hide_env_values = true)]
        store: Option<String>,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Issue a certificate for a user and write their profile.
    Add {
        /// The user's name (the certificate's subject; their jobs' owner).
        name: String,
        /// admin, approver or submitter.
        #[arg(long)]
        role: String,
        /// The coordinator's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the profile (private: it holds the user's key).
        #[arg(long)]
        out: PathBuf,
        /// Coordinator address for the profile (repeatable; default: where the last `run` listened).
        #[arg(long = "coordinator")]
        coordinators: Vec<String>,
        /// The name the coordinator's certificate is checked against.
        #[arg(long, default_value = "localhost")]
        server_name: String,
    },
}

/// `--ttl` of a join token: a duration, more than zero and at most a year.
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    let ttl = if s.trim_start().starts_with('-') { Duration::ZERO } else { parse_duration(s)? };
    berth_coordinator::check_token_ttl(ttl)?;
    Ok(ttl)
}

fn main() -> ExitCode {
    // The data dir holds keys and env values: nothing made here is anyone else's to read.
    berth_coordinator::datadir::private_umask();
    let cli = Cli::parse();
    berth_shared::logs::init("info");
    berth_shared::logs::exit(real_main(cli))
}

use berth_shared::logs::chain;

fn fail(e: berth_coordinator::CoordError) -> (u8, String) {
    let code = if matches!(e, berth_coordinator::CoordError::Usage(_)) { 2 } else { 1 };
    (code, chain(&e))
}

fn real_main(cli: Cli) -> Result<(), (u8, String)> {
    match cli.command {
        Cmd::Init { data_dir, names } => {
            let made = berth_coordinator::init(&data_dir, &names).map_err(fail)?;
            if made {
                println!("initialised {}: CA certificate at {}", data_dir.display(), data_dir.join("ca.pem").display());
            } else {
                println!("{} is already initialised; nothing changed", data_dir.display());
            }
            Ok(())
        }
        Cmd::Token { command: TokenCmd::Create { data_dir, role, ttl, store } } => {
            let token = berth_coordinator::token_create(&data_dir, store.as_deref(), &role, ttl).map_err(fail)?;
            println!("{token}");
            Ok(())
        }
        Cmd::User { command: UserCmd::Add { name, role, data_dir, out, coordinators, server_name } } => {
            let p = berth_coordinator::user_add(&data_dir, &name, &role, coordinators, &server_name, &out).map_err(fail)?;
            eprintln!("wrote {} for {} (role {}, coordinator {})", out.display(), p.user, p.role, p.coordinators.join(", "));
            Ok(())
        }
        Cmd::Run { data_dir, listen, lease_ttl, store, pools, config } => {
            let file = match &config {
                Some(p) => ConfigFile::from_file(p).map_err(|e| (2, chain(&e)))?,
                None => ConfigFile::default(),
            };
            let max_output = file.max_output_bytes().map_err(|e| (2, e))?;
            let data_dir = data_dir.or(file.data_dir).ok_or((2, "--data-dir is required (or data_dir in --config)".to_string()))?;
            let listen = match (listen, file.listen) {
                (Some(l), _) => l,
                (None, Some(l)) => l.parse().map_err(|_| (2, format!("listen `{l}` is not HOST:PORT")))?,
                (None, None) => "0.0.0.0:7447".parse().map_err(|_| (2, "bad default".to_string()))?,
            };
            let lease_ttl = match (lease_ttl, file.lease_ttl) {
                (Some(t), _) => t,
                (None, Some(t)) => parse_duration(&t).map_err(|e| (2, e))?,
                (None, None) => Duration::from_secs(30),
            };
            if lease_ttl < Duration::from_millis(500) {
                return Err((2, "--lease-ttl must be at least 500ms".into()));
            }
            let name = hostname();
            let cfg = RunConfig { data_dir, listen, lease_ttl, store: store.or(file.store), pools: pools.or(file.pools), name, max_output };
            let system = actix_rt::System::new();
            system.block_on(async move {
                let coord = berth_coordinator::Coordinator::start(&cfg).await.map_err(fail)?;
                reload_on_sighup(coord.actors().budget.clone());
                println!("ready addr={}", coord.local_addr());
                tracing::info!(addr = %coord.local_addr(), data_dir = %cfg.data_dir.display(), "coordinator ready");
                coord.serve(shutdown_signal()).await;
                tracing::info!("coordinator stopped");
                Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "coordinator".into())
}

/// SIGHUP re-reads the pools file; a file that does not parse leaves the pools as they were.
fn reload_on_sighup(budget: actix::Addr<berth_coordinator::actors::budget::Budget>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    actix_rt::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = budget.send(berth_coordinator::actors::budget::Reload).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        let missing = berth_shared::cli::arguments_without_help(&Cli::command(), "berth-coordinator");
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn a_token_ttl_is_positive_and_bounded() {
        assert_eq!(parse_token_ttl("10m"), Ok(Duration::from_secs(600)));
        for bad in ["0", "0s", "0ms", "-5m", "366d", "1000000000d"] {
            assert!(parse_token_ttl(bad).is_err(), "{bad}");
        }
    }
}
