//! Worker programs that come with herd: the HTTP serving loop they share
//! (the whole worker contract through `herd-sdk`), and [`files`], the
//! static file server behind `herd serve` (PM2's `pm2 serve`).
//! `herd-demo` runs on the same loop.

pub mod files;

use std::future::Future;
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::either::Either;

/// Why a built-in worker could not serve.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    #[error("cannot take the listening socket: {0}")]
    Listen(#[from] herd_sdk::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// A connection, over TCP or a Unix socket.
type Stream = Either<tokio::net::TcpStream, tokio::net::UnixStream>;

/// Where connections come from: a listening socket, or the master.
pub enum Source {
    Listener(tokio::net::TcpListener),
    /// Proxy mode's Unix socket (`HERD_SOCKET`).
    Unix(tokio::net::UnixListener),
    Dispatch(herd_sdk::AsyncDispatch),
}

impl Source {
    /// Dispatch mode's channel when the master hands connections over, else
    /// fd 3 or `$PORT` (`fallback_port` without either).
    pub fn take(fallback_port: u16) -> Result<Source, BuiltinError> {
        Ok(match herd_sdk::dispatch()? {
            Some(d) => Source::Dispatch(d.into_async()?),
            None => {
                if let Some(l) = herd_sdk::unix_listener()? {
                    l.set_nonblocking(true)?;
                    return Ok(Source::Unix(tokio::net::UnixListener::from_std(l)?));
                }
                let l = herd_sdk::listener(fallback_port)?;
                l.set_nonblocking(true)?;
                Source::Listener(tokio::net::TcpListener::from_std(l)?)
            }
        })
    }

    /// What to print once serving.
    pub fn describe(&self) -> String {
        match self {
            Source::Listener(l) => match l.local_addr() {
                Ok(a) => format!("listening on {a}"),
                Err(_) => "listening".into(),
            },
            Source::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("listening on {p}"),
                None => "listening".into(),
            },
            Source::Dispatch(_) => "taking connections from herd (dispatch)".into(),
        }
    }

    async fn accept(&mut self) -> std::io::Result<(Stream, Option<herd_sdk::ConnGuard>)> {
        match self {
            Source::Listener(l) => l.accept().await.map(|(s, _)| (Either::Left(s), None)),
            Source::Unix(l) => l.accept().await.map(|(s, _)| (Either::Right(s), None)),
            Source::Dispatch(d) => d.accept().await.map(|(s, g)| (Either::Left(s), Some(g))),
        }
    }
}

/// Serves HTTP/1.1 with `handle` until SIGTERM or SIGINT, then drains:
/// stops accepting, lets keep-alive clients go with `Connection: close`
/// on their next answer (`herd_sdk::Drain`), and waits for busy
/// connections. `ready` is sent once the loop is about to accept.
pub async fn serve<H, F, B>(mut source: Source, handle: H) -> Result<(), BuiltinError>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    herd_sdk::ready()?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let drain = herd_sdk::Drain::new();
    loop {
        let (stream, open) = tokio::select! {
            a = source.accept() => match a {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => break,
                Err(_) => continue,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let (handle, drain) = (handle.clone(), drain.clone());
        let svc = hyper::service::service_fn(move |req| {
            let answer = handle(req);
            let drain = drain.clone();
            async move {
                let mut res = answer.await;
                if drain.close_after_answer() {
                    res.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        });
        // A client slow to send its head (slowloris) is let go after 30 s,
        // as Node's `headersTimeout` does: in the fd modes no proxy
        // stands in front.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(open); // counted closed (least-conn in dispatch mode)
        });
    }
    drop(source);
    drain.start();
    crate::outln!("draining");
    // The connections still idle after the grace (at least a moment, for
    // one accepted just now whose request is not read yet) are closed by
    // hyper's graceful shutdown, which also waits for the busy ones.
    let now = Instant::now();
    let idle_close = drain
        .idle_deadline()
        .unwrap_or(now)
        .max(now + Duration::from_millis(100));
    while graceful.count() > 0 && Instant::now() < idle_close {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    graceful.shutdown().await;
    crate::outln!("stopped");
    Ok(())
}
