//! Starting NATS, nodes and clusters for tests. Every process is killed when its handle drops,
//! so a failing test leaves nothing running.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use warden::client::Client;
use warden::config::NodeConfig;
use warden::up::{auth_args, connect_as, LocalCluster, NatsServer};

pub const CLUSTER: &str = "test";

/// Polls `probe` until it returns `Some`, or panics with `what` after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A nats-server running the config `warden auth` writes, with its identity directory: every
/// test runs with auth on, as production should.
pub struct Nats {
    pub server: NatsServer,
    /// The identities: `node-1..node-(n+2)`, `admin`, `operator`, `viewer`.
    pub auth: std::path::PathBuf,
}

impl Nats {
    /// Starts nats-server in `dir` with identities for nodes 1..=`nodes`.
    pub async fn start(dir: &std::path::Path, nodes: u64) -> Nats {
        Self::start_js(dir, nodes, true).await
    }

    /// `start`, with or without JetStream.
    pub async fn start_js(dir: &std::path::Path, nodes: u64, jetstream: bool) -> Nats {
        let auth = dir.join("auth");
        warden::auth::ensure(&auth, CLUSTER, nodes).unwrap();
        let server = match jetstream {
            true => NatsServer::start(dir, &auth_args(&auth)).await,
            false => NatsServer::start_on(dir, None, &auth_args(&auth)).await,
        };
        Nats {
            server: server.unwrap(),
            auth,
        }
    }

    pub fn url(&self) -> &str {
        &self.server.url
    }

    /// A client connected as identity `name`.
    pub async fn client(&self, name: &str) -> Client {
        connect_as(self.url(), CLUSTER, Some(&self.auth), name)
            .await
            .unwrap_or_else(|e| panic!("connect as {name}: {e:#}"))
    }

    /// Runs `warden ctl` as the admin of cluster `CLUSTER` with `args` (flags first, then
    /// the command), and answers its output.
    pub async fn ctl(&self, args: &[&str]) -> std::process::Output {
        let seed = warden::auth::seed_path(&self.auth, "admin");
        tokio::process::Command::new(env!("CARGO_BIN_EXE_warden"))
            .args(["ctl", "--nats", self.url(), "--cluster", CLUSTER, "--auth"])
            .arg(&seed)
            .args(args)
            .output()
            .await
            .unwrap()
    }

    /// Makes nats-server read its config again (identities added, rotated or revoked).
    pub fn reload(&self) {
        let pid = self.server.pid().expect("nats-server runs");
        warden::up::signal(pid, libc::SIGHUP);
    }
}

/// Nodes as separate OS processes.
pub struct TestCluster {
    pub cluster: LocalCluster,
    /// A client with the admin identity.
    pub client: Client,
    pub nats: Nats,
    _dir: TempDir,
}

impl TestCluster {
    /// Starts nats-server and `n` nodes (node 1 bootstraps), and waits until all are up.
    pub async fn start(n: u64, config_toml: Option<&str>) -> TestCluster {
        Self::start_tweaked(n, config_toml, |_, _| {}).await
    }

    /// Like `start`, with the launcher changed by `tweak` (given the test's directory) first.
    pub async fn start_tweaked(
        n: u64,
        config_toml: Option<&str>,
        tweak: impl FnOnce(&mut LocalCluster, &std::path::Path),
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let nats = Nats::start(dir.path(), n + 2).await;
        let bin = env!("CARGO_BIN_EXE_warden").into();
        let mut cluster = LocalCluster::new(
            bin,
            dir.path().join("nodes"),
            nats.url().to_string(),
            CLUSTER,
        );
        cluster.config_toml = config_toml.map(str::to_string);
        cluster.auth = Some(nats.auth.clone());
        tweak(&mut cluster, dir.path());
        for id in 1..=n {
            cluster.start_node(id, id == 1).await.unwrap();
        }
        let client = nats.client("admin").await;
        cluster
            .wait_ready(&client, n as usize, Duration::from_secs(30))
            .await
            .unwrap();
        TestCluster {
            cluster,
            client,
            nats,
            _dir: dir,
        }
    }

    /// A client that talks to node `id` only.
    pub fn via(&self, id: u64) -> Client {
        Client {
            node: Some(id),
            ..self.client.clone()
        }
    }

    pub async fn status(&self) -> Value {
        self.client
            .call("cluster_status", &json!({}))
            .await
            .unwrap()
    }

    pub async fn leader(&self) -> u64 {
        self.status().await["leader"].as_u64().unwrap()
    }

    /// Waits until node `id` reports `last_applied >= index`.
    pub async fn wait_applied(&self, id: u64, index: u64) {
        let c = self.via(id);
        wait_for(
            &format!("node {id} to apply index {index}"),
            Duration::from_secs(30),
            || {
                let c = c.clone();
                async move {
                    let h = c.call("health", &json!({})).await.ok()?;
                    (h["last_applied"].as_u64()? >= index).then_some(())
                }
            },
        )
        .await
    }
}

/// Names of all supervisors, sorted.
pub async fn supervisor_names(client: &Client) -> Vec<String> {
    let v = client.call("list_supervisors", &json!({})).await.unwrap();
    let mut names: Vec<String> = v["supervisors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// One node running inside the test process, on its own nats-server.
pub struct InProcessNode {
    /// A client with the admin identity.
    pub client: Client,
    pub nats: Nats,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

impl InProcessNode {
    pub async fn start() -> InProcessNode {
        Self::start_with(|_| {}).await
    }

    /// Starts a node whose config `tweak` may change first.
    pub async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> InProcessNode {
        Self::start_js(true, tweak).await
    }

    /// `start_with`, on a nats-server with or without JetStream.
    pub async fn start_js(jetstream: bool, tweak: impl FnOnce(&mut NodeConfig)) -> InProcessNode {
        let dir = tempfile::tempdir().unwrap();
        // Identity `node-2` too: tests read the history stream with it.
        let nats = Nats::start_js(dir.path(), 2, jetstream).await;
        let mut cfg = NodeConfig {
            id: 1,
            cluster: CLUSTER.into(),
            data_dir: dir.path().join("node-1"),
            bootstrap: true,
            auth: Some(warden::auth::seed_path(&nats.auth, "node-1")),
            ..Default::default()
        };
        cfg.nats.url = nats.url().to_string();
        tweak(&mut cfg);
        let cfg = cfg.finish().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(warden::node::run(cfg, async move {
            let _ = stopped.await;
        }));
        let client = nats.client("admin").await;
        wait_for(
            "the in-process node to lead",
            Duration::from_secs(20),
            || {
                let c = client.clone();
                async move {
                    let s = c.call("cluster_status", &json!({})).await.ok()?;
                    (s["nodes"][0]["status"] == "up").then_some(())
                }
            },
        )
        .await;
        InProcessNode {
            client,
            nats,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops the node cleanly and returns its result.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Polls `get_agent` until `pred` holds, and returns the record.
pub async fn wait_agent(
    c: &Client,
    agent: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(what, Duration::from_secs(20), || {
        let c = c.clone();
        let agent = agent.to_string();
        let ok = &pred;
        async move {
            let a = c.call("get_agent", &json!({"agent": agent})).await.ok()?;
            ok(&a).then_some(a)
        }
    })
    .await
}

/// Calls an agent through the Rust client (retrying while it is not running), with the
/// reply's error as a wire error.
pub async fn call_agent(
    c: &Client,
    agent: &str,
    body: Value,
) -> Result<Value, warden::protocol::WireError> {
    c.call_agent(agent, &body).await.map_err(|e| match e {
        warden::client::CallError::Reply(e) => e,
        warden::client::CallError::NoAnswer(why) => {
            warden::protocol::WireError::new(warden::protocol::ErrorCode::Unavailable, why)
        }
    })
}

/// A subscription to the events matching `filter` (`agent.*.log`, say), in place at the
/// server before it returns.
pub async fn events(c: &Client, filter: &str) -> async_nats::Subscriber {
    let sub = c
        .nats
        .subscribe(c.subjects.event_filter(filter))
        .await
        .unwrap();
    c.nats.flush().await.unwrap();
    sub
}
