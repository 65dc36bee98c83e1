//! Jobs: what a user asks for (`JobSpec`), the states a task moves through and the
//! pure rules for moving between them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An argv, executed directly.
    Argv(Vec<String>),
    /// A script, run through `/bin/sh -c`.
    Script(String),
}

impl Command {
    /// The argv the executor runs.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Argv(v) => v.clone(),
            Command::Script(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        }
    }
}

/// Which executor runs a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Executor {
    /// A child process in the slot workspace, in its own process group.
    #[default]
    Process,
    /// A container from `image`, the slot workspace bind-mounted at `/workspace`.
    Docker { image: String, network: Option<String> },
}

/// The repository a frozen task's image is committed to (`berth-frozen:TAG`).
pub const FROZEN_REPO: &str = "berth-frozen";

/// Labels with this prefix are the coordinator's (set on jobs it makes, such as a
/// resumed one); a submission may not carry them.
pub const SYSTEM_LABEL_PREFIX: &str = "berth.";
/// A spec carrying this label runs only on the named worker (a resumed job runs where
/// its frozen image is).
pub const LABEL_PINNED_WORKER: &str = "berth.worker";
/// The job a resumed job was resumed from.
pub const LABEL_RESUMED_FROM: &str = "berth.resumed_from";
/// Added by the coordinator to a frozen task's status: the image it was frozen into.
pub const LABEL_FROZEN_IMAGE: &str = "berth.frozen_image";

impl Executor {
    /// The name a worker offers it under (`--executor`).
    pub fn name(&self) -> &'static str {
        match self {
            Executor::Process => "process",
            Executor::Docker { .. } => "docker",
        }
    }

    /// Checks the image reference and network name of a Docker job.
    pub fn validate(&self) -> Result<(), String> {
        if let Executor::Docker { image, network } = self {
            validate_image(image)?;
            if let Some(n) = network {
                validate_network(n)?;
            }
        }
        Ok(())
    }
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// One path component of an image name: lowercase letters and digits, separated by
/// `.`, `_`, `__` or runs of `-`.
fn valid_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !is_lower_alnum(b[0] as char) || !is_lower_alnum(b[b.len() - 1] as char) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if is_lower_alnum(c) {
            i += 1;
            continue;
        }
        // A separator, between alphanumerics.
        let start = i;
        while i < b.len() && !is_lower_alnum(b[i] as char) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|c| c == '-');
        if !ok {
            return false;
        }
    }
    true
}

/// A registry host: `localhost`, or a name with a dot, optionally `:PORT`.
fn valid_domain(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.chars().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && !part.starts_with('-') && !part.ends_with('-'))
}

/// Checks an image tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || tag.len() > 128 || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(format!("invalid image tag `{tag}`: use up to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`"));
    }
    Ok(())
}

/// Checks a Docker image reference the way the engine parses one:
/// `[HOST[:PORT]/]NAME[:TAG][@ALGO:HEX]`, NAME being lowercase path components.
pub fn validate_image(image: &str) -> Result<(), String> {
    let bad = |why: &str| format!("invalid image `{image}`: {why}");
    if image.is_empty() {
        return Err("the image name is empty".into());
    }
    if image.len() > 255 {
        return Err(bad("longer than 255 characters"));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace"));
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(algo, hex)| {
            !algo.is_empty()
                && algo.chars().all(|c| is_lower_alnum(c) || matches!(c, '+' | '.' | '_' | '-'))
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !ok {
            return Err(bad("the digest after `@` must be ALGORITHM:HEX, e.g. sha256:<64 hex digits>"));
        }
    }
    // A tag is after the last `:` that follows the last `/` (a `:` before it is a port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        validate_tag(t).map_err(|_| bad("the tag after `:` may hold letters, digits, `_`, `.` and `-` (at most 128)"))?;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost") {
        let domain = parts.remove(0);
        if !valid_domain(domain) {
            return Err(bad(&format!("`{domain}` is not a registry host")));
        }
    }
    if parts.iter().any(|p| !valid_path_component(p)) {
        return Err(bad("names are lowercase letters and digits, separated by `.`, `_`, `-` or `/`"));
    }
    Ok(())
}

/// Checks a `--network` value: `none`, `bridge` or the name of a network on the
/// worker's engine. Sharing the host's or another container's network is refused: a
/// job gets a network namespace of its own.
pub fn validate_network(network: &str) -> Result<(), String> {
    if network == "host" || network.starts_with("container:") {
        return Err(format!("network `{network}` is not allowed: a job gets a network of its own (`none`, `bridge` or a named network)"));
    }
    let mut chars = network.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || network.len() > 128 || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(format!("invalid network `{network}`: use `none`, `bridge` or a network name (letters, digits, `_`, `.`, `-`)"));
    }
    Ok(())
}

/// Refuses labels only the coordinator may set.
pub fn check_user_labels(labels: &[(String, String)]) -> Result<(), String> {
    match labels.iter().find(|(k, _)| k.starts_with(SYSTEM_LABEL_PREFIX)) {
        Some((k, _)) => Err(format!("label `{k}`: labels starting with `{SYSTEM_LABEL_PREFIX}` are berth's own; use another name")),
        None => Ok(()),
    }
}

/// Resources a task needs on its worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// CPUs in thousandths (1000 = one CPU); 0 means "no reservation".
    pub millicpus: u32,
    pub mem_mib: u64,
    pub gpus: u32,
    pub gpu_model: Option<String>,
    pub min_vram_mib: Option<u64>,
}

/// An inclusive range of array indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayRange {
    pub start: u32,
    pub end: u32,
}

impl ArrayRange {
    pub fn len(&self) -> u64 {
        u64::from(self.end - self.start) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The largest array one submission may hold.
pub const MAX_ARRAY_TASKS: u64 = 10_000_000;

impl FromStr for ArrayRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid array range `{s}`: use START-END, e.g. 1-1000");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let start: u32 = a.trim().parse().map_err(|_| bad())?;
        let end: u32 = b.trim().parse().map_err(|_| bad())?;
        if end < start {
            return Err(format!("invalid array range `{s}`: the end is before the start"));
        }
        let r = ArrayRange { start, end };
        if r.len() > MAX_ARRAY_TASKS {
            return Err(format!("array range `{s}` has {} tasks; the most one submission may hold is {MAX_ARRAY_TASKS}", r.len()));
        }
        Ok(r)
    }
}

/// Everything a submission asks for. The coordinator stores it once per job (an
/// array stores one spec for all its tasks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: Option<String>,
    pub command: Command,
    pub env: Vec<(String, String)>,
    /// `(VAR, NAME)`: set `VAR` in the job from the worker's secret `NAME` at run time.
    pub secrets: Vec<(String, String)>,
    pub resources: Resources,
    pub executor: Executor,
    pub max_runtime_ms: Option<u64>,
    pub max_attempts: u32,
    pub priority: i32,
    pub account: Option<String>,
    pub labels: Vec<(String, String)>,
    pub pools: Vec<String>,
    pub array: Option<ArrayRange>,
    /// Worker labels the job needs (`--label-constraint k=v`): all must match.
    pub constraints: Vec<(String, String)>,
    /// Jobs that must end first (`--after JOB[:ok|:any]`); an array is one parent.
    pub after: Vec<Dependency>,
    /// The most output (stdout and stderr together, in bytes) one attempt may store
    /// (`--max-output`); past it the task fails and is killed, its output kept up to
    /// the cap. `None` in a submission: the coordinator's default, filled in when the
    /// job is admitted.
    pub max_output: Option<u64>,
    /// Set for a session (`berth session open`): the job holds a sandbox open for
    /// execs instead of running `command` (see `session`).
    pub session: Option<crate::session::SessionSpec>,
}

/// A parent job and what its end must be for the child to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// The parent's id, or a unique prefix of it (resolved at submission).
    pub job: String,
    pub on: AfterCond,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AfterCond {
    /// Run only if the parent succeeded; otherwise the child is cancelled.
    Ok,
    /// Run once the parent has ended, however it ended.
    Any,
}

impl FromStr for Dependency {
    type Err = String;
    /// `JOB`, `JOB:ok` or `JOB:any` (`ok` when not given).
    fn from_str(s: &str) -> Result<Self, String> {
        let (job, on) = match s.rsplit_once(':') {
            Some((j, "ok")) => (j, AfterCond::Ok),
            Some((j, "any")) => (j, AfterCond::Any),
            Some((_, other)) => return Err(format!("`{s}`: the condition `{other}` is neither ok nor any")),
            None => (s, AfterCond::Ok),
        };
        if job.len() < 4 || !job.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(format!("`{s}` is not a job id or a prefix of at least 4 characters"));
        }
        Ok(Dependency { job: job.to_ascii_lowercase(), on })
    }
}

impl JobSpec {
    /// A spec running `command` with every other field at its default.
    pub fn new(command: Command) -> Self {
        JobSpec {
            name: None,
            command,
            env: Vec::new(),
            secrets: Vec::new(),
            resources: Resources::default(),
            executor: Executor::Process,
            max_runtime_ms: None,
            max_attempts: 3,
            priority: 0,
            account: None,
            labels: Vec::new(),
            pools: Vec::new(),
            array: None,
            constraints: Vec::new(),
            after: Vec::new(),
            max_output: None,
            session: None,
        }
    }

    /// Checks what a coordinator must refuse whatever the client said.
    pub fn validate(&self) -> Result<(), String> {
        self.executor.validate()?;
        if let Some(n) = &self.name {
            crate::text::check_label("the job name", n, crate::text::MAX_NAME_BYTES)?;
        }
        // A blank account is the submitter's own.
        if let Some(a) = self.account.as_deref().filter(|a| !a.trim().is_empty()) {
            crate::text::check_label("the account", a, crate::text::MAX_NAME_BYTES)?;
        }
        if let Some(session) = &self.session {
            session.validate()?;
            if self.array.is_some() {
                return Err("a session is one sandbox: it takes no --array".into());
            }
            if self.max_attempts != 1 {
                return Err("a session runs once: its files live on one worker".into());
            }
            if self.max_runtime_ms != Some(session.max_lifetime_ms) {
                return Err("a session's max runtime is its max lifetime".into());
            }
        }
        match &self.command {
            Command::Argv(v) if v.is_empty() && self.session.is_some() => {}
            Command::Argv(v) if v.is_empty() => return Err("the command is empty: give CMD ARGS after --, or a script".into()),
            Command::Argv(v) if v[0].is_empty() => return Err("the command's program name is empty".into()),
            Command::Script(s) if s.trim().is_empty() => return Err("the script is empty".into()),
            _ => {}
        }
        if self.max_attempts == 0 {
            return Err("attempts must be at least 1".into());
        }
        if self.max_attempts > 100 {
            return Err(format!("attempts {} is more than the limit of 100", self.max_attempts));
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("invalid environment variable name `{k}`"));
            }
        }
        if let Some(r) = self.array {
            if r.end < r.start || r.len() > MAX_ARRAY_TASKS {
                return Err(format!("invalid array range {}-{}", r.start, r.end));
            }
        }
        if self.max_runtime_ms == Some(0) {
            return Err("max runtime must be more than zero".into());
        }
        if self.max_output == Some(0) {
            return Err("max output must be more than zero".into());
        }
        if self.after.len() > 64 {
            return Err(format!("{} dependencies is more than the limit of 64", self.after.len()));
        }
        if let Some(m) = &self.resources.gpu_model {
            if m.trim().is_empty() {
                return Err("the GPU model is empty".into());
            }
        }
        Ok(())
    }

    /// How many tasks this submission holds.
    pub fn task_count(&self) -> u64 {
        self.array.map_or(1, |r| r.len())
    }
}

/// The state of a task, or (aggregated) of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum JobState {
    PendingApproval,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Rejected,
    Frozen,
}

impl JobState {
    pub const ALL: [JobState; 9] = [
        JobState::PendingApproval,
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Rejected,
        JobState::Frozen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::PendingApproval => "pending_approval",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Rejected => "rejected",
            JobState::Frozen => "frozen",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::PendingApproval | JobState::Queued | JobState::Running)
    }

    /// Whether the state machine allows `self → to`. A lost lease takes `running`
    /// back to `queued`; everything else moves forward only.
    pub fn can_move_to(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (PendingApproval, Queued | Rejected | Cancelled)
                | (Queued, Running | Cancelled | Failed)
                | (Running, Queued | Succeeded | Failed | Cancelled | TimedOut | Frozen)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown state `{s}`: use one of {}", names.join(", "))
        })
    }
}

/// Task counts per state; an array's aggregate state follows from them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pending_approval: u64,
    pub queued: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    pub rejected: u64,
    pub frozen: u64,
}

impl Counts {
    pub fn get(&self, s: JobState) -> u64 {
        match s {
            JobState::PendingApproval => self.pending_approval,
            JobState::Queued => self.queued,
            JobState::Running => self.running,
            JobState::Succeeded => self.succeeded,
            JobState::Failed => self.failed,
            JobState::Cancelled => self.cancelled,
            JobState::TimedOut => self.timed_out,
            JobState::Rejected => self.rejected,
            JobState::Frozen => self.frozen,
        }
    }

    pub fn slot(&mut self, s: JobState) -> &mut u64 {
        match s {
            JobState::PendingApproval => &mut self.pending_approval,
            JobState::Queued => &mut self.queued,
            JobState::Running => &mut self.running,
            JobState::Succeeded => &mut self.succeeded,
            JobState::Failed => &mut self.failed,
            JobState::Cancelled => &mut self.cancelled,
            JobState::TimedOut => &mut self.timed_out,
            JobState::Rejected => &mut self.rejected,
            JobState::Frozen => &mut self.frozen,
        }
    }

    /// Moves `n` tasks from one state to another.
    pub fn shift(&mut self, from: JobState, to: JobState, n: u64) {
        let f = self.slot(from);
        *f = f.saturating_sub(n);
        *self.slot(to) += n;
    }

    pub fn total(&self) -> u64 {
        JobState::ALL.iter().map(|s| self.get(*s)).sum()
    }

    pub fn unfinished(&self) -> u64 {
        self.pending_approval + self.queued + self.running
    }

    /// The state of a whole job from its tasks: waiting states first, then the worst
    /// outcome among finished tasks.
    pub fn aggregate(&self) -> JobState {
        if self.running > 0 {
            JobState::Running
        } else if self.queued > 0 {
            if self.terminal() > 0 {
                JobState::Running
            } else {
                JobState::Queued
            }
        } else if self.pending_approval > 0 {
            JobState::PendingApproval
        } else if self.failed > 0 {
            JobState::Failed
        } else if self.timed_out > 0 {
            JobState::TimedOut
        } else if self.rejected > 0 {
            JobState::Rejected
        } else if self.cancelled > 0 {
            JobState::Cancelled
        } else if self.frozen > 0 {
            JobState::Frozen
        } else {
            JobState::Succeeded
        }
    }

    fn terminal(&self) -> u64 {
        self.total() - self.unfinished()
    }
}

/// How an attempt ended, as its worker saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The exit code, with 128 + N for a process killed by signal N.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Ended because the coordinator told the worker to kill it.
    pub killed: bool,
    pub runtime_ms: u64,
    /// Why the attempt could not run or ended abnormally (spawn failure, ...).
    pub error: Option<String>,
}

impl Outcome {
    /// The state a task ends in when its attempt ends with this outcome.
    pub fn final_state(&self) -> JobState {
        if self.timed_out {
            JobState::TimedOut
        } else if self.error.is_none() && self.exit_code == Some(0) {
            JobState::Succeeded
        } else {
            JobState::Failed
        }
    }
}

/// One append-only entry of a task's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub time: DateTime<Utc>,
    pub index: Option<u32>,
    pub state: JobState,
    pub attempt: u32,
    pub worker: Option<String>,
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
        }
        assert!("done".parse::<JobState>().is_err());
    }

    #[test]
    fn transitions() {
        use JobState::*;
        assert!(Queued.can_move_to(Running));
        assert!(Running.can_move_to(Queued));
        assert!(!Succeeded.can_move_to(Running));
        assert!(!Cancelled.can_move_to(Succeeded));
        for s in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for t in JobState::ALL {
                assert!(!s.can_move_to(t), "{s} is terminal");
            }
        }
    }

    #[test]
    fn aggregate_state() {
        let mut c = Counts { queued: 3, ..Default::default() };
        assert_eq!(c.aggregate(), JobState::Queued);
        c.shift(JobState::Queued, JobState::Running, 1);
        assert_eq!(c.aggregate(), JobState::Running);
        c.shift(JobState::Running, JobState::Succeeded, 1);
        assert_eq!(c.aggregate(), JobState::Running);
        c.shift(JobState::Queued, JobState::Succeeded, 1);
        c.shift(JobState::Queued, JobState::Failed, 1);
        assert_eq!(c.aggregate(), JobState::Failed);
        assert_eq!(c.total(), 3);
    }

    #[test]
    fn array_ranges() {
        assert_eq!("1-1000".parse::<ArrayRange>().map(|r| r.len()), Ok(1000));
        assert_eq!("0-0".parse::<ArrayRange>().map(|r| r.len()), Ok(1));
        assert!("5-1".parse::<ArrayRange>().is_err());
        assert!("a-b".parse::<ArrayRange>().is_err());
        assert!("0-4294967295".parse::<ArrayRange>().is_err());
    }

    #[test]
    fn outcome_states() {
        let ok = Outcome { exit_code: Some(0), signal: None, timed_out: false, killed: false, runtime_ms: 1, error: None };
        assert_eq!(ok.final_state(), JobState::Succeeded);
        let failed = Outcome { exit_code: Some(7), ..ok.clone() };
        assert_eq!(failed.final_state(), JobState::Failed);
        let late = Outcome { timed_out: true, ..ok };
        assert_eq!(late.final_state(), JobState::TimedOut);
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "berth-frozen:0192f3ab-cdef-7abc",
            "library/ubuntu:22.04",
            "localhost:5000/team/app:v1.2_rc-3",
            "registry.example.com/a/b__c/d-e:latest",
            "alpine@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(validate_image(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Busybox", "a b", "img:", "img:-x", "a//b", "-a", "a-", "img@sha256:xyz", "reg.example.com:port/a", "a:b:c"] {
            assert!(validate_image(bad).is_err(), "{bad} should be refused");
        }
        let e = validate_image("Ubuntu").expect_err("uppercase");
        assert!(e.starts_with("invalid image `Ubuntu`") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn networks_tags_and_labels() {
        for ok in ["none", "bridge", "berth-test_net.1"] {
            assert_eq!(validate_network(ok), Ok(()), "{ok}");
        }
        for bad in ["host", "container:abc", "", "-x", "a b", "a/b"] {
            assert!(validate_network(bad).is_err(), "{bad}");
        }
        assert!(validate_tag("v1.0").is_ok());
        assert!(validate_tag(".x").is_err());
        assert!(validate_tag(&"a".repeat(129)).is_err());
        assert!(check_user_labels(&[("team".into(), "a".into())]).is_ok());
        assert!(check_user_labels(&[(LABEL_PINNED_WORKER.into(), "w".into())]).is_err());
        let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        spec.executor = Executor::Docker { image: "busybox".into(), network: Some("host".into()) };
        assert!(spec.validate().is_err());
        spec.executor = Executor::Docker { image: "busybox".into(), network: Some("bridge".into()) };
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn names_and_accounts_are_short_printable_text() {
        let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        spec.name = Some("x".repeat(256));
        spec.account = Some(String::new());
        assert_eq!(spec.validate(), Ok(()));
        for bad in ["x".repeat(257), "\x1b]0;title\x07".into(), "two\nlines".into(), "".into()] {
            spec.name = Some(bad.clone());
            assert!(spec.validate().is_err(), "{bad:?}");
        }
        spec.name = None;
        spec.account = Some("team\x1b[2J".into());
        assert!(spec.validate().expect_err("account").contains("the account"));
    }
}
