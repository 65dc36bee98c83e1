//! Freeze and resume, for the client API: freezing a running Docker task into an image
//! on its worker's engine, resuming a new job from that image, and listing and removing
//! frozen images. A freeze keeps the container's filesystem and the workspace, not
//! process memory: a resumed job starts its command again from that state.
//!
//! A frozen image lives on the engine of the worker that froze it (berth runs no
//! registry), so a resumed job asks for that worker (`berth.worker=NAME`, a label every
//! worker carries), and `images rm` is carried out by it.

use std::time::Duration;

use berth_shared::ids::JobSelector;
use berth_shared::job::{check_user_labels, Command, Executor, JobSpec, JobState, LABEL_PINNED_WORKER, LABEL_RESUMED_FROM, SYSTEM_LABEL_PREFIX};
use berth_shared::wire::{ApiError, ErrorKind, Request, Response, Role};
use tokio::sync::broadcast::error::RecvError;

use super::{api, mailbox, Shared};
use crate::actors::reader::query;
use crate::actors::{job_store, log_store, registry};
use crate::store::{Notice, Scope};

/// How long a client's `freeze` waits for the worker to stop and commit the container.
const FREEZE_WAIT: Duration = Duration::from_secs(600);
/// How long `images rm` waits for the worker's engine.
const REMOVE_WAIT: Duration = Duration::from_secs(120);

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Invalid, msg)
}

/// Submissions may not carry berth's own labels (a resume, made here, does).
pub fn labels_allowed(req: &Request) -> Result<(), ApiError> {
    match req {
        Request::Submit { spec, .. } => check_user_labels(&spec.labels).map_err(invalid),
        _ => Ok(()),
    }
}

/// `berth freeze` of a job visible to the caller (`client::visible`): reserve the image
/// name, ask the worker, and wait for the task to end.
pub async fn freeze(shared: &Shared, who: &str, role: Role, job: JobSelector, tag: Option<String>) -> Result<Response, ApiError> {
    let a = &shared.actors;
    if let Some(t) = &tag {
        berth_shared::job::validate_tag(t).map_err(invalid)?;
    }
    let order = a.job_store.send(job_store::FreezeStart { job, tag, by: who.to_string(), admin: role == Role::Admin }).await.map_err(mailbox)?.map_err(api)?;
    // Listen before asking, so the end of the task cannot be missed.
    let mut notices = a.log_store.send(log_store::Follow).await.map_err(mailbox)?;
    let asked = a.registry.send(registry::Freeze { worker: order.worker.clone(), lease: order.lease, tag: order.tag.clone() }).await.map_err(mailbox)?;
    if !asked {
        let _ = a.job_store.send(job_store::ForgetImage { image: order.image.clone(), only_reserved: true }).await;
        return Err(ApiError::new(ErrorKind::Internal, format!("worker {} running the task is not connected: try again when it is", order.worker)));
    }
    tracing::info!(job = %order.job, index = ?order.index, worker = %order.worker, image = %order.image, by = who, "freeze asked");
    let sel = JobSelector { prefix: order.job.to_string(), index: order.index };
    let deadline = tokio::time::Instant::now() + FREEZE_WAIT;
    loop {
        let st = {
            let sel = sel.clone();
            query(&a.reader, move |r| r.status(&sel, &Scope::All)).await.map_err(api)?
        };
        let task = st.task.as_ref().map(|t| (t.state, t.reason.clone()));
        match task {
            Some((JobState::Frozen, _)) => return Ok(Response::Frozen { job: order.job, index: order.index, image: order.image }),
            Some((state, reason)) if state.is_terminal() || state == JobState::Queued => {
                let _ = a.job_store.send(job_store::ForgetImage { image: order.image.clone(), only_reserved: true }).await;
                let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
                return Err(invalid(format!("the task ended {state} instead of being frozen{why}")));
            }
            _ => {}
        }
        // Wait for this task to end (or for a lagging channel: look again).
        let ended = async {
            loop {
                match notices.recv().await {
                    Ok(n) => {
                        if let Notice::TaskEnded { job, index, .. } = &*n {
                            if *job == order.job && *index == order.index {
                                return;
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => return,
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(ApiError::new(
                ErrorKind::Internal,
                format!("the freeze into {} has not finished after {FREEZE_WAIT:?}: `berth status {}` shows when it does", order.image, order.job),
            ));
        }
        // A periodic look as well: a lost lease re-queues the task without a notice to us.
        let _ = tokio::time::timeout(left.min(Duration::from_secs(5)), ended).await;
    }
}

/// `berth resume` of a job visible to the caller (`client::visible`): the spec of a new
/// job from a frozen task's image (checked; the caller submits it). Only the owner may:
/// the new job carries the env values, which are the owner's alone.
pub async fn resume_spec(shared: &Shared, who: &str, job: JobSelector, command: Option<Command>) -> Result<JobSpec, ApiError> {
    let a = &shared.actors;
    let (st, image) = {
        let sel = job.clone();
        query(&a.reader, move |r| {
            let (seq, _) = r.resolve(&sel, &Scope::All)?;
            let st = r.status(&sel, &Scope::All)?;
            let image = match &st.task {
                Some(t) => r.frozen_image(seq, t.index)?,
                None => None,
            };
            Ok((st, image))
        })
        .await
        .map_err(api)?
    };
    let id = st.summary.id;
    if st.summary.owner != who {
        return Err(ApiError::new(
            ErrorKind::Refused,
            format!("job {id} belongs to {}; only its owner may resume it (the new job would carry its env values)", st.summary.owner),
        ));
    }
    let Some(task) = &st.task else {
        return Err(invalid(format!("job {id} is an array: resume one frozen task, as {}:INDEX", id.short())));
    };
    let what = match task.index {
        Some(i) => format!("task {i} of job {id}"),
        None => format!("job {id}"),
    };
    if task.state != JobState::Frozen {
        return Err(invalid(format!("{what} is {}, not frozen: `berth freeze` it first", task.state)));
    }
    let Some(image) = image else {
        return Err(invalid(format!("{what} was frozen, but its image is gone (removed with `berth images rm`)")));
    };
    let network = match &st.spec.executor {
        Executor::Docker { network, .. } => network.clone(),
        Executor::Process => None,
    };
    let mut spec = st.spec.clone();
    spec.executor = Executor::Docker { image: image.image.clone(), network };
    spec.array = None;
    // The parents it waited for ended long ago.
    spec.after.clear();
    if let Some(c) = command {
        spec.command = c;
    }
    spec.labels.retain(|(k, _)| !k.starts_with(SYSTEM_LABEL_PREFIX));
    let from = berth_shared::ids::TaskRef { job: id, index: task.index };
    spec.labels.push((LABEL_RESUMED_FROM.into(), from.to_string()));
    // The image is on one worker's engine: the job runs there.
    spec.constraints.retain(|(k, _)| k != LABEL_PINNED_WORKER);
    spec.constraints.push((LABEL_PINNED_WORKER.into(), image.worker.clone()));
    // Validated with every submission, as the client API submits it.
    Ok(spec)
}

/// `berth images`: a submitter or approver sees its own (an image is a job's, and never
/// waits for approval); an admin sees all.
pub async fn images(shared: &Shared, who: &str, role: Role) -> Result<Response, ApiError> {
    let owner = match role {
        Role::Admin => None,
        _ => Some(who.to_string()),
    };
    let list = query(&shared.actors.reader, move |r| r.images(owner.as_deref())).await.map_err(api)?;
    Ok(Response::Images(list))
}

/// `berth images rm`: the worker holding the image removes it from its engine; then the
/// store forgets it.
pub async fn remove_image(shared: &Shared, who: &str, role: Role, image: String) -> Result<Response, ApiError> {
    let a = &shared.actors;
    berth_shared::job::validate_image(&image).map_err(invalid)?;
    let found = {
        let name = image.clone();
        query(&a.reader, move |r| r.image(&name)).await.map_err(api)?
    };
    // Someone else's image is, to a non-admin, no image at all.
    let Some(found) = found.filter(|f| role == Role::Admin || f.owner == who) else {
        return Err(ApiError::new(ErrorKind::NotFound, format!("no frozen image named {image}: `berth images` lists them")));
    };
    let answer = a.registry.send(registry::RemoveImage { worker: found.worker.clone(), image: image.clone() }).await.map_err(mailbox)?;
    let answer = answer.map_err(|e| ApiError::new(ErrorKind::Internal, e))?;
    match tokio::time::timeout(REMOVE_WAIT, answer).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(why))) => return Err(ApiError::new(ErrorKind::Internal, format!("worker {} could not remove {image}: {why}", found.worker))),
        Ok(Err(_)) => return Err(ApiError::new(ErrorKind::Internal, format!("worker {} went away before removing {image}: try again", found.worker))),
        Err(_) => return Err(ApiError::new(ErrorKind::Internal, format!("worker {} did not answer within {REMOVE_WAIT:?}", found.worker))),
    }
    a.job_store.send(job_store::ForgetImage { image: image.clone(), only_reserved: false }).await.map_err(mailbox)?.map_err(api)?;
    tracing::info!(image = %image, worker = %found.worker, by = who, "frozen image removed");
    Ok(Response::ImageRemoved { image })
}
