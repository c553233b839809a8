//! Time-outs of one proxy thread's connections, without a timer each.
//!
//! An idle keep-alive connection should cost almost nothing, and a tokio
//! timer (a 112-byte `Sleep`, plus its wheel entry behind a lock) and a
//! cancellation waiter were most of what one held. Instead, a connection
//! that waits registers its deadline and waker here (a 24-byte slot, reused
//! after it), and the thread's 100 ms tick wakes those whose deadline has
//! passed; a graceful stop wakes the idle ones at once. Deadlines are
//! therefore kept to within a tick (never early), which time-outs of
//! seconds do not mind.
//!
//! The tick also keeps the thread's coarse clock ([`now`], [`after`]):
//! reading the real one costs more than the rest of a deadline's work, and
//! a request used to read it several times.
//!
//! Thread-local like the runtime it serves: a slot is made, polled and
//! dropped on the thread whose tick sweeps it.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// 24 bytes: one per waiting connection, so it is kept small.
struct Slot {
    waker: Option<Waker>,
    /// In ticks since the thread's epoch, rounded up.
    deadline: u32,
    /// Woken by a graceful stop too (an idle connection).
    idle: bool,
    used: bool,
}

struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    stopping: bool,
    epoch: Instant,
    /// The last sweep's time, and its whole ticks since the epoch.
    swept_at: Instant,
    swept: u32,
}

/// The sweep's period, and so the deadlines' resolution.
const TICK: Duration = Duration::from_millis(100);

/// Nanoseconds per tick.
const TICK_NANOS: u64 = TICK.as_nanos() as u64;
/// Ticks per second.
const PER_SEC: u64 = 1_000_000_000 / TICK_NANOS;

impl Slots {
    /// Ticks from the epoch to `t`, rounded up (a deadline is never early).
    fn ticks_until(&self, t: Instant) -> u32 {
        let d = t.saturating_duration_since(self.epoch);
        let part = u64::from(d.subsec_nanos()).div_ceil(TICK_NANOS);
        Self::clamp(d.as_secs(), part)
    }

    /// Whole ticks elapsed at `t`.
    fn ticks_at(&self, t: Instant) -> u32 {
        let d = t.saturating_duration_since(self.epoch);
        Self::clamp(d.as_secs(), u64::from(d.subsec_nanos()) / TICK_NANOS)
    }

    /// `secs` and `part` ticks as one count (in u64: a request makes three
    /// deadlines, and u128 division, as `Duration::as_nanos` needs, is slow).
    fn clamp(secs: u64, part: u64) -> u32 {
        let ticks = secs.saturating_mul(PER_SEC).saturating_add(part);
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }
}

thread_local! {
    static SLOTS: RefCell<Slots> = RefCell::new(Slots {
        slots: Vec::new(),
        free: Vec::new(),
        stopping: false,
        epoch: Instant::now(),
        swept_at: Instant::now(),
        swept: 0,
    });
}

/// Why a wait ended without its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    Expired,
    /// The proxy is stopping gracefully (idle waits only).
    Stopping,
}

/// A registered deadline; unregistered when dropped.
pub struct Deadline {
    index: u32,
}

impl Deadline {
    /// `idle`: a graceful stop ends the wait too.
    pub fn new(deadline: Instant, idle: bool) -> Deadline {
        SLOTS.with(|s| {
            let s = &mut *s.borrow_mut();
            let slot = Slot {
                deadline: s.ticks_until(deadline),
                waker: None,
                idle,
                used: true,
            };
            let index = match s.free.pop() {
                Some(i) => {
                    s.slots[i as usize] = slot;
                    i
                }
                None => {
                    s.slots.push(slot);
                    (s.slots.len() - 1) as u32
                }
            };
            Deadline { index }
        })
    }

    /// Moves the deadline (a head has begun: now it is the header time-out)
    /// and whether a stop ends the wait.
    pub fn reset(&self, deadline: Instant, idle: bool) {
        SLOTS.with(|s| {
            let s = &mut *s.borrow_mut();
            let ticks = s.ticks_until(deadline);
            if let Some(slot) = s.slots.get_mut(self.index as usize) {
                slot.deadline = ticks;
                slot.idle = idle;
            }
        });
    }

    /// Ready once the deadline has passed (or, for an idle wait, the proxy
    /// stops); otherwise keeps `cx`'s waker for the tick to wake.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<Woke> {
        SLOTS.with(|s| {
            let s = &mut *s.borrow_mut();
            let stopping = s.stopping;
            let now = s.swept;
            let Some(slot) = s.slots.get_mut(self.index as usize) else {
                return Poll::Ready(Woke::Expired);
            };
            if slot.idle && stopping {
                return Poll::Ready(Woke::Stopping);
            }
            if now >= slot.deadline {
                return Poll::Ready(Woke::Expired);
            }
            match &slot.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let _ = SLOTS.try_with(|s| {
            let s = &mut *s.borrow_mut();
            if let Some(slot) = s.slots.get_mut(self.index as usize)
                && slot.used
            {
                slot.used = false;
                slot.waker = None;
                s.free.push(self.index);
            }
        });
    }
}

/// Wakes every wait whose deadline has passed (the thread's tick).
pub fn sweep(now: Instant) {
    SLOTS.with(|s| {
        let s = &mut *s.borrow_mut();
        s.swept_at = s.swept_at.max(now);
        let now = s.ticks_at(now);
        s.swept = now;
        for slot in &mut s.slots {
            if slot.used
                && slot.deadline <= now
                && let Some(w) = slot.waker.take()
            {
                w.wake();
            }
        }
        // Give memory back after a crowd has gone.
        if s.free.len() > 1024 && s.free.len() * 2 > s.slots.len() {
            while s.slots.last().is_some_and(|l| !l.used) {
                s.slots.pop();
            }
            let len = s.slots.len() as u32;
            s.free.retain(|&i| i < len);
        }
    });
}

/// The thread's coarse time: the last sweep's, at most a tick behind.
pub fn now() -> Instant {
    SLOTS.with(|s| s.borrow().swept_at)
}

/// A deadline `d` from now on the coarse clock: a tick later, so that it is
/// not early however far behind the coarse clock is within its tick.
pub fn after(d: Duration) -> Instant {
    now() + TICK + d
}

/// A graceful stop: idle waits end now, and every later one at once.
pub fn stop() {
    SLOTS.with(|s| {
        let s = &mut *s.borrow_mut();
        s.stopping = true;
        for slot in &mut s.slots {
            if slot.used
                && slot.idle
                && let Some(w) = slot.waker.take()
            {
                w.wake();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn ticks_are_counted_as_by_nanoseconds() {
        let epoch = Instant::now();
        let s = Slots {
            slots: Vec::new(),
            free: Vec::new(),
            stopping: false,
            epoch,
            swept_at: epoch,
            swept: 0,
        };
        let tick = TICK.as_nanos();
        let nanos = [
            0u64,
            1,
            99_999_999,
            100_000_000,
            100_000_001,
            1_000_000_000,
            1_234_567_891,
        ];
        // An hour, 500 days, and 20 years (more ticks than a u32 holds).
        let far = [
            3_600u64 * 1_000_000_000,
            500 * 86_400 * 1_000_000_000,
            20 * 365 * 86_400 * 1_000_000_000,
        ];
        for n in nanos.into_iter().chain(far) {
            let t = epoch + Duration::from_nanos(n);
            let up = u32::try_from(u128::from(n).div_ceil(tick)).unwrap_or(u32::MAX);
            let down = u32::try_from(u128::from(n) / tick).unwrap_or(u32::MAX);
            assert_eq!(s.ticks_until(t), up, "{n} ns");
            assert_eq!(s.ticks_at(t), down, "{n} ns");
        }
        if let Some(before) = epoch.checked_sub(Duration::from_secs(1)) {
            assert_eq!(s.ticks_until(before), 0);
        }
    }

    #[test]
    fn the_sweep_wakes_what_expired_and_a_stop_what_is_idle() {
        // Thread-local state: a thread of its own, so tests do not meet.
        std::thread::spawn(|| {
            let count = Arc::new(Count(AtomicUsize::new(0)));
            let waker = Waker::from(count.clone());
            let mut cx = Context::from_waker(&waker);
            let now = Instant::now();
            // Due within the first tick after the thread's epoch (now).
            let soon = Deadline::new(now + Duration::from_millis(1), false);
            let later = Deadline::new(now + Duration::from_secs(60), true);
            assert_eq!(std::mem::size_of::<Slot>(), 24);
            assert!(soon.poll(&mut cx).is_pending());
            assert!(later.poll(&mut cx).is_pending());
            sweep(now);
            assert_eq!(count.0.load(Ordering::SeqCst), 0);
            sweep(now + TICK * 2);
            assert_eq!(count.0.load(Ordering::SeqCst), 1);
            // Polled after the sweep that passed its deadline.
            assert_eq!(soon.poll(&mut cx), Poll::Ready(Woke::Expired));
            assert_eq!(super::now(), now + TICK * 2, "the coarse clock");
            assert_eq!(
                after(Duration::from_secs(1)),
                now + TICK * 3 + Duration::from_secs(1)
            );
            let busy = Deadline::new(now + Duration::from_secs(60), false);
            assert!(busy.poll(&mut cx).is_pending());
            stop();
            assert_eq!(
                count.0.load(Ordering::SeqCst),
                2,
                "only the idle wait is woken"
            );
            assert_eq!(later.poll(&mut cx), Poll::Ready(Woke::Stopping));
            assert!(busy.poll(&mut cx).is_pending());
            // Slots are reused once dropped.
            let i = later.index;
            drop(later);
            assert_eq!(Deadline::new(now, false).index, i);
        })
        .join()
        .unwrap();
    }
}
