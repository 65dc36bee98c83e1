//! A session's spec from its options: what `berth session open`'s flags and the Python
//! client's `Client.session(...)` both ask for, made into a `JobSpec` in one place.

use std::time::Duration;

use berth_shared::job::{Command, Executor, JobSpec};
use berth_shared::session::{SessionSpec, DEFAULT_IDLE_TTL, DEFAULT_MAX_LIFETIME};

use crate::exit::Fail;

/// What a session asks for; `None` and empty mean the defaults.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub name: Option<String>,
    /// One container of this image for the session's life; otherwise a process slot.
    pub image: Option<String>,
    /// Start from `berth-frozen:TAG` (instead of `image`).
    pub from_frozen: Option<String>,
    pub network: Option<String>,
    pub cpus: Option<f64>,
    pub mem_mib: Option<u64>,
    pub gpus: Option<u32>,
    pub gpu_model: Option<String>,
    pub min_vram_mib: Option<u64>,
    pub constraints: Vec<(String, String)>,
    pub pools: Vec<String>,
    pub account: Option<String>,
    pub env: Vec<(String, String)>,
    pub secrets: Vec<(String, String)>,
    pub idle_ttl: Option<Duration>,
    pub max_lifetime: Option<Duration>,
}

/// The session's spec: a one-attempt job holding a sandbox, its max runtime its
/// lifetime (so admission reserves for it). Checked as a submitted spec is.
pub fn session_spec(o: &SessionOptions) -> Result<JobSpec, Fail> {
    let idle = o.idle_ttl.unwrap_or(DEFAULT_IDLE_TTL);
    let lifetime = o.max_lifetime.unwrap_or(DEFAULT_MAX_LIFETIME);
    if idle.is_zero() || lifetime.is_zero() {
        return Err(Fail::usage("the idle TTL and the max lifetime must be more than zero"));
    }
    let mut spec = JobSpec::new(Command::Argv(Vec::new()));
    spec.name = o.name.clone();
    spec.session = Some(SessionSpec { idle_ttl_ms: idle.as_millis() as u64, max_lifetime_ms: lifetime.as_millis() as u64 });
    spec.max_runtime_ms = Some(lifetime.as_millis() as u64);
    spec.max_attempts = 1;
    spec.env = o.env.clone();
    spec.secrets = o.secrets.clone();
    if let Some(c) = o.cpus {
        spec.resources.millicpus = (c * 1000.0).round() as u32;
    }
    spec.resources.mem_mib = o.mem_mib.unwrap_or(0);
    spec.resources.gpus = o.gpus.unwrap_or(0);
    spec.resources.gpu_model = o.gpu_model.clone();
    spec.resources.min_vram_mib = o.min_vram_mib;
    spec.constraints = o.constraints.clone();
    spec.pools = o.pools.clone();
    spec.account = o.account.clone();
    let image = o.from_frozen.as_ref().map(|t| format!("{}:{t}", berth_shared::job::FROZEN_REPO)).or_else(|| o.image.clone());
    match (&image, &o.network) {
        (Some(image), network) => spec.executor = Executor::Docker { image: image.clone(), network: network.clone() },
        (None, Some(_)) => return Err(Fail::usage("--network applies to container sessions: give --image too")),
        (None, None) => {}
    }
    spec.validate().map_err(Fail::usage)?;
    Ok(spec)
}
