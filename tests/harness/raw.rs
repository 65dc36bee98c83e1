//! A raw protocol client: connects with a profile's certificate and speaks frames
//! directly, so tests can send what the real client never would.

use std::time::Duration;

use anyhow::{anyhow, Result};
use berth_shared::codec::{read_frame, write_frame};
use berth_shared::profile::Profile;
use berth_shared::tls::client_config;
use berth_shared::wire::{Hello, HelloReply, PeerKind, Request, Response, PROTOCOL_VERSION};

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
