//! The coordinator's data directory: CA, server certificate, database, and the
//! address file the last `run` wrote.

use std::path::{Path, PathBuf};

use berth_shared::profile::write_private;
use berth_shared::tls::{Ca, CertKey};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{path} is not initialised: run `berth-coordinator init --data-dir {dir}` first")]
    NotInitialised { path: PathBuf, dir: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Tls {
        path: PathBuf,
        #[source]
        source: berth_shared::tls::TlsError,
    },
}

pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        DataDir { root: root.to_path_buf() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    pub fn database(&self) -> PathBuf {
        self.root.join("berth.db")
    }
    pub fn addr_file(&self) -> PathBuf {
        self.root.join("coordinator.addr")
    }

    pub fn is_initialised(&self) -> bool {
        self.ca_cert().exists() && self.ca_key().exists()
    }

    /// Makes the CA and server certificate. Refuses to overwrite an existing CA
    /// (that would orphan every certificate it issued).
    pub fn init(&self, names: &[String]) -> Result<bool, DataDirError> {
        if self.is_initialised() {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.root).map_err(|source| DataDirError::Write { path: self.root.clone(), source })?;
        let tls = |source| DataDirError::Tls { path: self.root.clone(), source };
        let ca = Ca::generate(names.first().map(String::as_str).unwrap_or("coordinator")).map_err(tls)?;
        let server = ca.issue_server(names).map_err(tls)?;
        self.write(&self.ca_key(), ca.key_pem().as_bytes(), true)?;
        self.write(&self.server_key(), server.key_pem.as_bytes(), true)?;
        self.write(&self.server_cert(), server.cert_pem.as_bytes(), false)?;
        self.write(&self.ca_cert(), ca.cert_pem().as_bytes(), false)?;
        Ok(true)
    }

    fn write(&self, path: &Path, bytes: &[u8], private: bool) -> Result<(), DataDirError> {
        let r = if private { write_private(path, bytes) } else { std::fs::write(path, bytes) };
        r.map_err(|source| DataDirError::Write { path: path.to_path_buf(), source })
    }

    fn read(&self, path: &Path) -> Result<String, DataDirError> {
        if !self.is_initialised() {
            return Err(DataDirError::NotInitialised { path: path.to_path_buf(), dir: self.root.clone() });
        }
        std::fs::read_to_string(path).map_err(|source| DataDirError::Read { path: path.to_path_buf(), source })
    }

    pub fn ca(&self) -> Result<Ca, DataDirError> {
        let cert = self.read(&self.ca_cert())?;
        let key = self.read(&self.ca_key())?;
        Ca::load(&cert, &key).map_err(|source| DataDirError::Tls { path: self.ca_cert(), source })
    }

    pub fn ca_pem(&self) -> Result<String, DataDirError> {
        self.read(&self.ca_cert())
    }

    pub fn server(&self) -> Result<CertKey, DataDirError> {
        Ok(CertKey { cert_pem: self.read(&self.server_cert())?, key_pem: self.read(&self.server_key())? })
    }

    /// The address the last `run` served on, if any.
    pub fn last_addr(&self) -> Option<String> {
        std::fs::read_to_string(self.addr_file()).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }
}
