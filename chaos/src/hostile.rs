//! The hostile client: a holder of the `operator` identity who sends, throughout the run,
//! forged internal messages (another node's heartbeat, a Raft vote, a `left` event, a forward
//! batch, a reply), poison bodies (nesting past the bounds, oversized configs and groups,
//! broken MessagePack, invalid UTF-8) and oversized requests, to commands and to the durable
//! counters. Each send is a `BadInput` op: G5 wants a clear refusal (`bad_request`,
//! `too_large`, or `forbidden` from NATS) or, under a fault, no answer; no trace of it in the
//! registry; and no node that exits. The counters' checks see any poison call that counted.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use warden::client::Client;

use crate::history::{History, Op, OpKind};
use crate::workload::send_raw;

/// The history's client number of the hostile client (the workload's are 0..clients).
pub const HOSTILE_CLIENT: usize = 9_999;

/// What `what` of a forged message starts with: G5 wants NATS to refuse some of them.
pub const FORGED: &str = "forged";

/// What `what` of a poison call to an agent ends with. Such a call reaches the agent only
/// while it runs; `unavailable` (not running here now) also changed nothing.
pub const AGENT_CALL: &str = "agent call";

const MSGPACK: &str = "application/msgpack";

/// One hostile send: what it is, where it goes, its content type and its bytes.
struct Case {
    what: String,
    subject: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

fn json_case(what: &str, subject: String, body: Vec<u8>) -> Case {
    Case {
        what: what.into(),
        subject,
        content_type: None,
        body,
    }
}

/// MessagePack string of `s` (at most 255 bytes).
fn mp_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 256);
    out.push(0xd9);
    out.push(s.len() as u8);
    out.extend(s.as_bytes());
}

/// `{"name": name, "kind": "counter", "config": <value>}` in MessagePack, around raw bytes.
fn mp_spawn(name: &str, config: &[u8]) -> Vec<u8> {
    let mut out = vec![0x83];
    for (k, v) in [("name", name), ("kind", "counter")] {
        mp_str(&mut out, k);
        mp_str(&mut out, v);
    }
    mp_str(&mut out, "config");
    out.extend(config);
    out
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn case(rng: &mut StdRng, client: &Client, nodes: u64, counters: &[String]) -> Case {
    let s = &client.subjects;
    let node = |rng: &mut StdRng| rng.gen_range(1..=nodes);
    let (a, b) = (node(rng), node(rng));
    let n = rng.gen::<u32>();
    let cmd = |name: &str| s.cmd(name);
    match rng.gen_range(0..20) {
        // Forged node-to-node traffic: an operator may publish none of it.
        0 => json_case(
            "forged heartbeat",
            s.own(a, b, "heartbeat"),
            json!({"node_id": a}).to_string().into_bytes(),
        ),
        1 => json_case(
            "forged raft vote",
            s.raft(a, b, "vote"),
            vec![0x82, 0xc0, 0xc0],
        ),
        2 => json_case(
            "forged left event",
            s.event("node", &a.to_string(), "left"),
            b"{}".to_vec(),
        ),
        3 => json_case(
            "forged relay",
            s.relay(a, b, "stop_supervisor"),
            json!({"name": "root"}).to_string().into_bytes(),
        ),
        4 => json_case(
            "forged forward batch",
            s.forward(a, b),
            vec![0x92, 0x01, 0x90],
        ),
        5 => json_case("forged leader query", s.leader_query(a), Vec::new()),
        6 => json_case(
            "forged reply",
            s.reply(Some(a), b, u64::from(n)),
            b"{}".to_vec(),
        ),
        // Poison bodies.
        7 => json_case(
            "deep json config",
            cmd("spawn_agent"),
            format!(
                r#"{{"name":"bad-h{n}","kind":"counter","config":{}}}"#,
                nested(1_019)
            )
            .into_bytes(),
        ),
        8 => Case {
            what: "deep msgpack config".into(),
            subject: cmd("spawn_agent"),
            content_type: Some(MSGPACK),
            body: mp_spawn(
                &format!("bad-h{n}"),
                &[[0x91; 300].as_slice(), &[0xc0]].concat(),
            ),
        },
        9 => Case {
            what: "msgpack depth bomb".into(),
            subject: cmd("create_supervisor"),
            content_type: Some(MSGPACK),
            body: [vec![0x91; 100_000], vec![0xc0]].concat(),
        },
        10 => json_case(
            "config too large",
            cmd("spawn_agent"),
            json!({"name": format!("bad-h{n}"), "kind": "counter",
                   "config": {"pad": "x".repeat(70 * 1024)}})
            .to_string()
            .into_bytes(),
        ),
        11 => json_case(
            "group too large",
            cmd("spawn_agent_group"),
            json!({"name": format!("bad-h{n}"), "count": 10_000,
                   "template": {"kind": "counter", "config": {"pad": "x".repeat(2_000)}}})
            .to_string()
            .into_bytes(),
        ),
        12 => json_case(
            "oversized request",
            cmd("create_supervisor"),
            json!({"name": format!("bad-h{n}"), "pad": "x".repeat(400 * 1024)})
                .to_string()
                .into_bytes(),
        ),
        13 => Case {
            what: "truncated msgpack".into(),
            subject: cmd("spawn_agent"),
            content_type: Some(MSGPACK),
            body: mp_spawn(&format!("bad-h{n}"), &[0xdb, 0xff, 0xff, 0xff]),
        },
        14 => json_case(
            "invalid utf-8",
            cmd("create_supervisor"),
            [br#"{"name":"bad-h"#.as_slice(), b"\xff\xfe", br#""}"#].concat(),
        ),
        15 => json_case(
            "huge request_id",
            cmd("create_supervisor"),
            json!({"name": format!("bad-h{n}"), "request_id": "r".repeat(10_000)})
                .to_string()
                .into_bytes(),
        ),
        16 => json_case(
            "too many tags",
            cmd("spawn_agent"),
            json!({"name": format!("bad-h{n}"), "kind": "counter",
                   "tags": (0..5_000).map(|i| format!("t{i}")).collect::<Vec<_>>()})
            .to_string()
            .into_bytes(),
        ),
        // Poison calls to the durable counters: none may count.
        17 if !counters.is_empty() => json_case(
            "deep agent call",
            s.agent(&counters[rng.gen_range(0..counters.len())], "call"),
            nested(5_000).into_bytes(),
        ),
        18 if !counters.is_empty() => json_case(
            "oversized agent call",
            s.agent(&counters[rng.gen_range(0..counters.len())], "call"),
            json!({"op": "add", "n": 1, "pad": "x".repeat(400 * 1024)})
                .to_string()
                .into_bytes(),
        ),
        _ if !counters.is_empty() => json_case(
            "mistyped agent call",
            s.agent(&counters[rng.gen_range(0..counters.len())], "call"),
            json!({"op": "add", "n": "many"}).to_string().into_bytes(),
        ),
        _ => json_case("empty body", cmd("spawn_agent"), Vec::new()),
    }
}

/// Runs the hostile client until `until`, one send every `pause`.
pub async fn run(
    seed: u64,
    client: Client,
    history: History,
    nodes: u64,
    counters: Vec<String>,
    pause: Duration,
    until: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4857_5354_494c_4500);
    while Instant::now() < until {
        let c = case(&mut rng, &client, nodes, &counters);
        let mut headers = HeaderMap::new();
        if let Some(ct) = c.content_type {
            headers.insert("Content-Type", ct);
        }
        let invoke_ms = history.now_ms();
        let out = send_raw(&client, c.subject, headers, c.body).await;
        history.record(Op {
            client: HOSTILE_CLIENT,
            kind: OpKind::BadInput { what: c.what },
            invoke_ms,
            complete_ms: history.now_ms(),
            outcome: out,
        });
        tokio::time::sleep(pause).await;
    }
}
