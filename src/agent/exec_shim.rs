//! `warden exec-shim [options] -- <command> [args...]`: the small supervisor an `exec` agent's
//! process runs under, so that nothing it starts outlives its agent.
//!
//! The node starts the shim in a new session (so a new process group, without a controlling
//! terminal), as the node's own user, with a pipe on its stdin whose other end only the agent
//! holds (the lifeline). The shim marks itself a child subreaper, so every orphaned descendant
//! (one that called `setsid` and left the group included) becomes its child, makes itself
//! undumpable (no ptrace by the command's user), and runs the command, which drops to the
//! rule's group and user and takes its limits just before exec. Then:
//! - the node's SIGTERM to the group reaches the command; the shim has a do-nothing handler
//!   for every signal that would end or stop it, so a `kill 0` of the command cannot take it
//!   down (handlers reset to their defaults at exec: the command is not affected);
//! - when the command ends, the shim kills every process left in its group and every
//!   descendant, and exits with the command's status (or dies of its signal, without a core
//!   dump), which the node reads as the agent's exit;
//! - when the lifeline closes (the node dropped the agent, or died, even by SIGKILL: the
//!   kernel closes its end), the shim does the same killing, then exits.
//!
//! A lifeline rather than a parent-death signal: Linux sends that signal when the thread that
//! forked ends, not the process, and it could not let the shim clean up after a SIGKILLed node.
//! Each killing round walks the whole tree below the shim (from a snapshot of `/proc`), so a
//! chain of `setsid` processes of any depth dies in one round; the rounds end after
//! `SHIM_CLEANUP_MS` whatever is left. What the command had done outside its tree (a job
//! handed to cron, a systemd unit) is beyond any process supervisor; a rule's own user, and a
//! cgroup around the node, contain that.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::Rlimits;

/// The hidden subcommand that runs the shim.
pub const SUBCOMMAND: &str = "exec-shim";

/// How long the shim keeps killing and reaping after the command or the lifeline ended, one
/// round every `SHIM_ROUND_MS`; then it exits whatever is left (nothing, in practice: a
/// SIGKILL cannot be refused).
const SHIM_CLEANUP_MS: u64 = 5_000;
const SHIM_ROUND_MS: u64 = 10;

/// The signals whose default would end or stop the shim and that can be caught.
const GUARDED: [libc::c_int; 15] = [
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGPIPE,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// What the node asks of the command beyond its arguments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShimOptions {
    pub rlimits: Rlimits,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Runs the shim and exits, if this process was started as one (`<binary> exec-shim -- ...`);
/// returns at once otherwise. Call it first in `main`, before a runtime starts threads.
pub fn run_if_invoked() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(SUBCOMMAND)) {
        return;
    }
    let rest: Vec<OsString> = args.collect();
    let usage = || -> ! {
        eprintln!(
            "usage: warden {SUBCOMMAND} [--rlimit <name>=<n>]... [--uid <n> --gid <n>] -- \
             <command> [args...]"
        );
        std::process::exit(2);
    };
    let Some(dashes) = rest.iter().position(|a| a == "--") else {
        usage()
    };
    let Some(opts) = parse_options(&rest[..dashes]) else {
        usage()
    };
    let Some((command, args)) = rest[dashes + 1..].split_first() else {
        usage()
    };
    std::process::exit(run(command, args, opts))
}

/// The shim's arguments that carry `opts` to it.
pub fn option_args(opts: &ShimOptions) -> Vec<String> {
    let values = super::exec::rlimit_table(&opts.rlimits).map(|(_, v)| v);
    let mut out: Vec<String> = RLIMIT_NAMES
        .iter()
        .zip(values)
        .filter_map(|(name, v)| v.map(|v| ["--rlimit".into(), format!("{name}={v}")]))
        .flatten()
        .collect();
    if let Some(gid) = opts.gid {
        out.extend(["--gid".into(), gid.to_string()]);
    }
    if let Some(uid) = opts.uid {
        out.extend(["--uid".into(), uid.to_string()]);
    }
    out
}

/// Names of the limits on the shim's command line, in `rlimit_table`'s order.
const RLIMIT_NAMES: [&str; 5] = ["nofile", "nproc", "as_bytes", "cpu_s", "fsize_bytes"];

fn parse_options(args: &[OsString]) -> Option<ShimOptions> {
    let mut opts = ShimOptions::default();
    let mut it = args.iter();
    while let Some(opt) = it.next() {
        let value = it.next()?.to_str()?;
        match opt.to_str()? {
            "--rlimit" => set_limit(&mut opts.rlimits, value)?,
            "--uid" => opts.uid = Some(value.parse().ok()?),
            "--gid" => opts.gid = Some(value.parse().ok()?),
            _ => return None,
        }
    }
    Some(opts)
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

/// Drops to `gid` and `uid` (supplementary groups cleared first), in the command's child
/// between fork and exec. Async-signal-safe.
fn drop_privileges(uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    // SAFETY: plain system calls on the calling process.
    unsafe {
        if let Some(gid) = gid {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(uid) = uid {
            if libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn run(command: &OsStr, args: &[OsString], opts: ShimOptions) -> i32 {
    // SAFETY: plain system calls on this process; `ignore` is async-signal-safe (it does
    // nothing). Handlers rather than SIG_IGN: an ignored signal stays ignored across exec.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as *const () as usize;
        for sig in GUARDED {
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    // The lifeline first: a shim that could not watch it must not start the command.
    if let Err(e) = std::thread::Builder::new()
        .name("lifeline".into())
        .spawn(lifeline)
    {
        eprintln!("exec: the shim cannot watch its node: {e}");
        return 126;
    }
    let mut cmd = std::process::Command::new(command);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: setrlimit, setgroups, setgid and setuid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            super::exec::set_rlimits(&opts.rlimits)?;
            drop_privileges(opts.uid, opts.gid)
        });
    }
    let main = match cmd.spawn() {
        Ok(c) => c.id() as libc::pid_t,
        Err(e) => {
            eprintln!("exec: cannot start {command:?}: {e}");
            return 127;
        }
    };
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

/// Waits for the node's end of stdin to close, then kills the whole tree. The main thread
/// reaps, and exits once nothing is left.
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
    let until = Instant::now() + Duration::from_millis(SHIM_CLEANUP_MS);
    while Instant::now() < until {
        kill_tree();
        std::thread::sleep(Duration::from_millis(SHIM_ROUND_MS));
    }
    std::process::exit(137);
}

/// After the command ended: kills what it left and reaps until nothing is left.
fn clean_up() {
    let until = Instant::now() + Duration::from_millis(SHIM_CLEANUP_MS);
    while Instant::now() < until {
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

/// One process as `/proc/<pid>/stat` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    ppid: libc::pid_t,
    pgrp: libc::pid_t,
    zombie: bool,
}

/// SIGKILLs every process of the shim's group and every descendant of the shim, whatever its
/// group or depth (orphans it adopted as subreaper included), from one snapshot of `/proc`.
/// Zombies are skipped: they are dead, and their pid is about to be reaped and reused.
fn kill_tree() {
    // SAFETY: getters without preconditions.
    let (me, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
    let procs = snapshot();
    for pid in doomed(&procs, me, group) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// The processes to kill: members of `group` and descendants of `me`, living, not `me`.
fn doomed(
    procs: &BTreeMap<libc::pid_t, Proc>,
    me: libc::pid_t,
    group: libc::pid_t,
) -> Vec<libc::pid_t> {
    let mut children: BTreeMap<libc::pid_t, Vec<libc::pid_t>> = BTreeMap::new();
    for (pid, p) in procs {
        children.entry(p.ppid).or_default().push(*pid);
    }
    let mut out: Vec<libc::pid_t> = procs
        .iter()
        .filter(|(pid, p)| p.pgrp == group && **pid != me)
        .map(|(pid, _)| *pid)
        .collect();
    let mut todo = vec![me];
    while let Some(parent) = todo.pop() {
        for child in children.get(&parent).into_iter().flatten() {
            out.push(*child);
            todo.push(*child);
        }
    }
    out.sort_unstable();
    out.dedup();
    out.retain(|pid| procs.get(pid).is_some_and(|p| !p.zombie) && *pid != me);
    out
}

fn snapshot() -> BTreeMap<libc::pid_t, Proc> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if let Some(p) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| parse_stat(&stat))
        {
            out.insert(pid, p);
        }
    }
    out
}

/// The state, parent and process group of a `/proc/<pid>/stat` line: the 3rd to 5th fields,
/// read after the command name, which may hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<Proc> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Proc {
        ppid,
        pgrp,
        zombie: state == "Z" || state == "X",
    })
}

/// Ends the shim as the command ended: with its exit status, or by its signal (without a
/// core dump of the shim).
fn mirror(status: Option<libc::c_int>) -> i32 {
    let Some(st) = status else {
        return 137;
    };
    if libc::WIFEXITED(st) {
        return libc::WEXITSTATUS(st);
    }
    if libc::WIFSIGNALED(st) {
        let sig = libc::WTERMSIG(st);
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: sets a limit, resets a disposition and signals this process.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
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
    fn options_cross_the_command_line_intact() {
        let opts = ShimOptions {
            rlimits: Rlimits {
                nofile: Some(64),
                cpu_s: Some(5),
                ..Default::default()
            },
            uid: Some(1000),
            gid: Some(100),
        };
        let args = option_args(&opts);
        assert_eq!(
            args,
            [
                "--rlimit",
                "nofile=64",
                "--rlimit",
                "cpu_s=5",
                "--gid",
                "100",
                "--uid",
                "1000"
            ]
        );
        let os: Vec<OsString> = args.iter().map(OsString::from).collect();
        assert_eq!(parse_options(&os), Some(opts));
        assert_eq!(
            parse_options(&[OsString::from("--rlimit"), "stack=1".into()]),
            None
        );
        assert_eq!(parse_options(&[OsString::from("--uid")]), None);
    }

    #[test]
    fn stat_lines_are_read_past_the_command_name() {
        let line = "4242 (a (weird) name) S 17 4242 4242 0 -1 4194560 101";
        let p = parse_stat(line).unwrap();
        assert_eq!((p.ppid, p.pgrp, p.zombie), (17, 4242, false));
        assert!(parse_stat("9 (x) Z 1 9 9").unwrap().zombie);
        assert_eq!(parse_stat("garbage"), None);
    }

    /// A chain of processes that each left the group (`setsid`) dies in one round: the whole
    /// tree below the shim is doomed, not only its children.
    #[test]
    fn the_whole_tree_below_the_shim_is_doomed() {
        let p = |ppid, pgrp| Proc {
            ppid,
            pgrp,
            zombie: false,
        };
        let procs = BTreeMap::from([
            (1, p(0, 1)),
            (10, p(1, 10)),  // the shim, leading group 10
            (11, p(10, 10)), // the command
            (12, p(11, 12)), // a setsid child of the command
            (13, p(12, 13)), // its setsid child
            (14, p(13, 13)),
            (20, p(1, 10)), // left in the group, adopted by init
            (30, p(1, 30)), // unrelated
            (
                31,
                Proc {
                    zombie: true,
                    ..p(10, 10)
                },
            ),
        ]);
        assert_eq!(doomed(&procs, 10, 10), vec![11, 12, 13, 14, 20]);
    }
}
