//! The history of a run: every client operation as invoked and completed, with its outcome.
//! A timed-out operation is `Unknown`, never assumed to have failed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    ops: Arc<Mutex<Vec<Op>>>,
}

impl History {
    pub fn new(start: Instant) -> History {
        History {
            start,
            ops: Arc::default(),
        }
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
