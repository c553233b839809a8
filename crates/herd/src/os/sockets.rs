//! Which TCP addresses a worker's processes listen on, read from `/proc`:
//! for the hint when a worker is not ready because it serves on a port of
//! its own choosing instead of the one herd gave it; and which processes
//! hold the port herd itself could not take.

use std::collections::HashSet;
use std::net::SocketAddr;

use procfs::net::TcpState;
use procfs::process::{FDTarget, Process};

/// The addresses on which any process of process group `pgid` (a worker
/// and what it started, `sh -c`, `npm start`…) has a listening TCP socket,
/// sorted. Empty when `/proc` cannot tell (processes gone, no access).
pub fn listening(pgid: i32) -> Vec<SocketAddr> {
    let mut inodes = HashSet::new();
    for (p, _) in super::usage::group(pgid) {
        sockets_of(&p, &mut inodes);
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

/// The processes (pids, in `/proc`'s order) holding a socket that listens
/// on TCP `port` at any address. Empty when `/proc` cannot tell (another
/// user's processes, or none).
pub fn holders_of(port: u16) -> Vec<u32> {
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    let wanted: HashSet<u64> = tables
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.state == TcpState::Listen && e.local_address.port() == port)
        .map(|e| e.inode)
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter(|p| {
            let mut held = HashSet::new();
            sockets_of(p, &mut held);
            !held.is_disjoint(&wanted)
        })
        .filter_map(|p| u32::try_from(p.pid).ok())
        .collect()
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

    #[test]
    fn the_holder_of_a_port_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(super::holders_of(port).contains(&std::process::id()));
        drop(l);
        assert!(!super::holders_of(port).contains(&std::process::id()));
    }
}
