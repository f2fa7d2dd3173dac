//! Raft glue: the type configuration, the sled store, the NATS network client and the RPC
//! server. Membership changes live in `node::membership`, next to the commands that drive them.

pub mod election;
pub mod network;
pub mod read;
pub mod server;
pub mod snapshot_files;
pub mod snapshots;
pub mod store;
pub mod typ;
