//! Warden: a distributed supervisor for long-running agents.
//!
//! A cluster is 1..N nodes connected to NATS. The nodes keep a replicated registry by running
//! Raft (openraft) with its log and state machine in sled, and answer commands published on
//! NATS subjects. `ARCHITECTURE.md` at the top of the repository has the codemap and the
//! invariants; `docs/protocol.md` has the wire contract.

pub mod agent;
pub mod auth;
pub mod bench;
pub mod bus;
pub mod client;
pub mod command;
pub mod config;
pub mod ctl;
pub mod events;
pub mod faults;
pub mod history;
pub mod inputs;
pub mod metrics;
pub mod netfault;
pub mod node;
pub mod peers;
pub mod procfs;
pub mod protocol;
pub mod raft;
pub mod retry;
pub mod subjects;
pub mod tls;
pub mod traces;
pub mod up;

pub use warden_core::{base64, limits, names, placement, registry, supervision};
