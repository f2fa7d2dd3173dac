//! Clients that create and stop supervisors, read them back and send bad input, recording
//! everything. Creates carry a request id and are retried with the same id after an unknown
//! outcome, which is what G7 is about.

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

/// Runs client `k` until `until`.
pub async fn run_client(
    k: usize,
    seed: u64,
    w: Workload,
    client: Client,
    history: History,
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
    let total = w.create + w.stop + w.read + w.bad_input + w.increment + w.counter_read;
    while Instant::now() < until {
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
        } else if roll < w.create + w.stop {
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
        } else if roll < w.create + w.stop + w.read {
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
        } else if roll < w.create + w.stop + w.read + w.bad_input {
            bad_input(&client, &history, k, &mut rng).await;
        } else {
            let counter = counter_of(k);
            let (kind, body) = if roll < w.create + w.stop + w.read + w.bad_input + w.increment {
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
            let invoke_ms = history.now_ms();
            let out = call_agent(&client, &counter, &body).await;
            history.record(Op {
                client: k,
                kind,
                invoke_ms,
                complete_ms: history.now_ms(),
                outcome: out,
            });
        }
        if w.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(w.think_ms)).await;
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
