//! The berth client library: where the profile is and the QUIC connection to a
//! coordinator with its requests (`api`), copies in and out of a session's workspace
//! (`copy`), what a failure means as an exit code (`exit`), answers as JSON with stable
//! field names (`json`), and a session's spec from its options (`spec`). The `berth`
//! binary and the Python bindings (`python/`) are both built on it, so the wire
//! protocol, TLS and profile lookup have one implementation.

pub mod api;
pub mod copy;
pub mod exit;
pub mod json;
pub mod spec;
