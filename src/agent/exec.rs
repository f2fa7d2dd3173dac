//! The `exec` kind: supervises an operating-system process. Guarded: whoever can publish on
//! NATS must not be able to run arbitrary programs, so `exec` refuses to start anything unless
//! the node's config enables it, and then runs only commands on the node's allow-list.
//!
//! Config: `{"command": "/usr/bin/x", "args": [...], "env": {...}, "cwd": "..."}`. A non-zero
//! exit (or death by a signal) is a crash, a zero exit a normal end; each output line becomes a
//! `log` event; stopping sends SIGTERM, then SIGKILL after the shutdown timeout.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use super::{Agent, AgentError, BoxFuture, Kind, LogSink, Reply, StartContext};
use crate::supervision::ExitReason;

pub use crate::config::{AllowEntry, ExecConfig, ExecRule, Rlimits};

/// The `exec` kind.
pub struct Exec {
    cfg: ExecConfig,
}

const DISABLED: &str = "exec is disabled on this node: set [exec] enabled = true and list the \
                        allowed commands in [exec] allow";

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
    /// What `start` checks before it runs anything: the node enables exec, the config reads,
    /// the allow-list permits it, it sets no refused variable.
    fn validate(&self, config: &Value) -> Result<(), String> {
        if !self.cfg.enabled {
            return Err(DISABLED.into());
        }
        let spec = ExecSpec::deserialize(config).map_err(|e| format!("exec config: {e}"))?;
        permit(&self.cfg.allow, &spec)?;
        if let Some(bad) = spec.env.keys().find(|k| refused_env(k)) {
            return Err(format!("exec: the config may not set {bad:?}"));
        }
        Ok(())
    }

    fn start(&self, ctx: StartContext) -> BoxFuture<'static, Result<Box<dyn Agent>, String>> {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            if !cfg.enabled {
                return Err(DISABLED.into());
            }
            let spec: ExecSpec =
                serde_json::from_value(ctx.config).map_err(|e| format!("exec config: {e}"))?;
            let permit = permit(&cfg.allow, &spec)?;
            if let Some(bad) = spec.env.keys().find(|k| refused_env(k)) {
                return Err(format!("exec: the config may not set {bad:?}"));
            }
            runnable(&spec.command)?;
            let direct = cfg.shim.is_none();
            let mut cmd = match &cfg.shim {
                // The shim runs the command and kills its whole tree when the lifeline (its
                // stdin, whose other end the agent holds) closes (`exec_shim`). It stays the
                // node's user: the command drops to the rule's user and takes its limits
                // just before its own exec, and cannot signal or trace its shim then.
                Some(shim) => {
                    let opts = super::exec_shim::ShimOptions {
                        rlimits: permit.rlimits,
                        uid: permit.uid,
                        gid: permit.gid,
                    };
                    let mut cmd = tokio::process::Command::new(shim);
                    cmd.arg(super::exec_shim::SUBCOMMAND)
                        .args(super::exec_shim::option_args(&opts))
                        .arg("--")
                        .arg(&spec.command)
                        .stdin(Stdio::piped());
                    cmd
                }
                None => {
                    let mut cmd = tokio::process::Command::new(&spec.command);
                    cmd.stdin(Stdio::null());
                    if let Some(gid) = permit.gid {
                        cmd.gid(gid);
                    }
                    if let Some(uid) = permit.uid {
                        cmd.uid(uid);
                    }
                    cmd
                }
            };
            // Only what the node passes on, then what the config sets: never the node's
            // `WARDEN_*` settings, among them the path to its identity.
            cmd.env_clear();
            for name in &cfg.pass_env {
                if let Some(v) = std::env::var_os(name) {
                    cmd.env(name, v);
                }
            }
            cmd.args(&spec.args)
                .envs(&spec.env)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // With a shim, the lifeline is the way to kill: a SIGKILL on drop would take
                // the shim before it killed the tree.
                .kill_on_drop(direct);
            if let Some(dir) = &permit.cwd {
                cmd.current_dir(dir);
            }
            let limits = if direct {
                permit.rlimits
            } else {
                Rlimits::default()
            };
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: the closure runs in the child between fork and exec and calls only
            // async-signal-safe functions (setsid, setrlimit, prctl, getppid, raise).
            unsafe {
                cmd.pre_exec(move || {
                    // A session of its own: a new process group, which a stop or a kill
                    // reaches whole, and no way back into the node's group or terminal.
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    set_rlimits(&limits)?;
                    if direct {
                        // Without the shim: dies with the node, even a SIGKILLed one. Linux
                        // sends the signal when the forking thread ends: the runtime's worker
                        // threads live as long as the node.
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        if libc::getppid() != parent {
                            libc::raise(libc::SIGKILL); // the node died before the prctl
                        }
                    }
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("exec {:?}: {e}", spec.command))?;
            let pid = child.id().ok_or("exec: the process ended at once")?;
            let tail = Arc::new(Mutex::new(VecDeque::new()));
            let code = Arc::new(std::sync::OnceLock::new());
            let mut readers = Vec::new();
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
                readers.push(tokio::spawn(forward_lines(
                    out,
                    ctx.log.clone(),
                    tail.clone(),
                )));
            }
            let lifeline = Mutex::new(child.stdin.take());
            let (tx, exit) = watch::channel(None);
            // When the output is read to its end (the last lines go into the result).
            let (drained_tx, drained) = watch::channel(false);
            tokio::spawn(async move {
                futures::future::join_all(readers).await;
                let _ = drained_tx.send(true);
            });
            let exit_code = code.clone();
            tokio::spawn(async move {
                let waited = child.wait().await;
                if !direct {
                    // The shim is gone: should it have been killed before it cleaned up (by
                    // its command, running as the same user), what is left of its group goes
                    // now. Its pid names the group until the group is empty.
                    signal_group(pid, libc::SIGKILL);
                }
                if let Ok(status) = &waited {
                    let _ = exit_code.set(status.code());
                }
                let reason = match waited {
                    Ok(s) if s.success() => ExitReason::Normal,
                    Ok(s) => ExitReason::Crash(match s.code() {
                        Some(code) => format!("exited with status {code}"),
                        None => format!("killed by a signal ({s})"),
                    }),
                    Err(e) => ExitReason::Crash(format!("wait failed: {e}")),
                };
                let _ = tx.send(Some(reason)); // nobody waiting is fine
            });
            Ok(Box::new(ExecAgent {
                pid,
                exit,
                shimmed: !direct,
                lifeline,
                tail,
                code,
                drained,
            }) as Box<dyn Agent>)
        })
    }
}

/// How an allowed command may run: where, as whom, within what limits.
#[derive(Debug, Default, PartialEq)]
struct Permit {
    cwd: Option<PathBuf>,
    uid: Option<u32>,
    gid: Option<u32>,
    rlimits: Rlimits,
    /// The variables a request may set; `None`: any but the refused ones.
    env: Option<Vec<String>>,
}

/// The first entry of the allow-list that lets `spec` run, and how; or why none does.
fn permit(allow: &[AllowEntry], spec: &ExecSpec) -> Result<Permit, String> {
    let mut why = None;
    for entry in allow.iter().filter(|e| e.command() == spec.command) {
        let rule = match entry {
            AllowEntry::Path(_) => {
                return Ok(Permit {
                    cwd: spec.cwd.clone(),
                    ..Default::default()
                })
            }
            AllowEntry::Rule(r) => r,
        };
        if !spec.args.starts_with(&rule.args_prefix) {
            why = Some(format!(
                "exec: {:?} may run here only with arguments starting {:?}",
                spec.command, rule.args_prefix
            ));
            continue;
        }
        if let (Some(fixed), Some(asked)) = (&rule.cwd, &spec.cwd) {
            if fixed != asked {
                why = Some(format!(
                    "exec: {:?} runs here only in {fixed:?}, not {asked:?}",
                    spec.command
                ));
                continue;
            }
        }
        if let Some(name) = spec.env.keys().find(|k| !rule.env.contains(k)) {
            why = Some(format!(
                "exec: {:?} may not be given {name:?} here (its rule allows {:?})",
                spec.command, rule.env
            ));
            continue;
        }
        return Ok(Permit {
            cwd: rule.cwd.clone().or_else(|| spec.cwd.clone()),
            uid: rule.uid,
            gid: rule.gid,
            rlimits: rule.rlimits,
            env: Some(rule.env.clone()),
        });
    }
    Err(why.unwrap_or_else(|| {
        format!(
            "exec: {:?} is not on this node's allow-list ([exec] allow)",
            spec.command
        )
    }))
}

/// Refuses at start, with a clear error, a command that is missing or not executable (the
/// shim would only report it as a crash).
fn runnable(command: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(command) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("exec: {command:?} is not an executable file")),
        Err(e) => Err(format!("exec {command:?}: {e}")),
    }
}

/// Applies the limits to the calling process: in the child, before exec. Async-signal-safe.
pub(super) fn set_rlimits(l: &Rlimits) -> std::io::Result<()> {
    for (resource, value) in rlimit_table(l) {
        if let Some(v) = value {
            let lim = libc::rlimit {
                rlim_cur: v as libc::rlim_t,
                rlim_max: v as libc::rlim_t,
            };
            // SAFETY: setrlimit reads the struct passed.
            if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Each limit with its resource and its name on the shim's command line.
pub(super) fn rlimit_table(l: &Rlimits) -> [(RlimitResource, Option<u64>); 5] {
    [
        (libc::RLIMIT_NOFILE, l.nofile),
        (libc::RLIMIT_NPROC, l.nproc),
        (libc::RLIMIT_AS, l.as_bytes),
        (libc::RLIMIT_CPU, l.cpu_s),
        (libc::RLIMIT_FSIZE, l.fsize_bytes),
    ]
}

/// The type of a resource number `setrlimit` takes on this platform.
pub(super) type RlimitResource = libc::__rlimit_resource_t;

/// Environment variables an agent's config may not set: the node's own settings, and the
/// dynamic loader's, which would run other code inside an allowed command.
fn refused_env(name: &str) -> bool {
    name.starts_with("WARDEN_") || name.starts_with("LD_") || name.is_empty() || name.contains('=')
}

/// Output lines an exec agent keeps for its result (`Agent::finish`): the last ones, at most
/// this many and this many bytes (escaped as JSON, well under `limits::MAX_RESULT_BYTES`).
const RESULT_LINES: usize = 20;
const RESULT_TAIL_BYTES: usize = 8 * 1024;

/// How long the end of a process waits for its last output lines to be read.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// Sends each output line to the log sink, at most `MAX_LOG_LINE_BYTES` of it (the rest of a
/// longer line is dropped), bytes that are not UTF-8 replaced, and keeps the last
/// `RESULT_LINES` in `tail`; ends with the stream. It keeps reading whatever comes, so that
/// the process never blocks on a full pipe.
async fn forward_lines(
    out: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    log: LogSink,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    use tokio::io::AsyncReadExt;
    let max = crate::limits::MAX_LOG_LINE_BYTES;
    let mut reader = BufReader::new(out);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        let n = match (&mut reader)
            .take(max as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let complete = buf.last() == Some(&b'\n');
        if !complete && buf.len() >= max {
            // Too long: skip to the end of the line, in bounded reads.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                match (&mut reader)
                    .take(max as u64)
                    .read_until(b'\n', &mut rest)
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) if rest.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        {
            let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
            tail.push_back(line.clone());
            let mut bytes: usize = tail.iter().map(String::len).sum();
            while tail.len() > RESULT_LINES || (bytes > RESULT_TAIL_BYTES && tail.len() > 1) {
                bytes -= tail.pop_front().map_or(0, |l| l.len());
            }
        }
        log.line(line);
    }
}

struct ExecAgent {
    /// The process group's leader: the shim, or the command itself without one.
    pid: u32,
    exit: watch::Receiver<Option<ExitReason>>,
    /// A shim runs the command: killing is closing the lifeline, never a SIGKILL of the group,
    /// which would take the shim before it killed the tree.
    shimmed: bool,
    /// The write end of the shim's stdin (none without a shim): closed when a stop's time is
    /// up, or when the agent is dropped (or by the kernel when the node dies), it tells the
    /// shim to kill the whole tree.
    lifeline: Mutex<Option<tokio::process::ChildStdin>>,
    /// The last output lines (`RESULT_LINES`), for the result.
    tail: Arc<Mutex<VecDeque<String>>>,
    /// The exit code once the process ended (`None` inside: a signal ended it).
    code: Arc<std::sync::OnceLock<Option<i32>>>,
    /// True once its output was read to the end.
    drained: watch::Receiver<bool>,
}

impl ExecAgent {
    /// Kills the process and everything it started. With a shim: closes its lifeline, so
    /// that it kills the whole tree, orphans that left the group included, before it exits.
    /// Without one: SIGKILLs the group.
    fn kill(&self) {
        if self.shimmed {
            drop(
                self.lifeline
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take(),
            );
        } else {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

async fn wait_exit(mut rx: watch::Receiver<Option<ExitReason>>) -> ExitReason {
    match rx.wait_for(|r| r.is_some()).await {
        Ok(r) => r.clone().unwrap_or(ExitReason::Normal),
        Err(_) => ExitReason::Crash("lost track of the process".into()),
    }
}

/// Signals the process group an exec process leads (its pid is the group's id).
fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale group yields ESRCH.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// Dropping the agent (a lease lost, a stop cut, the node stopping) kills its process group:
/// the `Child`, and with it `kill_on_drop`, lives in the task that waits for the exit, so
/// without this the process would outlive its agent. A SIGKILLed node takes its processes
/// with it by their parent-death signal; their own children stay in the group only as long as
/// they do not leave it.
impl Drop for ExecAgent {
    fn drop(&mut self) {
        // Not exited as far as the waiter knows. The waiter reaps before it says so, so the
        // group's id can only have been reused in the moment between the two.
        if self.exit.borrow().is_none() {
            self.kill();
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

    fn os_process(&self) -> Option<u32> {
        Some(self.pid)
    }

    /// The exit, once the last output lines are read too (they go into the result), but not
    /// later than `OUTPUT_DRAIN` after it: a descendant may keep the pipe open.
    fn take_exit(&mut self) -> Option<BoxFuture<'static, ExitReason>> {
        let (exit, mut drained) = (self.exit.clone(), self.drained.clone());
        Some(Box::pin(async move {
            let reason = wait_exit(exit).await;
            let _ = tokio::time::timeout(OUTPUT_DRAIN, drained.wait_for(|d| *d)).await;
            reason
        }))
    }

    /// The process's exit code (null if a signal ended it) and its last output lines.
    fn finish(&mut self) -> Option<Value> {
        let output: Vec<String> = self
            .tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let code = self.code.get().copied().flatten();
        Some(json!({ "exit_code": code, "output": output }))
    }

    fn stop(&mut self, timeout_ms: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.exit.borrow().is_some() {
                return;
            }
            if timeout_ms > 0 {
                signal_group(self.pid, libc::SIGTERM);
                let waited = tokio::time::timeout(
                    Duration::from_millis(timeout_ms),
                    wait_exit(self.exit.clone()),
                );
                if waited.await.is_ok() {
                    return;
                }
            }
            self.kill();
            if self.shimmed {
                // The shim kills the tree and exits; should it not, the group goes by force.
                let grace = Duration::from_millis(crate::limits::EXEC_SHIM_EXIT_MS);
                if tokio::time::timeout(grace, wait_exit(self.exit.clone()))
                    .await
                    .is_ok()
                {
                    return;
                }
                signal_group(self.pid, libc::SIGKILL);
            }
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
            allow: paths.iter().map(|p| AllowEntry::from(*p)).collect(),
            ..Default::default()
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
        let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
        let (mut a, mut rx) = with_log(&k, script).await;
        let exit = a.take_exit().unwrap();
        lines_until(&mut rx, "ready").await;
        a.stop(200).await;
        assert!(
            matches!(exit.await, ExitReason::Crash(m) if m.contains("SIGKILL")),
            "killed"
        );

        let script = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done";
        let (mut b, mut rx) = with_log(&k, script).await;
        let exit = b.take_exit().unwrap();
        lines_until(&mut rx, "ready").await;
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

    /// Starts `script` under /bin/sh with a log sink the test reads.
    async fn with_log(
        k: &Exec,
        script: &str,
    ) -> (
        Box<dyn Agent>,
        tokio::sync::mpsc::Receiver<(uuid::Uuid, String)>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let ctx = StartContext {
            id: uuid::Uuid::nil(),
            name: None,
            config: json!({"command": "/bin/sh", "args": ["-c", script]}),
            state: None,
            log: LogSink::new(tx, uuid::Uuid::nil()),
        };
        (k.start(ctx).await.unwrap(), rx)
    }

    async fn lines_until(
        rx: &mut tokio::sync::mpsc::Receiver<(uuid::Uuid, String)>,
        last: &str,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let wait = async {
            while let Some((_, line)) = rx.recv().await {
                let done = line == last;
                out.push(line);
                if done {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the script's output");
        out
    }

    /// Goal: an exec process gets only the variables the node passes on, never a `WARDEN_*`
    /// one, and a config may not set the node's or the loader's variables.
    #[tokio::test]
    async fn an_exec_process_sees_no_warden_variable() {
        // nextest runs each test in its own process: setting a variable here touches no other.
        std::env::set_var("WARDEN_PROBE", "secret");
        let k = allowed(&["/bin/sh"]);
        let (_a, mut rx) = with_log(&k, "env; echo end").await;
        let env = lines_until(&mut rx, "end").await;
        assert!(!env.iter().any(|l| l.starts_with("WARDEN_")), "{env:?}");
        assert!(env.iter().any(|l| l.starts_with("PATH=")), "{env:?}");
        for name in ["WARDEN_AUTH", "LD_PRELOAD"] {
            let cfg = json!({"command": "/bin/sh", "args": ["-c", "true"], "env": {name: "x"}});
            let err = k.start(ctx(cfg)).await.err().unwrap();
            assert!(err.contains(name), "{err}");
        }
    }

    /// Goal: a stop reaches the process's own children: the whole group goes.
    #[tokio::test]
    async fn a_stop_kills_the_process_group() {
        let k = allowed(&["/bin/sh"]);
        let script = "trap '' TERM; sleep 1000 & echo $!; echo ready; wait";
        let (mut a, mut rx) = with_log(&k, script).await;
        let out = lines_until(&mut rx, "ready").await;
        let child: i32 = out[0].parse().unwrap();
        a.stop(200).await;
        let gone = || {
            // Gone, or a zombie waiting for init: either way it runs no more.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
        };
        // Not our child to wait for: its state is watched until the deadline.
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let watched = async {
            while !gone() {
                tick.tick().await;
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(10), watched).await;
        assert!(ended.is_ok(), "the child {child} survived");
    }

    /// Goal: output is read whatever it holds: bytes that are not UTF-8 and overlong lines
    /// neither stop the reader nor grow a line past its bound.
    #[tokio::test]
    async fn output_lines_are_bounded_and_survive_bad_bytes() {
        let k = allowed(&["/bin/sh"]);
        let max = crate::limits::MAX_LOG_LINE_BYTES;
        let script = format!(
            "printf 'a\\377b\\n'; head -c {} /dev/zero | tr '\\0' x; echo; echo end",
            max * 3
        );
        let (_a, mut rx) = with_log(&k, &script).await;
        let out = lines_until(&mut rx, "end").await;
        assert_eq!(out[0], "a\u{fffd}b");
        assert_eq!(out[1].len(), max, "an overlong line is cut");
        assert_eq!(out[2], "end", "and the rest of it skipped: {:?}", &out[2..]);
    }
}
