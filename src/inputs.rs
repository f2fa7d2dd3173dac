//! Every decoder a node runs on bytes it did not make, one function each: clients' commands,
//! peers' forward batches and Raft RPCs, and the log entries and snapshots it reads back. Each
//! is the code the node runs, not a copy; the fuzz targets in `fuzz/` drive them with
//! arbitrary bytes. None may panic, and none accepts what another would refuse to read back:
//! every one bounds its nesting (`protocol::from_msgpack`, `protocol::body_from_msgpack`).

use crate::command::Command;
use crate::protocol::{Encoding, WireError};
use crate::raft::typ::{AppendEntriesRequest, Entry, SnapshotChunk, VoteRequest};
use crate::registry::Registry;

pub use crate::node::{ForwardBatch, Request};
pub use rmp_serde::decode::Error as DecodeError;

/// A client's command `name` with its `Content-Type` header and body, as `node::dispatch`
/// parses it: the encoding detected, the fields decoded and validated.
pub fn command(name: &str, content_type: Option<&str>, body: &[u8]) -> Result<Command, WireError> {
    let enc = Encoding::detect(content_type, body)?;
    Command::parse(name, enc, body)
}

/// A peer's batch of forwarded writes; each item is then a `command`.
pub fn forward_batch(body: &[u8]) -> Result<ForwardBatch, DecodeError> {
    crate::protocol::from_msgpack(body)
}

/// The Raft RPCs a node answers.
#[derive(Debug, Clone, Copy)]
pub enum RaftRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    PreVote,
}

/// A peer's pre-vote (`raft::election`), as `raft::server` decodes it.
pub fn pre_vote(body: &[u8]) -> Result<crate::raft::election::PreVote, DecodeError> {
    crate::protocol::from_msgpack(body)
}

/// A peer's Raft RPC request, decoded as `raft::server` decodes it.
pub fn raft_rpc(rpc: RaftRpc, body: &[u8]) -> Result<(), DecodeError> {
    use crate::protocol::from_msgpack;
    match rpc {
        RaftRpc::AppendEntries => from_msgpack::<AppendEntriesRequest>(body).map(drop),
        RaftRpc::Vote => from_msgpack::<VoteRequest>(body).map(drop),
        RaftRpc::InstallSnapshot => from_msgpack::<SnapshotChunk>(body).map(drop),
        RaftRpc::PreVote => pre_vote(body).map(drop),
    }
}

/// A Raft log entry as `raft::store` reads it back from sled.
pub fn log_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    crate::protocol::from_msgpack(bytes)
}

/// A snapshot's registry, as a node loads it from disk or installs it from the leader.
pub fn snapshot(bytes: &[u8]) -> Result<Registry, String> {
    crate::raft::store::registry_from_reader(bytes)
}

/// The fuzz targets' seed corpus (`fuzz/corpus/<target>/seed-*`): valid inputs of today's
/// wire format, from which the fuzzer mutates. The test checks that every seed still decodes
/// as the node decodes it, so a change of format shows here; `WARDEN_WRITE_FUZZ_SEEDS=1`
/// writes them anew.
#[cfg(test)]
mod seeds {
    use std::path::PathBuf;

    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};
    use serde_json::json;

    use super::*;
    use crate::registry::{Proposal, RegistryCmd, Stamped, REGISTRY_VERSION};

    fn stamped(n: u128, cmd: serde_json::Value) -> Stamped {
        Stamped {
            id: uuid::Uuid::from_u128(n),
            request_id: Some(format!("r{n}")),
            cmd: serde_json::from_value::<RegistryCmd>(cmd).unwrap(),
            fingerprint: None,
        }
    }

    fn entry(index: u64) -> Entry {
        let time = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let items = vec![
            stamped(
                1,
                json!({"type": "register_node", "node_id": 1, "name": "n1",
                "labels": {"zone": "z1"}, "kinds": ["counter"]}),
            ),
            stamped(2, json!({"type": "create_supervisor", "name": "s1"})),
            stamped(
                3,
                json!({"type": "spawn_agent", "supervisor": "s1", "name": "a1",
                "kind": "counter", "config": {"n": 1}}),
            ),
        ];
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                v: REGISTRY_VERSION,
                time,
                items,
            }),
        }
    }

    fn msgpack<T: serde::Serialize>(v: &T) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    /// Command bodies: `[pick, content type, body...]` as the `command` target reads them.
    fn commands() -> Vec<Vec<u8>> {
        let bodies = [
            (
                "spawn_agent",
                json!({"name": "a1", "kind": "counter", "config": {"n": [1, 2]}}),
            ),
            (
                "create_supervisor",
                json!({"name": "s1", "strategy": "one_for_all"}),
            ),
            (
                "spawn_agent_group",
                json!({"name": "g", "count": 3,
                "template": {"kind": "echo"}}),
            ),
            ("find_agents", json!({"tag": "t", "limit": 10})),
            ("stop_agent", json!({"agent": "a1"})),
            ("heartbeat", json!({"node_id": 1})),
            (
                "import_subtree",
                json!({"prefix": "x-", "document": {"format": "warden.subtree", "version": 1,
                "root": "s", "supervisors": [{"name": "s"}], "agents": [{"name": "a",
                "kind": "counter", "supervisor": "s", "checkpoint": {"seq": 1,
                "time": "2026-01-01T00:00:00Z", "state": "gQ=="}}]}}),
            ),
            (
                "import_page",
                json!({"import": "00000000-0000-0000-0000-000000000001", "page": 0,
                "supervisors": [{"name": "s", "strategy": "rest_for_one"}]}),
            ),
        ];
        let mut out = Vec::new();
        for (name, body) in bodies {
            let pick = crate::command::TABLE
                .iter()
                .position(|s| s.name == name)
                .unwrap() as u8;
            out.push([vec![pick, 1], serde_json::to_vec(&body).unwrap()].concat());
            out.push([vec![pick, 2], msgpack(&body)].concat());
        }
        out
    }

    fn corpus() -> Vec<(&'static str, Vec<Vec<u8>>)> {
        let vote = Vote::new_committed(1, 1);
        let body = serde_json::to_vec(&json!({"name": "a1", "kind": "counter"})).unwrap();
        let batch = ForwardBatch {
            v: 1,
            items: vec![Request {
                command: "spawn_agent".into(),
                content_type: Some("application/json".into()),
                hops: 0,
                payload: body.into(),
                own: false,
                trace: None,
            }],
        };
        let append = AppendEntriesRequest {
            vote,
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 4)),
            entries: vec![entry(5)],
            leader_commit: Some(LogId::new(CommittedLeaderId::new(1, 1), 4)),
        };
        let vote_req = VoteRequest {
            vote,
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
        };
        let pre_vote = crate::raft::election::PreVote {
            last_log_id: vote_req.last_log_id,
        };
        let mut reg = Registry::default();
        let EntryPayload::Normal(p) = entry(1).payload else {
            unreachable!()
        };
        for item in &p.items {
            reg.apply(p.time, item, &mut Vec::new()).unwrap();
        }
        #[derive(serde::Serialize)]
        struct SnapshotData<'a> {
            v: u32,
            registry: &'a crate::registry::RegistryData,
        }
        let snapshot = msgpack(&SnapshotData {
            v: REGISTRY_VERSION,
            registry: reg.data(),
        });
        let install = crate::raft::typ::InstallSnapshotRequest {
            vote,
            meta: Default::default(),
            offset: 0,
            data: snapshot.clone(),
            done: true,
        };
        // As a node sends it (the data one `bin`), and as older nodes did (openraft's own
        // request, the data an array of numbers): both decode.
        let chunk = SnapshotChunk::from(install.clone());
        vec![
            ("command", commands()),
            ("forward_batch", vec![msgpack(&batch)]),
            (
                "raft_rpc",
                vec![
                    [vec![0], msgpack(&append)].concat(),
                    [vec![1], msgpack(&vote_req)].concat(),
                    [vec![2], msgpack(&chunk)].concat(),
                    [vec![2], msgpack(&install)].concat(),
                    [vec![3], msgpack(&pre_vote)].concat(),
                ],
            ),
            ("log_entry", vec![msgpack(&entry(7))]),
            ("snapshot", vec![snapshot]),
            // Arbitrary bytes the generator reads as choices: a start, the fuzzer does the rest.
            ("registry_apply", vec![(0..=255u8).collect(), vec![7; 512]]),
        ]
    }

    /// Whether `input` is accepted by the decoder of `target`, as the fuzz target feeds it.
    fn decodes(target: &str, input: &[u8]) -> bool {
        match target {
            "command" => {
                let name = crate::command::TABLE[usize::from(input[0])].name;
                let ct = ["application/json", "application/msgpack"][usize::from(input[1]) - 1];
                command(name, Some(ct), &input[2..]).is_ok()
            }
            "forward_batch" => forward_batch(input).is_ok_and(|b| {
                b.items
                    .iter()
                    .all(|i| command(&i.command, i.content_type.as_deref(), &i.payload).is_ok())
            }),
            "raft_rpc" => {
                let rpc = [
                    RaftRpc::AppendEntries,
                    RaftRpc::Vote,
                    RaftRpc::InstallSnapshot,
                    RaftRpc::PreVote,
                ];
                raft_rpc(rpc[usize::from(input[0])], &input[1..]).is_ok()
            }
            "log_entry" => log_entry(input).is_ok(),
            "snapshot" => snapshot(input).is_ok(),
            _ => true,
        }
    }

    #[test]
    fn the_fuzz_seed_corpus_is_current() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let write = std::env::var_os("WARDEN_WRITE_FUZZ_SEEDS").is_some();
        for (target, inputs) in corpus() {
            for (i, input) in inputs.iter().enumerate() {
                assert!(decodes(target, input), "seed {i} of {target} decodes");
                let path = root.join(target).join(format!("seed-{i}"));
                if write {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, input).unwrap();
                } else {
                    let kept = std::fs::read(&path).unwrap_or_default();
                    assert!(
                        kept == *input,
                        "{path:?} is not today's seed; write the seeds anew with \
                         WARDEN_WRITE_FUZZ_SEEDS=1 cargo test -p warden fuzz_seed"
                    );
                }
            }
        }
    }
}
