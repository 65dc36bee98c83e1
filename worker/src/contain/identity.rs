//! Who a process job runs as: an unprivileged user of its slot's own (uid and gid
//! `base + slot`, so one slot's job cannot read another's workspace), or one user the
//! operator names; never the worker's own user when the worker can switch.

use nix::unistd::{Uid, User};

/// The user and group an attempt's processes get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobIdentity {
    pub uid: u32,
    pub gid: u32,
    /// `USER` and `LOGNAME` in the job's environment.
    pub name: String,
}

/// How this worker chooses a job's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identities {
    /// Slot `n` runs as uid and gid `base + n` (no passwd entry is needed).
    PerSlot { base: u32 },
    /// Every slot runs as this user (`--job-user`).
    User(JobIdentity),
    /// The worker is not root and cannot switch: jobs run as the worker's own user.
    Worker { uid: u32 },
}

/// The default first uid of per-slot users: above the ranges distributions, systemd's
/// dynamic users and the usual subordinate ids of containers hand out.
pub const DEFAULT_SLOT_UID_BASE: u32 = 900_000;

impl Identities {
    /// Chooses from the flags: `--job-user NAME` for one user, else a user per slot from
    /// `base` when the worker runs as root, else the worker's own user.
    pub fn choose(job_user: Option<&str>, base: u32, slots: usize) -> Result<Identities, String> {
        let me = Uid::current();
        match job_user {
            Some(name) => {
                let u = match name.parse::<u32>() {
                    Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
                    Err(_) => User::from_name(name).ok().flatten(),
                };
                let Some(u) = u else {
                    return Err(format!("--job-user {name}: no such user on this host"));
                };
                if u.uid.is_root() {
                    return Err(format!("--job-user {name}: jobs may not run as root"));
                }
                if !me.is_root() && u.uid != me {
                    return Err(format!("--job-user {name}: this worker runs as uid {me}, and only root can run jobs as another user"));
                }
                if !me.is_root() {
                    return Ok(Identities::Worker { uid: me.as_raw() });
                }
                Ok(Identities::User(JobIdentity { uid: u.uid.as_raw(), gid: u.gid.as_raw(), name: u.name }))
            }
            None if me.is_root() => {
                let top = base
                    .checked_add(slots as u32)
                    .filter(|t| *t < u32::MAX - 1)
                    .ok_or_else(|| format!("--slot-uid-base {base}: too high for {slots} slots"))?;
                if base == 0 {
                    return Err("--slot-uid-base 0: uid 0 is root".into());
                }
                for uid in base..top {
                    if let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) {
                        return Err(format!("uid {uid} (for slot {}) belongs to user {} on this host: choose another --slot-uid-base", uid - base, u.name));
                    }
                }
                Ok(Identities::PerSlot { base })
            }
            None => Ok(Identities::Worker { uid: me.as_raw() }),
        }
    }

    /// The identity slot `slot`'s job gets; `None`: it runs as the worker.
    pub fn for_slot(&self, slot: usize) -> Option<JobIdentity> {
        match self {
            Identities::PerSlot { base } => {
                let id = base + slot as u32;
                Some(JobIdentity { uid: id, gid: id, name: format!("berth-slot-{slot}") })
            }
            Identities::User(u) => Some(u.clone()),
            Identities::Worker { .. } => None,
        }
    }

    /// Whether jobs run as a user other than the worker's.
    pub fn separate(&self) -> bool {
        !matches!(self, Identities::Worker { .. })
    }

    /// What the start-up log and `berth workers` say.
    pub fn describe(&self, slots: usize) -> String {
        match self {
            Identities::PerSlot { base } => format!("a user per slot (uids {base}-{})", base + slots.saturating_sub(1) as u32),
            Identities::User(u) => format!("user {} (uid {}; every slot the same)", u.name, u.uid),
            Identities::Worker { uid } => {
                format!("the worker's own user (uid {uid}): jobs can read what the worker can; run the worker as root to give each slot its own user")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_slot_users_are_distinct_and_never_root() {
        let ids = Identities::PerSlot { base: 900_000 };
        let a = ids.for_slot(0).expect("switches");
        let b = ids.for_slot(3).expect("switches");
        assert_eq!((a.uid, a.gid), (900_000, 900_000));
        assert_eq!((b.uid, b.name.as_str()), (900_003, "berth-slot-3"));
        assert!(ids.separate());
        assert!(Identities::choose(None, 0, 2).is_err() || !Uid::current().is_root());
        assert!(Identities::choose(Some("root"), 900_000, 2).is_err());
        assert!(Identities::choose(Some("no-such-user-anywhere"), 900_000, 2).expect_err("refused").contains("no such user"));
        assert_eq!(Identities::Worker { uid: 5 }.for_slot(1), None);
    }
}
