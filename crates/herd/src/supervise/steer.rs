//! Reuseport mode: which of the group's sockets get new connections.
//!
//! The kernel spreads new connections over every `SO_REUSEPORT` socket of
//! the port by hash, whether a worker accepts on it or not: a slot whose
//! worker is down (`--autorestart=false`, a restart's back-off) would have
//! its share wait, and a slot that goes away (a scale-down, a deploy's
//! end) would have what was queued on it reset as its socket closes. So
//! while some slot has no serving worker, or a leaving socket still
//! listens, herd has the kernel pick among the serving slots' sockets only
//! (a classic BPF program on the group, `os::sys::steer_reuseport`).
//!
//! That program names sockets by their index in the group, which is the
//! order they began listening, a closed one's place taken by the last.
//! herd keeps that order equal to the slots': it binds each slot's socket
//! in slot order, closes only the highest ones, and keeps a leaving
//! socket (the master's copy) until its workers have exited, so that a
//! scale-up meanwhile takes it back for its slot instead of binding one
//! after it.

use std::os::fd::AsFd;
use std::time::Duration;

use socket2::Socket;

use super::Supervisor;
use super::machine::{Epoch, State};
use crate::os::listen::Listeners;

/// Which sockets (by index = slot) get new connections: `None` for all (no
/// program) when every one of `sockets` slots serves and none is leaving;
/// else the serving ones, or, with none serving, every slot's (what is
/// queued waits for the workers to come back, not on a leaving socket).
pub fn targets(sockets: usize, serving: impl Fn(usize) -> bool, leaving: bool) -> Option<Vec<u32>> {
    let up: Vec<u32> = (0..sockets)
        .filter(|&i| serving(i))
        .filter_map(|i| u32::try_from(i).ok())
        .collect();
    match up.len() {
        n if n == sockets && !leaving => None,
        0 if !leaving => None,
        0 => (0..sockets).map(|i| u32::try_from(i).ok()).collect(),
        _ => Some(up),
    }
}

impl Supervisor {
    /// Points the kernel at the serving slots' sockets (see the module), if
    /// that changed. Called whenever the serving set or the sockets change.
    pub(super) fn steer(&mut self) {
        let Some(Listeners::ReusePort(socks)) = &self.listeners else {
            return;
        };
        let serving = |slot: usize| {
            self.m
                .current(slot)
                .is_some_and(|w| w.state == State::Serving)
        };
        let want = targets(socks.len(), serving, !self.leaving.is_empty());
        if want == self.steered {
            return;
        }
        let first = socks[0].as_fd();
        let done = match &want {
            None => crate::os::sys::unsteer_reuseport(first),
            // Only where it can be undone (Linux 5.3+): else a slot left
            // out would never get a connection again.
            Some(to) if self.steered.is_none() => crate::os::sys::unsteer_reuseport(first)
                .and_then(|()| crate::os::sys::steer_reuseport(first, to)),
            Some(to) => crate::os::sys::steer_reuseport(first, to),
        };
        match done {
            Ok(()) => self.steered = want,
            Err(e) => {
                // Spread by the kernel's hash, as without steering.
                let _ = crate::os::sys::unsteer_reuseport(first);
                self.steered = None;
                if !self.said_steer_failed {
                    self.said_steer_failed = true;
                    tracing::warn!(
                        "reuseport: cannot steer new connections to the serving workers' sockets ({e}): a slot without a worker keeps getting its share, and what the kernel queued on a slot's socket that goes away is reset as it closes, unless `sysctl net.ipv4.tcp_migrate_req=1` (Linux 5.14+)"
                    );
                }
            }
        }
    }

    /// Reuseport mode: slots gone (scaled away, or a deploy's, promoted or
    /// rolled back) take their socket out of the group, for the kernel
    /// would go on giving it a share of new connections. While steering
    /// works, the master keeps each (see the module) until its leaving
    /// workers have exited.
    pub(super) fn close_unused_sockets(&mut self) {
        if let Some(Listeners::ReusePort(socks)) = &mut self.listeners {
            let gone = socks.split_off(self.m.instances().max(1).min(socks.len()));
            if self.steered.is_some() {
                // Highest last, as they were bound.
                let mut gone = gone;
                gone.append(&mut self.leaving);
                self.leaving = gone;
            }
        }
        self.steer();
    }

    /// Reuseport mode, before a worker starts in `slot`: a socket that
    /// slot had while leaving comes back, in its place in the group.
    pub(super) fn readopt(&mut self, slot: usize) {
        if let Some(Listeners::ReusePort(socks)) = &mut self.listeners {
            while socks.len() <= slot && !self.leaving.is_empty() {
                socks.push(self.leaving.remove(0));
            }
        }
    }

    /// Reuseport mode, a worker leaving with its slot: the kernel gives its
    /// socket no new connection from now on (see the module), so the worker
    /// can accept what was queued on it before it is told to stop. Returns
    /// a copy of that socket, to watch its queue.
    pub(super) fn leaving_socket(&mut self, epoch: Epoch) -> Option<Socket> {
        let Some(Listeners::ReusePort(socks)) = &self.listeners else {
            return None;
        };
        let slot = self.m.find(epoch)?.slot;
        if slot < self.m.instances().max(1) {
            return None;
        }
        let copy = socks.get(slot)?.try_clone().ok()?;
        self.steer();
        self.steered.as_ref()?;
        self.leaving_workers.push(epoch);
        Some(copy)
    }

    /// A worker's process exited.
    pub(super) fn left(&mut self, epoch: Epoch) {
        self.leaving_workers.retain(|e| *e != epoch);
    }

    /// Once a second: the leaving sockets' workers have all exited (and
    /// the descendants they left were killed), so their sockets close and
    /// the other slots get every new connection again.
    pub(super) fn close_left_sockets(&mut self) {
        if self.leaving_workers.is_empty() && !self.leaving.is_empty() {
            self.leaving.clear();
            self.steer();
        }
    }
}

/// How long a leaving reuseport socket is watched once the kernel gives it
/// no new connection: a handshake begun before then still ends on it, a
/// round trip later. Then its worker is told to stop when its queue is
/// empty, or at [`QUEUED_AT_MOST`] if the worker does not accept.
const QUEUED_SETTLE: Duration = Duration::from_millis(250);
const QUEUED_AT_MOST: Duration = Duration::from_secs(2);

/// Waits until the worker of a leaving reuseport slot has accepted what the
/// kernel queued on its socket (see `Supervisor::leaving_socket`).
pub(super) async fn accept_queued(sock: Socket) {
    let since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let queued = crate::os::sys::accept_queue(sock.as_fd()).unwrap_or(0);
        let waited = since.elapsed();
        if (queued == 0 && waited >= QUEUED_SETTLE) || waited >= QUEUED_AT_MOST {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::targets;

    #[test]
    fn every_slot_serving_and_none_leaving_needs_no_program() {
        assert_eq!(targets(3, |_| true, false), None);
        assert_eq!(targets(1, |_| true, false), None);
    }

    #[test]
    fn a_slot_without_a_serving_worker_is_left_out() {
        assert_eq!(targets(3, |i| i != 1, false), Some(vec![0, 2]));
        assert_eq!(targets(3, |i| i == 2, false), Some(vec![2]));
    }

    #[test]
    fn a_leaving_socket_keeps_the_program_while_every_kept_slot_serves() {
        assert_eq!(targets(2, |_| true, true), Some(vec![0, 1]));
    }

    #[test]
    fn the_program_returns_the_place_of_a_random_target() {
        use crate::os::sys::steering_program;
        let ret = |p: &[libc::sock_filter]| -> Vec<u32> {
            let ret_k = (libc::BPF_RET | libc::BPF_K) as u16;
            p.iter().filter(|i| i.code == ret_k).map(|i| i.k).collect()
        };
        // The first n: `random % n` is the place itself.
        let first = steering_program(&[0, 1]).unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(first[1].k, 2);
        // Any others: a jump per place, to the place's target.
        let some = steering_program(&[0, 2, 5]).unwrap();
        assert_eq!(some[1].k, 3);
        assert_eq!(ret(&some), [0, 2, 5]);
        assert!(steering_program(&[]).is_none());
        assert!(steering_program(&vec![1; 2001]).is_none());
    }

    #[test]
    fn none_serving_queues_on_every_kept_slot_not_on_a_leaving_one() {
        assert_eq!(targets(3, |_| false, false), None);
        assert_eq!(targets(2, |_| false, true), Some(vec![0, 1]));
    }
}
