//! The coordinator's configuration: a TOML file (`--config`), overridden by flags.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_shared::duration::{parse_duration, parse_size_bytes};

/// The output cap of a job that sets none, unless `max_output` says otherwise.
pub const DEFAULT_MAX_OUTPUT: u64 = 10 << 30;

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
    /// The output cap of a job that sets none (`100M`, `10G`): past it the job fails.
    pub max_output: Option<String>,
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
        c.max_output_bytes().map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        Ok(c)
    }

    /// `max_output` in bytes, if set.
    pub fn max_output_bytes(&self) -> Result<Option<u64>, String> {
        match &self.max_output {
            None => Ok(None),
            Some(s) => match parse_size_bytes(s) {
                Ok(0) => Err("max_output must be more than zero".into()),
                Ok(n) => Ok(Some(n)),
                Err(e) => Err(format!("max_output: {e}")),
            },
        }
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
    /// The output cap of a job that sets none, in bytes (`DEFAULT_MAX_OUTPUT` if None).
    pub max_output: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_output_is_a_size_and_a_bad_one_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max_output = \"1.5G\"\n").expect("write");
        assert_eq!(ConfigFile::from_file(&path).expect("parses").max_output_bytes(), Ok(Some(3 << 29)));
        assert_eq!(ConfigFile::default().max_output_bytes(), Ok(None));
        for bad in ["lots", "0"] {
            std::fs::write(&path, format!("max_output = \"{bad}\"\n")).expect("write");
            let e = ConfigFile::from_file(&path).expect_err("refused").to_string();
            assert!(e.contains("c.toml") && e.contains("max_output"), "{e}");
        }
    }
}
