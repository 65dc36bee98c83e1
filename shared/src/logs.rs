//! What every berth binary does with its own diagnostics: tracing to stderr, filtered
//! by `$BERTH_LOG`, coloured only on a terminal (and never with `NO_COLOR`); and errors
//! printed as one line with their causes.

use std::io::IsTerminal;

/// Starts tracing to stderr; `default` is the filter when `$BERTH_LOG` is unset.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| default.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
}

/// An error and its sources on one line: `outer: cause: root cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The end of a binary's `main`: success exits 0; an error is printed as one
/// `error: …` line and exits with its code (2 usage, 1 failure, or the binary's own).
pub fn exit(result: Result<(), (u8, impl std::fmt::Display)>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(code)
        }
    }
}
