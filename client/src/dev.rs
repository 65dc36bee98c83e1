//! `berth dev`: a coordinator (embedded store) and one local worker in one process,
//! a profile for them, and optionally a demo batch.

use std::path::PathBuf;
use std::time::Duration;

use berth_coordinator::config::RunConfig;
use berth_shared::profile::write_private;
use berth_shared::wire::Role;
use berth_worker::WorkerConfig;

use crate::api::Client;
use crate::exit::{Fail, EXIT_FAILURE};
use crate::out::{note, out};
use crate::show::Style;
use crate::submit;

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where the dev cluster keeps its CA, database and workspaces.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Slots of the local worker (default: one per CPU).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Run a demo batch, show its progress and output, and exit.
    #[arg(long)]
    pub demo: bool,
    /// Where the coordinator listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Executors the local worker offers (comma-separated): process, docker (offered
    /// when the Docker engine answers).
    #[arg(long = "executor", value_delimiter = ',', default_value = "process")]
    pub executors: Vec<String>,
}

fn default_dir() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state")));
    match state {
        Some(s) => s.join("berth").join("dev"),
        None => PathBuf::from(".berth-dev"),
    }
}

fn fail(e: impl std::fmt::Display) -> Fail {
    Fail::new(EXIT_FAILURE, e.to_string())
}

pub fn run(args: DevArgs) -> Result<u8, Fail> {
    // The dev cluster's data dir holds keys and env values, as a coordinator's does.
    berth_coordinator::datadir::private_umask();
    let dir = args.data_dir.clone().unwrap_or_else(default_dir);
    let slots = args.slots.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    if slots == 0 || slots > 4096 {
        return Err(Fail::usage(format!("--slots {slots} is out of range: use 1 to 4096")));
    }
    if let Some(bad) = args.executors.iter().find(|e| !berth_worker::executor::names().any(|n| n == e.as_str())) {
        let known: Vec<&str> = berth_worker::executor::names().collect();
        return Err(Fail::usage(format!("--executor {bad}: unknown (berth knows {})", known.join(", "))));
    }
    berth_coordinator::init(&dir, &[]).map_err(fail)?;

    // The coordinator runs its actors on its own actix system thread.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<std::net::SocketAddr, String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = RunConfig {
        data_dir: dir.clone(),
        listen: args.listen,
        lease_ttl: Duration::from_secs(30),
        store: None,
        pools: None,
        name: "dev".into(),
        max_output: None,
    };
    let coordinator = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            system.block_on(async move {
                match berth_coordinator::Coordinator::start(&cfg).await {
                    Ok(c) => {
                        let _ = addr_tx.send(Ok(c.local_addr()));
                        c.serve(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                    }
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                    }
                }
            })
        })
        .map_err(fail)?;
    let addr = addr_rx.recv().map_err(|_| fail("the coordinator did not start"))?.map_err(fail)?;

    // The worker's work dir is in here: its jobs run as slot users of their own, who must
    // pass through to their workspaces (nothing here can be listed; every file is 0600).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).map_err(fail)?;
    }
    let profile_path = dir.join("profile.toml");
    let profile = berth_coordinator::user_add(&dir, "dev", "admin", vec![addr.to_string()], "localhost", &profile_path).map_err(fail)?;
    let ca_pem = profile.ca.clone();
    // The dev worker trusts its own coordinator: issue its certificate directly.
    let work_dir = dir.join("worker");
    if !work_dir.join("worker.pem").exists() {
        let ca = berth_coordinator::datadir::DataDir::new(&dir).ca().map_err(fail)?;
        let id = ca.issue_client("local", Role::Worker).map_err(fail)?;
        write_private(&work_dir.join("worker.key"), id.key_pem.as_bytes()).map_err(fail)?;
        write_private(&work_dir.join("worker.pem"), id.cert_pem.as_bytes()).map_err(fail)?;
    }
    let wcfg = WorkerConfig {
        coordinators: vec![addr.to_string()],
        ca_pem,
        join_token: None,
        work_dir,
        name: "local".into(),
        slots,
        prefetch: 2,
        pool: "default".into(),
        labels: Vec::new(),
        executors: args.executors.clone(),
        server_name: Some("localhost".into()),
        contain: Default::default(),
        secrets: Default::default(),
        limits: Default::default(),
        docker: Default::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(fail)?;
    let code = rt.block_on(async move {
        let (wstop_tx, wstop_rx) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(berth_worker::run(wcfg, async {
            let _ = wstop_rx.await;
        }));
        // Nobody reading the ready line is no reason to stop the cluster.
        let _ = out!("ready profile={}", profile_path.display());
        let code = if args.demo {
            tokio::select! {
                r = demo(&profile) => r,
                _ = tokio::signal::ctrl_c() => Ok(130),
            }
        } else {
            note!(
                "berth dev: coordinator at {addr}, worker `local` with {slots} slots ({}); try `BERTH_PROFILE={} berth submit -- echo hi`; Ctrl-C stops",
                args.executors.join(", "),
                profile_path.display()
            );
            let _ = tokio::signal::ctrl_c().await;
            Ok(0)
        };
        let _ = wstop_tx.send(());
        match tokio::time::timeout(Duration::from_secs(10), worker).await {
            Ok(Ok(Err(e))) => note!("worker: {e}"),
            Err(_) => note!("the worker did not stop within 10 s"),
            _ => {}
        }
        code
    });
    let _ = stop_tx.send(());
    let _ = coordinator.join();
    code
}

async fn demo(profile: &berth_shared::profile::Profile) -> Result<u8, Fail> {
    let client = Client::with_profile(profile).await?;
    let style = Style::detect();
    let mut spec = berth_shared::job::JobSpec::new(berth_shared::job::Command::Script(
        "echo \"task $BERTH_ARRAY_INDEX of the demo, attempt $BERTH_ATTEMPT on $BERTH_WORKER in slot $BERTH_SLOT\"; sleep 0.2".into(),
    ));
    spec.name = Some("demo".into());
    spec.array = Some(berth_shared::job::ArrayRange { start: 1, end: 8 });
    spec.max_runtime_ms = Some(60_000);
    let resp = client.call(&berth_shared::wire::Request::Submit { spec, idempotency_key: uuid::Uuid::new_v4() }).await?;
    let berth_shared::wire::Response::Submitted { job, tasks, .. } = resp else { return Err(crate::api::unexpected(resp)) };
    note!("demo: submitted array {job} ({tasks} tasks)");
    let code = submit::wait(&client, job, true, true, style).await?;
    client.close();
    if code == 0 {
        note!("demo finished: every task succeeded");
    }
    Ok(code)
}
