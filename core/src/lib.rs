//! Warden's pure core: everything that decides, and nothing that does I/O.
//!
//! - `registry`: the replicated state machine (`Registry::apply`), its records and commands.
//! - `placement`: where agents go, and rebalancing.
//! - `supervision`: OTP's restart strategies as a planner.
//! - `host_plan`: what a node does with its local agents.
//! - `limits`: every limit, with its reason.
//! - `error`: the rejection a command gets (`WireError`, with its `ErrorCode`).
//!
//! The crate depends on no runtime, network or storage crate (no tokio, async-nats or sled):
//! time, ids and randomness are arguments, so every replica computes the same result from the
//! same log, and every rule is tested with plain data.

pub mod base64;
pub mod error;
pub mod host_plan;
pub mod limits;
pub mod names;
pub mod placement;
pub mod registry;
pub mod supervision;
