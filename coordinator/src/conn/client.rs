//! The client API: one request per bi stream, answered with one or more responses.
//! Authorisation is by the name and role in the caller's certificate: a request that
//! names a job sees only the jobs in the caller's `Scope` (its own; an approver also
//! those waiting for approval; an admin all), and any other job answers exactly as one
//! that does not exist. Env values go to a job's owner alone; anyone else sees the keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_shared::codec::{read_frame, write_frame};
use berth_shared::ids::JobSelector;
use berth_shared::job::{JobSpec, JobState};
use berth_shared::wire::{ApiError, ErrorKind, KillReason, OutStream, Request, Response, Role};
use tokio::sync::broadcast::error::RecvError;

use super::{api, close_for, mailbox, Shared};
use crate::actors::reader::query;
use crate::actors::{budget, job_store, log_store, registry};
use crate::store::{Notice, Scope};

pub async fn serve(conn: quinn::Connection, shared: Arc<Shared>, who: String, role: Role) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let shared = shared.clone();
        let who = who.clone();
        let conn = conn.clone();
        actix_rt::spawn(async move { request(conn, send, recv, shared, who, role).await });
    }
}

fn allowed(role: Role, req: &Request) -> Result<(), ApiError> {
    let ok = match req {
        Request::Enrol { .. } => role == Role::Anonymous,
        Request::Drain { .. } | Request::SetBudget { .. } => role == Role::Admin,
        Request::Decide { .. } => matches!(role, Role::Admin | Role::Approver),
        _ => matches!(role, Role::Admin | Role::Approver | Role::Submitter),
    };
    if ok {
        return Ok(());
    }
    let what = match req {
        Request::Drain { .. } => "drain or undrain workers: an admin does",
        Request::SetBudget { .. } => "set budgets: an admin does",
        Request::Decide { .. } => "approve or reject jobs: an approver or admin does",
        Request::Enrol { .. } => "enrol: only a new worker with a join token does",
        _ => "do this",
    };
    Err(ApiError::new(ErrorKind::Refused, format!("role {} may not {what}", role.as_str())))
}

async fn request(conn: quinn::Connection, mut send: quinn::SendStream, recv: quinn::RecvStream, shared: Arc<Shared>, who: String, role: Role) {
    let mut recv = Some(recv);
    let Some(r) = recv.as_mut() else { return };
    let req: Request = match read_frame(r).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => return close_for(&conn, &e),
    };
    let result = match allowed(role, &req).and_then(|()| super::freeze::labels_allowed(&req)) {
        Err(e) => Err(e),
        Ok(()) => answer(req, &mut send, &mut recv, &shared, &who, role).await,
    };
    if let Err(e) = result {
        let _ = write_frame(&mut send, &Response::Error(e)).await;
    }
    let _ = send.finish();
}

/// What a job's env values read as to anyone but its owner.
pub const MASKED: &str = "********";

/// The keys of the env stay; the values are the owner's alone.
fn mask_env(spec: &mut JobSpec) {
    for (_, v) in &mut spec.env {
        *v = MASKED.into();
    }
}

/// A job the caller may see, as a selector naming it by its full id (so the store's
/// writer, which does not know the caller, finds that job alone); a job outside `scope`
/// is not found, with the text a job that does not exist gets.
pub(super) async fn visible(shared: &Shared, job: &JobSelector, scope: &Scope) -> Result<JobSelector, ApiError> {
    let (sel, scope) = (job.clone(), scope.clone());
    let (_, id) = query(&shared.actors.reader, move |r| r.resolve(&sel, &scope)).await.map_err(api)?;
    Ok(JobSelector { prefix: id.to_string(), index: job.index })
}

async fn answer(
    req: Request,
    send: &mut quinn::SendStream,
    recv: &mut Option<quinn::RecvStream>,
    shared: &Shared,
    who: &str,
    role: Role,
) -> Result<(), ApiError> {
    let a = &shared.actors;
    let scope = Scope::of(who, role);
    let out: Response = match req {
        Request::Submit { spec, idempotency_key } => {
            if spec.session.is_some() {
                return Err(ApiError::new(ErrorKind::Invalid, "a session is opened with `berth session open`, not submitted"));
            }
            submit(shared, who, &scope, spec, idempotency_key).await?
        }
        Request::Status { job } => {
            let mut st = query(&a.reader, move |r| r.status(&job, &scope)).await.map_err(api)?;
            if st.summary.owner != who {
                mask_env(&mut st.spec);
            }
            if st.summary.state == JobState::Queued && st.summary.reason.is_none() {
                st.summary.reason = a.registry.send(registry::Explain { spec: st.spec.clone() }).await.map_err(mailbox)?;
            }
            Response::Status(Box::new(st))
        }
        Request::List { state, limit } => {
            let limit = limit.clamp(1, 10_000);
            let mut rows = query(&a.reader, move |r| r.list(state, limit, &scope)).await.map_err(api)?;
            // Queued jobs that no connected worker could run say why (the first 50).
            for row in rows.iter_mut().filter(|r| r.state == JobState::Queued && r.reason.is_none()).take(50) {
                let sel = JobSelector { prefix: row.id.to_string(), index: None };
                let spec = query(&a.reader, move |r| r.status(&sel, &Scope::All)).await.map_err(api)?.spec;
                row.reason = a.registry.send(registry::Explain { spec }).await.map_err(mailbox)?;
            }
            Response::List(rows)
        }
        Request::Cancel { job, reason } => {
            let job = visible(shared, &job, &scope).await?;
            let status = {
                let sel = job.clone();
                query(&a.reader, move |r| r.status(&sel, &Scope::All)).await.map_err(api)?
            };
            if role != Role::Admin && status.summary.owner != who {
                return Err(ApiError::new(
                    ErrorKind::Refused,
                    format!("job {} belongs to {}; only its owner or an admin may cancel it", status.summary.id, status.summary.owner),
                ));
            }
            let reason = reason.unwrap_or_else(|| format!("cancelled by {who}"));
            let (id, n, kills) = a.job_store.send(job_store::Cancel { job, reason }).await.map_err(mailbox)?.map_err(api)?;
            for k in kills {
                a.registry.do_send(registry::Kill { worker: k.worker, lease: k.lease, reason: KillReason::Cancelled });
            }
            Response::Cancelled { job: id, tasks: n }
        }
        Request::Logs { job, attempt, follow } => return logs(shared, send, visible(shared, &job, &scope).await?, attempt, follow).await,
        Request::Watch { job, tasks } => return watch(shared, send, visible(shared, &job, &scope).await?, tasks).await,
        Request::Workers => {
            let enrolled = query(&a.reader, |r| r.workers()).await.map_err(api)?;
            Response::Workers(a.registry.send(registry::List { enrolled }).await.map_err(mailbox)?)
        }
        Request::Drain { worker, drain } => {
            let drained = a.job_store.send(job_store::SetDrain { worker: worker.clone(), drained: drain }).await.map_err(mailbox)?.map_err(api)?;
            // Undrained, it may claim again: the store's commit has woken it.
            a.registry.do_send(registry::SetDrained { name: worker.clone(), drained });
            Response::Drained { worker, drained }
        }
        Request::Decide { job, approve, reason } => {
            if reason.trim().is_empty() {
                return Err(ApiError::new(ErrorKind::Invalid, "give a --reason: the decision is recorded with it"));
            }
            let job = visible(shared, &job, &scope).await?;
            let d = a.job_store.send(job_store::Decide { job, approve, by: who.to_string(), reason }).await.map_err(mailbox)?.map_err(api)?;
            tracing::info!(job = %d.job, by = who, state = %d.state, "approval decision");
            Response::Decided { job: d.job, state: d.state, tasks: d.tasks }
        }
        Request::SetBudget { account, run, month } => {
            a.job_store.send(job_store::SetBudget { account: account.clone(), run, month, by: who.to_string() }).await.map_err(mailbox)?.map_err(api)?;
            tracing::info!(account = %account, %run, %month, by = who, "budget set");
            Response::BudgetSet { account }
        }
        Request::Budgets { account } => {
            // A submitter sees its own account; approvers and admins see every account.
            let account = match (role, account) {
                (Role::Admin | Role::Approver, a) => a,
                (_, Some(a)) if a != who => {
                    return Err(ApiError::new(ErrorKind::Refused, format!("role {} may see only its own account `{who}`", role.as_str())))
                }
                (_, _) => Some(who.to_string()),
            };
            let month = crate::ledger::month_of(chrono::Utc::now());
            let rows = query(&a.reader, move |r| r.budgets(account.as_deref(), &month)).await.map_err(api)?;
            Response::Budgets(rows)
        }
        Request::Enrol { token, name, csr_pem } => super::worker::enrol(shared, token, name, csr_pem).await?,
        Request::Freeze { job, tag } => super::freeze::freeze(shared, who, role, visible(shared, &job, &scope).await?, tag).await?,
        Request::Resume { job, command, idempotency_key } => {
            let spec = super::freeze::resume_spec(shared, who, visible(shared, &job, &scope).await?, command).await?;
            return Box::pin(answer(Request::Submit { spec, idempotency_key }, send, recv, shared, who, role)).await;
        }
        Request::Images => super::freeze::images(shared, who, role).await?,
        Request::RemoveImage { image } => super::freeze::remove_image(shared, who, role, image).await?,
        Request::OpenSession { spec, idempotency_key } => return super::session::open(shared, send, who, &scope, spec, idempotency_key).await,
        Request::Exec { session, exec, detach } => {
            let stdin = if exec.stdin { recv.take() } else { None };
            return super::session::exec(shared, send, stdin, &scope, session, exec, detach).await;
        }
        Request::ExecOutput { session, exec, follow, after } => {
            let session = visible(shared, &session, &scope).await?;
            return super::session::exec_output(shared, send, session, exec, follow, after).await;
        }
        Request::CopyIn { session, dest, name } => return super::session::copy_in(shared, send, recv.take(), &scope, session, dest, name).await,
        Request::CopyOut { session, path } => return super::session::copy_out(shared, send, &scope, session, path).await,
        Request::CloseSession { session } => super::session::close(shared, who, role, visible(shared, &session, &scope).await?).await?,
        Request::SessionStatus { session } => {
            let mut st = query(&a.reader, move |r| r.session(&session, &scope)).await.map_err(api)?;
            if st.job.summary.owner != who {
                mask_env(&mut st.job.spec);
            }
            Response::Session(Box::new(st))
        }
        Request::Sessions { limit } => {
            let limit = limit.clamp(1, 10_000);
            Response::Sessions(query(&a.reader, move |r| r.sessions(limit, &scope)).await.map_err(api)?)
        }
        Request::Health => {
            let store = crate::store::health::to_wire(&a.job_store.send(job_store::HealthWatch).await.map_err(mailbox)?.borrow());
            let default_max_output = a.job_store.send(job_store::DefaultMaxOutput).await.map_err(mailbox)?;
            Response::Health(berth_shared::wire::CoordinatorHealth { coordinator: shared.name.clone(), store, default_max_output })
        }
    };
    write_frame(send, &out).await.map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))
}

/// Admits and queues a submission (a job, or a session being opened).
pub(super) async fn submit(shared: &Shared, who: &str, scope: &Scope, mut spec: JobSpec, idempotency_key: uuid::Uuid) -> Result<Response, ApiError> {
    let a = &shared.actors;
    // The one validation of a submitted spec: the store and the budget trust it.
    spec.validate().map_err(|m| ApiError::new(ErrorKind::Invalid, m))?;
    // A job may wait only for jobs its submitter may see.
    for d in &mut spec.after {
        let sel = JobSelector { prefix: d.job.clone(), index: None };
        let parent = visible(shared, &sel, scope).await.map_err(|e| ApiError::new(e.kind, format!("--after {}: {}", d.job, e.message)))?;
        d.job = parent.prefix;
    }
    let (spec, admission) = a.budget.send(budget::Admit { spec, owner: who.to_string() }).await.map_err(mailbox)??;
    let spec_for_warning = spec.clone();
    let s = a.job_store.send(job_store::Submit { spec, owner: who.to_string(), idempotency_key, admission }).await.map_err(mailbox)?.map_err(api)?;
    let warning = a.registry.send(registry::Explain { spec: spec_for_warning }).await.map_err(mailbox)?;
    Ok(Response::Submitted { job: s.job, tasks: s.tasks, duplicate: s.duplicate, warning })
}

pub(super) async fn send_frame(send: &mut quinn::SendStream, r: &Response) -> Result<(), ApiError> {
    write_frame(send, r).await.map_err(|e| ApiError::new(ErrorKind::Internal, format!("client went away: {e}")))
}

/// Streams progress until every task has ended (of a job `visible` to the caller).
async fn watch(shared: &Shared, send: &mut quinn::SendStream, job: JobSelector, tasks: bool) -> Result<(), ApiError> {
    let a = &shared.actors;
    let mut rx = a.log_store.send(log_store::Follow).await.map_err(mailbox)?;
    let (seq, id) = {
        let sel = job.clone();
        query(&a.reader, move |r| r.resolve(&sel, &Scope::All)).await.map_err(api)?
    };
    let mut last_sent = tokio::time::Instant::now() - Duration::from_secs(1);
    let mut counts = query(&a.reader, move |r| r.summary(seq)).await.map_err(api)?.counts;
    loop {
        if counts.unfinished() == 0 {
            let exit_code = query(&a.reader, move |r| r.exit_code(seq)).await.map_err(api)?;
            send_frame(send, &Response::Finished { state: counts.aggregate(), counts, exit_code }).await?;
            return Ok(());
        }
        if last_sent.elapsed() >= Duration::from_millis(100) {
            send_frame(send, &Response::Progress { counts }).await?;
            last_sent = tokio::time::Instant::now();
        }
        let wait = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        match wait {
            Ok(Ok(n)) => match &*n {
                Notice::Job { job, counts: c, .. } if *job == id => counts = *c,
                Notice::TaskEnded { job, index, attempt, state } if tasks && *job == id => {
                    send_frame(send, &Response::TaskDone { index: *index, attempt: *attempt, state: *state }).await?;
                }
                _ => {}
            },
            Ok(Err(RecvError::Lagged(_))) | Err(_) => {
                counts = query(&a.reader, move |r| r.summary(seq)).await.map_err(api)?.counts;
            }
            Ok(Err(RecvError::Closed)) => return Err(ApiError::new(ErrorKind::Internal, "the coordinator is shutting down")),
        }
    }
}

/// Sends one attempt's output (of a job `visible` to the caller); with `follow`, keeps
/// sending until the attempt ends.
async fn logs(shared: &Shared, send: &mut quinn::SendStream, job: JobSelector, attempt: Option<u32>, follow: bool) -> Result<(), ApiError> {
    let a = &shared.actors;
    let mut rx = a.log_store.send(log_store::Follow).await.map_err(mailbox)?;
    let index = job.index;
    let (seq, id, first) = {
        let sel = job.clone();
        query(&a.reader, move |r| {
            let (seq, id) = r.resolve(&sel, &Scope::All)?;
            let st = r.status(&sel, &Scope::All)?;
            let first = st.spec.array.map(|r| r.start);
            Ok((seq, id, first))
        })
        .await
        .map_err(api)?
    };
    // An array without `:INDEX` shows its first task.
    let index = index.or(first);
    let mut after: HashMap<OutStream, u64> = HashMap::new();
    let mut attempt = attempt;
    loop {
        let pos = (after.get(&OutStream::Stdout).copied().unwrap_or(0), after.get(&OutStream::Stderr).copied().unwrap_or(0));
        let read = query(&a.reader, move |r| r.logs(seq, index, attempt, pos)).await.map_err(api)?;
        attempt = Some(read.attempt);
        let full = read.chunks.len() >= 512;
        for (stream, s, data) in read.chunks {
            after.insert(stream, s);
            send_frame(send, &Response::Output { stream, data }).await?;
        }
        if full {
            continue;
        }
        if read.ended || !follow {
            send_frame(send, &Response::End).await?;
            return Ok(());
        }
        // Wait for something about this task, then read again.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Ok(n)) => {
                    let relevant = match &*n {
                        Notice::Output { job, index: i, exec: 0, .. } | Notice::TaskEnded { job, index: i, .. } => *job == id && *i == index,
                        Notice::Output { .. } => false,
                        Notice::Job { job, state, .. } => *job == id && state.is_terminal(),
                        Notice::SessionReady { .. } | Notice::ExecEnded { .. } => false,
                    };
                    if relevant {
                        break;
                    }
                }
                Ok(Err(RecvError::Closed)) => return Err(ApiError::new(ErrorKind::Internal, "the coordinator is shutting down")),
                // Lagged or quiet: re-read to be safe.
                _ => break,
            }
        }
    }
}
