//! `berth session open|close|list|status|logs` and `berth exec`: a leased sandbox
//! opened once, many commands run in it, closed. Opening prints the session id alone
//! on stdout (once the sandbox is ready), so a script can capture it; `berth exec`
//! exits with its command's exit code.

use std::time::Duration;

use berth_shared::codec::write_frame;
use berth_shared::duration::{format_duration, parse_duration, parse_size_mib};
use berth_shared::ids::JobSelector;
use berth_shared::job::{Command, JobSpec};
use berth_shared::session::{exit_code_of, ExecEnd, ExecSpec};
use berth_shared::wire::{OutStream, Request, Response, SessionStatus, SessionSummary, StdinFrame};
use serde_json::json;

use crate::api::{answer, unexpected, Client};
use crate::copy::{copy_in, copy_out};
use crate::exit::{Fail, EXIT_FAILURE};
use crate::json::{held, session_list_json as list_json, session_status_json as status_json};
use crate::out::{note, out};
use crate::show::{self, Style};
use crate::submit::{parse_cpus, parse_kv};

fn job_selector(s: &str) -> Result<JobSelector, String> {
    let sel: JobSelector = s.parse()?;
    if let Some(i) = sel.index {
        return Err(format!("`{s}`: a session has no :{i}; give its id"));
    }
    Ok(sel)
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}` must be more than zero"));
    }
    Ok(d)
}

// Parsed once per run; boxing the open flags would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
pub enum SessionCmd {
    /// Open a session: a slot (and its workspace) or a container held for many
    /// `berth exec`s. Prints its id once it is ready.
    Open(OpenArgs),
    /// Close a session (idempotent): its sandbox and everything running in it end, the
    /// time held is charged and the rest of its reservation released.
    Close {
        /// The session: its id or a unique prefix.
        #[arg(value_parser = job_selector)]
        session: JobSelector,
        /// Download the workspace into DIR first (made if missing, merged into if not).
        #[arg(long, value_name = "DIR")]
        sync_out: Option<std::path::PathBuf>,
    },
    /// Freeze a container session: commit its filesystem and workspace to an image
    /// (`berth-frozen:TAG`); the session ends. `session open --from-frozen TAG` starts
    /// a new one from it.
    Freeze {
        /// The session: its id or a unique prefix.
        #[arg(value_parser = job_selector)]
        session: JobSelector,
        /// The image's tag (default: the session's short id).
        #[arg(long, value_parser = |s: &str| berth_shared::job::validate_tag(s).map(|()| s.to_string()))]
        tag: Option<String>,
    },
    /// List your sessions, newest first.
    List {
        /// At most this many sessions.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a session: its state, worker, execs, time held and money.
    Status {
        /// The session: its id or a unique prefix.
        #[arg(value_parser = job_selector)]
        session: JobSelector,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print an exec's recorded output (stdout to stdout, stderr to stderr).
    Logs {
        /// The session: its id or a unique prefix.
        #[arg(value_parser = job_selector)]
        session: JobSelector,
        /// Which exec, from 1 (default: the latest).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        exec: Option<u32>,
        /// Keep printing until the exec ends; then exit with its exit code.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct OpenArgs {
    /// A name shown in listings.
    #[arg(long)]
    pub name: Option<String>,
    /// Hold one container of this image for the session's life (on a worker offering
    /// the docker executor); without it, a process slot and its workspace.
    #[arg(long, value_parser = |s: &str| berth_shared::job::validate_image(s).map(|()| s.to_string()))]
    pub image: Option<String>,
    /// Start from a frozen job's or session's image (`berth-frozen:TAG`).
    #[arg(long, value_name = "TAG", conflicts_with = "image", value_parser = |s: &str| berth_shared::job::validate_tag(s).map(|()| s.to_string()))]
    pub from_frozen: Option<String>,
    /// Upload DIR's contents into the workspace before the id is printed.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<std::path::PathBuf>,
    /// The container's network: `none` (the default), `bridge` or a network's name.
    #[arg(long, value_parser = |s: &str| berth_shared::job::validate_network(s).map(|()| s.to_string()))]
    pub network: Option<String>,
    /// CPUs set aside for the session, e.g. 2 or 0.5.
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// Memory, e.g. 512M or 2G.
    #[arg(long, value_parser = parse_size_mib)]
    pub mem: Option<u64>,
    /// GPUs (whole devices); the session sees only the ones it was given.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub gpus: Option<u32>,
    /// Only GPUs whose model name contains this (case-insensitive).
    #[arg(long)]
    pub gpu_model: Option<String>,
    /// Only GPUs with at least this much memory, e.g. 40G.
    #[arg(long, value_parser = parse_size_mib)]
    pub min_vram: Option<u64>,
    /// Only workers with this label KEY=VALUE (repeatable).
    #[arg(long = "label-constraint", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub constraints: Vec<(String, String)>,
    /// Only in these pools (repeatable).
    #[arg(long = "pool")]
    pub pools: Vec<String>,
    /// The account charged and capped (default: your own user).
    #[arg(long)]
    pub account: Option<String>,
    /// Set KEY=VALUE in every exec's environment (repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Set NAME in every exec from the worker's secret VAR (repeatable).
    #[arg(long = "secret", value_parser = parse_kv, value_name = "NAME=VAR")]
    pub secrets: Vec<(String, String)>,
    /// Close the session after this long without an exec running (default 15m).
    #[arg(long, value_parser = positive_duration)]
    pub idle_ttl: Option<Duration>,
    /// Close the session this long after it opened, whatever runs (default 4h); what
    /// opening reserves is this time at the pool's rates.
    #[arg(long, value_parser = positive_duration)]
    pub max_lifetime: Option<Duration>,
    /// Print JSON (the id, the worker).
    #[arg(long)]
    pub json: bool,
    /// The open's idempotency key (default: a new random one).
    #[arg(long, value_name = "UUID")]
    pub idempotency_key: Option<uuid::Uuid>,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The session: its id or a unique prefix.
    #[arg(value_parser = job_selector)]
    pub session: JobSelector,
    /// Set KEY=VALUE in the command's environment (repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Kill the command (its whole process tree, nothing else) after this long; exit 124.
    #[arg(long, value_parser = positive_duration)]
    pub timeout: Option<Duration>,
    /// The working directory, relative to the workspace.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Forward stdin to the command (otherwise it reads nothing).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Start the command and print its exec number; `berth session logs SID --exec N -f` follows it.
    #[arg(long)]
    pub detach: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD", required = true)]
    pub command: Vec<String>,
}

/// The session's spec from the flags.
pub fn open_spec(a: &OpenArgs) -> Result<JobSpec, Fail> {
    let o = crate::spec::SessionOptions {
        name: a.name.clone(),
        image: a.image.clone(),
        from_frozen: a.from_frozen.clone(),
        network: a.network.clone(),
        cpus: a.cpus,
        mem_mib: a.mem,
        gpus: a.gpus,
        gpu_model: a.gpu_model.clone(),
        min_vram_mib: a.min_vram,
        constraints: a.constraints.clone(),
        pools: a.pools.clone(),
        account: a.account.clone(),
        env: a.env.clone(),
        secrets: a.secrets.clone(),
        idle_ttl: a.idle_ttl,
        max_lifetime: a.max_lifetime,
    };
    crate::spec::session_spec(&o)
}

pub async fn open(client: &mut Client, a: &OpenArgs) -> Result<u8, Fail> {
    let spec = open_spec(a)?;
    let key = a.idempotency_key.unwrap_or_else(uuid::Uuid::new_v4);
    let mut r = client.open(&Request::OpenSession { spec, idempotency_key: key }).await?;
    let mut id = None;
    loop {
        match r.next().await {
            Ok(Some(Response::Submitted { job, warning, .. })) => {
                id = Some(job);
                if let Some(w) = warning {
                    note!("warning: session {job} waits for now: {}", show::clean(&w));
                }
            }
            Ok(Some(Response::SessionReady { session, worker })) => {
                if let Some(dir) = &a.workdir {
                    let sel = JobSelector { prefix: session.to_string(), index: None };
                    let mut from = dir.clone().into_os_string();
                    from.push("/.");
                    if let Err(mut f) = copy_in(client, std::path::Path::new(&from), sel, ".").await {
                        f.message = format!("--workdir {}: {} (session {session} is open: `berth session close {session}` ends it)", dir.display(), f.message);
                        return Err(f);
                    }
                }
                if a.json {
                    out!("{}", json!({ "id": session.to_string(), "worker": worker }))?;
                } else {
                    out!("{session}")?;
                }
                return Ok(0);
            }
            Ok(Some(other)) => return Err(unexpected(other)),
            Ok(None) => return Err(Fail::new(EXIT_FAILURE, "the coordinator ended the answer before the session was ready")),
            Err(mut f) => {
                if let Some(id) = id {
                    f.message = format!("{} (session {id}: `berth session close {id}` ends it)", f.message);
                }
                return Err(f);
            }
        }
    }
}

pub async fn exec(client: &mut Client, a: &ExecArgs) -> Result<u8, Fail> {
    let spec =
        ExecSpec { argv: a.command.clone(), env: a.env.clone(), timeout_ms: a.timeout.map(|d| d.as_millis() as u64), cwd: a.cwd.clone(), stdin: a.interactive };
    spec.validate().map_err(Fail::usage)?;
    if a.detach && a.interactive {
        return Err(Fail::usage("a detached exec reads no stdin: drop -i or --detach"));
    }
    let req = Request::Exec { session: a.session.clone(), exec: spec, detach: a.detach };
    let (mut r, input) = client.open_with_input(&req).await?;
    if let Some(mut send) = input.filter(|_| a.interactive) {
        // Stdin is read on a thread of its own (a terminal read blocks) and sent in pieces.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                if write_frame(&mut send, &StdinFrame::Data(data)).await.is_err() {
                    return;
                }
            }
            let _ = write_frame(&mut send, &StdinFrame::End).await;
            let _ = send.finish();
        });
    }
    let mut exec = None;
    // Chunks printed per stream: where to pick up after a lost connection.
    let mut printed = (0u64, 0u64);
    loop {
        let next = match r.next().await {
            Ok(n) => n,
            Err(f) if f.lost && exec.is_some() && !a.detach => {
                // The coordinator went away (a restart, a blip): the exec runs on, and
                // its output is kept; follow it again from where this left off.
                let n = exec.unwrap_or_default();
                note!("lost the coordinator while following exec {n}; reconnecting");
                client.reconnect(Duration::from_secs(120)).await?;
                r = client.open(&Request::ExecOutput { session: a.session.clone(), exec: n, follow: true, after: printed }).await?;
                continue;
            }
            Err(f) => return Err(f),
        };
        match next {
            Some(Response::ExecStarted { exec: n }) => {
                exec = Some(n);
                if a.detach {
                    out!("{n}")?;
                }
            }
            Some(Response::Output { stream, data }) => {
                match stream {
                    OutStream::Stdout => printed.0 += 1,
                    OutStream::Stderr => printed.1 += 1,
                }
                write_output(stream, &data)?
            }
            Some(Response::ExecEnded(end)) => return Ok(ended(&end)),
            Some(Response::End) if a.detach => return Ok(0),
            Some(other) => return Err(unexpected(other)),
            None => {
                let which = exec.map(|n| format!(" (exec {n}: `berth session logs {} --exec {n}` shows it)", a.session.prefix)).unwrap_or_default();
                return Err(Fail::lost(format!("the coordinator ended the exec's stream before it ended{which}")));
            }
        }
    }
}

fn write_output(stream: OutStream, data: &[u8]) -> Result<(), Fail> {
    match stream {
        OutStream::Stdout => crate::out::stdout(data),
        OutStream::Stderr => crate::out::stderr(data),
    }
}

/// The exit code for an ended exec, with why on stderr when it did not simply exit.
fn ended(end: &ExecEnd) -> u8 {
    // Set only when it did not simply exit: it timed out, or could not run.
    if let Some(why) = &end.reason {
        note!("exec {}: {}", end.exec, show::clean(why));
    }
    exit_code_of(end).clamp(0, 255) as u8
}

pub async fn command(client: &mut Client, cmd: SessionCmd, style: Style) -> Result<u8, Fail> {
    match cmd {
        SessionCmd::Open(a) => open(client, &a).await,
        SessionCmd::Freeze { session, tag } => {
            let image = client.ask(&Request::Freeze { job: session, tag }, answer!(Response::Frozen { image, .. } => image)).await?;
            out!("{}", show::clean(&image))?;
            note!("froze the session into {image} (its filesystem and workspace; not the memory of its processes); it has ended");
            Ok(0)
        }
        SessionCmd::Close { session, sync_out } => {
            if let Some(dir) = &sync_out {
                let s = copy_out(client, session.clone(), ".", dir).await.map_err(|mut f| {
                    f.message = format!("--sync-out {}: {} (the session was left open)", dir.display(), f.message);
                    f
                })?;
                note!("downloaded the workspace into {}: {} files, {} bytes", dir.display(), s.files, s.bytes);
            }
            let (id, already) =
                client.ask(&Request::CloseSession { session }, answer!(Response::SessionClosed { session, already } => (session, already))).await?;
            note!("{}", if already { format!("session {id} had already ended") } else { format!("closed session {id}") });
            Ok(0)
        }
        SessionCmd::List { limit, json } => {
            let rows = client.ask(&Request::Sessions { limit }, answer!(Response::Sessions(rows) => rows)).await?;
            show::print(json, style, rows.as_slice(), list_json, list_text)
        }
        SessionCmd::Status { session, json } => {
            let st = client.ask(&Request::SessionStatus { session }, answer!(Response::Session(st) => *st)).await?;
            show::print(json, style, &st, status_json, status_text)
        }
        SessionCmd::Logs { session, exec, follow } => {
            let exec = match exec {
                Some(n) => n,
                None => {
                    let st = client.ask(&Request::SessionStatus { session: session.clone() }, answer!(Response::Session(st) => *st)).await?;
                    match st.execs.last() {
                        Some(e) => e.exec,
                        None => return Err(Fail::new(crate::exit::EXIT_NOT_FOUND, format!("session {} has run no exec yet", st.job.summary.id))),
                    }
                }
            };
            let mut r = client.open(&Request::ExecOutput { session, exec, follow, after: (0, 0) }).await?;
            loop {
                match r.next().await? {
                    Some(Response::Output { stream, data }) => write_output(stream, &data)?,
                    Some(Response::ExecEnded(end)) => return Ok(if follow { ended(&end) } else { 0 }),
                    Some(Response::End) | None => return Ok(0),
                    Some(other) => return Err(unexpected(other)),
                }
            }
        }
    }
}

pub fn status_text(style: Style, st: &SessionStatus) -> String {
    let t = st.job.task.as_ref();
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<10} {v}\n"));
    line(&mut s, "session", st.job.summary.id.to_string());
    if let Some(n) = &st.job.summary.name {
        line(&mut s, "name", show::clean(n).into_owned());
    }
    line(&mut s, "state", st.state.as_str().to_string());
    line(&mut s, "owner", show::clean(&st.job.summary.owner).into_owned());
    if let Some(w) = t.and_then(|t| t.worker.as_deref()) {
        line(&mut s, "worker", show::clean(w).into_owned());
    }
    if let Some(d) = held(st) {
        line(&mut s, "held", format_duration(Duration::from_secs(d.as_secs())));
    }
    if let Some(r) = t.and_then(|t| t.reason.as_deref()) {
        line(&mut s, "reason", show::clean(r).into_owned());
    }
    line(&mut s, "money", format!("${} reserved, ${} spent", st.reserved.normalize(), st.spent.normalize()));
    if !st.execs.is_empty() {
        s.push('\n');
        let rows: Vec<Vec<String>> = st
            .execs
            .iter()
            .map(|e| {
                vec![
                    e.exec.to_string(),
                    show::time(e.started_at),
                    e.ended_at.map(show::time).unwrap_or_else(|| "running".into()),
                    if e.timed_out { "timeout".into() } else { e.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()) },
                    show::clean(&shell_words(&e.argv)).into_owned(),
                ]
            })
            .collect();
        s.push_str(&show::table(style, &["EXEC", "STARTED", "ENDED", "EXIT", "COMMAND"], &rows));
    }
    s
}

fn shell_words(argv: &[String]) -> String {
    show::command_text(&Command::Argv(argv.to_vec()))
}

pub fn list_text(style: Style, rows: &[SessionSummary]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.short(),
                r.state.as_str().to_string(),
                show::clean(r.worker.as_deref().unwrap_or("-")).into_owned(),
                r.execs.to_string(),
                show::time(r.opened_at),
                show::clean(r.name.as_deref().unwrap_or("")).into_owned(),
            ]
        })
        .collect();
    show::table(style, &["SESSION", "STATE", "WORKER", "EXECS", "OPENED", "NAME"], &rows)
}

/// One side of `berth cp`: a local path, or `SID:PATH` in a session's workspace (a
/// side whose part before the first `:` has no `/`, as `docker cp` reads it; write a
/// local path with a `:` as `./a:b`).
#[derive(Clone, Debug)]
pub enum CpSide {
    Local(std::path::PathBuf),
    Session(JobSelector, String),
}

pub fn cp_side(s: &str) -> Result<CpSide, String> {
    match s.split_once(':') {
        Some((sid, path)) if !sid.is_empty() && !sid.contains('/') => {
            let sel = job_selector(sid)?;
            let path = if path.is_empty() { ".".to_string() } else { path.to_string() };
            berth_shared::session::check_relative("the session path", &path)?;
            Ok(CpSide::Session(sel, path))
        }
        _ if s.is_empty() => Err("an empty path".into()),
        _ => Ok(CpSide::Local(s.into())),
    }
}

/// `berth cp`: copies a file or directory (modes and symlinks kept) into or out of a
/// session's workspace.
pub async fn cp(client: &mut Client, src: CpSide, dst: CpSide) -> Result<u8, Fail> {
    match (src, dst) {
        (CpSide::Local(from), CpSide::Session(session, dest)) => {
            let s = copy_in(client, &from, session, &dest).await?;
            note!("copied {} files, {} directories, {} links ({} bytes)", s.0, s.1, s.2, s.3);
            Ok(0)
        }
        (CpSide::Session(session, path), CpSide::Local(to)) => {
            let s = copy_out(client, session, &path, &to).await?;
            note!("copied {} files, {} directories, {} links ({} bytes)", s.files, s.dirs, s.symlinks, s.bytes);
            Ok(0)
        }
        (CpSide::Local(_), CpSide::Local(_)) => Err(Fail::usage("one side of `berth cp` is a session's: SID:PATH")),
        (CpSide::Session(..), CpSide::Session(..)) => Err(Fail::usage("copy between two sessions through a local directory: one side of `berth cp` is local")),
    }
}
