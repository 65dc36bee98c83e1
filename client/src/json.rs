//! What the coordinator's answers are as JSON, with stable field names: `berth --json`
//! prints these, and the Python client hands them to Python as dicts, so both read the
//! same fields. User text is carried as it is (never escaped here).

use std::time::Duration;

use berth_shared::job::{Command, Counts, Event, Executor, JobState, LABEL_FROZEN_IMAGE, LABEL_RESUMED_FROM};
use berth_shared::session::ExecInfo;
use berth_shared::wire::{BudgetInfo, CoordinatorHealth, FrozenImage, JobStatus, JobSummary, SessionStatus, SessionSummary, WorkerInfo};
use serde_json::{json, Value};

pub fn command_text(c: &Command) -> String {
    match c {
        Command::Argv(v) => v.iter().map(|a| if a.contains(' ') || a.is_empty() { format!("'{a}'") } else { a.clone() }).collect::<Vec<_>>().join(" "),
        Command::Script(s) => format!("sh -c '{}'", s.replace('\n', "; ")),
    }
}

pub fn counts_json(c: &Counts) -> Value {
    let mut m = serde_json::Map::new();
    for s in JobState::ALL {
        m.insert(s.as_str().into(), json!(c.get(s)));
    }
    Value::Object(m)
}

pub fn event_json(e: &Event) -> Value {
    json!({
        "time": e.time.to_rfc3339(),
        "index": e.index,
        "state": e.state.as_str(),
        "attempt": e.attempt,
        "worker": e.worker,
        "reason": e.reason,
    })
}

pub fn summary_json(s: &JobSummary) -> Value {
    json!({
        "id": s.id.to_string(),
        "name": s.name,
        "state": s.state.as_str(),
        "tasks": s.tasks,
        "counts": counts_json(&s.counts),
        "owner": s.owner,
        "account": s.account,
        "submitted_at": s.submitted_at.to_rfc3339(),
        "ended_at": s.ended_at.map(|t| t.to_rfc3339()),
        "waiting": s.reason,
    })
}

pub fn status_json(st: &JobStatus) -> Value {
    let mut v = summary_json(&st.summary);
    let t = st.task.as_ref();
    if let Value::Object(m) = &mut v {
        if let Some(t) = t {
            m.insert("state".into(), json!(t.state.as_str()));
            m.insert("index".into(), json!(t.index));
        }
        m.insert("exit_code".into(), json!(t.and_then(|t| t.exit_code)));
        m.insert("attempts".into(), json!(t.map(|t| t.attempt)));
        m.insert("worker".into(), json!(t.and_then(|t| t.worker.clone())));
        m.insert("started_at".into(), json!(t.and_then(|t| t.started_at).map(|x| x.to_rfc3339())));
        m.insert("task_ended_at".into(), json!(t.and_then(|t| t.ended_at).map(|x| x.to_rfc3339())));
        m.insert("runtime_ms".into(), json!(t.and_then(|t| t.runtime_ms)));
        m.insert("reason".into(), json!(t.and_then(|t| t.reason.clone())));
        m.insert("command".into(), json!(command_text(&st.spec.command)));
        m.insert("max_output".into(), json!(st.spec.max_output));
        if let Executor::Docker { image, network } = &st.spec.executor {
            m.insert("image".into(), json!(image));
            m.insert("network".into(), json!(network.clone().unwrap_or_else(|| "none".into())));
        }
        m.insert("resumed_from".into(), json!(label(st, LABEL_RESUMED_FROM)));
        m.insert("frozen_image".into(), json!(label(st, LABEL_FROZEN_IMAGE)));
        m.insert("events".into(), Value::Array(st.events.iter().map(event_json).collect()));
    }
    v
}

pub fn list_json(jobs: &[JobSummary]) -> Value {
    Value::Array(jobs.iter().map(summary_json).collect())
}

pub fn workers_json(ws: &[WorkerInfo]) -> Value {
    Value::Array(
        ws.iter()
            .map(|w| {
                json!({
                    "name": w.name,
                    "connected": w.connected,
                    "drained": w.drained,
                    "slots": w.slots,
                    "running": w.running,
                    "pool": w.pool,
                    "labels": w.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "host": w.host,
                    "leases": w.leases.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
                    "last_heartbeat": w.last_heartbeat.map(|t| t.to_rfc3339()),
                    "slot_states": w.slot_states,
                })
            })
            .collect(),
    )
}

/// A label of the job (berth's own are set by the coordinator).
pub fn label<'a>(st: &'a JobStatus, key: &str) -> Option<&'a str> {
    st.spec.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub fn images_json(list: &[FrozenImage]) -> Value {
    Value::Array(
        list.iter()
            .map(|i| {
                json!({
                    "image": i.image,
                    "job": i.job.to_string(),
                    "index": i.index,
                    "worker": i.worker,
                    "owner": i.owner,
                    "created_at": i.created_at.to_rfc3339(),
                })
            })
            .collect(),
    )
}

/// Amounts as strings: exact, never a float.
pub fn budgets_json(rows: &[BudgetInfo]) -> Value {
    Value::Array(
        rows.iter()
            .map(|b| {
                json!({
                    "account": b.account,
                    "month": b.month,
                    "run_cap": b.run_cap.to_string(),
                    "month_cap": b.month_cap.to_string(),
                    "reserved": b.reserved.to_string(),
                    "spent": b.spent.to_string(),
                })
            })
            .collect(),
    )
}

pub fn health_json(h: &CoordinatorHealth) -> Value {
    json!({
        "coordinator": h.coordinator,
        "store": {
            "writable": h.store.writable,
            "disk_full": h.store.disk_full,
            "since": h.store.since.map(|t| t.to_rfc3339()),
            "reason": h.store.reason,
        },
        "default_max_output": h.default_max_output,
    })
}

pub fn exec_json(e: &ExecInfo) -> Value {
    json!({
        "exec": e.exec,
        "command": e.argv,
        "started_at": e.started_at.to_rfc3339(),
        "ended_at": e.ended_at.map(|t| t.to_rfc3339()),
        "exit_code": e.exit_code,
        "timed_out": e.timed_out,
        "reason": e.reason,
    })
}

pub fn held(st: &SessionStatus) -> Option<Duration> {
    let t = st.job.task.as_ref()?;
    let start = t.started_at?;
    let end = t.ended_at.unwrap_or_else(chrono::Utc::now);
    (end - start).to_std().ok()
}

pub fn session_status_json(st: &SessionStatus) -> Value {
    let t = st.job.task.as_ref();
    json!({
        "id": st.job.summary.id.to_string(),
        "name": st.job.summary.name,
        "state": st.state.as_str(),
        "owner": st.job.summary.owner,
        "worker": t.and_then(|t| t.worker.clone()),
        "opened_at": st.job.summary.submitted_at.to_rfc3339(),
        "ready_at": t.and_then(|t| t.started_at).map(|x| x.to_rfc3339()),
        "ended_at": t.and_then(|t| t.ended_at).map(|x| x.to_rfc3339()),
        "held_s": held(st).map(|d| d.as_secs_f64()),
        "reason": t.and_then(|t| t.reason.clone()),
        "reserved_usd": st.reserved.normalize().to_string(),
        "spent_usd": st.spent.normalize().to_string(),
        "execs": st.execs.iter().map(exec_json).collect::<Vec<_>>(),
    })
}

pub fn session_list_json(rows: &[SessionSummary]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "id": r.id.to_string(),
                    "name": r.name,
                    "state": r.state.as_str(),
                    "owner": r.owner,
                    "worker": r.worker,
                    "opened_at": r.opened_at.to_rfc3339(),
                    "ended_at": r.ended_at.map(|t| t.to_rfc3339()),
                    "execs": r.execs,
                    "reason": r.reason,
                })
            })
            .collect(),
    )
}
