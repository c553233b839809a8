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
//!
//! Here: the supervisor's handle and the command loop. [`wire`] is the
//! format (pure), [`handoff`] the bookkeeping, [`reactor`] the sockets.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Instant;

use herd_balance::{Backend, BackendConfig, StrategyKind};
use tokio::io::Interest;
use tokio::sync::{Notify, mpsc, oneshot};

mod handoff;
mod reactor;
mod wire;

pub use wire::WORKER_FD;

use crate::upstream::Split;
use handoff::{Peer, Serving, Shared, State};

/// Connections a worker may hold unanswered before it is skipped.
pub const WINDOW: usize = 32;
/// Accepted connections waiting for a worker before accepting pauses (the
/// kernel's backlog queues the rest).
pub const PENDING_MAX: usize = 4096;
/// Accepts per wake-up before the answers get a turn.
pub const BATCH: usize = 64;

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
    /// The workers that may get connections now, in slot order, and a
    /// deploy's new ones with its split.
    Serving(Vec<u64>, Option<(Vec<u64>, Split)>),
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

    /// The serving workers; during a deploy also the new version's and the
    /// split (per connection: at random, or by client address).
    pub fn serving(&self, keys: Vec<u64>, new: Option<(Vec<u64>, Split)>) {
        let _ = self.tx.send(Cmd::Serving(keys, new));
    }

    /// The worker exited: what it had not answered goes to others.
    pub fn remove(&self, key: u64) {
        let _ = self.tx.send(Cmd::Remove(key));
    }

    /// Stops accepting now; the future resolves once every accepted
    /// connection has been taken by a worker (or no worker is left to take
    /// it). It does not borrow the dispatcher, so the supervisor can serve
    /// control requests while it waits.
    pub fn stop(&self) -> impl std::future::Future<Output = ()> + 'static {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send(Cmd::Stop(done)).is_ok();
        async move {
            if sent {
                let _ = wait.await;
            }
        }
    }
}

async fn run(
    listener: TcpListener,
    kind: StrategyKind,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    on_listening: Box<dyn Fn(u64)>,
) {
    let room = Rc::new(Notify::new());
    let stop = Rc::new(Notify::new());
    let st: Shared = Rc::new(RefCell::new(State {
        groups: [Serving::new(&kind), Serving::new(&kind)],
        split: None,
        kind,
        peers: Vec::new(),
        pending: VecDeque::with_capacity(PENDING_MAX),
        clock: Instant::now(),
        rng: fastrand::Rng::new(),
        room: room.clone(),
        stopping: None,
        on_listening,
    }));
    let acceptor = match crate::os::sys::watch(listener, Interest::READABLE) {
        Ok(l) => Some(tokio::task::spawn_local(reactor::accept_loop(
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
                let reader =
                    tokio::task::spawn_local(reactor::read_answers(key, chan.clone(), st.clone()))
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
            Cmd::Serving(keys, new) => {
                let mut s = st.borrow_mut();
                s.groups[0].keys = keys;
                s.split = new.as_ref().map(|(_, split)| {
                    let by_ip = split.by == herd_balance::KeySource::ClientIp;
                    (split.percent, by_ip)
                });
                s.groups[1].keys = new.map(|(k, _)| k).unwrap_or_default();
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
