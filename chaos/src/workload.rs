//! Clients that create and stop supervisors and agents, read them back, send bad input, call
//! their durable counters, migrate counters and drain nodes, recording everything. Creates,
//! spawns and agent stops carry a request id and are retried with the same id after an
//! unknown outcome, which is what G7 is about; migrations and drains carry one too, so the
//! client may retry them safely.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use warden::client::{CallError, Client};
use warden::protocol::ErrorCode;

use crate::history::{History, Op, OpKind, Outcome};
use crate::scenario::Workload;

/// Supervisors one client keeps alive at most, so a read of its parent fits in one page.
const MAX_LIVE: usize = 500;

/// The durable counter of client `k`.
pub fn counter_of(k: usize) -> String {
    format!("chaos-ctr{k}")
}

/// The parent supervisor of client `k`.
pub fn parent_of(k: usize) -> String {
    format!("chaos-p{k}")
}

/// How long a drain lasts before its client cancels it: a random value in this range, in ms.
const DRAIN_MS: (u64, u64) = (1_000, 5_000);

/// Nodes whose drain may be in effect (acknowledged, or with an unknown outcome), shared by
/// the clients. A node leaves the set only once a cancel of its drain was acknowledged, so the
/// harness can cancel whatever is left after healing and no drain outlives the run.
#[derive(Clone, Default)]
pub struct Drains(Arc<Mutex<BTreeSet<u64>>>);

impl Drains {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The nodes whose drain may still be in effect.
    pub fn pending(&self) -> Vec<u64> {
        self.lock().iter().copied().collect()
    }

    /// Notes that the drain of `node` was cancelled.
    pub fn cancelled(&self, node: u64) {
        self.lock().remove(&node);
    }

    /// Reserves a node to drain: not one already drained, and at most `(nodes - 1) / 2` at
    /// once, so that a majority of the nodes always takes agents.
    fn reserve(&self, nodes: u64, rng: &mut StdRng) -> Option<u64> {
        let mut set = self.lock();
        if set.len() as u64 >= nodes.saturating_sub(1) / 2 {
            return None;
        }
        let free: Vec<u64> = (1..=nodes).filter(|n| !set.contains(n)).collect();
        let node = *free.get(rng.gen_range(0..free.len().max(1)))?;
        set.insert(node);
        Some(node)
    }
}

/// `drain_node {node, cancel: true}` with a fresh request id (a retry of it is safe), recorded.
/// Returns whether the cancel was acknowledged.
pub async fn cancel_drain(
    client: &Client,
    history: &History,
    k: usize,
    node: u64,
    request_id: String,
) -> bool {
    let body = json!({"node": node, "cancel": true, "request_id": request_id});
    let kind = OpKind::Drain { node, cancel: true };
    let out = call(client, history, k, kind, "drain_node", &body).await;
    matches!(out, Outcome::Ok { .. })
}

/// Maps a call's result to an outcome. `unavailable` means nothing changed; a `timeout` code
/// or no answer means the outcome is unknown.
pub fn outcome(result: Result<Value, CallError>) -> Outcome {
    match result {
        Ok(value) => Outcome::Ok { value },
        Err(CallError::Reply(e)) if e.code == ErrorCode::Timeout => {
            Outcome::Unknown { why: e.message }
        }
        Err(CallError::Reply(e)) => Outcome::Failed {
            code: serde_json::to_value(e.code)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            message: e.message,
        },
        Err(CallError::NoAnswer(why)) => Outcome::Unknown { why },
    }
}

/// Agents one client keeps alive at most (with those whose spawn or stop is unknown), so a
/// read of its supervisor fits in one page.
const MAX_LIVE_AGENTS: usize = 100;

/// What a client does next, drawn by the scenario's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Create,
    Stop,
    Read,
    BadInput,
    Increment,
    CounterRead,
    Migrate,
    Drain,
    SpawnAgent,
    StopAgent,
    AgentRead,
}

fn pick(w: &Workload, rng: &mut StdRng) -> Option<Action> {
    let table = [
        (w.create, Action::Create),
        (w.stop, Action::Stop),
        (w.read, Action::Read),
        (w.bad_input, Action::BadInput),
        (w.increment, Action::Increment),
        (w.counter_read, Action::CounterRead),
        (w.migrate, Action::Migrate),
        (w.drain, Action::Drain),
        (w.spawn_agent, Action::SpawnAgent),
        (w.stop_agent, Action::StopAgent),
        (w.agent_read, Action::AgentRead),
    ];
    let total: u32 = table.iter().map(|(weight, _)| weight).sum();
    if total == 0 {
        return None;
    }
    let mut roll = rng.gen_range(0..total);
    for (weight, action) in table {
        if roll < weight {
            return Some(action);
        }
        roll -= weight;
    }
    None
}

/// An attempt whose outcome was unknown, retried now and then with its request id.
fn take_retry<T>(unknown: &mut Vec<T>, rng: &mut StdRng) -> Option<T> {
    if !unknown.is_empty() && rng.gen_bool(0.7) {
        unknown.pop()
    } else {
        None
    }
}

/// A `spawn_agent` as first sent, to be repeated exactly.
struct Spawn {
    name: String,
    request_id: String,
    kind: &'static str,
    restart: &'static str,
}

/// Runs client `k` until `until`, against a cluster of `nodes` nodes. A drain it started is
/// cancelled (by it, or after healing by the harness through `drains`).
#[allow(clippy::too_many_arguments)]
pub async fn run_client(
    k: usize,
    seed: u64,
    w: Workload,
    nodes: u64,
    client: Client,
    history: History,
    drains: Drains,
    until: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // Half the clients send to the leader the replies name, half to the shared queue: both
    // paths meet the faults.
    let client = Client {
        deadline: Duration::from_millis(w.op_timeout_ms),
        follow_leader: k % 2 == 1,
        leader: Default::default(),
        ..client
    };
    let parent = parent_of(k);
    let mut live: Vec<String> = Vec::new();
    let mut unknown_creates: Vec<(String, String)> = Vec::new();
    let mut agents: Vec<String> = Vec::new();
    let mut unknown_spawns: Vec<Spawn> = Vec::new();
    let mut unknown_agent_stops: Vec<(String, String)> = Vec::new();
    let mut seq = 0u64;
    // This client's drain in effect, and when to cancel it.
    let mut drained: Option<(u64, Instant)> = None;
    while Instant::now() < until {
        if let Some((node, at)) = drained {
            if Instant::now() >= at {
                seq += 1;
                if cancel_drain(&client, &history, k, node, format!("undrain{k}-{seq}")).await {
                    drains.cancelled(node);
                    drained = None;
                }
                continue;
            }
        }
        let Some(action) = pick(&w, &mut rng) else {
            break;
        };
        match action {
            Action::Create => {
                // Retry an unknown create now and then, with its original request id.
                let (name, rid, retry) = match take_retry(&mut unknown_creates, &mut rng) {
                    Some((n, r)) => (n, r, true),
                    None if live.len() >= MAX_LIVE => continue,
                    None => {
                        seq += 1;
                        (format!("c{k}-{seq}"), format!("r{k}-{seq}"), false)
                    }
                };
                let body = json!({"name": name, "parent": parent, "request_id": rid});
                let kind = OpKind::Create {
                    name: name.clone(),
                    parent: parent.clone(),
                    request_id: rid.clone(),
                    retry,
                };
                match call(&client, &history, k, kind, "create_supervisor", &body).await {
                    Outcome::Ok { .. } => live.push(name),
                    Outcome::Unknown { .. } => unknown_creates.push((name, rid)),
                    Outcome::Failed { .. } => {}
                }
            }
            Action::Stop => {
                if live.is_empty() {
                    continue;
                }
                let name = live.swap_remove(rng.gen_range(0..live.len()));
                let kind = OpKind::Stop { name: name.clone() };
                let body = json!({"name": name});
                let out = call(&client, &history, k, kind, "stop_supervisor", &body).await;
                if let Outcome::Failed { code, .. } = &out {
                    if code != "not_found" {
                        live.push(name);
                    }
                }
            }
            Action::Read => {
                let kind = OpKind::Read {
                    parent: parent.clone(),
                };
                let body = json!({"parent": parent});
                call(&client, &history, k, kind, "list_supervisors", &body).await;
            }
            Action::BadInput => bad_input(&client, &history, k, &mut rng).await,
            Action::Increment | Action::CounterRead => {
                let counter = counter_of(k);
                let (kind, body) = if action == Action::Increment {
                    let kind = OpKind::Increment {
                        counter: counter.clone(),
                    };
                    (kind, json!({"op": "add", "n": 1}))
                } else {
                    let kind = OpKind::CounterRead {
                        counter: counter.clone(),
                    };
                    (kind, json!({"op": "get"}))
                };
                // Retried (while the counter moves, or without an answer) under one call id,
                // so the counter runs it once; past the deadline the outcome is unknown.
                let invoke_ms = history.now_ms();
                let out = outcome(client.call_agent(&counter, &body).await);
                history.record(Op {
                    client: k,
                    kind,
                    invoke_ms,
                    complete_ms: history.now_ms(),
                    outcome: out,
                });
            }
            Action::Migrate => {
                // Any client's counter, to a random node or the best one. A counter that is
                // already moving, or a target it already runs on, gets `conflict`: failed.
                let agent = counter_of(rng.gen_range(0..w.clients.max(1)));
                let to = rng.gen_bool(0.5).then(|| rng.gen_range(1..=nodes.max(1)));
                seq += 1;
                let mut body = json!({"agent": agent, "request_id": format!("mig{k}-{seq}")});
                if let Some(t) = to {
                    body["to"] = json!(t);
                }
                let kind = OpKind::Migrate { agent, to };
                call(&client, &history, k, kind, "migrate_agent", &body).await;
            }
            Action::Drain => {
                if drained.is_some() {
                    continue;
                }
                let Some(node) = drains.reserve(nodes, &mut rng) else {
                    continue;
                };
                seq += 1;
                let body = json!({"node": node, "request_id": format!("drain{k}-{seq}")});
                let kind = OpKind::Drain {
                    node,
                    cancel: false,
                };
                // Whatever the outcome (an unknown one may have drained it), cancel it later.
                call(&client, &history, k, kind, "drain_node", &body).await;
                let ms = rng.gen_range(DRAIN_MS.0..=DRAIN_MS.1);
                drained = Some((node, Instant::now() + Duration::from_millis(ms)));
            }
            Action::SpawnAgent => {
                let (spawn, retry) = match take_retry(&mut unknown_spawns, &mut rng) {
                    Some(s) => (s, true),
                    None if agents.len() + unknown_spawns.len() + unknown_agent_stops.len()
                        >= MAX_LIVE_AGENTS =>
                    {
                        continue
                    }
                    None => {
                        seq += 1;
                        let spawn = Spawn {
                            name: format!("a{k}-{seq}"),
                            request_id: format!("ra{k}-{seq}"),
                            kind: if rng.gen_bool(0.5) { "echo" } else { "counter" },
                            restart: if rng.gen_bool(0.5) {
                                "permanent"
                            } else {
                                "transient"
                            },
                        };
                        (spawn, false)
                    }
                };
                let body = json!({"name": spawn.name, "supervisor": parent, "kind": spawn.kind,
                                  "restart": spawn.restart, "request_id": spawn.request_id});
                let kind = OpKind::SpawnAgent {
                    name: spawn.name.clone(),
                    supervisor: parent.clone(),
                    restart: spawn.restart.into(),
                    request_id: spawn.request_id.clone(),
                    retry,
                };
                match call(&client, &history, k, kind, "spawn_agent", &body).await {
                    Outcome::Ok { .. } => agents.push(spawn.name),
                    Outcome::Unknown { .. } => unknown_spawns.push(spawn),
                    Outcome::Failed { .. } => {}
                }
            }
            Action::StopAgent => {
                let (name, rid, retry) = match take_retry(&mut unknown_agent_stops, &mut rng) {
                    Some((n, r)) => (n, r, true),
                    None if agents.is_empty() => continue,
                    None => {
                        seq += 1;
                        let name = agents.swap_remove(rng.gen_range(0..agents.len()));
                        (name, format!("sa{k}-{seq}"), false)
                    }
                };
                let body = json!({"agent": name, "request_id": rid});
                let kind = OpKind::StopAgent {
                    name: name.clone(),
                    request_id: rid.clone(),
                    retry,
                };
                match call(&client, &history, k, kind, "stop_agent", &body).await {
                    Outcome::Ok { .. } => {}
                    Outcome::Unknown { .. } => unknown_agent_stops.push((name, rid)),
                    // Refused (e.g. `unavailable`): the agent is still there.
                    Outcome::Failed { code, .. } if code != "not_found" => agents.push(name),
                    Outcome::Failed { .. } => {}
                }
            }
            Action::AgentRead => {
                // One page holds them all: at most MAX_LIVE_AGENTS and the counter.
                let kind = OpKind::ReadAgents {
                    supervisor: parent.clone(),
                };
                let body = json!({"supervisor": parent});
                call(&client, &history, k, kind, "list_agents", &body).await;
            }
        }
        if w.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(w.think_ms)).await;
        }
    }
    // The safety phase is over: no drain of this client stays. One try; a cancel that does not
    // get through (faults are still in effect) is left to the harness, after healing.
    if let Some((node, _)) = drained {
        seq += 1;
        if cancel_drain(&client, &history, k, node, format!("undrain{k}-{seq}")).await {
            drains.cancelled(node);
        }
    }
}

async fn call(
    client: &Client,
    history: &History,
    k: usize,
    kind: OpKind,
    command: &str,
    body: &Value,
) -> Outcome {
    let invoke_ms = history.now_ms();
    let out = outcome(client.call(command, body).await);
    history.record(Op {
        client: k,
        kind,
        invoke_ms,
        complete_ms: history.now_ms(),
        outcome: out.clone(),
    });
    out
}

/// Sends one malformed command as raw bytes; names in it start with `bad-` and must never
/// appear in the registry.
async fn bad_input(client: &Client, history: &History, k: usize, rng: &mut StdRng) {
    let cases: [(&str, &str, Vec<u8>); 7] = [
        (
            "garbage",
            "create_supervisor",
            b"\xc1\xc1\xc1 not a thing".to_vec(),
        ),
        (
            "truncated json",
            "create_supervisor",
            br#"{"name":"bad-1","par"#.to_vec(),
        ),
        (
            "wrong type",
            "create_supervisor",
            br#"{"name":["bad-2"]}"#.to_vec(),
        ),
        (
            "invalid name",
            "create_supervisor",
            br#"{"name":"bad 3!"}"#.to_vec(),
        ),
        (
            "unknown field",
            "create_supervisor",
            br#"{"name":"bad-4","colour":"red"}"#.to_vec(),
        ),
        (
            "unknown command",
            "drop_tables",
            br#"{"name":"bad-5"}"#.to_vec(),
        ),
        ("oversized", "create_supervisor", {
            let mut v = br#"{"name":"bad-6","pad":""#.to_vec();
            v.extend(std::iter::repeat_n(b'x', 400 * 1024));
            v.extend(br#""}"#);
            v
        }),
    ];
    let (what, command, body) = &cases[rng.gen_range(0..cases.len())];
    let invoke_ms = history.now_ms();
    let subject = client.subjects.cmd(command);
    let out = send_raw(client, subject, async_nats::HeaderMap::new(), body.clone()).await;
    history.record(Op {
        client: k,
        kind: OpKind::BadInput {
            what: what.to_string(),
        },
        invoke_ms,
        complete_ms: history.now_ms(),
        outcome: out,
    });
}

/// Sends raw bytes as a request on `subject` and reads the answer as a command's reply:
/// NATS's refusal is `forbidden`, no answer is unknown.
pub async fn send_raw(
    client: &Client,
    subject: String,
    headers: async_nats::HeaderMap,
    body: Vec<u8>,
) -> Outcome {
    let sent = client
        .request(subject, headers, body.into(), client.deadline)
        .await;
    match sent {
        Ok(Ok(msg)) => {
            match warden::protocol::Envelope::decode(&msg.payload).map(|e| e.into_result()) {
                Ok(Ok(v)) => Outcome::Ok { value: v },
                Ok(Err(e)) => outcome(Err(CallError::Reply(e))),
                Err(e) => Outcome::Failed {
                    code: "undecodable_reply".into(),
                    message: e.message,
                },
            }
        }
        // NATS refused it (an unknown command is no identity's to send).
        Err(e) => outcome(Err(e)),
        Ok(Err(e)) => Outcome::Unknown { why: e.to_string() },
    }
}

/// One call to an agent, as any NATS client would make it. No retry: an unanswered call is
/// `unknown` (the increment may have happened), and `unavailable` means it did not.
pub async fn call_agent(client: &Client, agent: &str, body: &Value) -> Outcome {
    let subject = client.subjects.agent(agent, "call");
    let payload = serde_json::to_vec(body).unwrap_or_default().into();
    let req = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(client.deadline));
    match client.nats.send_request(subject, req).await {
        Ok(msg) => {
            match warden::protocol::Envelope::decode(&msg.payload).map(|e| e.into_result()) {
                Ok(Ok(v)) => Outcome::Ok { value: v },
                Ok(Err(e)) => outcome(Err(CallError::Reply(e))),
                Err(e) => Outcome::Unknown {
                    why: format!("undecodable reply: {}", e.message),
                },
            }
        }
        // No responders means the call reached nobody; a timeout means it may have run.
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Outcome::Failed {
            code: "no_responders".into(),
            message: e.to_string(),
        },
        Err(e) => Outcome::Unknown { why: e.to_string() },
    }
}
