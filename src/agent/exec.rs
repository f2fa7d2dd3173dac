//! The `exec` kind: supervises an operating-system process. Guarded: whoever can publish on
//! NATS must not be able to run arbitrary programs, so `exec` refuses to start anything unless
//! the node's config enables it, and then runs only commands on the node's allow-list.
//!
//! Config: `{"command": "/usr/bin/x", "args": [...], "env": {...}, "cwd": "..."}`. A non-zero
//! exit (or death by a signal) is a crash, a zero exit a normal end; each output line becomes a
//! `log` event; stopping sends SIGTERM, then SIGKILL after the shutdown timeout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use super::{Agent, AgentError, BoxFuture, Kind, LogSink, Reply, StartContext};
use crate::supervision::ExitReason;

pub use crate::config::ExecConfig;

/// The `exec` kind.
pub struct Exec {
    cfg: ExecConfig,
}

impl Exec {
    pub fn new(cfg: ExecConfig) -> Exec {
        Exec { cfg }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecSpec {
    command: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<PathBuf>,
}

impl Kind for Exec {
    fn start(&self, ctx: StartContext) -> BoxFuture<'static, Result<Box<dyn Agent>, String>> {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            if !cfg.enabled {
                return Err(
                    "exec is disabled on this node: set [exec] enabled = true and list \
                            the allowed commands in [exec] allow"
                        .into(),
                );
            }
            let spec: ExecSpec =
                serde_json::from_value(ctx.config).map_err(|e| format!("exec config: {e}"))?;
            if !cfg.allow.iter().any(|a| a == &spec.command) {
                return Err(format!(
                    "exec: {:?} is not on this node's allow-list ([exec] allow)",
                    spec.command
                ));
            }
            let mut cmd = tokio::process::Command::new(&spec.command);
            cmd.args(&spec.args)
                .envs(&spec.env)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            if let Some(dir) = &spec.cwd {
                cmd.current_dir(dir);
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("exec {:?}: {e}", spec.command))?;
            let pid = child.id().ok_or("exec: the process ended at once")?;
            for out in [
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ]
            .into_iter()
            .flatten()
            {
                tokio::spawn(forward_lines(out, ctx.log.clone()));
            }
            let (tx, exit) = watch::channel(None);
            tokio::spawn(async move {
                let reason = match child.wait().await {
                    Ok(s) if s.success() => ExitReason::Normal,
                    Ok(s) => ExitReason::Crash(match s.code() {
                        Some(code) => format!("exited with status {code}"),
                        None => format!("killed by a signal ({s})"),
                    }),
                    Err(e) => ExitReason::Crash(format!("wait failed: {e}")),
                };
                let _ = tx.send(Some(reason)); // nobody waiting is fine
            });
            Ok(Box::new(ExecAgent { pid, exit }) as Box<dyn Agent>)
        })
    }
}

/// Sends each output line to the log sink; ends with the stream.
async fn forward_lines(out: Box<dyn tokio::io::AsyncRead + Send + Unpin>, log: LogSink) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.line(line);
    }
}

struct ExecAgent {
    pid: u32,
    exit: watch::Receiver<Option<ExitReason>>,
}

async fn wait_exit(mut rx: watch::Receiver<Option<ExitReason>>) -> ExitReason {
    match rx.wait_for(|r| r.is_some()).await {
        Ok(r) => r.clone().unwrap_or(ExitReason::Normal),
        Err(_) => ExitReason::Crash("lost track of the process".into()),
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid yields ESRCH.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Dropping the agent (a lease lost, a stop cut, the node stopping) kills its process: the
/// `Child`, and with it `kill_on_drop`, lives in the task that waits for the exit, so without
/// this the process would outlive its agent. Only the process itself: its own children, and a
/// node killed with SIGKILL, are the next step (process groups and a parent-death signal).
impl Drop for ExecAgent {
    fn drop(&mut self) {
        // Not exited as far as the waiter knows. The waiter reaps before it says so, so the
        // pid can only have been reused in the moment between the two.
        if self.exit.borrow().is_none() {
            signal(self.pid, libc::SIGKILL);
        }
    }
}

impl Agent for ExecAgent {
    fn call(&mut self, msg: Value) -> BoxFuture<'_, Result<Reply, AgentError>> {
        Box::pin(async move {
            match msg.get("op").and_then(Value::as_str) {
                Some("status") => Ok(Reply::now(
                    json!({ "pid": self.pid, "running": self.exit.borrow().is_none() }),
                )),
                _ => Err(AgentError::BadRequest(
                    "exec agents answer {\"op\":\"status\"}".into(),
                )),
            }
        })
    }

    fn health(&self) -> Value {
        json!({ "pid": self.pid })
    }

    fn take_exit(&mut self) -> Option<BoxFuture<'static, ExitReason>> {
        Some(Box::pin(wait_exit(self.exit.clone())))
    }

    fn stop(&mut self, timeout_ms: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.exit.borrow().is_some() {
                return;
            }
            if timeout_ms > 0 {
                signal(self.pid, libc::SIGTERM);
                let waited = tokio::time::timeout(
                    Duration::from_millis(timeout_ms),
                    wait_exit(self.exit.clone()),
                );
                if waited.await.is_ok() {
                    return;
                }
            }
            signal(self.pid, libc::SIGKILL);
            let _ = wait_exit(self.exit.clone()).await; // it ends: SIGKILL cannot be caught
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(config: Value) -> StartContext {
        StartContext {
            id: uuid::Uuid::nil(),
            name: None,
            config,
            state: None,
            log: LogSink::discard(),
        }
    }

    fn allowed(paths: &[&str]) -> Exec {
        Exec::new(ExecConfig {
            enabled: true,
            allow: paths.iter().map(PathBuf::from).collect(),
        })
    }

    #[tokio::test]
    async fn exec_is_refused_unless_enabled_and_allowed() {
        let off = Exec::new(ExecConfig::default());
        let err = off
            .start(ctx(json!({"command": "/bin/true"})))
            .await
            .err()
            .unwrap();
        assert!(err.contains("disabled"), "{err}");
        let err = allowed(&["/bin/true"])
            .start(ctx(json!({"command": "/bin/sh"})))
            .await
            .err()
            .unwrap();
        assert!(err.contains("allow-list"), "{err}");
    }

    #[tokio::test]
    async fn exit_codes_decide_normal_or_crash() {
        let k = allowed(&["/bin/sh"]);
        let mut ok = k
            .start(ctx(json!({"command": "/bin/sh", "args": ["-c", "exit 0"]})))
            .await
            .unwrap();
        assert_eq!(ok.take_exit().unwrap().await, ExitReason::Normal);
        let mut bad = k
            .start(ctx(json!({"command": "/bin/sh", "args": ["-c", "exit 3"]})))
            .await
            .unwrap();
        assert_eq!(
            bad.take_exit().unwrap().await,
            ExitReason::Crash("exited with status 3".into())
        );
    }

    /// Goal: shutdown is SIGTERM, then SIGKILL once the timeout passes.
    /// Method: a shell that ignores SIGTERM must be killed; one that honours it ends by itself.
    /// Each script says `ready` once its trap is set, and only then is it stopped.
    #[tokio::test]
    async fn stop_sends_sigterm_then_sigkill_after_the_timeout() {
        let k = allowed(&["/bin/sh"]);
        let started = |script: &str| {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let ctx = StartContext {
                id: uuid::Uuid::nil(),
                name: None,
                config: json!({"command": "/bin/sh", "args": ["-c", script]}),
                state: None,
                log: LogSink::new(tx, uuid::Uuid::nil()),
            };
            (ctx, rx)
        };
        let ready = |mut rx: tokio::sync::mpsc::Receiver<(uuid::Uuid, String)>| async move {
            while let Some((_, line)) = rx.recv().await {
                if line == "ready" {
                    return;
                }
            }
            panic!("the script never said ready");
        };

        let (ctx, rx) = started("trap '' TERM; echo ready; while :; do sleep 0.05; done");
        let mut a = k.start(ctx).await.unwrap();
        let exit = a.take_exit().unwrap();
        ready(rx).await;
        a.stop(200).await;
        assert!(
            matches!(exit.await, ExitReason::Crash(m) if m.contains("SIGKILL")),
            "killed"
        );

        let (ctx, rx) = started("trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done");
        let mut b = k.start(ctx).await.unwrap();
        let exit = b.take_exit().unwrap();
        ready(rx).await;
        b.stop(5_000).await;
        assert_eq!(exit.await, ExitReason::Normal, "ended by itself on SIGTERM");
    }

    /// Goal: an agent dropped without a stop (a lease lost, a stop cut short) takes its
    /// process with it, even one that ignores SIGTERM.
    #[tokio::test]
    async fn dropping_the_agent_kills_its_process() {
        let k = allowed(&["/bin/sh"]);
        let mut a = k
            .start(ctx(json!({"command": "/bin/sh",
                               "args": ["-c", "trap '' TERM; while :; do sleep 0.05; done"]})))
            .await
            .unwrap();
        let exit = a.take_exit().unwrap();
        drop(a);
        let ended = tokio::time::timeout(Duration::from_secs(10), exit).await;
        assert!(
            matches!(&ended, Ok(ExitReason::Crash(m)) if m.contains("SIGKILL")),
            "{ended:?}"
        );
    }
}
