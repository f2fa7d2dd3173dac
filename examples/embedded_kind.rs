//! Embedding a Warden node with a kind of one's own, as a Rust program would (the way ractor
//! and kameo users start their actors). The `greeter` kind shows every part of the `Kind` and
//! `Agent` traits:
//!
//! - `validate` refuses a config without a greeting, on the node, before the agent counts as
//!   started: a spawn that waits for `running` gets `start_failed` and nothing is kept;
//! - `start` resumes from the last checkpoint;
//! - `call` answers `{"op": "greet", "name": ...}`, checkpointing first (a durable answer);
//! - after `rounds` greetings the agent ends by itself (`take_exit`) and leaves a result
//!   (`finish`), which `wait_agent` answers.
//!
//! It starts its own nats-server (from PATH, with identities) and one node in this process,
//! drives it through the Rust client, and exits non-zero if anything is not as described. CI
//! runs it: `cargo run --example embedded_kind`.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use warden::agent::{Agent, AgentError, BoxFuture, Kind, Kinds, Reply, StartContext};
use warden::client::{CallError, Client};
use warden::config::NodeConfig;
use warden::protocol::ErrorCode;
use warden::supervision::ExitReason;

/// `greeter`: config `{"greeting": "Hello", "rounds": 3}`.
struct Greeter;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GreeterConfig {
    greeting: String,
    #[serde(default = "three")]
    rounds: u64,
}

fn three() -> u64 {
    3
}

/// What a greeter checkpoints.
#[derive(Default, Serialize, Deserialize)]
struct Greeted {
    count: u64,
    last: Option<String>,
}

fn config(v: &Value) -> Result<GreeterConfig, String> {
    let cfg = GreeterConfig::deserialize(v).map_err(|e| format!("greeter config: {e}"))?;
    if cfg.greeting.is_empty() || cfg.rounds == 0 || cfg.rounds > 1_000 {
        return Err("greeter config: a greeting, and 1 to 1000 rounds".into());
    }
    Ok(cfg)
}

struct GreeterAgent {
    cfg: GreeterConfig,
    greeted: Greeted,
    /// Fired when the last round is answered; `take_exit` waits on it.
    done: Option<tokio::sync::oneshot::Sender<()>>,
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Kind for Greeter {
    fn validate(&self, v: &Value) -> Result<(), String> {
        config(v).map(|_| ())
    }

    fn start(&self, ctx: StartContext) -> BoxFuture<'static, Result<Box<dyn Agent>, String>> {
        Box::pin(async move {
            let cfg = config(&ctx.config)?;
            let greeted = match ctx.state {
                Some(bytes) => rmp_serde::from_slice(&bytes).map_err(|e| e.to_string())?,
                None => Greeted::default(),
            };
            let (done, ended) = tokio::sync::oneshot::channel();
            Ok(Box::new(GreeterAgent {
                cfg,
                greeted,
                done: Some(done),
                ended: Some(ended),
            }) as Box<dyn Agent>)
        })
    }
}

impl Agent for GreeterAgent {
    fn call(&mut self, msg: Value) -> BoxFuture<'_, Result<Reply, AgentError>> {
        Box::pin(async move {
            let Some(name) = msg.get("name").and_then(Value::as_str) else {
                return Err(AgentError::BadRequest("greet {\"name\": ...}".into()));
            };
            self.greeted.count += 1;
            self.greeted.last = Some(name.to_string());
            if self.greeted.count >= self.cfg.rounds {
                if let Some(done) = self.done.take() {
                    let _ = done.send(());
                }
            }
            let text = format!("{}, {name}!", self.cfg.greeting);
            Ok(Reply {
                value: json!({ "text": text, "count": self.greeted.count }),
                checkpoint_first: true,
            })
        })
    }

    fn checkpoint(&mut self) -> Option<Bytes> {
        rmp_serde::to_vec_named(&self.greeted).ok().map(Bytes::from)
    }

    fn take_exit(&mut self) -> Option<BoxFuture<'static, ExitReason>> {
        let ended = self.ended.take()?;
        Some(Box::pin(async move {
            // A dropped sender (the agent stopped) never fires: stay until stopped.
            match ended.await {
                Ok(()) => ExitReason::Normal,
                Err(_) => std::future::pending().await,
            }
        }))
    }

    fn finish(&mut self) -> Option<Value> {
        Some(json!({ "greeted": self.greeted.count, "last": self.greeted.last }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let auth = dir.path().join("auth");
    warden::auth::ensure(&auth, "example", 1)?;
    let nats = warden::up::NatsServer::start(dir.path(), &warden::up::auth_args(&auth))
        .await
        .context("start nats-server (is it on PATH? cluster/install-deps.sh installs it)")?;
    let mut cfg = NodeConfig {
        id: 1,
        cluster: "example".into(),
        data_dir: dir.path().join("node-1"),
        bootstrap: true,
        auth: Some(warden::auth::seed_path(&auth, "node-1")),
        ..Default::default()
    };
    cfg.nats.url = nats.url.clone();
    let cfg = cfg.finish()?;
    let mut kinds = Kinds::builtin(cfg.exec.clone());
    kinds.register("greeter", Greeter);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(warden::node::run_with_kinds(cfg, kinds, async move {
        let _ = stopped.await;
    }));
    let c = warden::up::connect_as(&nats.url, "example", Some(&auth), "admin").await?;
    let outcome = drive(&c).await;
    let _ = stop.send(());
    node.await??;
    outcome?;
    println!("embedded_kind: every step answered as described");
    Ok(())
}

/// The example's story, checked step by step.
async fn drive(c: &Client) -> anyhow::Result<()> {
    warden::up::wait_ready(c, 1, Duration::from_secs(30)).await?;

    // validate refuses it on the node: start_child's {error, Reason}, nothing kept.
    let bad = json!({"name": "mute", "kind": "greeter", "config": {"rounds": 2},
                     "wait": "running"});
    match c.call("spawn_agent", &bad).await {
        Err(CallError::Reply(e)) if e.code == ErrorCode::StartFailed => {
            println!("spawn without a greeting: start_failed: {}", e.message)
        }
        other => bail!("a greeter without a greeting must fail its first start: {other:?}"),
    }

    let good = json!({"name": "host", "kind": "greeter", "restart": "transient",
                      "config": {"greeting": "Hello", "rounds": 2}, "wait": "running"});
    let a = c.call("spawn_agent", &good).await?;
    println!(
        "spawned {} on node {}: {}",
        a["name"], a["node"], a["status"]
    );
    for name in ["Ada", "Grace"] {
        let r = c.call_agent("host", &json!({"name": name})).await?;
        println!("greet {name}: {r}");
    }
    let done = c
        .call(
            "wait_agent",
            &json!({"agent": "host", "timeout_ms": 10_000}),
        )
        .await?;
    println!("wait_agent: {done}");
    let expected = json!({"greeted": 2, "last": "Grace"});
    if done["status"] != "stopped" || done["result"] != expected {
        bail!("the greeter must finish after two rounds with {expected}: {done}");
    }
    Ok(())
}
