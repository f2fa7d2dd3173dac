//! A whole subtree moved between two clusters (issue 18.5): separate nodes as OS processes,
//! one nats-server, two cluster names, each cluster behind its own identities.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;
use warden::client::Client;
use warden::up::{connect_as, LocalCluster, NatsServer};

use crate::support::wait_for;

const AGENTS: usize = 1_000;

struct Side {
    /// Holds the nodes: they are killed when it drops.
    _cluster: LocalCluster,
    client: Client,
}

async fn start_side(dir: &std::path::Path, nats: &NatsServer, name: &str, nodes: u64) -> Side {
    let auth = dir.join(format!("auth-{name}"));
    let mut cluster = LocalCluster::new(
        env!("CARGO_BIN_EXE_warden").into(),
        dir.join(format!("nodes-{name}")),
        nats.url.clone(),
        name,
    );
    cluster.auth = Some(auth.clone());
    for id in 1..=nodes {
        cluster.start_node(id, id == 1).await.unwrap();
    }
    let client = connect_as(&nats.url, name, Some(&auth), "admin")
        .await
        .unwrap();
    cluster
        .wait_ready(&client, nodes as usize, Duration::from_secs(30))
        .await
        .unwrap();
    Side {
        _cluster: cluster,
        client,
    }
}

/// Runs `warden ctl --json` as cluster `cluster`'s admin and answers its reply.
async fn ctl(nats: &NatsServer, dir: &std::path::Path, cluster: &str, args: &[&str]) -> Value {
    let seed = warden::auth::seed_path(&dir.join(format!("auth-{cluster}")), "admin");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warden"))
        .args([
            "ctl",
            "--json",
            "--timeout-ms",
            "60000",
            "--nats",
            &nats.url,
        ])
        .args(["--cluster", cluster, "--auth"])
        .arg(&seed)
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "warden ctl {args:?}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap()
}

/// Each agent's counter value, by name, read through `call`.
async fn values(c: &Client, names: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    for chunk in names.chunks(50) {
        let get = json!({"op": "get"});
        let calls = chunk.iter().map(|n| c.call_agent(n, &get));
        for r in join_all(calls).await {
            out.push(r.unwrap()["value"].clone());
        }
    }
    out
}

async fn agent_count(c: &Client, query: Value) -> u64 {
    let mut q = query;
    q["count"] = json!(true);
    c.call("find_agents", &q).await.unwrap()["count"]
        .as_u64()
        .unwrap()
}

/// Goal: a subtree of 1,000 checkpointed agents exported from one cluster imports into
/// another as the same tree with the same counter values, each agent resuming from its
/// checkpoint; an import broken off half way leaves the target as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_of_a_thousand_agents_moves_to_another_cluster() {
    let dir = tempfile::tempdir().unwrap();
    // Two clusters' identities, one nats-server that knows both.
    for (name, nodes) in [("alpha", 1), ("beta", 2)] {
        warden::auth::ensure(&dir.path().join(format!("auth-{name}")), name, nodes).unwrap();
    }
    let ids: Vec<_> = ["alpha", "beta"]
        .iter()
        .map(|n| warden::auth::Identities::load(&dir.path().join(format!("auth-{n}"))).unwrap())
        .collect();
    let conf = dir.path().join("nats-server.conf");
    std::fs::write(&conf, warden::auth::render_users(&ids).unwrap()).unwrap();
    let nats = NatsServer::start(dir.path(), &["-c".into(), conf.to_string_lossy().into()])
        .await
        .unwrap();
    let alpha = start_side(dir.path(), &nats, "alpha", 1).await;
    let beta = start_side(dir.path(), &nats, "beta", 2).await;

    // In alpha: team > group of 1,000 durable counters, each added a different amount (a
    // durable counter answers once its new value is checkpointed).
    let a = &alpha.client;
    a.call(
        "create_supervisor",
        &json!({"name": "team", "strategy": "one_for_all"}),
    )
    .await
    .unwrap();
    let group = json!({"name": "grp", "parent": "team", "count": AGENTS,
                       "template": {"kind": "counter", "config": {"durable": true}}});
    a.call("spawn_agent_group", &group).await.unwrap();
    let names: Vec<String> = (0..AGENTS).map(|i| format!("grp-{i}")).collect();
    for chunk in names.chunks(50) {
        let bodies: Vec<Value> = chunk
            .iter()
            .map(|n| json!({"op": "add", "n": n[4..].parse::<u64>().unwrap() % 97 + 1}))
            .collect();
        let adds = chunk.iter().zip(&bodies).map(|(n, b)| a.call_agent(n, b));
        for r in join_all(adds).await {
            r.unwrap();
        }
    }
    let expected = values(a, &names).await;

    let doc = a.export_subtree("team").await.unwrap();
    assert_eq!((doc.supervisors.len(), doc.agents.len()), (2, AGENTS));
    assert!(doc.agents.iter().all(|x| x.checkpoint.is_some()));
    assert_eq!(doc.cluster.as_deref(), Some("alpha"));

    // Alpha's identities mean nothing in beta, and the other way round.
    let b = &beta.client;
    let before = agent_count(b, json!({})).await;
    let sups_before = b.call("list_supervisors", &json!({})).await.unwrap();

    // Broken off half way: begun, half the agents staged, never committed.
    let begun = b
        .call(
            "import_begin",
            &json!({"prefix": "x-", "header": doc.header()}),
        )
        .await
        .unwrap();
    let half = warden::registry::ImportPage {
        import: serde_json::from_value(begun["import"].clone()).unwrap(),
        page: 0,
        supervisors: doc.supervisors.clone(),
        agents: doc.agents[..AGENTS / 2].to_vec(),
        request_id: None,
    };
    b.call_msgpack("import_page", &half, true).await.unwrap();
    assert_eq!(
        agent_count(b, json!({})).await,
        before,
        "staging creates nothing"
    );
    let commit = json!({"import": begun["import"], "supervisors": 2, "agents": AGENTS});
    let refused = b.call("import_commit", &commit).await.unwrap_err();
    assert!(
        refused.to_string().contains("a page is missing"),
        "{refused}"
    );
    assert_eq!(agent_count(b, json!({})).await, before);
    assert_eq!(
        b.call("list_supervisors", &json!({})).await.unwrap(),
        sups_before
    );

    // The whole document, under another prefix (the abandoned stage holds no names).
    // Through `warden ctl`: exported from alpha into a file, imported from it into beta.
    let file = dir.path().join("team.json");
    let file = file.to_string_lossy().into_owned();
    let export = ctl(&nats, dir.path(), "alpha", &["export", "team", &file]).await;
    assert_eq!(export["agents"], AGENTS, "{export}");
    let out = ctl(
        &nats,
        dir.path(),
        "beta",
        &["import", &file, "prefix=moved-"],
    )
    .await;
    assert_eq!(out["supervisor"], "moved-team");
    assert_eq!(out["agents"], AGENTS);
    let tree = b
        .call("get_supervision_tree", &json!({"name": "moved-team"}))
        .await
        .unwrap();
    assert_eq!(tree["strategy"], "one_for_all");
    assert_eq!(tree["children"][0]["name"], "moved-grp");
    assert_eq!(tree["children"][0]["strategy"], "simple_one_for_one");
    let moved: Vec<String> = names.iter().map(|n| format!("moved-{n}")).collect();
    wait_for(
        "the imported agents to run",
        Duration::from_secs(60),
        || {
            let b = b.clone();
            async move {
                let q = json!({"status": "running", "supervisor": "moved-grp"});
                (agent_count(&b, q).await == AGENTS as u64).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        values(b, &moved).await,
        expected,
        "each agent resumed from its checkpoint"
    );
    // The source is untouched.
    assert_eq!(values(a, &names[..10]).await, expected[..10]);
    drop(alpha);
    drop(beta);
}

/// Goal: a small subtree goes in one `import_subtree` request of plain JSON, as a client in any
/// language sends it; a clash or a document of a newer version is refused with a clear error
/// and changes nothing; an export is one moment's copy even when the tree changes between its
/// pages.
#[tokio::test]
async fn a_json_document_imports_in_one_request_and_bad_ones_change_nothing() {
    let node = crate::support::InProcessNode::start().await;
    let c = &node.client;
    c.call("create_supervisor", &json!({"name": "svc"}))
        .await
        .unwrap();
    for i in 0..3 {
        let spawn = json!({"supervisor": "svc", "name": format!("c{i}"), "kind": "counter",
                           "config": {"durable": true}});
        c.call("spawn_agent", &spawn).await.unwrap();
        c.call_agent(&format!("c{i}"), &json!({"op": "add", "n": 10 + i}))
            .await
            .unwrap();
    }
    let page = c
        .call("export_subtree", &json!({"name": "svc"}))
        .await
        .unwrap();
    assert_eq!(page["next"], Value::Null, "{page}");
    assert_eq!(page["document"]["format"], "warden.subtree");
    let mut document = page["document"].clone();
    document["supervisors"] = page["supervisors"].clone();
    document["agents"] = page["agents"].clone();
    // A checkpoint is base64 text in JSON.
    assert!(
        page["agents"][0]["checkpoint"]["state"].is_string(),
        "{page}"
    );

    let out = c
        .call(
            "import_subtree",
            &json!({"prefix": "copy-", "document": document}),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        json!({"supervisor": "copy-svc", "supervisors": 1, "agents": 3})
    );
    for i in 0..3 {
        let v = c
            .call_agent(&format!("copy-c{i}"), &json!({"op": "get"}))
            .await
            .unwrap();
        assert_eq!(v["value"], 10 + i);
    }
    let count = |c: &Client| {
        let c = c.clone();
        async move {
            c.call("find_agents", &json!({"count": true}))
                .await
                .unwrap()["count"]
                .clone()
        }
    };
    let before = count(c).await;
    let again = c
        .call(
            "import_subtree",
            &json!({"prefix": "copy-", "document": document}),
        )
        .await
        .unwrap_err();
    assert!(
        again.to_string().contains("\"copy-svc\" already exists"),
        "{again}"
    );
    let mut newer = document.clone();
    newer["version"] = json!(2);
    newer["agents"][0]["some_field_of_v2"] = json!({"x": 1});
    let refused = c
        .call(
            "import_subtree",
            &json!({"prefix": "v2-", "document": newer}),
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("version 2"), "{refused}");
    assert_eq!(count(c).await, before);

    // A supervisor template: the document (without the states, which are an import's)
    // registered once, instantiated twice by an operator's command.
    let mut spec = document.clone();
    for a in spec["agents"].as_array_mut().unwrap() {
        a.as_object_mut().unwrap().remove("checkpoint");
        a.as_object_mut().unwrap().remove("status");
    }
    let register = json!({"name": "svc-template", "subtree": spec, "request_id": "t1"});
    c.call("register_template", &register).await.unwrap();
    for p in ["t1-", "t2-"] {
        let spawn = json!({"template": "svc-template", "prefix": p, "request_id": p});
        let out = c.call("spawn_subtree", &spawn).await.unwrap();
        assert_eq!(out["agents"], 3, "{out}");
        let v = c
            .call_agent(&format!("{p}c1"), &json!({"op": "get"}))
            .await
            .unwrap();
        assert_eq!(v["value"], 0, "a fresh counter");
    }
    let listed = c
        .call("find_templates", &json!({"kind": "counter"}))
        .await
        .unwrap();
    assert_eq!(
        listed["templates"][0]["subtree"]["supervisors"], 1,
        "{listed}"
    );

    // The leader pages from one copy: an agent stopped after the first page is still in the
    // document, with its checkpoint. Checkpoints of 200 KiB make one page per agent.
    let big = warden::base64::base64(&vec![7u8; 200 * 1024]);
    for i in 0..3 {
        let state = json!({"agent": format!("copy-c{i}"), "state": big});
        c.call("import_state", &state).await.unwrap();
    }
    let first = c
        .call("export_subtree", &json!({"name": "copy-svc"}))
        .await
        .unwrap();
    assert!(first["next"].is_u64(), "more than one page");
    c.call("stop_agent", &json!({"agent": "copy-c2"}))
        .await
        .unwrap();
    let mut agents = first["agents"].as_array().unwrap().clone();
    let mut next = first["next"].clone();
    while let Some(cursor) = next.as_u64() {
        let q = json!({"name": "copy-svc", "export": first["export"], "cursor": cursor});
        let page = c.call("export_subtree", &q).await.unwrap();
        agents.extend(page["agents"].as_array().unwrap().iter().cloned());
        next = page["next"].clone();
    }
    let names: Vec<&str> = agents.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["copy-c0", "copy-c1", "copy-c2"]);
    assert!(agents.iter().all(|a| a["checkpoint"]["state"] == big));

    // A page of an export the leader does not hold is refused, saying what to do.
    let bad = c
        .call(
            "export_subtree",
            &json!({"name": "svc", "export": Uuid::new_v4(), "cursor": 1}),
        )
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("export again"), "{bad}");
}
