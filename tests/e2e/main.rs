//! End-to-end tests: the real `berth-coordinator`, `berth-worker` and `berth`
//! binaries on loopback, used as a person would. One test binary, modules inside.

mod bad_input;
mod budget;
mod cli;
mod contain;
mod disk;
mod docker;
mod docker_sessions;
mod drain;
mod flood;
mod gpus;
mod identity;
mod jobs;
mod leases;
mod partition;
mod postgres;
mod security;
mod sessions;
