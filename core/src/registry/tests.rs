//! Registry behaviour on plain data: no Raft, no storage, no clock.

use super::*;
use crate::error::{ErrorCode, WireError};

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_700_000_000 + secs, 0).unwrap()
}

fn create(name: &str, parent: Option<&str>) -> RegistryCmd {
    RegistryCmd::CreateSupervisor(CreateSupervisor {
        name: name.into(),
        parent: parent.map(Into::into),
        strategy: Strategy::OneForOne,
        max_restarts: 1,
        max_seconds: 5,
        backoff: Backoff::default(),
        placement: SupervisorPlacement::Spread,
        request_id: None,
    })
}

fn run(reg: &mut Registry, at: i64, rid: Option<&str>, cmd: RegistryCmd) -> Outcome {
    let item = Stamped {
        id: Uuid::from_u128(at as u128 + 1),
        request_id: rid.map(Into::into),
        cmd,
        fingerprint: None,
    };
    reg.apply(t(at), &item, &mut Vec::new())
}

/// Renders the tree as indented names, for readable expectations.
fn render(reg: &Registry) -> String {
    fn walk(v: &Value, depth: usize, out: &mut String) {
        out.push_str(&format!(
            "{}{}\n",
            "  ".repeat(depth),
            v["name"].as_str().unwrap()
        ));
        for c in v["children"].as_array().unwrap() {
            walk(c, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(&reg.tree(ROOT).unwrap(), 0, &mut out);
    out
}

/// `data` read back from the encoding snapshots use (positional MessagePack: records as
/// arrays) and from the named one older snapshots used: both must give the same records.
#[track_caller]
fn through_snapshot(data: &RegistryData) -> RegistryData {
    let positional = rmp_serde::to_vec(data).unwrap();
    let named = rmp_serde::to_vec_named(data).unwrap();
    let read: RegistryData = rmp_serde::from_slice(&positional).unwrap();
    assert_eq!(read, rmp_serde::from_slice::<RegistryData>(&named).unwrap());
    assert_eq!(&read, data);
    read
}

#[track_caller]
fn check_code(out: Outcome, code: ErrorCode) {
    assert_eq!(out.unwrap_err().code(), code);
}

#[test]
fn supervisors_nest_and_stop_as_a_subtree_in_reverse_start_order() {
    let mut reg = Registry::default();
    run(&mut reg, 1, None, create("a", None)).unwrap();
    run(&mut reg, 2, None, create("b", Some("a"))).unwrap();
    run(&mut reg, 3, None, create("c", Some("a"))).unwrap();
    run(&mut reg, 4, None, create("d", Some("b"))).unwrap();
    run(&mut reg, 5, None, create("e", None)).unwrap();
    assert_eq!(render(&reg), "root\n  a\n    b\n      d\n    c\n  e\n");

    let mut events = Vec::new();
    let item = Stamped {
        id: Uuid::nil(),
        request_id: None,
        cmd: RegistryCmd::StopSupervisor { name: "a".into() },
        fingerprint: None,
    };
    let out = reg.apply(t(6), &item, &mut events).unwrap();
    let names = ["c", "d", "b", "a"].map(String::from).to_vec();
    assert_eq!(
        out,
        Applied::SupervisorStopped {
            stopped: names,
            stopped_count: 4
        }
    );
    let stopped: Vec<_> = events.iter().map(|e| (e.id.as_str(), e.event)).collect();
    assert_eq!(
        stopped,
        [
            ("c", "stopped"),
            ("d", "stopped"),
            ("b", "stopped"),
            ("a", "stopped")
        ]
    );
    assert_eq!(render(&reg), "root\n  e\n");
}

#[test]
fn rejections_change_nothing() {
    let mut reg = Registry::default();
    run(&mut reg, 1, None, create("a", None)).unwrap();
    let before = reg.data().clone();
    check_code(
        run(&mut reg, 2, None, create("a", None)),
        ErrorCode::Conflict,
    );
    check_code(
        run(&mut reg, 3, None, create("x", Some("nope"))),
        ErrorCode::NotFound,
    );
    check_code(
        run(
            &mut reg,
            4,
            None,
            RegistryCmd::StopSupervisor { name: ROOT.into() },
        ),
        ErrorCode::Conflict,
    );
    check_code(
        run(
            &mut reg,
            5,
            None,
            RegistryCmd::StopSupervisor { name: "zz".into() },
        ),
        ErrorCode::NotFound,
    );
    assert_eq!(reg.data(), &before);
}

#[test]
fn a_request_id_creates_once_and_replies_the_same() {
    let mut reg = Registry::default();
    let first = run(&mut reg, 1, Some("r1"), create("a", None)).unwrap();
    let again = run(&mut reg, 2, Some("r1"), create("a", None)).unwrap();
    assert_eq!(first, again);
    assert_eq!(reg.children(ROOT).count(), 1);
    // Without the request id the same create is a conflict, not a silent success.
    check_code(
        run(&mut reg, 3, None, create("a", None)),
        ErrorCode::Conflict,
    );
    // Reusing an id for another command is refused.
    check_code(
        run(
            &mut reg,
            4,
            Some("r1"),
            RegistryCmd::StopSupervisor { name: "a".into() },
        ),
        ErrorCode::Conflict,
    );
    // So is reusing it for the same command with other fields: the record keeps a
    // fingerprint of the whole command, not only its name.
    check_code(
        run(&mut reg, 5, Some("r1"), create("b", None)),
        ErrorCode::Conflict,
    );
    assert!(!reg.data().supervisors.contains_key("b"));
}

/// Goal: a refusal is remembered as data, not as text: a retry with the same request_id gets
/// the same refusal, the record holds the typed reason, and the message a client reads is
/// produced from it.
#[test]
fn a_refusal_is_remembered_as_data_and_reads_as_before() {
    let mut reg = Registry::default();
    run(&mut reg, 1, None, create("a", None)).unwrap();
    let first = run(&mut reg, 2, Some("r"), create("a", None));
    let again = run(&mut reg, 3, Some("r"), create("a", None));
    let exists = Refused::SupervisorExists { name: "a".into() };
    assert_eq!(first, Err(exists.clone()));
    assert_eq!(again, Err(exists.clone()));
    assert_eq!(reg.data().requests["r"].outcome, Err(exists.clone()));
    let wire = WireError::from(exists);
    assert_eq!(wire.code, ErrorCode::Conflict);
    assert_eq!(wire.message, "a supervisor named \"a\" already exists");
}

/// Goal: a snapshot of version 1, whose request records kept rendered replies, loads: a retry
/// of such a request gets the reply it got then, and the registry is of the current version.
#[test]
fn a_version_1_snapshot_converts_and_keeps_answering_retries() {
    #[derive(serde::Serialize)]
    struct V1Record {
        command: String,
        time: DateTime<Utc>,
        reply: Result<Value, WireError>,
    }
    #[derive(serde::Serialize)]
    struct V1Data {
        v: u32,
        nodes: BTreeMap<u64, NodeRecord>,
        supervisors: BTreeMap<String, Supervisor>,
        requests: BTreeMap<String, V1Record>,
    }
    let mut reg = Registry::default();
    run(&mut reg, 1, None, create("a", None)).unwrap();
    let old_reply = json!({"name": "a", "rendered": "by version 1"});
    let v1 = V1Data {
        v: 1,
        nodes: BTreeMap::new(),
        supervisors: reg.data().supervisors.clone(),
        requests: [(
            "r1".to_string(),
            V1Record {
                command: "create_supervisor".into(),
                time: t(1),
                reply: Ok(old_reply.clone()),
            },
        )]
        .into_iter()
        .collect(),
    };
    let bytes = rmp_serde::to_vec_named(&v1).unwrap();
    let data: RegistryData = rmp_serde::from_slice(&bytes).unwrap();
    let mut loaded = Registry::from_data(data);
    assert_eq!(loaded.data().v, REGISTRY_VERSION);
    let retry = run(&mut loaded, 2, Some("r1"), create("a", None)).unwrap();
    assert_eq!(retry, Applied::Legacy(old_reply));
}

#[test]
fn request_ids_expire_by_proposal_time() {
    let mut reg = Registry::default();
    run(&mut reg, 0, Some("old"), create("a", None)).unwrap();
    let later = limits::REQUEST_ID_TTL_SECS + 1;
    run(&mut reg, later, Some("new"), create("b", None)).unwrap();
    assert!(!reg.data().requests.contains_key("old"));
    assert!(reg.data().requests.contains_key("new"));
}

/// Goal: remembered request ids are bounded in bytes, not only in count: a flood of spawns
/// with the largest configs forgets the oldest ids first, the newest still answer a retry
/// identically, and the bookkeeping matches the records after a snapshot round trip.
#[test]
fn remembered_request_ids_are_bounded_in_bytes() {
    let mut reg = three_nodes();
    let big = "x".repeat(limits::MAX_CONFIG_BYTES - 64);
    let spawn_big = |i: usize| {
        let v = json!({"name": format!("a{i}"), "kind": "counter", "config": {"blob": big}});
        RegistryCmd::SpawnAgent(serde_json::from_value(v).unwrap())
    };
    let n = limits::MAX_REMEMBERED_REQUEST_BYTES / limits::MAX_CONFIG_BYTES + 64;
    let mut last = None;
    for i in 0..n {
        let out = run(
            &mut reg,
            10 + i as i64,
            Some(&format!("r{i}")),
            spawn_big(i),
        )
        .unwrap();
        assert!(reg.remembered_request_bytes() <= limits::MAX_REMEMBERED_REQUEST_BYTES);
        last = Some(out);
    }
    let kept = reg.data().requests.len();
    assert!(
        kept < n,
        "the byte bound forgot the oldest ids ({kept} of {n} kept)"
    );
    assert!(!reg.data().requests.contains_key("r0"));
    assert!(reg.data().requests.contains_key(&format!("r{}", n - 1)));
    let at = 10 + n as i64;
    let retry = run(&mut reg, at, Some(&format!("r{}", n - 1)), spawn_big(n - 1)).unwrap();
    assert_eq!(
        Some(retry),
        last,
        "the newest id answers its retry identically"
    );
    assert_eq!(reg.data().agents.len(), n, "the retry created nothing");
    let rebuilt = Registry::from_data(reg.data().clone());
    assert_eq!(
        rebuilt.remembered_request_bytes(),
        reg.remembered_request_bytes()
    );
}

/// Goal: a replica restored from a snapshot numbers new children as one that never
/// restarted: the next position is replicated state, not the highest one left plus one
/// (stopping the newest child used to lower it on a restored replica only).
#[test]
fn a_restored_replica_numbers_new_children_as_the_others_do() {
    let mut live = Registry::default();
    run(&mut live, 1, None, create("a", None)).unwrap();
    run(&mut live, 2, None, create("b", None)).unwrap();
    run(
        &mut live,
        3,
        None,
        RegistryCmd::StopSupervisor { name: "b".into() },
    )
    .unwrap();
    let mut restored = Registry::from_data(live.data().clone());
    let after = |reg: &mut Registry| run(reg, 4, None, create("c", None)).unwrap();
    assert_eq!(after(&mut restored), after(&mut live));
    assert_eq!(restored.data(), live.data());
}

/// Goal: an id already in use is refused, never overwritten: a spawn, or a group whose derived
/// agent ids meet an existing agent's, changes nothing (it used to replace the record and
/// leave the old supervisor's index pointing at it).
#[test]
fn a_new_agent_never_takes_an_id_in_use() {
    let mut reg = three_nodes();
    let spawn_named = |name: &str| spawn(name, ROOT, "permanent", Value::Null);
    run(&mut reg, 10, None, spawn_named("a")).unwrap();
    let before = reg.data().clone();
    check_code(
        run(&mut reg, 10, None, spawn_named("b")),
        ErrorCode::Conflict,
    );
    // A group stamped one below: its first agent's id is `a`'s.
    let group: SpawnAgentGroup =
        serde_json::from_value(json!({"name": "g", "count": 2, "template": {"kind": "counter"}}))
            .unwrap();
    check_code(
        run(&mut reg, 9, None, RegistryCmd::SpawnAgentGroup(group)),
        ErrorCode::Conflict,
    );
    assert_eq!(reg.data(), &before);
    // The refusal is the leader's draw, not the command's: a retry under the same request id
    // gets a fresh id and runs, rather than the remembered refusal.
    check_code(
        run(&mut reg, 10, Some("again"), spawn_named("b")),
        ErrorCode::Conflict,
    );
    run(&mut reg, 11, Some("again"), spawn_named("b")).unwrap();
}

/// Goal: `find_agents` from the indexes answers exactly as a walk over every agent, paged
/// and counted, by each field and by several, while agents are spawned, stopped, fail over,
/// migrate and report; and the indexes a snapshot rebuilds are the ones `apply` kept.
#[test]
fn indexed_queries_answer_as_a_scan_and_survive_a_snapshot() {
    let mut reg = three_nodes();
    let mut at = 10;
    let mut step = |reg: &mut Registry, cmd: RegistryCmd| {
        at += 1;
        let _ = run(reg, at, None, cmd);
    };
    step(&mut reg, create("s", None));
    for i in 0..40 {
        let v = json!({
            "supervisor": if i % 3 == 0 { "s" } else { ROOT }, "name": format!("a{i}"),
            "kind": if i % 2 == 0 { "counter" } else { "echo" },
            "tags": if i % 5 == 0 { json!(["hot", "t"]) } else { json!(["t"]) },
            "capabilities": if i % 7 == 0 { json!(["gpu"]) } else { json!([]) },
        });
        step(
            &mut reg,
            RegistryCmd::SpawnAgent(serde_json::from_value(v).unwrap()),
        );
    }
    let ids: Vec<Uuid> = reg.data().agents.keys().copied().collect();
    let report = |i: usize, status: AgentStatus| {
        let a = &reg.data().agents[&ids[i]];
        AgentReport {
            agent: a.id,
            node: a.node.unwrap(),
            epoch: a.epoch,
            status,
            restarts: 0,
            error: None,
            first_start: false,
            ran: false,
        }
    };
    let reports = vec![
        report(1, AgentStatus::Running),
        report(2, AgentStatus::Running),
        report(3, AgentStatus::Failed),
    ];
    step(&mut reg, RegistryCmd::ReportAgents { reports });
    step(&mut reg, RegistryCmd::StopAgent { agent: "a4".into() });
    step(
        &mut reg,
        RegistryCmd::MigrateAgent {
            agent: "a1".into(),
            to: None,
        },
    );
    step(&mut reg, status(2, NodeStatus::Down));
    step(&mut reg, RegistryCmd::RestartAgent { agent: "a3".into() });
    step(&mut reg, RegistryCmd::StopSupervisor { name: "s".into() });
    let queries = [
        json!({}),
        json!({"tag": "hot"}),
        json!({"tag": "nobody"}),
        json!({"tag": "t", "kind": "echo"}),
        json!({"capability": "gpu"}),
        json!({"status": "pending"}),
        json!({"status": "running", "node": 1}),
        json!({"node": 3}),
        json!({"supervisor": ROOT, "tag": "hot"}),
        json!({"kind": "counter", "limit": 3}),
        json!({"kind": "counter", "limit": 3, "after": ids[10].to_string()}),
        json!({"tag": "t", "count": true}),
        json!({"tag": "t", "kind": "echo", "count": true}),
        json!({"count": true}),
        json!({"node": 1, "count": true, "after": ids[5].to_string()}),
    ];
    for q in queries {
        let f: FindAgents = serde_json::from_value(q.clone()).unwrap();
        assert_eq!(f.answer(&reg), f.answer_by_scan(&reg), "{q}");
    }
    let rebuilt = Registry::from_data(through_snapshot(reg.data()));
    assert_eq!(rebuilt.index, reg.index);
    assert_eq!(rebuilt.by_node, reg.by_node);
    assert_eq!(rebuilt.children, reg.children);
    assert_eq!(rebuilt.agent_names, reg.agent_names);
    assert_eq!(rebuilt.unplaced, reg.unplaced);
    assert_eq!(rebuilt.data().next_position, reg.data().next_position);
}

#[test]
fn nodes_join_once_and_cannot_return_after_leaving() {
    let mut reg = Registry::default();
    let join = || RegistryCmd::RegisterNode {
        node_id: 7,
        name: "n7".into(),
        labels: BTreeMap::new(),
        kinds: vec![],
        capacity: 0,
    };
    let mut events = Vec::new();
    let s = |cmd| Stamped {
        id: Uuid::nil(),
        request_id: None,
        cmd,
        fingerprint: None,
    };
    reg.apply(t(1), &s(join()), &mut events).unwrap();
    reg.apply(t(2), &s(join()), &mut events).unwrap();
    assert_eq!(
        events.len(),
        1,
        "a rejoin of an up node is not a new joined event"
    );
    reg.apply(
        t(3),
        &s(RegistryCmd::RemoveNode { node_id: 7 }),
        &mut events,
    )
    .unwrap();
    assert_eq!(reg.node(7).unwrap().status, NodeStatus::Left);
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    check_code(
        reg.apply(t(4), &s(join()), &mut events),
        ErrorCode::Conflict,
    );
}

/// Goal: a registry restored from a snapshot (its content through MessagePack, derived
/// indexes rebuilt) is the registry that was saved: same records, same tree, and the next
/// command does the same on both.
#[test]
fn a_registry_rebuilt_from_its_snapshot_is_the_same() {
    let mut reg = Registry::default();
    run(&mut reg, 1, Some("r"), create("a", None)).unwrap();
    run(&mut reg, 2, None, create("b", Some("a"))).unwrap();
    let mut copy = Registry::from_data(through_snapshot(reg.data()));
    assert_eq!(copy.data(), reg.data());
    assert_eq!(render(&copy), render(&reg));
    let next = create("c", Some("b"));
    assert_eq!(
        run(&mut copy, 3, None, next.clone()),
        run(&mut reg, 3, None, next)
    );
    assert_eq!(copy.data(), reg.data());
}

#[test]
fn names_are_validated() {
    for ok in ["a", "A-b_9", &"x".repeat(128)] {
        validate_name("name", ok).unwrap();
    }
    for bad in ["", "a.b", "a b", "é", &"x".repeat(129), "a*"] {
        assert!(
            validate_name("name", bad).is_err(),
            "{bad:?} should be refused"
        );
    }
}

#[test]
fn a_huge_tree_is_cut_at_the_limit_and_says_so() {
    let mut reg = Registry::default();
    for i in 0..limits::MAX_TREE_NODES + 5 {
        run(&mut reg, i as i64, None, create(&format!("s{i}"), None)).unwrap();
    }
    let tree = reg.tree(ROOT).unwrap();
    assert_eq!(
        tree["children"].as_array().unwrap().len(),
        limits::MAX_TREE_NODES - 1
    );
    assert_eq!(tree["truncated"], true);
    let small = reg.tree("s0").unwrap();
    assert!(small.get("truncated").is_none());
}

#[test]
fn stopping_a_huge_subtree_bounds_the_names_in_the_reply() {
    let mut reg = Registry::default();
    run(&mut reg, 0, None, create("top", None)).unwrap();
    let n = limits::MAX_NAMES_IN_REPLY + 7;
    for i in 0..n {
        run(&mut reg, 1, None, create(&format!("c{i}"), Some("top"))).unwrap();
    }
    let out = run(
        &mut reg,
        2,
        None,
        RegistryCmd::StopSupervisor { name: "top".into() },
    )
    .unwrap();
    let Applied::SupervisorStopped {
        stopped,
        stopped_count,
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(stopped_count, n as u64 + 1);
    assert_eq!(stopped.len(), limits::MAX_NAMES_IN_REPLY);
    assert_eq!(reg.data().supervisors.len(), 1, "only root is left");
}

fn join(id: u64, zone: &str) -> RegistryCmd {
    RegistryCmd::RegisterNode {
        node_id: id,
        name: format!("n{id}"),
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        kinds: vec!["counter".into()],
        capacity: 0,
    }
}

fn spawn(name: &str, sup: &str, restart: &str, placement: Value) -> RegistryCmd {
    let v = json!({
        "supervisor": sup, "name": name, "kind": "counter", "restart": restart,
        "placement": placement,
    });
    RegistryCmd::SpawnAgent(serde_json::from_value(v).unwrap())
}

fn status(id: u64, status: NodeStatus) -> RegistryCmd {
    RegistryCmd::SetNodeStatus {
        node_id: id,
        status,
    }
}

fn three_nodes() -> Registry {
    let mut reg = Registry::default();
    for id in 1..=3 {
        run(&mut reg, id as i64, None, join(id, &format!("z{id}"))).unwrap();
    }
    reg
}

#[test]
fn a_down_node_s_agents_fail_over_at_a_new_epoch_and_temporaries_are_forgotten() {
    let mut reg = three_nodes();
    let pinned = json!({"node": 2});
    run(&mut reg, 10, None, spawn("p", ROOT, "permanent", json!({}))).unwrap();
    run(&mut reg, 11, None, spawn("q", ROOT, "permanent", json!({}))).unwrap();
    run(&mut reg, 12, None, spawn("t", ROOT, "temporary", json!({}))).unwrap();
    run(&mut reg, 13, None, spawn("pin", ROOT, "transient", pinned)).unwrap();
    // Least loaded: p on 1, q on 2, t on 3, pin on 2.
    let on = |reg: &Registry, n: &str| reg.agent(n).map(|a| (a.node, a.epoch, a.status));
    assert_eq!(on(&reg, "q"), Some((Some(2), 1, AgentStatus::Pending)));
    run(&mut reg, 20, None, status(2, NodeStatus::Down)).unwrap();
    let (node, epoch, st) = on(&reg, "q").unwrap();
    assert!(node.is_some_and(|n| n != 2) && epoch == 2 && st == AgentStatus::Pending);
    let pin = reg.agent("pin").unwrap();
    assert_eq!(
        (pin.node, pin.epoch),
        (None, 2),
        "a pinned agent waits for its node"
    );
    assert!(pin
        .pending_reason
        .as_deref()
        .unwrap()
        .contains("pinned to node 2"));
    // A report or checkpoint from the lost node's instance is refused.
    let q = reg.agent("q").unwrap().id;
    let stale = RegistryCmd::Checkpoint {
        agent: q,
        node: 2,
        epoch: 1,
        state: bytes::Bytes::from_static(b"x"),
    };
    check_code(run(&mut reg, 21, None, stale), ErrorCode::Conflict);
    // Node 2 comes back: the pinned agent is placed there again.
    run(&mut reg, 30, None, status(2, NodeStatus::Up)).unwrap();
    let pin = reg.agent("pin").unwrap();
    assert_eq!(
        (pin.node, pin.epoch, pin.pending_reason.clone()),
        (Some(2), 3, None)
    );
    // The temporary agent on node 3 is forgotten when node 3 goes down.
    run(&mut reg, 40, None, status(3, NodeStatus::Down)).unwrap();
    assert!(reg.agent("t").is_none());
}

#[test]
fn a_migration_hands_the_state_over_and_fences_the_source() {
    let mut reg = three_nodes();
    let out = run(&mut reg, 10, None, spawn("m", ROOT, "permanent", json!({}))).unwrap();
    let Applied::AgentSpawned(a) = out else {
        panic!("{out:?}")
    };
    let id = a.id;
    let migrate = |to| RegistryCmd::MigrateAgent {
        agent: "m".into(),
        to,
    };
    check_code(
        run(&mut reg, 11, None, migrate(Some(1))),
        ErrorCode::Conflict,
    );
    check_code(
        run(&mut reg, 11, None, migrate(Some(9))),
        ErrorCode::Capacity,
    );
    let out = run(&mut reg, 12, None, migrate(Some(3))).unwrap();
    assert!(
        matches!(out, Applied::Migrating { from: 1, to: 3, .. }),
        "{out:?}"
    );
    check_code(run(&mut reg, 13, None, migrate(None)), ErrorCode::Conflict);
    // The source's report does not end the migration.
    let report = AgentReport {
        agent: id,
        node: 1,
        epoch: 1,
        status: AgentStatus::Running,
        restarts: 0,
        error: None,
        first_start: false,
        ran: false,
    };
    let reports = RegistryCmd::ReportAgents {
        reports: vec![report],
    };
    run(&mut reg, 14, None, reports).unwrap();
    assert_eq!(reg.agent("m").unwrap().status, AgentStatus::Migrating);
    let item = HandoffItem {
        agent: id,
        node: 1,
        epoch: 1,
        state: Some(bytes::Bytes::from_static(b"state")),
        calls: vec![RememberedCall {
            id: "call-1".into(),
            result: Ok(json!({"value": 4})),
        }],
    };
    let handoff = RegistryCmd::Handoff {
        items: vec![item.clone()],
    };
    let out = run(&mut reg, 15, None, handoff.clone()).unwrap();
    let Applied::HandedOff { moved, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(moved[0].to, 3);
    let a = reg.agent("m").unwrap();
    assert_eq!(
        (a.node, a.epoch, a.status),
        (Some(3), 2, AgentStatus::Pending)
    );
    assert_eq!(reg.checkpoint(id).unwrap().state.as_ref(), b"state");
    assert_eq!(
        reg.checkpoint(id).unwrap().calls[0].id,
        "call-1",
        "answers move too"
    );
    let out = run(&mut reg, 16, None, handoff).unwrap();
    assert_eq!(
        out,
        Applied::HandedOff {
            moved: vec![],
            stale: vec![id]
        },
        "a repeated handoff changes nothing"
    );
    through_snapshot(reg.data());
}

#[test]
fn a_colocated_subtree_lives_and_moves_on_one_node() {
    let mut reg = three_nodes();
    let mut sup = create("co", None);
    if let RegistryCmd::CreateSupervisor(c) = &mut sup {
        c.placement = SupervisorPlacement::Colocate;
    }
    run(&mut reg, 10, None, sup).unwrap();
    run(&mut reg, 11, None, create("inner", Some("co"))).unwrap();
    for (i, (name, s)) in [("a", "co"), ("b", "inner"), ("c", "co")]
        .iter()
        .enumerate()
    {
        run(
            &mut reg,
            12 + i as i64,
            None,
            spawn(name, s, "permanent", json!({})),
        )
        .unwrap();
    }
    let nodes = |reg: &Registry| {
        let mut n: Vec<Option<u64>> = ["a", "b", "c"]
            .iter()
            .map(|x| reg.agent(x).unwrap().node)
            .collect();
        n.dedup();
        n
    };
    let host = reg.supervisor("co").unwrap().node;
    assert_eq!(nodes(&reg), vec![host]);
    run(&mut reg, 20, None, status(host.unwrap(), NodeStatus::Down)).unwrap();
    let moved = nodes(&reg);
    assert_eq!(moved.len(), 1, "still together: {moved:?}");
    assert_ne!(moved[0], host);
    assert_eq!(reg.supervisor("inner").unwrap().node, moved[0]);
    let out = run(
        &mut reg,
        21,
        None,
        RegistryCmd::MigrateAgent {
            agent: "b".into(),
            to: None,
        },
    )
    .unwrap();
    assert!(
        matches!(out, Applied::Migrating { moving: 3, .. }),
        "migrating one moves the whole subtree: {out:?}"
    );
}

#[test]
fn a_draining_node_takes_nothing_new_and_rebalance_evens_out() {
    let mut reg = Registry::default();
    run(&mut reg, 1, None, join(1, "a")).unwrap();
    for i in 0..6 {
        let name = format!("x{i}");
        run(
            &mut reg,
            2 + i,
            None,
            spawn(&name, ROOT, "permanent", json!({})),
        )
        .unwrap();
    }
    run(&mut reg, 10, None, join(2, "b")).unwrap();
    run(&mut reg, 11, None, join(3, "c")).unwrap();
    let drain = RegistryCmd::DrainNode {
        node_id: 2,
        cancel: false,
    };
    run(&mut reg, 12, None, drain).unwrap();
    assert_eq!(reg.node(2).unwrap().status, NodeStatus::Draining);
    run(
        &mut reg,
        13,
        None,
        spawn("new", ROOT, "permanent", json!({})),
    )
    .unwrap();
    assert_eq!(
        reg.agent("new").unwrap().node,
        Some(3),
        "not the draining node"
    );
    let plan = reg.rebalance_plan(10);
    assert!(plan.iter().all(|m| m.from == 1 && m.to == 3), "{plan:?}");
    let cancel = RegistryCmd::DrainNode {
        node_id: 2,
        cancel: true,
    };
    run(&mut reg, 14, None, cancel).unwrap();
    let out = run(&mut reg, 15, None, RegistryCmd::Rebalance { max_moves: 10 }).unwrap();
    // 6/0/1 becomes 3/2/2 (or 2/2/3): every move goes from node 1.
    let Applied::Rebalancing { moves } = out else {
        panic!("{out:?}")
    };
    assert!(
        moves.len() >= 3 && moves.iter().all(|m| m.from == 1),
        "{moves:?}"
    );
    let migrating = reg
        .data()
        .agents
        .values()
        .filter(|a| a.status == AgentStatus::Migrating)
        .count();
    assert_eq!(migrating, moves.len());
}

#[test]
fn spread_puts_a_supervisor_s_children_in_different_zones() {
    let mut reg = three_nodes();
    run(&mut reg, 10, None, create("s", None)).unwrap();
    let spread = json!({"strategy": "spread"});
    for i in 0..3 {
        let name = format!("r{i}");
        run(
            &mut reg,
            11 + i,
            None,
            spawn(&name, "s", "permanent", spread.clone()),
        )
        .unwrap();
    }
    let mut nodes: Vec<u64> = (0..3)
        .map(|i| reg.agent(&format!("r{i}")).unwrap().node.unwrap())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, [1, 2, 3]);
}

#[test]
fn tag_sets_read_what_the_old_set_encoding_wrote_and_stay_sorted() {
    use super::agents::StringSet;
    let old: std::collections::BTreeSet<String> =
        ["web".to_string(), "eu".to_string()].into_iter().collect();
    // Records in sled and snapshots were written with a BTreeSet: a MessagePack list.
    let bytes = rmp_serde::to_vec_named(&old).unwrap();
    let read: StringSet = rmp_serde::from_slice(&bytes).unwrap();
    assert!(read.contains("eu") && read.contains("web") && !read.contains("x"));
    let json: StringSet = serde_json::from_value(json!(["web", "eu", "web"])).unwrap();
    assert_eq!(json, read, "sorted and without duplicates");
    assert_eq!(serde_json::to_value(&json).unwrap(), json!(["eu", "web"]));
}

/// Goal: every outcome a request record can keep survives a snapshot (MessagePack with field
/// names, as the store writes them) unchanged, inside the record as it is stored.
#[test]
fn every_outcome_survives_a_snapshot_round_trip() {
    let mut reg = three_nodes();
    let sup = run(&mut reg, 10, None, create("s", None)).unwrap();
    let agent = run(&mut reg, 11, None, spawn("m", "s", "permanent", json!({}))).unwrap();
    let node = reg.node(1).cloned().unwrap();
    let id = Uuid::from_u128(9);
    let move_ = crate::placement::Move {
        agent: id,
        from: 1,
        to: 2,
    };
    let supervisor = Box::new(reg.supervisor("s").cloned().unwrap());
    let applied = vec![
        sup,
        agent,
        Applied::ImportBegun { import: id },
        Applied::ImportStaged {
            import: id,
            pages: 2,
            supervisors: 1,
            agents: 3,
        },
        Applied::ImportAborted { import: id },
        Applied::SubtreeImported {
            supervisor: "x".into(),
            supervisors: 1,
            agents: 2,
        },
        Applied::NodeJoined(Box::new(node)),
        Applied::NodeLeft { node_id: 3 },
        Applied::NodeStatus {
            node_id: 2,
            status: NodeStatus::Suspect,
        },
        Applied::LoadsRecorded { updated: 3 },
        Applied::Drain {
            node_id: 1,
            status: NodeStatus::Draining,
            agents: 4,
            pinned_stay: 1,
        },
        Applied::Migrating {
            agent: id,
            from: 1,
            to: 2,
            epoch: 3,
            moving: 1,
        },
        Applied::HandedOff {
            moved: vec![Moved {
                agent: id,
                to: 2,
                epoch: 4,
            }],
            stale: vec![id],
        },
        Applied::Rebalancing { moves: vec![move_] },
        Applied::SupervisorStopped {
            stopped: vec!["a".into()],
            stopped_count: 1,
        },
        Applied::AgentStopped {
            id,
            name: Some("m".into()),
        },
        Applied::RestartRequested {
            id,
            restart_requested: 2,
        },
        Applied::GroupSpawned {
            supervisor,
            agents: vec![id],
        },
        Applied::Reported {
            applied: 1,
            stale: vec![id],
        },
        Applied::Checkpointed {
            agent: id,
            checkpoint_seq: 5,
        },
        Applied::Legacy(json!({"rendered": [1, "x", null]})),
        Applied::Legacy(Value::Null),
    ];
    let refused = vec![
        Refused::RequestIdReused {
            request_id: "r".into(),
            command: "spawn_agent".into(),
        },
        Refused::NodeLeftForGood { node: 1 },
        Refused::NoNode { node: 1 },
        Refused::NodeLeft { node: 1 },
        Refused::SupervisorExists { name: "s".into() },
        Refused::TooManySupervisors { max: 1 },
        Refused::NoParent { name: "p".into() },
        Refused::ParentIsSimple { name: "p".into() },
        Refused::TooDeep { max: 8 },
        Refused::RootStops,
        Refused::NoSupervisor { name: "s".into() },
        Refused::NoSupervisorForAgent { name: "s".into() },
        Refused::AgentExists { name: "a".into() },
        Refused::TooManyAgents { max: 1 },
        Refused::GroupTooLarge { max: 1 },
        Refused::NoAgent { agent: "a".into() },
        Refused::HostUnavailable {
            supervisor: "s".into(),
            node: 2,
        },
        Refused::Placement(crate::placement::Refusal::NoRoom),
        Refused::Placement(crate::placement::Refusal::UnknownKind("k".into())),
        Refused::Placement(crate::placement::Refusal::PinnedUnavailable(3)),
        Refused::StaleCheckpoint {
            agent: id,
            epoch: 2,
            asked: 1,
        },
        Refused::CheckpointTooLarge { bytes: 9, max: 8 },
        Refused::AlreadyMigrating {
            agent: "a".into(),
            to: 2,
        },
        Refused::NothingToMigrate {
            agent: "a".into(),
            why: "no room".into(),
        },
        Refused::Pinned {
            agent: "a".into(),
            node: 1,
        },
        Refused::AlreadyThere {
            agent: "a".into(),
            node: 1,
        },
        Refused::TargetUnavailable { node: 2 },
        Refused::Legacy(WireError::new(ErrorCode::Conflict, "old text")),
        Refused::NoImport { import: id },
        Refused::ImportsBusy { max: 4 },
        Refused::ImportInvalid(ImportProblem::UnknownParent {
            supervisor: "a".into(),
            parent: "b".into(),
        }),
    ];
    let outcomes = applied
        .into_iter()
        .map(Ok)
        .chain(refused.into_iter().map(Err));
    for outcome in outcomes {
        let record = RequestRecord {
            command: "create_supervisor".into(),
            fingerprint: 7,
            time: t(1),
            outcome,
        };
        for bytes in [
            rmp_serde::to_vec(&record).unwrap(),
            rmp_serde::to_vec_named(&record).unwrap(),
        ] {
            let read: RequestRecord = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(read, record);
        }
    }
}

/// Goal: a large command applies in bounded steps (`APPLY_STEP_AGENTS` records each), a
/// reader between two steps sees it half done, and the state it ends in is the one a single
/// `apply` reaches: a 2,500-agent group, then the fail-over of the node that runs it.
#[test]
fn a_large_group_and_its_fail_over_apply_in_bounded_steps_to_the_same_state() {
    let step = limits::APPLY_STEP_AGENTS as usize;
    let count = 2 * step + step / 2;
    let group: SpawnAgentGroup = serde_json::from_value(
        json!({"name": "g", "count": count, "template": {"kind": "counter"}}),
    )
    .unwrap();
    let stamped = |at: u128, cmd: RegistryCmd| Stamped {
        id: Uuid::from_u128(at),
        request_id: Some(format!("r{at}")),
        cmd,
        fingerprint: None,
    };
    let spawn = stamped(100, RegistryCmd::SpawnAgentGroup(group));
    let mut whole = three_nodes();
    let answer = whole.apply(t(10), &spawn, &mut Vec::new()).unwrap();
    let Applied::GroupSpawned { agents, .. } = &answer else {
        panic!("a group answers its agents: {answer:?}");
    };
    assert_eq!(agents.len(), count);
    let host = whole.supervisor("g").unwrap().node.unwrap();
    let down = stamped(
        101,
        RegistryCmd::SetNodeStatus {
            node_id: host,
            status: NodeStatus::Down,
        },
    );
    whole.apply(t(11), &down, &mut Vec::new()).unwrap();

    let mut stepped = three_nodes();
    let mut events = Vec::new();
    let mut steps = 0;
    let mut next = stepped.apply_step(t(10), &spawn, &mut events);
    let stepped_answer = loop {
        match next {
            Step::Done(outcome) => break outcome.unwrap(),
            Step::More(rest) => {
                steps += 1;
                // Half applied: the supervisor and the steps so far are there, no more.
                assert_eq!(stepped.data().agents.len(), steps * step);
                assert!(stepped.supervisor("g").is_some());
                next = stepped.resume(t(10), rest, &mut events);
            }
        }
    };
    assert_eq!(steps, 2, "one step for each full {step} agents");
    assert_eq!(stepped_answer, answer);
    let mut next = stepped.apply_step(t(11), &down, &mut events);
    let mut moved_steps = 0;
    while let Step::More(rest) = next {
        moved_steps += 1;
        next = stepped.resume(t(11), rest, &mut events);
    }
    // Three phases, each 1,000 agents a step at most: the moved subtree's kinds (3 steps),
    // the listing in start order (3), the placing (3, the last one ending the command).
    assert_eq!(moved_steps, 8, "the fail-over steps through the agents too");
    assert_eq!(stepped.data(), whole.data());
    assert_eq!(stepped.load(host), 0, "every agent left the down node");
    // Remembered once, whole: a retry answers from the record.
    let again = stepped.apply(t(12), &spawn, &mut Vec::new()).unwrap();
    assert_eq!(again, answer);
}

/// Applies `item` a step at a time: the outcome, and the events of each step.
fn apply_in_steps(
    reg: &mut Registry,
    at: i64,
    item: &Stamped,
) -> (Outcome, Vec<Vec<RegistryEvent>>) {
    let mut steps = vec![Vec::new()];
    let mut next = reg.apply_step(t(at), item, steps.last_mut().unwrap());
    loop {
        match next {
            Step::Done(outcome) => return (outcome, steps),
            Step::More(rest) => {
                steps.push(Vec::new());
                next = reg.resume(t(at), rest, steps.last_mut().unwrap());
            }
        }
    }
}

/// Every agent and supervisor below `name`, and `name`, in the order OTP stops them: the
/// reverse of start order, children before their supervisor.
fn stop_order(reg: &Registry, name: &str, out: &mut Vec<String>) {
    let children: Vec<Child> = reg.children(name).cloned().collect();
    for c in children.iter().rev() {
        match c {
            Child::Agent { id } => out.push(id.to_string()),
            Child::Supervisor { name } => stop_order(reg, name, out),
        }
    }
    out.push(name.to_string());
}

/// Goal: stopping a large subtree (two groups, one of them nested, 2,100 agents) removes at
/// most `APPLY_STEP_AGENTS` records a step, owes one `stopped` event per record in OTP's
/// order, and leaves the rest of the tree alone.
#[test]
fn a_large_subtree_stops_in_bounded_steps_last_started_first() {
    let step = limits::APPLY_STEP_AGENTS as usize;
    let mut reg = three_nodes();
    let group = |name: &str, parent: &str, count: usize| {
        let v = json!({"name": name, "parent": parent, "count": count,
            "template": {"kind": "counter"}});
        RegistryCmd::SpawnAgentGroup(serde_json::from_value(v).unwrap())
    };
    run(&mut reg, 100, None, create("top", None)).unwrap();
    run(&mut reg, 200, None, create("other", None)).unwrap();
    run(
        &mut reg,
        300,
        None,
        spawn("keep", "other", "permanent", json!({})),
    )
    .unwrap();
    run(
        &mut reg,
        400,
        None,
        spawn("first", "top", "permanent", json!({})),
    )
    .unwrap();
    run(&mut reg, 10_000, None, group("g1", "top", 1200)).unwrap();
    run(&mut reg, 20_000, None, create("mid", Some("top"))).unwrap();
    run(&mut reg, 30_000, None, group("g2", "mid", 900)).unwrap();
    run(
        &mut reg,
        40_000,
        None,
        spawn("last", "top", "permanent", json!({})),
    )
    .unwrap();
    let mut expected = Vec::new();
    stop_order(&reg, "top", &mut expected);
    assert_eq!(expected.len(), 2102 + 4, "2,102 agents and 4 supervisors");

    let stop = Stamped {
        id: Uuid::from_u128(99),
        request_id: Some("stop-top".into()),
        cmd: RegistryCmd::StopSupervisor { name: "top".into() },
        fingerprint: None,
    };
    let (outcome, steps) = apply_in_steps(&mut reg, 50_000, &stop);
    let Ok(Applied::SupervisorStopped { stopped_count, .. }) = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(*stopped_count, expected.len() as u64);
    assert!(steps.len() >= 3, "{} steps", steps.len());
    assert!(
        steps.iter().all(|s| s.len() <= step),
        "a step stops at most {step}"
    );
    let stopped: Vec<String> = steps
        .iter()
        .flatten()
        .filter(|e| e.event == "stopped")
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(stopped, expected, "one event each, last started first");
    assert!(reg.supervisor("top").is_none() && reg.supervisor("g2").is_none());
    assert_eq!(reg.children("top").count(), 0);
    let left: Vec<_> = reg
        .data()
        .agents
        .values()
        .filter_map(|a| a.name.clone())
        .collect();
    assert_eq!(left, vec!["keep".to_string()], "the rest of the tree stays");
    // Remembered whole: a retry answers the same.
    assert_eq!(reg.apply(t(50_001), &stop, &mut Vec::new()), outcome);
}

/// Goal: room opened by a stop goes to the agents waiting for a node in start order, tried a
/// bounded step at a time, and the state is the one a single `apply` reaches.
#[test]
fn room_opened_by_a_stop_goes_to_waiting_agents_in_bounded_steps() {
    let step = limits::APPLY_STEP_AGENTS as usize;
    let mut reg = Registry::default();
    let mut one = join(1, "z1");
    if let RegistryCmd::RegisterNode { capacity, .. } = &mut one {
        *capacity = 1500;
    }
    run(&mut reg, 1, None, one).unwrap();
    run(&mut reg, 2, None, join(2, "z2")).unwrap();
    let group = json!({"name": "big", "count": 1500,
        "template": {"kind": "counter", "placement": {"node": 1}}});
    let group = RegistryCmd::SpawnAgentGroup(serde_json::from_value(group).unwrap());
    run(&mut reg, 100_000, None, group).unwrap();
    for i in 0..2500 {
        let name = format!("w{i:04}");
        run(
            &mut reg,
            10 + i,
            None,
            spawn(&name, ROOT, "permanent", json!({})),
        )
        .unwrap();
    }
    assert_eq!(reg.load(2), 2500, "node 1 is full");
    run(&mut reg, 150_000, None, status(2, NodeStatus::Down)).unwrap();
    assert_eq!(reg.unplaced.len(), 2500, "no room left: they wait");
    let stop = Stamped {
        id: Uuid::from_u128(99),
        request_id: None,
        cmd: RegistryCmd::StopSupervisor { name: "big".into() },
        fingerprint: None,
    };
    let mut whole = reg.clone();
    whole.apply(t(200_000), &stop, &mut Vec::new()).unwrap();
    let (outcome, steps) = apply_in_steps(&mut reg, 200_000, &stop);
    outcome.unwrap();
    assert!(steps.iter().all(|s| s.len() <= step), "bounded steps");
    assert_eq!(reg.data(), whole.data());
    assert!(!reg.placing_due, "nothing left for the next command");
    let placed: Vec<_> = steps
        .iter()
        .flatten()
        .filter(|e| e.event == "placed")
        .collect();
    assert_eq!(placed.len(), 1500, "as many as the room");
    for i in 0..2500 {
        let a = reg.agent(&format!("w{i:04}")).unwrap();
        assert_eq!(
            a.node.is_some(),
            i < 1500,
            "w{i:04}: first started, first placed"
        );
    }
}

/// Goal: a snapshot whose agent map claims four billion entries is refused with an error, not
/// an allocation of what the header claims (which aborts the process).
#[test]
fn a_snapshot_map_claiming_billions_of_entries_is_an_error() {
    for field in ["agents", "checkpoints"] {
        let mut bytes = vec![0x81, 0xa0 | field.len() as u8];
        bytes.extend_from_slice(field.as_bytes());
        bytes.extend_from_slice(&[0xdf, 0xff, 0xff, 0xff, 0xff]);
        let decoded: Result<RegistryData, _> = rmp_serde::from_slice(&bytes);
        assert!(decoded.is_err(), "{field}: {decoded:?}");
    }
}

/// Goal: OTP's `start_child`: an agent whose first start fails on its node is removed (with a
/// `start_failed` event and its error kept for waiters), leaving its siblings alone; once it
/// has run, the same report is a crash and it stays; a stale report (older epoch) changes
/// nothing; the kept errors are bounded and survive a snapshot.
#[test]
fn a_first_start_that_fails_removes_the_agent_once_it_never_ran() {
    let mut reg = three_nodes();
    run(
        &mut reg,
        1,
        None,
        spawn("good", ROOT, "permanent", json!(null)),
    )
    .unwrap();
    run(
        &mut reg,
        2,
        None,
        spawn("bad", ROOT, "permanent", json!(null)),
    )
    .unwrap();
    let (good, bad) = (
        reg.agent("good").unwrap().clone(),
        reg.agent("bad").unwrap().clone(),
    );
    let report = |a: &Agent, status, first_start, epoch| RegistryCmd::ReportAgents {
        reports: vec![AgentReport {
            agent: a.id,
            node: a.node.unwrap(),
            epoch,
            status,
            restarts: 0,
            error: Some("exec: /bin/nope is not allowed".into()),
            first_start,
            ran: false,
        }],
    };
    run(
        &mut reg,
        3,
        None,
        report(&good, AgentStatus::Running, false, good.epoch),
    )
    .unwrap();
    assert!(reg.agent("good").unwrap().started);
    // A stale report of the failed start changes nothing.
    let stale = report(&bad, AgentStatus::Failed, true, bad.epoch + 1);
    run(&mut reg, 4, None, stale).unwrap();
    assert!(reg.agent("bad").is_some());

    let mut events = Vec::new();
    let item = Stamped {
        id: Uuid::from_u128(1_000_005),
        request_id: None,
        cmd: report(&bad, AgentStatus::Failed, true, bad.epoch),
        fingerprint: None,
    };
    reg.apply(t(5), &item, &mut events).unwrap();
    assert!(reg.agent("bad").is_none(), "never ran: removed");
    assert_eq!(reg.agent("good").unwrap().status, AgentStatus::Running);
    let failure = reg.start_failure(bad.id).expect("kept for waiters");
    assert_eq!(failure.error, "exec: /bin/nope is not allowed");
    assert_eq!(failure.node, bad.node.unwrap());
    assert!(
        events
            .iter()
            .any(|e| e.event == "start_failed" && e.id == bad.id.to_string()),
        "{events:?}"
    );

    // An agent that ran: a failed start is a crash, and it stays.
    let cmd = report(&good, AgentStatus::Failed, true, good.epoch);
    run(&mut reg, 6, None, cmd).unwrap();
    let kept = reg.agent("good").expect("it ran: kept");
    assert_eq!(kept.status, AgentStatus::Failed);
    assert!(reg.start_failure(good.id).is_none());

    // Bounded: only the last ones are kept, oldest dropped first; a snapshot keeps them.
    for i in 0..(crate::limits::MAX_START_FAILURES as i64 + 5) {
        let name = format!("b{i}");
        let at = 100 + 2 * i;
        run(
            &mut reg,
            at,
            None,
            spawn(&name, ROOT, "permanent", json!(null)),
        )
        .unwrap();
        let a = reg.agent(&name).unwrap().clone();
        run(
            &mut reg,
            at + 1,
            None,
            report(&a, AgentStatus::Failed, true, a.epoch),
        )
        .unwrap();
    }
    assert_eq!(
        reg.data().start_failures.len(),
        crate::limits::MAX_START_FAILURES
    );
    assert!(reg.start_failure(bad.id).is_none(), "the oldest went first");
    let rebuilt = Registry::from_data(through_snapshot(reg.data()));
    assert_eq!(rebuilt.data().start_failures, reg.data().start_failures);

    // A report that says the agent ran meanwhile (a start and a failure coalesced on its
    // node), or an agent with a checkpoint: not a first start, kept.
    for (name, at) in [("ran", 4_000), ("saved", 4_010)] {
        run(
            &mut reg,
            at,
            None,
            spawn(name, ROOT, "permanent", json!(null)),
        )
        .unwrap();
    }
    let ran = reg.agent("ran").unwrap().clone();
    let mut cmd = report(&ran, AgentStatus::Failed, true, ran.epoch);
    if let RegistryCmd::ReportAgents { reports } = &mut cmd {
        reports[0].ran = true;
    }
    run(&mut reg, 4_001, None, cmd).unwrap();
    assert!(reg.agent("ran").unwrap().started, "it ran: kept");
    let saved = reg.agent("saved").unwrap().clone();
    let checkpoint = RegistryCmd::ImportState {
        agent: "saved".into(),
        state: bytes::Bytes::from_static(b"\x80"),
    };
    run(&mut reg, 4_011, None, checkpoint).unwrap();
    let cmd = report(&saved, AgentStatus::Failed, true, saved.epoch);
    run(&mut reg, 4_012, None, cmd).unwrap();
    assert!(reg.agent("saved").is_some(), "its state is kept with it");

    // Agents of a data dir written before records said whether they ran count as having run:
    // an upgrade never removes one for a failed start.
    run(
        &mut reg,
        5_000,
        None,
        spawn("fresh", ROOT, "permanent", json!(null)),
    )
    .unwrap();
    let mut old = through_snapshot(reg.data());
    assert!(
        !Registry::from_data(old.clone())
            .agent("fresh")
            .unwrap()
            .started
    );
    old.v = 5;
    assert!(Registry::from_data(old).agent("fresh").unwrap().started);
    // So do those that entries of an older version spawn, replayed past a snapshot: every
    // replica agrees however much of the old log it replays.
    reg.set_entry_version(5);
    run(
        &mut reg,
        5_001,
        None,
        spawn("replayed", ROOT, "permanent", json!(null)),
    )
    .unwrap();
    assert!(reg.agent("replayed").unwrap().started);
    reg.set_entry_version(REGISTRY_VERSION);
}

/// Goal: live changes. `update_supervisor` changes the policy in place (refusing
/// `simple_one_for_one` over nested supervisors, and unknown names); `update_agent` moves an
/// agent between tags in the indexes, and a changed config asks a restart while the same
/// config does not.
#[test]
fn supervisors_and_agents_change_in_place() {
    let mut reg = three_nodes();
    run(&mut reg, 1, None, create("s", None)).unwrap();
    run(&mut reg, 2, None, create("inner", Some("s"))).unwrap();
    let update = |v: Value| RegistryCmd::UpdateSupervisor(serde_json::from_value(v).unwrap());
    let out = run(
        &mut reg,
        3,
        None,
        update(json!({"name": "s", "strategy": "one_for_all", "max_restarts": 7})),
    )
    .unwrap();
    assert!(matches!(out, Applied::SupervisorUpdated(_)), "{out:?}");
    let s = reg.supervisor("s").unwrap();
    assert_eq!(
        (s.strategy, s.max_restarts, s.max_seconds),
        (Strategy::OneForAll, 7, 5)
    );
    check_code(
        run(
            &mut reg,
            4,
            None,
            update(json!({"name": "s", "strategy": "simple_one_for_one"})),
        ),
        ErrorCode::Conflict,
    );
    check_code(
        run(
            &mut reg,
            5,
            None,
            update(json!({"name": "nope", "max_seconds": 9})),
        ),
        ErrorCode::NotFound,
    );
    assert_eq!(reg.supervisor("s").unwrap().strategy, Strategy::OneForAll);

    let spawn = json!({"name": "a", "supervisor": "s", "kind": "counter", "tags": ["blue"]});
    run(
        &mut reg,
        6,
        None,
        RegistryCmd::SpawnAgent(serde_json::from_value(spawn).unwrap()),
    )
    .unwrap();
    let update = |v: Value| RegistryCmd::UpdateAgent(serde_json::from_value(v).unwrap());
    let find = |reg: &Registry, tag: &str| {
        let q = FindAgents {
            tag: Some(tag.into()),
            count: true,
            ..Default::default()
        };
        q.answer(reg).unwrap()["count"].as_u64().unwrap()
    };
    run(
        &mut reg,
        7,
        None,
        update(json!({"agent": "a", "tags": ["green"]})),
    )
    .unwrap();
    assert_eq!((find(&reg, "blue"), find(&reg, "green")), (0, 1));
    assert_eq!(
        reg.agent("a").unwrap().restart_requested,
        0,
        "labels restart nothing"
    );
    run(
        &mut reg,
        8,
        None,
        update(json!({"agent": "a", "config": {"start": 5}})),
    )
    .unwrap();
    let a = reg.agent("a").unwrap();
    assert_eq!((a.restart_requested, &a.config), (1, &json!({"start": 5})));
    run(
        &mut reg,
        9,
        None,
        update(json!({"agent": "a", "config": {"start": 5}})),
    )
    .unwrap();
    assert_eq!(
        reg.agent("a").unwrap().restart_requested,
        1,
        "the same config"
    );
    run(
        &mut reg,
        10,
        None,
        update(json!({"agent": "a", "config": null})),
    )
    .unwrap();
    assert_eq!(reg.agent("a").unwrap().config, Value::Null);
    check_code(
        run(
            &mut reg,
            11,
            None,
            update(json!({"agent": "zz", "tags": []})),
        ),
        ErrorCode::NotFound,
    );
    let rebuilt = Registry::from_data(through_snapshot(reg.data()));
    assert_eq!(find(&rebuilt, "green"), 1);
}

/// Goal: a finished agent is recorded with its result only from the node and epoch that ran
/// it; the records are bounded by bytes, oldest dropped first; a registry rebuilt from its
/// snapshot drops the same ones next.
#[test]
fn finished_agents_are_kept_bounded_and_rebuilt_alike() {
    let mut reg = three_nodes();
    let finish = |a: &Agent, node: u64, result: Value| RegistryCmd::FinishAgents {
        items: vec![FinishAgent {
            agent: a.id,
            node,
            epoch: a.epoch,
            restart_requested: a.restart_requested,
            status: AgentStatus::Stopped,
            result: Some(result),
            error: None,
            forget: false,
        }],
    };
    run(
        &mut reg,
        1,
        None,
        spawn("j", ROOT, "transient", json!(null)),
    )
    .unwrap();
    let j = reg.agent("j").unwrap().clone();
    let other = j.node.unwrap() % 3 + 1;
    let out = run(&mut reg, 2, None, finish(&j, other, json!(1))).unwrap();
    assert!(
        matches!(out, Applied::Finished { recorded: 0, .. }),
        "{out:?}"
    );
    assert!(reg.finished("j").is_none());
    run(
        &mut reg,
        3,
        None,
        finish(&j, j.node.unwrap(), json!({"n": 7})),
    )
    .unwrap();
    let f = reg.finished("j").expect("recorded");
    assert_eq!(f.result, Some(json!({"n": 7})));
    assert_eq!(reg.agent("j").unwrap().status, AgentStatus::Stopped);
    assert_eq!(reg.finished(&j.id.to_string()).unwrap().agent, j.id);
    // A finish of an earlier run (retried after a restart was asked) is stale.
    run(
        &mut reg,
        4,
        None,
        RegistryCmd::RestartAgent { agent: "j".into() },
    )
    .unwrap();
    let out = run(&mut reg, 5, None, finish(&j, j.node.unwrap(), json!(0))).unwrap();
    assert!(
        matches!(out, Applied::Finished { recorded: 0, .. }),
        "{out:?}"
    );
    assert_eq!(reg.finished("j").unwrap().result, Some(json!({"n": 7})));
    // A temporary agent finishes and is forgotten in one step; its record answers by name.
    run(
        &mut reg,
        6,
        None,
        spawn("tmp", ROOT, "temporary", json!(null)),
    )
    .unwrap();
    let tmp = reg.agent("tmp").unwrap().clone();
    let mut cmd = finish(&tmp, tmp.node.unwrap(), json!("ok"));
    if let RegistryCmd::FinishAgents { items } = &mut cmd {
        items[0].forget = true;
    }
    run(&mut reg, 7, None, cmd).unwrap();
    assert!(reg.agent("tmp").is_none());
    assert_eq!(reg.finished("tmp").unwrap().agent, tmp.id);

    // Results of 60 KB: the byte bound holds about 550 of them.
    let big = json!("x".repeat(60_000));
    let n = crate::limits::MAX_FINISHED_BYTES / 60_000 + 20;
    for i in 0..n as i64 {
        let name = format!("big{i}");
        run(
            &mut reg,
            10 + 2 * i,
            None,
            spawn(&name, ROOT, "transient", json!(null)),
        )
        .unwrap();
        let a = reg.agent(&name).unwrap().clone();
        run(
            &mut reg,
            11 + 2 * i,
            None,
            finish(&a, a.node.unwrap(), big.clone()),
        )
        .unwrap();
    }
    assert!(reg.finished("j").is_none(), "the oldest went first");
    assert!(reg.finished("big0").is_none());
    assert!(reg.finished(&format!("big{}", n - 1)).is_some());
    let kept = reg.data().finished.len();
    assert!(kept < n && kept > n / 2, "{kept} of {n}");

    let mut rebuilt = Registry::from_data(through_snapshot(reg.data()));
    for r in [&mut reg, &mut rebuilt] {
        run(
            r,
            5_000,
            None,
            spawn("last", ROOT, "transient", json!(null)),
        )
        .unwrap();
        let a = r.agent("last").unwrap().clone();
        run(r, 5_001, None, finish(&a, a.node.unwrap(), big.clone())).unwrap();
    }
    assert_eq!(rebuilt.data(), reg.data());
}

/// Goal: a spawn resolves its template when applied (overrides on top), a group of a template
/// whose configs would pass the group limit is refused whole, and a deleted template starts
/// nothing.
#[test]
fn spawns_resolve_their_template_when_applied() {
    let mut reg = three_nodes();
    let register = |name: &str, config: Value| {
        let v = json!({"name": name, "kind": "counter", "config": config, "tags": ["a"]});
        RegistryCmd::RegisterTemplate(serde_json::from_value(v).unwrap())
    };
    run(&mut reg, 1, None, register("small", json!({"start": 1}))).unwrap();
    run(
        &mut reg,
        2,
        None,
        register("big", json!("x".repeat(15_000))),
    )
    .unwrap();
    check_code(
        run(&mut reg, 3, None, register("small", json!(null))),
        ErrorCode::Conflict,
    );
    let spawn = |v: Value| RegistryCmd::SpawnAgent(serde_json::from_value(v).unwrap());
    let out = run(
        &mut reg,
        4,
        None,
        spawn(json!({"name": "s1", "template": "small", "overrides": {"config": null}})),
    )
    .unwrap();
    assert!(matches!(out, Applied::AgentSpawned(_)), "{out:?}");
    let a = reg.agent("s1").unwrap();
    assert_eq!((a.kind.as_str(), &a.config), ("counter", &Value::Null));
    assert!(a.tags.contains("a"));
    let group = |count: u32| {
        let v = json!({"name": "g", "count": count, "template": "big"});
        RegistryCmd::SpawnAgentGroup(serde_json::from_value(v).unwrap())
    };
    check_code(run(&mut reg, 5, None, group(1_000)), ErrorCode::TooLarge);
    assert!(reg.supervisor("g").is_none(), "nothing of the group");
    run(&mut reg, 6, None, group(3)).unwrap();
    assert_eq!(reg.agent("g-2").unwrap().kind, "counter");
    run(
        &mut reg,
        7,
        None,
        RegistryCmd::DeleteTemplate {
            name: "small".into(),
        },
    )
    .unwrap();
    check_code(
        run(
            &mut reg,
            8,
            None,
            spawn(json!({"name": "s2", "template": "small"})),
        ),
        ErrorCode::NotFound,
    );
    let rebuilt = Registry::from_data(through_snapshot(reg.data()));
    assert!(rebuilt.template("big").is_some() && rebuilt.template("small").is_none());
}

/// A subtree document as a client assembles it from `export_copy`'s pages of at most `budget`
/// bytes, read back from its JSON as an importer reads it; with the number of pages.
fn export_document(
    reg: &Registry,
    name: &str,
    budget: usize,
) -> (SubtreeDocument, Vec<ImportPage>) {
    let copy = reg.export_copy(name).unwrap();
    let h = copy.header();
    let mut doc = SubtreeDocument {
        format: h.format,
        version: h.version,
        root: h.root,
        cluster: None,
        exported_at: None,
        supervisors: Vec::new(),
        agents: Vec::new(),
    };
    let mut pages = Vec::new();
    let mut cursor = Some(0);
    while let Some(c) = cursor {
        let (sups, agents, next) = copy.page(c, budget);
        let page = ImportPage {
            import: Uuid::nil(),
            page: pages.len() as u32,
            supervisors: sups
                .into_iter()
                .map(|v| serde_json::from_value(v).unwrap())
                .collect(),
            agents: agents
                .into_iter()
                .map(|v| serde_json::from_value(v).unwrap())
                .collect(),
            request_id: None,
        };
        doc.supervisors.extend(page.supervisors.iter().cloned());
        doc.agents.extend(page.agents.iter().cloned());
        pages.push(page);
        cursor = next;
    }
    (doc, pages)
}

fn checkpoint(reg: &mut Registry, at: i64, agent: &str, state: &[u8]) {
    let a = reg.agent(agent).unwrap();
    let cmd = RegistryCmd::Checkpoint {
        agent: a.id,
        node: a.node.unwrap(),
        epoch: a.epoch,
        state: bytes::Bytes::copy_from_slice(state),
    };
    run(reg, at, None, cmd).unwrap();
}

/// A source cluster's subtree: `s` holds `a1`, then supervisor `inner` (rest_for_one, holding
/// `a3`), then `a2`; `a1` and `a3` have checkpoints.
fn source_subtree() -> Registry {
    let mut reg = three_nodes();
    run(&mut reg, 10, None, create("s", None)).unwrap();
    run(&mut reg, 11, None, spawn("a1", "s", "permanent", json!({}))).unwrap();
    let mut inner = create("inner", Some("s"));
    if let RegistryCmd::CreateSupervisor(c) = &mut inner {
        c.strategy = Strategy::RestForOne;
        c.max_restarts = 7;
    }
    run(&mut reg, 12, None, inner).unwrap();
    run(&mut reg, 13, None, spawn("a2", "s", "transient", json!({}))).unwrap();
    run(
        &mut reg,
        14,
        None,
        spawn("a3", "inner", "permanent", json!({})),
    )
    .unwrap();
    run(
        &mut reg,
        15,
        None,
        spawn("outside", ROOT, "permanent", json!({})),
    )
    .unwrap();
    checkpoint(&mut reg, 16, "a1", b"state of a1");
    checkpoint(&mut reg, 17, "a3", &[7u8; 3000]);
    checkpoint(&mut reg, 18, "a3", &[9u8; 3000]);
    reg
}

fn children_names(reg: &Registry, sup: &str) -> Vec<String> {
    reg.children(sup)
        .map(|c| match c {
            Child::Supervisor { name } => name.clone(),
            Child::Agent { id } => reg.agent(&id.to_string()).unwrap().name.clone().unwrap(),
        })
        .collect()
}

/// Goal (issue 18.5): a subtree exported in pages and imported in pages under a prefix in
/// another registry is the same tree, with the same policies, start order and checkpoints;
/// staging changes nothing visible and survives a snapshot; the commit empties the stage.
#[test]
fn a_subtree_exported_in_pages_imports_elsewhere_as_the_same_tree() {
    let src = source_subtree();
    let (doc, pages) = export_document(&src, "s", 4_000);
    assert!(
        pages.len() >= 2,
        "a small budget cuts the document into pages"
    );
    assert_eq!(doc.supervisors.len(), 2);
    assert_eq!(doc.agents.len(), 3, "`outside` is not in the subtree");

    let mut dst = three_nodes();
    run(&mut dst, 5, None, create("team", None)).unwrap();
    let before = dst.data().clone();
    let begin = ImportBegin {
        parent: Some("team".into()),
        prefix: "x-".into(),
        header: doc.header(),
        request_id: None,
    };
    let Applied::ImportBegun { import } =
        run(&mut dst, 20, None, RegistryCmd::ImportBegin(begin)).unwrap()
    else {
        panic!("not begun");
    };
    for (i, p) in pages.iter().enumerate() {
        let page = ImportPage {
            import,
            ..p.clone()
        };
        run(
            &mut dst,
            21 + i as i64,
            None,
            RegistryCmd::ImportPage(page.clone()),
        )
        .unwrap();
        // A page sent again is staged once.
        run(&mut dst, 21 + i as i64, None, RegistryCmd::ImportPage(page)).unwrap();
    }
    let staged = dst.staged_imports().next().unwrap().clone();
    assert_eq!((staged.supervisors.len(), staged.agents.len()), (2, 3));
    assert_eq!(
        dst.data().supervisors,
        before.supervisors,
        "staging creates nothing"
    );
    assert_eq!(dst.data().agents, before.agents);
    let mut restored = Registry::from_data(through_snapshot(dst.data()));
    let commit = RegistryCmd::ImportCommit {
        import,
        supervisors: 2,
        agents: 3,
    };
    let out = run(&mut restored, 40, None, commit).unwrap();
    assert_eq!(
        out,
        Applied::SubtreeImported {
            supervisor: "x-s".into(),
            supervisors: 2,
            agents: 3
        }
    );
    assert_eq!(restored.staged_imports().count(), 0);
    assert_eq!(
        children_names(&restored, "x-s"),
        ["x-a1", "x-inner", "x-a2"]
    );
    assert_eq!(children_names(&restored, "x-inner"), ["x-a3"]);
    assert_eq!(
        restored.supervisor("x-s").unwrap().parent.as_deref(),
        Some("team")
    );
    let inner = restored.supervisor("x-inner").unwrap();
    assert_eq!(
        (inner.strategy, inner.max_restarts),
        (Strategy::RestForOne, 7)
    );
    for (name, old) in [("a1", "a1"), ("a2", "a2"), ("a3", "a3")] {
        let new = restored.agent(&format!("x-{name}")).unwrap();
        let was = src.agent(old).unwrap();
        assert_ne!(new.id, was.id, "ids are drawn afresh");
        assert_eq!((new.restart, &new.kind), (was.restart, &was.kind));
        assert!(new.node.is_some() && new.started);
        let (c_new, c_old) = (restored.checkpoint(new.id), src.checkpoint(was.id));
        assert_eq!(
            c_new.map(|c| (&c.state, c.seq)),
            c_old.map(|c| (&c.state, c.seq))
        );
    }
    // The new positions follow every existing one.
    let p = restored.data().next_position;
    assert!(restored.agent("x-a2").unwrap().position < p);
    // Importing it again under the same prefix clashes, as a whole, and changes nothing.
    let again = ImportSubtree {
        parent: None,
        prefix: "x-".into(),
        document: doc.clone(),
        request_id: None,
    };
    let before = restored.data().clone();
    let out = run(
        &mut restored,
        100,
        None,
        RegistryCmd::ImportSubtree(again.clone()),
    );
    assert_eq!(out, Err(Refused::SupervisorExists { name: "x-s".into() }));
    assert_eq!(restored.data(), &before);
    // Under another prefix it is a second copy; an agent that had ended for good (a finished
    // transient) stays ended, and does not run again.
    assert_eq!(doc.agents[1].status, Some(AgentStatus::Pending));
    let mut ended = again.clone();
    ended.document.agents[1].status = Some(AgentStatus::Stopped);
    let other = ImportSubtree {
        prefix: "y-".into(),
        ..ended
    };
    run(&mut restored, 200, None, RegistryCmd::ImportSubtree(other)).unwrap();
    let names = children_names(&restored, "y-s");
    assert_eq!(names, ["y-a1", "y-inner", "y-a2"]);
    assert_eq!(restored.agent("y-a2").unwrap().status, AgentStatus::Stopped);
    assert_eq!(restored.agent("y-a1").unwrap().status, AgentStatus::Pending);
}

/// Goal: an import that is refused, abandoned or broken off changes nothing but its stage,
/// which expires; a document of a newer version is refused with a clear error.
#[test]
fn a_failed_or_abandoned_import_changes_nothing() {
    let src = source_subtree();
    let (doc, pages) = export_document(&src, "s", 1);
    assert_eq!(pages.len(), 5, "one item per page");
    let mut dst = three_nodes();
    let begin = |prefix: &str| {
        RegistryCmd::ImportBegin(ImportBegin {
            parent: None,
            prefix: prefix.into(),
            header: doc.header(),
            request_id: None,
        })
    };
    let Applied::ImportBegun { import } = run(&mut dst, 20, None, begin("a-")).unwrap() else {
        panic!("not begun");
    };
    let page = |n: usize| {
        RegistryCmd::ImportPage(ImportPage {
            import,
            ..pages[n].clone()
        })
    };
    run(&mut dst, 21, None, page(0)).unwrap();
    check_code(run(&mut dst, 22, None, page(2)), ErrorCode::Conflict);
    run(&mut dst, 21, None, page(1)).unwrap();
    let before = dst.data().clone();
    // Half a document does not commit: the commit says what was sent.
    let mut half = dst.clone();
    let commit = RegistryCmd::ImportCommit {
        import,
        supervisors: 2,
        agents: 3,
    };
    check_code(run(&mut half, 23, None, commit), ErrorCode::Conflict);
    assert_eq!(half.data(), &before);
    // Abandoned: dropped once IMPORT_TTL_SECS pass without a page, by proposal time.
    run(
        &mut dst,
        21 + limits::IMPORT_TTL_SECS,
        None,
        create("late", None),
    )
    .unwrap();
    assert_eq!(dst.staged_imports().count(), 1, "not yet");
    run(
        &mut dst,
        22 + limits::IMPORT_TTL_SECS,
        None,
        create("later", None),
    )
    .unwrap();
    assert_eq!(dst.staged_imports().count(), 0);
    check_code(
        run(&mut dst, 23 + limits::IMPORT_TTL_SECS, None, page(2)),
        ErrorCode::NotFound,
    );
    // Aborted.
    let Applied::ImportBegun { import } = run(&mut dst, 1000, None, begin("b-")).unwrap() else {
        panic!("not begun");
    };
    run(&mut dst, 1001, None, RegistryCmd::ImportAbort { import }).unwrap();
    let commit = RegistryCmd::ImportCommit {
        import,
        supervisors: 0,
        agents: 0,
    };
    check_code(run(&mut dst, 1002, None, commit), ErrorCode::NotFound);
    // A newer version, a kind no node runs, a loop: refused, nothing changes.
    let data = dst.data().clone();
    let mut newer = doc.clone();
    newer.version = SUBTREE_VERSION + 1;
    let mut unknown_kind = doc.clone();
    unknown_kind.agents[0].kind = "nope".into();
    let mut looped = doc.clone();
    looped.supervisors[1].parent = Some("inner".into());
    let mut clash = doc.clone();
    clash.agents[1].name = Some("a1".into());
    let mut id_like = doc.clone();
    id_like.agents[0].name = Some("0123456789abcdef".into());
    for (document, prefix, code) in [
        (newer.clone(), "c-", ErrorCode::BadRequest),
        (unknown_kind, "c-", ErrorCode::BadRequest),
        (looped, "c-", ErrorCode::BadRequest),
        (clash, "c-", ErrorCode::BadRequest),
        // Prefix and name together read as a UUID.
        (id_like, "0123456789abcdef", ErrorCode::BadRequest),
    ] {
        let cmd = RegistryCmd::ImportSubtree(ImportSubtree {
            parent: None,
            prefix: prefix.into(),
            document,
            request_id: None,
        });
        check_code(run(&mut dst, 1003, None, cmd), code);
        assert_eq!(dst.data(), &data);
    }
    // Under a colocated parent, whose node does not run a kind of the document.
    let mut host = create("host", None);
    if let RegistryCmd::CreateSupervisor(c) = &mut host {
        c.placement = SupervisorPlacement::Colocate;
    }
    run(&mut dst, 1003, None, host).unwrap();
    let mut with_echo = dst.clone();
    let mut echo_node = join(9, "z9");
    if let RegistryCmd::RegisterNode { kinds, .. } = &mut echo_node {
        *kinds = vec!["echo".into()];
    }
    run(&mut with_echo, 1003, None, echo_node).unwrap();
    let before = with_echo.data().clone();
    let mut echo = doc.clone();
    echo.agents[0].kind = "echo".into();
    let cmd = RegistryCmd::ImportSubtree(ImportSubtree {
        parent: Some("host".into()),
        prefix: "h-".into(),
        document: echo,
        request_id: None,
    });
    check_code(run(&mut with_echo, 1003, None, cmd), ErrorCode::Capacity);
    assert_eq!(with_echo.data(), &before);
    let mut bad_seq = doc.agents[0].clone();
    bad_seq.checkpoint.as_mut().unwrap().seq = u64::MAX;
    assert!(bad_seq.validate().is_err());
    let err = newer.header().check().unwrap_err();
    assert!(err.message.contains("version 2"), "{}", err.message);
    // At most MAX_STAGED_IMPORTS at once.
    for i in 0..limits::MAX_STAGED_IMPORTS {
        run(&mut dst, 1010 + i as i64, None, begin(&format!("p{i}-"))).unwrap();
    }
    check_code(run(&mut dst, 1100, None, begin("q-")), ErrorCode::Capacity);
}

/// Goal: a large import's commit applies in bounded steps to the state one `apply` reaches.
#[test]
fn a_large_import_commits_in_bounded_steps() {
    let step = limits::APPLY_STEP_AGENTS as usize;
    let count = 2 * step + 10;
    let doc = SubtreeDocument {
        format: SUBTREE_FORMAT.into(),
        version: SUBTREE_VERSION,
        root: "big".into(),
        cluster: None,
        exported_at: None,
        supervisors: vec![serde_json::from_value(json!({"name": "big"})).unwrap()],
        agents: (0..count)
            .map(|i| {
                serde_json::from_value(json!({
                    "name": format!("b{i}"), "kind": "counter", "supervisor": "big",
                    "checkpoint": {"seq": 1, "time": "2026-01-01T00:00:00Z", "state": "AAE="}
                }))
                .unwrap()
            })
            .collect(),
    };
    let item = Stamped {
        id: Uuid::from_u128(77),
        request_id: None,
        cmd: RegistryCmd::ImportSubtree(ImportSubtree {
            parent: None,
            prefix: String::new(),
            document: doc,
            request_id: None,
        }),
        fingerprint: None,
    };
    let mut stepped = three_nodes();
    let mut whole = stepped.clone();
    let (out, steps) = apply_in_steps(&mut stepped, 50, &item);
    assert!(out.is_ok());
    assert!(steps.len() >= 3, "{} steps", steps.len());
    assert!(steps.iter().all(|s| s.len() <= step + 1));
    assert_eq!(whole.apply(t(50), &item, &mut Vec::new()), out);
    assert_eq!(stepped.data(), whole.data());
    assert_eq!(stepped.data().agents.len(), count);
    let b0 = stepped.agent("b0").unwrap();
    assert_eq!(stepped.checkpoint(b0.id).unwrap().state.as_ref(), &[0u8, 1]);
}

/// Goal: every import command reads back from a log entry, as the store writes it (MessagePack,
/// the command an internally tagged enum, so serde buffers its fields) and as JSON: a leader
/// must never log what its followers cannot read.
#[test]
fn import_commands_read_back_from_a_log_entry() {
    let src = source_subtree();
    let (doc, pages) = export_document(&src, "s", usize::MAX);
    let import = Uuid::from_u128(5);
    let cmds = vec![
        RegistryCmd::ImportBegin(ImportBegin {
            parent: Some("p".into()),
            prefix: "x-".into(),
            header: doc.header(),
            request_id: None,
        }),
        RegistryCmd::ImportPage(ImportPage {
            import,
            ..pages[0].clone()
        }),
        RegistryCmd::ImportCommit {
            import,
            supervisors: 2,
            agents: 3,
        },
        RegistryCmd::ImportAbort { import },
        RegistryCmd::ImportSubtree(ImportSubtree {
            parent: None,
            prefix: String::new(),
            document: SubtreeDocument {
                exported_at: Some(t(3)),
                cluster: Some("c".into()),
                ..doc
            },
            request_id: None,
        }),
    ];
    let proposal = Proposal {
        v: REGISTRY_VERSION,
        time: t(1),
        items: cmds
            .into_iter()
            .map(|cmd| Stamped {
                id: import,
                request_id: None,
                cmd,
                fingerprint: None,
            })
            .collect(),
    };
    for bytes in [
        rmp_serde::to_vec(&proposal).unwrap(),
        rmp_serde::to_vec_named(&proposal).unwrap(),
    ] {
        assert_eq!(rmp_serde::from_slice::<Proposal>(&bytes).unwrap(), proposal);
    }
    let json = serde_json::to_vec(&proposal).unwrap();
    assert_eq!(serde_json::from_slice::<Proposal>(&json).unwrap(), proposal);
}

/// Goal (issue 18.4): a supervisor template is a subtree document kept in the registry, which
/// `spawn_subtree` instantiates under a parent with a prefix, as often as asked; it is found
/// by its agents' capabilities, survives a snapshot, and is not an agent template.
#[test]
fn a_supervisor_template_instantiates_under_a_prefix() {
    let src = source_subtree();
    let (mut doc, _) = export_document(&src, "s", usize::MAX);
    let register = |doc: &SubtreeDocument| {
        serde_json::from_value::<RegisterTemplate>(json!({"name": "team", "subtree": doc})).unwrap()
    };
    // Exported agents carry state; a template (an operator's) may not.
    assert!(register(&doc).validate().is_err());
    for a in &mut doc.agents {
        a.checkpoint = None;
        a.status = None;
    }
    doc.agents[0].capabilities = BTreeSet::from(["count".to_string()]);
    let mut reg = three_nodes();
    let register: RegisterTemplate = serde_json::from_value(json!({
        "name": "team", "description": "a team of counters", "subtree": doc,
    }))
    .unwrap();
    register.validate().unwrap();
    run(&mut reg, 10, None, RegistryCmd::RegisterTemplate(register)).unwrap();
    let spawn = |prefix: &str| {
        RegistryCmd::SpawnSubtree(SpawnSubtree {
            template: "team".into(),
            parent: None,
            prefix: prefix.into(),
            request_id: None,
        })
    };
    run(&mut reg, 100, None, spawn("one-")).unwrap();
    let mut reg = Registry::from_data(through_snapshot(reg.data()));
    run(&mut reg, 200, None, spawn("two-")).unwrap();
    for p in ["one-", "two-"] {
        let names = children_names(&reg, &format!("{p}s"));
        assert_eq!(
            names,
            [format!("{p}a1"), format!("{p}inner"), format!("{p}a2")]
        );
    }
    check_code(run(&mut reg, 300, None, spawn("one-")), ErrorCode::Conflict);
    let found = FindTemplates {
        capability: Some("count".into()),
        ..Default::default()
    }
    .answer(&reg)
    .unwrap();
    assert_eq!(found["templates"][0]["name"], "team", "{found}");
    assert_eq!(found["templates"][0]["subtree"]["agents"], 3);
    let as_agent = RegistryCmd::SpawnAgent(SpawnAgent::of_template("team".into()));
    check_code(run(&mut reg, 301, None, as_agent), ErrorCode::BadRequest);
    let with_kind: RegisterTemplate = serde_json::from_value(json!({
        "name": "mixed", "kind": "counter", "subtree": doc,
    }))
    .unwrap();
    assert!(with_kind.validate().is_err());
}
