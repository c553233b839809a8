//! Dispatch mode: the master accepts each connection and passes its fd to a
//! worker over that worker's Unix socket (`SCM_RIGHTS`), as Node's cluster
//! round-robin does, for workers in any language.
//!
//! The wire format is Node's own handle protocol on a stream socket at the
//! worker's fd 3, so Node receives connections through its built-in IPC
//! channel (`NODE_CHANNEL_FD`) and everyone else speaks the same lines:
//!
//! - master → worker, one per connection, the fd attached:
//!   `{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_HERD_CONN"}}`
//! - worker → master: `{"cmd":"NODE_HANDLE_ACK"}` (took the oldest
//!   unanswered one; Node sends it by itself), `{"cmd":"NODE_HANDLE_NACK"}`
//!   (did not get it: hand it to someone else), `{"herd":"open","open":N}`
//!   (open connections now, for least-conn), `{"herd":"listening"}` (ready),
//!   `{"herd":"closed"}` (send no more).
//!
//! The master keeps its copy of each fd until the worker answers, so a
//! worker that dies or refuses costs no accepted connection: the copy goes
//! to another worker. Everything runs on one thread with its own
//! single-threaded runtime; per connection it makes three syscalls
//! (accept, sendmsg, close) plus its share of batched reads of answers,
//! and allocates nothing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use herd_balance::{Backend, BackendConfig, Balancer, Ctx, StrategyKind};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::proxy::ip_key;

/// The worker's fd number for its end of the dispatch socket.
pub const WORKER_FD: i32 = 3;
/// The line sent with each connection's fd.
pub const CONN_LINE: &[u8] =
    b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_HERD_CONN\"}}\n";
/// Connections a worker may hold unanswered before it is skipped.
pub const WINDOW: usize = 32;
/// Accepted connections waiting for a worker before accepting pauses (the
/// kernel's backlog queues the rest).
const PENDING_MAX: usize = 4096;
/// Accepts per wake-up before the answers get a turn.
const BATCH: usize = 64;
/// Longest answer line; longer lines (a chatty app's own messages) are skipped.
const LINE_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("cannot start the dispatch thread: {0}")]
    Start(std::io::Error),
}

/// What the supervisor sees of one worker's hand-offs.
pub struct PeerInfo {
    pub backend: Arc<Backend>,
    /// Handed over and not yet answered.
    pub outstanding: AtomicU32,
    /// Taken (acknowledged) in all.
    pub taken: AtomicU64,
}

impl PeerInfo {
    pub fn new(slot: usize) -> Arc<PeerInfo> {
        Arc::new(PeerInfo {
            backend: Arc::new(Backend::new(
                format!("worker-{slot}"),
                BackendConfig::default(),
            )),
            outstanding: AtomicU32::new(0),
            taken: AtomicU64::new(0),
        })
    }
}

enum Cmd {
    Add {
        key: u64,
        chan: UnixStream,
        info: Arc<PeerInfo>,
    },
    /// The workers that may get connections now, in slot order.
    Serving(Vec<u64>),
    Remove(u64),
    Stop(oneshot::Sender<()>),
}

/// The supervisor's handle on the dispatch thread.
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Dispatcher {
    /// Starts the dispatch thread on `listener` (non-blocking).
    /// `on_listening(key)` runs (on that thread) when a worker says it is
    /// listening.
    pub fn start(
        listener: TcpListener,
        kind: StrategyKind,
        on_listening: impl Fn(u64) + Send + 'static,
    ) -> Result<Dispatcher, DispatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DispatchError::Start)?;
        std::thread::Builder::new()
            .name("herd-dispatch".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, run(listener, kind, rx, Box::new(on_listening)));
            })
            .map_err(DispatchError::Start)?;
        Ok(Dispatcher { tx })
    }

    /// A new worker and the master's end of its dispatch socket.
    pub fn add(&self, key: u64, chan: UnixStream, info: Arc<PeerInfo>) {
        let _ = self.tx.send(Cmd::Add { key, chan, info });
    }

    pub fn serving(&self, keys: Vec<u64>) {
        let _ = self.tx.send(Cmd::Serving(keys));
    }

    /// The worker exited: what it had not answered goes to others.
    pub fn remove(&self, key: u64) {
        let _ = self.tx.send(Cmd::Remove(key));
    }

    /// Stops accepting and resolves once every accepted connection has
    /// been taken by a worker (or no worker is left to take it).
    pub async fn stop(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Stop(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// An accepted connection and the client address (the ip-hash key).
struct Conn {
    fd: OwnedFd,
    peer: SocketAddr,
}

struct Peer {
    key: u64,
    /// Registered for readability only: herd never waits to write (a full
    /// socket marks the worker busy), and write interest would wake this
    /// thread each time a worker reads a connection off its socket.
    chan: Rc<AsyncFd<UnixStream>>,
    info: Arc<PeerInfo>,
    /// Handed and unanswered, oldest first: the master's copies.
    outstanding: VecDeque<Conn>,
    /// Last open count the worker reported, and acks since.
    open: u32,
    taken_since: u32,
    /// Said `closed`, or its socket failed: never picked again.
    refused: bool,
    reader: tokio::task::AbortHandle,
}

impl Peer {
    /// The oldest unanswered connection is the worker's now: close our copy.
    fn took(&mut self) {
        if self.outstanding.pop_front().is_some() {
            self.taken_since = self.taken_since.saturating_add(1);
            self.info.taken.fetch_add(1, Relaxed);
        }
    }

    fn update(&self) {
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

struct State {
    kind: StrategyKind,
    peers: Vec<Peer>,
    balancer: Balancer,
    /// Balancer index → index into `peers`.
    order: Vec<usize>,
    serving: Vec<u64>,
    pending: VecDeque<Conn>,
    clock: Instant,
    rng: fastrand::Rng,
    /// Wakes the accept loop paused on a full `pending`.
    room: Rc<Notify>,
    /// Set by a stop request until it is answered.
    stopping: Option<oneshot::Sender<()>>,
    on_listening: Box<dyn Fn(u64)>,
}

type Shared = Rc<RefCell<State>>;

async fn run(
    listener: TcpListener,
    kind: StrategyKind,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    on_listening: Box<dyn Fn(u64)>,
) {
    let room = Rc::new(Notify::new());
    let stop = Rc::new(Notify::new());
    let st: Shared = Rc::new(RefCell::new(State {
        balancer: Balancer::new(kind.clone(), Vec::new()),
        kind,
        peers: Vec::new(),
        order: Vec::new(),
        serving: Vec::new(),
        pending: VecDeque::with_capacity(PENDING_MAX),
        clock: Instant::now(),
        rng: fastrand::Rng::new(),
        room: room.clone(),
        stopping: None,
        on_listening,
    }));
    let acceptor = match crate::os::sys::watch(listener, Interest::READABLE) {
        Ok(l) => Some(tokio::task::spawn_local(accept_loop(
            l,
            st.clone(),
            room,
            stop.clone(),
        ))),
        Err(e) => {
            tracing::error!("dispatch: cannot watch the listening socket: {e}");
            None
        }
    };
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Add { key, chan, info } => {
                let chan = match chan
                    .set_nonblocking(true)
                    .and_then(|()| crate::os::sys::watch(chan, Interest::READABLE))
                {
                    Ok(c) => Rc::new(c),
                    Err(e) => {
                        tracing::warn!("dispatch: worker socket: {e}");
                        continue;
                    }
                };
                let reader = tokio::task::spawn_local(read_answers(key, chan.clone(), st.clone()))
                    .abort_handle();
                let mut s = st.borrow_mut();
                let p = Peer {
                    key,
                    chan,
                    info,
                    outstanding: VecDeque::with_capacity(WINDOW),
                    open: 0,
                    taken_since: 0,
                    refused: false,
                    reader,
                };
                p.update();
                s.peers.push(p);
                s.rebuild();
            }
            Cmd::Serving(keys) => {
                let mut s = st.borrow_mut();
                s.serving = keys;
                s.rebuild();
                s.flush();
            }
            Cmd::Remove(key) => {
                let mut s = st.borrow_mut();
                if let Some(i) = s.peers.iter().position(|p| p.key == key) {
                    let p = s.peers.remove(i);
                    p.reader.abort();
                    s.requeue(p.outstanding);
                    s.rebuild();
                    s.flush();
                }
            }
            Cmd::Stop(done) => {
                let mut s = st.borrow_mut();
                s.stopping = Some(done);
                match &acceptor {
                    // It takes what is queued, closes, then checks.
                    Some(a) if !a.is_finished() => stop.notify_one(),
                    _ => s.check_stopped(),
                }
            }
        }
    }
}

async fn accept_loop(
    listener: tokio::io::unix::AsyncFd<TcpListener>,
    st: Shared,
    room: Rc<Notify>,
    stop: Rc<Notify>,
) {
    loop {
        let full = room.notified();
        if st.borrow().pending.len() >= PENDING_MAX {
            tokio::select! {
                _ = full => continue,
                _ = stop.notified() => break,
            }
        }
        drop(full);
        let mut guard = tokio::select! {
            g = listener.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("dispatch: listening socket failed: {e}");
                    break;
                }
            },
            _ = stop.notified() => break,
        };
        let mut drained = false;
        let mut failed = None;
        {
            let mut s = st.borrow_mut();
            for _ in 0..BATCH {
                match listener.get_ref().accept() {
                    Ok((stream, peer)) => {
                        let conn = Conn {
                            fd: stream.into(),
                            peer,
                        };
                        s.dispatch(conn);
                        if s.pending.len() >= PENDING_MAX {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failed {
            // EMFILE and friends: back off instead of spinning.
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else if !drained {
            // More may be queued: let the answers in first.
            tokio::task::yield_now().await;
        }
    }
    drain_backlog(listener.get_ref(), &st);
}

/// The last step of [`accept_loop`] on stop: what the kernel has already
/// queued was accepted from the client's point of view, so it is taken
/// and handed out too (bounded, in case of a flood), then the socket closes.
fn drain_backlog(listener: &TcpListener, st: &Shared) {
    let mut s = st.borrow_mut();
    for _ in 0..PENDING_MAX * 4 {
        match listener.accept() {
            Ok((stream, peer)) => s.dispatch(Conn {
                fd: stream.into(),
                peer,
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) => {}
            Err(_) => break,
        }
    }
    s.check_stopped();
}

/// Reads one worker's answers until its socket closes.
async fn read_answers(key: u64, chan: Rc<AsyncFd<UnixStream>>, st: Shared) {
    let mut buf = vec![0u8; LINE_MAX];
    let mut filled = 0;
    let mut skipping = false;
    loop {
        let Ok(mut ready) = chan.readable().await else {
            break;
        };
        let n = match ready.try_io(|c| c.get_ref().read(&mut buf[filled..])) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        };
        filled += n;
        let mut s = st.borrow_mut();
        let Some(pi) = s.peers.iter().position(|p| p.key == key) else {
            return;
        };
        let mut start = 0;
        while let Some(nl) = buf[start..filled].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + nl];
            if !skipping {
                s.answer(pi, line);
            }
            skipping = false;
            start += nl + 1;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            // A line longer than any answer: not ours; skip to its end.
            filled = 0;
            skipping = true;
        }
        s.peers[pi].update();
        s.flush();
        s.check_stopped();
    }
    // Closed or failed: whatever it did not answer goes to the others.
    let mut s = st.borrow_mut();
    if let Some(i) = s.peers.iter().position(|p| p.key == key) {
        let out = std::mem::take(&mut s.peers[i].outstanding);
        s.peers[i].refused = true;
        s.peers[i].update();
        s.requeue(out);
        s.flush();
        s.check_stopped();
    }
}

#[derive(serde::Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    cmd: Option<&'a str>,
    #[serde(borrow)]
    herd: Option<&'a str>,
    open: Option<u32>,
}

impl State {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    /// The balancer over the serving workers that still have a socket.
    fn rebuild(&mut self) {
        self.order.clear();
        let mut backends = Vec::with_capacity(self.serving.len());
        for key in &self.serving {
            if let Some(i) = self.peers.iter().position(|p| p.key == *key) {
                self.order.push(i);
                backends.push(self.peers[i].info.backend.clone());
            }
        }
        self.balancer = Balancer::new(self.kind.clone(), backends);
    }

    /// Hands `c` to a worker, or queues it until one can take it.
    fn dispatch(&mut self, c: Conn) {
        if let Err(c) = self.hand(c) {
            self.pending.push_back(c);
        }
    }

    fn hand(&mut self, c: Conn) -> Result<(), Conn> {
        let key = ip_key(c.peer.ip());
        for _ in 0..=self.order.len() {
            let ctx = Ctx {
                now: self.now(),
                rand: self.rng.u64(..),
                key: Some(key.as_slice()),
            };
            let Ok(lease) = self.balancer.pick(&ctx) else {
                return Err(c);
            };
            let bi = lease.index();
            drop(lease); // the load comes from the worker's counts, not leases
            let Some(&pi) = self.order.get(bi) else {
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
    fn flush(&mut self) {
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
    fn requeue(&mut self, out: VecDeque<Conn>) {
        for c in out.into_iter().rev() {
            self.pending.push_front(c);
        }
    }

    fn answer(&mut self, pi: usize, line: &[u8]) {
        const ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}";
        let p = &mut self.peers[pi];
        if line == ACK {
            p.took();
            return;
        }
        if line == b"\"ready\"" {
            // PM2's wait_ready convention: process.send('ready').
            (self.on_listening)(p.key);
            return;
        }
        let Ok(a) = serde_json::from_slice::<Answer<'_>>(line) else {
            // Not the dispatch protocol: an app's own process.send() when
            // herd's Node preload is not there to send it on fd 4 instead.
            let shown = String::from_utf8_lossy(&line[..line.len().min(200)]);
            tracing::debug!("ignored a line on a worker's dispatch socket: {shown}");
            return;
        };
        match (a.cmd, a.herd) {
            (Some("NODE_HANDLE_ACK"), _) => p.took(),
            (Some("NODE_HANDLE_NACK"), _) => {
                if let Some(c) = p.outstanding.pop_front() {
                    self.pending.push_front(c);
                }
            }
            (_, Some("open")) => {
                p.open = a.open.unwrap_or(0);
                p.taken_since = 0;
            }
            (_, Some("closed")) => {
                p.refused = true;
            }
            (_, Some("listening")) => {
                let key = p.key;
                (self.on_listening)(key);
            }
            _ => {}
        }
    }

    /// Resolves a pending stop once nothing accepted is left unanswered.
    fn check_stopped(&mut self) {
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
