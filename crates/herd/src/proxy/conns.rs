//! What each proxy thread keeps for itself: idle keep-alive connections to
//! backends, and the buffers requests borrow while they are in flight.
//!
//! A proxy thread runs its own single-threaded runtime, and a socket is
//! registered with the runtime that opened it, so a backend connection is
//! only ever reused on its own thread: thread-locals, no lock, no channel.
//! An idle client connection holds no buffer: one is taken from here when
//! its next request arrives and given back when the exchange ends.

use std::cell::RefCell;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Idle connections kept per target and thread.
const MAX_IDLE: usize = 128;
/// An idle connection older than this is closed rather than reused: app
/// servers close idle keep-alive connections themselves (Node after 5 s),
/// and a request sent on one they are closing fails.
pub const MAX_IDLE_FOR: Duration = Duration::from_secs(2);
/// Free buffers kept per thread; more are freed.
const MAX_FREE_BUFFERS: usize = 64;

/// Idle connections by target id, for one thread.
pub struct IdleMap<T> {
    by_target: Vec<(u64, Vec<(T, Instant)>)>,
}

impl<T> IdleMap<T> {
    pub const fn new() -> IdleMap<T> {
        IdleMap {
            by_target: Vec::new(),
        }
    }

    /// The most recently idle connection to `target` that `usable` accepts.
    pub fn take(&mut self, target: u64, mut usable: impl FnMut(&mut T) -> bool) -> Option<T> {
        let list = &mut self.by_target.iter_mut().find(|(id, _)| *id == target)?.1;
        while let Some((mut c, at)) = list.pop() {
            if at.elapsed() <= MAX_IDLE_FOR && usable(&mut c) {
                return Some(c);
            }
        }
        None
    }

    pub fn put(&mut self, target: u64, c: T) {
        let i = match self.by_target.iter().position(|(id, _)| *id == target) {
            Some(i) => i,
            None => {
                self.by_target.push((target, Vec::new()));
                self.by_target.len() - 1
            }
        };
        let list = &mut self.by_target[i].1;
        if list.len() >= MAX_IDLE {
            list.remove(0);
        }
        list.push((c, Instant::now()));
    }

    /// Closes connections idle too long, and forgets targets with none.
    pub fn sweep(&mut self) {
        for (_, list) in &mut self.by_target {
            list.retain(|(_, at)| at.elapsed() <= MAX_IDLE_FOR);
        }
        self.by_target.retain(|(_, l)| !l.is_empty());
    }
}

thread_local! {
    static BACKENDS: RefCell<IdleMap<TcpStream>> = const { RefCell::new(IdleMap::new()) };
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An idle connection to `target` that the backend has not closed.
pub fn take(target: u64) -> Option<TcpStream> {
    BACKENDS.with(|m| m.borrow_mut().take(target, still_open))
}

/// Keeps `s` for the next request to `target` on this thread.
pub fn put(target: u64, s: TcpStream) {
    BACKENDS.with(|m| m.borrow_mut().put(target, s));
}

/// Closes what has been idle too long (called from each thread's tick).
pub fn sweep() {
    BACKENDS.with(|m| m.borrow_mut().sweep());
}

/// Whether an idle backend connection is still usable. The reactor has
/// marked it readable if anything (a FIN, stray bytes) arrived while it sat
/// idle; only then is a read tried, and only a "would block" clears it.
fn still_open(s: &mut TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match s.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut b = [0u8; 1];
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

/// A buffer of at least `cap` bytes' capacity, empty.
pub fn buffer(cap: usize) -> Vec<u8> {
    BUFFERS
        .with(|b| b.borrow_mut().pop())
        .filter(|v| v.capacity() >= cap)
        .unwrap_or_else(|| Vec::with_capacity(cap))
}

/// Gives a buffer back for the next request on this thread.
pub fn give_back(mut v: Vec<u8>) {
    if v.capacity() == 0 {
        return;
    }
    v.clear();
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < MAX_FREE_BUFFERS {
            b.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_map_is_lifo_per_target_and_bounded() {
        let mut m = IdleMap::new();
        m.put(1, "a");
        m.put(2, "x");
        m.put(1, "b");
        assert_eq!(m.take(1, |_| true), Some("b"));
        assert_eq!(m.take(1, |c| *c != "a"), None, "refused ones are dropped");
        assert_eq!(m.take(1, |_| true), None);
        assert_eq!(m.take(2, |_| true), Some("x"));
        for _ in 0..MAX_IDLE + 5 {
            m.put(3, "y");
        }
        let mut n = 0;
        while m.take(3, |_| true).is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_IDLE);
        m.sweep();
        assert!(m.by_target.is_empty());
    }

    #[test]
    fn buffers_come_back() {
        let v = buffer(1000);
        assert!(v.capacity() >= 1000 && v.is_empty());
        let p = v.as_ptr();
        give_back(v);
        let again = buffer(1000);
        assert_eq!(again.as_ptr(), p);
    }
}
