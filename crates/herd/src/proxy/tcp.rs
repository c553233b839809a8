//! The TCP proxy (`--protocol tcp`): one pick per connection, then bytes
//! both ways with half-close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use herd_balance::{Backend, Ctx, PickError};
use tokio::net::TcpStream;

use super::ip_key;
use crate::upstream::Upstreams;

pub struct TcpProxy {
    pub up: Arc<Upstreams>,
    pub connect_timeout: Duration,
    /// How long a connection waits for a first worker to be ready.
    pub wait_for_backend: Duration,
    /// `--access-log`: one line per connection.
    pub log: Option<Arc<super::access::AccessLog>>,
    /// `--accept-proxy`: which connections begin with a PROXY header.
    pub accept_proxy: Option<super::ExpectProxy>,
    /// `--send-proxy`: backend connections begin with a PROXY header.
    pub send_proxy: Option<crate::config::SendProxy>,
}

/// Targets tried per connection before giving up on it.
const MAX_TRIES: usize = 3;

/// A connection to a backend, made for one client.
struct Opened {
    upstream: super::backend::Conn,
    /// Held for the connection's life: it counts as in flight.
    lease: crate::upstream::Held,
    target: Arc<crate::upstream::Target>,
    /// From accept to connected.
    connected: Duration,
    tries: usize,
}

impl TcpProxy {
    pub(super) async fn relay(&self, mut client: TcpStream, peer: SocketAddr) {
        let (at, started) = (std::time::SystemTime::now(), std::time::Instant::now());
        // Boxed: picking and connecting take more state than relaying, and
        // the task keeps room for its largest state while the tunnel idles.
        let Some(mut c) = Box::pin(self.open(&mut client, peer, started)).await else {
            return;
        };
        // Both ways; EOF on one side shuts down writing to the other
        // (half-close); returns when both are done.
        let moved = super::tunnel::relay_to(&mut client, &mut c.upstream).await;
        if let Ok((to_backend, to_client)) = moved {
            let a = &c.target.answers;
            a.bytes_to_backend.fetch_add(to_backend, Relaxed);
            a.bytes_to_client.fetch_add(to_client, Relaxed);
        }
        if let Some(log) = &self.log {
            log.write(&super::access::Entry {
                at,
                client: peer.ip(),
                method: "-",
                path: "-",
                protocol: "TCP",
                status: 0,
                bytes: moved.map_or(0, |(a, b)| a + b),
                duration: started.elapsed(),
                upstream: Some(c.target.place()),
                upstream_time: Some(c.connected),
                worker: Some(c.target.backend.name()),
                retries: (c.tries - 1) as u32,
                referer: None,
                user_agent: None,
            });
        }
        drop(c.lease); // Held until now, it counted this connection.
    }

    /// Picks a backend and connects to it (another, up to [`MAX_TRIES`],
    /// when that fails); `None` when none could be reached.
    async fn open(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
        started: std::time::Instant,
    ) -> Option<Opened> {
        let ip = ip_key(peer.ip());
        // `hash:sni`: the ClientHello is read first (and sent on as read).
        let mut hello = Vec::new();
        let sni = match self.up.kind() {
            herd_balance::StrategyKind::SniHash => {
                server_name(client, &mut hello, self.wait_for_backend).await
            }
            _ => None,
        };
        let key = match &sni {
            Some(name) => name.as_bytes(),
            None => ip.as_slice(),
        };
        // What each backend connection begins with: the PROXY header
        // (`--send-proxy`), then what was read of the ClientHello.
        let first = match self.send_proxy {
            Some(version) => {
                let to = client.local_addr().ok()?;
                [super::proxy_protocol::header(version, peer, to), hello].concat()
            }
            None => hello,
        };
        let mut avoid: Option<Arc<Backend>> = None;
        let deadline = tokio::time::Instant::now() + self.wait_for_backend;
        let mut tries = 0;
        let mut replace_by = None;
        let mut queued = super::Queued::default();
        while tries < MAX_TRIES {
            if queued.barging() {
                queued.wait(self.connect_timeout).await;
            }
            let changed = self.up.changed();
            let pool = self.up.current();
            let ctx = Ctx {
                now: self.up.now(),
                rand: fastrand::u64(..),
                key: Some(key),
            };
            // A deploy's split by client address holds per connection too.
            let split = (*pool.split_source() == herd_balance::KeySource::ClientIp)
                .then_some(ip.as_slice());
            let (lease, target) = match pool.pick(&ctx, avoid.as_deref(), split) {
                // Back to the worker that just failed, as the only one left.
                Ok(p)
                    if crate::upstream::Upstreams::came_back(&avoid, p.lease.backend())
                        && self.up.replaced(avoid.as_deref(), &mut replace_by).await =>
                {
                    avoid = None;
                    continue;
                }
                Ok(p) => {
                    queued.served();
                    (p.lease, p.target)
                }
                Err(PickError::Full) if queued.wait(self.connect_timeout).await => continue,
                Err(PickError::Full) => {
                    super::Told::all_full(self.connect_timeout, "closing a connection");
                    return None;
                }
                Err(_) => {
                    // None ready yet (start-up, restarts): wait a bounded time.
                    if !super::pool_changed(deadline, changed).await {
                        if !super::stop_token().is_cancelled() {
                            tracing::warn!(
                                "no ready backend within {:?}; closing a connection",
                                self.wait_for_backend
                            );
                        }
                        return None;
                    }
                    continue;
                }
            };
            tries += 1;
            drop(pool);
            match super::backend::connect(&target, self.connect_timeout).await {
                Ok(mut upstream) => {
                    lease.success(self.up.now());
                    target.count_served();
                    // A worker or a local upstream cannot vanish without its
                    // kernel closing the connection; another host can.
                    if let super::backend::Conn::Tcp(s) = &upstream
                        && !target.addr.ip().to_canonical().is_loopback()
                    {
                        let _ = crate::os::listen::probe_idle_peers(s);
                    }
                    if !first.is_empty() && write_all(&mut upstream, &first).await.is_err() {
                        return None;
                    }
                    return Some(Opened {
                        upstream,
                        lease,
                        target,
                        connected: started.elapsed(),
                        tries,
                    });
                }
                // herd's own shortage: not the backend's failure.
                Err(e) if super::own_shortage(&target.label, &e) => return None,
                Err(e) => {
                    let why = format_args!("cannot connect: {e}");
                    super::backend_failed(&self.up, &lease, &target.label, &why);
                }
            }
            avoid = Some(lease.backend().clone());
        }
        None
    }
}

/// Sends a backend connection's first bytes.
async fn write_all(to: &mut super::backend::Conn, b: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    match to {
        super::backend::Conn::Tcp(s) => s.write_all(b).await,
        super::backend::Conn::Unix(s) => s.write_all(b).await,
    }
}

/// The largest ClientHello read for its server name.
const MAX_HELLO: usize = 16 * 1024;

/// Reads the client's TLS ClientHello into `hello` and returns the server
/// name it asks for; `None` (and what was read stays in `hello`) when the
/// client sends no name, is not TLS, or is slower than `timeout`.
async fn server_name(
    client: &mut TcpStream,
    hello: &mut Vec<u8>,
    timeout: Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut acceptor = rustls::server::Acceptor::default();
    let until = tokio::time::Instant::now() + timeout;
    let mut fed = 0;
    while hello.len() < MAX_HELLO {
        let n = tokio::time::timeout_at(until, client.read_buf(hello))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        let mut new = &hello[fed..];
        while !new.is_empty() {
            acceptor.read_tls(&mut new).ok()?;
        }
        fed = hello.len();
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return accepted.client_hello().server_name().map(str::to_string);
            }
            Ok(None) => {}
            Err(_) => return None,
        }
    }
    None
}
