//! What a worker uses (memory, CPU, client connections), read from `/proc`.
//!
//! A worker is its whole process group: a wrapper script, `npm start`,
//! gunicorn's or Puma's master and the workers it forks. So its figures are
//! those of its main process and of the descendants still in that group,
//! as systemd counts a unit's cgroup; otherwise `--max-memory` watched the
//! wrapper (a few MB) and never the server that grows behind it.

use std::collections::HashSet;

use procfs::process::{FDTarget, Process, Stat};

/// Bounds the walk: a prefork server's children, not a fork bomb's.
const MOST: usize = 512;

/// A worker's processes' figures, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Resident memory in bytes. Pages the processes share (a prefork
    /// server's copy-on-write memory) count once per process, as `ps`
    /// shows them.
    pub rss: u64,
    /// CPU clock ticks, user and system, of the live processes and of the
    /// children they have reaped: a prefork server's recycled worker's
    /// time moves to its master and stays counted.
    pub cpu_ticks: u64,
    /// Client connections held (with `established`), each counted once
    /// however many processes hold it.
    pub connections: usize,
}

/// Worker `pid`'s processes: it, then its descendants in its process
/// group (one that left it, as a daemon does, is not the worker's), at
/// most [`MOST`]. Once `pid` itself has exited while its group runs on (a
/// wrapper's server still stopping), the group's processes found in all
/// of `/proc`. Empty if none is left.
pub fn members(pid: u32) -> Vec<(Process, Stat)> {
    let Ok(main) = i32::try_from(pid) else {
        return Vec::new();
    };
    let mut out: Vec<(Process, Stat)> = Vec::new();
    let mut todo = vec![main];
    while let Some(p) = todo.pop() {
        if out.len() >= MOST {
            break;
        }
        // A descendant gone meanwhile is skipped.
        let Ok(proc_) = Process::new(p) else {
            if p == main {
                return group(main);
            }
            continue;
        };
        let Ok(stat) = proc_.stat() else {
            continue;
        };
        if let Some((_, lead)) = out.first()
            && stat.pgrp != lead.pgrp
        {
            continue;
        }
        for t in proc_.tasks().into_iter().flatten().flatten() {
            if let Ok(kids) = t.children() {
                todo.extend(kids.into_iter().filter_map(|k| i32::try_from(k).ok()));
            }
        }
        out.push((proc_, stat));
    }
    out
}

/// The live processes of process group `pgid`, at most [`MOST`]: a walk
/// of all of `/proc` (a worker's are found from its main process while
/// that lives).
pub fn group(pgid: i32) -> Vec<(Process, Stat)> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| {
            let st = p.stat().ok()?;
            (st.pgrp == pgid && st.state != 'Z').then_some((p, st))
        })
        .take(MOST)
        .collect()
}

/// Worker `pid`'s figures; `None` if it is gone. Connections are counted
/// only with `established`, the inodes of the host's client connections.
pub fn usage(pid: u32, established: Option<&HashSet<u64>>) -> Option<Usage> {
    let members = members(pid);
    if members.is_empty() {
        return None;
    }
    let page = procfs::page_size();
    let mut u = Usage::default();
    let mut held = HashSet::new();
    for (p, st) in &members {
        u.rss += st.rss * page;
        u.cpu_ticks += st.utime + st.stime + st.cutime.max(0) as u64 + st.cstime.max(0) as u64;
        if let (Some(est), Ok(fds)) = (established, p.fd()) {
            for fd in fds.flatten() {
                if let FDTarget::Socket(i) = fd.target
                    && est.contains(&i)
                {
                    held.insert(i);
                }
            }
        }
    }
    u.connections = held.len();
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_group_counts_its_descendants_and_not_those_that_left_it() {
        // sh leads a group of its own; of its children, one stays in it and
        // one leaves it (setsid), as a daemon does.
        let away = format!("sleep {}", 300_000 + std::process::id());
        let script = format!(
            "sleep 300 & setsid {away} & python3 -c 'x = b\"x\" * (64 << 20); import time; time.sleep(300)' & wait"
        );
        let mut sh = Command::new("sh");
        sh.args(["-c", &script]);
        std::os::unix::process::CommandExt::process_group(&mut sh, 0);
        let mut child = sh.spawn().unwrap();
        let pid = child.id();
        let until = Instant::now() + Duration::from_secs(10);
        let (mut u, mut n) = (None, 0);
        while Instant::now() < until {
            (u, n) = (usage(pid, None), members(pid).len());
            if n == 3 && u.is_some_and(|u| u.rss > 64 << 20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("pkill").args(["-f", &away]).status();
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
        let u = u.unwrap();
        // sh, sleep 300 and python: not the setsid one.
        assert_eq!(n, 3, "{u:?}");
        // python's 64 MiB is the worker's, though sh is its main process.
        assert!(u.rss > 64 << 20, "{u:?}");
        // Its processes die of the SIGKILL (init reaps those sh left).
        let until = Instant::now() + Duration::from_secs(10);
        while usage(pid, None).is_some() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(usage(pid, None).is_none(), "gone");
    }

    #[test]
    fn a_group_whose_main_process_exited_is_still_counted() {
        let left = format!("sleep {}", 310_000 + std::process::id());
        let mut sh = Command::new("sh");
        sh.args(["-c", &format!("{left} & exit 0")]);
        std::os::unix::process::CommandExt::process_group(&mut sh, 0);
        let mut child = sh.spawn().unwrap();
        let pid = child.id();
        let _ = child.wait(); // sh is gone; its sleep runs on in its group
        // Once sh's fork has become the sleep: in its exec it may hold no
        // memory for a moment (rss 0, one run in about ten).
        let sleeping = || {
            members(pid)
                .iter()
                .any(|(p, _)| p.cmdline().is_ok_and(|c| c.join(" ") == left))
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !sleeping() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (u, n) = (usage(pid, None), members(pid).len());
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let u = u.expect("the group's sleep");
        assert_eq!(n, 1, "{u:?}");
        assert!(u.rss > 0, "{u:?}");
    }
}
