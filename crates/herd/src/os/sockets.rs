//! Which TCP addresses a worker's processes listen on, read from `/proc`:
//! for the hint when a worker is not ready because it serves on a port of
//! its own choosing instead of the one herd gave it.

use std::collections::HashSet;
use std::net::SocketAddr;

use procfs::net::TcpState;
use procfs::process::{FDTarget, Process};

/// The addresses on which any process of process group `pgid` (a worker
/// and what it started, `sh -c`, `npm start`…) has a listening TCP socket,
/// sorted. Empty when `/proc` cannot tell (processes gone, no access).
pub fn listening(pgid: i32) -> Vec<SocketAddr> {
    let mut inodes = HashSet::new();
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    for p in all.flatten() {
        if p.stat().is_ok_and(|s| s.pgrp == pgid) {
            sockets_of(&p, &mut inodes);
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    let mut out: Vec<SocketAddr> = tables
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.state == TcpState::Listen && inodes.contains(&e.inode))
        .map(|e| e.local_address)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Addresses for a log line: the first three, then `…`.
pub fn shown(addrs: &[SocketAddr]) -> String {
    let mut s: Vec<String> = addrs.iter().take(3).map(SocketAddr::to_string).collect();
    if addrs.len() > 3 {
        s.push("…".into());
    }
    s.join(", ")
}

fn sockets_of(p: &Process, inodes: &mut HashSet<u64>) {
    let Ok(fds) = p.fd() else {
        return;
    };
    for fd in fds.flatten() {
        if let FDTarget::Socket(inode) = fd.target {
            inodes.insert(inode);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_listener_of_this_process_group_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let pgid = nix::unistd::getpgrp().as_raw();
        assert!(super::listening(pgid).contains(&addr));
        drop(l);
        assert!(!super::listening(pgid).contains(&addr));
    }
}
