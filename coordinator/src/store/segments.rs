//! Large output chunks on SQLite are kept out of the database, in append-only segment
//! files beside it; the `logs` row holds where (segment, offset, length). Writing a
//! 256 KiB chunk through SQLite cost its WAL (every page, checksummed), then the
//! checkpoint's copy into the database: about 2 CPU-seconds per GiB on the writer
//! thread. A segment takes the bytes once.
//!
//! Durability: the writer appends a batch's chunks, then syncs the segments it wrote
//! (`sync`) before the transaction that references them commits, so a committed row
//! never points at bytes that are not on disk. Bytes written by a batch that did not
//! commit (a crash, a rollback) are never referenced; a restarted coordinator starts a
//! new segment, so nothing is ever appended after such a tail. A failed write or sync
//! (a full disk) ends the segment the same way: its batch is rolled back, and what a
//! failed sync left of it is never trusted again.
//!
//! PostgreSQL keeps chunks in its table: coordinators sharing it may run on other hosts.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Chunks at least this large go to a segment; smaller ones stay in the row.
pub const MIN_SEGMENT_CHUNK: usize = 16 * 1024;

/// A segment is closed and a new one begun once it holds this much.
const SEGMENT_BYTES: u64 = 256 << 20;

/// The segment directory beside a database file: `berth.db` → `berth-output/`.
pub fn dir_for(db: &Path) -> PathBuf {
    let stem = db.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "berth".into());
    db.with_file_name(format!("{stem}-output"))
}

fn file_name(id: u64) -> String {
    format!("{id:012}.seg")
}

/// The writer's side: appends and syncs.
pub struct Segments {
    dir: PathBuf,
    current: File,
    id: u64,
    len: u64,
    /// Segments written since the last `sync` (closed ones stay open until synced).
    unsynced: Vec<File>,
    dirty: bool,
}

impl Segments {
    /// Opens the directory (made if missing) and begins a new segment after the highest
    /// one there.
    pub fn open(dir: &Path) -> std::io::Result<Segments> {
        // The coordinator's alone, as everything in its data dir (see `datadir`).
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut highest = 0u64;
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
                highest = highest.max(id);
            }
        }
        let id = highest + 1;
        let current = Self::create(dir, id)?;
        Ok(Segments { dir: dir.to_path_buf(), current, id, len: 0, unsynced: Vec::new(), dirty: false })
    }

    fn create(dir: &Path, id: u64) -> std::io::Result<File> {
        let f = std::fs::OpenOptions::new().create_new(true).append(true).mode(0o600).open(dir.join(file_name(id)))?;
        // The new name must survive a crash as well as the bytes.
        File::open(dir)?.sync_all()?;
        Ok(f)
    }

    /// Appends a chunk; returns (segment, offset).
    pub fn append(&mut self, data: &[u8]) -> std::io::Result<(u64, u64)> {
        if self.len >= SEGMENT_BYTES {
            // What a try that failed part way (a full disk) left of the next segment:
            // nothing points into a segment not yet begun.
            match std::fs::remove_file(self.dir.join(file_name(self.id + 1))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(self.named(e)),
                _ => {}
            }
            let next = Self::create(&self.dir, self.id + 1).map_err(|e| self.named(e))?;
            let full = std::mem::replace(&mut self.current, next);
            if self.dirty {
                self.unsynced.push(full);
            }
            self.id += 1;
            self.len = 0;
        }
        let at = (self.id, self.len);
        if let Err(e) = self.current.write_all(data) {
            // A partial write leaves the file longer than `len`: start over in a new
            // segment so every offset handed out stays exact.
            self.len = SEGMENT_BYTES;
            return Err(self.named(e));
        }
        self.len += data.len() as u64;
        self.dirty = true;
        Ok(at)
    }

    /// Makes every appended byte durable (before the commit that references them).
    pub fn sync(&mut self) -> std::io::Result<()> {
        let r = (|| {
            for f in std::mem::take(&mut self.unsynced) {
                f.sync_data()?;
            }
            if self.dirty {
                self.current.sync_data()?;
            }
            Ok(())
        })();
        self.dirty = false;
        r.map_err(|e| {
            // After a failed sync the kernel may have dropped the unsynced pages: the
            // next chunk begins a new segment rather than follow them.
            self.len = SEGMENT_BYTES;
            self.named(e)
        })
    }

    /// An error that says which directory it is about (a full or read-only disk), the
    /// system's error kept inside it (`health` tells a full disk by it).
    fn named(&self, e: std::io::Error) -> std::io::Error {
        std::io::Error::new(e.kind(), InDir::new(self.dir.clone(), e))
    }
}

/// An I/O error in the segment directory.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", dir.display())]
pub struct InDir {
    dir: PathBuf,
    source: std::io::Error,
}

impl InDir {
    pub fn new(dir: PathBuf, source: std::io::Error) -> InDir {
        InDir { dir, source }
    }

    /// The system's error.
    pub fn io(&self) -> &std::io::Error {
        &self.source
    }
}

/// The readers' side: reads chunks back, keeping segments open.
pub struct SegmentReader {
    dir: PathBuf,
    open: HashMap<u64, File>,
}

impl SegmentReader {
    pub fn new(dir: &Path) -> SegmentReader {
        SegmentReader { dir: dir.to_path_buf(), open: HashMap::new() }
    }

    /// Reads a chunk back; an error names the segment file, which must be restored
    /// together with the database that points into it.
    pub fn read(&mut self, id: u64, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let path = self.dir.join(file_name(id));
        let named = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{}: {e} (segment files are kept beside the database and belong with it)", path.display()))
        };
        if !self.open.contains_key(&id) {
            if self.open.len() >= 64 {
                self.open.clear();
            }
            self.open.insert(id, File::open(&path).map_err(named)?);
        }
        let f = &self.open[&id];
        let mut data = vec![0u8; len];
        f.read_exact_at(&mut data, offset).map_err(named)?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_back_exactly_and_a_restart_begins_a_new_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Segments::open(dir.path()).expect("open");
        let a = s.append(b"hello").expect("append");
        let b = s.append(&[7u8; 20_000]).expect("append");
        s.sync().expect("sync");
        assert_eq!(a, (1, 0));
        assert_eq!(b, (1, 5));
        let mut r = SegmentReader::new(dir.path());
        assert_eq!(r.read(1, 0, 5).expect("read"), b"hello");
        assert_eq!(r.read(1, 5, 20_000).expect("read"), vec![7u8; 20_000]);
        drop(s);
        let mut s = Segments::open(dir.path()).expect("reopen");
        assert_eq!(s.append(b"x").expect("append"), (2, 0), "never appends after an old segment's tail");
        let missing = r.read(9, 0, 1).expect_err("a missing segment is an error, not empty output");
        assert!(missing.to_string().contains("000000000009.seg"), "the error names the file: {missing}");
    }
}
