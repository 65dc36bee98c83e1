//! The coordinator's data directory: CA, server certificate, database, and the
//! address file the last `run` wrote.
//!
//! Everything in it is the coordinator's user's alone: the directory 0700, its files
//! 0600 (keys, and env values in the database). The binaries make files under umask
//! 077 (`private_umask`), and a start tightens what an older version left looser
//! (`tighten`).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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

/// Makes every file and directory this process creates from now on private to its
/// user (umask 077). The binaries call it first thing.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// A mode `tighten` changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tightened {
    pub path: PathBuf,
    pub from: u32,
    pub to: u32,
}

/// Takes group and other permissions off `path` (not following a symlink). With
/// `traverse_only_ok`, a directory that is exactly traverse-only for others (0711: nothing
/// in it can be listed, and every file is 0600) is left so: `berth dev` opens its data dir
/// that far for its worker's job users to reach their workspaces.
fn tighten_one(path: &Path, traverse_only_ok: bool, out: &mut Vec<Tightened>) -> Result<std::fs::Metadata, DataDirError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| DataDirError::Read { path: path.to_path_buf(), source })?;
    let from = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() || from & 0o077 == 0 || (traverse_only_ok && meta.is_dir() && from & 0o077 == 0o011) {
        return Ok(meta);
    }
    let to = from & 0o700;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(to)).map_err(|source| DataDirError::Write { path: path.to_path_buf(), source })?;
    out.push(Tightened { path: path.to_path_buf(), from, to });
    Ok(meta)
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

    /// Takes group and other permissions off the data dir, every file in it, and the
    /// output segment directory and its files (an older version made them 0755 and
    /// 0644); each change is logged and returned. Other directories in it (`berth dev`
    /// keeps its worker's work dir there) are the business of whoever made them.
    pub fn tighten(&self) -> Result<Vec<Tightened>, DataDirError> {
        let mut out = Vec::new();
        tighten_one(&self.root, true, &mut out)?;
        let segments = crate::store::segments::dir_for(&self.database());
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|source| DataDirError::Read { path: dir.clone(), source })?;
            for e in entries {
                let path = e.map_err(|source| DataDirError::Read { path: dir.clone(), source })?.path();
                let meta = match std::fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    // Gone in between (a `-shm` file the store removed): nothing to tighten.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(DataDirError::Read { path, source }),
                };
                if meta.is_file() || (meta.is_dir() && path == segments) {
                    tighten_one(&path, false, &mut out)?;
                }
                if meta.is_dir() && path == segments {
                    dirs.push(path);
                }
            }
        }
        for t in &out {
            tracing::warn!(path = %t.path.display(), from = format!("{:o}", t.from), to = format!("{:o}", t.to), "tightened permissions in the data dir");
        }
        Ok(out)
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
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.root).map_err(|source| DataDirError::Write { path: self.root.clone(), source })?;
        let tls = |source| DataDirError::Tls { path: self.root.clone(), source };
        let ca = Ca::generate(names.first().map(String::as_str).unwrap_or("coordinator")).map_err(tls)?;
        let server = ca.issue_server(names).map_err(tls)?;
        self.write(&self.ca_key(), ca.key_pem().as_bytes())?;
        self.write(&self.server_key(), server.key_pem.as_bytes())?;
        self.write(&self.server_cert(), server.cert_pem.as_bytes())?;
        self.write(&self.ca_cert(), ca.cert_pem().as_bytes())?;
        Ok(true)
    }

    /// Writes a file of the data dir (0600, as everything there).
    pub fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
        write_private(path, bytes).map_err(|source| DataDirError::Write { path: path.to_path_buf(), source })
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
