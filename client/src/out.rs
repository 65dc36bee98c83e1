//! What the client writes: answers on stdout through `out!`, where a reader that went
//! away (`berth list | head -1`) ends the command quietly, with exit 0, instead of a
//! panic; notes on stderr through `note!`, which never fails a command.

use std::io::Write;

use crate::exit::{Fail, EXIT_FAILURE};

/// Writes `bytes` to stdout and flushes them. A closed pipe is `Fail::quiet`; any other
/// error fails the command.
pub fn stdout(bytes: &[u8]) -> Result<(), Fail> {
    let mut w = std::io::stdout().lock();
    w.write_all(bytes).and_then(|()| w.flush()).map_err(|e| failed("stdout", e))
}

/// Writes a job's stderr output to ours, as `stdout` does.
pub fn stderr(bytes: &[u8]) -> Result<(), Fail> {
    let mut w = std::io::stderr().lock();
    w.write_all(bytes).and_then(|()| w.flush()).map_err(|e| failed("stderr", e))
}

fn failed(what: &str, e: std::io::Error) -> Fail {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Fail::quiet()
    } else {
        Fail::new(EXIT_FAILURE, format!("cannot write to {what}: {e}"))
    }
}

/// A line on stderr for the person at the terminal; a stderr nobody reads is no failure.
pub fn note_line(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `out!(...)`: a line on stdout (as `println!`), a `Result` to pass on with `?`.
macro_rules! out {
    ($($arg:tt)*) => {
        crate::out::stdout(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}

/// `note!(...)`: a line on stderr (as `eprintln!`) that cannot fail.
macro_rules! note {
    ($($arg:tt)*) => {
        crate::out::note_line(format_args!($($arg)*))
    };
}

pub(crate) use {note, out};
