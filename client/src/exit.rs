//! Exit codes (DESIGN.md) and the error that carries one.

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_REFUSED: u8 = 3;
pub const EXIT_AUTH: u8 = 4;
pub const EXIT_NOT_FOUND: u8 = 5;

/// A failure with the exit code it maps to and a one-line message.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub message: String,
    /// The coordinator was lost mid-request: an idempotent request may be sent again.
    pub lost: bool,
    /// Nothing to say: whoever read the output has gone (a closed pipe).
    pub quiet: bool,
}

impl Fail {
    pub fn new(code: u8, message: impl Into<String>) -> Fail {
        Fail { code, message: message.into(), lost: false, quiet: false }
    }
    /// The connection to the coordinator broke (or timed out) during a request.
    pub fn lost(message: impl Into<String>) -> Fail {
        Fail { code: EXIT_AUTH, message: message.into(), lost: true, quiet: false }
    }
    pub fn usage(message: impl Into<String>) -> Fail {
        Fail::new(EXIT_USAGE, message)
    }
    /// Stdout's reader went away (`berth list | head -1`): stop and exit 0, saying nothing.
    pub fn quiet() -> Fail {
        Fail { code: 0, message: String::new(), lost: false, quiet: true }
    }
}
