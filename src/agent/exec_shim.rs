//! `warden exec-shim -- <command> [args...]`: the small supervisor an `exec` agent's process
//! runs under, so that nothing it starts outlives its agent.
//!
//! The node starts the shim as the leader of a new process group, with a pipe on its stdin
//! whose other end only the node holds (the lifeline). The shim marks itself a child
//! subreaper, so every orphaned descendant (one that called `setsid` and left the group
//! included) becomes its child, and runs the command. Then:
//! - the node's SIGTERM to the group reaches the command; the shim's own handler does nothing,
//!   so it stays to reap;
//! - when the command ends, the shim kills every descendant left (group members and adopted
//!   orphans) and exits with the command's status (or dies of its signal), which the node
//!   reads as the agent's exit;
//! - when the lifeline closes (the node dropped the agent, or died, even by SIGKILL: the
//!   kernel closes its end), the shim kills the command and every descendant, then exits.
//!
//! A lifeline rather than a parent-death signal: Linux sends that signal when the thread that
//! forked ends, not the process, and it could not let the shim clean up after a SIGKILLed node.
//! Every loop here ends: the killing rounds after the command or the lifeline ended are
//! bounded by `SHIM_CLEANUP_ROUNDS`.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use crate::config::Rlimits;

/// The hidden subcommand that runs the shim.
pub const SUBCOMMAND: &str = "exec-shim";

/// Rounds of killing and reaping after the command or the lifeline ended, each
/// `SHIM_ROUND_MS` apart; then the shim exits whatever is left (nothing, in practice: a
/// SIGKILL cannot be refused).
const SHIM_CLEANUP_ROUNDS: u32 = 500;
const SHIM_ROUND_MS: u64 = 10;

/// Runs the shim and exits, if this process was started as one (`<binary> exec-shim -- ...`);
/// returns at once otherwise. Call it first in `main`, before a runtime starts threads.
pub fn run_if_invoked() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(SUBCOMMAND)) {
        return;
    }
    let rest: Vec<OsString> = args.collect();
    let usage = || -> ! {
        eprintln!("usage: warden {SUBCOMMAND} [--rlimit <name>=<n>]... -- <command> [args...]");
        std::process::exit(2);
    };
    let Some(dashes) = rest.iter().position(|a| a == "--") else {
        usage()
    };
    let mut limits = Rlimits::default();
    let mut opts = rest[..dashes].iter();
    while let Some(opt) = opts.next() {
        let parsed = (opt == "--rlimit")
            .then(|| opts.next().and_then(|v| v.to_str()))
            .flatten()
            .and_then(|v| set_limit(&mut limits, v));
        if parsed.is_none() {
            usage();
        }
    }
    let Some((command, args)) = rest[dashes + 1..].split_first() else {
        usage()
    };
    std::process::exit(run(command, args, limits))
}

/// Names of the limits on the shim's command line, in `rlimit_table`'s order.
const RLIMIT_NAMES: [&str; 5] = ["nofile", "nproc", "as_bytes", "cpu_s", "fsize_bytes"];

/// The shim's arguments that carry `limits` to the command.
pub fn rlimit_args(limits: &Rlimits) -> Vec<String> {
    let values = super::exec::rlimit_table(limits).map(|(_, v)| v);
    RLIMIT_NAMES
        .iter()
        .zip(values)
        .filter_map(|(name, v)| v.map(|v| ["--rlimit".into(), format!("{name}={v}")]))
        .flatten()
        .collect()
}

/// Sets one limit from `name=value`; `None` if it is not one.
fn set_limit(limits: &mut Rlimits, arg: &str) -> Option<()> {
    let (name, value) = arg.split_once('=')?;
    let value = Some(value.parse().ok()?);
    match name {
        "nofile" => limits.nofile = value,
        "nproc" => limits.nproc = value,
        "as_bytes" => limits.as_bytes = value,
        "cpu_s" => limits.cpu_s = value,
        "fsize_bytes" => limits.fsize_bytes = value,
        _ => return None,
    }
    Some(())
}

extern "C" fn ignore(_: libc::c_int) {}

fn run(command: &OsStr, args: &[OsString], limits: Rlimits) -> i32 {
    // SAFETY: plain system calls on this process; `ignore` is async-signal-safe (it does
    // nothing). A handler rather than SIG_IGN: an ignored signal stays ignored across exec,
    // and the command must get the node's SIGTERM.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as *const () as usize;
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
    let mut cmd = std::process::Command::new(command);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || super::exec::set_rlimits(&limits));
    }
    let child = cmd.spawn();
    let main = match child {
        Ok(c) => c.id() as libc::pid_t,
        Err(e) => {
            eprintln!("exec: cannot start {command:?}: {e}");
            return 127;
        }
    };
    std::thread::spawn(lifeline);
    let mut status = None;
    // Reap everything that ends (as init would) until the command does.
    while status.is_none() {
        let mut st = 0;
        // SAFETY: waitpid writes only into `st`.
        match unsafe { libc::waitpid(-1, &mut st, 0) } {
            pid if pid == main => status = Some(st),
            -1 if errno() == libc::EINTR => {}
            -1 => break, // no child at all: cannot happen before the command ended
            _ => {}
        }
    }
    clean_up();
    mirror(status)
}

/// Waits for the node's end of stdin to close, then kills the whole tree. The process exits
/// from the main thread once nothing is left.
fn lifeline() {
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reads into a buffer of the length given.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 || (n < 0 && errno() == libc::EINTR) {
            continue;
        }
        break;
    }
    for _ in 0..SHIM_CLEANUP_ROUNDS {
        kill_tree();
        std::thread::sleep(Duration::from_millis(SHIM_ROUND_MS));
    }
    std::process::exit(137);
}

/// After the command ended: kills what it left and reaps until nothing is left.
fn clean_up() {
    for _ in 0..SHIM_CLEANUP_ROUNDS {
        kill_tree();
        loop {
            let mut st = 0;
            // SAFETY: waitpid writes only into `st`.
            match unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) } {
                0 => break, // children remain; kill again
                -1 if errno() == libc::EINTR => {}
                -1 => return, // none left
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(SHIM_ROUND_MS));
    }
}

/// SIGKILLs every process of this process group but the shim, and every child of the shim
/// (orphans it adopted as subreaper, whatever their group).
fn kill_tree() {
    // SAFETY: getters without preconditions.
    let (me, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((ppid, pgrp)) = parents(&stat) {
            if pgrp == group || ppid == me {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// The parent and process group of a `/proc/<pid>/stat` line: the 4th and 5th fields, read
/// after the command name, which may hold spaces and parentheses.
fn parents(stat: &str) -> Option<(libc::pid_t, libc::pid_t)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(1); // the state
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// Ends the shim as the command ended: with its exit status, or by its signal.
fn mirror(status: Option<libc::c_int>) -> i32 {
    let Some(st) = status else {
        return 137;
    };
    if libc::WIFEXITED(st) {
        return libc::WEXITSTATUS(st);
    }
    if libc::WIFSIGNALED(st) {
        let sig = libc::WTERMSIG(st);
        // SAFETY: resets a disposition and signals this process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return 128 + sig;
    }
    1
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_cross_the_command_line_intact() {
        let limits = Rlimits {
            nofile: Some(64),
            cpu_s: Some(5),
            ..Default::default()
        };
        let args = rlimit_args(&limits);
        assert_eq!(args, ["--rlimit", "nofile=64", "--rlimit", "cpu_s=5"]);
        let mut back = Rlimits::default();
        for v in args.iter().skip(1).step_by(2) {
            set_limit(&mut back, v).unwrap();
        }
        assert_eq!(back, limits);
        assert!(set_limit(&mut back, "stack=1").is_none());
    }

    #[test]
    fn stat_lines_are_read_past_the_command_name() {
        let line = "4242 (a (weird) name) S 17 4242 4242 0 -1 4194560 101";
        assert_eq!(parents(line), Some((17, 4242)));
        assert_eq!(parents("garbage"), None);
    }
}
