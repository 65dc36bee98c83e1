//! A worker's link, the driver: registration and lease reconciliation, then a loop
//! that feeds the link's state machine (`link`) with frames, store answers, the work
//! signal and timers, and carries out what it says (claims pushed to the worker as
//! soon as it has free capacity and work exists; no polling). Each running attempt's
//! output arrives on a stream of its own (`output`), acknowledged once durable.
//!
//! A session claims only for a worker that is demonstrably there: not once a newer
//! connection of the same worker registered (the old one is closed before the new
//! one's leases are reconciled), and not while the worker has been silent for half a
//! lease TTL (it heartbeats every third of one). Otherwise a dead or stopped worker's
//! connection, which the transport keeps open until its idle timeout, would claim the
//! very tasks its lost leases just sent back to the queue, and burn their attempts.
//!
//! A name is one worker's (enrolment here, admission in the registry): a connection
//! whose certificate a later enrolment of its name replaced is refused, and one from
//! another process presenting a live worker's certificate is told `InUse` and waits,
//! so two processes never take the name from each other in turn.

mod link;
mod output;

use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::{encode, read_frame, write_frame};
use berth_shared::ids::LeaseId;
use berth_shared::wire::{ApiError, CoordMsg, ErrorKind, WorkerMsg};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

pub use link::{Action, Input, Link};

use super::{close_for, Shared, CLOSE_PROTOCOL, CLOSE_REFUSED};
use crate::actors::job_store::{self, JobStore};
use crate::actors::{registry, Actors};
use crate::scheduler::WorkerCaps;
use crate::store::StoreError;

/// What the driver's loop waits on besides the worker's control messages: an input
/// for the link, or the end of the control stream.
enum Event {
    Input(Input),
    /// A frame, with when it was read: a link busy under load hears it later, and a
    /// worker killed meanwhile must not seem to have spoken then (its link would claim
    /// for it).
    Frame(WorkerMsg, Instant),
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

/// Enrols a worker: signs its CSR for `name` and spends the join token, recording the
/// certificate's fingerprint as the name's. Refused, with the token kept, while another
/// worker may hold the name (see the store's `use_token`).
pub async fn enrol(shared: &Shared, token: String, name: String, csr_pem: String) -> Result<berth_shared::wire::Response, ApiError> {
    berth_shared::tls::validate_name(&name).map_err(|e| ApiError::new(ErrorKind::Invalid, e.to_string()))?;
    let cert_pem = shared
        .ca
        .sign_csr(&csr_pem, &name, berth_shared::wire::Role::Worker)
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("cannot sign the CSR: {e}")))?;
    let cert_fp =
        berth_shared::tls::fingerprint_pem(&cert_pem).ok_or_else(|| ApiError::new(ErrorKind::Internal, "the certificate just issued does not parse"))?;
    let a = &shared.actors;
    let held = a.registry.send(registry::Held { name: name.clone(), ttl: shared.lease_ttl }).await.map_err(super::mailbox)?;
    a.job_store.send(job_store::UseToken { token, worker: name.clone(), cert_fp, held }).await.map_err(super::mailbox)?.map_err(super::api)?;
    tracing::info!(worker = %name, "worker enrolled");
    Ok(berth_shared::wire::Response::Enrolled { cert_pem })
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
        let WorkerMsg::Register { name: claimed, slots, pool, labels, host, held, instance } = register else {
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
        // A name enrolled again belongs to the certificate its latest enrolment issued;
        // the one it replaced no longer connects.
        let current = crate::actors::reader::query(&a.reader, {
            let n = name.clone();
            move |r| crate::store::Reader::worker_cert(r, &n)
        })
        .await;
        match current {
            Ok(Some(fp)) if berth_shared::tls::peer_fingerprint(&conn).as_deref() != Some(fp.as_str()) => {
                let reason = format!(
                    "the certificate of worker `{name}` in this work dir was replaced: the name was enrolled again by another worker; \
                     start this one with a new --name, an empty work dir and a join token"
                );
                tracing::warn!("refused a worker certificate that a later enrolment of its name replaced");
                refuse(&conn, &mut send, &reason).await;
                return;
            }
            Ok(_) => {}
            Err(_) => {
                conn.close(CLOSE_REFUSED.into(), b"the coordinator cannot reach its store");
                return;
            }
        }
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
        // This connection takes the name: one of this worker process from before (it gave
        // up on that link) or of a process gone silent is closed first, so it claims
        // nothing after the reconcile; another live process keeps it, and this one waits.
        let admit = registry::Admit { name: name.clone(), conn_id, instance, conn: conn.clone(), retry_live: shared.lease_ttl / 2 };
        match a.registry.send(admit).timeout(Duration::from_secs(10)).await {
            Ok(Ok(())) => {}
            Ok(Err(busy)) => {
                let msg = CoordMsg::InUse { reason: busy.reason.clone(), retry_after_ms: busy.retry_after.as_millis() as u64 };
                if write_frame(&mut send, &msg).await.is_ok() && send.finish().is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                }
                conn.close(CLOSE_REFUSED.into(), busy.reason.as_bytes());
                return;
            }
            Err(_) => {
                conn.close(CLOSE_REFUSED.into(), b"the coordinator is overloaded; try again");
                return;
            }
        }
        // Room for its output streams, now that it says how many slots it has.
        conn.set_max_concurrent_uni_streams(berth_shared::tls::worker_uni_streams(slots).into());
        link(conn.clone(), send, recv, shared, name.clone(), conn_id, Registration { slots, pool, joined, labels, host: *host, held }).await;
        a.registry.do_send(registry::Disconnect { name, conn_id });
    }
    .instrument(span)
    .await
}

/// What the worker's `Register` said, once it is admitted.
struct Registration {
    slots: u32,
    pool: String,
    joined: crate::pools::Pool,
    labels: Vec<(String, String)>,
    host: berth_shared::wire::HostInfo,
    held: Vec<LeaseId>,
}

/// An admitted worker's link: reconcile its leases, then run it until the connection ends.
async fn link(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
    name: String,
    conn_id: u64,
    reg: Registration,
) {
    let Registration { slots, pool, joined, labels, host, held } = reg;
    let a = shared.actors.clone();
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
    a.registry.do_send(registry::Connect { name: name.clone(), conn_id, tx: ctrl_tx.clone(), slots, pool, labels, host: host.clone(), leases: valid, drained });
    tracing::info!(slots, "worker connected");
    let caps = Arc::new(WorkerCaps::of(&host, &joined.name, joined.is_free(), labels_for_caps));

    let (ev_tx, mut ev) = mpsc::unbounded_channel::<Event>();
    // Control frames, read by their own task (reads are not cancellation-safe).
    {
        let ev_tx = ev_tx.clone();
        let conn = conn.clone();
        actix_rt::spawn(async move {
            let why = loop {
                match read_frame::<_, WorkerMsg>(&mut recv).await {
                    Ok(Some(m)) => {
                        if ev_tx.send(Event::Frame(m, Instant::now())).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "control stream ended".to_string(),
                    Err(e) => {
                        close_for(&conn, &e);
                        break e.to_string();
                    }
                }
            };
            let _ = ev_tx.send(Event::Closed(why));
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
                    let stream = output::serve(stream, shared.clone(), name.clone(), ctrl_tx.clone(), conn.clone());
                    actix_rt::spawn(stream.instrument(tracing::Span::current()));
                }
            }
            .instrument(span),
        );
    }

    let Ok(mut work) = a.job_store.send(job_store::WorkSignal).await else { return };
    let mut link = Link::new(shared.lease_ttl, Instant::now());
    // Frames for the worker, written together once nothing else is waiting to be
    // handled: an acknowledgement and the next assignment leave in one packet.
    let mut pending: Vec<u8> = Vec::new();
    let mut deferred = 0u32;
    let mut actions = Vec::new();
    loop {
        if let Some(claim) = link.claim_due(Instant::now(), conn.close_reason().is_none()) {
            actions.push(claim);
        }
        if !act(&mut actions, &a, &name, &caps, &ev_tx, &conn, &mut pending) {
            break;
        }
        let mut at = None;
        let input = tokio::select! {
            e = ev.recv() => match e {
                Some(Event::Input(i)) => i,
                Some(Event::Frame(m, read)) => {
                    at = Some(read);
                    Input::Frame(m)
                }
                Some(Event::Closed(why)) => {
                    tracing::info!(reason = %why, "worker disconnected");
                    break;
                }
                None => break,
            },
            m = ctrl_rx.recv() => {
                let Some(m) = m else { break };
                queue(&mut pending, &m);
                if !flush_when_idle(&mut send, &mut pending, &mut deferred, &ev, &ctrl_rx).await { break }
                continue;
            }
            changed = work.changed() => {
                if changed.is_err() { break }
                Input::Work
            }
        };
        link.handle(input, at.unwrap_or_else(Instant::now), &mut actions);
        if !act(&mut actions, &a, &name, &caps, &ev_tx, &conn, &mut pending) {
            break;
        }
        if !flush_when_idle(&mut send, &mut pending, &mut deferred, &ev, &ctrl_rx).await {
            break;
        }
    }
}

/// Carries out the link's actions, in order; `false` when the connection must close.
fn act(
    actions: &mut Vec<Action>,
    a: &Actors,
    name: &str,
    caps: &Arc<WorkerCaps>,
    ev_tx: &mpsc::UnboundedSender<Event>,
    conn: &quinn::Connection,
    pending: &mut Vec<u8>,
) -> bool {
    for action in actions.drain(..) {
        match action {
            Action::Claim { n, free } => {
                let claim = job_store::Claim { worker: name.to_string(), n, caps: caps.clone(), free };
                ask(a, claim, ev_tx, move |result| Input::Claimed { asked: n, result });
            }
            Action::Started { lease } => a.job_store.do_send(job_store::Started { worker: name.to_string(), lease }),
            Action::Finish { lease, outcome } => {
                ask(a, job_store::Finish { worker: name.to_string(), lease, outcome }, ev_tx, move |result| Input::Finished { lease, result });
            }
            Action::Frozen { lease, image, outcome } => {
                ask(a, job_store::Frozen { worker: name.to_string(), lease, outcome, image }, ev_tx, move |result| Input::Finished { lease, result });
            }
            Action::Heartbeat { leases } => ask(a, job_store::Heartbeat { worker: name.to_string(), leases }, ev_tx, Input::Renewed),
            Action::ExecFinish { lease, exec, outcome } => {
                let m = job_store::ExecFinish { worker: name.to_string(), lease, exec, outcome };
                ask(a, m, ev_tx, move |result| Input::ExecFinished { lease, exec, result });
            }
            Action::SlotStates(states) => a.registry.do_send(registry::SlotStates { name: name.to_string(), states }),
            Action::ImageRemoved { image, error } => a.registry.do_send(registry::ImageRemoved { worker: name.to_string(), image, error }),
            Action::Leases { added, removed, heartbeat } => a.registry.do_send(registry::Leases { name: name.to_string(), added, removed, heartbeat }),
            Action::Send(m) => queue(pending, &m),
            Action::RetryIn(d) => {
                let ev_tx = ev_tx.clone();
                actix_rt::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = ev_tx.send(Event::Input(Input::Retry));
                });
            }
            Action::Close(reason) => {
                conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
                return false;
            }
        }
    }
    true
}

/// Asks the JobStore on a task of its own and hands the answer back to the link.
fn ask<M, T>(a: &Actors, msg: M, ev_tx: &mpsc::UnboundedSender<Event>, input: impl FnOnce(Result<T, StoreError>) -> Input + Send + 'static)
where
    M: actix::Message<Result = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
    JobStore: actix::Handler<M>,
    <JobStore as actix::Actor>::Context: actix::dev::ToEnvelope<JobStore, M>,
{
    let (store, ev_tx) = (a.job_store.clone(), ev_tx.clone());
    actix_rt::spawn(async move {
        let result = store.send(msg).await.unwrap_or(Err(StoreError::Stopped));
        let _ = ev_tx.send(Event::Input(input(result)));
    });
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
