//! Output chunks: fenced by lease, deduplicated by sequence, stored in rows or in
//! segment files, and published to followers after commit.

use super::*;

impl<D: Db> Store<D> {
    /// The last stored sequence number of a stream of one attempt, plus one.
    pub(super) fn next_seq(&mut self, job_seq: i64, idx: i64, attempt: u32, stream: OutStream) -> Result<u64, StoreError> {
        let row = self.db.query_one(
            "SELECT MAX(seq) FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3 AND stream = ?4",
            p![job_seq, idx, attempt, stream_code(stream)],
        )?;
        Ok(row.opt_i64(0)?.map_or(1, |m| m as u64 + 1))
    }

    pub(super) fn append_logs(&mut self, worker: &str, chunks: &mut [LogChunk], s: &mut Scratch) -> Result<Vec<ChunkVerdict>, StoreError> {
        let mut verdicts = Vec::with_capacity(chunks.len());
        let mut owners: HashMap<LeaseId, Option<(i64, i64, u32)>> = HashMap::new();
        for c in chunks.iter() {
            let owner = match owners.get(&c.lease) {
                Some(o) => *o,
                None => {
                    let o = match self.db.query_opt(
                        // A cancelled attempt's output is still taken until its result
                        // comes: what it prints after SIGTERM is its last word.
                        "SELECT job_seq, idx, attempt FROM tasks WHERE lease = ?1 AND worker = ?2
                           AND (state = 'running' OR (state = 'cancelled' AND exit_code IS NULL AND runtime_ms IS NULL))",
                        p![c.lease.to_string(), worker],
                    )? {
                        Some(r) => Owner::Running(r.i64(0)?, r.i64(1)?, r.u32(2)?),
                        None if self.ended_here(worker, c.lease)? => Owner::Ended,
                        None => Owner::Stale,
                    };
                    owners.insert(c.lease, o);
                    o
                }
            };
            let Some((job_seq, idx, attempt)) = owner else {
                verdicts.push(ChunkVerdict::StaleLease);
                continue;
            };
            let key = (c.lease, c.stream);
            let mut expected = match self.expected_seq.get(&key) {
                Some(e) => *e,
                None => self.next_seq(job_seq, idx, attempt, c.stream)?,
            };
            if c.seq != expected {
                // The cached hint may be behind: another coordinator may have stored
                // chunks of this attempt while its worker was connected there.
                expected = self.next_seq(job_seq, idx, attempt, c.stream)?;
            }
            if c.seq < expected {
                self.expected_seq.insert(key, expected);
                verdicts.push(ChunkVerdict::Duplicate);
                continue;
            }
            if c.seq > expected {
                verdicts.push(ChunkVerdict::OutOfOrder { expected });
                continue;
            }
            let stored = match self.segments.as_mut() {
                Some(seg) if c.data.len() >= super::segments::MIN_SEGMENT_CHUNK => {
                    let (id, off) = seg.append(&c.data).map_err(|source| StoreError::Segment { what: "cannot be written".into(), source })?;
                    self.db.exec(
                        "INSERT INTO logs(job_seq, idx, attempt, stream, seq, data, seg, off, len) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
                        p![job_seq, idx, attempt, stream_code(c.stream), c.seq, &[][..], id as i64, off as i64, c.data.len() as i64],
                    )?
                }
                _ => self.db.exec(
                    "INSERT INTO logs(job_seq, idx, attempt, stream, seq, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    p![job_seq, idx, attempt, stream_code(c.stream), c.seq, c.data.as_slice()],
                )?,
            };
            self.expected_seq.insert(key, expected + 1);
            if stored == 0 {
                verdicts.push(ChunkVerdict::Duplicate);
                continue;
            }
            let meta = self.meta(job_seq)?;
            s.notices.push(Notice::Output { job: meta.id, index: Self::task_index(&meta, idx), attempt, stream: c.stream, seq: c.seq, data: c.data.clone() });
            verdicts.push(ChunkVerdict::Stored);
        }
        if self.expected_seq.len() > 100_000 {
            self.expected_seq.clear();
        }
        Ok(verdicts)
    }
}
