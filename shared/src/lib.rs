//! berth-shared: the domain types, wire protocol, codec, TLS helpers and config types
//! that the coordinator, the worker and the client agree on. No I/O policy, no actors.

pub mod archive;
pub mod cli;
pub mod codec;
pub mod dial;
pub mod duration;
pub mod ids;
pub mod job;
pub mod jobfile;
pub mod logs;
pub mod profile;
pub mod resources;
pub mod session;
pub mod text;
pub mod tls;
pub mod wire;

pub use ids::{JobId, LeaseId};
pub use job::{JobSpec, JobState};

/// The software version every binary reports in its hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
