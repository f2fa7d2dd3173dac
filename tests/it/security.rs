//! The trust boundary (docs/security.md): identities and roles that nats-server itself
//! enforces, with the config `warden auth` writes, against real nodes.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warden::auth::{seed_path, Identity};
use warden::bus::{self, NatsConfig, Violation, Violations};
use warden::client::{CallError, Client};
use warden::protocol::{Encoding, Envelope, ErrorCode};
use warden::subjects::Subjects;

use crate::support::{wait_agent, wait_for, Nats, TestCluster, CLUSTER};

/// A raw connection as identity `name`, with its permission violations.
async fn raw_as(nats: &Nats, name: &str) -> (async_nats::Client, Violations) {
    let cfg = NatsConfig {
        url: nats.url().to_string(),
        identity: Some(Identity::load(&seed_path(&nats.auth, name), CLUSTER, None).unwrap()),
        ..Default::default()
    };
    bus::connect_watched(&cfg, name, false).await.unwrap()
}

/// Waits for NATS to refuse something on `subject` (a publish to it, or a subscription).
async fn refusal(rx: &mut tokio::sync::broadcast::Receiver<Violation>, subject: &str) -> Violation {
    let wait = async {
        loop {
            let v = rx.recv().await.expect("the connection's violations");
            if v.subject == subject {
                return v;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("NATS did not refuse {subject}"))
}

/// Asserts that `command` is refused to `client` with a clear `forbidden` at once.
async fn forbidden(client: &Client, command: &str, body: Value) {
    let start = Instant::now();
    match client.call(command, &body).await {
        Err(CallError::Reply(e)) => {
            assert_eq!(e.code, ErrorCode::Forbidden, "{command}: {}", e.message);
            assert!(
                e.message.contains(command),
                "names the subject: {}",
                e.message
            );
        }
        other => panic!("{command} should be forbidden: {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{command}: refused at once, not after a timeout ({:?})",
        start.elapsed()
    );
}

async fn names(client: &Client) -> Vec<String> {
    crate::support::supervisor_names(client).await
}

/// Goal: against a node process, each role can do what its row of docs/security.md allows, and is refused the rest
/// with a clear `forbidden` that changes nothing; viewers read events but no one reads
/// another identity's replies; an anonymous connection is refused.
#[tokio::test]
async fn each_role_may_do_what_its_row_allows_and_nothing_more() {
    let node = TestCluster::start(1, None).await;
    let viewer = node.nats.client("viewer").await;
    let operator = node.nats.client("operator").await;
    let admin = &node.client;

    // The viewer watches events, reads, and changes nothing.
    let (viewer_raw, viewer_refusals) = raw_as(&node.nats, "viewer").await;
    let events = Subjects::new(CLUSTER).event_filter("supervisor.>");
    let mut watch = viewer_raw.subscribe(events).await.unwrap();
    viewer_raw.flush().await.unwrap();
    viewer.call("cluster_status", &json!({})).await.unwrap();
    for (command, body) in [
        ("create_supervisor", json!({"name": "by-viewer"})),
        (
            "spawn_agent",
            json!({"supervisor": "root", "kind": "counter"}),
        ),
        ("export_state", json!({"agent": "x"})),
        ("join", json!({"node_id": 9, "name": "n9"})),
    ] {
        forbidden(&viewer, command, body).await;
    }
    match viewer.call_agent("anyone", &json!({})).await {
        Err(CallError::Reply(e)) => assert_eq!(e.code, ErrorCode::Forbidden, "{}", e.message),
        other => panic!("a viewer cannot call agents: {other:?}"),
    }
    assert_eq!(names(admin).await, ["root"], "nothing changed");

    // The operator runs supervisors and agents, and no more.
    let created = operator
        .call(
            "create_supervisor",
            &json!({"name": "team", "request_id": "t1"}),
        )
        .await
        .unwrap();
    assert_eq!(created["name"], "team");
    let ev = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut watch))
        .await
        .expect("the viewer sees the event")
        .unwrap();
    let ev: Value = serde_json::from_slice(&ev.payload).unwrap();
    assert_eq!(ev["id"], "team");
    let body = json!({"supervisor": "team", "name": "c", "kind": "counter",
                      "config": {"durable": true}, "request_id": "c1"});
    operator.call("spawn_agent", &body).await.unwrap();
    wait_agent(&operator, "c", "the counter to run", |a| {
        a["status"] == "running"
    })
    .await;
    let v = operator
        .call_agent("c", &json!({"op": "add", "n": 2}))
        .await
        .unwrap();
    assert_eq!(v["value"], 2);
    for (command, body) in [
        ("join", json!({"node_id": 9, "name": "n9"})),
        ("leave", json!({"node_id": 1})),
        ("drain_node", json!({"node": 1})),
        ("rebalance", json!({})),
        ("import_state", json!({"agent": "c", "state": "kA=="})),
    ] {
        forbidden(&operator, command, body).await;
    }
    // No client role sends node commands: NATS refuses them before any node sees them.
    for client in [&viewer, &operator, admin] {
        forbidden(client, "heartbeat", json!({"node_id": 1})).await;
    }
    let agent = admin
        .call("get_agent", &json!({"agent": "c"}))
        .await
        .unwrap();
    assert_eq!(agent["status"], "running", "the drain was refused");

    // The admin does everything.
    let moves = admin
        .call("rebalance", &json!({"dry_run": true}))
        .await
        .unwrap();
    assert_eq!(moves["dry_run"], true);

    // Nobody reads another identity's replies.
    let mut refusals = viewer_refusals.subscribe();
    let stolen = format!("{}.>", warden::auth::inbox_prefix(CLUSTER, "admin"));
    let _sub = viewer_raw.subscribe(stolen.clone()).await.unwrap();
    viewer_raw.flush().await.unwrap();
    let v = refusal(&mut refusals, &stolen).await;
    assert!(!v.publish, "{v:?}");

    // Nobody gets a subject as a reply subject: an admin that sends itself a bench request
    // whose reply is a Raft subject may still not publish there.
    let (admin_raw, admin_violations) = raw_as(&node.nats, "admin").await;
    let mut admin_refusals = admin_violations.subscribe();
    let s = Subjects::new(CLUSTER);
    let mut bench = admin_raw.subscribe(s.bench_echo("x")).await.unwrap();
    admin_raw.flush().await.unwrap();
    let raft = s.raft(2, 1, "append");
    admin_raw
        .publish_with_reply(s.bench_echo("x"), raft.clone(), "".into())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut bench))
        .await
        .expect("its own request comes back")
        .unwrap();
    admin_raw
        .publish(got.reply.unwrap(), "{}".into())
        .await
        .unwrap();
    admin_raw.flush().await.unwrap();
    assert!(refusal(&mut admin_refusals, &raft).await.publish);

    // A node answers a client only outside the Warden subject space: a viewer cannot make it
    // publish an event (or a cast) by choosing the reply subject.
    let forged = s.event("node", "1", "left");
    let mut events = admin_raw.subscribe(forged.clone()).await.unwrap();
    admin_raw.flush().await.unwrap();
    viewer_raw
        .publish_with_reply(s.node_cmd(1, "health"), forged.clone(), "{}".into())
        .await
        .unwrap();
    viewer.call("health", &json!({})).await.unwrap();
    let leaked = tokio::time::timeout(
        Duration::from_millis(500),
        futures::StreamExt::next(&mut events),
    )
    .await;
    assert!(
        leaked.is_err(),
        "the node published on {forged}: {leaked:?}"
    );

    // No credentials, no connection.
    let anonymous = NatsConfig {
        url: node.nats.url().to_string(),
        ..Default::default()
    };
    assert!(bus::connect(&anonymous, "anonymous", false).await.is_err());
}

/// Goal: G8 with real node processes: node 2's identity can neither speak as node 3 (NATS
/// refuses the subject) nor speak for it on its own subjects (the leader refuses), nor listen
/// to what is addressed to node 3; no client can stop a node, publish Raft traffic or join a
/// node unless it is an admin.
#[tokio::test]
async fn a_node_identity_speaks_and_listens_only_as_itself() {
    let tc = TestCluster::start(3, None).await;
    let leader = tc.leader().await;
    let s = Subjects::new(CLUSTER);
    let (node2, node2_violations) = raw_as(&tc.nats, "node-2").await;
    let mut refusals = node2_violations.subscribe();
    let heartbeat = |node: u64| Encoding::Json.encode(&json!({"node_id": node}));

    // Node 2 cannot publish as node 3.
    let as_3 = s.own(3, leader, "heartbeat");
    node2
        .publish(as_3.clone(), heartbeat(3).into())
        .await
        .unwrap();
    node2.flush().await.unwrap();
    assert!(refusal(&mut refusals, &as_3).await.publish);

    // On its own subject, it cannot speak for node 3 either.
    for (command, body) in [
        ("heartbeat", heartbeat(3)),
        (
            "report_agents",
            Encoding::Json.encode(&json!({"reports": [{"agent": uuid::Uuid::nil(),
                "node": 3, "epoch": 1, "status": "running", "restarts": 0, "error": null}]})),
        ),
    ] {
        // As a node asks a peer: the answer comes on a subject only the leader may publish on.
        let mut replies = node2.subscribe(s.replies_to(2)).await.unwrap();
        node2.flush().await.unwrap();
        let mut h = async_nats::HeaderMap::new();
        h.insert(warden::protocol::CONTENT_TYPE, "application/json");
        let reply_to = s.reply(Some(leader), 2, 1_000_000 + body.len() as u64);
        node2
            .publish_with_reply_and_headers(
                s.own(2, leader, command),
                reply_to.clone(),
                h,
                body.into(),
            )
            .await
            .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let m = futures::StreamExt::next(&mut replies).await.unwrap();
                if m.subject.as_str() == reply_to {
                    return m;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{command}: the leader answers"));
        let err = Envelope::decode(&reply.payload)
            .and_then(Envelope::into_result)
            .expect_err(command);
        assert_eq!(err.code, ErrorCode::Forbidden, "{command}: {}", err.message);
        assert!(
            err.message.contains("node 2 may not speak for node 3"),
            "{}",
            err.message
        );
    }

    // Nor get another node's subject as a reply subject: sending itself a message whose reply
    // subject is node 3's gives it no right to publish there (no `allow_responses`).
    let trap = s.own(3, leader, "heartbeat");
    let mut own_inbox = node2
        .subscribe(format!("{}.2.2.>", s.internal_prefix()))
        .await
        .unwrap();
    node2.flush().await.unwrap();
    node2
        .publish_with_reply(
            format!("{}.2.2.own.x", s.internal_prefix()),
            trap.clone(),
            "".into(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut own_inbox),
    )
    .await
    .expect("its own message comes back")
    .unwrap();
    assert_eq!(got.reply.as_deref(), Some(trap.as_str()));
    node2
        .publish(trap.clone(), heartbeat(3).into())
        .await
        .unwrap();
    node2.flush().await.unwrap();
    assert!(refusal(&mut refusals, &trap).await.publish);

    // Nor listen to what is addressed to node 3 (it could answer as node 3).
    for subject in [
        format!("{}.*.3.>", s.internal_prefix()),
        s.node_cmd_all(3),
        format!("{}.>", warden::auth::inbox_prefix(CLUSTER, "node-3")),
    ] {
        let _sub = node2.subscribe(subject.clone()).await.unwrap();
        node2.flush().await.unwrap();
        assert!(!refusal(&mut refusals, &subject).await.publish, "{subject}");
    }

    // Clients: no stopping a node by its event, no Raft, no join below admin.
    let (admin, admin_violations) = raw_as(&tc.nats, "admin").await;
    let mut refusals = admin_violations.subscribe();
    for subject in [
        s.event("node", "2", "left"),
        s.raft(1, 2, "vote"),
        s.raft(leader, 2, "append"),
        s.forward(1, leader),
    ] {
        admin.publish(subject.clone(), "{}".into()).await.unwrap();
        admin.flush().await.unwrap();
        assert!(refusal(&mut refusals, &subject).await.publish, "{subject}");
    }
    let operator = tc.nats.client("operator").await;
    forbidden(&operator, "join", json!({"node_id": 4, "name": "n4"})).await;
    forbidden(&operator, "leave", json!({"node_id": 2})).await;

    // Node 2 still runs and the cluster still writes.
    let health = tc.via(2).call("health", &json!({})).await.unwrap();
    assert_eq!(health["node_id"], 2);
    tc.client
        .call(
            "create_supervisor",
            &json!({"name": "still-writes", "request_id": "w"}),
        )
        .await
        .unwrap();
    let status = tc.status().await;
    let up = status["nodes"].as_array().unwrap();
    assert!(up.iter().all(|n| n["status"] == "up"), "{status}");
}

/// Connects as identity `name` with the seed at `seed`, or fails.
async fn try_connect(nats: &Nats, seed: &Path) -> anyhow::Result<Client> {
    let identity = Identity::load(seed, CLUSTER, None)?;
    let cfg = NatsConfig {
        url: nats.url().to_string(),
        identity: Some(identity),
        ..Default::default()
    };
    let (nc, violations) = bus::connect_watched(&cfg, "rotating", false).await?;
    Ok(Client::watched(nc, violations, CLUSTER))
}

/// Goal: adding, rotating and revoking an identity take effect when nats-server reloads its
/// config, without restarting the server or the cluster, and leave the others alone.
#[tokio::test]
async fn identities_are_added_rotated_and_revoked_with_a_config_reload() {
    let node = TestCluster::start(1, None).await;
    let dir = &node.nats.auth;
    let others = std::fs::read_to_string(seed_path(dir, "operator")).unwrap();
    warden::auth::run(warden::auth::AuthCmd::Add {
        out: dir.clone(),
        name: "alice".into(),
        role: Some(warden::command::Role::Operator),
    })
    .unwrap();
    let alice = seed_path(dir, "alice");
    assert!(
        try_connect(&node.nats, &alice).await.is_err(),
        "not before the reload"
    );
    node.nats.reload();
    let client = wait_for("alice to be let in", Duration::from_secs(10), || async {
        try_connect(&node.nats, &alice).await.ok()
    })
    .await;
    client
        .call(
            "create_supervisor",
            &json!({"name": "alices", "request_id": "a1"}),
        )
        .await
        .unwrap();
    forbidden(&client, "drain_node", json!({"node": 1})).await;

    // Rotation: the old key stops working, the new one works.
    let old = tempfile::tempdir().unwrap();
    let old_seed = old.path().join("alice.nk");
    std::fs::copy(&alice, &old_seed).unwrap();
    warden::auth::run(warden::auth::AuthCmd::Rotate {
        out: dir.clone(),
        name: "alice".into(),
    })
    .unwrap();
    node.nats.reload();
    wait_for(
        "the old key to be refused",
        Duration::from_secs(10),
        || async {
            try_connect(&node.nats, &old_seed)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let mut rotated = try_connect(&node.nats, &alice).await.unwrap();
    rotated.deadline = Duration::from_secs(2);
    rotated.call("cluster_status", &json!({})).await.unwrap();

    // Revocation closes the door, and the seed is gone.
    warden::auth::run(warden::auth::AuthCmd::Revoke {
        out: dir.clone(),
        name: "alice".into(),
    })
    .unwrap();
    assert!(!alice.exists());
    node.nats.reload();
    wait_for("alice to be refused", Duration::from_secs(10), || async {
        try_connect(&node.nats, &old_seed)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        rotated.call("cluster_status", &json!({})).await.is_err(),
        "a revoked identity's open connection no longer works"
    );
    // Nobody else was touched: the node and the admin still work, the operator's key is the same.
    assert_eq!(
        std::fs::read_to_string(seed_path(dir, "operator")).unwrap(),
        others
    );
    node.client
        .call("cluster_status", &json!({}))
        .await
        .unwrap();
    node.nats
        .client("operator")
        .await
        .call("health", &json!({}))
        .await
        .unwrap();
}

/// Kills `warden up` on drop: SIGTERM first, so that it stops the nodes and the nats-server
/// it started, then SIGKILL if it has not exited within a bounded wait.
struct Up(Option<std::process::Child>);

impl Drop for Up {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let pid = child.id();
        warden::up::signal(pid, libc::SIGTERM);
        // `wait` blocks: it runs on a thread of its own, and the drop waits for its word.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            warden::up::signal(pid, libc::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// Goal: `warden up` is secure by default (its NATS refuses anonymous connections) and
/// `warden ctl` run in the same directory works against it with no flags at all.
#[tokio::test]
async fn warden_up_runs_with_auth_and_ctl_needs_no_flags() {
    let cwd = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_warden");
    let clean = |cmd: &mut std::process::Command| {
        for var in [
            "WARDEN_NATS",
            "WARDEN_AUTH",
            "WARDEN_CLUSTER",
            "WARDEN_NATS_TOKEN",
        ] {
            cmd.env_remove(var);
        }
    };
    let mut up = std::process::Command::new(bin);
    up.args(["up", "--nodes", "1"])
        .current_dir(cwd.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    clean(&mut up);
    let _up = Up(Some(up.spawn().unwrap()));
    let local = cwd.path().join(warden::up::DEFAULT_DIR);
    let found = wait_for("warden up to be ready", Duration::from_secs(90), || {
        let local = local.clone();
        async move { warden::up::Local::read(&local) }
    })
    .await;
    assert!(found.auth.is_some(), "up runs with identities: {found:?}");

    let mut ctl = std::process::Command::new(bin);
    ctl.args(["ctl", "--json", "status"])
        .current_dir(cwd.path());
    clean(&mut ctl);
    let out = ctl.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["leader"], 1, "{status}");

    let anonymous = NatsConfig {
        url: found.nats.clone(),
        ..Default::default()
    };
    assert!(
        bus::connect(&anonymous, "anonymous", false).await.is_err(),
        "up's NATS refuses anonymous connections"
    );
}

/// Goal: with `warden auth init --tls`, a node and a client whose seed has the CA next to it
/// connect over TLS and work; a client that does not trust that CA cannot connect at all.
#[tokio::test]
async fn with_tls_nodes_and_clients_connect_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth");
    warden::auth::init(&auth, CLUSTER, 1, 4222, true).unwrap();
    let server = warden::up::NatsServer::start(dir.path(), &warden::up::auth_args(&auth))
        .await
        .unwrap();
    let mut cfg = warden::config::NodeConfig {
        id: 1,
        cluster: CLUSTER.into(),
        data_dir: dir.path().join("node-1"),
        bootstrap: true,
        auth: Some(seed_path(&auth, "node-1")),
        ..Default::default()
    };
    cfg.nats.url = server.url.clone();
    let cfg = cfg.finish().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(warden::node::run(cfg, async move {
        let _ = stopped.await;
    }));
    let client = warden::up::connect_as(&server.url, CLUSTER, Some(&auth), "admin")
        .await
        .unwrap();
    wait_for("the node over TLS", Duration::from_secs(20), || {
        let c = client.clone();
        async move {
            let s = c.call("cluster_status", &json!({})).await.ok()?;
            (s["leader"] == 1).then_some(())
        }
    })
    .await;

    // The same identity without the CA: the server requires TLS, and its certificate is not
    // trusted.
    let elsewhere = tempfile::tempdir().unwrap();
    let copied = elsewhere.path().join("admin.nk");
    std::fs::copy(seed_path(&auth, "admin"), &copied).unwrap();
    let identity = Identity::load(&copied, CLUSTER, None).unwrap();
    assert!(identity.ca.is_none());
    let cfg = NatsConfig {
        url: server.url.clone(),
        identity: Some(identity),
        ..Default::default()
    };
    assert!(bus::connect(&cfg, "untrusting", false).await.is_err());

    let _ = stop.send(());
    node.await.unwrap().unwrap();
}
