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

/// The size of a memory page.
fn page_bytes() -> u64 {
    // SAFETY: sysconf reads no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
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
    pages * page_bytes()
}

/// What every process group uses now, by group id: resident bytes and CPU seconds (the
/// processes' own, and that of the children they waited for), summed over the group's live
/// processes. Reads every `/proc/<pid>/stat` once: for a query, not a loop (`node::figures`
/// keeps to one scan a second).
pub fn groups_usage() -> std::collections::HashMap<u32, (u64, f64)> {
    let mut groups: std::collections::HashMap<u32, (u64, u64)> = Default::default();
    let page = page_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    for entry in dir.flatten() {
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
        let Some(pgid) = f.get(2).and_then(|g| g.parse::<u32>().ok()) else {
            continue;
        };
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let g = groups.entry(pgid).or_default();
        g.0 = g.0.saturating_add(n(21).saturating_mul(page));
        g.1 = g.1.saturating_add(n(11) + n(12) + n(13) + n(14));
    }
    groups
        .into_iter()
        .map(|(k, (rss, ticks))| (k, (rss, ticks as f64 / TICKS_PER_S)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: this process's own group is found, with memory.
    #[test]
    fn the_own_group_reads() {
        // SAFETY: getpgrp reads no memory of ours.
        let pgid = unsafe { libc::getpgrp() } as u32;
        let (rss, _) = groups_usage()[&pgid];
        assert!(rss > 0);
        assert!(resident_bytes() > 0);
        assert!(cpu_ticks().is_some());
    }
}
