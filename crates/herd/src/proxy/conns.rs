//! What each proxy thread keeps for itself: idle keep-alive connections to
//! backends, and the buffers requests borrow while they are in flight.
//!
//! A proxy thread runs its own single-threaded runtime, and a socket is
//! registered with the runtime that opened it, so a backend connection is
//! only ever reused on its own thread: thread-locals, no lock, no channel.
//! An idle client connection holds no buffer: one is taken from here when
//! its next request arrives and given back when the exchange ends.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::backend::Conn;
use crate::os::diag::{DiagError, ServerEnd};
use crate::os::lazy::Socket as _;

use crate::upstream::Target;
use crate::upstream::reuse::{self, Reuse};

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

/// Idle connections by target id, for one thread, each target's with
/// its [`Reuse`] so the tick can close them when keeping stops.
pub struct IdleMap<T> {
    by_target: Vec<(u64, Arc<Reuse>, Idle<T>)>,
}

/// A target's idle connections, each with when it went idle.
type Idle<T> = Vec<(T, Instant)>;

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
        let list = &mut self.by_target.iter_mut().find(|(id, ..)| *id == target)?.2;
        while let Some((mut c, at)) = list.pop() {
            if now.saturating_duration_since(at) <= MAX_IDLE_FOR && usable(&mut c) {
                return Some(c);
            }
        }
        None
    }

    /// Keeps `c` unless `reuse` says not to (then it closes here).
    pub fn put(&mut self, target: u64, reuse: &Arc<Reuse>, c: T, now: Instant) {
        if !reuse.keeps(now) {
            return;
        }
        let i = match self.by_target.iter().position(|(id, ..)| *id == target) {
            Some(i) => i,
            None => {
                self.by_target.push((target, reuse.clone(), Vec::new()));
                self.by_target.len() - 1
            }
        };
        let list = &mut self.by_target[i].2;
        if list.len() >= MAX_IDLE {
            list.remove(0);
        }
        list.push((c, now));
    }

    /// Closes connections idle too long, and forgets targets with none.
    pub fn sweep(&mut self, now: Instant) {
        for (_, _, list) in &mut self.by_target {
            list.retain(|(_, at)| now.saturating_duration_since(*at) <= MAX_IDLE_FOR);
        }
        self.release(now);
    }

    /// Closes every idle connection.
    pub fn clear(&mut self) {
        self.by_target.clear();
    }

    /// Closes the idle connections to targets no longer kept.
    pub fn release(&mut self, now: Instant) {
        self.by_target
            .retain(|(_, reuse, l)| !l.is_empty() && reuse.keeps(now));
    }
}

thread_local! {
    static BACKENDS: RefCell<IdleMap<Conn>> = const { RefCell::new(IdleMap::new()) };
    /// [`reuse::turned_off`] when this thread last released.
    static RELEASED: Cell<u64> = const { Cell::new(0) };
    static BUFFERS: RefCell<FreeBuffers> = const { RefCell::new(FreeBuffers { free: Vec::new(), low: 0 }) };
}

/// A thread's free buffers, and the fewest it held since the last sweep:
/// that many were not needed.
struct FreeBuffers {
    free: Vec<Vec<u8>>,
    low: usize,
}

/// An idle connection to `target` that the backend has not closed.
pub fn take(target: u64) -> Option<Conn> {
    // The coarse clock: a connection may stay a tick longer than
    // MAX_IDLE_FOR, well within the backends' own idle time-outs.
    let now = super::deadline::now();
    BACKENDS.with(|m| m.borrow_mut().take(target, now, still_open))
}

/// Keeps `s` for the next request to `target` on this thread, unless
/// connections to it are not kept (then `s` closes here).
pub fn put(target: &Target, s: Conn) {
    let now = super::deadline::now();
    BACKENDS.with(|m| m.borrow_mut().put(target.id, &target.reuse, s, now));
}

/// Closes this thread's idle connections to targets no longer kept, once
/// some target stopped being kept (the tick, and the thread that found
/// out, at once).
pub fn release() {
    let seen = reuse::turned_off();
    if RELEASED.with(|r| r.replace(seen)) == seen {
        return;
    }
    let now = super::deadline::now();
    BACKENDS.with(|m| m.borrow_mut().release(now));
    super::h2::release(now);
}

/// A slot for a new connection to `target`, if connections to it are not
/// kept (see [`Reuse`]): such a worker serves one connection at a time and
/// leaves the others in its accept queue, and the kernel drops the
/// handshakes of any beyond its backlog, which their clients retry only a
/// second later. So herd opens at most that many at once (read from the
/// socket table once), and the others wait here, up to `wait`. `None`
/// otherwise: a kept target (one load), or a backlog unknown.
pub async fn serial_slot(
    target: &Target,
    wait: Duration,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    // (A Unix socket's backlog is not in the TCP table.)
    if target.reuse.keeps(super::deadline::now()) || target.pid.is_none() || target.unix.is_some() {
        return None;
    }
    let slots = target.slots.get_or_init(|| {
        let backlog = crate::os::diag::listen_backlog(target.addr)
            .ok()
            .flatten()?;
        // One place left for a health check's connection.
        let n = (backlog as usize).saturating_sub(1).max(1);
        tracing::debug!("{}: at most {n} connections at once", target.label);
        Some(Arc::new(tokio::sync::Semaphore::new(n)))
    });
    let slots = slots.clone()?;
    tokio::time::timeout(wait, slots.acquire_owned())
        .await
        .ok()?
        .ok()
}

/// Whether answers on new connections to `target` are to be looked at
/// ([`check_accepted`]): a worker's, while its connections are kept, unless
/// it was found to be a pool of threads in the last [`reuse::POOL_FOR`].
pub fn looked_at(target: &Target) -> bool {
    target.pid.is_some() && target.reuse.looked_at(super::deadline::now())
}

/// How long an answer on a connection just opened may take before
/// [`check_accepted`] looks (a few ms for nearly every answer).
pub const ACCEPT_CHECK_AFTER: Duration = Duration::from_millis(150);
/// Looks at most this many times per request (3 s).
pub const ACCEPT_CHECKS: u32 = 20;

/// Looks at a backend whose answer on a connection just opened to it
/// (`ours`, its local end) has taken [`ACCEPT_CHECK_AFTER`]; true if it is to
/// be looked at again a while later. A worker that has not accepted the
/// connection and sleeps meanwhile, its whole process tree, waits on
/// something else than new connections: the next request on a connection
/// herd keeps open to it, or some slow call, one connection at a time
/// either way, unless its processes hold more connections than they are
/// (a pool of threads, each waiting a moment on its own connection before
/// taking another, as Puma's: not looked at for a while). Then connections
/// to it are no longer kept (see [`Reuse`]): this thread closes its idle
/// ones at once, the others at their next tick.
/// A busy worker is looked at again while the connection waits (one look
/// per program per [`reuse::LOOK_EVERY`]); a remote upstream is not.
pub fn check_accepted(
    target: &Target,
    server_end: impl FnOnce() -> Result<Option<ServerEnd>, DiagError>,
) -> bool {
    let Some(pid) = target.pid else {
        return false;
    };
    if !target.reuse.may_look(super::deadline::now()) {
        return true; // another request just looked: later
    }
    match server_end() {
        Ok(Some(e)) if !e.accepted => {}
        Ok(_) => return false,
        Err(e) => {
            tracing::debug!("{}: {e}", target.label);
            return false;
        }
    }
    match crate::os::diag::asleep(pid) {
        Some(true) => {}
        Some(false) => {
            tracing::debug!(
                "{}: a new connection waits unaccepted; it is busy",
                target.label
            );
            return true;
        }
        None => return false,
    }
    if target.unix.is_none()
        && crate::os::diag::accepted_at(target.addr)
            .is_ok_and(|n| n > crate::os::diag::processes(pid))
    {
        tracing::debug!(
            "{}: a new connection waits unaccepted; its processes hold more than one each",
            target.label
        );
        target.reuse.found_pool(super::deadline::now());
        return false;
    }
    if let Some(d) = target.reuse.stop_keeping(super::deadline::now()) {
        tracing::warn!(
            "{} leaves a new connection unaccepted while it waits on another: it serves one \
             connection at a time, so herd closes its connections to it after each answer \
             (for {} s, then tries keeping them again)",
            target.label,
            d.as_secs()
        );
        release();
    }
    false
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
fn still_open(s: &mut Conn) -> bool {
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
        let k = Arc::new(Reuse::default());
        m.put(1, &k, "a", t);
        m.put(2, &k, "x", t);
        m.put(1, &k, "b", t);
        assert_eq!(m.take(1, t, |_| true), Some("b"));
        assert_eq!(
            m.take(1, t, |c| *c != "a"),
            None,
            "refused ones are dropped"
        );
        assert_eq!(m.take(1, t, |_| true), None);
        assert_eq!(m.take(2, t, |_| true), Some("x"));
        for _ in 0..MAX_IDLE + 5 {
            m.put(3, &k, "y", t);
        }
        let mut n = 0;
        while m.take(3, t, |_| true).is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_IDLE);
        m.put(4, &k, "old", t);
        m.put(4, &k, "new", t + MAX_IDLE_FOR);
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
    fn connections_to_a_target_no_longer_kept_close() {
        let mut m = IdleMap::new();
        let t = Instant::now();
        let (one, other) = (Arc::new(Reuse::default()), Arc::new(Reuse::default()));
        m.put(1, &one, "a", t);
        m.put(2, &other, "x", t);
        one.stop_keeping(t);
        m.put(1, &one, "b", t);
        m.release(t);
        assert_eq!(m.take(1, t, |_| true), None, "a closed, b never kept");
        assert_eq!(m.take(2, t, |_| true), Some("x"));
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
