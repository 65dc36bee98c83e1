//! A worker's session: registration and lease reconciliation, claims pushed to the
//! worker as soon as it has free capacity and work exists (no polling: the store's
//! work signal wakes idle sessions), results, heartbeats, and one output stream per
//! running attempt with acknowledgements once chunks are durable.
//!
//! A session claims only for a worker that is demonstrably there: not once a newer
//! connection of the same worker registered (the old one is closed before the new
//! one's leases are reconciled), and not while the worker has been silent for half a
//! lease TTL (it heartbeats every third of one). Otherwise a dead or stopped worker's
//! connection, which the transport keeps open until its idle timeout, would claim the
//! very tasks its lost leases just sent back to the queue, and burn their attempts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_shared::codec::{encode, read_frame, write_frame};
use berth_shared::ids::LeaseId;
use berth_shared::wire::{CoordMsg, KillReason, OutStream, OutputFrame, WorkerMsg, MAX_CHUNK_BYTES};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::actors::{job_store, registry};
use crate::server::{close_for, Shared, CLOSE_PROTOCOL, CLOSE_REFUSED};
use crate::store::{ChunkVerdict, FinishVerdict, LogChunk, Op, StoreError, WorkerCaps};

enum Event {
    Frame(WorkerMsg),
    Claimed {
        asked: u32,
        result: Result<crate::store::Claimed, StoreError>,
    },
    Finished {
        lease: LeaseId,
        result: Result<FinishVerdict, StoreError>,
    },
    Renewed(Result<Vec<LeaseId>, StoreError>),
    /// A task waits for a spill delay to pass: claim again.
    Retry,
    Closed(String),
}

/// Tells a worker why it is refused and closes the connection once the answer has
/// arrived (closing at once would discard it), so the worker can stop with the reason
/// instead of retrying.
async fn refuse(conn: &quinn::Connection, send: &mut quinn::SendStream, reason: &str) {
    if write_frame(send, &CoordMsg::Refused { reason: reason.to_string() }).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
}

pub async fn serve(conn: quinn::Connection, mut send: quinn::SendStream, mut recv: quinn::RecvStream, shared: Arc<Shared>, name: String, conn_id: u64) {
    let span = tracing::info_span!("worker", worker = %name);
    async move {
        let register = match tokio::time::timeout(Duration::from_secs(10), read_frame::<_, WorkerMsg>(&mut recv)).await {
            Ok(Ok(Some(m))) => m,
            Ok(Err(e)) => return close_for(&conn, &e),
            _ => {
                conn.close(CLOSE_PROTOCOL.into(), b"expected Register");
                return;
            }
        };
        let WorkerMsg::Register { name: claimed, slots, pool, labels, host, held } = register else {
            conn.close(CLOSE_PROTOCOL.into(), b"the first worker message must be Register");
            return;
        };
        // Labels starting with `berth.` are berth's: every worker carries its own name as
        // `berth.worker=NAME` (so a job can ask for one worker, as a resumed job asks for
        // the one holding its image), and none may claim another's.
        let labels: Vec<(String, String)> = labels
            .into_iter()
            .filter(|(k, _)| !k.starts_with(berth_shared::job::SYSTEM_LABEL_PREFIX))
            .chain([(berth_shared::job::LABEL_PINNED_WORKER.to_string(), name.clone())])
            .collect();
        if claimed != name {
            let reason = format!("worker calls itself `{claimed}` but its certificate says `{name}`");
            refuse(&conn, &mut send, &reason).await;
            return;
        }
        let a = shared.actors.clone();
        // Pools are the coordinator's configuration: a worker may only join one it has.
        let joined = match a.budget.send(crate::actors::budget::JoinPool { pool: pool.clone() }).await {
            Ok(Ok(p)) => p,
            Ok(Err(reason)) => {
                tracing::warn!(pool = %pool, "refused a worker naming an unknown pool");
                refuse(&conn, &mut send, &reason).await;
                return;
            }
            Err(_) => {
                conn.close(CLOSE_REFUSED.into(), b"the coordinator is shutting down");
                return;
            }
        };
        // A connection of this worker from before (its process restarted, or it gave
        // up on that link) is closed first, so it claims nothing after the reconcile.
        if a.registry.send(registry::Retire { name: name.clone(), conn_id }).timeout(Duration::from_secs(10)).await.is_err() {
            conn.close(CLOSE_REFUSED.into(), b"the coordinator is overloaded; try again");
            return;
        }
        let reconciled = match a.job_store.send(job_store::Reconcile { worker: name.clone(), pool: pool.clone(), held: held.clone() }).await {
            Ok(Ok(r)) => r,
            _ => {
                conn.close(CLOSE_REFUSED.into(), b"the coordinator cannot reach its store");
                return;
            }
        };
        for l in &reconciled.stale {
            tracing::warn!(lease = %l, "worker reported a lease that is not valid; telling it to kill that attempt");
        }
        if reconciled.lost > 0 {
            tracing::warn!(lost = reconciled.lost, "worker came back without attempts it held; they were re-queued");
        }
        let ttl_ms = shared.lease_ttl.as_millis() as u64;
        if write_frame(&mut send, &CoordMsg::Registered { lease_ttl_ms: ttl_ms, stale: reconciled.stale.clone() }).await.is_err() {
            return;
        }
        let drained = crate::actors::reader::query(&a.reader, {
            let n = name.clone();
            move |r| crate::store::Reader::is_drained(r, &n)
        })
        .await
        .unwrap_or(false);
        let labels_for_caps = labels.clone();
        let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel::<CoordMsg>();
        let valid: Vec<LeaseId> = held.iter().filter(|l| !reconciled.stale.contains(l)).copied().collect();
        a.registry.do_send(registry::Connect {
            name: name.clone(),
            conn_id,
            conn: conn.clone(),
            tx: ctrl_tx.clone(),
            slots,
            pool,
            labels,
            host: host.clone(),
            leases: valid,
            drained,
        });
        tracing::info!(slots, "worker connected");
        let caps = Arc::new(WorkerCaps::of(&host, &joined.name, joined.is_free(), labels_for_caps));

        let (ev_tx, mut ev) = mpsc::unbounded_channel::<Event>();
        // Control frames, read by their own task (reads are not cancellation-safe).
        {
            let ev_tx = ev_tx.clone();
            let conn = conn.clone();
            actix_rt::spawn(async move {
                loop {
                    match read_frame::<_, WorkerMsg>(&mut recv).await {
                        Ok(Some(m)) => {
                            if ev_tx.send(Event::Frame(m)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            let _ = ev_tx.send(Event::Closed("control stream ended".into()));
                            return;
                        }
                        Err(e) => {
                            close_for(&conn, &e);
                            let _ = ev_tx.send(Event::Closed(e.to_string()));
                            return;
                        }
                    }
                }
            });
        }
        // Output streams, logged in this worker's span.
        {
            let conn = conn.clone();
            let shared = shared.clone();
            let name = name.clone();
            let ctrl_tx = ctrl_tx.clone();
            let span = tracing::Span::current();
            actix_rt::spawn(
                async move {
                    while let Ok(stream) = conn.accept_uni().await {
                        let stream = output_stream(stream, shared.clone(), name.clone(), ctrl_tx.clone(), conn.clone());
                        actix_rt::spawn(stream.instrument(tracing::Span::current()));
                    }
                }
                .instrument(span),
            );
        }

        // Frames for the worker, written together once nothing else is waiting to be
        // handled: an acknowledgement and the next assignment leave in one packet.
        let mut pending: Vec<u8> = Vec::new();
        let mut deferred = 0u32;
        let mut work = shared.store.work.subscribe();
        let mut wanted: u32 = 0;
        // What the worker last said it has free (it sends `WantFit`), less what was
        // handed out since.
        let mut free: Option<crate::store::Free> = None;
        let mut retry_armed = false;
        let mut claiming = false;
        let mut hint = true;
        let mut last_heard = Instant::now();
        let quiet_limit = shared.lease_ttl / 2;
        let mut quiet_logged = false;
        loop {
            let quiet = last_heard.elapsed() > quiet_limit;
            if quiet && wanted > 0 && hint && !quiet_logged {
                tracing::debug!(silent = ?last_heard.elapsed(), "worker is silent; claiming nothing for it until it speaks");
            }
            quiet_logged = quiet;
            if wanted > 0 && !claiming && hint && !quiet && conn.close_reason().is_none() {
                claiming = true;
                hint = false;
                let store = a.job_store.clone();
                let (worker, caps, ev_tx, asked, free) = (name.clone(), caps.clone(), ev_tx.clone(), wanted, free.clone());
                actix_rt::spawn(async move {
                    let result = store.send(job_store::Claim { worker, n: asked, caps, free }).await.unwrap_or(Err(StoreError::Stopped));
                    let _ = ev_tx.send(Event::Claimed { asked, result });
                });
            }
            let event = tokio::select! {
                e = ev.recv() => match e { Some(e) => e, None => break },
                m = ctrl_rx.recv() => {
                    let Some(m) = m else { break };
                    queue(&mut pending, &m);
                    if !flush_when_idle(&mut send, &mut pending, &mut deferred, &ev, &ctrl_rx).await { break }
                    continue;
                }
                changed = work.changed() => {
                    if changed.is_err() { break }
                    hint = true;
                    continue;
                }
            };
            if matches!(event, Event::Frame(_)) {
                last_heard = Instant::now();
            }
            let out = match event {
                Event::Closed(why) => {
                    tracing::info!(reason = %why, "worker disconnected");
                    break;
                }
                Event::Frame(WorkerMsg::Want { n }) => {
                    wanted = wanted.saturating_add(n).min(100_000);
                    hint = true;
                    None
                }
                Event::Frame(WorkerMsg::WantFit { n, free: f }) => {
                    wanted = wanted.saturating_add(n).min(100_000);
                    free = Some(f);
                    hint = true;
                    None
                }
                Event::Retry => {
                    retry_armed = false;
                    hint = true;
                    None
                }
                Event::Frame(WorkerMsg::Started { lease }) => {
                    a.job_store.do_send(job_store::Started { worker: name.clone(), lease });
                    None
                }
                Event::Frame(WorkerMsg::Finished { lease, outcome }) => {
                    let (store, worker, ev_tx) = (a.job_store.clone(), name.clone(), ev_tx.clone());
                    actix_rt::spawn(async move {
                        let result = store.send(job_store::Finish { worker, lease, outcome }).await.unwrap_or(Err(StoreError::Stopped));
                        let _ = ev_tx.send(Event::Finished { lease, result });
                    });
                    None
                }
                Event::Frame(WorkerMsg::Heartbeat { leases }) => {
                    let (store, worker, ev_tx) = (a.job_store.clone(), name.clone(), ev_tx.clone());
                    actix_rt::spawn(async move {
                        let r = store.send(job_store::Heartbeat { worker, leases }).await.unwrap_or(Err(StoreError::Stopped));
                        let _ = ev_tx.send(Event::Renewed(r));
                    });
                    None
                }
                Event::Frame(WorkerMsg::Frozen { lease, image, outcome }) => {
                    let (store, worker, ev_tx) = (a.job_store.clone(), name.clone(), ev_tx.clone());
                    actix_rt::spawn(async move {
                        let result = store.send(job_store::Frozen { worker, lease, outcome, image }).await.unwrap_or(Err(StoreError::Stopped));
                        let _ = ev_tx.send(Event::Finished { lease, result });
                    });
                    None
                }
                Event::Frame(WorkerMsg::ImageRemoved { image, error }) => {
                    a.registry.do_send(registry::ImageRemoved { worker: name.clone(), image, error });
                    None
                }
                Event::Frame(WorkerMsg::Register { .. }) => {
                    conn.close(CLOSE_PROTOCOL.into(), b"Register sent twice");
                    break;
                }
                Event::Claimed { asked, result } => {
                    claiming = false;
                    match result {
                        Ok(claimed) => {
                            let got = claimed.tasks;
                            if got.len() as u32 == asked {
                                hint = true;
                            }
                            if let Some(f) = free.as_mut() {
                                for g in &got {
                                    f.take(&g.spec.resources);
                                }
                            }
                            if let (Some(d), false) = (claimed.retry_in, retry_armed) {
                                // A task is waiting for cheaper pools first: look again when its spill delay is over.
                                retry_armed = true;
                                let ev_tx = ev_tx.clone();
                                actix_rt::spawn(async move {
                                    tokio::time::sleep(d + Duration::from_millis(20)).await;
                                    let _ = ev_tx.send(Event::Retry);
                                });
                            }
                            wanted = wanted.saturating_sub(got.len() as u32);
                            if got.is_empty() {
                                None
                            } else {
                                a.registry.do_send(registry::Leases {
                                    name: name.clone(),
                                    added: got.iter().map(|g| g.lease).collect(),
                                    removed: vec![],
                                    heartbeat: false,
                                });
                                Some(CoordMsg::Assign(got))
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "claim failed");
                            None
                        }
                    }
                }
                Event::Finished { lease, result } => {
                    a.registry.do_send(registry::Leases { name: name.clone(), added: vec![], removed: vec![lease], heartbeat: false });
                    match result {
                        Ok(FinishVerdict::Stale) => {
                            tracing::warn!(lease = %lease, "rejected a result carrying a stale lease");
                            queue(&mut pending, &CoordMsg::FinishedAck { lease, accepted: false });
                            Some(CoordMsg::Kill { lease, reason: KillReason::StaleLease })
                        }
                        Ok(_) => Some(CoordMsg::FinishedAck { lease, accepted: true }),
                        Err(e) => {
                            // Not acknowledged: the worker resends after a reconnect.
                            tracing::error!(error = %e, lease = %lease, "cannot record a result");
                            None
                        }
                    }
                }
                Event::Renewed(r) => {
                    // Leases that turned out stale are no longer this worker's.
                    let removed = r.as_ref().map(|stale| stale.clone()).unwrap_or_default();
                    a.registry.do_send(registry::Leases { name: name.clone(), added: vec![], removed, heartbeat: true });
                    match r {
                        Ok(stale) => {
                            for l in &stale {
                                tracing::warn!(lease = %l, "heartbeat for a lease this worker does not hold; telling it to kill that attempt");
                            }
                            Some(CoordMsg::HeartbeatAck { stale })
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot renew leases");
                            None
                        }
                    }
                }
            };
            if let Some(m) = out {
                queue(&mut pending, &m);
            }
            if !flush_when_idle(&mut send, &mut pending, &mut deferred, &ev, &ctrl_rx).await {
                break;
            }
        }
        a.registry.do_send(registry::Disconnect { name: name.clone(), conn_id });
    }
    .instrument(span)
    .await
}

/// One attempt's output stream: `Open`, then chunks, stored in batches (whatever
/// arrived while the previous batch was being committed) and acknowledged when durable.
async fn output_stream(mut recv: quinn::RecvStream, shared: Arc<Shared>, worker: String, ctrl: mpsc::UnboundedSender<CoordMsg>, conn: quinn::Connection) {
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
                let verdicts = match verdicts {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, lease = %lease, "cannot store output; the worker will resend it");
                        break;
                    }
                    Err(_) => break,
                };
                if !acknowledge(lease, keys, verdicts, &shared, &worker, &ctrl) {
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
                let (tx, verdicts) = oneshot::channel();
                if shared.store.send(Op::AppendLogs { worker: worker.clone(), chunks: batch, reply: Some(tx) }).is_err() {
                    break;
                }
                inflight.push_back((keys, verdicts));
            }
            else => break,
        }
    }
    reader.abort();
}

/// Queues a frame for the worker (see `flush_when_idle`).
fn queue(pending: &mut Vec<u8>, m: &CoordMsg) {
    match encode(m) {
        Ok(frame) => pending.extend_from_slice(&frame),
        Err(e) => tracing::error!(error = %e, "cannot encode a message for the worker"),
    }
}

/// Writes the queued frames once no event or message is waiting to be handled (or
/// enough have gathered, or they have waited for enough turns); `false` when the
/// connection is gone.
async fn flush_when_idle(
    send: &mut quinn::SendStream,
    pending: &mut Vec<u8>,
    deferred: &mut u32,
    ev: &mpsc::UnboundedReceiver<Event>,
    ctrl: &mpsc::UnboundedReceiver<CoordMsg>,
) -> bool {
    if pending.is_empty() {
        return true;
    }
    if pending.len() < FLUSH_BYTES && *deferred < FLUSH_TURNS && !(ev.is_empty() && ctrl.is_empty()) {
        *deferred += 1;
        return true;
    }
    *deferred = 0;
    send.write_chunk(bytes::Bytes::from(std::mem::take(pending))).await.is_ok()
}

/// Queued frames are written once this much has gathered, busy or not.
const FLUSH_BYTES: usize = 64 * 1024;
/// Or once they have waited this many turns of the session loop.
const FLUSH_TURNS: u32 = 16;

/// The store's answer to one batch of output chunks: a verdict per chunk.
type Verdicts = oneshot::Receiver<Result<Vec<ChunkVerdict>, StoreError>>;

/// Output batches one stream may have at the store's writer at once, and chunks in a
/// batch: at most 4 x 32 x 256 KiB (32 MiB) of one stream's output waits in memory.
const APPENDS_IN_FLIGHT: usize = 4;
const APPEND_BATCH: usize = 32;

/// Acknowledges the chunks of one stored batch; `false` when the attempt's lease
/// turned out stale (the worker is told to kill it, and the stream is dropped).
fn acknowledge(
    lease: LeaseId,
    keys: Vec<(OutStream, u64)>,
    verdicts: Vec<ChunkVerdict>,
    shared: &Shared,
    worker: &str,
    ctrl: &mpsc::UnboundedSender<CoordMsg>,
) -> bool {
    let mut acks: Vec<(OutStream, u64)> = Vec::new();
    for ((stream, seq), v) in keys.into_iter().zip(verdicts) {
        match v {
            ChunkVerdict::Stored | ChunkVerdict::Duplicate => {
                if v == ChunkVerdict::Duplicate {
                    tracing::debug!(lease = %lease, ?stream, seq, "dropped a duplicate output chunk (already stored)");
                }
                match acks.iter_mut().find(|(s, _)| *s == stream) {
                    Some(a) => a.1 = a.1.max(seq),
                    None => acks.push((stream, seq)),
                }
            }
            ChunkVerdict::StaleLease => {
                tracing::warn!(lease = %lease, "rejected output carrying a stale lease; telling the worker to kill that attempt");
                shared.actors.registry.do_send(registry::Leases { name: worker.to_string(), added: vec![], removed: vec![lease], heartbeat: false });
                let _ = ctrl.send(CoordMsg::Kill { lease, reason: KillReason::StaleLease });
                return false;
            }
            ChunkVerdict::OutOfOrder { expected } => {
                tracing::warn!(lease = %lease, ?stream, seq, expected, "dropped an out-of-order output chunk");
            }
        }
    }
    for (stream, seq) in acks {
        let _ = ctrl.send(CoordMsg::OutputAck { lease, stream, seq });
    }
    true
}
