//! Sessions: a leased sandbox held open for many commands. A session is a job whose
//! spec carries a [`SessionSpec`]: it is admitted, reserved for, claimed, leased,
//! fenced and recovered exactly as a one-task job is, and its worker holds the slot
//! (and its workspace, or container) from the claim until the session closes. Each
//! command run in it is an **exec**: numbered from 1, with its own command, env,
//! timeout, output (stored beside the session's, by exec number) and exit code.
//!
//! What a session's state is follows from its task's (`SessionState::of`): queued is
//! `opening`, running is `ready` (or `executing` while an exec runs), succeeded or
//! cancelled is `closed`, timed out is `expired`, failed is `lost` when its worker went
//! away and `failed` otherwise.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::job::{JobState, Outcome};

/// How long a session may sit without an exec before it closes by itself, by default.
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a session may be held at most, by default (also what opening reserves).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(4 * 3600);
/// The most execs one session may have running at once.
pub const MAX_CONCURRENT_EXECS: usize = 64;

/// What makes a job a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// Closed after this long without an exec running (`--idle-ttl`).
    pub idle_ttl_ms: u64,
    /// Closed this long after it opened, whatever runs (`--max-lifetime`); the job's
    /// `max_runtime_ms` is the same, so admission reserves for it.
    pub max_lifetime_ms: u64,
}

impl Default for SessionSpec {
    fn default() -> Self {
        SessionSpec { idle_ttl_ms: DEFAULT_IDLE_TTL.as_millis() as u64, max_lifetime_ms: DEFAULT_MAX_LIFETIME.as_millis() as u64 }
    }
}

impl SessionSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.idle_ttl_ms == 0 {
            return Err("the idle TTL must be more than zero".into());
        }
        if self.max_lifetime_ms == 0 {
            return Err("the max lifetime must be more than zero".into());
        }
        Ok(())
    }
}

/// One command to run in a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// On top of the session's env.
    pub env: Vec<(String, String)>,
    /// Killed (its whole process tree, nothing else of the session) after this long.
    pub timeout_ms: Option<u64>,
    /// The working directory, relative to the workspace (`--cwd`); the workspace itself
    /// when `None`.
    pub cwd: Option<String>,
    /// Whether the command reads stdin from the client (`-i`); otherwise /dev/null.
    pub stdin: bool,
}

impl ExecSpec {
    pub fn validate(&self) -> Result<(), String> {
        match self.argv.first() {
            None => return Err("the command is empty: give CMD ARGS after --".into()),
            Some(p) if p.is_empty() => return Err("the command's program name is empty".into()),
            Some(_) => {}
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err("the command holds a NUL byte".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(format!("invalid environment variable `{}`", crate::text::escape(k)));
            }
        }
        if self.timeout_ms == Some(0) {
            return Err("the exec timeout must be more than zero".into());
        }
        if let Some(c) = &self.cwd {
            check_relative("--cwd", c)?;
        }
        Ok(())
    }
}

/// Refuses a path that could leave the workspace by its text alone (absolute, `..`,
/// NUL); symlinks are checked where the path is used, on the worker.
pub fn check_relative(what: &str, p: &str) -> Result<(), String> {
    if p.contains('\0') {
        return Err(format!("{what}: the path holds a NUL byte"));
    }
    if p.starts_with('/') {
        return Err(format!("{what} {}: an absolute path leaves the workspace; give one relative to it", crate::text::escape(p)));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(format!("{what} {}: `..` leaves the workspace; give a path inside it", crate::text::escape(p)));
    }
    Ok(())
}

/// A session's state, as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionState {
    /// Waiting for approval or for a slot, or starting.
    Opening,
    Ready,
    Executing,
    Closing,
    Closed,
    /// Its worker died (its files were there).
    Lost,
    /// Idle TTL or max lifetime.
    Expired,
    /// Could not start.
    Failed,
}

impl SessionState {
    /// From its task's state and reason, and whether an exec runs.
    pub fn of(state: JobState, reason: Option<&str>, executing: bool) -> SessionState {
        match state {
            JobState::PendingApproval | JobState::Queued => SessionState::Opening,
            JobState::Running if executing => SessionState::Executing,
            JobState::Running => SessionState::Ready,
            JobState::Succeeded | JobState::Cancelled | JobState::Frozen => SessionState::Closed,
            JobState::TimedOut => SessionState::Expired,
            JobState::Failed if reason.is_some_and(is_lost_reason) => SessionState::Lost,
            JobState::Failed | JobState::Rejected => SessionState::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Opening => "opening",
            SessionState::Ready => "ready",
            SessionState::Executing => "executing",
            SessionState::Closing => "closing",
            SessionState::Closed => "closed",
            SessionState::Lost => "lost",
            SessionState::Expired => "expired",
            SessionState::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, SessionState::Closed | SessionState::Lost | SessionState::Expired | SessionState::Failed)
    }
}

/// How the reason a session's task records when its worker went away begins.
pub const LOST_REASON: &str = "lost: ";

fn is_lost_reason(r: &str) -> bool {
    r.starts_with(LOST_REASON)
}

/// One exec as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInfo {
    pub exec: u32,
    pub argv: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub reason: Option<String>,
}

impl ExecInfo {
    pub fn running(&self) -> bool {
        self.ended_at.is_none()
    }
}

/// How an exec ended, as the client is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnd {
    pub exec: u32,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub runtime_ms: u64,
    pub reason: Option<String>,
}

impl ExecEnd {
    pub fn of(exec: u32, o: &Outcome) -> ExecEnd {
        let reason = o.error.clone().or_else(|| o.timed_out.then(|| "timed out".to_string()));
        ExecEnd { exec, exit_code: o.exit_code, timed_out: o.timed_out, runtime_ms: o.runtime_ms, reason }
    }
}

/// The exit code the CLI ends with for an exec: its own, 124 for a timeout (as
/// `timeout(1)`), 125 when it could not be run.
pub fn exit_code_of(end: &ExecEnd) -> i32 {
    match (end.exit_code, end.timed_out) {
        (_, true) => 124,
        (Some(c), false) => c,
        (None, false) => 125,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_states_follow_the_task() {
        use JobState::*;
        assert_eq!(SessionState::of(Queued, None, false), SessionState::Opening);
        assert_eq!(SessionState::of(Running, None, false), SessionState::Ready);
        assert_eq!(SessionState::of(Running, None, true), SessionState::Executing);
        assert_eq!(SessionState::of(Cancelled, Some("closed by alice"), false), SessionState::Closed);
        assert_eq!(SessionState::of(TimedOut, Some("idle for 15m"), false), SessionState::Expired);
        assert_eq!(SessionState::of(Failed, Some(LOST_REASON), false), SessionState::Lost);
        assert_eq!(SessionState::of(Failed, Some("cannot start"), false), SessionState::Failed);
    }

    #[test]
    fn exec_specs_and_paths_are_checked() {
        let ok = ExecSpec { argv: vec!["true".into()], env: vec![], timeout_ms: None, cwd: Some("src/x".into()), stdin: false };
        assert_eq!(ok.validate(), Ok(()));
        for bad in [
            ExecSpec { argv: vec![], ..ok.clone() },
            ExecSpec { cwd: Some("../up".into()), ..ok.clone() },
            ExecSpec { cwd: Some("/etc".into()), ..ok.clone() },
            ExecSpec { timeout_ms: Some(0), ..ok.clone() },
            ExecSpec { env: vec![("A=B".into(), "x".into())], ..ok.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(check_relative("cp", "a/../../b").expect_err("refused").contains("leaves the workspace"));
    }
}
