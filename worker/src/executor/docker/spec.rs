//! What berth puts on a container and its images: the container spec of an attempt
//! (image, limits, GPUs) and the labels that say whose a container or image is, on
//! attempts, freeze and seed helpers, and frozen images.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_shared::job::Executor;
use berth_shared::wire::Assignment;

use super::{
    LABEL_ATTEMPT, LABEL_CLUSTER, LABEL_EXPIRES, LABEL_FROZEN, LABEL_FROZEN_BY, LABEL_FROZEN_FROM, LABEL_INDEX, LABEL_JOB, LABEL_LEASE, LABEL_MANAGED,
    LABEL_ROLE, LABEL_WORKER, LABEL_WORKSPACE,
};

/// What the executor adds to a `Launch` for a container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// `berth-<lease>`: known before the container exists, so it can be recorded first.
    pub name: String,
    pub image: String,
    /// `none` unless the job asks for a network.
    pub network: String,
    pub nano_cpus: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub pids_limit: i64,
    /// The GPUs set aside for the attempt (UUIDs, or indices), requested from the
    /// engine's NVIDIA runtime: the container sees those and no others.
    pub gpus: Vec<String>,
    pub labels: HashMap<String, String>,
    /// The worker's name and cluster (on helper containers and frozen images).
    pub worker: String,
    pub cluster: String,
    pub job: String,
}

impl ContainerSpec {
    /// The container for an assigned Docker task (`None` for other executors).
    pub fn for_attempt(a: &Assignment, worker: &str, cluster: &str, pids_limit: i64, grace: Duration, now: SystemTime) -> Option<ContainerSpec> {
        let Executor::Docker { image, network } = &a.spec.executor else { return None };
        let r = &a.spec.resources;
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "1".to_string()),
            (LABEL_ROLE.to_string(), "attempt".to_string()),
            (LABEL_JOB.to_string(), a.job.to_string()),
            (LABEL_ATTEMPT.to_string(), a.attempt.to_string()),
            (LABEL_LEASE.to_string(), a.lease.to_string()),
            (LABEL_WORKER.to_string(), worker.to_string()),
            (LABEL_CLUSTER.to_string(), cluster.to_string()),
        ]);
        if let Some(i) = a.index {
            labels.insert(LABEL_INDEX.into(), i.to_string());
        }
        if let Some(max) = a.spec.max_runtime_ms {
            let start = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            let expires = start + Duration::from_millis(max) + grace;
            labels.insert(LABEL_EXPIRES.into(), expires.as_secs().to_string());
        }
        Some(ContainerSpec {
            name: container_name(&a.lease.to_string()),
            image: image.clone(),
            network: network.clone().unwrap_or_else(|| "none".into()),
            nano_cpus: (r.millicpus > 0).then(|| i64::from(r.millicpus) * 1_000_000),
            memory_bytes: (r.mem_mib > 0).then(|| (r.mem_mib as i64).saturating_mul(1024 * 1024)),
            pids_limit,
            gpus: Vec::new(),
            labels,
            worker: worker.to_string(),
            cluster: cluster.to_string(),
            job: a.job.to_string(),
        })
    }

    /// The attempt's GPUs (those its worker set aside for it).
    pub fn with_gpus(mut self, gpus: &[berth_shared::wire::GpuInfo]) -> Self {
        self.gpus = gpus.iter().map(|g| if g.uuid.is_empty() { g.index.to_string() } else { g.uuid.clone() }).collect();
        self
    }

    pub(super) fn lease(&self) -> &str {
        self.labels.get(LABEL_LEASE).map_or("", String::as_str)
    }
}

/// The name of an attempt's container.
pub fn container_name(lease: &str) -> String {
    format!("berth-{lease}")
}

/// Labels of a frozen image: berth's container labels blanked (a container made from
/// the image must not pass for one of berth's), the image's own.
pub(super) fn frozen_labels(c: &ContainerSpec, complete: bool, workspace_dir: &str) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> =
        [LABEL_JOB, LABEL_INDEX, LABEL_ATTEMPT, LABEL_LEASE, LABEL_WORKER, LABEL_EXPIRES, LABEL_ROLE].iter().map(|k| (k.to_string(), String::new())).collect();
    labels.insert(LABEL_MANAGED.into(), "1".into());
    labels.insert(LABEL_FROZEN_FROM.into(), c.job.clone());
    labels.insert(LABEL_FROZEN_BY.into(), c.worker.clone());
    labels.insert(LABEL_CLUSTER.into(), c.cluster.clone());
    labels.insert(LABEL_WORKSPACE.into(), workspace_dir.into());
    labels.insert(LABEL_FROZEN.into(), if complete { "complete".into() } else { String::new() });
    labels
}

/// A helper container's labels: berth's, so a crash leaves nothing a sweep misses.
pub(super) fn helper_labels(c: &ContainerSpec, role: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "1".to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
        (LABEL_JOB.to_string(), c.job.clone()),
        (LABEL_LEASE.to_string(), c.lease().to_string()),
        (LABEL_WORKER.to_string(), c.worker.clone()),
        (LABEL_CLUSTER.to_string(), c.cluster.clone()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::ids::{JobId, LeaseId};
    use berth_shared::job::{Command, JobSpec};

    #[test]
    fn container_spec_of_an_assignment() {
        let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        spec.executor = Executor::Docker { image: "busybox:1".into(), network: None };
        spec.resources.millicpus = 1500;
        spec.resources.mem_mib = 32;
        spec.max_runtime_ms = Some(60_000);
        let a = Assignment { lease: LeaseId::new(), job: JobId::new(), index: Some(4), attempt: 2, spec, owner: "alice".into() };
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let c = ContainerSpec::for_attempt(&a, "w1", "c1", 512, Duration::from_secs(2), now).expect("a docker task");
        assert_eq!(c.name, format!("berth-{}", a.lease));
        assert_eq!(c.network, "none");
        assert_eq!(c.nano_cpus, Some(1_500_000_000));
        assert_eq!(c.memory_bytes, Some(32 * 1024 * 1024));
        assert_eq!(c.labels[LABEL_MANAGED], "1");
        assert_eq!(c.labels[LABEL_WORKER], "w1");
        assert_eq!(c.labels[LABEL_INDEX], "4");
        assert_eq!(c.labels[LABEL_ATTEMPT], "2");
        assert_eq!(c.labels[LABEL_LEASE], a.lease.to_string());
        assert_eq!(c.labels[LABEL_EXPIRES], "1062");
        let mut p = a.clone();
        p.spec.executor = Executor::Process;
        assert_eq!(c.labels[LABEL_CLUSTER], "c1");
        assert!(c.gpus.is_empty());
        let g = |index: u32, uuid: &str| berth_shared::wire::GpuInfo { index, uuid: uuid.into(), ..Default::default() };
        assert_eq!(c.clone().with_gpus(&[g(1, "GPU-1111"), g(3, "")]).gpus, ["GPU-1111", "3"]);
        assert!(ContainerSpec::for_attempt(&p, "w1", "c1", 512, Duration::from_secs(2), now).is_none());
    }

    #[test]
    fn frozen_images_carry_no_attempt_labels() {
        let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        spec.executor = Executor::Docker { image: "busybox:1".into(), network: None };
        let a = Assignment { lease: LeaseId::new(), job: JobId::new(), index: None, attempt: 1, spec, owner: "alice".into() };
        let c = ContainerSpec::for_attempt(&a, "w1", "c1", 512, Duration::from_secs(2), UNIX_EPOCH).expect("a docker task");
        let l = frozen_labels(&c, true, "/.berth/ws/x");
        // A container made from the image must not pass for an attempt of w1's.
        for k in [LABEL_JOB, LABEL_ATTEMPT, LABEL_LEASE, LABEL_WORKER, LABEL_EXPIRES, LABEL_ROLE] {
            assert_eq!(l[k], "", "{k}");
        }
        assert_eq!((l[LABEL_MANAGED].as_str(), l[LABEL_FROZEN].as_str(), l[LABEL_WORKSPACE].as_str()), ("1", "complete", "/.berth/ws/x"));
        assert_eq!((l[LABEL_FROZEN_FROM].as_str(), l[LABEL_FROZEN_BY].as_str(), l[LABEL_CLUSTER].as_str()), (a.job.to_string().as_str(), "w1", "c1"));
        assert_eq!(frozen_labels(&c, false, "")[LABEL_FROZEN], "", "an unfinished freeze is not complete");
        let h = helper_labels(&c, "seed");
        assert_eq!((h[LABEL_MANAGED].as_str(), h[LABEL_WORKER].as_str(), h[LABEL_LEASE].as_str()), ("1", "w1", a.lease.to_string().as_str()));
    }
}
