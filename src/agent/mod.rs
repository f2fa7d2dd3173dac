//! Agents and kinds: the Rust API an embedding program implements to define its own kinds,
//! the registry of kinds a node can run, and the built-in kinds (`counter`, `echo`, `exec`).
//!
//! A kind starts agents from their config and optional saved state; an agent handles `call`
//! (with a reply) and `cast` (without), produces its state for a checkpoint, reports its health
//! and stops. An agent is owned by one task on the node that runs it and sees one message at a
//! time, so its methods take `&mut self` and need no locking.

pub mod builtin;
pub mod exec;
pub mod exec_shim;
pub mod journal;
pub mod mailbox;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use uuid::Uuid;

use crate::supervision::ExitReason;

/// A boxed, sendable future: agents are trait objects, so their async methods return these.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an agent could not handle a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentError {
    /// The message was wrong; the agent is fine and keeps running. The caller gets
    /// `bad_request`.
    BadRequest(String),
    /// The agent is broken: it ends with a crash and its supervisor takes over.
    Crash(String),
}

/// The answer to a call.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub value: Value,
    /// Checkpoint the agent's state, and wait until the checkpoint is replicated, before the
    /// caller gets `value`: a durable agent's acknowledged state survives its node.
    pub checkpoint_first: bool,
}

impl Reply {
    /// A plain reply.
    pub fn now(value: Value) -> Reply {
        Reply {
            value,
            checkpoint_first: false,
        }
    }
}

/// What an agent starts from.
#[derive(Debug, Clone)]
pub struct StartContext {
    pub id: Uuid,
    pub name: Option<String>,
    /// The agent's config, as given to `spawn_agent`.
    pub config: Value,
    /// Its last checkpoint, if it has one.
    pub state: Option<Bytes>,
    /// Where the agent may send log lines (published as `log` events).
    pub log: LogSink,
}

/// Sends log lines to the node, which publishes them as `log` events.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: Option<tokio::sync::mpsc::Sender<(Uuid, String)>>,
    id: Uuid,
}

impl LogSink {
    pub(crate) fn new(tx: tokio::sync::mpsc::Sender<(Uuid, String)>, id: Uuid) -> LogSink {
        LogSink { tx: Some(tx), id }
    }

    /// A sink that drops everything (tests, kinds started outside a node).
    pub fn discard() -> LogSink {
        LogSink {
            tx: None,
            id: Uuid::nil(),
        }
    }

    /// Logs one line; drops it when the node is behind, as logging must never block an agent.
    pub fn line(&self, line: impl Into<String>) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send((self.id, line.into())); // a full queue drops the line
        }
    }
}

/// A running agent.
pub trait Agent: Send + 'static {
    /// Handles a request that wants an answer.
    fn call(&mut self, msg: Value) -> BoxFuture<'_, Result<Reply, AgentError>>;

    /// Handles a message that wants no answer.
    fn cast(&mut self, msg: Value) -> BoxFuture<'_, Result<(), AgentError>> {
        Box::pin(async move { self.call(msg).await.map(|_| ()) })
    }

    /// The state to checkpoint (MessagePack bytes), or `None` for a stateless agent.
    fn checkpoint(&mut self) -> Option<Bytes> {
        None
    }

    /// A health report, shown by `get_agent`.
    fn health(&self) -> Value {
        Value::String("ok".into())
    }

    /// The OS process the agent runs, if it runs one (`exec`): it leads a process group whose
    /// memory and CPU time `get_agent_metrics` reports. Asked once, after start.
    fn os_process(&self) -> Option<u32> {
        None
    }

    /// Taken once, right after start: a future that resolves when the agent ends by itself
    /// (an `exec` process exiting). Plain agents never end by themselves: `None`.
    ///
    /// An agent that returns `None` is parked while idle: it has no task of its own between
    /// messages, and when its node's lease runs out the host drops it at its next turn rather
    /// than at once. So an agent that does work of its own between messages (a process, a
    /// spawned task, a timer) must return its end here: then it keeps a task that watches the
    /// lease and drops the agent the moment the lease ends.
    fn take_exit(&mut self) -> Option<BoxFuture<'static, ExitReason>> {
        None
    }

    /// The agent's result, asked once after it ended by itself (its `take_exit` resolved).
    /// When that ends it for good (a `transient` agent that finished normally, a `temporary`
    /// one either way), the result is kept in the registry and answered by `wait_agent` (at
    /// most `limits::MAX_RESULT_BYTES` as JSON; a larger one is replaced by an error); after a
    /// crash that is restarted it is dropped. `None`: no result.
    fn finish(&mut self) -> Option<Value> {
        None
    }

    /// Stops the agent within `timeout_ms` (0: at once). Whatever it does not finish by then
    /// is abandoned (an `exec` process is killed).
    fn stop(&mut self, timeout_ms: u64) -> BoxFuture<'_, ()> {
        let _ = timeout_ms;
        Box::pin(async {})
    }
}

/// A kind of agent: starts agents.
pub trait Kind: Send + Sync + 'static {
    /// Checks an agent's config before its start, on the node that runs it. An error is a
    /// failed start: the first start of an agent that never ran removes it (OTP's
    /// `start_child` returning `{error, Reason}`, which `spawn_agent {wait: "running"}`
    /// answers); a later one is a crash for its supervisor. Cheap and without side effects:
    /// it runs on the node's host loop.
    fn validate(&self, config: &Value) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Starts an agent from its config and saved state. An error is a failed start, as for
    /// `validate`.
    fn start(&self, ctx: StartContext) -> BoxFuture<'static, Result<Box<dyn Agent>, String>>;
}

/// The kinds a node can run, by name.
#[derive(Clone, Default)]
pub struct Kinds {
    kinds: BTreeMap<String, Arc<dyn Kind>>,
}

impl Kinds {
    /// No kinds at all.
    pub fn empty() -> Kinds {
        Kinds::default()
    }

    /// The built-in kinds: `counter`, `echo`, `job`, and `exec` where `exec` is enabled in the
    /// node's config (then only allow-listed commands run). A node without it does not
    /// advertise `exec`, so an exec agent is never placed there, and a cluster where no node
    /// that is up runs it refuses the spawn.
    pub fn builtin(exec: exec::ExecConfig) -> Kinds {
        let mut k = Kinds::empty();
        k.register("counter", builtin::Counter);
        k.register("echo", builtin::Echo);
        k.register("job", builtin::Job);
        if exec.enabled {
            k.register("exec", exec::Exec::new(exec));
        }
        k
    }

    /// Adds (or replaces) a kind. Names follow `[A-Za-z0-9_-]{1,128}`.
    pub fn register(&mut self, name: &str, kind: impl Kind) {
        self.kinds.insert(name.to_string(), Arc::new(kind));
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Kind>> {
        self.kinds.get(name).cloned()
    }

    /// The kinds' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.kinds.keys().cloned().collect()
    }

    /// The position of kind `name` in `names`, which metrics use to find its series without
    /// a lookup by name per call (`u16::MAX` if there is no such kind, or too many).
    pub fn index_of(&self, name: &str) -> u16 {
        self.kinds
            .keys()
            .position(|k| k == name)
            .and_then(|i| u16::try_from(i).ok())
            .unwrap_or(u16::MAX)
    }
}
