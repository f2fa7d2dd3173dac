//! Integration tests: real `nats-server` processes, real nodes (in-process for the fast tests,
//! separate OS processes for cluster behaviour), real sled directories.

mod agents;
mod cluster;
mod commands;
mod figures;
mod history;
mod metrics;
mod partition;
mod placement;
mod scale;
mod security;
mod support;
mod traces;
mod transfer;
