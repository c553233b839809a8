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

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::deadline;

/// What a connection's watcher reads: when bytes last moved (on the proxy
/// thread's coarse clock: no clock read per byte) and the requests being
/// handled.
pub struct Seen {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last read or write.
    last: AtomicU64,
    busy: AtomicUsize,
}

impl Seen {
    pub fn new() -> Arc<Seen> {
        Arc::new(Seen {
            epoch: deadline::now(),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = deadline::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        self.last.store(ms as u64, Ordering::Relaxed);
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
        Busy(self.clone())
    }
}

pub struct Busy(Arc<Seen>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the connection has been idle for `timeout`.
pub async fn quiet_for(seen: &Seen, timeout: Duration) {
    loop {
        let quiet = seen.quiet_at(deadline::now());
        if quiet >= timeout {
            return;
        }
        // At most a tick early on the coarse clock; the loop looks again.
        tokio::time::sleep(timeout - quiet).await;
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
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_ready() {
            self.seen.touch();
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
