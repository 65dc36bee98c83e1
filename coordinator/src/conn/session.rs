//! Sessions from the client's side: open (submit, then wait for the sandbox), exec
//! (number it in the store, send it to the session's worker, stream its output and end
//! back), a recorded exec's output, close. Only the session's owner or an admin reaches
//! a session: for anyone else it does not exist (the caller's `Scope`).

use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::{read_frame, write_frame};
use berth_shared::ids::{JobId, JobSelector};
use berth_shared::job::{JobSpec, JobState};
use berth_shared::session::ExecSpec;
use berth_shared::wire::{ApiError, CoordMsg, CopyReply, CopyRequest, ErrorKind, KillReason, OutStream, Response, Role, StdinFrame};
use tokio::sync::broadcast::{self, error::RecvError};

use super::client::{send_frame, submit};
use super::{api, mailbox, Shared};
use crate::actors::reader::query;
use crate::actors::{job_store, log_store, registry};
use crate::store::{Notice, Scope};

/// How long `close` waits for the worker to say the sandbox is gone.
const CLOSE_WAIT: Duration = Duration::from_secs(15);

async fn follow(shared: &Shared) -> Result<broadcast::Receiver<Arc<Notice>>, ApiError> {
    shared.actors.log_store.send(log_store::Follow).await.map_err(mailbox)
}

fn shutting_down() -> ApiError {
    ApiError::new(ErrorKind::Internal, "the coordinator is shutting down")
}

/// Opens a session: `Submitted` at once (the id is the caller's even if it stops
/// waiting), then `SessionReady` once the worker says its sandbox is, or why not.
pub async fn open(shared: &Shared, send: &mut quinn::SendStream, who: &str, scope: &Scope, spec: JobSpec, key: uuid::Uuid) -> Result<(), ApiError> {
    if spec.session.is_none() {
        return Err(ApiError::new(ErrorKind::Invalid, "not a session: `berth submit` runs a job"));
    }
    let mut rx = follow(shared).await?;
    let submitted = submit(shared, who, scope, spec, key).await?;
    let Response::Submitted { job, .. } = &submitted else { return Err(ApiError::new(ErrorKind::Internal, "submission answered oddly")) };
    let job = *job;
    send_frame(send, &submitted).await?;
    let a = &shared.actors;
    let sel = JobSelector { prefix: job.to_string(), index: None };
    loop {
        let (st, ready) = {
            let sel = sel.clone();
            query(&a.reader, move |r| {
                let (seq, _) = r.resolve(&sel, &Scope::All)?;
                Ok((r.status(&sel, &Scope::All)?, r.session_ready(seq)?))
            })
            .await
            .map_err(api)?
        };
        if let Some(t) = st.task.as_ref() {
            match t.state {
                JobState::Running if ready => {
                    let worker = t.worker.clone().unwrap_or_default();
                    return send_frame(send, &Response::SessionReady { session: job, worker }).await;
                }
                s if s.is_terminal() => {
                    let why = t.reason.clone().unwrap_or_else(|| format!("it ended {s}"));
                    return Err(ApiError::new(ErrorKind::Refused, format!("session {job} could not open: {why}")));
                }
                _ => {}
            }
        }
        if st.summary.state.is_terminal() {
            let why = st.summary.reason.unwrap_or_else(|| st.summary.state.to_string());
            return Err(ApiError::new(ErrorKind::Refused, format!("session {job} could not open: {why}")));
        }
        // Wait for news of this job; look again at least every second.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(n)) => match &*n {
                    Notice::SessionReady { job: j, .. } | Notice::TaskEnded { job: j, .. } | Notice::Job { job: j, .. } if *j == job => break,
                    _ => {}
                },
                Ok(Err(RecvError::Closed)) => return Err(shutting_down()),
                Ok(Err(RecvError::Lagged(_))) | Err(_) => break,
            }
        }
    }
}

/// Runs one exec: `ExecStarted`, then (unless `detach`) its output as it is stored and
/// `ExecEnded`. A client that goes away from an exec it follows has it killed, as a
/// terminal's hang-up would.
pub async fn exec(
    shared: &Shared,
    send: &mut quinn::SendStream,
    stdin: Option<quinn::RecvStream>,
    scope: &Scope,
    session: JobSelector,
    spec: ExecSpec,
    detach: bool,
) -> Result<(), ApiError> {
    spec.validate().map_err(|m| ApiError::new(ErrorKind::Invalid, m))?;
    if detach && spec.stdin {
        return Err(ApiError::new(ErrorKind::Invalid, "a detached exec reads no stdin: drop -i or --detach"));
    }
    let a = &shared.actors;
    let mut rx = follow(shared).await?;
    let order = a.job_store.send(job_store::ExecStart { job: session, scope: scope.clone(), spec: spec.clone() }).await.map_err(mailbox)?.map_err(api)?;
    let (exec, lease, worker) = (order.exec, order.lease, order.worker.clone());
    let sent = a.registry.send(registry::Tell { worker: worker.clone(), msg: CoordMsg::Exec { lease, exec, spec } }).await.map_err(mailbox)?;
    if !sent {
        let why = format!("the session's worker {worker} is not connected to this coordinator now; the exec did not run");
        let outcome = berth_shared::job::Outcome { exit_code: None, signal: None, timed_out: false, killed: false, runtime_ms: 0, error: Some(why.clone()) };
        let _ = a.job_store.send(job_store::ExecFinish { worker, lease, exec, outcome }).await;
        return Err(ApiError::new(ErrorKind::Refused, format!("{why}: try again once it reconnects")));
    }
    send_frame(send, &Response::ExecStarted { exec }).await?;
    if detach {
        return send_frame(send, &Response::End).await;
    }
    if let Some(mut stdin) = stdin {
        let registry = a.registry.clone();
        let worker = worker.clone();
        actix_rt::spawn(async move {
            loop {
                let (data, eof) = match read_frame::<_, StdinFrame>(&mut stdin).await {
                    Ok(Some(StdinFrame::Data(d))) => (d, false),
                    Ok(Some(StdinFrame::End)) | Ok(None) | Err(_) => (Vec::new(), true),
                };
                let msg = CoordMsg::ExecStdin { lease, exec, data, eof };
                if !registry.send(registry::Tell { worker: worker.clone(), msg }).await.unwrap_or(false) || eof {
                    return;
                }
            }
        });
    }
    // Followed from before the exec was stored: its notices are all there is, from the start.
    let r = stream_exec(shared, send, &mut rx, (order.job, order.job_seq), exec, (0, 0), Fresh::Yes).await;
    if r.is_err() {
        // The client went away (or the coordinator stops): end what it ran.
        a.registry.do_send(registry::Tell { worker, msg: CoordMsg::KillExec { lease, exec } });
    }
    r
}

/// A recorded exec's output; with `follow`, until it ends.
pub async fn exec_output(
    shared: &Shared,
    send: &mut quinn::SendStream,
    session: JobSelector,
    exec: u32,
    follow_it: bool,
    after: (u64, u64),
) -> Result<(), ApiError> {
    let a = &shared.actors;
    let mut rx = follow(shared).await?;
    let (seq, id) = {
        let sel = session.clone();
        query(&a.reader, move |r| r.resolve(&sel, &Scope::All)).await.map_err(api)?
    };
    stream_exec(shared, send, &mut rx, (id, seq), exec, after, if follow_it { Fresh::No } else { Fresh::Once }).await
}

/// The sequence number sent last on one stream.
fn at(pos: &mut (u64, u64), s: OutStream) -> &mut u64 {
    match s {
        OutStream::Stdout => &mut pos.0,
        OutStream::Stderr => &mut pos.1,
    }
}

/// How `stream_exec` starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fresh {
    /// The exec was just stored, with the notices followed from before: nothing of it
    /// is in the store that the notices will not bring, so the store is not read first.
    Yes,
    /// Read the store, then follow the notices.
    No,
    /// Read the store once and stop there (`End` unless it has ended).
    Once,
}

/// Sends exec `exec` (of session `job`, stored as `seq`)'s output after `pos` (per-stream
/// sequence numbers) and its end. Live output goes straight from the store's notices
/// when they follow on from what was sent; anything else (a gap, a lag, the start of an
/// exec stored before) is read from the store, so nothing is skipped or sent twice. Its
/// end, when every notice before it was sent, goes at once: its output was all stored
/// (and published) before its end was.
async fn stream_exec(
    shared: &Shared,
    send: &mut quinn::SendStream,
    rx: &mut broadcast::Receiver<Arc<Notice>>,
    (job, seq): (JobId, i64),
    exec: u32,
    mut pos: (u64, u64),
    fresh: Fresh,
) -> Result<(), ApiError> {
    let a = &shared.actors;
    let follow_it = fresh != Fresh::Once;
    // Whether the store must be read before trusting notices (at the start, and after
    // a gap or a lag).
    let mut reread = fresh != Fresh::Yes;
    // The client stopping its stream (a cancelled handle, a dropped one) ends the wait,
    // even for an exec that prints nothing.
    let stopped = send.stopped();
    tokio::pin!(stopped);
    loop {
        if reread {
            reread = false;
            let after = pos;
            let read = query(&a.reader, move |r| r.exec_logs(seq, exec, after)).await.map_err(api)?;
            let full = read.chunks.len() >= 512;
            for (stream, s, data) in read.chunks {
                *at(&mut pos, stream) = s;
                send_frame(send, &Response::Output { stream, data }).await?;
            }
            if full {
                reread = true;
                continue;
            }
            if let Some(end) = read.end {
                return send_frame(send, &Response::ExecEnded(end)).await;
            }
            if !follow_it {
                return send_frame(send, &Response::End).await;
            }
        }
        let got = tokio::select! {
            got = tokio::time::timeout(Duration::from_secs(1), rx.recv()) => got,
            _ = &mut stopped => return Err(ApiError::new(ErrorKind::Invalid, "the client stopped reading the exec's output")),
        };
        match got {
            Ok(Ok(n)) => match &*n {
                Notice::Output { job: j, exec: e, stream, seq: s, data, .. } if *j == job && *e == exec => {
                    let next = at(&mut pos, *stream);
                    if *s == *next + 1 {
                        *next = *s;
                        send_frame(send, &Response::Output { stream: *stream, data: data.to_vec() }).await?;
                    } else if *s > *next + 1 {
                        reread = true;
                    }
                }
                // Its output was all stored, and published, before its end was.
                Notice::ExecEnded { job: j, end } if *j == job && end.exec == exec => {
                    return send_frame(send, &Response::ExecEnded(end.clone())).await;
                }
                Notice::Job { job: j, state, .. } if *j == job && state.is_terminal() => reread = true,
                _ => {}
            },
            Ok(Err(RecvError::Closed)) => return Err(shutting_down()),
            Ok(Err(RecvError::Lagged(_))) | Err(_) => reread = true,
        }
    }
}

/// Closes a session (idempotent): ends it as a cancel ends a task, then waits (a
/// bounded time) for its worker to say the sandbox is gone.
pub async fn close(shared: &Shared, who: &str, role: Role, session: JobSelector) -> Result<Response, ApiError> {
    let a = &shared.actors;
    let st = {
        let sel = session.clone();
        query(&a.reader, move |r| r.status(&sel, &Scope::All)).await.map_err(api)?
    };
    let id = st.summary.id;
    if st.spec.session.is_none() {
        return Err(ApiError::new(ErrorKind::Invalid, format!("job {id} is not a session: `berth cancel` ends a job")));
    }
    if role != Role::Admin && st.summary.owner != who {
        return Err(ApiError::new(ErrorKind::Refused, format!("session {id} belongs to {}; only its owner or an admin may close it", st.summary.owner)));
    }
    if st.summary.state.is_terminal() {
        return Ok(Response::SessionClosed { session: id, already: true });
    }
    let mut rx = follow(shared).await?;
    let reason = format!("closed by {who}");
    let (_, _, kills) = match a.job_store.send(job_store::Cancel { job: session.clone(), reason }).await.map_err(mailbox)? {
        Ok(k) => k,
        Err(e) => {
            // Ended meanwhile (by its idle TTL, say): closed all the same.
            let ended = query(&a.reader, move |r| r.status(&session, &Scope::All)).await.is_ok_and(|st| st.summary.state.is_terminal());
            if ended {
                return Ok(Response::SessionClosed { session: id, already: true });
            }
            return Err(api(e));
        }
    };
    let waits = !kills.is_empty();
    for k in kills {
        a.registry.do_send(registry::Kill { worker: k.worker, lease: k.lease, reason: KillReason::Cancelled });
    }
    if waits {
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(n)) => {
                    if matches!(&*n, Notice::TaskEnded { job, .. } if *job == id) {
                        break;
                    }
                }
                Ok(Err(RecvError::Lagged(_))) => {}
                // The worker may be away: the session is closed in the store all the same,
                // and its worker tears it down when it hears.
                Ok(Err(RecvError::Closed)) | Err(_) => break,
            }
        }
    }
    Ok(Response::SessionClosed { session: id, already: false })
}

/// Checks a copy's path (inside the workspace) and, copying in, the name its entries
/// are under (one component).
fn check_copy(path: &str, name: Option<&str>) -> Result<(), ApiError> {
    let invalid = |m: String| ApiError::new(ErrorKind::Invalid, m);
    berth_shared::session::check_relative("the session path", path).map_err(invalid)?;
    if let Some(n) = name {
        if n.is_empty() || n == ".." || n.contains('/') || n.contains('\0') {
            return Err(invalid(format!("`{}` is not a file name to copy as", berth_shared::text::escape(n))));
        }
    }
    Ok(())
}

/// Opens the copy stream to the session's worker and waits for it to be ready.
async fn copy_stream(
    shared: &Shared,
    scope: &Scope,
    session: JobSelector,
    req: impl FnOnce(berth_shared::ids::LeaseId) -> CopyRequest,
) -> Result<(quinn::SendStream, quinn::RecvStream), ApiError> {
    let a = &shared.actors;
    let scope = scope.clone();
    let (id, worker, lease) = query(&a.reader, move |r| r.session_lease(&session, &scope)).await.map_err(api)?;
    let unreachable =
        || ApiError::new(ErrorKind::Refused, format!("session {id}'s worker {worker} is not connected to this coordinator now: try again once it reconnects"));
    let conn = a.registry.send(registry::ConnectionOf { worker: worker.clone() }).await.map_err(mailbox)?.ok_or_else(unreachable)?;
    let (mut wsend, mut wrecv) = conn.open_bi().await.map_err(|_| unreachable())?;
    write_frame(&mut wsend, &req(lease)).await.map_err(|_| unreachable())?;
    match read_frame::<_, CopyReply>(&mut wrecv).await {
        Ok(Some(CopyReply::Ready)) => Ok((wsend, wrecv)),
        Ok(Some(CopyReply::Failed(why))) => Err(ApiError::new(ErrorKind::Refused, why)),
        _ => Err(unreachable()),
    }
}

/// Passes one stream's bytes on to another as the chunks QUIC received them, without
/// copying them through a buffer of its own.
async fn relay(from: &mut quinn::RecvStream, to: &mut quinn::SendStream) -> std::io::Result<()> {
    while let Some(chunk) = from.read_chunk(usize::MAX, true).await? {
        to.write_chunk(chunk.bytes).await?;
    }
    Ok(())
}

/// Copies a tar stream from the client into a session's workspace, through its worker.
pub async fn copy_in(
    shared: &Shared,
    send: &mut quinn::SendStream,
    recv: Option<quinn::RecvStream>,
    scope: &Scope,
    session: JobSelector,
    dest: String,
    name: String,
) -> Result<(), ApiError> {
    check_copy(&dest, Some(&name))?;
    let mut recv = recv.ok_or_else(|| ApiError::new(ErrorKind::Internal, "the copy's stream is gone"))?;
    let (mut wsend, mut wrecv) = copy_stream(shared, scope, session, |lease| CopyRequest::In { lease, dest, name }).await?;
    send_frame(send, &Response::CopyReady).await?;
    let lost = |e: std::io::Error| ApiError::new(ErrorKind::Internal, format!("the copy was cut off: {e}"));
    if let Err(e) = relay(&mut recv, &mut wsend).await {
        let _ = wsend.reset(1u32.into());
        return Err(lost(e));
    }
    let _ = wsend.finish();
    match read_frame::<_, CopyReply>(&mut wrecv).await {
        Ok(Some(CopyReply::Done { files, dirs, symlinks, bytes })) => send_frame(send, &Response::Copied { files, dirs, symlinks, bytes }).await,
        Ok(Some(CopyReply::Failed(why))) => Err(ApiError::new(ErrorKind::Refused, why)),
        _ => Err(ApiError::new(ErrorKind::Internal, "the session's worker went away during the copy")),
    }
}

/// Copies a tar stream of a path of a session's workspace to the client.
pub async fn copy_out(shared: &Shared, send: &mut quinn::SendStream, scope: &Scope, session: JobSelector, path: String) -> Result<(), ApiError> {
    check_copy(&path, None)?;
    let (_wsend, mut wrecv) = copy_stream(shared, scope, session, |lease| CopyRequest::Out { lease, path }).await?;
    send_frame(send, &Response::CopyReady).await?;
    if let Err(e) = relay(&mut wrecv, send).await {
        // Cut off: the client must not take what it got for the whole.
        let _ = send.reset(1u32.into());
        return Err(ApiError::new(ErrorKind::Internal, format!("the copy was cut off: {e}")));
    }
    Ok(())
}
