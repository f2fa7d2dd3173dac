//! What Linux's `/proc` says about this process and about an `exec` agent's process group:
//! resident memory and CPU time. Elsewhere (no `/proc`) every figure is zero or none.

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
pub const TICKS_PER_S: f64 = 100.0;

/// The fields of a `/proc/<pid>/stat` line after the command name (in parentheses, which may
/// hold spaces): field 3 of the line is index 0 here.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat.rsplit_once(')')?.1.split_whitespace().collect())
}

/// This process's CPU time (user and system), in clock ticks.
pub fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f = stat_fields(&stat)?;
    // utime and stime are fields 14 and 15 of the line.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// This process's resident memory, in bytes.
pub fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// What the processes of group `pgid` use now: resident bytes and CPU seconds (their own,
/// and that of their children they waited for), summed over the group's live processes;
/// `None` when no process is in it. Reads every `/proc/<pid>/stat`: for a query, not a loop.
pub fn group_usage(pgid: u32) -> Option<(u64, f64)> {
    let (mut rss, mut ticks, mut found) = (0u64, 0u64, false);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue; // gone meanwhile
        };
        let Some(f) = stat_fields(&stat) else {
            continue;
        };
        // pgrp is field 5 of the line; utime, stime, cutime, cstime 14 to 17; rss (pages) 24.
        if f.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(pgid) {
            continue;
        }
        found = true;
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += n(11) + n(12) + n(13) + n(14);
        rss += n(21) * 4096;
    }
    found.then_some((rss, ticks as f64 / TICKS_PER_S))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: this process's own group is found, with memory.
    #[test]
    fn the_own_group_reads() {
        // SAFETY: getpgrp reads no memory of ours.
        let pgid = unsafe { libc::getpgrp() } as u32;
        let (rss, _) = group_usage(pgid).expect("this process is in its group");
        assert!(rss > 0);
        assert!(resident_bytes() > 0);
        assert!(cpu_ticks().is_some());
    }
}
