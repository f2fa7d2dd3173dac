//! Clients that create and stop supervisors, read them back, send bad input, call their
//! durable counters, migrate counters and drain nodes, recording everything. Creates carry a
//! request id and are retried with the same id after an unknown outcome, which is what G7 is
//! about; migrations and drains carry one too, so the client may retry them safely.

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
    let client = Client {
        deadline: Duration::from_millis(w.op_timeout_ms),
        ..client
    };
    let parent = parent_of(k);
    let mut live: Vec<String> = Vec::new();
    let mut unknown_creates: Vec<(String, String)> = Vec::new();
    let mut seq = 0u64;
    // This client's drain in effect, and when to cancel it.
    let mut drained: Option<(u64, Instant)> = None;
    // Cumulative weights: an operation is picked by where a roll falls.
    let c_stop = w.create + w.stop;
    let c_read = c_stop + w.read;
    let c_bad = c_read + w.bad_input;
    let c_incr = c_bad + w.increment;
    let c_get = c_incr + w.counter_read;
    let c_migrate = c_get + w.migrate;
    let total = c_migrate + w.drain;
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
        let roll = rng.gen_range(0..total.max(1));
        if roll < w.create {
            // Retry an unknown create first, with its original request id.
            let (name, rid, retry) = match unknown_creates.pop() {
                Some((n, r)) if rng.gen_bool(0.7) => (n, r, true),
                other => {
                    if let Some(o) = other {
                        unknown_creates.push(o);
                    }
                    if live.len() >= MAX_LIVE {
                        continue;
                    }
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
            let out = call(&client, &history, k, kind, "create_supervisor", &body).await;
            match out {
                Outcome::Ok { .. } => live.push(name),
                Outcome::Unknown { .. } => unknown_creates.push((name, rid)),
                Outcome::Failed { .. } => {}
            }
        } else if roll < c_stop {
            if live.is_empty() {
                continue;
            }
            let name = live.swap_remove(rng.gen_range(0..live.len()));
            let out = call(
                &client,
                &history,
                k,
                OpKind::Stop { name: name.clone() },
                "stop_supervisor",
                &json!({"name": name}),
            )
            .await;
            if let Outcome::Failed { code, .. } = &out {
                if code != "not_found" {
                    live.push(name);
                }
            }
        } else if roll < c_read {
            let body = json!({"parent": parent});
            call(
                &client,
                &history,
                k,
                OpKind::Read {
                    parent: parent.clone(),
                },
                "list_supervisors",
                &body,
            )
            .await;
        } else if roll < c_bad {
            bad_input(&client, &history, k, &mut rng).await;
        } else if roll < c_get {
            let counter = counter_of(k);
            let (kind, body) = if roll < c_incr {
                (
                    OpKind::Increment {
                        counter: counter.clone(),
                    },
                    json!({"op": "add", "n": 1}),
                )
            } else {
                (
                    OpKind::CounterRead {
                        counter: counter.clone(),
                    },
                    json!({"op": "get"}),
                )
            };
            // Retried (while the counter moves, or without an answer) under one call id, so
            // the counter runs it once; past the deadline the outcome is unknown.
            let invoke_ms = history.now_ms();
            let out = outcome(client.call_agent(&counter, &body).await);
            history.record(Op {
                client: k,
                kind,
                invoke_ms,
                complete_ms: history.now_ms(),
                outcome: out,
            });
        } else if roll < c_migrate {
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
        } else {
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
    let req = async_nats::Request::new()
        .payload(body.clone().into())
        .timeout(Some(client.deadline));
    let out = match client.nats.send_request(subject, req).await {
        Ok(msg) => {
            match warden::protocol::Envelope::decode(&msg.payload).map(|e| e.into_result()) {
                Ok(Ok(v)) => Outcome::Ok { value: v },
                Ok(Err(e)) => outcome(Err(CallError::Reply(e))),
                Err(e) => Outcome::Failed {
                    code: "undecodable_reply".into(),
                    message: e.message,
                },
            }
        }
        Err(e) => Outcome::Unknown { why: e.to_string() },
    };
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
