//! The worker's identity: a certificate in its work dir, obtained once by enrolling
//! with a join token (the worker sends a CSR; its key never leaves the machine).

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_shared::codec::{read_frame, write_frame};
use berth_shared::dial::{client_endpoint, dial};
use berth_shared::profile::write_private;
use berth_shared::tls::{client_config, identity_of_pem, make_csr, CertKey};
use berth_shared::wire::{PeerKind, Request, Response, Role};

use crate::{WorkerConfig, WorkerError};

fn cert_path(dir: &Path) -> PathBuf {
    dir.join("worker.pem")
}

fn key_path(dir: &Path) -> PathBuf {
    dir.join("worker.key")
}

/// Loads the certificate from the work dir, enrolling first if there is none.
pub async fn load_or_enrol(cfg: &WorkerConfig) -> Result<CertKey, WorkerError> {
    std::fs::create_dir_all(&cfg.work_dir).map_err(|source| WorkerError::WorkDir { path: cfg.work_dir.clone(), source })?;
    let (cp, kp) = (cert_path(&cfg.work_dir), key_path(&cfg.work_dir));
    if cp.exists() && kp.exists() {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| WorkerError::WorkDir { path: p.to_path_buf(), source });
        let id = CertKey { cert_pem: read(&cp)?, key_pem: read(&kp)? };
        match identity_of_pem(&id.cert_pem) {
            Some((name, Role::Worker)) if name == cfg.name => {}
            Some((name, _)) => {
                return Err(WorkerError::Setup(format!(
                    "{} was enrolled as worker `{name}`, not `{}`: use --name {name} or another work dir",
                    cfg.work_dir.display(),
                    cfg.name
                )))
            }
            None => return Err(WorkerError::Setup(format!("{} does not hold a berth worker certificate", cp.display()))),
        }
        if cfg.join_token.is_some() {
            tracing::info!("already enrolled; the join token is not needed and was not used");
        }
        return Ok(id);
    }
    let Some(token) = &cfg.join_token else {
        return Err(WorkerError::Setup(format!(
            "{} holds no worker certificate: enrol once with --join-token (from `berth-coordinator token create --role worker`)",
            cfg.work_dir.display()
        )));
    };
    let (csr, key_pem) = make_csr(&cfg.name).map_err(|e| WorkerError::Setup(format!("worker name: {e}")))?;
    let tls = client_config(&cfg.ca_pem, None).map_err(|e| WorkerError::Setup(format!("--ca: {e}")))?;
    let ep = client_endpoint(tls, false).map_err(|source| WorkerError::WorkDir { path: cfg.work_dir.clone(), source })?;
    let d = dial(&ep, &cfg.coordinators, cfg.server_name.as_deref(), PeerKind::Enrol, Duration::from_secs(10)).await?;
    let (mut send, mut recv) = d.conn.open_bi().await.map_err(|e| WorkerError::Setup(format!("enrolment failed: {e}")))?;
    write_frame(&mut send, &Request::Enrol { token: token.clone(), name: cfg.name.clone(), csr_pem: csr })
        .await
        .map_err(|e| WorkerError::Setup(format!("enrolment failed: {e}")))?;
    let _ = send.finish();
    let cert_pem = match read_frame::<_, Response>(&mut recv).await {
        Ok(Some(Response::Enrolled { cert_pem })) => cert_pem,
        Ok(Some(Response::Error(e))) => return Err(WorkerError::Refused(e.message)),
        Ok(other) => return Err(WorkerError::Setup(format!("enrolment failed: unexpected answer {other:?}"))),
        Err(e) => return Err(WorkerError::Setup(format!("enrolment failed: {e}"))),
    };
    d.conn.close(0u32.into(), b"enrolled");
    let w = |p: &Path, b: &str| write_private(p, b.as_bytes()).map_err(|source| WorkerError::WorkDir { path: p.to_path_buf(), source });
    w(&kp, &key_pem)?;
    w(&cp, &cert_pem)?;
    tracing::info!(name = %cfg.name, "enrolled; certificate stored in the work dir");
    Ok(CertKey { cert_pem, key_pem })
}
