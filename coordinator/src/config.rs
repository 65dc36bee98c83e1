//! The coordinator's configuration: a TOML file (`--config`), overridden by flags.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_shared::duration::parse_duration;

/// `coordinator.toml`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub lease_ttl: Option<String>,
    /// The job store: `postgres://…` to share one database among coordinators;
    /// absent for the embedded SQLite file in the data dir.
    pub store: Option<String>,
    /// The pools file (`[[pool]]` tables with rates); reloaded on SIGHUP.
    pub pools: Option<PathBuf>,
    #[serde(default)]
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ConfigFile {
    pub fn from_file(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let c: ConfigFile = toml::from_str(&text)
            .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.message().split_whitespace().collect::<Vec<_>>().join(" ") })?;
        if let Some(l) = &c.listen {
            l.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid { path: path.into(), message: format!("listen `{l}` is not HOST:PORT") })?;
        }
        if let Some(t) = &c.lease_ttl {
            parse_duration(t).map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        }
        Ok(c)
    }
}

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub lease_ttl: Duration,
    /// `--store`: None for the embedded SQLite file.
    pub store: Option<String>,
    /// `--pools`: None for the one free `default` pool.
    pub pools: Option<PathBuf>,
    /// A name for logs and hellos.
    pub name: String,
}
