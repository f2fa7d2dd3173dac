//! The command interface of one in-process node over a real nats-server: encodings,
//! idempotent retries and bad input.

use std::time::Duration;

use async_nats::HeaderMap;
use serde_json::{json, Value};
use warden::client::CallError;
use warden::protocol::{Encoding, Envelope, ErrorCode};

use crate::support::{supervisor_names, InProcessNode, CLUSTER};

/// Sends a raw request as a NATS client in another language would, and decodes the envelope.
async fn raw(
    nats: &async_nats::Client,
    command: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (Option<String>, Envelope) {
    let subject = warden::subjects::Subjects::new(CLUSTER).cmd(command);
    let mut req = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(Duration::from_secs(10)));
    if let Some(ct) = content_type {
        let mut h = HeaderMap::new();
        h.insert(warden::protocol::CONTENT_TYPE, ct);
        req = req.headers(h);
    }
    let msg = nats.send_request(subject, req).await.expect("a reply");
    let ct = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(warden::protocol::CONTENT_TYPE))
        .map(|v| v.to_string());
    let env = match ct.as_deref() {
        Some("application/msgpack") => {
            let v: Value = rmp_serde::from_slice(&msg.payload).expect("a MessagePack reply");
            serde_json::from_value(v).unwrap()
        }
        _ => serde_json::from_slice(&msg.payload).expect("a JSON reply"),
    };
    (ct, env)
}

/// Goal: JSON and MessagePack both work, with or without the Content-Type header, and the
/// reply comes back in the request's encoding.
#[tokio::test]
async fn json_and_msgpack_requests_get_replies_in_their_own_encoding() {
    let node = InProcessNode::start().await;
    let nats = &node.client.nats;
    let cases = [
        (Some("application/json"), Encoding::Json, "j1"),
        (None, Encoding::Json, "j2"),
        (Some("application/msgpack"), Encoding::Msgpack, "m1"),
        (None, Encoding::Msgpack, "m2"),
    ];
    for (ct, enc, name) in cases {
        let body = enc.encode(&json!({"name": name, "strategy": "one_for_all"}));
        let (reply_ct, env) = raw(nats, "create_supervisor", ct, body).await;
        assert_eq!(
            reply_ct.as_deref(),
            Some(enc.content_type()),
            "reply encoding for {name}"
        );
        let v = env.into_result().unwrap();
        assert_eq!(v["name"], name);
        assert_eq!(v["strategy"], "one_for_all");
    }
    assert_eq!(
        supervisor_names(&node.client).await,
        ["j1", "j2", "m1", "m2", "root"]
    );
    node.shutdown().await.unwrap();
}

/// Goal: G7, a create with a request_id sent twice creates once and replies the same.
#[tokio::test]
async fn a_retried_create_with_a_request_id_creates_once() {
    let node = InProcessNode::start().await;
    let body = json!({"name": "once", "request_id": "req-1"});
    let first = node.client.call("create_supervisor", &body).await.unwrap();
    let second = node.client.call("create_supervisor", &body).await.unwrap();
    assert_eq!(first, second, "same reply, including the id");
    assert_eq!(supervisor_names(&node.client).await, ["once", "root"]);
    // Without a request id, the same create is a conflict rather than a second supervisor.
    let err = node
        .client
        .call("create_supervisor", &json!({"name": "once"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("conflict"), "{err}");
}

/// Goal: G5, every kind of bad input gets a clear error, changes nothing and the node stays up.
#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let node = InProcessNode::start().await;
    let nats = &node.client.nats;
    node.client
        .call("create_supervisor", &json!({"name": "keep"}))
        .await
        .unwrap();
    let before = node
        .client
        .call("get_supervision_tree", &json!({}))
        .await
        .unwrap();

    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    // A MessagePack spawn_agent whose config is arrays nested `depth` deep, built byte by byte
    // (as a hostile client would; no encoder recursion).
    let deep = |depth: usize| {
        let mut b = vec![0x83];
        for (k, v) in [("supervisor", "root"), ("kind", "counter")] {
            b.extend(rmp_serde::to_vec(k).unwrap());
            b.extend(rmp_serde::to_vec(v).unwrap());
        }
        b.extend(rmp_serde::to_vec("config").unwrap());
        b.extend(std::iter::repeat_n(0x91u8, depth));
        b.push(0x01);
        b
    };
    let big_config = json!({"pad": "x".repeat(100 * 1024)});
    let group_config = json!({"pad": "x".repeat(60 * 1024)});
    // (command, Content-Type, body, expected code, words the message must contain)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, ErrorCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            "create_supervisor",
            None,
            b"\xc1\xff not anything".to_vec(),
            ErrorCode::BadRequest,
            "MessagePack",
        ),
        (
            "create_supervisor",
            Some("application/json"),
            b"{\"name\":".to_vec(),
            ErrorCode::BadRequest,
            "JSON",
        ),
        (
            "create_supervisor",
            Some("text/plain"),
            j(json!({"name": "x"})),
            ErrorCode::BadRequest,
            "Content-Type",
        ),
        (
            "create_supervisor",
            None,
            b"[1,2,3]".to_vec(),
            ErrorCode::BadRequest,
            "object",
        ),
        (
            "create_supervisor",
            Some("application/json"),
            b"[1,2,3]".to_vec(),
            ErrorCode::BadRequest,
            "object",
        ),
        (
            "create_supervisor",
            Some("application/msgpack"),
            b"\x93\x01\x02\x03".to_vec(),
            ErrorCode::BadRequest,
            "object",
        ),
        (
            "create_supervisor",
            None,
            j(json!({})),
            ErrorCode::BadRequest,
            "missing field `name`",
        ),
        (
            "create_supervisor",
            None,
            j(json!({"name": 42})),
            ErrorCode::BadRequest,
            "invalid type",
        ),
        (
            "create_supervisor",
            None,
            j(json!({"name": "bad name!"})),
            ErrorCode::BadRequest,
            "invalid",
        ),
        (
            "create_supervisor",
            None,
            j(json!({"name": "x", "strategy": "all_for_none"})),
            ErrorCode::BadRequest,
            "unknown variant",
        ),
        (
            "create_supervisor",
            None,
            j(json!({"name": "x", "max_restarts": -1})),
            ErrorCode::BadRequest,
            "invalid value",
        ),
        (
            "create_supervisor",
            None,
            j(json!({"name": "x", "parent": "ghost"})),
            ErrorCode::NotFound,
            "ghost",
        ),
        (
            "create_supervisor",
            None,
            j(json!({"name": "keep"})),
            ErrorCode::Conflict,
            "already exists",
        ),
        (
            "stop_supervisor",
            None,
            j(json!({"name": "root"})),
            ErrorCode::Conflict,
            "root",
        ),
        (
            "stop_supervisor",
            None,
            j(json!({"name": "ghost"})),
            ErrorCode::NotFound,
            "ghost",
        ),
        (
            "create_supervisor",
            None,
            j(json!({"name": "big", "pad": "x".repeat(400 * 1024)})),
            ErrorCode::TooLarge,
            "limit",
        ),
        (
            "spawn_agent",
            Some("application/msgpack"),
            deep(1_019),
            ErrorCode::BadRequest,
            "depth",
        ),
        (
            "spawn_agent",
            Some("application/msgpack"),
            deep(100),
            ErrorCode::BadRequest,
            "levels",
        ),
        (
            "spawn_agent",
            None,
            j(json!({"supervisor": "root", "kind": "counter", "config": big_config})),
            ErrorCode::TooLarge,
            "config",
        ),
        (
            "spawn_agent_group",
            None,
            j(json!({"name": "g", "count": 200,
                     "template": {"kind": "counter", "config": group_config}})),
            ErrorCode::TooLarge,
            "a group's configs",
        ),
    ];
    for (command, ct, body, code, needle) in cases {
        let (_, env) = raw(nats, command, ct, body).await;
        let err = env.into_result().expect_err(command);
        assert_eq!(err.code, code, "{command}: {}", err.message);
        assert!(
            err.message.contains(needle),
            "{:?} should mention {needle:?}",
            err.message
        );
    }
    // An unknown command: no identity may publish it, and NATS says so at once.
    match node.client.call("launch_missiles", &json!({})).await {
        Err(CallError::Reply(e)) => {
            assert_eq!(e.code, ErrorCode::Forbidden, "{}", e.message);
            assert!(e.message.contains("cmd.launch_missiles"), "{}", e.message);
        }
        other => panic!("an unknown command is forbidden: {other:?}"),
    }
    let after = node
        .client
        .call("get_supervision_tree", &json!({}))
        .await
        .unwrap();
    assert_eq!(before, after, "bad input changed nothing");
    let health = node.client.call("health", &json!({})).await.unwrap();
    assert_eq!(
        health["raft_state"], "leader",
        "the node is still up and leading"
    );
    // And it still writes: nothing poisoned its log.
    node.client
        .call("create_supervisor", &json!({"name": "after-poison"}))
        .await
        .unwrap();
    node.shutdown().await.unwrap();
}

/// Goal: nested supervisors form a tree; stopping one removes its whole subtree only.
#[tokio::test]
async fn stopping_a_supervisor_removes_its_subtree_and_nothing_else() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    for (name, parent) in [("a", "root"), ("b", "a"), ("c", "b"), ("d", "root")] {
        c.call(
            "create_supervisor",
            &json!({"name": name, "parent": parent}),
        )
        .await
        .unwrap();
    }
    let stopped = c
        .call("stop_supervisor", &json!({"name": "a"}))
        .await
        .unwrap();
    assert_eq!(
        stopped["stopped"],
        json!(["c", "b", "a"]),
        "children stop before parents"
    );
    assert_eq!(supervisor_names(c).await, ["d", "root"]);
    let tree = c.call("get_supervision_tree", &json!({})).await.unwrap();
    assert_eq!(tree["children"][0]["name"], "d");
}

/// Goal: listing is paged, so a registry of any size answers within NATS max_payload.
/// Method: page through supervisors (all, and the children of one) with a small limit.
#[tokio::test]
async fn list_supervisors_pages_through_everything_in_order() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    c.call("create_supervisor", &json!({"name": "p"}))
        .await
        .unwrap();
    for name in ["e", "a", "d", "b", "c"] {
        c.call("create_supervisor", &json!({"name": name, "parent": "p"}))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = json!({"parent": "p", "limit": 2});
        if let Some(a) = &after {
            q["after"] = json!(a);
        }
        let page = c.call("list_supervisors", &q).await.unwrap();
        let names = page["supervisors"].as_array().unwrap();
        assert!(names.len() <= 2);
        seen.extend(
            names
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["e", "a", "d", "b", "c"],
        "children come in start order"
    );
    let all = c
        .call("list_supervisors", &json!({"after": "c", "limit": 3}))
        .await
        .unwrap();
    let names: Vec<_> = all["supervisors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(
        names,
        [json!("d"), json!("e"), json!("p")],
        "all supervisors come by name"
    );
    assert_eq!(all["next"], "p");
    let err = c
        .call("list_supervisors", &json!({"limit": 0}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}

/// Goal: a node of another protocol version is refused at `join` with a message that says
/// what to do, and the cluster's membership is unchanged.
#[tokio::test]
async fn a_node_of_another_version_is_refused_at_join() {
    let node = InProcessNode::start().await;
    let old = json!({"node_id": 7, "name": "old-node"});
    let err = node.client.call("join", &old).await.unwrap_err();
    let CallError::Reply(e) = err else {
        panic!("{err}")
    };
    assert_eq!(e.code, ErrorCode::Conflict, "{e}");
    assert!(e.message.contains("protocol version 1"), "{e}");
    let status = node
        .client
        .call("cluster_status", &json!({}))
        .await
        .unwrap();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 1, "{status}");
}
