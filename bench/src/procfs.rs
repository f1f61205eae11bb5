//! What the systems under test cost, read from `/proc`: CPU time (user + system, every thread,
//! including threads that have exited) and resident memory (now and peak) of a process and all its
//! descendants (nginx's workers, say), summed.

use std::fs;

/// One reading of a process tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU seconds since each process started.
    pub cpu_s: f64,
    /// Resident set now, KiB.
    pub rss_kib: u64,
    /// Peak resident set (`VmHWM`), KiB. For a tree, the sum of each process's peak: an upper
    /// bound on the tree's peak.
    pub hwm_kib: u64,
    /// Anonymous resident memory now (`RssAnon`), KiB: the sidecar's own memory, without the
    /// binary's and libraries' file pages that every process of the same image shares.
    pub anon_kib: u64,
}

/// `pid` and every live descendant.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(pp) = stat_fields(p).and_then(|f| f.get(1).and_then(|x| x.parse().ok())) {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// The usage of `pid`'s tree; processes that vanish while it is read count as zero.
pub fn usage(pid: u32) -> Usage {
    let tick = clock_ticks();
    let mut u = Usage::default();
    for p in tree(pid) {
        if let Some(f) = stat_fields(p) {
            // Fields after the command: state(0) ppid(1) ... utime(11) stime(12).
            let t: u64 = [11, 12].iter().filter_map(|i| f.get(*i).and_then(|x| x.parse::<u64>().ok())).sum();
            u.cpu_s += t as f64 / tick;
        }
        if let Ok(status) = fs::read_to_string(format!("/proc/{p}/status")) {
            u.rss_kib += status_kib(&status, "VmRSS:");
            u.hwm_kib += status_kib(&status, "VmHWM:");
            u.anon_kib += status_kib(&status, "RssAnon:");
        }
    }
    u
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_has_cpu_and_memory() {
        // Burn a little CPU so the reading cannot be zero.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let u = usage(std::process::id());
        assert!(u.rss_kib > 100 && u.hwm_kib >= u.rss_kib, "{u:?}");
        assert!(u.cpu_s > 0.0, "{u:?}");
    }

    #[test]
    fn a_child_is_part_of_the_tree() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let t = tree(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(t.contains(&child.id()), "{t:?}");
    }
}
