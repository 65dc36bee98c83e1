//! Whether the store can write. A write the disk refuses (full, read-only, an I/O
//! error) marks the store unwritable, and while it is: new submissions are refused with
//! that reason, lease expiry waits (the workers' renewals could not be stored either),
//! results wait in the JobStore and are applied once it can, and output streams whose
//! chunks could not be stored ask their worker to send them again (from its spool) once
//! it can. The writer probes every `PROBE_EVERY`: a write of `HEADROOM` bytes beside the
//! database, then a transaction that gives every running lease a full TTL from then, so
//! no lease expires for renewals the store could not take.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use berth_shared::wire::StoreHealth;
use chrono::{DateTime, Utc};

use super::StoreError;

/// How often an unwritable store is tried again.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// What must be free beside the database for the store to count as writable again: a
/// few batches of output (a batch is at most 32 chunks of 256 KiB).
pub const HEADROOM: u64 = 16 << 20;

/// Why the store cannot write, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwritable {
    pub since: DateTime<Utc>,
    /// The disk (or a quota) is full.
    pub full: bool,
    /// What the last refused write said.
    pub reason: String,
}

/// `None` while the store writes.
pub type Health = Option<Unwritable>;

/// The store's health as clients see it.
pub fn to_wire(h: &Health) -> StoreHealth {
    match h {
        None => StoreHealth { writable: true, ..StoreHealth::default() },
        Some(u) => StoreHealth { writable: false, disk_full: u.full, since: Some(u.since), reason: Some(u.reason.clone()) },
    }
}

/// Linux's "no space left on device" and "disk quota exceeded".
const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// Whether an I/O error is a full disk (or quota), also when it is wrapped to name
/// where (`segments::InDir`).
pub fn io_full(e: &std::io::Error) -> bool {
    if matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT)) {
        return true;
    }
    e.get_ref().and_then(|inner| inner.downcast_ref::<super::segments::InDir>()).is_some_and(|d| io_full(d.io()))
}

impl StoreError {
    /// Whether this is the disk refusing a write: `Some(true)` when it is full,
    /// `Some(false)` for another write failure (read-only, I/O error); `None` for
    /// anything else (a refused request, a conflict, a bug).
    pub fn write_failure(&self) -> Option<bool> {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Unwritable { full, .. } => Some(*full),
            StoreError::Segment { source, .. } => Some(io_full(source)),
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) => match e.code {
                C::DiskFull => Some(true),
                C::SystemIoFailure | C::ReadOnly | C::CannotOpen => Some(false),
                _ => None,
            },
            StoreError::Pg(e) => {
                let code = e.code()?.code();
                match code {
                    "53100" => Some(true),
                    _ if code.starts_with("58") => Some(false),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// A write failure as the error its callers get (`StoreError::Unwritable`).
    pub fn unwritable(&self) -> Option<StoreError> {
        match self {
            StoreError::Unwritable { .. } => None,
            e => e.write_failure().map(|full| StoreError::Unwritable { full, reason: e.to_string() }),
        }
    }
}

/// Writes and syncs `bytes` in a file in `dir`, then removes it: whether that much can
/// be written there now.
pub fn headroom(dir: &Path, bytes: u64) -> std::io::Result<()> {
    let path = dir.join(".berth-write-probe");
    let r = (|| {
        let mut f = std::fs::File::create(&path)?;
        let block = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        f.sync_data()
    })();
    let _ = std::fs::remove_file(&path);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_failures_are_told_from_other_errors() {
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        assert_eq!(StoreError::Db(full).write_failure(), Some(true));
        let io = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR), None);
        assert_eq!(StoreError::Db(io).write_failure(), Some(false));
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
        assert_eq!(StoreError::Db(busy).write_failure(), None);
        let seg = StoreError::Segment { what: "cannot be written".into(), source: std::io::Error::from_raw_os_error(ENOSPC) };
        assert_eq!(seg.write_failure(), Some(true));
        // As the segment writer names its directory.
        let named = super::super::segments::InDir::new("/data/berth-output".into(), std::io::Error::from_raw_os_error(EDQUOT));
        let seg = StoreError::Segment { what: "cannot be written".into(), source: std::io::Error::other(named) };
        assert_eq!(seg.write_failure(), Some(true));
        assert!(seg.to_string().contains("/data/berth-output: "), "{seg}");
        let other = super::super::segments::InDir::new("/data/berth-output".into(), std::io::Error::from_raw_os_error(5));
        assert_eq!(StoreError::Segment { what: "cannot be synced".into(), source: std::io::Error::other(other) }.write_failure(), Some(false));
        let e = seg.unwritable().expect("a write failure");
        assert!(e.to_string().starts_with("the coordinator's disk is full"), "{e}");
        assert_eq!(StoreError::Missing.write_failure(), None);
        assert!(StoreError::Missing.unwritable().is_none());
    }

    #[test]
    fn headroom_writes_and_removes_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        headroom(dir.path(), 3 << 20).expect("room");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read").count(), 0, "the probe file is removed");
        assert!(headroom(&dir.path().join("missing"), 1).is_err());
    }
}
