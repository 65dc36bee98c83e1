//! The client profile: where the coordinators are and the certificate to use.
//! Written by `berth-coordinator user add` and `berth dev`, read by `berth`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::tls::CertKey;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub user: String,
    pub role: String,
    /// Coordinator addresses (`HOST:PORT`), tried in order.
    pub coordinators: Vec<String>,
    /// The name the coordinator's certificate is checked against.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

fn default_server_name() -> String {
    "localhost".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("profile {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write profile {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl Profile {
    pub fn from_file(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read { path: path.into(), source })?;
        let p: Profile = toml::from_str(&text).map_err(|e| ProfileError::Parse { path: path.into(), message: one_line(e.message()) })?;
        if p.coordinators.is_empty() {
            return Err(ProfileError::Parse { path: path.into(), message: "`coordinators` is empty".into() });
        }
        Ok(p)
    }

    /// Writes the profile readable by its owner only (it holds a private key).
    pub fn write(&self, path: &Path) -> Result<(), ProfileError> {
        let text = format!(
            "# berth client profile for {} (role {}); keep it private: it holds a key.\n{}",
            self.user,
            self.role,
            toml::to_string(self).map_err(|e| ProfileError::Parse { path: path.into(), message: e.to_string() })?
        );
        write_private(path, text.as_bytes()).map_err(|source| ProfileError::Write { path: path.into(), source })
    }

    pub fn identity(&self) -> CertKey {
        CertKey { cert_pem: self.cert.clone(), key_pem: self.key.clone() }
    }
}

/// Writes a file with mode 0600, replacing it atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let tmp = path.with_extension("tmp~");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
