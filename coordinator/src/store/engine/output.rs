//! Output chunks: fenced by lease, deduplicated by sequence, stored in rows or in
//! segment files, and published to followers after commit.

use super::*;

impl<D: Db> Store<D> {
    /// The last stored sequence number of a stream of one attempt, plus one.
    /// `code`: the stream's code (`exec_stream_code`).
    pub(super) fn next_seq(&mut self, job_seq: i64, idx: i64, attempt: u32, code: i64) -> Result<u64, StoreError> {
        let row =
            self.db.query_one("SELECT MAX(seq) FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3 AND stream = ?4", p![job_seq, idx, attempt, code])?;
        Ok(row.opt_i64(0)?.map_or(1, |m| m as u64 + 1))
    }

    /// Output bytes stored for an attempt so far.
    fn stored_bytes(&mut self, lease: LeaseId, job_seq: i64, idx: i64, attempt: u32) -> Result<u64, StoreError> {
        if let Some(n) = self.out_bytes.get(&lease) {
            return Ok(*n);
        }
        let row = self.db.query_one(
            "SELECT CAST(COALESCE(SUM(CASE WHEN seg IS NULL THEN length(data) ELSE len END), 0) AS BIGINT) FROM logs WHERE job_seq = ?1 AND idx = ?2 AND attempt = ?3",
            p![job_seq, idx, attempt],
        )?;
        let n = row.u64(0)?;
        self.out_bytes.insert(lease, n);
        Ok(n)
    }

    pub(super) fn append_logs(&mut self, worker: &str, chunks: &mut [LogChunk], s: &mut Scratch) -> Result<Vec<ChunkVerdict>, StoreError> {
        /// What a chunk's lease is to the store.
        #[derive(Clone, Copy)]
        enum Owner {
            Running(i64, i64, u32),
            /// The lease's task has ended (a late or resent chunk, or output past its cap).
            Ended,
            Stale,
        }
        let mut verdicts = Vec::with_capacity(chunks.len());
        let mut owners: HashMap<LeaseId, Owner> = HashMap::new();
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
            let (job_seq, idx, attempt) = match owner {
                Owner::Running(j, i, a) => (j, i, a),
                Owner::Ended => {
                    verdicts.push(ChunkVerdict::Dropped);
                    continue;
                }
                Owner::Stale => {
                    verdicts.push(ChunkVerdict::StaleLease);
                    continue;
                }
            };
            let key = (c.lease, c.exec, c.stream);
            let code = sessions::exec_stream_code(c.exec, c.stream);
            let mut expected = match self.expected_seq.get(&key) {
                Some(e) => *e,
                None => self.next_seq(job_seq, idx, attempt, code)?,
            };
            if c.seq != expected {
                // The cached hint may be behind: another coordinator may have stored
                // chunks of this attempt while its worker was connected there.
                expected = self.next_seq(job_seq, idx, attempt, code)?;
                self.out_bytes.remove(&c.lease);
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
            let meta = self.meta(job_seq)?;
            let before = self.stored_bytes(c.lease, job_seq, idx, attempt)?;
            // Past its cap, an attempt keeps what fits and its task ends.
            let over = meta.spec.max_output.filter(|cap| before + c.data.len() as u64 > *cap);
            if let Some(cap) = over.filter(|cap| before >= *cap) {
                // At its cap already: nothing more is kept, and the task ends (if the
                // chunk that reached the cap exactly has not ended it).
                self.expected_seq.insert(key, expected + 1);
                let ended = self.end_over_cap(job_seq, idx, attempt, worker, cap, before + c.data.len() as u64, Utc::now(), s)?;
                owners.insert(c.lease, Owner::Ended);
                verdicts.push(if ended { ChunkVerdict::OverCap } else { ChunkVerdict::Dropped });
                continue;
            }
            let data = match over {
                Some(cap) => Arc::new(c.data[..cap.saturating_sub(before) as usize].to_vec()),
                None => c.data.clone(),
            };
            let stored = match self.segments.as_mut() {
                Some(seg) if data.len() >= super::segments::MIN_SEGMENT_CHUNK => {
                    let (id, off) = seg.append(&data).map_err(|source| StoreError::Segment { what: "cannot be written".into(), source })?;
                    self.db.exec(
                        "INSERT INTO logs(job_seq, idx, attempt, stream, seq, data, seg, off, len) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
                        p![job_seq, idx, attempt, code, c.seq, &[][..], id as i64, off as i64, data.len() as i64],
                    )?
                }
                _ => self.db.exec(
                    "INSERT INTO logs(job_seq, idx, attempt, stream, seq, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    p![job_seq, idx, attempt, code, c.seq, data.as_slice()],
                )?,
            };
            self.expected_seq.insert(key, expected + 1);
            if stored == 0 {
                verdicts.push(ChunkVerdict::Duplicate);
                continue;
            }
            self.out_bytes.insert(c.lease, before + data.len() as u64);
            if !data.is_empty() {
                s.notices.push(Notice::Output { job: meta.id, index: Self::task_index(&meta, idx), attempt, exec: c.exec, stream: c.stream, seq: c.seq, data });
            }
            match over {
                Some(cap) => {
                    let ended = self.end_over_cap(job_seq, idx, attempt, worker, cap, before + c.data.len() as u64, Utc::now(), s)?;
                    owners.insert(c.lease, Owner::Ended);
                    verdicts.push(if ended { ChunkVerdict::OverCap } else { ChunkVerdict::Dropped });
                }
                None => verdicts.push(ChunkVerdict::Stored),
            }
        }
        if self.expected_seq.len() > 100_000 {
            self.expected_seq.clear();
        }
        if self.out_bytes.len() > 100_000 {
            self.out_bytes.clear();
        }
        Ok(verdicts)
    }

    /// An attempt wrote past its output cap (`written` bytes by then): its task fails,
    /// charged for its time so far as a cancelled one is, if it is still running (not
    /// cancelled meanwhile); its worker is told to kill it (the chunk's verdict says so).
    /// `true` when it ended the task.
    #[allow(clippy::too_many_arguments)]
    fn end_over_cap(
        &mut self,
        job_seq: i64,
        idx: i64,
        attempt: u32,
        worker: &str,
        cap: u64,
        written: u64,
        now: DateTime<Utc>,
        s: &mut Scratch,
    ) -> Result<bool, StoreError> {
        use berth_shared::duration::format_size;
        let meta = self.meta(job_seq)?;
        let why = format!(
            "output over its cap: {} written, more than the output cap of {} (max_output); the first {} are kept and the attempt was killed",
            format_size(written),
            format_size(cap),
            format_size(cap)
        );
        let ended = self.db.exec(
            "UPDATE tasks SET state = 'failed', ended_at = ?1, reason = ?2 WHERE job_seq = ?3 AND idx = ?4 AND state = 'running'",
            p![ms(now), why.as_str(), job_seq, idx],
        )?;
        if ended == 0 {
            return Ok(false);
        }
        let index = Self::task_index(&meta, idx);
        self.event(job_seq, index.map(i64::from), now, JobState::Failed, attempt, Some(worker), Some(&why))?;
        self.shift(job_seq, JobState::Running, JobState::Failed, 1, s)?;
        let actual = self.ran_for(&meta, job_seq, idx, worker, now)?;
        let left = meta.spec.max_attempts.saturating_sub(attempt) + 1;
        self.settle(&meta, job_seq, idx, left, actual)?;
        s.notices.push(Notice::TaskEnded { job: meta.id, index, attempt, state: JobState::Failed });
        Ok(true)
    }
}
