//! Binding the public port, once per mode, before any worker starts, so a
//! port in use is reported at once and nothing is left running.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Mode;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "reuseport mode on the socket systemd passed ({0}) needs ReusePort=yes in its .socket unit; or use --mode shared"
    )]
    NotReusePort(SocketAddr),
    #[error("the socket systemd passed (LISTEN_FDS): {0}")]
    Inherited(std::io::Error),
    #[error("systemd passed a socket, but in fork mode herd opens no port; use another --mode")]
    ForkTakesNoSocket,
}

/// Kernel cap applies (`net.core.somaxconn`); ask for plenty.
const BACKLOG: i32 = 4096;

/// The master's listening sockets for one cluster.
pub enum Listeners {
    /// Accepted by the master's proxy threads, one SO_REUSEPORT socket
    /// each, so the kernel spreads connections without a shared accept
    /// queue (non-blocking, for tokio).
    Proxy(Vec<std::net::TcpListener>),
    /// One blocking socket that every worker inherits as fd 3.
    Shared(Socket),
    /// One blocking SO_REUSEPORT socket per worker slot, each inherited as
    /// fd 3 by that slot's worker and kept here across its restarts.
    ReusePort(Vec<Socket>),
    /// Accepted by the master's dispatch thread (non-blocking), whose
    /// connections are passed to workers.
    Dispatch(std::net::TcpListener),
    /// Fork mode: no port; each program binds its own, if any.
    None,
}

impl Listeners {
    /// `slots` is the number of workers (reuseport) or proxy threads (proxy).
    pub fn bind(mode: Mode, addr: SocketAddr, slots: usize) -> Result<Self, ListenError> {
        // SO_REUSEPORT lets another process of this user bind the same port
        // and silently share it. A plain bind first makes "in use" an error.
        let addr = match mode {
            Mode::Proxy | Mode::Reuseport => {
                let probe = socket(addr, false)?;
                local_addr(&probe).unwrap_or(addr)
            }
            Mode::Shared | Mode::Dispatch | Mode::Fork => addr,
        };
        match mode {
            Mode::Proxy => {
                let mut all = Vec::new();
                let mut addr = addr;
                for _ in 0..slots.max(1) {
                    let s = socket(addr, true)?;
                    s.set_nonblocking(true).map_err(|e| err(addr, e))?;
                    addr = local_addr(&s).unwrap_or(addr);
                    all.push(s.into());
                }
                Ok(Listeners::Proxy(all))
            }
            Mode::Shared => Ok(Listeners::Shared(socket(addr, false)?)),
            Mode::Dispatch => {
                let s = socket(addr, false)?;
                s.set_nonblocking(true).map_err(|e| err(addr, e))?;
                Ok(Listeners::Dispatch(s.into()))
            }
            Mode::Reuseport => {
                let first = socket(addr, true)?;
                // With port 0 the kernel picks one; the other slots must join it.
                let addr = local_addr(&first).unwrap_or(addr);
                let mut all = vec![first];
                for _ in 1..slots {
                    all.push(socket(addr, true)?);
                }
                Ok(Listeners::ReusePort(all))
            }
            Mode::Fork => Ok(Listeners::None),
        }
    }

    /// The same as [`Listeners::bind`] on a socket systemd passed
    /// (`LISTEN_FDS`): proxy threads share it, fd modes hand it on, and
    /// reuseport mode joins it with sockets of its own, which the kernel
    /// allows only when it has SO_REUSEPORT (`ReusePort=yes` in the unit).
    pub fn adopt(mode: Mode, sock: Socket, slots: usize) -> Result<Self, ListenError> {
        let addr = local_addr(&sock).unwrap_or(crate::config::DEFAULT_LISTEN);
        let e = |source| err(addr, source);
        // As `socket` does for the sockets herd makes.
        sock.set_tcp_nodelay(true).map_err(e)?;
        match mode {
            Mode::Proxy => {
                sock.set_nonblocking(true).map_err(e)?;
                let first: std::net::TcpListener = sock.into();
                let mut all = Vec::new();
                for _ in 1..slots.max(1) {
                    all.push(first.try_clone().map_err(e)?);
                }
                all.push(first);
                Ok(Listeners::Proxy(all))
            }
            Mode::Shared => {
                sock.set_nonblocking(false).map_err(e)?;
                Ok(Listeners::Shared(sock))
            }
            Mode::Dispatch => {
                sock.set_nonblocking(true).map_err(e)?;
                Ok(Listeners::Dispatch(sock.into()))
            }
            Mode::Reuseport => {
                if !sock.reuse_port().unwrap_or(false) {
                    return Err(ListenError::NotReusePort(addr));
                }
                sock.set_nonblocking(false).map_err(e)?;
                // A herd that ended while steering (see `sys::steer_reuseport`)
                // left its program on the group systemd keeps.
                let _ = crate::os::sys::unsteer_reuseport(sock.as_fd());
                let mut all = vec![sock];
                for _ in 1..slots {
                    all.push(socket(addr, true)?);
                }
                Ok(Listeners::ReusePort(all))
            }
            Mode::Fork => Err(ListenError::ForkTakesNoSocket),
        }
    }

    /// The sockets a master handed itself across `herd upgrade`'s exec, in
    /// the order [`Listeners::fds`] gave them.
    pub fn handed(mode: Mode, socks: Vec<Socket>) -> Result<Self, ListenError> {
        if mode == Mode::Fork {
            return Ok(Listeners::None);
        }
        let addr = socks
            .first()
            .and_then(local_addr)
            .unwrap_or(crate::config::DEFAULT_LISTEN);
        let e = |source| err(addr, source);
        let mut socks = socks;
        if socks.is_empty() {
            return Err(e(std::io::Error::other("no socket was handed over")));
        }
        Ok(match mode {
            Mode::Proxy => Listeners::Proxy(socks.into_iter().map(Into::into).collect()),
            Mode::Shared => Listeners::Shared(socks.swap_remove(0)),
            Mode::Dispatch => Listeners::Dispatch(socks.swap_remove(0).into()),
            Mode::Reuseport => {
                // The new master knows nothing of the old one's steering
                // (see `sys::steer_reuseport`): every slot gets connections.
                let _ = crate::os::sys::unsteer_reuseport(socks[0].as_fd());
                Listeners::ReusePort(socks)
            }
            Mode::Fork => Listeners::None,
        })
    }

    /// Reuseport mode, scaling up: a socket for each of `n` slots, on the
    /// port this cluster already holds (no in-use probe: the port is ours).
    pub fn ensure_reuseport(&mut self, n: usize, fallback: SocketAddr) -> Result<(), ListenError> {
        if let Listeners::ReusePort(socks) = self {
            let addr = socks.first().and_then(local_addr).unwrap_or(fallback);
            while socks.len() < n {
                socks.push(socket(addr, true)?);
            }
        }
        Ok(())
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listeners::Proxy(v) => v.first().and_then(|l| l.local_addr().ok()),
            Listeners::Shared(s) => local_addr(s),
            Listeners::ReusePort(v) => v.first().and_then(local_addr),
            Listeners::Dispatch(l) => l.local_addr().ok(),
            Listeners::None => None,
        }
    }
}

/// Fd modes: listens on `s` again if it stopped, as a `shutdown()` by a
/// worker holding it makes it (see `supervise::steer`). `Ok(true)`: it had.
pub fn relisten(s: &Socket) -> std::io::Result<bool> {
    if crate::os::sys::accept_queue(s.as_fd()).is_some() {
        return Ok(false);
    }
    s.listen(BACKLOG)?;
    Ok(true)
}

/// Reuseport mode: every socket of the group stops listening, then each
/// listens again in the order given, which makes that the group's order
/// (see `supervise::steer`). What was queued on them is reset.
pub fn listen_again_in_order(socks: &[Socket]) -> std::io::Result<()> {
    for s in socks {
        // One a worker shut down already says ENOTCONN: it is out too.
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    // Each one that can listens, whatever another says.
    let mut said = Ok(());
    for s in socks {
        if let Err(e) = s.listen(BACKLOG) {
            said = said.and(Err(e));
        }
    }
    said
}

fn local_addr(s: &Socket) -> Option<SocketAddr> {
    s.local_addr().ok()?.as_socket()
}

fn err(addr: SocketAddr, source: std::io::Error) -> ListenError {
    ListenError::Bind { addr, source }
}

fn socket(addr: SocketAddr, reuse_port: bool) -> Result<Socket, ListenError> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| err(addr, e))?;
    s.set_reuse_address(true).map_err(|e| err(addr, e))?;
    if reuse_port {
        s.set_reuse_port(true).map_err(|e| err(addr, e))?;
    }
    // Accepted sockets inherit it, in the master and in workers: no
    // setsockopt per connection, and a worker that writes an answer in two
    // pieces without setting it itself (uvicorn given fd 3, which it takes
    // for a Unix socket) does not wait on a delayed ACK, 40 ms per answer.
    // Node, Go and nginx set it on every connection anyway.
    s.set_tcp_nodelay(true).map_err(|e| err(addr, e))?;
    s.bind(&addr.into()).map_err(|e| err(addr, e))?;
    s.listen(BACKLOG).map_err(|e| err(addr, e))?;
    Ok(s)
}

// The macro calls itself and its helpers unqualified.
use nix::{setsockopt_impl, sockopt_impl};
sockopt_impl!(
    /// Linux's `TCP_DEFER_ACCEPT`, which nix does not name.
    TcpDeferAccept,
    SetOnly,
    libc::IPPROTO_TCP,
    libc::TCP_DEFER_ACCEPT,
    libc::c_int
);

/// For a protocol where the client speaks first (`client_first`: HTTP,
/// with or without TLS), `TCP_DEFER_ACCEPT`: the kernel queues a connection
/// for `accept` only once its first bytes arrived, so accepting it and
/// reading its request take one wake-up instead of two (nginx's
/// `listen ... deferred`). A client that connects and says nothing is
/// accepted after about a second. Off otherwise (TCP mode, where the server
/// may speak first; a socket handed over with it set).
///
/// HAProxy also turns `TCP_QUICKACK` off on its HTTP listeners (one ACK
/// fewer per connection); herd does not: a client that writes its request
/// in pieces with Nagle on (many do) would then wait 40 ms or more for a
/// delayed ACK.
pub fn client_speaks_first(l: &std::net::TcpListener, client_first: bool) -> std::io::Result<()> {
    let secs: libc::c_int = if client_first { 1 } else { 0 };
    nix::sys::socket::setsockopt(l, TcpDeferAccept, &secs).map_err(std::io::Error::from)
}

/// Keep-alive probes on socket `s`; on a listener, on every connection
/// accepted from it (accepted sockets inherit them: no syscall per
/// connection). A tunnel (TCP mode, WebSocket) has no idle time-out, as a
/// client may rightly stay silent for hours; but one whose peer vanished
/// without a FIN (a host gone, a NAT that forgot the flow) would hold its
/// descriptors, and the connection at its other end, for good. The kernel
/// probes a connection silent for [`PROBE_IDLE`] and resets it after
/// [`PROBE_COUNT`] probes unanswered [`PROBE_EVERY`] apart; a live peer's
/// kernel answers them, whatever its application does.
pub fn probe_idle_peers(s: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(PROBE_IDLE)
        .with_interval(PROBE_EVERY)
        .with_retries(PROBE_COUNT);
    socket2::SockRef::from(s).set_tcp_keepalive(&ka)
}

pub const PROBE_IDLE: std::time::Duration = std::time::Duration::from_secs(120);
pub const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);
pub const PROBE_COUNT: u32 = 4;

/// What an accept loop does when `accept` fails for want of resources
/// (EMFILE, ENFILE, ENOBUFS): it waits [`AcceptErrors::BACKOFF`] instead of
/// spinning, and warns at most once per [`AcceptErrors::WARN_EVERY`] with how
/// many failed since, rather than about 50 lines a second for as long as
/// descriptors run short (nginx also waits, 500 ms, before it accepts again).
/// Its count and period also throttle the proxy's warnings of connects to
/// backends failing so (`proxy::own_shortage`), and of backends' failures
/// (`proxy::Told`).
#[derive(Debug, Default)]
pub struct AcceptErrors {
    warned_at: Option<std::time::Instant>,
    failed: u64,
}

impl AcceptErrors {
    /// For a `static` (`Default` is not `const`).
    pub const fn new() -> AcceptErrors {
        AcceptErrors {
            warned_at: None,
            failed: 0,
        }
    }

    pub const BACKOFF: std::time::Duration = std::time::Duration::from_millis(20);
    pub const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Counts a failure at `now`; `Some(n)` when it is time to warn about
    /// the `n` failures since the last warning (this one included).
    pub fn failed(&mut self, now: std::time::Instant) -> Option<u64> {
        self.failed += 1;
        let due = self
            .warned_at
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::WARN_EVERY);
        if !due {
            return None;
        }
        self.warned_at = Some(now);
        Some(std::mem::take(&mut self.failed))
    }

    /// Counts `e` and warns if due.
    pub fn warn(&mut self, e: &std::io::Error) {
        match self.failed(std::time::Instant::now()) {
            Some(1) => tracing::warn!("accept failed: {e}"),
            Some(n) => tracing::warn!("accept failed {n} times since the last warning: {e}"),
            None => {}
        }
    }
}

/// How many of 60 new connections each socket of a reuseport group got.
#[cfg(test)]
pub(crate) fn spread(socks: &[Socket]) -> Vec<usize> {
    let addr = local_addr(&socks[0]).unwrap();
    let _clients: Vec<_> = (0..60)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let got = |s: &Socket| {
        s.set_nonblocking(true).unwrap();
        std::iter::from_fn(|| s.accept().ok()).count()
    };
    // The handshakes are done when connect returns (loopback).
    socks.iter().map(got).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn accept_failures_warn_once_per_period_with_a_count() {
        let mut a = AcceptErrors::default();
        let t0 = Instant::now();
        assert_eq!(a.failed(t0), Some(1));
        for ms in 1..500 {
            assert_eq!(a.failed(t0 + Duration::from_millis(ms * 20)), None);
        }
        assert_eq!(a.failed(t0 + AcceptErrors::WARN_EVERY), Some(500));
        assert_eq!(a.failed(t0 + AcceptErrors::WARN_EVERY), None);
    }

    #[test]
    fn steering_gives_new_connections_to_the_named_sockets_only_until_a_new_master_ends_it() {
        let Listeners::ReusePort(socks) =
            Listeners::bind(Mode::Reuseport, "127.0.0.1:0".parse().unwrap(), 3).unwrap()
        else {
            unreachable!()
        };
        crate::os::sys::steer_reuseport(socks[0].as_fd(), &[0, 1]).unwrap();
        let got = spread(&socks);
        assert_eq!(got[2], 0, "{got:?}");
        assert!(got[0] > 0 && got[1] > 0, "{got:?}");
        // Any of the group's sockets sets its program; any subset.
        crate::os::sys::steer_reuseport(socks[2].as_fd(), &[0, 2]).unwrap();
        let got = spread(&socks);
        assert_eq!(got[1], 0, "{got:?}");
        assert!(got[0] > 0 && got[2] > 0, "{got:?}");
        crate::os::sys::steer_reuseport(socks[1].as_fd(), &[2]).unwrap();
        assert_eq!(spread(&socks), [0, 0, 60]);
        assert!(crate::os::sys::steer_reuseport(socks[1].as_fd(), &[]).is_err());
        // An upgraded master is handed the sockets with the old one's program.
        let Listeners::ReusePort(socks) = Listeners::handed(Mode::Reuseport, socks).unwrap() else {
            unreachable!()
        };
        let got = spread(&socks);
        assert!(got.iter().all(|n| *n > 0), "{got:?}");
        // Nothing to end is not an error.
        crate::os::sys::unsteer_reuseport(socks[1].as_fd()).unwrap();
    }
}
