//! Proxy mode's front door: the master accepts on the public port and
//! either relays bytes to a target (`--protocol tcp`, one pick per
//! connection) or hands the connection to the HTTP proxy (one pick per
//! request).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herd_balance::{Backend, Ctx};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::http::{HttpProxy, ip_key};
use crate::upstream::Upstreams;

/// Open client connections, so a graceful stop can wait for them.
#[derive(Default)]
pub struct Active {
    count: AtomicUsize,
    idle: Notify,
}

impl Active {
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.get() == 0 {
                return;
            }
            idle.await;
        }
    }
}

struct ActiveGuard(Arc<Active>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Clone)]
pub enum Protocol {
    Http(Arc<HttpProxy>),
    Tcp(Arc<TcpProxy>),
}

thread_local! {
    /// Which proxy thread this is (0 elsewhere): picks the connection-pool shard.
    static THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// This thread's index among the proxy threads, 1-based; 0 off them.
pub fn thread_index() -> usize {
    THREAD.with(|t| t.get())
}

/// Runs the proxy on one thread per listener, each with its own
/// single-threaded runtime, as nginx runs one event loop per worker: a
/// client connection, its backend connections and their tasks then stay
/// on one thread, and a request never waits for a cross-thread wake-up.
pub fn start_threads(
    listeners: Vec<std::net::TcpListener>,
    proto: Protocol,
    active: Arc<Active>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    for (i, l) in listeners.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (proto, active, stop) = (proto.clone(), active.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("herd-proxy-{i}"))
            .spawn(move || {
                THREAD.with(|t| t.set(i + 1));
                rt.block_on(async move {
                    // tokio wakes its driver through an eventfd whenever a new
                    // timer is due sooner than the driver's next planned wake.
                    // Every request sets a time-out timer; a steady short tick
                    // keeps them all later than that, and saves a syscall each.
                    tokio::spawn(async {
                        let mut tick = tokio::time::interval(Duration::from_millis(100));
                        loop {
                            tick.tick().await;
                        }
                    });
                    match TcpListener::from_std(l) {
                        Ok(l) => serve(l, proto, active.clone(), stop).await,
                        Err(e) => tracing::error!("proxy thread {i} cannot listen: {e}"),
                    }
                    // Connections this thread still serves live on its runtime:
                    // keep it running while they drain (the master exits when
                    // they are done or its drain time-out passes).
                    active.drained().await;
                });
            })?;
    }
    Ok(())
}

/// Accepts until `stop` is cancelled, then drops the listener; HTTP
/// connections are told to finish in-flight requests and close.
pub async fn serve(
    listener: TcpListener,
    proto: Protocol,
    active: Arc<Active>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, peer)) => {
                active.count.fetch_add(1, Ordering::AcqRel);
                let guard = ActiveGuard(active.clone());
                match &proto {
                    Protocol::Http(h) => {
                        let (h, stop) = (h.clone(), stop.clone());
                        tokio::spawn(async move {
                            h.serve_conn(client, peer, stop).await;
                            drop(guard);
                        });
                    }
                    Protocol::Tcp(t) => {
                        let t = t.clone();
                        tokio::spawn(async move {
                            t.relay(client, peer).await;
                            drop(guard);
                        });
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

pub struct TcpProxy {
    pub up: Arc<Upstreams>,
    pub connect_timeout: Duration,
    /// How long a connection waits for a first worker to be ready.
    pub wait_for_backend: Duration,
}

/// Targets tried per connection before giving up on it.
const MAX_TRIES: usize = 3;

impl TcpProxy {
    async fn relay(&self, mut client: TcpStream, peer: SocketAddr) {
        let key = ip_key(peer);
        let mut avoid: Option<Arc<Backend>> = None;
        let deadline = tokio::time::Instant::now() + self.wait_for_backend;
        let mut tries = 0;
        while tries < MAX_TRIES {
            let changed = self.up.changed();
            let pool = self.up.current();
            let ctx = Ctx {
                now: self.up.now(),
                rand: fastrand::u64(..),
                key: Some(key.as_slice()),
            };
            let lease = match pool.balancer.pick_except(&ctx, avoid.as_deref()) {
                Ok(l) => l,
                Err(_) => {
                    // None ready yet (start-up, restarts): wait a bounded time.
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        tracing::warn!(
                            "no ready backend within {:?}; closing a connection",
                            self.wait_for_backend
                        );
                        return;
                    }
                    continue;
                }
            };
            tries += 1;
            let target = pool.targets[lease.index()].clone();
            drop(pool);
            let connect =
                tokio::time::timeout(self.connect_timeout, TcpStream::connect(target.addr));
            match connect.await {
                Ok(Ok(mut upstream)) => {
                    lease.success(self.up.now());
                    target.count_served();
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    // Both ways; EOF on one side shuts down writing to the
                    // other (half-close); returns when both are done.
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return; // The lease, held until now, counts this connection.
                }
                Ok(Err(e)) => tracing::debug!("{}: connect failed: {e}", target.label),
                Err(_) => tracing::debug!("{}: connect timed out", target.label),
            }
            lease.failure(self.up.now());
            avoid = Some(lease.backend().clone());
        }
    }
}
