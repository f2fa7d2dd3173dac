//! A peer's Raft RPC request body, of each kind a node answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden::inputs::RaftRpc;

fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else { return };
    let rpc = match pick % 4 {
        0 => RaftRpc::AppendEntries,
        1 => RaftRpc::Vote,
        2 => RaftRpc::InstallSnapshot,
        _ => RaftRpc::PreVote,
    };
    let _ = warden::inputs::raft_rpc(rpc, body);
});
