//! Secrets a worker holds for its jobs: declared by the operator (`--secrets FILE`),
//! each with its source (a variable of the worker's environment, or a file) and the
//! accounts that may use it. A job names a declared secret (`--secret VAR=NAME`); the
//! value is read here when its attempt starts and goes only into that attempt's
//! environment, never to the coordinator. Anything not declared is refused: a job cannot
//! read the worker's environment by naming one of its variables.
//!
//! ```toml
//! [secrets.HF_TOKEN]
//! env = "HF_TOKEN"                  # or: file = "/etc/berth/secrets/hf"
//! accounts = ["research", "evals"]  # who may use it; ["*"] for every account
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_shared::wire::SecretGrant;
use serde::Deserialize;

/// Where a secret's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Env(String),
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    pub source: Source,
    /// Accounts that may use it; `*` for any.
    pub accounts: Vec<String>,
}

/// The declared secrets, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Secrets {
    by_name: BTreeMap<String, Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    secrets: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    env: Option<String>,
    file: Option<PathBuf>,
    accounts: Vec<String>,
}

impl Secrets {
    /// Reads a secrets file; errors name the file and the secret.
    pub fn from_file(path: &Path) -> Result<Secrets, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --secrets {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--secrets {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Secrets, String> {
        let f: File = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut by_name = BTreeMap::new();
        for (name, e) in f.secrets {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
                return Err(format!("secret `{name}`: names are letters, digits, `_`, `-` and `.`"));
            }
            let source = match (e.env, e.file) {
                (Some(v), None) if !v.is_empty() => Source::Env(v),
                (None, Some(p)) => Source::File(p),
                _ => return Err(format!("secret `{name}`: give exactly one of `env = \"VAR\"` or `file = \"PATH\"`")),
            };
            if e.accounts.is_empty() {
                return Err(format!("secret `{name}`: `accounts` is empty; list the accounts that may use it, or [\"*\"] for every account"));
            }
            by_name.insert(name, Secret { source, accounts: e.accounts });
        }
        Ok(Secrets { by_name })
    }

    /// What the worker tells the coordinator: names and accounts, never values.
    pub fn grants(&self) -> Vec<SecretGrant> {
        self.by_name
            .iter()
            .map(|(name, s)| SecretGrant { name: name.clone(), accounts: if s.accounts.iter().any(|a| a == "*") { Vec::new() } else { s.accounts.clone() } })
            .collect()
    }

    /// The value of secret `name` for a job of `account` on worker `worker`, or why not.
    pub fn resolve(&self, name: &str, account: &str, worker: &str) -> Result<String, String> {
        let Some(s) = self.by_name.get(name) else {
            return Err(format!("secret `{name}` is not declared on worker {worker} (the operator declares secrets in the worker's --secrets file)"));
        };
        if !s.accounts.iter().any(|a| a == "*" || a == account) {
            return Err(format!("account {account} may not use secret `{name}` on worker {worker}"));
        }
        match &s.source {
            Source::Env(var) => {
                std::env::var(var).map_err(|_| format!("secret `{name}` is declared on worker {worker}, but its variable {var} is not set there"))
            }
            Source::File(p) => std::fs::read_to_string(p)
                .map(|v| v.strip_suffix('\n').map(str::to_string).unwrap_or(v))
                .map_err(|e| format!("secret `{name}` is declared on worker {worker}, but its file {} cannot be read: {e}", p.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_secrets_only_for_their_accounts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("tok");
        std::fs::write(&f, "file-value\n").expect("write");
        let text =
            format!("[secrets.FROM_FILE]\nfile = \"{}\"\naccounts = [\"*\"]\n[secrets.PATHISH]\nenv = \"PATH\"\naccounts = [\"research\"]\n", f.display());
        let s = Secrets::parse(&text).expect("parses");
        assert_eq!(s.resolve("FROM_FILE", "anyone", "w1").as_deref(), Ok("file-value"));
        assert!(s.resolve("PATHISH", "research", "w1").is_ok());
        assert!(s.resolve("PATHISH", "intern", "w1").expect_err("refused").contains("account intern may not use"));
        // A variable of the worker's environment that is not declared is refused.
        assert!(s.resolve("HOME", "research", "w1").expect_err("refused").contains("not declared"));
        let g = s.grants();
        assert_eq!(g[0].accounts, Vec::<String>::new(), "`*` is every account");
        assert!(g[1].allows("research") && !g[1].allows("intern"));
        assert!(Secrets::parse("[secrets.X]\naccounts = [\"a\"]\n").expect_err("refused").contains("exactly one"));
        // The sample the deploy folder ships parses.
        let sample = Secrets::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/secrets.example.toml")).expect("the sample parses");
        assert_eq!(sample.grants().len(), 2);
        assert!(Secrets::parse("[secrets.X]\nenv = \"X\"\naccounts = []\n").expect_err("refused").contains("empty"));
        assert!(Secrets::parse("[secrets.X]\nenv = \"X\"\naccounts = [\"a\"]\nvalue = \"no\"\n").is_err());
    }
}
