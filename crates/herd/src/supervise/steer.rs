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
//!
//! One thing herd does not choose moves a socket: a worker may `shutdown()`
//! its listening socket (an idiom of C servers, to wake threads blocked in
//! `accept`), which ends listening for every process holding it: for the
//! whole port in shared mode, and takes a reuseport slot's socket out of the
//! group (the last one taking its place). herd listens on it again, which
//! puts it last; [`Group`] follows the kernel's order, and the program names
//! places by it.

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

/// The slots of a reuseport group by place, as the kernel keeps them: a
/// socket that begins listening goes last, one that stops has the last
/// take its place. Every slot below the group's size is in it, unless the
/// order is not known (see [`Group::shut`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Group {
    slots: Vec<usize>,
    unknown: bool,
}

/// At most this many sockets found shut down at once are followed (every
/// order they may have left in is tried: 720 for 6).
const SHUT_AT_MOST: usize = 6;

impl Group {
    /// Slots `0..n`, bound in order.
    pub fn in_order(n: usize) -> Group {
        Group {
            slots: (0..n).collect(),
            unknown: false,
        }
    }

    /// The slots from the group's size up to `n` began listening, in order.
    pub fn grow_to(&mut self, n: usize) {
        let from = self.slots.len();
        self.slots.extend(from..n);
    }

    /// `slot`'s socket stopped listening (closed, or shut down); `false`
    /// if it was out already.
    pub fn leave(&mut self, slot: usize) -> bool {
        let at = self.slots.iter().position(|&s| s == slot);
        if let Some(at) = at {
            self.slots.swap_remove(at);
        }
        at.is_some()
    }

    /// The sockets of `gone`, found shut down together, left the group in
    /// an order herd cannot know; then those of `back` listen again, in
    /// that order: last. When the order they left in matters (each leaving
    /// moves the last into its place), the group's order is not known any
    /// more, and `false`.
    pub fn shut(&mut self, gone: &[usize], back: &[usize]) -> bool {
        let outcome = |order: &[usize]| {
            let mut g = self.slots.clone();
            for &slot in order {
                if let Some(at) = g.iter().position(|&s| s == slot) {
                    g.swap_remove(at);
                }
            }
            g
        };
        let first = outcome(gone);
        let same =
            gone.len() <= SHUT_AT_MOST && orders(gone).iter().all(|order| outcome(order) == first);
        self.slots = first;
        self.slots.extend_from_slice(back);
        self.unknown |= !same;
        same
    }

    /// Where `slot`'s socket is in the group, if known.
    pub fn place(&self, slot: usize) -> Option<u32> {
        if self.unknown {
            return None;
        }
        let at = self.slots.iter().position(|&s| s == slot)?;
        u32::try_from(at).ok()
    }

    pub fn known(&self) -> bool {
        !self.unknown
    }

    pub fn slots(&self) -> &[usize] {
        &self.slots
    }
}

/// Every order of `items` (few: see [`SHUT_AT_MOST`]).
fn orders(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for (i, &first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in orders(&rest) {
            tail.insert(0, first);
            all.push(tail);
        }
    }
    all
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
        // Where the group's order is not known, the kernel spreads by hash.
        let want = targets(socks.len(), serving, !self.leaving.is_empty())
            .filter(|_| self.group.known())
            .map(|slots| {
                slots
                    .iter()
                    .filter_map(|&slot| self.group.place(slot as usize))
                    .collect::<Vec<u32>>()
            });
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
            let kept = self.m.instances().max(1).min(socks.len());
            let gone = socks.split_off(kept);
            if self.steered.is_some() {
                // Highest last, as they were bound.
                let mut gone = gone;
                gone.append(&mut self.leaving);
                self.leaving = gone;
            } else {
                // Out of the group once their workers close them too.
                for slot in kept..kept + gone.len() {
                    self.group.leave(slot);
                }
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
            self.close_leaving();
            self.steer();
        }
    }

    fn close_leaving(&mut self) {
        let kept = self.kept_sockets();
        for slot in kept..kept + self.leaving.len() {
            self.group.leave(slot);
        }
        // Closed in that order (lowest first).
        self.leaving.clear();
    }

    fn kept_sockets(&self) -> usize {
        match &self.listeners {
            Some(Listeners::ReusePort(socks)) => socks.len(),
            _ => 0,
        }
    }

    /// Reuseport mode, before an upgrade's exec (every worker gone): the
    /// sockets by their place in the group, for the new master takes the
    /// n-th socket handed for the n-th place. The leaving ones close first.
    /// Where the order is not known, each socket stops and listens again in
    /// slot order, which puts them in it (what was queued on them is reset,
    /// a price paid only then).
    pub(super) fn sockets_by_place(&mut self) -> Option<Vec<std::os::fd::RawFd>> {
        use std::os::fd::AsRawFd;
        if !matches!(self.listeners, Some(Listeners::ReusePort(_))) {
            return None;
        }
        self.close_leaving();
        let Some(Listeners::ReusePort(socks)) = &self.listeners else {
            return None;
        };
        if !self.group.known() {
            tracing::warn!(
                "reuseport: the kernel's order of the sockets is not known (several workers shut theirs down at once): listening on each again, in order, for the new master"
            );
            if let Err(e) = crate::os::listen::listen_again_in_order(socks) {
                tracing::warn!("cannot listen again: {e}");
            }
            self.group = Group::in_order(socks.len());
        }
        let fds: Vec<_> = self
            .group
            .slots()
            .iter()
            .map(|&slot| socks.get(slot).map(AsRawFd::as_raw_fd))
            .collect::<Option<_>>()?;
        (fds.len() == socks.len()).then_some(fds)
    }

    /// Reuseport mode: the group grew to the slots' sockets bound so far.
    pub(super) fn bound_sockets(&mut self) {
        let all = self.kept_sockets() + self.leaving.len();
        self.group.grow_to(all);
    }

    /// Fd modes, once a second, every 20 ms as a worker stops, and as
    /// one exits: a listening socket a worker shut down (see the module)
    /// listens again. What the kernel had queued on it was reset by the
    /// shutdown. A leaving slot's socket is only taken out of the group:
    /// its worker is on its way out. Not on a stop: a client is better
    /// refused than queued for no one (an upgrade's new master does want
    /// its sockets listening).
    pub(super) fn revive_listeners(&mut self) {
        if self.stopping {
            return;
        }
        let revive = |s: &Socket, whose: &str| match crate::os::listen::relisten(s) {
            Ok(false) => false,
            Ok(true) => {
                tracing::warn!(
                    "a worker shut down the listening socket{whose} (`shutdown()` on it ends listening for every process that holds it): herd listens on it again"
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    "the listening socket{whose} stopped listening and cannot listen again: {e}"
                );
                false
            }
        };
        let mut moved = false;
        match &self.listeners {
            Some(Listeners::Shared(s)) => {
                revive(s, "");
            }
            Some(Listeners::ReusePort(socks)) => {
                // A leaving slot's stays out: its worker is on its way out.
                let mut gone: Vec<usize> = (socks.len()..socks.len() + self.leaving.len())
                    .zip(&self.leaving)
                    .filter(|&(slot, s)| {
                        self.group.slots().contains(&slot)
                            && crate::os::sys::accept_queue(s.as_fd()).is_none()
                    })
                    .map(|(slot, _)| slot)
                    .collect();
                let back: Vec<usize> = (0..socks.len())
                    .filter(|&slot| revive(&socks[slot], &format!(" of slot {slot}")))
                    .collect();
                gone.extend(&back);
                if !gone.is_empty() {
                    moved = true;
                    let known = self.group.known();
                    if !self.group.shut(&gone, &back) && known {
                        tracing::warn!(
                            "reuseport: several workers shut their sockets down at once, in an order herd cannot know: new connections now go to every slot's socket, whether its worker serves or not"
                        );
                    }
                }
            }
            _ => {}
        }
        if moved {
            // The targets' places moved.
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
    fn the_group_follows_the_kernels_order() {
        use super::Group;
        let mut g = Group::in_order(4);
        // Out: the last takes its place; back: last.
        assert!(g.leave(1));
        assert_eq!(g.slots(), [0, 3, 2]);
        assert!(g.shut(&[], &[1]));
        assert_eq!(g.slots(), [0, 3, 2, 1]);
        assert_eq!((g.place(1), g.place(3)), (Some(3), Some(1)));
        g.grow_to(5);
        assert_eq!(g.slots(), [0, 3, 2, 1, 4]);
        assert!(!g.leave(7));
        // Closing the highest slots restores the order here.
        g.leave(4);
        g.leave(3);
        assert_eq!(g, Group::in_order(3));
        assert_eq!(g.place(3), None);
    }

    #[test]
    fn sockets_shut_down_together_are_followed_while_their_order_does_not_matter() {
        use super::Group;
        // [1, 0, 2]: 0 then 1 leave [2], and 1 then 0 as well.
        let mut g = Group::in_order(3);
        assert!(g.shut(&[0], &[0]));
        assert!(g.shut(&[1], &[1]));
        assert!(g.shut(&[2], &[2]));
        assert_eq!(g.slots(), [1, 0, 2]);
        assert!(g.shut(&[0, 1], &[0, 1]));
        assert_eq!(g.slots(), [2, 0, 1]);
        // [0, 1, 2, 3]: 0 then 1 leave [3, 2], 1 then 0 leave [2, 3].
        let mut g = Group::in_order(4);
        assert!(!g.shut(&[0, 1], &[0, 1]));
        assert!(!g.known());
        assert_eq!(g.place(2), None);
        // A leaving slot's socket out too, not back.
        let mut g = Group::in_order(3);
        assert!(g.shut(&[2], &[]));
        assert_eq!(g.slots(), [0, 1]);
    }

    /// A socket a worker shut down listens again, last in the group, as
    /// [`Group`](super::Group) has it: the steering finds each socket at
    /// the place the model gives.
    #[test]
    fn a_shut_down_socket_listens_again_where_the_group_model_says() {
        use super::Group;
        use crate::config::Mode;
        use crate::os::listen::{Listeners, listen_again_in_order, relisten, spread};
        use std::os::fd::AsFd;
        let Listeners::ReusePort(socks) =
            Listeners::bind(Mode::Reuseport, "127.0.0.1:0".parse().unwrap(), 4).unwrap()
        else {
            unreachable!()
        };
        let mut group = Group::in_order(4);
        assert!(!relisten(&socks[1]).unwrap());
        socks[1].shutdown(std::net::Shutdown::Both).unwrap();
        assert!(relisten(&socks[1]).unwrap());
        group.shut(&[1], &[1]);
        socks[2].shutdown(std::net::Shutdown::Both).unwrap();
        assert!(relisten(&socks[2]).unwrap());
        group.shut(&[2], &[2]);
        assert_ne!(group, Group::in_order(4));
        let at_places = |group: &Group| {
            for slot in 0..4 {
                let place = group.place(slot).unwrap();
                crate::os::sys::steer_reuseport(socks[0].as_fd(), &[place]).unwrap();
                let got = spread(&socks);
                assert_eq!(got[slot], 60, "slot {slot} at place {place}: {got:?}");
            }
        };
        at_places(&group);
        // Listening again in slot order puts the group in that order (what
        // an upgrade does where the order is not known).
        listen_again_in_order(&socks).unwrap();
        at_places(&Group::in_order(4));
    }

    #[test]
    fn none_serving_queues_on_every_kept_slot_not_on_a_leaving_one() {
        assert_eq!(targets(3, |_| false, false), None);
        assert_eq!(targets(2, |_| false, true), Some(vec![0, 1]));
    }
}
