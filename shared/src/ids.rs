//! Newtype ids. Jobs and leases are UUIDv7, so they sort by creation time; humans see
//! a short prefix that the coordinator resolves, as git and docker do.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// How many characters of an id the tables show: the 12 hex digits of its millisecond
/// timestamp plus 4 of randomness, so ids made in the same millisecond still differ.
pub const SHORT_ID_LEN: usize = 18;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
            /// The prefix shown in tables.
            pub fn short(&self) -> String {
                self.0.hyphenated().to_string()[..SHORT_ID_LEN].to_string()
            }
        }
        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }
        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A submission: one job, or one array of tasks.
    JobId
);
uuid_id!(
    /// One claim of one task attempt; every worker message about that attempt carries it.
    LeaseId
);

/// One task of a job: `index` is `None` for a single job, the array index otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct TaskRef {
    pub job: JobId,
    pub index: Option<u32>,
}

impl fmt::Display for TaskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}:{}", self.job, i),
            None => write!(f, "{}", self.job),
        }
    }
}

/// A job reference as a user types it: a full id or a unique prefix, optionally
/// followed by `:INDEX` for one task of an array.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSelector {
    pub prefix: String,
    pub index: Option<u32>,
}

impl FromStr for JobSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (prefix, index) = match s.split_once(':') {
            Some((p, i)) => {
                let i = i.parse::<u32>().map_err(|_| format!("invalid task index `{i}` in `{s}`: expected JOB:INDEX with a number"))?;
                (p, Some(i))
            }
            None => (s, None),
        };
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 4 {
            return Err(format!("job id prefix `{prefix}` is too short: give at least 4 characters"));
        }
        if !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(format!("`{prefix}` is not a job id: ids are hexadecimal UUIDs"));
        }
        Ok(JobSelector { prefix, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered_and_short_prefix_parses() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
        let sel: JobSelector = a.short().parse().expect("short id parses");
        assert!(a.to_string().starts_with(&sel.prefix));
    }

    #[test]
    fn selector_rejects_bad_input() {
        assert!("ab".parse::<JobSelector>().is_err());
        assert!("zzzzzz".parse::<JobSelector>().is_err());
        assert!("abcd:x".parse::<JobSelector>().is_err());
        let s: JobSelector = "ABCD:7".parse().expect("valid");
        assert_eq!(s, JobSelector { prefix: "abcd".into(), index: Some(7) });
    }
}
