//! `berth`: the submit client. Parse flags, find the profile, call the coordinator;
//! exit codes follow DESIGN.md (0 ok, 2 usage, 3 refused, 4 unreachable, 5 not found).
//! Everything printed goes through `out!` and `note!` (a closed pipe ends a command
//! quietly), and user text through `show::clean`.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod dev;
mod out;
mod session;
mod show;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;

use berth::{api, copy, exit, json, spec};
use berth_shared::ids::{JobSelector, TaskRef};
use berth_shared::job::JobState;
use berth_shared::wire::{Request, Response};
use clap::{CommandFactory, Parser, Subcommand};

use crate::api::{answer, unexpected, Client};
use crate::exit::{Fail, EXIT_FAILURE, EXIT_USAGE};
use crate::out::{note, out};
use crate::show::Style;

#[derive(Parser)]
#[command(name = "berth", version, about = "Submit and follow batch jobs on a berth cluster")]
struct Cli {
    /// The profile to use (default: $BERTH_PROFILE, then $XDG_CONFIG_HOME/berth/profile.toml).
    #[arg(long, global = true)]
    profile: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

fn job_selector(s: &str) -> Result<JobSelector, String> {
    s.parse()
}

// Parsed once per run; boxing the submit flags would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Submit a job or an array: `berth submit [OPTIONS] -- CMD ARGS...` or `berth submit job.toml`.
    Submit(submit::SubmitArgs),
    /// Show a job (or JOB:INDEX, one task of an array) and its history; without JOB, the
    /// coordinator's own state (whether it can take new jobs, its default output cap).
    Status {
        /// The job: its id or a unique prefix, optionally :INDEX for one task of an array
        /// (without it: the coordinator's own state).
        #[arg(value_parser = job_selector)]
        job: Option<JobSelector>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, ...).
        #[arg(long, value_parser = |s: &str| s.parse::<JobState>())]
        state: Option<JobState>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a task's output (stdout to stdout, stderr to stderr).
    Logs {
        /// The job (or JOB:INDEX, one task of an array; an array alone shows its first task).
        #[arg(value_parser = job_selector)]
        job: JobSelector,
        /// Keep printing as the task prints, until it ends.
        #[arg(short, long)]
        follow: bool,
        /// Which attempt, from 1 (default: the latest).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        attempt: Option<u32>,
    },
    /// Cancel a job, or one task of an array (JOB:INDEX); running tasks are killed.
    Cancel {
        /// The job, or JOB:INDEX for one task of an array.
        #[arg(value_parser = job_selector)]
        job: JobSelector,
        /// Why (recorded in the job's history).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Approve a job waiting for approval (approver or admin); it is reserved then.
    Approve {
        /// The job waiting for approval.
        #[arg(value_parser = job_selector)]
        job: JobSelector,
        /// Why (recorded with the decision).
        #[arg(long)]
        reason: String,
    },
    /// Reject a job waiting for approval (approver or admin); it ends `rejected`.
    Reject {
        /// The job waiting for approval.
        #[arg(value_parser = job_selector)]
        job: JobSelector,
        /// Why (recorded with the decision).
        #[arg(long)]
        reason: String,
    },
    /// Spend caps per account: `budget set` (admin) and `budget show`.
    Budget {
        #[command(subcommand)]
        command: BudgetCmd,
    },
    /// List workers, or drain/undrain one.
    Workers {
        #[command(subcommand)]
        command: Option<WorkersCmd>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Freeze a running container job (or JOB:INDEX): stop it and commit its filesystem
    /// and workspace to an image. Process memory is not kept: a resumed job starts its
    /// command again from that state. Prints the image.
    Freeze {
        /// The running container job, or JOB:INDEX.
        #[arg(value_parser = job_selector)]
        job: JobSelector,
        /// The image's tag (default: the job's short id): the image is berth-frozen:TAG.
        #[arg(long, value_parser = |s: &str| berth_shared::job::validate_tag(s).map(|()| s.to_string()))]
        tag: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Submit a new job from a frozen job's image, with its command and resources (or
    /// the command after --cmd or --), linked to it. Prints the new job's id.
    Resume {
        /// The frozen job, or JOB:INDEX.
        #[arg(value_parser = job_selector)]
        job: JobSelector,
        /// Run this instead of the job's command (takes the rest of the line).
        #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "CMD")]
        cmd: Vec<String>,
        /// Wait for the new job and exit with its exit code.
        #[arg(long)]
        wait: bool,
        /// Stream the new job's output, then exit with its exit code.
        #[arg(long)]
        follow: bool,
        /// The command and its arguments, after `--` (as --cmd).
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Frozen images: list them, or remove one (`images rm IMAGE`).
    Images {
        #[command(subcommand)]
        command: Option<ImagesCmd>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sessions: a sandbox held open for many commands (`session open`, then `berth
    /// exec`, then `session close`).
    Session {
        #[command(subcommand)]
        command: session::SessionCmd,
    },
    /// Run a command in a session: its output streams live (stdout and stderr apart),
    /// and berth exits with its exit code (124 if it timed out).
    Exec(session::ExecArgs),
    /// Copy a file or directory into or out of a session's workspace (modes and
    /// symlinks kept): `berth cp PATH SID:DEST` or `berth cp SID:PATH DEST`.
    Cp {
        /// What to copy: a local path, or SID:PATH in a session's workspace.
        #[arg(value_parser = session::cp_side)]
        src: session::CpSide,
        /// Where to: SID:DEST in a session's workspace, or a local path (an existing
        /// directory receives the copy in it).
        #[arg(value_parser = session::cp_side)]
        dst: session::CpSide,
    },
    /// Print shell completions.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Run a coordinator and a local worker in the foreground.
    Dev(dev::DevArgs),
    /// The agent of a Docker session that `berth dev`'s in-process worker opened: its
    /// containers run this binary as their PID 1 (not for people).
    #[command(hide = true)]
    Agent {
        /// Where the agent listens (a unix socket in the session's directory).
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum BudgetCmd {
    /// Set an account's caps in USD: per run (one submission) and per calendar month (UTC).
    Set {
        /// The account.
        #[arg(long)]
        account: String,
        /// The most one run (one submission) may cost, in USD.
        #[arg(long, value_parser = parse_usd)]
        run: rust_decimal::Decimal,
        /// The most the account may spend per calendar month (UTC), in USD.
        #[arg(long, value_parser = parse_usd)]
        month: rust_decimal::Decimal,
    },
    /// Caps, reserved and spent this month, per account.
    Show {
        /// Only this account (a submitter sees only its own).
        #[arg(long)]
        account: Option<String>,
        /// Print JSON; amounts are strings, exact.
        #[arg(long)]
        json: bool,
    },
}

fn parse_usd(s: &str) -> Result<rust_decimal::Decimal, String> {
    let d: rust_decimal::Decimal = s.trim().trim_start_matches('$').parse().map_err(|_| format!("`{s}` is not an amount in USD"))?;
    if d.is_sign_negative() {
        return Err(format!("`{s}` is negative: a cap is zero or more"));
    }
    Ok(d)
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// Remove a frozen image from the engine of the worker that holds it.
    Rm {
        /// The image, as `berth images` lists it.
        #[arg(value_parser = |s: &str| berth_shared::job::validate_image(s).map(|()| s.to_string()))]
        image: String,
    },
}

#[derive(Subcommand)]
enum WorkersCmd {
    /// Stop new claims on a worker; running jobs finish.
    Drain {
        /// The worker's name, as `berth workers` lists it.
        name: String,
    },
    /// Let a drained worker claim again.
    Undrain {
        /// The worker's name, as `berth workers` lists it.
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
                let _ = e.print();
                return ExitCode::from(if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { EXIT_USAGE } else { 0 });
            }
            note!("error: {}", usage_error(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    berth_shared::logs::init("warn");
    match real_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) if f.quiet => ExitCode::from(f.code),
        Err(f) => {
            // The message may carry the coordinator's words and other users' text.
            note!("error: {}", show::clean(&f.message));
            ExitCode::from(f.code)
        }
    }
}

/// A clap error on one line: its message with what it lists (the arguments missing),
/// and the usage of the command it is about.
fn usage_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").trim_end();
    let listed: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
    let mut msg = if listed.is_empty() { first.to_string() } else { format!("{first} {}", listed.join(", ")) };
    match text.lines().find_map(|l| l.strip_prefix("Usage: ")) {
        Some(usage) => msg.push_str(&format!(" (usage: {}; see --help)", usage.trim())),
        None => msg.push_str(" (see `berth --help`)"),
    }
    show::clean(&msg).into_owned()
}

fn real_main(cli: Cli) -> Result<u8, Fail> {
    match cli.command {
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "berth", &mut script);
            out::stdout(&script)?;
            Ok(0)
        }
        Cmd::Dev(args) => dev::run(args),
        Cmd::Agent { socket } => berth_worker::agent::main(&socket).map(|()| 0).map_err(|e| Fail::new(EXIT_FAILURE, e)),
        command => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Fail::new(1, e.to_string()))?;
            rt.block_on(async move {
                let mut client = Client::connect(cli.profile.as_deref()).await?;
                let code = command_main(&mut client, command).await;
                client.close();
                code
            })
        }
    }
}

async fn command_main(client: &mut Client, command: Cmd) -> Result<u8, Fail> {
    let style = Style::detect();
    match command {
        Cmd::Submit(a) => submit::submit(client, &a, style).await,
        Cmd::Status { job: None, json } => {
            let h = client.ask(&Request::Health, answer!(Response::Health(h) => h)).await?;
            show::print(json, style, &h, show::health_json, show::health_text)
        }
        Cmd::Status { job: Some(job), json } => {
            let st = client.ask(&Request::Status { job }, answer!(Response::Status(st) => *st)).await?;
            warn_if_unwritable(client).await;
            show::print(json, style, &st, show::status_json, show::status_text)
        }
        Cmd::List { state, limit, json } => {
            let jobs = client.ask(&Request::List { state, limit }, answer!(Response::List(jobs) => jobs)).await?;
            show::print(json, style, jobs.as_slice(), show::list_json, show::list_text)
        }
        Cmd::Logs { job, follow, attempt } => {
            submit::print_logs(client, job, attempt, follow, None).await?;
            Ok(0)
        }
        Cmd::Cancel { job, reason } => {
            let (job, tasks) = client.ask(&Request::Cancel { job, reason }, answer!(Response::Cancelled { job, tasks } => (job, tasks))).await?;
            done(format!("cancelled {job} ({tasks} task{})", if tasks == 1 { "" } else { "s" }))
        }
        Cmd::Workers { command, json } => match command {
            None => {
                let ws = client.ask(&Request::Workers, answer!(Response::Workers(ws) => ws)).await?;
                warn_if_unwritable(client).await;
                show::print(json, style, ws.as_slice(), show::workers_json, show::workers_text)
            }
            Some(WorkersCmd::Drain { name }) | Some(WorkersCmd::Undrain { name }) if name.is_empty() => Err(Fail::usage("a worker name is required")),
            Some(c) => {
                let (worker, drain) = match c {
                    WorkersCmd::Drain { name } => (name, true),
                    WorkersCmd::Undrain { name } => (name, false),
                };
                let (worker, drained) =
                    client.ask(&Request::Drain { worker, drain }, answer!(Response::Drained { worker, drained } => (worker, drained))).await?;
                done(format!("{worker}: {}", if drained { "drained (running jobs finish, no new claims)" } else { "undrained" }))
            }
        },
        Cmd::Approve { job, reason } | Cmd::Reject { job, reason } if reason.trim().is_empty() => {
            let _ = job;
            Err(Fail::usage("--reason must not be empty: the decision is recorded with it"))
        }
        Cmd::Approve { job, reason } => decide(client, job, true, reason).await,
        Cmd::Reject { job, reason } => decide(client, job, false, reason).await,
        Cmd::Budget { command: BudgetCmd::Set { account, run, month } } => {
            let account = client.ask(&Request::SetBudget { account, run, month }, answer!(Response::BudgetSet { account } => account)).await?;
            done(format!("budget of {account}: ${run} per run, ${month} per month"))
        }
        Cmd::Budget { command: BudgetCmd::Show { account, json } } => {
            let rows = client.ask(&Request::Budgets { account }, answer!(Response::Budgets(rows) => rows)).await?;
            show::print(json, style, rows.as_slice(), show::budgets_json, show::budgets_text)
        }
        Cmd::Freeze { job, tag, json } => {
            let (task, image) =
                client.ask(&Request::Freeze { job, tag }, answer!(Response::Frozen { job, index, image } => (TaskRef { job, index }, image))).await?;
            if json {
                out!("{}", serde_json::json!({ "job": task.job.to_string(), "index": task.index, "image": image }))?;
            } else {
                out!("{}", show::clean(&image))?;
            }
            done(format!(
                "froze {task} into {image}: its filesystem and workspace are kept, not the memory of its processes; \
                 `berth resume {task}` starts its command again from that state"
            ))
        }
        Cmd::Resume { job, cmd, wait, follow, command } => {
            let command = match (cmd.is_empty(), command.is_empty()) {
                (false, false) => return Err(Fail::usage("give the new command either after --cmd or after --, not both")),
                (false, true) => Some(berth_shared::job::Command::Argv(cmd)),
                (true, false) => Some(berth_shared::job::Command::Argv(command)),
                (true, true) => None,
            };
            if command.as_ref().is_some_and(|c| matches!(c, berth_shared::job::Command::Argv(v) if v[0].is_empty())) {
                return Err(Fail::usage("the command's program name is empty"));
            }
            let key = uuid::Uuid::new_v4();
            let r = client.call_idempotent(&Request::Resume { job: job.clone(), command, idempotency_key: key }, std::time::Duration::from_secs(60)).await?;
            let Response::Submitted { job: new, .. } = r else { return Err(unexpected(r)) };
            if !wait && !follow {
                out!("{new}")?;
                return Ok(0);
            }
            note!("resumed {} as {new}", job.prefix);
            submit::wait(client, new, false, follow, style).await
        }
        Cmd::Images { command: None, json } => {
            let list = client.ask(&Request::Images, answer!(Response::Images(list) => list)).await?;
            show::print(json, style, list.as_slice(), show::images_json, show::images_text)
        }
        Cmd::Images { command: Some(ImagesCmd::Rm { image }), .. } => {
            let image = client.ask(&Request::RemoveImage { image }, answer!(Response::ImageRemoved { image } => image)).await?;
            done(format!("removed {image}"))
        }
        Cmd::Session { command } => session::command(client, command, style).await,
        Cmd::Exec(a) => session::exec(client, &a).await,
        Cmd::Cp { src, dst } => session::cp(client, src, dst).await,
        Cmd::Completions { .. } | Cmd::Dev(_) | Cmd::Agent { .. } => Ok(0),
    }
}

/// Says on stderr when the coordinator's store cannot write (its disk is full): asked
/// after the command's own answer, so a coordinator that does not know the question
/// costs nothing.
async fn warn_if_unwritable(client: &Client) {
    if let Ok(Response::Health(h)) = client.call(&Request::Health).await {
        if let Some(w) = show::store_warning(&h) {
            note!("warning: {}", show::clean(&w));
        }
    }
}

/// A command that changed something: what it did, on stderr (stdout stays for answers
/// a script reads), and success.
fn done(what: String) -> Result<u8, Fail> {
    note!("{}", show::clean(&what));
    Ok(0)
}

async fn decide(client: &mut Client, job: JobSelector, approve: bool, reason: String) -> Result<u8, Fail> {
    let (job, state, tasks) =
        client.ask(&Request::Decide { job, approve, reason }, answer!(Response::Decided { job, state, tasks } => (job, state, tasks))).await?;
    done(format!("job {job}: {} ({tasks} tasks {state})", if approve { "approved" } else { "rejected" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and argument of every command says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        let missing = berth_shared::cli::arguments_without_help(&Cli::command(), "berth");
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn usage_errors_are_one_line_naming_what_is_missing() {
        let e = Cli::try_parse_from(["berth", "approve"]).err().map(|e| usage_error(&e)).unwrap_or_default();
        assert!(!e.contains('\n') && e.contains("--reason") && e.contains("<JOB>") && e.contains("usage: berth approve"), "{e}");
        let e = Cli::try_parse_from(["berth", "list", "--nope"]).err().map(|e| usage_error(&e)).unwrap_or_default();
        assert!(!e.contains('\n') && e.contains("--nope"), "{e}");
    }
}
