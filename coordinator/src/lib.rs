//! berth-coordinator: the job store, lease recovery, budget, worker registry and log
//! store actors, and the QUIC endpoint that serves clients and workers.

pub mod actors;
pub mod config;
pub mod conn;
pub mod datadir;
pub mod lease;
pub mod ledger;
pub mod pools;
pub mod scheduler;
pub mod server;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use berth_shared::profile::Profile;
use berth_shared::wire::Role;
use chrono::Utc;

use crate::actors::{
    budget::Budget, job_store::JobStore, lease_recovery::LeaseRecovery, log_store::LogStore, reader::StoreReader, registry::WorkerRegistry, Actors,
};
use crate::config::RunConfig;
use crate::datadir::{DataDir, DataDirError};
use crate::store::cluster::Leadership;
use crate::store::engine::create_token;
use crate::store::{Location, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: berth_shared::profile::ProfileError,
    },
}

/// A started coordinator: actors running, endpoint bound, not yet serving.
pub struct Coordinator {
    endpoint: quinn::Endpoint,
    shared: Arc<conn::Shared>,
    addr: SocketAddr,
}

impl Coordinator {
    /// Opens the store, starts the actors and binds the endpoint. Must run inside an
    /// actix system.
    pub async fn start(cfg: &RunConfig) -> Result<Coordinator, CoordError> {
        let dir = DataDir::new(&cfg.data_dir);
        let ca = dir.ca()?;
        let ca_pem = dir.ca_pem()?;
        let server_cert = dir.server()?;
        let location = Location::parse(cfg.store.as_deref(), &dir.database()).map_err(CoordError::Usage)?;
        let pools = match &cfg.pools {
            Some(f) => crate::pools::Pools::from_file(f).map_err(CoordError::Usage)?,
            None => crate::pools::Pools::default(),
        };
        let pools = Arc::new(pools);
        let store = location.writer(pools.clone(), cfg.lease_ttl)?;
        let readers: Vec<_> = (0..2).map(|_| location.reader()).collect::<Result<_, _>>()?;
        // The store's files exist now: none may be readable by anyone else.
        dir.tighten()?;
        let readers = std::sync::Mutex::new(readers);
        let for_readers = location.clone();
        let reader = SyncArbiter::start(2, move || {
            // Each arbiter thread takes one of the connections opened above.
            let conn = readers.lock().ok().and_then(|mut v| v.pop());
            StoreReader::new(conn.unwrap_or_else(|| for_readers.reader().unwrap_or_else(|e| panic!("cannot open a read connection: {e}"))))
        });
        let max_output = cfg.max_output.unwrap_or(config::DEFAULT_MAX_OUTPUT);
        let job_store = JobStore::new(store.clone(), cfg.lease_ttl, max_output).start();
        // No lease expires before its worker had a full TTL to reconnect to us.
        let renewed = job_store.send(actors::job_store::RestartLeases {}).await.map_err(|_| StoreError::Stopped)??;
        if renewed > 0 {
            tracing::info!(leases = renewed, ttl = ?cfg.lease_ttl, "running leases get a full TTL after the restart");
        }
        let every = (cfg.lease_ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let leadership = match &location {
            Location::Postgres(url) => Leadership::campaign(url.clone(), cfg.name.clone(), every),
            Location::Sqlite(_) => Leadership::always(),
        };
        tracing::info!(store = %location.describe(), "job store open");
        let registry = WorkerRegistry::default().start();
        let actors = Actors {
            lease_recovery: LeaseRecovery::new(job_store.clone(), registry.clone().recipient(), every, leadership).start(),
            log_store: LogStore::new(store.clone()).start(),
            registry,
            budget: Budget::new(pools, cfg.pools.clone(), job_store.clone()).start(),
            reader,
            job_store,
        };
        let endpoint = server::bind(cfg.listen, &ca_pem, &server_cert).map_err(|source| CoordError::Bind { addr: cfg.listen, source })?;
        let addr = endpoint.local_addr().map_err(|source| CoordError::Bind { addr: cfg.listen, source })?;
        let shared = Arc::new(conn::Shared::new(actors, cfg.lease_ttl, cfg.name.clone(), ca));
        let _ = dir.write(&dir.addr_file(), format!("{addr}\n").as_bytes());
        Ok(Coordinator { endpoint, shared, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn actors(&self) -> Actors {
        self.shared.actors.clone()
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        server::serve(self.endpoint.clone(), self.shared, shutdown).await;
        self.endpoint.wait_idle().await;
    }
}

/// `berth-coordinator init`.
pub fn init(data_dir: &Path, names: &[String]) -> Result<bool, CoordError> {
    for n in names {
        if n.trim().is_empty() {
            return Err(CoordError::Usage("--name must not be empty".into()));
        }
    }
    let dir = DataDir::new(data_dir);
    let made = dir.init(names)?;
    // Create the database too, so `token create` works before the first `run`.
    Location::Sqlite(dir.database()).connect()?;
    dir.tighten()?;
    Ok(made)
}

/// `berth-coordinator token create`.
pub fn token_create(data_dir: &Path, store: Option<&str>, role: &str, ttl: Duration) -> Result<String, CoordError> {
    check_token_ttl(ttl).map_err(CoordError::Usage)?;
    if role != "worker" {
        return Err(CoordError::Usage(format!("join tokens are for role worker, not `{role}`; users get a profile from `user add`")));
    }
    let dir = DataDir::new(data_dir);
    dir.ca_pem()?;
    let location = Location::parse(store, &dir.database()).map_err(CoordError::Usage)?;
    let mut db = location.connect()?;
    Ok(create_token(db.as_mut(), role, ttl, Utc::now())?)
}

/// The longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A join token lives for more than zero time (one that is born expired enrols no one)
/// and at most `MAX_TOKEN_TTL`.
pub fn check_token_ttl(ttl: Duration) -> Result<(), String> {
    if ttl.is_zero() {
        return Err("a join token's --ttl must be more than zero, e.g. 1h".into());
    }
    if ttl > MAX_TOKEN_TTL {
        return Err("a join token's --ttl may be at most 365d: make a new token when it runs out".into());
    }
    Ok(())
}

/// `berth-coordinator user add`: issues a certificate and writes a client profile.
pub fn user_add(data_dir: &Path, name: &str, role: &str, coordinators: Vec<String>, server_name: &str, out: &Path) -> Result<Profile, CoordError> {
    let parsed = match Role::parse(role) {
        Some(Role::Worker) | None => {
            return Err(CoordError::Usage(format!("unknown user role `{role}`: use admin, approver or submitter")));
        }
        Some(r) => r,
    };
    let dir = DataDir::new(data_dir);
    let ca = dir.ca()?;
    let coordinators = if coordinators.is_empty() { vec![dir.last_addr().unwrap_or_else(|| "127.0.0.1:7447".into())] } else { coordinators };
    let id = ca.issue_client(name, parsed).map_err(|e| CoordError::Usage(e.to_string()))?;
    let profile = Profile {
        user: name.to_string(),
        role: role.to_string(),
        coordinators,
        server_name: server_name.to_string(),
        ca: ca.cert_pem().to_string(),
        cert: id.cert_pem,
        key: id.key_pem,
    };
    profile.write(out).map_err(|source| CoordError::Write { path: out.display().to_string(), source })?;
    Ok(profile)
}
