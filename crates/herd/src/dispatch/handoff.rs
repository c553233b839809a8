//! The hand-off bookkeeping: which worker has which connection unanswered,
//! the queue of connections no worker could take yet, and the balancer
//! over the serving workers. Single-threaded (the dispatch thread), so the
//! state sits in an `Rc<RefCell>` shared by its tasks.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use herd_balance::{Balancer, Ctx, StrategyKind};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, oneshot};

use super::wire::{self, CONN_LINE, Said};
use super::{PENDING_MAX, PeerInfo, WINDOW};
use crate::proxy::ip_key;

/// An accepted connection and the client address (the ip-hash key).
pub(super) struct Conn {
    pub(super) fd: OwnedFd,
    pub(super) peer: SocketAddr,
}

pub(super) struct Peer {
    pub(super) key: u64,
    /// Registered for readability only: herd never waits to write (a full
    /// socket marks the worker busy), and write interest would wake this
    /// thread each time a worker reads a connection off its socket.
    pub(super) chan: Rc<AsyncFd<UnixStream>>,
    pub(super) info: Arc<PeerInfo>,
    /// Handed and unanswered, oldest first: the master's copies.
    pub(super) outstanding: VecDeque<Conn>,
    /// Last open count the worker reported, and acks since.
    pub(super) open: u32,
    pub(super) taken_since: u32,
    /// Said `closed`, or its socket failed: never picked again.
    pub(super) refused: bool,
    pub(super) reader: tokio::task::AbortHandle,
}

impl Peer {
    /// The oldest unanswered connection is the worker's now: close our copy.
    pub(super) fn took(&mut self) {
        if self.outstanding.pop_front().is_some() {
            self.taken_since = self.taken_since.saturating_add(1);
            self.info.taken.fetch_add(1, Relaxed);
        }
    }

    pub(super) fn update(&self) {
        let out = self.outstanding.len() as u32;
        self.info.outstanding.store(out, Relaxed);
        // A worker that never reports counts as holding all it took.
        self.info.backend.set_load(
            self.open
                .saturating_add(self.taken_since)
                .saturating_add(out),
        );
        self.info
            .backend
            .set_busy(self.refused || self.outstanding.len() >= WINDOW);
    }
}

pub(super) struct State {
    pub(super) kind: StrategyKind,
    pub(super) peers: Vec<Peer>,
    /// The serving workers: the cluster's, and a deploy's new ones.
    pub(super) groups: [Serving; 2],
    /// A deploy's split: percent of connections to the new workers, and
    /// whether by client address (else at random).
    pub(super) split: Option<(u8, bool)>,
    pub(super) pending: VecDeque<Conn>,
    pub(super) clock: Instant,
    pub(super) rng: fastrand::Rng,
    /// Wakes the accept loop paused on a full `pending`.
    pub(super) room: Rc<Notify>,
    /// Set by a stop request until it is answered.
    pub(super) stopping: Option<oneshot::Sender<()>>,
    pub(super) on_listening: Box<dyn Fn(u64)>,
}

pub(super) type Shared = Rc<RefCell<State>>;

/// Workers that may get connections, with the balancer over them.
pub(super) struct Serving {
    pub(super) keys: Vec<u64>,
    pub(super) balancer: Balancer,
    /// Balancer index → index into `peers`.
    pub(super) order: Vec<usize>,
}

impl Serving {
    pub(super) fn new(kind: &StrategyKind) -> Serving {
        Serving {
            keys: Vec::new(),
            balancer: Balancer::new(kind.clone(), Vec::new()),
            order: Vec::new(),
        }
    }
}

impl State {
    pub(super) fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    /// The balancers over the serving workers that still have a socket.
    pub(super) fn rebuild(&mut self) {
        for g in &mut self.groups {
            g.order.clear();
            let mut backends = Vec::with_capacity(g.keys.len());
            for key in &g.keys {
                if let Some(i) = self.peers.iter().position(|p| p.key == *key) {
                    g.order.push(i);
                    backends.push(self.peers[i].info.backend.clone());
                }
            }
            g.balancer = Balancer::new(self.kind.clone(), backends);
        }
    }

    /// Hands `c` to a worker, or queues it until one can take it.
    pub(super) fn dispatch(&mut self, c: Conn) {
        if let Err(c) = self.hand(c) {
            self.pending.push_back(c);
        }
    }

    /// During a deploy the split picks the workers' group first (the
    /// other one takes the connection if none of the first can).
    pub(super) fn hand(&mut self, mut c: Conn) -> Result<(), Conn> {
        let Some((percent, by_ip)) = self.split else {
            return self.hand_in(0, c);
        };
        let bucket = if by_ip {
            crate::upstream::bucket_hash(ip_key(c.peer.ip()).as_slice()) % 100
        } else {
            crate::upstream::next_bucket()
        };
        let first = usize::from(bucket < u64::from(percent));
        for g in [first, 1 - first] {
            match self.hand_in(g, c) {
                Ok(()) => return Ok(()),
                Err(back) => c = back,
            }
        }
        Err(c)
    }

    fn hand_in(&mut self, g: usize, c: Conn) -> Result<(), Conn> {
        let key = ip_key(c.peer.ip());
        for _ in 0..=self.groups[g].order.len() {
            let ctx = Ctx {
                now: self.now(),
                rand: self.rng.u64(..),
                key: Some(key.as_slice()),
            };
            let Ok(lease) = self.groups[g].balancer.pick(&ctx) else {
                return Err(c);
            };
            let bi = lease.index();
            drop(lease); // the load comes from the worker's counts, not leases
            let Some(&pi) = self.groups[g].order.get(bi) else {
                return Err(c);
            };
            let p = &mut self.peers[pi];
            match crate::os::sys::send_fd(p.chan.as_raw_fd(), CONN_LINE, c.fd.as_raw_fd()) {
                Ok(_) => {
                    p.outstanding.push_back(c);
                    p.update();
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Its socket is full: skip it until it answers.
                    p.info.backend.set_busy(true);
                }
                Err(e) => {
                    tracing::debug!("dispatch: worker socket: {e}");
                    p.refused = true;
                    p.update();
                }
            }
        }
        Err(c)
    }

    /// Hands queued connections out while workers can take them.
    pub(super) fn flush(&mut self) {
        let was_full = self.pending.len() >= PENDING_MAX;
        while let Some(c) = self.pending.pop_front() {
            if let Err(c) = self.hand(c) {
                self.pending.push_front(c);
                break;
            }
        }
        if was_full && self.pending.len() < PENDING_MAX {
            self.room.notify_one();
        }
    }

    /// Connections a worker held unanswered go first in line again.
    pub(super) fn requeue(&mut self, out: VecDeque<Conn>) {
        for c in out.into_iter().rev() {
            self.pending.push_front(c);
        }
    }

    /// Acts on one line from worker `pi`.
    pub(super) fn answer(&mut self, pi: usize, line: &[u8]) {
        let p = &mut self.peers[pi];
        match wire::parse(line) {
            Said::Took => p.took(),
            Said::Refused => {
                if let Some(c) = p.outstanding.pop_front() {
                    self.pending.push_front(c);
                }
            }
            Said::Open(n) => {
                p.open = n;
                p.taken_since = 0;
            }
            Said::Closed => p.refused = true,
            Said::Listening => (self.on_listening)(p.key),
            Said::Other => {
                let shown = String::from_utf8_lossy(&line[..line.len().min(200)]);
                tracing::debug!("ignored a line on a worker's dispatch socket: {shown}");
            }
        }
    }

    /// Resolves a pending stop once nothing accepted is left unanswered.
    pub(super) fn check_stopped(&mut self) {
        if self.stopping.is_none() {
            return;
        }
        let live = self.peers.iter().any(|p| !p.refused);
        let unanswered = self.peers.iter().any(|p| !p.outstanding.is_empty());
        if (self.pending.is_empty() || !live)
            && !unanswered
            && let Some(done) = self.stopping.take()
        {
            let _ = done.send(());
        }
    }
}
