//! The output spool: every chunk an attempt prints is appended to a file in the
//! worker's spool directory before it is sent, and kept until the coordinator
//! acknowledges it, so a reconnect loses nothing. Records are self-describing
//! (`stream u8, seq u64, len u32, data`) so a restarted worker can read them back.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use berth_shared::wire::OutStream;
use tokio::sync::Notify;

const HEADER: usize = 13;

#[derive(Clone, Copy, Debug)]
struct ChunkMeta {
    stream: OutStream,
    seq: u64,
    offset: u64,
    len: u32,
}

/// How much recently appended output is also kept in memory for the sender, which
/// then need not read it back from the file (it does after a reconnect).
const RECENT_BYTES: usize = 8 << 20;

#[derive(Default)]
struct Inner {
    chunks: Vec<ChunkMeta>,
    /// Chunks appended and not yet taken by the sender: (position, data), oldest first.
    recent: std::collections::VecDeque<(usize, Vec<u8>)>,
    recent_bytes: usize,
    next_seq: [u64; 2],
    acked: [u64; 2],
    closed: bool,
    end: u64,
}

pub struct Spool {
    path: PathBuf,
    /// Opened on the first chunk: an attempt that prints nothing costs no file.
    file: Mutex<Option<File>>,
    inner: Mutex<Inner>,
    /// Woken when a chunk is appended or the spool is closed.
    pub notify: Notify,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish_non_exhaustive()
    }
}

fn idx(s: OutStream) -> usize {
    match s {
        OutStream::Stdout => 0,
        OutStream::Stderr => 1,
    }
}

/// One chunk read back for sending.
pub struct Chunk {
    pub stream: OutStream,
    pub seq: u64,
    pub data: Vec<u8>,
}

impl Spool {
    pub fn create(path: &Path) -> std::io::Result<Spool> {
        if let Some(dir) = path.parent() {
            if !dir.is_dir() {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("spool directory {} is missing", dir.display())));
            }
        }
        Ok(Spool { path: path.to_path_buf(), file: Mutex::new(None), inner: Mutex::new(Inner::default()), notify: Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of plain
        // counters; the data is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a chunk; returns its sequence number.
    pub fn append(&self, stream: OutStream, data: &[u8]) -> std::io::Result<u64> {
        self.append_owned(stream, data.to_vec())
    }

    /// Appends a chunk the caller gives up (it is kept for the sender without a copy);
    /// returns its sequence number.
    pub fn append_owned(&self, stream: OutStream, data: Vec<u8>) -> std::io::Result<u64> {
        let mut inner = self.lock();
        let seq = inner.next_seq[idx(stream)] + 1;
        let mut header = [0u8; HEADER];
        header[0] = idx(stream) as u8;
        header[1..9].copy_from_slice(&seq.to_be_bytes());
        header[9..].copy_from_slice(&(data.len() as u32).to_be_bytes());
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&self.path)?);
            }
            if let Some(f) = f.as_mut() {
                f.write_all(&header)?;
                f.write_all(&data)?;
            }
        }
        let offset = inner.end + HEADER as u64;
        inner.end += (HEADER + data.len()) as u64;
        inner.next_seq[idx(stream)] = seq;
        let position = inner.chunks.len();
        inner.chunks.push(ChunkMeta { stream, seq, offset, len: data.len() as u32 });
        inner.recent_bytes += data.len();
        inner.recent.push_back((position, data));
        while inner.recent_bytes > RECENT_BYTES {
            match inner.recent.pop_front() {
                Some((_, d)) => inner.recent_bytes -= d.len(),
                None => break,
            }
        }
        drop(inner);
        self.notify.notify_one();
        Ok(seq)
    }

    /// No more chunks will come.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    pub fn ack(&self, stream: OutStream, seq: u64) {
        let mut inner = self.lock();
        let i = idx(stream);
        if seq > inner.acked[i] && seq <= inner.next_seq[i] {
            inner.acked[i] = seq;
        }
    }

    /// Closed and every chunk acknowledged.
    pub fn settled(&self) -> bool {
        let inner = self.lock();
        inner.closed && inner.acked == inner.next_seq
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The position of the first chunk not yet acknowledged (where a resend starts).
    pub fn first_unacked(&self) -> usize {
        let inner = self.lock();
        inner.chunks.iter().position(|c| c.seq > inner.acked[idx(c.stream)]).unwrap_or(inner.chunks.len())
    }

    pub fn len(&self) -> usize {
        self.lock().chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunk `i`, for sending: from memory when it is the oldest chunk kept there (the
    /// sender keeping up), else read back from the file.
    pub fn read(&self, i: usize) -> std::io::Result<Option<Chunk>> {
        let meta = {
            let mut inner = self.lock();
            let Some(meta) = inner.chunks.get(i).copied() else { return Ok(None) };
            while inner.recent.front().is_some_and(|(p, _)| *p < i) {
                if let Some((_, d)) = inner.recent.pop_front() {
                    inner.recent_bytes -= d.len();
                }
            }
            if inner.recent.front().is_some_and(|(p, _)| *p == i) {
                if let Some((_, data)) = inner.recent.pop_front() {
                    inner.recent_bytes -= data.len();
                    return Ok(Some(Chunk { stream: meta.stream, seq: meta.seq, data }));
                }
            }
            meta
        };
        let mut data = vec![0u8; meta.len as usize];
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some(f) = f.as_ref() else { return Err(std::io::Error::other("the spool has chunks but no file")) };
        f.read_exact_at(&mut data, meta.offset)?;
        Ok(Some(Chunk { stream: meta.stream, seq: meta.seq, data }))
    }

    /// Deletes the spool file, if one was written.
    pub fn remove(&self) {
        if self.file.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_ack_settle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Spool::create(&dir.path().join("x.spool")).expect("create");
        assert_eq!(s.append(OutStream::Stdout, b"one").expect("append"), 1);
        assert_eq!(s.append(OutStream::Stderr, b"two").expect("append"), 1);
        assert_eq!(s.append(OutStream::Stdout, b"three").expect("append"), 2);
        let c = s.read(2).expect("read").expect("exists");
        assert_eq!((c.stream, c.seq, c.data.as_slice()), (OutStream::Stdout, 2, &b"three"[..]));
        s.ack(OutStream::Stdout, 1);
        assert_eq!(s.first_unacked(), 1);
        s.close();
        assert!(!s.settled());
        s.ack(OutStream::Stderr, 1);
        s.ack(OutStream::Stdout, 2);
        assert!(s.settled());
        assert_eq!(s.first_unacked(), 3);
        // An ack past what was sent is ignored.
        s.ack(OutStream::Stdout, 99);
        assert!(s.settled());
    }
}
