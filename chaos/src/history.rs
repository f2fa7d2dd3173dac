//! The history of a run: every client operation as invoked and completed, with its outcome.
//! A timed-out operation is `Unknown`, never assumed to have failed.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

/// What an operation did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    Create {
        name: String,
        parent: String,
        request_id: String,
        retry: bool,
    },
    Stop {
        name: String,
    },
    Read {
        parent: String,
    },
    /// `spawn_agent` under the client's supervisor, with a request id; `retry` when it repeats
    /// an earlier attempt whose outcome was unknown.
    SpawnAgent {
        name: String,
        supervisor: String,
        restart: String,
        request_id: String,
        retry: bool,
    },
    /// `stop_agent`, with a request id (`retry` as for spawns).
    StopAgent {
        name: String,
        request_id: String,
        retry: bool,
    },
    /// `list_agents {supervisor}`.
    ReadAgents {
        supervisor: String,
    },
    BadInput {
        what: String,
    },
    /// `{"op":"add","n":1}` to a durable counter; an ok outcome carries `{"value": v}`.
    Increment {
        counter: String,
    },
    /// `{"op":"get"}` to a durable counter.
    CounterRead {
        counter: String,
    },
    /// `migrate_agent` of a durable counter, to a chosen node or (`None`) the best one.
    Migrate {
        agent: String,
        to: Option<u64>,
    },
    /// `drain_node`, or its cancel.
    Drain {
        node: u64,
        cancel: bool,
    },
}

/// How it ended.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok { value: Value },
    Failed { code: String, message: String },
    Unknown { why: String },
}

/// One operation.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub client: usize,
    pub kind: OpKind,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    pub outcome: Outcome,
}

/// The shared, append-only history.
#[derive(Clone)]
pub struct History {
    start: Instant,
    /// The wall clock (UTC, microseconds since the Unix epoch) read together with `start`:
    /// node journals use wall-clock time, the history uses time since `start`.
    start_wall_us: i64,
    ops: Arc<Mutex<Vec<Op>>>,
}

/// The wall clock now, in microseconds since the Unix epoch (UTC), as nodes write it.
pub fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl History {
    pub fn new(start: Instant) -> History {
        History {
            start,
            start_wall_us: wall_us(),
            ops: Arc::default(),
        }
    }

    /// The wall-clock time at which the run started (microseconds since the Unix epoch).
    pub fn start_wall_us(&self) -> i64 {
        self.start_wall_us
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
