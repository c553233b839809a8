//! `--idle-timeout` for the clients hyper serves (TLS, HTTP/2, h2c).
//!
//! hyper closes an idle HTTP/1 connection after its header read time-out,
//! but keeps an HTTP/2 connection with no stream open for as long as the
//! client does: a client that vanished without a FIN (a phone gone off the
//! network, a NAT that forgot the flow) held its socket, its TLS state and
//! hyper's buffers for good. A connection is idle when no request is being
//! handled or answered (a quiet stream is not idle) and no byte went either
//! way; after `--idle-timeout` of that it is shut down gracefully (HTTP/2:
//! GOAWAY), as nginx's `keepalive_timeout` does.
//!
//! `--header-timeout` too, for HTTP/1: hyper's own header timer starts as
//! soon as a connection waits for its next request, so it would cut idle
//! keep-alive clients after the header time-out (10 s) instead of the idle
//! one (60 s), costing browsers a new TLS handshake. Here the clock starts
//! at the first byte of a head, as in herd's own engine and nginx.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::deadline;

const UNSEEN: u8 = 0;
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// What a connection's watcher reads: when bytes last moved (on the proxy
/// thread's coarse clock: no clock read per byte) and the requests being
/// handled.
pub struct Seen {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last read or write.
    last: AtomicU64,
    /// Milliseconds from `epoch`, plus one, to the first byte read while no
    /// request was being handled (a head begun); 0: none since. A new
    /// connection's first head is timed from its start, as herd's engine
    /// does (a client that connects and says nothing).
    head_since: AtomicU64,
    busy: AtomicUsize,
    /// What the first bytes read were: [`UNSEEN`], [`HTTP1`] or [`HTTP2`]
    /// (its preface: no heads to time then).
    protocol: AtomicU8,
}

impl Seen {
    pub fn new() -> Arc<Seen> {
        Arc::new(Seen {
            epoch: deadline::now(),
            last: AtomicU64::new(0),
            head_since: AtomicU64::new(1),
            busy: AtomicUsize::new(0),
            protocol: AtomicU8::new(UNSEEN),
        })
    }

    fn touch(&self) -> u64 {
        let ms = deadline::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
        ms
    }

    /// Bytes came in (`bytes`): between requests, they begin a head.
    fn read(&self, bytes: &[u8]) {
        if self.protocol.load(Ordering::Relaxed) == UNSEEN {
            let p = if bytes.starts_with(b"PRI ") {
                HTTP2
            } else {
                HTTP1
            };
            self.protocol.store(p, Ordering::Relaxed);
        }
        let ms = self.touch();
        if self.busy.load(Ordering::Relaxed) == 0 && self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(ms + 1, Ordering::Relaxed);
        }
    }

    /// How long a head has been coming in at `now`, if one has begun.
    fn head_at(&self, now: Instant) -> Option<Duration> {
        if self.busy.load(Ordering::Relaxed) > 0 || self.protocol.load(Ordering::Relaxed) == HTTP2 {
            return None;
        }
        let since = self.head_since.load(Ordering::Relaxed).checked_sub(1)?;
        Some(now.saturating_duration_since(self.epoch + Duration::from_millis(since)))
    }

    /// How long the connection has been idle at `now`: zero while a
    /// request is handled.
    fn quiet_at(&self, now: Instant) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Marks a request as being handled until the guard drops (its answer
    /// sent whole).
    pub fn busy(self: &Arc<Seen>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        Busy(self.clone())
    }
}

pub struct Busy(Arc<Seen>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.head_since.store(0, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection's watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Idle for the idle time-out: shut it down gracefully.
    Idle,
    /// A request head took longer than the header time-out (slowloris):
    /// close it (hyper's own time-out sent nothing either).
    HeadTooSlow,
}

/// Resolves once the connection has been idle for `idle`, or (HTTP/1, with
/// `header`) a head has been coming in for longer than `header`.
pub async fn watch(seen: &Seen, idle: Duration, header: Option<Duration>) -> Ended {
    loop {
        let now = deadline::now();
        let quiet = seen.quiet_at(now);
        if quiet >= idle {
            return Ended::Idle;
        }
        let mut wait = idle - quiet;
        if let Some(header) = header {
            match seen.head_at(now) {
                Some(took) if took >= header => return Ended::HeadTooSlow,
                Some(took) => wait = wait.min(header - took),
                // A head may begin at any moment: look again by then.
                None => wait = wait.min(header),
            }
        }
        // At most a tick early on the coarse clock; the loop looks again.
        tokio::time::sleep(wait).await;
    }
}

/// A client's socket that records when bytes move on it.
pub struct Watched<S> {
    io: S,
    seen: Arc<Seen>,
}

impl<S> Watched<S> {
    pub fn new(io: S, seen: &Arc<Seen>) -> Watched<S> {
        Watched {
            io,
            seen: seen.clone(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_ready() {
            if buf.filled().len() > before {
                self.seen.read(&buf.filled()[before..]);
            } else {
                self.seen.touch();
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if r.is_ready() {
            self.seen.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            self.seen.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_timed_from_its_first_byte_and_only_between_requests() {
        let seen = Seen::new();
        let t0 = seen.epoch;
        let two = Duration::from_secs(2);
        assert_eq!(
            seen.head_at(t0 + two),
            Some(two),
            "a new connection's first head"
        );
        seen.read(b"GET / HT");
        assert_eq!(seen.head_at(t0 + two), Some(two));
        seen.read(b"TP/1.1\r\n");
        assert_eq!(seen.head_at(t0 + two), Some(two), "from the first byte");
        // Handled: the head is whole. Bytes meanwhile (a body, pipelining)
        // begin nothing, nor does the end of the answer.
        let busy = seen.busy();
        seen.read(b"body");
        assert_eq!(seen.head_at(t0 + two), None);
        drop(busy);
        assert_eq!(seen.head_at(t0 + two), None, "idle: no head to time");
        seen.read(b"G");
        assert!(seen.head_at(t0 + two).is_some());
        // HTTP/2 has no heads to time.
        let h2 = Seen::new();
        h2.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(h2.head_at(h2.epoch + two), None);
    }

    #[test]
    fn quiet_counts_from_the_last_byte_and_not_while_a_request_is_handled() {
        let seen = Seen::new();
        let t0 = seen.epoch;
        seen.last.store(1_000, Ordering::Relaxed);
        assert_eq!(
            seen.quiet_at(t0 + Duration::from_millis(4_000)),
            Duration::from_secs(3)
        );
        let busy = seen.busy();
        assert_eq!(
            seen.quiet_at(t0 + Duration::from_millis(4_000)),
            Duration::ZERO
        );
        drop(busy);
        // The end of a request counts as activity.
        assert!(
            seen.quiet_at(seen.epoch + Duration::from_millis(500)) <= Duration::from_millis(500)
        );
    }
}
