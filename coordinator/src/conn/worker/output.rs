//! One attempt's output stream: `Open`, then chunks, stored in batches through the
//! LogStore (whatever arrived while the previous batch was being committed, several
//! batches in flight, answered in order) and acknowledged once durable.

use std::collections::VecDeque;
use std::sync::Arc;

use berth_shared::codec::read_frame;
use berth_shared::ids::LeaseId;
use berth_shared::wire::{CoordMsg, KillReason, OutStream, OutputFrame, MAX_CHUNK_BYTES};
use tokio::sync::{mpsc, oneshot};

use super::super::{close_for, Shared, CLOSE_PROTOCOL};
use crate::actors::{log_store, registry};
use crate::store::{ChunkVerdict, LogChunk, StoreError};

/// Output batches one stream may have at the store's writer at once, and chunks in a
/// batch: at most 4 x 32 x 256 KiB (32 MiB) of one stream's output waits in memory.
const APPENDS_IN_FLIGHT: usize = 4;
const APPEND_BATCH: usize = 32;

type Verdicts = oneshot::Receiver<Result<Vec<ChunkVerdict>, StoreError>>;

pub async fn serve(mut recv: quinn::RecvStream, shared: Arc<Shared>, worker: String, ctrl: mpsc::UnboundedSender<CoordMsg>, conn: quinn::Connection) {
    let lease = match read_frame::<_, OutputFrame>(&mut recv).await {
        Ok(Some(OutputFrame::Open { lease })) => lease,
        Ok(Some(_)) => {
            conn.close(CLOSE_PROTOCOL.into(), b"an output stream must start with Open");
            return;
        }
        Ok(None) => return,
        Err(e) => return close_for(&conn, &e),
    };
    let (tx, mut rx) = mpsc::channel::<LogChunk>(64);
    let reader = {
        let conn = conn.clone();
        actix_rt::spawn(async move {
            loop {
                match read_frame::<_, OutputFrame>(&mut recv).await {
                    Ok(Some(OutputFrame::Chunk { stream, seq, data })) => {
                        if data.len() > MAX_CHUNK_BYTES {
                            conn.close(CLOSE_PROTOCOL.into(), b"output chunk over the size limit");
                            return;
                        }
                        if tx.send(LogChunk { lease, stream, seq, data: Arc::new(data) }).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(OutputFrame::Open { .. })) => {
                        conn.close(CLOSE_PROTOCOL.into(), b"Open sent twice on one output stream");
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => return close_for(&conn, &e),
                }
            }
        })
    };
    let log_store = shared.actors.log_store.clone();
    // Batches go to the store's writer in order, several at a time: while one is being
    // committed the next gathers, and the writer folds those waiting into one commit.
    // Their verdicts are read in the same order.
    let mut inflight: VecDeque<(Vec<(OutStream, u64)>, Verdicts)> = VecDeque::new();
    let mut input_open = true;
    loop {
        tokio::select! {
            biased;
            verdicts = async { (&mut inflight.front_mut().expect("guarded by the condition").1).await }, if !inflight.is_empty() => {
                let (keys, _) = inflight.pop_front().expect("a batch in flight");
                let verdicts = match verdicts.unwrap_or(Err(StoreError::Stopped)) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(error = %e, lease = %lease, "cannot store output; the worker will resend it");
                        break;
                    }
                };
                let acked = acknowledge(lease, keys, verdicts);
                for (stream, seq) in acked.acks {
                    let _ = ctrl.send(CoordMsg::OutputAck { lease, stream, seq });
                }
                if acked.stale {
                    tracing::warn!(lease = %lease, "rejected output carrying a stale lease; telling the worker to kill that attempt");
                    shared.actors.registry.do_send(registry::Leases { name: worker.clone(), added: vec![], removed: vec![lease], heartbeat: false });
                    let _ = ctrl.send(CoordMsg::Kill { lease, reason: KillReason::StaleLease });
                    break;
                }
            }
            first = rx.recv(), if input_open && inflight.len() < APPENDS_IN_FLIGHT => {
                let Some(first) = first else {
                    input_open = false;
                    continue;
                };
                let mut batch = vec![first];
                while batch.len() < APPEND_BATCH {
                    match rx.try_recv() {
                        Ok(c) => batch.push(c),
                        Err(_) => break,
                    }
                }
                let keys: Vec<_> = batch.iter().map(|c| (c.stream, c.seq)).collect();
                let (reply, verdicts) = oneshot::channel();
                log_store.do_send(log_store::Append { worker: worker.clone(), chunks: batch, reply: Some(reply) });
                inflight.push_back((keys, verdicts));
            }
            else => break,
        }
    }
    reader.abort();
}

/// What one stored batch acknowledges.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Acked {
    /// The highest stored (or already stored) sequence per stream.
    pub acks: Vec<(OutStream, u64)>,
    /// The attempt's lease is stale: kill it and drop the stream (nothing after the
    /// stale chunk is acknowledged).
    pub stale: bool,
}

/// Turns a batch's verdicts into acknowledgements. A duplicate is acknowledged (it is
/// stored already); an out-of-order chunk is not (the worker resends it in order).
pub fn acknowledge(lease: LeaseId, keys: Vec<(OutStream, u64)>, verdicts: Vec<ChunkVerdict>) -> Acked {
    let mut out = Acked::default();
    for ((stream, seq), v) in keys.into_iter().zip(verdicts) {
        match v {
            ChunkVerdict::Stored | ChunkVerdict::Duplicate => {
                if v == ChunkVerdict::Duplicate {
                    tracing::debug!(lease = %lease, ?stream, seq, "dropped a duplicate output chunk (already stored)");
                }
                match out.acks.iter_mut().find(|(s, _)| *s == stream) {
                    Some(a) => a.1 = a.1.max(seq),
                    None => out.acks.push((stream, seq)),
                }
            }
            ChunkVerdict::StaleLease => {
                out.acks.clear();
                out.stale = true;
                return out;
            }
            ChunkVerdict::OutOfOrder { expected } => {
                tracing::warn!(lease = %lease, ?stream, seq, expected, "dropped an out-of-order output chunk");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_acknowledged_gaps_are_not_and_a_stale_lease_acknowledges_nothing() {
        let lease = LeaseId::new();
        let (o, e) = (OutStream::Stdout, OutStream::Stderr);
        let acked = acknowledge(
            lease,
            vec![(o, 1), (o, 2), (e, 1), (o, 4)],
            vec![ChunkVerdict::Duplicate, ChunkVerdict::Stored, ChunkVerdict::Stored, ChunkVerdict::OutOfOrder { expected: 3 }],
        );
        assert_eq!(acked, Acked { acks: vec![(o, 2), (e, 1)], stale: false });
        let acked = acknowledge(lease, vec![(o, 1), (o, 2)], vec![ChunkVerdict::Stored, ChunkVerdict::StaleLease]);
        assert_eq!(acked, Acked { acks: vec![], stale: true });
    }
}
