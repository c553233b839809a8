//! Proxy mode: the master accepts on the public port and relays each
//! connection, byte for byte, to a ready worker's private loopback port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use herd_balance::{Pick, RoundRobin};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The ready workers, republished by the supervisor on every change and read
/// lock-free by every accepted connection.
#[derive(Default)]
pub struct Backends {
    list: ArcSwap<Vec<SocketAddr>>,
    changed: Notify,
}

impl Backends {
    pub fn publish(&self, ready: Vec<SocketAddr>) {
        self.list.store(Arc::new(ready));
        self.changed.notify_waiters();
    }
}

/// Open relayed connections, so a graceful stop can wait for them.
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

pub struct Proxy {
    pub backends: Arc<Backends>,
    pub active: Arc<Active>,
    /// How long a connection waits for some worker to be ready.
    pub wait_for_backend: Duration,
}

impl Proxy {
    /// Accepts until `stop` is cancelled, then drops the listener.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let rr = Arc::new(RoundRobin::default());
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((client, _)) => {
                    self.active.count.fetch_add(1, Ordering::AcqRel);
                    let guard = ActiveGuard(self.active.clone());
                    let me = self.clone();
                    let rr = rr.clone();
                    tokio::spawn(async move {
                        me.relay(client, &rr).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn relay(&self, mut client: TcpStream, picker: &RoundRobin) {
        let Some(mut upstream) = self.connect(picker).await else {
            return; // Dropping the client closes it: no worker could take it.
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        // Relays both ways; on EOF from one side it shuts down writing to the
        // other (half-close), and returns when both directions are done.
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }

    /// Connects to a ready worker, trying the others if one refuses (it may
    /// have just died), and waiting a bounded time when none is ready.
    async fn connect(&self, picker: &RoundRobin) -> Option<TcpStream> {
        let deadline = tokio::time::Instant::now() + self.wait_for_backend;
        loop {
            let changed = self.backends.changed.notified();
            let list = self.backends.list.load();
            for _ in 0..list.len() {
                let Some(i) = picker.pick(list.len()) else {
                    break;
                };
                if let Ok(s) = TcpStream::connect(list[i]).await {
                    return Some(s);
                }
            }
            drop(list);
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!(
                    "no ready worker within {:?}; closing a connection",
                    self.wait_for_backend
                );
                return None;
            }
        }
    }
}
