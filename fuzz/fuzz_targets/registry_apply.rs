//! `Registry::apply` over arbitrary command sequences, drawn from small pools of nodes,
//! supervisors and agents so that commands meet each other's records. Checked at every step:
//! no panic, a refused command changes nothing but the remembered request ids, and a twin
//! replica answers the same. Now and then the twin is replaced by the registry restored from
//! its snapshot (MessagePack, then its indexes rebuilt), as a restarted follower is: from
//! then on it must still answer and end the same, so no derived state may differ.
#![no_main]

use arbitrary::{Result, Unstructured};
use chrono::{DateTime, Duration, Utc};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use uuid::Uuid;
use warden_core::registry::{FindAgents, Registry, RegistryCmd, RegistryData, Stamped};

const NODES: [u64; 4] = [1, 2, 3, 4];
const SUPERVISORS: [&str; 5] = ["root", "s1", "s2", "s3", "nope"];
const AGENTS: [&str; 4] = ["a1", "a2", "a3", "a4"];
const KINDS: [&str; 3] = ["counter", "echo", "exec"];
const ZONES: [&str; 3] = ["z1", "z2", "z3"];
const REQUEST_IDS: [&str; 3] = ["r1", "r2", "r3"];
const TEMPLATES: [&str; 2] = ["tp1", "tp2"];
const NODE_STATUS: [&str; 6] = ["joining", "up", "suspect", "down", "draining", "left"];
const AGENT_STATUS: [&str; 7] = [
    "pending",
    "starting",
    "running",
    "stopping",
    "stopped",
    "failed",
    "migrating",
];
const RESTART: [&str; 3] = ["permanent", "transient", "temporary"];
const STRATEGIES: [&str; 4] = [
    "one_for_one",
    "one_for_all",
    "rest_for_one",
    "simple_one_for_one",
];

fn node(u: &mut Unstructured) -> Result<u64> {
    Ok(*u.choose(&NODES)?)
}

fn pick<'a>(u: &mut Unstructured, xs: &[&'a str]) -> Result<&'a str> {
    Ok(*u.choose(xs)?)
}

/// An agent's id: one in the registry, mostly, or an unknown one.
fn agent_id(u: &mut Unstructured, reg: &Registry) -> Result<Uuid> {
    let ids: Vec<Uuid> = reg.data().agents.keys().copied().collect();
    if ids.is_empty() || u.ratio(1, 8)? {
        return Ok(Uuid::from_u128(u.arbitrary()?));
    }
    Ok(*u.choose(&ids)?)
}

/// How a client names an agent: its name, or its id.
fn agent_ref(u: &mut Unstructured, reg: &Registry) -> Result<String> {
    if u.arbitrary()? {
        Ok(pick(u, &AGENTS)?.to_string())
    } else {
        Ok(agent_id(u, reg)?.to_string())
    }
}

fn bytes(u: &mut Unstructured) -> Result<Value> {
    let n = u.int_in_range(0..=16)?;
    let b: Vec<u8> = (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?;
    Ok(json!(b))
}

fn placement(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 => Value::Null,
        1 => json!({"node": node(u)?}),
        2 => json!({"strategy": "spread"}),
        _ => json!({"constraints": {"zone": pick(u, &ZONES)?}}),
    })
}

fn agent_fields(u: &mut Unstructured) -> Result<Value> {
    let mut a = json!({
        "kind": pick(u, &KINDS)?,
        "restart": pick(u, &RESTART)?,
        "config": {"n": u.int_in_range(0..=3)?},
        "tags": if u.arbitrary()? { json!(["t1"]) } else { json!([]) },
        "shutdown_ms": u.int_in_range(0..=10_000u64)?,
    });
    let p = placement(u)?;
    if !p.is_null() {
        a["placement"] = p;
    }
    Ok(a)
}

fn command(u: &mut Unstructured, reg: &Registry) -> Result<Value> {
    Ok(match u.int_in_range(0..=22)? {
        0 => json!({
            "type": "register_node", "node_id": node(u)?, "name": format!("n{}", node(u)?),
            "labels": {"zone": pick(u, &ZONES)?},
            "kinds": if u.arbitrary()? { json!(["counter", "echo"]) } else { json!(KINDS) },
            "capacity": u.int_in_range(0..=3u32)?,
        }),
        1 => json!({
            "type": "set_node_status", "node_id": node(u)?, "status": pick(u, &NODE_STATUS)?,
        }),
        2 => json!({
            "type": "node_loads",
            "loads": [{"node_id": node(u)?, "load": {"running": u.int_in_range(0..=9u32)?}}],
        }),
        3 => json!({"type": "drain_node", "node_id": node(u)?, "cancel": u.arbitrary::<bool>()?}),
        4 => json!({
            "type": "migrate_agent", "agent": agent_ref(u, reg)?,
            "to": if u.arbitrary()? { json!(node(u)?) } else { Value::Null },
        }),
        5 => json!({
            "type": "handoff",
            "items": [{
                "agent": agent_id(u, reg)?, "node": node(u)?, "epoch": u.int_in_range(0..=4u64)?,
                "state": if u.arbitrary()? { bytes(u)? } else { Value::Null }, "calls": [],
            }],
        }),
        6 => json!({"type": "rebalance", "max_moves": u.int_in_range(0..=5u64)?}),
        7 => json!({"type": "remove_node", "node_id": node(u)?}),
        8 => json!({
            "type": "create_supervisor", "name": pick(u, &SUPERVISORS)?,
            "parent": if u.arbitrary()? { json!(pick(u, &SUPERVISORS)?) } else { Value::Null },
            "strategy": pick(u, &STRATEGIES)?,
            "max_restarts": u.int_in_range(0..=3u32)?, "max_seconds": u.int_in_range(1..=5u32)?,
            "placement": if u.arbitrary()? { "spread" } else { "colocate" },
        }),
        9 => json!({"type": "stop_supervisor", "name": pick(u, &SUPERVISORS)?}),
        10 => {
            let mut a = agent_fields(u)?;
            a["type"] = json!("spawn_agent");
            a["supervisor"] = json!(pick(u, &SUPERVISORS)?);
            if u.arbitrary()? {
                a["name"] = json!(pick(u, &AGENTS)?);
            }
            a
        }
        11 => json!({"type": "stop_agent", "agent": agent_ref(u, reg)?}),
        12 => json!({"type": "restart_agent", "agent": agent_ref(u, reg)?}),
        13 => json!({
            "type": "spawn_agent_group", "name": pick(u, &SUPERVISORS)?,
            "parent": if u.arbitrary()? { json!(pick(u, &SUPERVISORS)?) } else { Value::Null },
            "count": u.int_in_range(0..=12u32)?, "template": agent_fields(u)?,
            "max_restarts": u.int_in_range(0..=3u32)?, "max_seconds": u.int_in_range(1..=5u32)?,
        }),
        14 => json!({"type": "import_state", "agent": agent_ref(u, reg)?, "state": bytes(u)?}),
        15 => json!({
            "type": "report_agents",
            "reports": [{
                "agent": agent_id(u, reg)?, "node": node(u)?, "epoch": u.int_in_range(0..=4u64)?,
                "status": pick(u, &AGENT_STATUS)?, "restarts": u.int_in_range(0..=3u32)?,
                "error": if u.arbitrary()? { json!("boom") } else { Value::Null },
                "first_start": u.arbitrary::<bool>()?,
            }],
        }),
        16 => {
            let mut c = json!({"type": "update_supervisor", "name": pick(u, &SUPERVISORS)?});
            if u.arbitrary()? {
                c["strategy"] = json!(pick(u, &STRATEGIES)?);
            }
            if u.arbitrary()? {
                c["max_restarts"] = json!(u.int_in_range(0..=3u32)?);
            }
            c
        }
        17 => {
            let mut c = json!({"type": "update_agent", "agent": agent_ref(u, reg)?});
            if u.arbitrary()? {
                c["tags"] = if u.arbitrary()? { json!(["t1"]) } else { json!(["t2"]) };
            }
            if u.arbitrary()? {
                c["config"] = json!({"n": u.int_in_range(0..=3)?});
            }
            c
        }
        18 => json!({
            "type": "finish_agents",
            "items": [{
                "agent": agent_id(u, reg)?, "node": node(u)?,
                "epoch": u.int_in_range(0..=4u64)?,
                "restart_requested": u.int_in_range(0..=2u64)?,
                "status": if u.arbitrary()? { "stopped" } else { "failed" },
                "result": if u.arbitrary()? { json!({"n": u.int_in_range(0..=3)?}) } else { Value::Null },
                "forget": u.arbitrary::<bool>()?,
            }],
        }),
        19 => {
            let mut t = agent_fields(u)?;
            t["type"] = json!("register_template");
            t["name"] = json!(pick(u, &TEMPLATES)?);
            t["capabilities"] = json!(["c1"]);
            t
        }
        20 => json!({"type": "delete_template", "name": pick(u, &TEMPLATES)?}),
        21 => {
            let mut a = json!({
                "type": "spawn_agent", "template": pick(u, &TEMPLATES)?,
                "supervisor": pick(u, &SUPERVISORS)?,
            });
            if u.arbitrary()? {
                a["name"] = json!(pick(u, &AGENTS)?);
            }
            if u.arbitrary()? {
                a["overrides"] = json!({"tags": ["t2"], "restart": pick(u, &RESTART)?});
            }
            a
        }
        _ => json!({
            "type": "checkpoint", "agent": agent_id(u, reg)?, "node": node(u)?,
            "epoch": u.int_in_range(0..=4u64)?, "state": bytes(u)?,
        }),
    })
}

/// A `find_agents` query over the pools' values, by one field or several, paged or counted.
fn query(u: &mut Unstructured, reg: &Registry) -> Result<FindAgents> {
    let mut q = json!({});
    if u.ratio(1, 3)? {
        q["tag"] = json!(if u.arbitrary()? { "t1" } else { "t2" });
    }
    if u.ratio(1, 3)? {
        q["kind"] = json!(pick(u, &KINDS)?);
    }
    if u.ratio(1, 3)? {
        q["status"] = json!(pick(u, &AGENT_STATUS)?);
    }
    if u.ratio(1, 4)? {
        q["supervisor"] = json!(pick(u, &SUPERVISORS)?);
    }
    if u.ratio(1, 4)? {
        q["node"] = json!(node(u)?);
    }
    if u.ratio(1, 4)? {
        q["after"] = json!(agent_id(u, reg)?.to_string());
    }
    if u.ratio(1, 3)? {
        q["count"] = json!(true);
    } else {
        q["limit"] = json!(u.int_in_range(1..=5)?);
    }
    Ok(serde_json::from_value(q).expect("a query the pools make is valid"))
}

/// The registry's content but its remembered request ids, which a refusal may add to.
fn content(d: &RegistryData) -> RegistryData {
    RegistryData {
        requests: Default::default(),
        ..d.clone()
    }
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let mut reg = Registry::default();
    let mut twin = Registry::default();
    let mut time = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).expect("a fixed, valid time");
    let mut events = Vec::new();
    for step in 0..64u128 {
        if u.is_empty() {
            break;
        }
        // Mostly seconds apart; now and then a day, past the request ids' time to live.
        time += if u.ratio(1, 16)? {
            Duration::days(1)
        } else {
            Duration::seconds(u.int_in_range(0..=30)?)
        };
        let value = command(&mut u, &reg)?;
        // A command our own encoding cannot express is not a command; skip it.
        let Ok(cmd) = serde_json::from_value::<RegistryCmd>(value) else {
            continue;
        };
        let request_id = if u.ratio(1, 3)? {
            Some(pick(&mut u, &REQUEST_IDS)?.to_string())
        } else {
            None
        };
        // Ids far apart, as the leader's random ones are (a group derives its agents' ids
        // from its own); now and then one a previous group's agent already has.
        let id = if u.ratio(1, 16)? {
            (step << 64) + 1
        } else {
            (step + 1) << 64
        };
        let item = Stamped {
            id: Uuid::from_u128(id),
            request_id,
            cmd,
            fingerprint: None,
        };
        if std::env::var_os("FUZZ_TRACE").is_some() {
            eprintln!("step {step}: {item:?}");
        }
        let before = content(reg.data());
        let out = reg.apply(time, &item, &mut events);
        if let Err(refused) = &out {
            assert_eq!(
                content(reg.data()),
                before,
                "a refused command changed the registry: {refused:?} for {item:?}"
            );
        }
        let twin_out = twin.apply(time, &item, &mut Vec::new());
        assert_eq!(out, twin_out, "two replicas answered {item:?} differently");
        events.clear();
        let q = query(&mut u, &reg)?;
        let indexed = q.answer(&reg);
        assert_eq!(
            indexed,
            q.answer_by_scan(&reg),
            "the indexes answered {q:?} wrongly"
        );
        assert_eq!(
            indexed,
            q.answer(&twin),
            "two replicas answered {q:?} differently"
        );
        if u.ratio(1, 8)? {
            if std::env::var_os("FUZZ_TRACE").is_some() {
                eprintln!("restore twin");
            }
            twin = restored(&reg);
        }
    }
    assert_eq!(reg.data(), twin.data(), "two replicas diverged");
    assert_eq!(
        restored(&reg).data(),
        reg.data(),
        "a snapshot round trip changed the registry"
    );
    Ok(())
}

/// The registry as a replica restores it from its snapshot.
fn restored(reg: &Registry) -> Registry {
    let encoded = rmp_serde::to_vec_named(reg.data()).expect("a registry encodes");
    let decoded: RegistryData =
        warden::protocol::from_msgpack(&encoded).expect("a registry decodes what it encoded");
    Registry::from_data(decoded)
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
