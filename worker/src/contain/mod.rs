//! Containment of process jobs: who an attempt runs as (`identity`), the cgroup that
//! bounds and ends its processes (`cgroup`), and the work dir's permissions, so a job
//! reads neither the worker's files (its key, its spool) nor another slot's workspace.
//!
//! The work dir and its `slots` directory are 0711 when jobs run as other users (they
//! must pass through to reach their workspace, but can list nothing); every other
//! directory the worker makes is 0700 and every file 0600 (the worker's umask is 077);
//! a workspace is 0700 and owned by its attempt's identity.

pub mod cgroup;
pub mod identity;
pub mod spawn;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use berth_shared::wire::Containment as Summary;

pub use cgroup::{Cgroups, Limits, SlotCgroup};
pub use identity::{Identities, JobIdentity};

/// How a worker contains its process jobs, as its flags asked.
#[derive(Clone, Debug)]
pub struct ContainConfig {
    /// `--job-user`: every slot runs as this user.
    pub job_user: Option<String>,
    /// `--slot-uid-base`: slot n runs as uid and gid base + n (when root, without `--job-user`).
    pub slot_uid_base: u32,
    /// `--pids-limit`: the most processes an attempt may hold at once.
    pub pids_limit: i64,
    /// `--no-cgroups`: do not use cgroups even where they could be.
    pub cgroups: bool,
}

impl Default for ContainConfig {
    fn default() -> Self {
        ContainConfig { job_user: None, slot_uid_base: identity::DEFAULT_SLOT_UID_BASE, pids_limit: 4096, cgroups: true }
    }
}

/// A slot's containment: who its attempt runs as and its cgroup.
#[derive(Clone, Debug, Default)]
pub struct SlotContainment {
    pub identity: Option<JobIdentity>,
    pub cgroup: Option<Arc<SlotCgroup>>,
    pub pids_limit: u64,
}

/// Containment as set up at start, for every slot.
#[derive(Debug)]
pub struct Containment {
    identities: Identities,
    cgroups: Result<Cgroups, String>,
    slots: Vec<SlotContainment>,
}

impl Containment {
    /// Chooses identities and prepares cgroups for `slots` slots of worker `name`. An
    /// impossible request (`--job-user` of no such user) is an error; cgroups that cannot
    /// be used are not (the worker says so and runs without).
    pub fn open(cfg: &ContainConfig, name: &str, work_dir: &Path, slots: usize) -> Result<Containment, String> {
        let identities = Identities::choose(cfg.job_user.as_deref(), cfg.slot_uid_base, slots)?;
        // Several workers may share a name on one host (each of its own cluster): the key
        // is the name and the work dir.
        let key = {
            use sha2::Digest;
            let h = sha2::Sha256::digest(work_dir.as_os_str().as_encoded_bytes());
            format!("{name}-{}", hex::encode(&h[..4]))
        };
        let cgroups = if cfg.cgroups { Cgroups::open(&key) } else { Err("turned off with --no-cgroups".into()) };
        let mut per_slot = Vec::with_capacity(slots);
        let mut left = 0;
        let mut cgroup_error = None;
        for n in 0..slots {
            let cgroup = match &cgroups {
                Ok(c) => match c.slot(n) {
                    Ok((cg, killed)) => {
                        left += killed;
                        Some(Arc::new(cg))
                    }
                    Err(e) => {
                        cgroup_error.get_or_insert(e);
                        None
                    }
                },
                Err(_) => None,
            };
            per_slot.push(SlotContainment { identity: identities.for_slot(n), cgroup, pids_limit: cfg.pids_limit.max(1) as u64 });
        }
        if left > 0 {
            tracing::warn!(processes = left, "killed processes left in the slots' cgroups by an earlier run of this worker");
        }
        let cgroups = match cgroup_error {
            Some(e) => {
                for s in &mut per_slot {
                    s.cgroup = None;
                }
                Err(e)
            }
            None => cgroups,
        };
        let c = Containment { identities, cgroups, slots: per_slot };
        let s = c.summary();
        if s.separate_users && s.enforced {
            tracing::info!(identity = %s.identity, cgroups = %s.cgroups, "process jobs are contained");
        } else {
            tracing::warn!(identity = %s.identity, cgroups = %s.cgroups, "process jobs are NOT fully contained: {}", c.gaps().join("; "));
        }
        Ok(c)
    }

    fn gaps(&self) -> Vec<String> {
        let mut g = Vec::new();
        if !self.identities.separate() {
            g.push("they run as the worker's user and can read its files".to_string());
        }
        if let Err(e) = &self.cgroups {
            g.push(format!("--cpus, --mem and the pids limit are not enforced and a process that leaves its group survives the attempt ({e})"));
        }
        g
    }

    /// Slot `n`'s containment.
    pub fn slot(&self, n: usize) -> SlotContainment {
        self.slots.get(n).cloned().unwrap_or_default()
    }

    /// What the worker registers with (`berth workers` shows it).
    pub fn summary(&self) -> Summary {
        Summary {
            identity: self.identities.describe(self.slots.len()),
            separate_users: self.identities.separate(),
            cgroups: match &self.cgroups {
                Ok(c) => c.describe(),
                Err(e) => format!("none: {e}"),
            },
            enforced: self.cgroups.is_ok(),
        }
    }

    /// Whether jobs run as users other than the worker's.
    pub fn separate(&self) -> bool {
        self.identities.separate()
    }
}

/// Sets the work dir's and the slots directory's modes: 0711 when jobs run as other
/// users (they pass through to their workspace and can list nothing), else 0700.
pub fn work_dir_modes(work_dir: &Path, separate: bool) -> std::io::Result<()> {
    let mode = if separate { 0o711 } else { 0o700 };
    for d in [work_dir.to_path_buf(), work_dir.join("slots")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))?;
    }
    if separate {
        // Job users reach their workspace by its absolute path ($BERTH_WORKSPACE, $HOME):
        // every directory above the work dir must let others pass.
        for a in work_dir.ancestors().skip(1) {
            if let Ok(m) = std::fs::metadata(a) {
                if m.permissions().mode() & 0o001 == 0 {
                    tracing::warn!(
                        dir = %a.display(),
                        mode = format!("{:o}", m.permissions().mode() & 0o7777),
                        "jobs run as slot users, who cannot pass through this directory above the work dir: their workspace paths will not open; put the work dir elsewhere or give it o+x"
                    );
                    break;
                }
            }
        }
    }
    // The worker's own: whatever the umask was.
    for d in ["spool", "groups", "containers"] {
        let p = work_dir.join(d);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Gives a workspace to its attempt's identity, mode 0700.
pub fn own_workspace(dir: &Path, id: Option<&JobIdentity>) -> std::io::Result<()> {
    if let Some(id) = id {
        std::os::unix::fs::chown(dir, Some(id.uid), Some(id.gid))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
