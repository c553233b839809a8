//! herd as a child subreaper, and as PID 1 of a container: processes
//! reparented to the master (a worker's descendants that daemonized with
//! `setsid` or a double fork, anything orphaned in its PID namespace) are
//! reaped when they exit, and the ones a worker left behind are killed with
//! it. The policy (which are ours) is the caller's; this reads `/proc`.

use std::collections::HashSet;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Asks the kernel to reparent orphaned descendants to this process rather
/// than to init (`PR_SET_CHILD_SUBREAPER`).
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// A child of the master that it did not start itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    pub pid: u32,
    pub zombie: bool,
    /// Its process group: a worker's own (the worker's pid), or another if
    /// it left it (`setsid`, as a program that daemonizes does).
    pub pgrp: u32,
}

/// The master's children not in `known` (its workers and its guardian).
pub fn adopted(known: &HashSet<u32>) -> Vec<Adopted> {
    children()
        .into_iter()
        .filter(|pid| !known.contains(pid))
        .filter_map(|pid| {
            let st = stat(pid)?;
            Some(Adopted {
                pid,
                zombie: st.state == 'Z',
                pgrp: st.pgrp,
            })
        })
        .collect()
}

/// Collects an exited adopted child's status, which nobody else waits for.
pub fn reap(pid: u32) {
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}

pub fn kill_now(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// The command name of `pid` (`/proc/PID/comm`), for messages.
pub fn name(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_string())
}

/// How long ago `pid` started: `/proc/PID/stat`'s start time (clock ticks
/// since boot) against `/proc/uptime`.
pub fn age(pid: u32) -> Option<std::time::Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_secs_f64(
        (up - ticks as f64 / per_sec).max(0.0),
    ))
}

/// Whether `pid`'s environment holds `entry` (`KEY=VALUE`): how a worker's
/// descendants are told apart once they have left its process group.
pub fn has_env(pid: u32, entry: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == entry))
}

/// This process's children: from each thread's `children` file, else by a
/// scan of every process's parent.
fn children() -> Vec<u32> {
    let mut pids = Vec::new();
    let mut listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                listed = true;
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    if listed {
        return pids;
    }
    let me = std::process::id();
    let Ok(all) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in all.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if stat(pid).is_some_and(|st| st.ppid == me) {
            pids.push(pid);
        }
    }
    pids
}

struct Stat {
    state: char,
    ppid: u32,
    pgrp: u32,
}

/// State, parent and process group from `/proc/PID/stat` (after the
/// command's `)`, which may itself hold spaces and parentheses).
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(Stat { state, ppid, pgrp })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_child_that_exits_is_seen_as_a_zombie_and_reaped() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let known = std::collections::HashSet::new();
        let mut seen = false;
        for _ in 0..500 {
            if super::adopted(&known)
                .iter()
                .any(|a| a.pid == pid && a.zombie)
            {
                seen = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(seen, "the exited child is a zombie until reaped");
        super::reap(pid);
        assert!(!super::adopted(&known).iter().any(|a| a.pid == pid));
        std::mem::forget(child); // already reaped
    }

    #[test]
    fn a_process_just_started_is_young_and_this_one_older() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let young = super::age(child.id()).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(young < std::time::Duration::from_secs(2), "{young:?}");
        let me = super::age(std::process::id()).unwrap();
        assert!(me >= young, "{me:?} < {young:?}");
    }
}
