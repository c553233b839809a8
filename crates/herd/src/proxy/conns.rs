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
/// Free buffers a thread keeps however quiet it is.
const MIN_FREE_BUFFERS: usize = 64;
/// Free buffers a thread may keep; more are freed at once. Between the two,
/// what a second of traffic did not need is freed by the sweep, so a busy
/// thread stops going to the allocator for each exchange (three or four
/// 24 KiB buffers each) and a quiet one gives the memory back.
const MAX_FREE_BUFFERS: usize = 1024;

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
    pub fn take(
        &mut self,
        target: u64,
        now: Instant,
        mut usable: impl FnMut(&mut T) -> bool,
    ) -> Option<T> {
        let list = &mut self.by_target.iter_mut().find(|(id, _)| *id == target)?.1;
        while let Some((mut c, at)) = list.pop() {
            if now.saturating_duration_since(at) <= MAX_IDLE_FOR && usable(&mut c) {
                return Some(c);
            }
        }
        None
    }

    pub fn put(&mut self, target: u64, c: T, now: Instant) {
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
        list.push((c, now));
    }

    /// Closes connections idle too long, and forgets targets with none.
    pub fn sweep(&mut self, now: Instant) {
        for (_, list) in &mut self.by_target {
            list.retain(|(_, at)| now.saturating_duration_since(*at) <= MAX_IDLE_FOR);
        }
        self.by_target.retain(|(_, l)| !l.is_empty());
    }
}

thread_local! {
    static BACKENDS: RefCell<IdleMap<TcpStream>> = const { RefCell::new(IdleMap::new()) };
    static BUFFERS: RefCell<FreeBuffers> = const { RefCell::new(FreeBuffers { free: Vec::new(), low: 0 }) };
}

/// A thread's free buffers, and the fewest it held since the last sweep:
/// that many were not needed.
struct FreeBuffers {
    free: Vec<Vec<u8>>,
    low: usize,
}

/// An idle connection to `target` that the backend has not closed.
pub fn take(target: u64) -> Option<TcpStream> {
    // The coarse clock: a connection may stay a tick longer than
    // MAX_IDLE_FOR, well within the backends' own idle time-outs.
    let now = super::deadline::now();
    BACKENDS.with(|m| m.borrow_mut().take(target, now, still_open))
}

/// Keeps `s` for the next request to `target` on this thread.
pub fn put(target: u64, s: TcpStream) {
    let now = super::deadline::now();
    BACKENDS.with(|m| m.borrow_mut().put(target, s, now));
}

/// Closes what has been idle too long, and frees the buffers the last
/// period did not use (called from each thread's tick, once a second).
pub fn sweep() {
    let now = super::deadline::now();
    BACKENDS.with(|m| m.borrow_mut().sweep(now));
    BUFFERS.with(|b| {
        let b = &mut *b.borrow_mut();
        let unused = b.low.min(b.free.len());
        b.free
            .truncate((b.free.len() - unused).max(MIN_FREE_BUFFERS));
        b.free.shrink_to(MIN_FREE_BUFFERS);
        b.low = b.free.len();
    });
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
        .with(|b| {
            let b = &mut *b.borrow_mut();
            let v = b.free.pop();
            b.low = b.low.min(b.free.len());
            v
        })
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
        if b.free.len() < MAX_FREE_BUFFERS {
            b.free.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_map_is_lifo_per_target_and_bounded() {
        let mut m = IdleMap::new();
        let t = Instant::now();
        m.put(1, "a", t);
        m.put(2, "x", t);
        m.put(1, "b", t);
        assert_eq!(m.take(1, t, |_| true), Some("b"));
        assert_eq!(
            m.take(1, t, |c| *c != "a"),
            None,
            "refused ones are dropped"
        );
        assert_eq!(m.take(1, t, |_| true), None);
        assert_eq!(m.take(2, t, |_| true), Some("x"));
        for _ in 0..MAX_IDLE + 5 {
            m.put(3, "y", t);
        }
        let mut n = 0;
        while m.take(3, t, |_| true).is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_IDLE);
        m.put(4, "old", t);
        m.put(4, "new", t + MAX_IDLE_FOR);
        let later = t + MAX_IDLE_FOR + Duration::from_millis(1);
        m.sweep(later);
        assert_eq!(
            m.take(4, later, |_| true),
            Some("new"),
            "the old one was closed"
        );
        m.sweep(later);
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

    #[test]
    fn a_quiet_period_frees_the_buffers_it_did_not_use() {
        let many: Vec<_> = (0..200).map(|_| buffer(100)).collect();
        many.into_iter().for_each(give_back);
        let held = || BUFFERS.with(|b| b.borrow().free.len());
        assert_eq!(held(), 200);
        sweep(); // the period that filled it: nothing known unused yet
        let busy: Vec<_> = (0..150).map(|_| buffer(100)).collect();
        busy.into_iter().for_each(give_back);
        sweep(); // 50 stayed unused all along
        assert_eq!(held(), 150);
        sweep(); // a quiet second: down to the floor
        assert_eq!(held(), MIN_FREE_BUFFERS);
        sweep();
        assert_eq!(held(), MIN_FREE_BUFFERS);
    }
}
