//! Spreads client connections evenly over the proxy threads, as HAProxy
//! spreads the connections it accepts over its threads.
//!
//! Each proxy thread accepts on a `SO_REUSEPORT` socket of its own, and the
//! kernel picks the socket by a hash of the client's address and port, not
//! by how busy each thread is: 128 keep-alive clients came out as 50 and 78
//! on two threads, and the busier thread's clients waited longer. So a
//! thread that holds clearly more connections than another thread (one
//! picked at random: the power of two choices, one compare however many
//! threads there are) hands a connection over:
//!
//! - an HTTP/1.1 connection when it first waits for a next request, that is
//!   once it shows it stays (a `Connection: close` request never waits, so
//!   a new connection per request is never moved, and costs no wake-up of
//!   another thread);
//! - any other (TLS, h2c, `--protocol tcp`) as it is accepted.
//!
//! Either way the socket has not joined the first thread's event loop yet
//! ([`LazyStream`]), so the receiving thread serves it as its own.

use std::cell::OnceCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::ActiveGuard;
use crate::os::lazy::LazyStream;

/// Proxy threads counted apart; any further ones share the last count.
const SLOTS: usize = 256;

/// One thread's open client connections, on a cache line of its own (each
/// thread writes its own at every accept and close).
#[repr(align(64))]
struct Load(AtomicUsize);

/// Per proxy thread, by its 0-based index. One set per process, as herd
/// runs one cluster per master.
static LOADS: [Load; SLOTS] = [const { Load(AtomicUsize::new(0)) }; SLOTS];

/// Counts a connection on `slot`'s thread.
pub(super) fn add(slot: usize) {
    LOADS[slot.min(SLOTS - 1)].0.fetch_add(1, Ordering::Relaxed);
}

/// A connection on `slot`'s thread ended, or moved away.
pub(super) fn sub(slot: usize) {
    LOADS[slot.min(SLOTS - 1)].0.fetch_sub(1, Ordering::Relaxed);
}

fn load(slot: usize) -> usize {
    LOADS[slot.min(SLOTS - 1)].0.load(Ordering::Relaxed)
}

/// How many proxy threads there are.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The client connections each proxy thread holds, in index order (for
/// `/metrics`).
pub fn loads() -> Vec<usize> {
    (0..THREADS.load(Ordering::Relaxed).min(SLOTS))
        .map(load)
        .collect()
}

/// Whether a thread holding `mine` connections hands one to a thread
/// holding `other`: when it holds at least two more, and an eighth more
/// beyond that, so the counts end within a few of each other without
/// moving connections back and forth.
pub fn hands_over(mine: usize, other: usize) -> bool {
    mine > other + 1 + other / 8
}

/// A connection one thread passes to another, counted there.
pub(super) struct Handed {
    pub client: LazyStream,
    pub peer: SocketAddr,
    pub guard: ActiveGuard,
    /// Just accepted; else an HTTP/1.1 connection between requests.
    pub fresh: bool,
}

/// A proxy thread's way to the others.
struct Hands {
    /// This thread's 0-based index.
    me: usize,
    to: Arc<[mpsc::UnboundedSender<Handed>]>,
}

thread_local! {
    static HANDS: OnceCell<Hands> = const { OnceCell::new() };
}

/// What each of `n` proxy threads receives, in index order; each thread
/// calls [`join`] with its own.
pub(super) fn channels(n: usize) -> Vec<Inbound> {
    THREADS.store(n, Ordering::Relaxed);
    let (to, from): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let to: Arc<[_]> = to.into();
    from.into_iter()
        .enumerate()
        .map(|(me, from)| Inbound {
            me,
            to: to.clone(),
            from,
        })
        .collect()
}

/// One proxy thread's receiving end.
pub(super) struct Inbound {
    me: usize,
    to: Arc<[mpsc::UnboundedSender<Handed>]>,
    from: mpsc::UnboundedReceiver<Handed>,
}

impl Inbound {
    /// Makes this the calling thread's way to the others.
    pub fn join(&self) {
        HANDS.with(|h| {
            let _ = h.set(Hands {
                me: self.me,
                to: self.to.clone(),
            });
        });
    }

    /// The next connection another thread handed this one (`None`: no
    /// thread can hand any more).
    pub fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Handed>> {
        self.from.poll_recv(cx)
    }

    /// Takes no more, and returns what was handed before that, which this
    /// thread must still serve.
    pub fn close(&mut self) -> Vec<Handed> {
        self.from.close();
        let mut left = Vec::new();
        while let Ok(h) = self.from.try_recv() {
            left.push(h);
        }
        left
    }
}

/// The calling proxy thread's index (0 off them).
pub(super) fn me() -> usize {
    HANDS.with(|h| h.get().map_or(0, |h| h.me))
}

/// Another thread that should take a connection from this one, if this one
/// holds clearly more ([`hands_over`]).
pub(super) fn elsewhere() -> Option<usize> {
    HANDS.with(|h| {
        let h = h.get()?;
        let n = h.to.len();
        if n < 2 {
            return None;
        }
        let other = (h.me + 1 + fastrand::usize(..n - 1)) % n;
        hands_over(load(h.me), load(other)).then_some(other)
    })
}

/// Passes `h` to thread `to`, counted there from now on; gives it back,
/// counted here again, if that one takes no more (it stopped accepting).
pub(super) fn hand(to: usize, h: Handed) -> Result<(), Handed> {
    HANDS.with(|hands| {
        let Some(hands) = hands.get() else {
            return Err(h);
        };
        sub(hands.me);
        add(to);
        hands.to[to].send(h).map_err(|e| {
            sub(to);
            add(hands.me);
            e.0
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_hands_over_only_when_clearly_busier() {
        assert!(!hands_over(0, 0));
        assert!(!hands_over(1, 0));
        assert!(hands_over(2, 0));
        assert!(!hands_over(9, 8));
        assert!(hands_over(10, 7));
        // 64 against 56: within an eighth, kept; 66 against 56 is not.
        assert!(!hands_over(64, 56));
        assert!(hands_over(66, 56));
    }

    #[test]
    fn counts_from_random_hashing_end_within_a_few() {
        // Connections arrive on either of two threads at random (the
        // kernel's hash); each is kept or handed over by the rule.
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut worst, mut worst_unspread) = (0usize, 0usize);
        for _ in 0..200 {
            let (mut n, mut hashed) = ([0usize; 2], [0usize; 2]);
            for _ in 0..128 {
                let me = rng.usize(..2);
                hashed[me] += 1;
                let other = 1 - me;
                let to = if hands_over(n[me], n[other]) {
                    other
                } else {
                    me
                };
                n[to] += 1;
            }
            worst = worst.max(n[0].abs_diff(n[1]));
            worst_unspread = worst_unspread.max(hashed[0].abs_diff(hashed[1]));
        }
        assert!(worst <= 10, "worst split differed by {worst}");
        assert!(worst_unspread > 20, "{worst_unspread}");
    }

    #[tokio::test]
    async fn a_closed_end_gives_back_what_was_handed_and_refuses_more() {
        // Threads 200 and 201, whose counts no other test touches; this
        // test's thread is 200, a thread of its own 201.
        let mut ends = channels(202);
        let mut second = ends.pop().unwrap();
        let first = ends.pop().unwrap();
        first.join();
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let addr = std.local_addr().unwrap();
        let listener = crate::os::lazy::Listener::new(std).unwrap();
        let mut clients = Vec::new();
        let mut handed = Vec::new();
        for _ in 0..2 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (client, peer) = listener.accept().await.unwrap();
            handed.push(Handed {
                client,
                peer,
                guard: ActiveGuard::new(Arc::default()),
                fresh: true,
            });
        }
        let (late, early) = (handed.pop().unwrap(), handed.pop().unwrap());
        assert_eq!((load(200), load(201)), (2, 0));
        assert!(hand(201, early).is_ok());
        assert_eq!((load(200), load(201)), (1, 1));
        // Thread 201 stops taking any, and serves (here: drops) the one it
        // was handed, on itself.
        let left = std::thread::spawn(move || {
            second.join();
            second.close().len()
        });
        assert_eq!(left.join().unwrap(), 1);
        assert_eq!(load(201), 0);
        // Refused: given back, counted on this thread again.
        let back = hand(201, late).err().unwrap();
        assert_eq!((load(200), load(201)), (1, 0));
        drop(back);
        assert_eq!(load(200), 0);
    }
}
