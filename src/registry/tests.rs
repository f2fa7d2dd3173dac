//! Registry behaviour on plain data: no Raft, no storage, no clock.

use super::*;

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

#[track_caller]
fn check_code(out: Outcome, code: ErrorCode) {
    assert_eq!(out.unwrap_err().code, code);
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
    };
    let out = reg.apply(t(6), &item, &mut events).unwrap();
    assert_eq!(
        out,
        json!({"stopped": ["c", "d", "b", "a"], "stopped_count": 4})
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
    reg.take_touched();
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
    assert!(reg.take_touched().is_empty());
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

#[test]
fn nodes_join_once_and_cannot_return_after_leaving() {
    let mut reg = Registry::default();
    let join = || RegistryCmd::RegisterNode {
        node_id: 7,
        name: "n7".into(),
        labels: BTreeMap::new(),
        kinds: vec![],
    };
    let mut events = Vec::new();
    let s = |cmd| Stamped {
        id: Uuid::nil(),
        request_id: None,
        cmd,
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

#[test]
fn a_registry_rebuilt_from_its_records_is_the_same() {
    let mut reg = Registry::default();
    run(&mut reg, 1, Some("r"), create("a", None)).unwrap();
    run(&mut reg, 2, None, create("b", Some("a"))).unwrap();
    let mut copy = Registry::default();
    for key in reg.take_touched() {
        copy.load_record(reg.record(&key).unwrap());
    }
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
    assert_eq!(out["stopped_count"], n + 1);
    assert_eq!(
        out["stopped"].as_array().unwrap().len(),
        limits::MAX_NAMES_IN_REPLY
    );
    assert_eq!(reg.data().supervisors.len(), 1, "only root is left");
}
