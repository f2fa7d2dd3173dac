//! The built-in `counter`, `echo` and `job` kinds, enough to use and test the system without
//! writing Rust.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Agent, AgentError, BoxFuture, Kind, Reply, StartContext};

/// `counter`: state `{value}`. Calls: `{"op":"add","n":k}` and `{"op":"get"}` answer
/// `{"value":v}`; `{"op":"crash"}` makes it fail. Config: `{"durable": bool, "start": n}`. A
/// durable counter answers `add` only after the new value is checkpointed.
pub struct Counter;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterConfig {
    #[serde(default)]
    durable: bool,
    #[serde(default)]
    start: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CounterState {
    value: i64,
}

struct CounterAgent {
    value: i64,
    durable: bool,
}

fn counter_config(config: &Value) -> Result<CounterConfig, String> {
    if config.is_null() {
        return Ok(CounterConfig::default());
    }
    CounterConfig::deserialize(config).map_err(|e| format!("counter config: {e}"))
}

impl Kind for Counter {
    fn validate(&self, config: &Value) -> Result<(), String> {
        counter_config(config).map(|_| ())
    }

    fn start(&self, ctx: StartContext) -> BoxFuture<'static, Result<Box<dyn Agent>, String>> {
        Box::pin(async move {
            let cfg = counter_config(&ctx.config)?;
            let value = match ctx.state {
                Some(bytes) => {
                    rmp_serde::from_slice::<CounterState>(&bytes)
                        .map_err(|e| format!("counter state: {e}"))?
                        .value
                }
                None => cfg.start,
            };
            Ok(Box::new(CounterAgent {
                value,
                durable: cfg.durable,
            }) as Box<dyn Agent>)
        })
    }
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum CounterOp {
    Add { n: i64 },
    Get {},
    Crash {},
}

impl Agent for CounterAgent {
    fn call(&mut self, msg: Value) -> BoxFuture<'_, Result<Reply, AgentError>> {
        Box::pin(async move {
            let op: CounterOp = serde_json::from_value(msg)
                .map_err(|e| AgentError::BadRequest(format!("counter: {e}")))?;
            match op {
                CounterOp::Add { n } => {
                    self.value = self.value.checked_add(n).ok_or_else(|| {
                        AgentError::BadRequest("counter: the sum would overflow".into())
                    })?;
                    Ok(Reply {
                        value: json!({ "value": self.value }),
                        checkpoint_first: self.durable,
                    })
                }
                CounterOp::Get {} => Ok(Reply::now(json!({ "value": self.value }))),
                CounterOp::Crash {} => Err(AgentError::Crash("asked to crash".into())),
            }
        })
    }

    fn checkpoint(&mut self) -> Option<Bytes> {
        // Serializing one integer cannot fail.
        rmp_serde::to_vec_named(&CounterState { value: self.value })
            .ok()
            .map(Bytes::from)
    }

    fn health(&self) -> Value {
        json!({ "value": self.value, "durable": self.durable })
    }
}

/// `echo`: answers every call with the message it was sent.
pub struct Echo;

struct EchoAgent;

impl Kind for Echo {
    fn start(&self, _ctx: StartContext) -> BoxFuture<'static, Result<Box<dyn Agent>, String>> {
        Box::pin(async { Ok(Box::new(EchoAgent) as Box<dyn Agent>) })
    }
}

impl Agent for EchoAgent {
    fn call(&mut self, msg: Value) -> BoxFuture<'_, Result<Reply, AgentError>> {
        Box::pin(async move { Ok(Reply::now(msg)) })
    }
}

/// `job`: runs to completion. It works for `ms` milliseconds (at most an hour), then finishes
/// with `result`, or fails with `fail` if that is given. Config: `{"ms": n, "result": any,
/// "fail": "why"}`. `{"op":"status"}` answers `{ms, started_ms_ago}`. A `transient` job that
/// finishes is done: `wait_agent` answers its result. Restarted (a crash, a failover), it
/// works its whole time again.
pub struct Job;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobConfig {
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    fail: Option<String>,
}

/// The longest a `job` works, in milliseconds.
const JOB_MAX_MS: u64 = 3_600_000;

fn job_config(config: &Value) -> Result<JobConfig, String> {
    let cfg = if config.is_null() {
        JobConfig::default()
    } else {
        JobConfig::deserialize(config).map_err(|e| format!("job config: {e}"))?
    };
    if cfg.ms > JOB_MAX_MS {
        return Err(format!("job config: ms is at most {JOB_MAX_MS}"));
    }
    Ok(cfg)
}

struct JobAgent {
    ms: u64,
    began: std::time::Instant,
    result: Option<Value>,
    end: Option<BoxFuture<'static, crate::supervision::ExitReason>>,
}

impl Kind for Job {
    fn validate(&self, config: &Value) -> Result<(), String> {
        job_config(config).map(|_| ())
    }

    fn start(&self, ctx: StartContext) -> BoxFuture<'static, Result<Box<dyn Agent>, String>> {
        Box::pin(async move {
            let cfg = job_config(&ctx.config)?;
            let (ms, fail) = (cfg.ms, cfg.fail);
            let end = Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                match fail {
                    Some(why) => crate::supervision::ExitReason::Crash(why),
                    None => crate::supervision::ExitReason::Normal,
                }
            });
            Ok(Box::new(JobAgent {
                ms,
                began: std::time::Instant::now(),
                result: cfg.result,
                end: Some(end),
            }) as Box<dyn Agent>)
        })
    }
}

impl Agent for JobAgent {
    fn call(&mut self, msg: Value) -> BoxFuture<'_, Result<Reply, AgentError>> {
        Box::pin(async move {
            match msg.get("op").and_then(Value::as_str) {
                Some("status") => Ok(Reply::now(json!({
                    "ms": self.ms,
                    "started_ms_ago": self.began.elapsed().as_millis() as u64,
                }))),
                _ => Err(AgentError::BadRequest(
                    "job agents answer {\"op\":\"status\"}".into(),
                )),
            }
        })
    }

    fn take_exit(&mut self) -> Option<BoxFuture<'static, crate::supervision::ExitReason>> {
        self.end.take()
    }

    fn finish(&mut self) -> Option<Value> {
        self.result.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::LogSink;

    fn ctx(config: Value, state: Option<Bytes>) -> StartContext {
        StartContext {
            id: uuid::Uuid::nil(),
            name: None,
            config,
            state,
            log: LogSink::discard(),
        }
    }

    #[tokio::test]
    async fn a_counter_adds_checkpoints_and_resumes_from_its_state() {
        let mut c = Counter
            .start(ctx(json!({"durable": true}), None))
            .await
            .unwrap();
        let r = c.call(json!({"op": "add", "n": 5})).await.unwrap();
        assert_eq!(r.value, json!({"value": 5}));
        assert!(
            r.checkpoint_first,
            "a durable counter checkpoints before answering add"
        );
        let state = c.checkpoint().unwrap();
        let mut again = Counter.start(ctx(json!({}), Some(state))).await.unwrap();
        let r = again.call(json!({"op": "get"})).await.unwrap();
        assert_eq!(r.value, json!({"value": 5}));
        assert!(!r.checkpoint_first);
    }

    #[tokio::test]
    async fn a_counter_tells_bad_requests_from_crashes() {
        let mut c = Counter.start(ctx(Value::Null, None)).await.unwrap();
        assert!(matches!(
            c.call(json!({"op": "mul"})).await,
            Err(AgentError::BadRequest(_))
        ));
        assert!(matches!(
            c.call(json!({"op": "add"})).await,
            Err(AgentError::BadRequest(_))
        ));
        assert!(matches!(
            c.call(json!({"op": "crash"})).await,
            Err(AgentError::Crash(_))
        ));
        assert!(Counter
            .start(ctx(json!({"durible": true}), None))
            .await
            .is_err());
    }
}
