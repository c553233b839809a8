//! Keep-alive connections to one target, and the body types that move
//! through them.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herd_balance::Lease;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::Target;

pub type Sender = SendRequest<ReqBody>;

/// Idle connections kept per target.
const MAX_IDLE: usize = 128;
/// An idle connection older than this is dropped rather than reused: app
/// servers close idle keep-alive connections themselves (Node after 5 s),
/// and a request sent on one they are closing fails.
const MAX_IDLE_FOR: Duration = Duration::from_secs(2);

/// Idle connections, one shard per proxy thread: a connection's task runs
/// on the thread that opened it, so it is only reused there.
pub struct ConnPool {
    shards: Box<[Shard]>,
}

/// One thread's idle connections, on a cache line of its own so that two
/// proxy threads never contend for one (false sharing).
#[repr(align(128))]
struct Shard(Mutex<Vec<Idle>>);

/// A connection and when it went idle.
type Idle = (Sender, Instant);

impl Default for ConnPool {
    fn default() -> Self {
        let n = crate::cpus::usable() + 1;
        ConnPool {
            shards: (0..n).map(|_| Shard(Mutex::new(Vec::new()))).collect(),
        }
    }
}

impl ConnPool {
    fn shard(&self) -> &Mutex<Vec<Idle>> {
        &self.shards[crate::proxy::thread_index() % self.shards.len()].0
    }

    /// A pooled connection ready for a request, if one is.
    pub fn take(&self) -> Option<Sender> {
        let mut idle = self.shard().lock().ok()?;
        while let Some((mut s, at)) = idle.pop() {
            if s.is_closed() || at.elapsed() > MAX_IDLE_FOR {
                continue;
            }
            // Ready unless its last response is still being wound up.
            let waker = std::task::Waker::noop();
            if let Poll::Ready(Ok(())) = s.poll_ready(&mut Context::from_waker(waker)) {
                return Some(s);
            }
        }
        None
    }

    pub fn put(&self, s: Sender) {
        if s.is_closed() {
            return;
        }
        let Ok(mut idle) = self.shard().lock() else {
            return;
        };
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

/// Opens an HTTP/1.1 connection to `target`; `upgrades` keeps it usable for
/// a `101 Switching Protocols` tunnel.
pub async fn connect(
    target: &Target,
    timeout: Duration,
    upgrades: bool,
) -> Result<Sender, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target.addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake::<_, ReqBody>(TokioIo::new(stream))
        .await?;
    if upgrades {
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
    } else {
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    Ok(sender)
}

/// The body of a request on its way to a backend.
pub enum ReqBody {
    Empty,
    /// The client's body; `failed` is set if reading it fails, so a broken
    /// upload is told apart from a broken backend.
    Client {
        inner: Incoming,
        failed: Arc<AtomicBool>,
    },
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Client { inner, failed } => {
                let r = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &r {
                    failed.store(true, Ordering::Relaxed);
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}

/// The body of a response on its way to a client.
pub enum RespBody {
    /// A short answer of herd's own (errors).
    Full(Option<Bytes>),
    /// A backend's body. The lease is held until it ends, so in-flight
    /// counts cover the whole transfer; then the connection goes back to
    /// its pool.
    Backend {
        inner: Incoming,
        lease: Option<Lease>,
        back: Option<(Sender, Arc<Target>)>,
    },
}

impl RespBody {
    pub fn text(s: &'static str) -> RespBody {
        RespBody::Full(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Backend { inner, lease, back } => {
                let r = Pin::new(&mut *inner).poll_frame(cx);
                match &r {
                    Poll::Ready(None) => {
                        if let Some((s, t)) = back.take() {
                            t.conns.put(s);
                        }
                        lease.take();
                    }
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => {
                        // hyper stops polling once the length is reached.
                        if let Some((s, t)) = back.take() {
                            t.conns.put(s);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        // Broken mid-body: the connection is not reusable.
                        back.take();
                        lease.take();
                    }
                    _ => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Backend { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Backend { inner, .. } => inner.size_hint(),
        }
    }
}
