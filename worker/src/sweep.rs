//! Sweeps: what a worker left behind when it was killed outright. A starting worker
//! holds no attempt yet, so every container labelled as its own (`berth.managed=1`,
//! `berth.worker=NAME`) is an orphan whose lease it no longer holds: they are killed
//! and removed before it registers (reporting no leases, so the coordinator re-queues
//! their tasks), with the unfinished images of a freeze it was making and its stale
//! slot workspaces. `berth-worker sweep` does the same on demand; while the worker
//! runs (it holds `worker.lock` in its work dir) only containers whose lease it does
//! not hold (it records each in `containers/`) or whose expiry has passed are removed.
//!
//! Nothing without berth's labels is ever touched: containers and images are found by
//! their labels only (`berth.managed=1`, the worker's name and its cluster, so that
//! another cluster's worker of the same name on the same engine is left alone), and
//! each is checked again before it is removed.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use crate::executor::docker::{
    Engine, LABEL_ATTEMPT, LABEL_CLUSTER, LABEL_EXPIRES, LABEL_FROZEN, LABEL_FROZEN_BY, LABEL_JOB, LABEL_LEASE, LABEL_MANAGED, LABEL_ROLE, LABEL_WORKER,
};

/// The file in a work dir that names the worker's cluster (`berth.cluster`).
pub const CLUSTER_FILE: &str = "cluster-id";

/// The worker's cluster, as its last run wrote it down.
pub fn cluster_of(work_dir: &Path) -> Option<String> {
    std::fs::read_to_string(work_dir.join(CLUSTER_FILE)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Which of the worker's containers are still its own.
#[derive(Clone, Debug)]
pub enum Held {
    /// The worker is not running (or is only starting): every container of it is left over.
    Nothing,
    /// The running worker's attempts, by lease (from its records).
    Leases(HashSet<String>),
}

/// What a sweep removed (one line each, for people), and what it could not.
#[derive(Clone, Debug, Default)]
pub struct Swept {
    pub removed: Vec<String>,
    pub failed: Vec<String>,
}

/// The work dir's lock, held by a running worker for its whole life: `Some` when this
/// process got it (no worker runs there), `None` when a worker holds it.
pub fn lock_work_dir(dir: &Path) -> std::io::Result<Option<Flock<File>>> {
    let path = dir.join("worker.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(std::io::Error::from(e)),
    }
}

/// The leases a running worker has containers for (the names of `containers/`).
pub fn records(work_dir: &Path) -> HashSet<String> {
    let Ok(rd) = std::fs::read_dir(work_dir.join("containers")) else { return HashSet::new() };
    rd.flatten().filter_map(|e| e.file_name().to_str().map(String::from)).collect()
}

fn describe(labels: &std::collections::HashMap<String, String>) -> String {
    let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).map_or("?", String::as_str);
    let role = labels.get(LABEL_ROLE).filter(|r| !r.is_empty() && *r != "attempt").map(|r| format!(", {r} helper")).unwrap_or_default();
    format!("job {}, attempt {}, lease {}{role}", get(LABEL_JOB), get(LABEL_ATTEMPT), get(LABEL_LEASE))
}

/// The labels that make a container (`by` = `berth.worker`) or an image (`by` =
/// `berth.frozen_by`) this worker's own: asked of the engine, and checked again on
/// what it returns before anything is removed.
fn ours<'a>(by: &'a str, worker: &'a str, cluster: &'a str) -> [(&'a str, &'a str); 3] {
    [(LABEL_MANAGED, "1"), (by, worker), (LABEL_CLUSTER, cluster)]
}

/// Whether `labels` has every `KEY=VALUE` of `want`.
fn carries(labels: &std::collections::HashMap<String, String>, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
}

/// What the engine listed, or `None` with the failure noted in `out`.
fn listed<T>(found: Result<Vec<T>, String>, what: &str, out: &mut Swept) -> Option<Vec<T>> {
    match found {
        Ok(f) => Some(f),
        Err(e) => {
            out.failed.push(format!("cannot list {what}: {e}"));
            None
        }
    }
}

/// Kills and removes the worker's containers that it does not hold or that are past
/// their expiry (`now` in unix seconds).
pub async fn containers(engine: &Engine, worker: &str, held: &Held, now: u64, out: &mut Swept) {
    let ours = ours(LABEL_WORKER, worker, engine.cluster());
    let Some(found) = listed(engine.containers_labelled(&ours).await, "containers", out) else { return };
    for c in found {
        // The engine filtered on these; check again before removing anything.
        if !carries(&c.labels, &ours) {
            continue;
        }
        let lease = c.labels.get(LABEL_LEASE).cloned().unwrap_or_default();
        let expires = c.labels.get(LABEL_EXPIRES).and_then(|v| v.parse::<u64>().ok());
        let why = match (held, expires) {
            (_, Some(t)) if t < now => format!("expired at {}", chrono::DateTime::from_timestamp(t as i64, 0).map(|d| d.to_rfc3339()).unwrap_or_default()),
            (Held::Nothing, _) => "its lease is no longer held".to_string(),
            (Held::Leases(l), _) if !l.contains(&lease) => "its lease is no longer held".to_string(),
            (Held::Leases(_), _) => continue,
        };
        let name = if c.name.is_empty() { c.id.clone() } else { c.name.clone() };
        match engine.remove_container(&c.id).await {
            Ok(()) => out.removed.push(format!("container {name} ({}): {why}", describe(&c.labels))),
            Err(e) => out.failed.push(format!("cannot remove container {name}: {e}")),
        }
    }
}

/// Removes the images of freezes this worker did not finish (they lack
/// `berth.frozen=complete`). Never forced: an image another one builds on stays.
pub async fn images(engine: &Engine, worker: &str, out: &mut Swept) {
    let ours = ours(LABEL_FROZEN_BY, worker, engine.cluster());
    let Some(found) = listed(engine.images_labelled(&ours).await, "images", out) else { return };
    for (id, tags, labels) in found {
        if !carries(&labels, &ours) || carries(&labels, &[(LABEL_FROZEN, "complete")]) {
            continue;
        }
        let what = tags.first().cloned().unwrap_or_else(|| id.clone());
        match engine.remove_image_id(&id).await {
            Ok(()) => out.removed.push(format!("image {what}: an unfinished freeze")),
            Err(e) => out.failed.push(format!("cannot remove image {what}: {e}")),
        }
    }
}

/// Removes the slot workspaces (and freeze or seed scratch files) a stopped worker left.
pub fn workspaces(work_dir: &Path, out: &mut Swept) {
    let slots = work_dir.join("slots");
    let Ok(rd) = std::fs::read_dir(&slots) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        match r {
            Ok(()) => out.removed.push(format!("workspace {}", p.display())),
            Err(err) => out.failed.push(format!("cannot remove {}: {err}", p.display())),
        }
    }
}

/// Now, in unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_work_dir_and_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock_work_dir(dir.path()).expect("lock");
        assert!(first.is_some());
        assert!(lock_work_dir(dir.path()).expect("lock").is_none(), "a second holder is refused");
        drop(first);
        assert!(lock_work_dir(dir.path()).expect("lock").is_some(), "released with its holder");
        std::fs::create_dir_all(dir.path().join("containers")).expect("mkdir");
        std::fs::write(dir.path().join("containers/abc"), "berth-abc\n").expect("write");
        assert_eq!(records(dir.path()), HashSet::from(["abc".to_string()]));
        std::fs::create_dir_all(dir.path().join("slots/0/x")).expect("mkdir");
        let mut out = Swept::default();
        workspaces(dir.path(), &mut out);
        assert_eq!(out.removed.len(), 1, "{out:?}");
        assert!(!dir.path().join("slots/0").exists());
    }
}
