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
}

impl Fail {
    pub fn new(code: u8, message: impl Into<String>) -> Fail {
        Fail { code, message: message.into(), lost: false }
    }
    /// The connection to the coordinator broke (or timed out) during a request.
    pub fn lost(message: impl Into<String>) -> Fail {
        Fail { code: EXIT_AUTH, message: message.into(), lost: true }
    }
    pub fn usage(message: impl Into<String>) -> Fail {
        Fail::new(EXIT_USAGE, message)
    }
}
