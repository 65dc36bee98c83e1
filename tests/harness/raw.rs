//! A raw protocol client: connects with a profile's certificate and speaks frames
//! directly, so tests can send what the real client never would; and a raw worker.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use berth_shared::codec::{read_frame, write_frame};
use berth_shared::dial::{client_endpoint, dial, Dialed};
use berth_shared::ids::{JobId, JobSelector, LeaseId};
use berth_shared::job::{Command as JobCommand, JobSpec};
use berth_shared::profile::Profile;
use berth_shared::session::SessionSpec;
use berth_shared::tls::client_config;
use berth_shared::wire::{CoordMsg, Hello, HelloReply, HostInfo, OutputFrame, PeerKind, Request, Response, WorkerMsg, PROTOCOL_VERSION};

/// A process session with nothing asked for: an idle TTL of 10 minutes, a lifetime of an hour.
pub fn session_spec() -> JobSpec {
    let mut spec = JobSpec::new(JobCommand::Argv(Vec::new()));
    let s = SessionSpec { idle_ttl_ms: 600_000, max_lifetime_ms: 3_600_000 };
    spec.max_runtime_ms = Some(s.max_lifetime_ms);
    spec.max_attempts = 1;
    spec.session = Some(s);
    spec
}

pub struct Raw {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

impl Raw {
    /// Connects and completes the hello as a client.
    pub async fn connect(profile: &std::path::Path) -> Result<Raw> {
        let p = Profile::from_file(profile)?;
        let cfg = client_config(&p.ca, Some(&p.identity()))?;
        let endpoint = berth_shared::dial::client_endpoint(cfg, false)?;
        let addr = p.coordinators[0].parse()?;
        let conn = endpoint.connect(addr, "localhost")?.await?;
        let (mut s, mut r) = conn.open_bi().await?;
        write_frame(&mut s, &Hello { protocol: PROTOCOL_VERSION, software: "raw".into(), kind: PeerKind::Client }).await?;
        match read_frame::<_, HelloReply>(&mut r).await? {
            Some(HelloReply::Welcome { .. }) => Ok(Raw { endpoint, conn }),
            other => Err(anyhow!("hello failed: {other:?}")),
        }
    }

    /// Opens a session of `spec`; its id once it is ready.
    pub async fn open_session(&self, spec: JobSpec) -> Result<JobId> {
        let resps = self.request(&Request::OpenSession { spec, idempotency_key: uuid::Uuid::new_v4() }).await?;
        match resps.as_slice() {
            [.., Response::SessionReady { session, .. }] => Ok(*session),
            other => Err(anyhow!("open answered {other:?}")),
        }
    }

    /// Closes session `id`.
    pub async fn close_session(&self, id: JobId) -> Result<()> {
        match self.request(&Request::CloseSession { session: JobSelector { prefix: id.to_string(), index: None } }).await?.as_slice() {
            [Response::SessionClosed { .. }] => Ok(()),
            other => Err(anyhow!("close answered {other:?}")),
        }
    }

    /// Sends raw bytes on a new request stream.
    pub async fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        let (mut s, _r) = self.conn.open_bi().await?;
        s.write_all(bytes).await?;
        let _ = s.finish();
        Ok(())
    }

    pub async fn request(&self, req: &Request) -> Result<Vec<Response>> {
        let (mut s, mut r) = self.conn.open_bi().await?;
        write_frame(&mut s, req).await?;
        let _ = s.finish();
        let mut out = Vec::new();
        while let Some(resp) = tokio::time::timeout(Duration::from_secs(30), read_frame::<_, Response>(&mut r)).await?? {
            out.push(resp);
        }
        Ok(out)
    }

    /// Waits for the coordinator to close the connection; returns its reason.
    pub async fn closed_reason(&self, timeout: Duration) -> Result<String> {
        let e = tokio::time::timeout(timeout, self.conn.closed()).await?;
        Ok(match e {
            quinn::ConnectionError::ApplicationClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
            other => other.to_string(),
        })
    }
}

/// A raw worker: enrols through the wire like `berth-worker` does (a CSR and a join
/// token), then speaks the worker protocol frame by frame, so tests can send what a
/// real worker never would (leases it does not hold, chunks out of order).
pub struct RawWorker {
    pub name: String,
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    frames: tokio::sync::mpsc::UnboundedReceiver<CoordMsg>,
    /// Frames read while waiting for another one, in arrival order.
    pub seen: Vec<CoordMsg>,
    _endpoint: quinn::Endpoint,
}

impl RawWorker {
    /// Enrols `name` with `token` (certificate and key in `work_dir`), connects as a
    /// worker, registers holding `held`, and returns with the `Registered` answer.
    pub async fn enrol_and_register(
        coordinator: &str,
        ca_pem: &str,
        work_dir: &Path,
        name: &str,
        token: &str,
        held: Vec<LeaseId>,
    ) -> Result<(RawWorker, CoordMsg)> {
        let cfg = berth_worker::WorkerConfig {
            coordinators: vec![coordinator.to_string()],
            ca_pem: ca_pem.to_string(),
            join_token: Some(token.to_string()),
            work_dir: work_dir.to_path_buf(),
            name: name.to_string(),
            slots: 1,
            prefetch: 0,
            pool: "default".into(),
            labels: Vec::new(),
            executors: vec!["process".into()],
            server_name: None,
            contain: Default::default(),
            secrets: Default::default(),
            limits: Default::default(),
            docker: Default::default(),
        };
        let id = berth_worker::identity::load_or_enrol(&cfg).await?;
        let endpoint = client_endpoint(client_config(ca_pem, Some(&id))?, false)?;
        let d = dial(&endpoint, &cfg.coordinators, None, PeerKind::Worker, Duration::from_secs(10)).await?;
        let Dialed { conn, mut send, mut recv, .. } = d;
        let host = HostInfo { hostname: "raw".into(), cpus: 1, mem_mib: 1024, executors: vec!["process".into()], ..HostInfo::default() };
        write_frame(
            &mut send,
            &WorkerMsg::Register {
                name: name.to_string(),
                slots: 1,
                pool: "default".into(),
                labels: Vec::new(),
                host: Box::new(host),
                held,
                instance: uuid::Uuid::new_v4(),
            },
        )
        .await?;
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        // Reads are not cancellation-safe: one task reads, the test waits on the channel.
        tokio::spawn(async move {
            while let Ok(Some(m)) = read_frame::<_, CoordMsg>(&mut recv).await {
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        let mut w = RawWorker { name: name.to_string(), conn, send, frames, seen: Vec::new(), _endpoint: endpoint };
        let registered = w.expect("Registered", |m| matches!(m, CoordMsg::Registered { .. })).await?;
        Ok((w, registered))
    }

    pub async fn send(&mut self, m: &WorkerMsg) -> Result<()> {
        write_frame(&mut self.send, m).await?;
        Ok(())
    }

    /// Waits (10 s at most) for the next control frame that `want` accepts; frames
    /// passed over on the way are kept in `seen`.
    pub async fn expect(&mut self, what: &str, want: impl Fn(&CoordMsg) -> bool) -> Result<CoordMsg> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                Ok(Some(m)) if want(&m) => return Ok(m),
                Ok(Some(m)) => self.seen.push(m),
                Ok(None) => return Err(anyhow!("the coordinator closed the control stream while we waited for {what} (seen: {:?})", self.seen)),
                Err(_) => return Err(anyhow!("no {what} within 10 s (seen: {:?})", self.seen)),
            }
        }
    }

    /// Opens an attempt's output stream for `lease`.
    pub async fn open_output(&self, lease: LeaseId) -> Result<quinn::SendStream> {
        let mut s = self.conn.open_uni().await?;
        write_frame(&mut s, &OutputFrame::Open { lease }).await?;
        Ok(s)
    }
}
