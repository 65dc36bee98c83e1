//! Output for people and scripts: aligned, coloured tables (colour off with NO_COLOR
//! or when not a terminal) and JSON with stable field names. User text (names,
//! commands, reasons, accounts, worker names) is shown through `clean`, and a table
//! cuts a long cell short; JSON carries the text as it is.

use std::io::IsTerminal;

use berth_shared::duration::{format_duration, format_size};
use berth_shared::job::{Counts, Executor, JobState, LABEL_FROZEN_IMAGE, LABEL_RESUMED_FROM};
use berth_shared::wire::{CoordinatorHealth, FrozenImage, JobStatus, JobSummary, WorkerInfo};
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::exit::Fail;
use crate::json::label;
pub use crate::json::{budgets_json, command_text, health_json, images_json, list_json, status_json, workers_json};
use crate::out::out;

/// User text as it may be shown: control characters and bidirectional overrides
/// escaped (`\x1b`, `\n`, `\u{202e}`), so nobody's text steers the reader's terminal.
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    berth_shared::text::escape(s)
}

/// An optional piece of user text, cleaned, or `-`.
fn clean_or_dash(s: Option<&str>) -> String {
    s.map(|s| clean(s).into_owned()).unwrap_or_else(|| "-".into())
}

#[derive(Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    /// Colour when stdout is a terminal and NO_COLOR is unset.
    pub fn detect() -> Style {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style { color: !no_color && std::io::stdout().is_terminal() }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    pub fn state(&self, s: JobState) -> String {
        let code = match s {
            JobState::Succeeded => "32",
            JobState::Failed | JobState::TimedOut => "31",
            JobState::Running => "36",
            JobState::Queued | JobState::PendingApproval => "33",
            JobState::Cancelled | JobState::Rejected => "35",
            JobState::Frozen => "34",
        };
        self.paint(code, s.as_str())
    }

    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }

    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
}

fn visible_width(s: &str) -> usize {
    let mut w = 0;
    let mut in_esc = false;
    for c in s.chars() {
        match (in_esc, c) {
            (false, '\x1b') => in_esc = true,
            (true, 'm') => in_esc = false,
            (true, _) => {}
            (false, _) => w += 1,
        }
    }
    w
}

/// The most characters a table shows of a cell (the last column: `MAX_LAST_CELL`);
/// a longer one ends in `…`, so one long name does not pad every row.
pub const MAX_CELL: usize = 48;
pub const MAX_LAST_CELL: usize = 160;

/// `cell` cut to `max` visible characters, the last of them `…` (colour codes kept).
fn cut(cell: &str, max: usize) -> String {
    if visible_width(cell) <= max {
        return cell.to_string();
    }
    let mut out = String::with_capacity(max + 8);
    let (mut w, mut in_esc, mut styled) = (0, false, false);
    for c in cell.chars() {
        match (in_esc, c) {
            (false, '\x1b') => {
                in_esc = true;
                styled = true;
            }
            (true, 'm') => in_esc = false,
            (true, _) => {}
            (false, _) if w + 1 >= max => break,
            (false, _) => w += 1,
        }
        out.push(c);
    }
    out.push('…');
    if styled {
        out.push_str("\x1b[0m");
    }
    out
}

/// Left-aligned columns, two spaces apart; long cells cut short.
pub fn table(style: Style, headers: &[&str], rows: &[Vec<String>]) -> String {
    let last = headers.len().saturating_sub(1);
    let rows: Vec<Vec<String>> =
        rows.iter().map(|r| r.iter().enumerate().map(|(i, c)| cut(c, if i >= last { MAX_LAST_CELL } else { MAX_CELL })).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(visible_width(c));
            }
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(&c);
            if i + 1 < n {
                out.push_str(&" ".repeat(widths[i] - visible_width(&c) + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.iter().map(|h| style.bold(h)).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub fn counts_text(c: &Counts) -> String {
    let parts: Vec<String> = JobState::ALL.iter().filter(|s| c.get(**s) > 0).map(|s| format!("{} {}", c.get(*s), s.as_str())).collect();
    parts.join(", ")
}

pub fn status_text(style: Style, st: &JobStatus) -> String {
    let s = &st.summary;
    let mut rows: Vec<(&str, String)> = vec![("job", s.id.to_string())];
    if let Some(n) = &s.name {
        rows.push(("name", clean(n).into_owned()));
    }
    let state = st.task.as_ref().map(|t| t.state).unwrap_or(s.state);
    rows.push(("state", style.state(state)));
    if let Some(w) = &s.reason {
        rows.push(("waiting", style.paint("33", &clean(w))));
    }
    if let Some(t) = &st.task {
        if let Some(i) = t.index {
            rows.push(("task", i.to_string()));
        }
        rows.push(("attempt", format!("{} of {}", t.attempt, st.spec.max_attempts)));
        if let Some(w) = &t.worker {
            rows.push(("worker", clean(w).into_owned()));
        }
        if let Some(c) = t.exit_code {
            rows.push(("exit code", c.to_string()));
        }
        if let Some(r) = &t.reason {
            rows.push(("reason", clean(r).into_owned()));
        }
        if let Some(x) = t.started_at {
            rows.push(("started", time(x)));
        }
        if let Some(x) = t.ended_at {
            rows.push(("ended", time(x)));
        }
        if let Some(ms) = t.runtime_ms {
            rows.push(("runtime", format_duration(std::time::Duration::from_millis(ms))));
        }
    } else {
        rows.push(("tasks", format!("{} ({})", s.tasks, counts_text(&s.counts))));
    }
    rows.push(("command", clean(&command_text(&st.spec.command)).into_owned()));
    if let Some(m) = st.spec.max_output {
        rows.push(("max output", format_size(m)));
    }
    if let Executor::Docker { image, network } = &st.spec.executor {
        rows.push(("image", clean(image).into_owned()));
        rows.push(("network", clean(network.as_deref().unwrap_or("none")).into_owned()));
    }
    if let Some(from) = label(st, LABEL_RESUMED_FROM) {
        rows.push(("resumed from", clean(from).into_owned()));
    }
    if let Some(image) = label(st, LABEL_FROZEN_IMAGE) {
        rows.push(("frozen into", format!("{} (filesystem and workspace; not process memory)", clean(image))));
    }
    rows.push(("owner", clean(&s.owner).into_owned()));
    rows.push(("submitted", time(s.submitted_at)));
    if let (Some(e), None) = (s.ended_at, &st.task) {
        rows.push(("ended", time(e)));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{}  {}\n", style.bold(&format!("{k:<9}")), v));
    }
    if !st.events.is_empty() {
        out.push('\n');
        let ev: Vec<Vec<String>> = st
            .events
            .iter()
            .map(|e| {
                vec![
                    time(e.time),
                    e.index.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                    style.state(e.state),
                    e.attempt.to_string(),
                    clean_or_dash(e.worker.as_deref()),
                    e.reason.as_deref().map(|r| clean(r).into_owned()).unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(style, &["TIME", "TASK", "STATE", "ATTEMPT", "WORKER", "REASON"], &ev));
    }
    out
}

/// Prints an answer for scripts (JSON, with `--json`) or for people (text); exit 0.
pub fn print<T: ?Sized>(json: bool, style: Style, answer: &T, as_json: fn(&T) -> Value, as_text: fn(Style, &T) -> String) -> Result<u8, Fail> {
    if json {
        out!("{}", as_json(answer))?;
    } else {
        crate::out::stdout(as_text(style, answer).as_bytes())?;
    }
    Ok(0)
}

pub fn list_text(style: Style, jobs: &[JobSummary]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let progress = if j.tasks == 1 { "1".to_string() } else { format!("{}/{}", j.counts.succeeded, j.tasks) };
            vec![
                j.id.short(),
                j.name.as_deref().map(|n| clean(n).into_owned()).unwrap_or_else(|| style.dim("-")),
                style.state(j.state),
                progress,
                clean(&j.owner).into_owned(),
                time(j.submitted_at),
                j.reason.as_deref().map(|r| clean(r).into_owned()).unwrap_or_default(),
            ]
        })
        .collect();
    table(style, &["ID", "NAME", "STATE", "TASKS", "OWNER", "SUBMITTED", "WAITING"], &rows)
}

pub fn workers_text(style: Style, ws: &[WorkerInfo]) -> String {
    let rows: Vec<Vec<String>> = ws
        .iter()
        .map(|w| {
            let state = match (w.connected, w.drained) {
                (true, false) => style.paint("32", "up"),
                (true, true) => style.paint("33", "draining"),
                (false, true) => style.dim("down, drained"),
                (false, false) => style.dim("down"),
            };
            vec![
                clean(&w.name).into_owned(),
                state,
                format!("{}/{}", w.running, w.slots),
                slot_states(&w.slot_states),
                clean(&w.pool).into_owned(),
                format!("{} cpu, {} MiB, {} gpu", w.host.cpus, w.host.mem_mib, w.host.gpus.len()),
                containment(style, &w.host.containment),
                w.last_heartbeat.map(time).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(style, &["NAME", "STATE", "LEASES/SLOTS", "SLOT STATES", "POOL", "HOST", "PROCESS JOBS", "LAST HEARTBEAT"], &rows)
}

/// How many slots are in each state, busiest first (`2 executing, 1 acquired, 1 available`).
fn slot_states(states: &[String]) -> String {
    if states.is_empty() {
        return "-".into();
    }
    let order = ["error", "executing", "acquired", "releasing", "available"];
    let mut parts = Vec::new();
    for o in order {
        let n = states.iter().filter(|s| s.split([' ', ':']).next() == Some(o)).count();
        if n > 0 {
            parts.push(format!("{n} {o}"));
        }
    }
    clean(&parts.join(", ")).into_owned()
}

/// How a worker contains its process jobs, in a word or two (`--json` has the whole).
fn containment(style: Style, c: &berth_shared::wire::Containment) -> String {
    if c.identity.is_empty() {
        return "-".into();
    }
    let mut gaps = Vec::new();
    if !c.separate_users {
        gaps.push("as the worker's user");
    }
    if !c.enforced {
        gaps.push("no cgroups");
    }
    if gaps.is_empty() {
        "contained".into()
    } else {
        style.paint("33", &format!("not contained: {}", gaps.join(", ")))
    }
}

pub fn images_text(style: Style, list: &[FrozenImage]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let job = match i.index {
                Some(n) => format!("{}:{n}", i.job.short()),
                None => i.job.short(),
            };
            vec![clean(&i.image).into_owned(), job, clean(&i.worker).into_owned(), clean(&i.owner).into_owned(), time(i.created_at)]
        })
        .collect();
    table(style, &["IMAGE", "FROZEN FROM", "WORKER", "OWNER", "FROZEN AT"], &rows)
}

pub fn budgets_text(style: Style, rows: &[berth_shared::wire::BudgetInfo]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|b| {
            vec![
                clean(&b.account).into_owned(),
                b.month.clone(),
                format!("${}", b.run_cap),
                format!("${}", b.month_cap),
                format!("${}", b.reserved),
                format!("${}", b.spent),
                format!("${}", (b.month_cap - b.reserved - b.spent).max(rust_decimal::Decimal::ZERO)),
            ]
        })
        .collect();
    table(style, &["ACCOUNT", "MONTH", "RUN CAP", "MONTH CAP", "RESERVED", "SPENT", "LEFT"], &rows)
}

/// What a store that cannot write means for the user, in one line (`None`: it writes).
pub fn store_warning(h: &CoordinatorHealth) -> Option<String> {
    let s = &h.store;
    if s.writable {
        return None;
    }
    let since = s.since.map(|t| format!(" since {}", time(t))).unwrap_or_default();
    let what = if s.disk_full { format!("the coordinator's disk is full{since}") } else { format!("the coordinator cannot write its store{since}") };
    Some(format!(
        "{what}: new jobs are refused, and running jobs' output and results wait on their workers until it can write again ({})",
        s.reason.as_deref().unwrap_or("no reason given")
    ))
}

/// `berth status` without a job: the coordinator's own state.
pub fn health_text(style: Style, h: &CoordinatorHealth) -> String {
    let store = match store_warning(h) {
        None => style.paint("32", "writable"),
        Some(w) => style.paint("31", &w),
    };
    let rows = [
        ("coordinator", h.coordinator.clone()),
        ("store", store),
        ("output cap", format!("{} per attempt, unless a job sets --max-output", format_size(h.default_max_output))),
    ];
    rows.iter().map(|(k, v)| format!("{}  {}\n", style.bold(&format!("{k:<11}")), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_visible_width() {
        let st = Style { color: true };
        let t = table(st, &["A", "B"], &[vec![st.state(JobState::Succeeded), "x".into()], vec!["q".into(), "y".into()]]);
        let plain: Vec<String> = t.lines().map(|l| l.replace("\x1b[32m", "").replace("\x1b[0m", "").replace("\x1b[1m", "")).collect();
        assert_eq!(plain[1].find('x'), plain[2].find('y'));
        let off = Style { color: false };
        assert!(!table(off, &["A"], &[vec![off.state(JobState::Failed)]]).contains('\x1b'));
    }

    #[test]
    fn long_cells_are_cut_with_an_ellipsis() {
        let off = Style { color: false };
        let t = table(off, &["NAME", "STATE"], &[vec!["n".repeat(1000), "queued".into()], vec!["short".into(), "running".into()]]);
        let widths: Vec<usize> = t.lines().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w <= MAX_CELL + 2 + "running".len()), "{t}");
        assert!(t.lines().nth(1).is_some_and(|l| l.contains(&format!("{}…", "n".repeat(MAX_CELL - 1)))), "{t}");
        // Cutting keeps colour codes whole and closes them.
        let on = Style { color: true };
        let c = cut(&on.paint("33", &"y".repeat(100)), 10);
        assert_eq!(c, format!("\x1b[33m{}…\x1b[0m", "y".repeat(9)));
        assert_eq!(cut("short", 10), "short");
    }

    #[test]
    fn user_text_is_escaped_in_listings() {
        let st = Style { color: false };
        assert_eq!(clean("a\x1b[2Jb\u{202e}"), "a\\x1b[2Jb\\u{202e}");
        let t = table(st, &["A", "B"], &[vec![clean("x\x07y").into_owned(), "z".into()]]);
        assert!(!t.contains('\x07') && t.contains("x\\x07y"), "{t:?}");
    }
}
