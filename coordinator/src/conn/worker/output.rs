//! One attempt's output stream: `Open`, then chunks, stored in batches through the
//! LogStore (whatever arrived while the previous batch was being committed, several
//! batches in flight, answered in order) and acknowledged once durable.
//!
//! A batch the store could not take (its disk full, say) ends the stream; once the
//! store can write again the worker is told to send what is not acknowledged again
//! (`CoordMsg::Resend`), from its spool, on a new stream. An attempt past its output
//! cap is killed on its worker, as a cancelled one is; what it prints after that is
//! acknowledged and dropped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::read_frame;
use berth_shared::ids::LeaseId;
use berth_shared::wire::{CoordMsg, KillReason, OutStream, OutputFrame, MAX_CHUNK_BYTES};
use tokio::sync::{mpsc, oneshot};

use super::super::{close_for, Shared, CLOSE_PROTOCOL};
use crate::actors::{job_store, log_store, registry};
use crate::store::{ChunkVerdict, LogChunk, StoreError};

/// Output batches one stream may have at the store's writer at once, and chunks in a
/// batch: at most 4 x 32 x 256 KiB (32 MiB) of one stream's output waits in memory.
const APPENDS_IN_FLIGHT: usize = 4;
const APPEND_BATCH: usize = 32;

type Verdicts = oneshot::Receiver<Result<Vec<ChunkVerdict>, StoreError>>;

pub async fn serve(mut recv: quinn::RecvStream, shared: Arc<Shared>, worker: String, ctrl: mpsc::UnboundedSender<CoordMsg>, conn: quinn::Connection) {
    let (lease, exec) = match read_frame::<_, OutputFrame>(&mut recv).await {
        Ok(Some(OutputFrame::Open { lease })) => (lease, 0),
        Ok(Some(OutputFrame::OpenExec { lease, exec })) if exec > 0 => (lease, exec),
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
                        if tx.send(LogChunk { lease, exec, stream, seq, data: Arc::new(data) }).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(OutputFrame::Open { .. } | OutputFrame::OpenExec { .. })) => {
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
                        tracing::warn!(error = %e, lease = %lease, "cannot store output; the worker is asked to send it again once the store can write");
                        resend_when_writable(&shared, ctrl.clone(), lease);
                        break;
                    }
                };
                let acked = acknowledge(lease, keys, verdicts);
                for (stream, seq) in acked.acks {
                    let _ = ctrl.send(match exec {
                        0 => CoordMsg::OutputAck { lease, stream, seq },
                        exec => CoordMsg::ExecOutputAck { lease, exec, stream, seq },
                    });
                }
                if acked.capped {
                    tracing::info!(lease = %lease, "the attempt passed its output cap; its task failed, killing it");
                    shared.actors.registry.do_send(registry::Leases { name: worker.clone(), added: vec![], removed: vec![lease], heartbeat: false });
                    shared.actors.registry.do_send(registry::Kill { worker: worker.clone(), lease, reason: KillReason::Cancelled });
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

/// Tells the worker to send this attempt's unacknowledged output again once the store
/// can write (and not sooner than a second from now, so a store failing for another
/// reason is not asked again and again).
fn resend_when_writable(shared: &Shared, ctrl: mpsc::UnboundedSender<CoordMsg>, lease: LeaseId) {
    let job_store = shared.actors.job_store.clone();
    actix_rt::spawn(async move {
        let Ok(mut health) = job_store.send(job_store::HealthWatch).await else { return };
        tokio::time::sleep(Duration::from_secs(1)).await;
        if health.wait_for(|h| h.is_none()).await.is_ok() {
            tracing::info!(lease = %lease, "the store can write again; asking the worker to send the output it could not store");
            // For a session, the worker sends its execs' unacknowledged output again too.
            let _ = ctrl.send(CoordMsg::Resend { lease });
        }
    });
}

/// What one stored batch acknowledges.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Acked {
    /// The highest stored (or already stored) sequence per stream.
    pub acks: Vec<(OutStream, u64)>,
    /// The attempt's lease is stale: kill it and drop the stream (nothing after the
    /// stale chunk is acknowledged).
    pub stale: bool,
    /// The attempt passed its output cap: its task has failed; kill it.
    pub capped: bool,
}

/// Turns a batch's verdicts into acknowledgements. A duplicate is acknowledged (it is
/// stored already), as is a chunk dropped because its task has ended; an out-of-order
/// chunk is not (the worker resends it in order).
pub fn acknowledge(lease: LeaseId, keys: Vec<(OutStream, u64)>, verdicts: Vec<ChunkVerdict>) -> Acked {
    let mut out = Acked::default();
    for ((stream, seq), v) in keys.into_iter().zip(verdicts) {
        match v {
            ChunkVerdict::Stored | ChunkVerdict::Duplicate | ChunkVerdict::Dropped | ChunkVerdict::OverCap => {
                out.capped |= v == ChunkVerdict::OverCap;
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
        assert_eq!(acked, Acked { acks: vec![(o, 2), (e, 1)], stale: false, capped: false });
        let acked = acknowledge(lease, vec![(o, 1), (o, 2)], vec![ChunkVerdict::Stored, ChunkVerdict::StaleLease]);
        assert_eq!(acked, Acked { acks: vec![], stale: true, capped: false });
        // Past the cap: acknowledged (what fitted is stored, the rest dropped), and killed.
        let acked = acknowledge(lease, vec![(o, 1), (o, 2), (e, 1)], vec![ChunkVerdict::OverCap, ChunkVerdict::Dropped, ChunkVerdict::Dropped]);
        assert_eq!(acked, Acked { acks: vec![(o, 2), (e, 1)], stale: false, capped: true });
    }
}
