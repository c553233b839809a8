//! The app's own port (`Settings::port_from_app`): a Node app run with no
//! port given is served where its `listen()` says, as under PM2's cluster
//! mode, so the master binds only once the first worker has said where.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::{Input, SuperviseError, Supervisor, taken};
use crate::config::Mode;
use crate::os::listen::{ListenError, Listeners};
use crate::proxy;

/// A worker ready by a port probe whose port message has not come: after
/// this, the app is taken to name none and gets `--listen`'s default.
const NAMES_NONE_AFTER: Duration = Duration::from_secs(1);
/// Until then a port that cannot be bound is a failure to start.
const AT_START: Duration = Duration::from_secs(10);

/// What starts serving once the app's port is known.
pub(super) struct AwaitingPort {
    pub(super) proto: proxy::Protocol,
    /// Workers found ready before the port was known; ready once it is.
    pub(super) held: Vec<u64>,
    pub(super) since: Option<Instant>,
    /// The port named could not be bound (after the start): readiness is
    /// no longer held, nor the default bound in its place.
    pub(super) unbound: bool,
}

/// Where the app's `listen(port, host)` asked to be, in herd's terms: an
/// address literal or `localhost` is kept; no host or `::` is every
/// address of both families, as Node (and so PM2's cluster mode) binds a
/// `listen(3000)`: `[::]`, which takes IPv4 clients too; any other host
/// (`0.0.0.0`, Python's `""`, a name) gets herd's default address.
pub(super) fn app_addr(port: u16, host: Option<&str>, default: IpAddr) -> SocketAddr {
    let ip = match host {
        Some("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        None => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        Some(h) => match h.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) if v6.is_unspecified() => IpAddr::V6(v6),
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => default,
        },
    };
    SocketAddr::new(ip, port)
}

/// Binds the app's address; `[::]` on a host without IPv6 falls back to
/// `default` (IPv4 only), as Node's own `listen()` does.
fn bind_app(addr: SocketAddr, default: IpAddr) -> Result<Listeners, ListenError> {
    let bind = |a| Listeners::bind(Mode::Proxy, a, crate::os::cpus::usable());
    match bind(addr) {
        Err(ListenError::Bind { source, .. })
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && matches!(
                    source.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
        {
            bind(SocketAddr::new(default, addr.port()))
        }
        r => r,
    }
}

impl Supervisor {
    /// Starts the proxy threads on the bound listeners.
    pub(super) fn serve(&mut self, proto: proxy::Protocol) -> Result<(), SuperviseError> {
        let addr = self.s.listen;
        let bind_err = |source| ListenError::Bind { addr, source };
        let Some(Listeners::Proxy(socks)) = &self.listeners else {
            return Ok(());
        };
        let mut listeners = Vec::new();
        for l in socks {
            listeners.push(l.try_clone().map_err(bind_err)?);
        }
        proxy::start_threads(
            listeners,
            proto,
            self.active.clone(),
            self.stop_accepting.clone(),
            self.close_idle.clone(),
        )
        .map_err(bind_err)?;
        Ok(())
    }

    /// Holds the readiness of a worker found listening on its private port
    /// while the port is not known yet; false when there is nothing to wait
    /// for. (A worker ready otherwise, by a grace, serves no port yet.)
    pub(super) fn hold_ready(&mut self, epoch: u64) -> bool {
        let Some(w) = self.awaiting_port.as_mut().filter(|w| !w.unbound) else {
            return false;
        };
        w.held.push(epoch);
        w.since.get_or_insert_with(Instant::now);
        true
    }

    /// Once a second: a worker is ready but no port was named.
    pub(super) fn port_named_none(&mut self) {
        if let Some(w) = &self.awaiting_port
            && w.since.is_some_and(|t| t.elapsed() >= NAMES_NONE_AFTER)
        {
            self.on_port(None, None, None);
        }
    }

    /// A worker's app named its port (`asked`, or none: it took `PORT`'s
    /// place): bind there, serve, and let the held workers be ready. A
    /// port that cannot be bound ends the master as at start; later (a
    /// queue consumer reloaded into a server) it is logged, the cluster runs
    /// on without a port, and the next worker to listen tries again.
    pub(super) fn on_port(&mut self, epoch: Option<u64>, asked: Option<u64>, host: Option<&str>) {
        let Some(mut wait) = self.awaiting_port.take() else {
            return;
        };
        let private = epoch.and_then(|e| self.procs.get(&e)).and_then(|p| p.port);
        let named = asked
            .and_then(|a| u16::try_from(a).ok())
            .filter(|&p| Some(p) != private);
        let default = self.s.listen.ip();
        let addr = named.map_or(self.s.listen, |p| app_addr(p, host, default));
        let listeners = match bind_app(addr, default) {
            Ok(l) => l,
            Err(e) if self.started.elapsed() >= AT_START => {
                tracing::error!(
                    "{}; the cluster stays without a port",
                    taken(e, &self.s.name)
                );
                wait.since = None;
                wait.unbound = true;
                let held = std::mem::take(&mut wait.held);
                self.awaiting_port = Some(wait);
                for epoch in held {
                    self.apply(Input::Ready { epoch }, None);
                }
                return;
            }
            Err(e) => {
                let e = taken(e, &self.s.name);
                return self.fail(e);
            }
        };
        self.s.listen = listeners.local_addr().unwrap_or(addr);
        self.listeners = Some(listeners);
        if let Err(e) = self.serve(wait.proto) {
            return self.fail(e);
        }
        tracing::info!(
            "listening on {}{}",
            self.s.listen,
            if named.is_some() {
                ", the port the app's listen() names"
            } else {
                ""
            }
        );
        for epoch in wait.held {
            self.apply(Input::Ready { epoch }, None);
        }
    }

    fn fail(&mut self, e: SuperviseError) {
        self.failed = Some(e);
        self.give_up = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apps_host_is_kept_and_no_host_means_both_families() {
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let at = |h| app_addr(3000, h, any).to_string();
        assert_eq!(at(None), "[::]:3000");
        assert_eq!(at(Some("127.0.0.1")), "127.0.0.1:3000");
        assert_eq!(at(Some("localhost")), "127.0.0.1:3000");
        assert_eq!(at(Some("::")), "[::]:3000");
        assert_eq!(at(Some("0.0.0.0")), "0.0.0.0:3000");
        assert_eq!(at(Some("")), "0.0.0.0:3000");
        assert_eq!(at(Some("::1")), "[::1]:3000");
        assert_eq!(at(Some("example.com")), "0.0.0.0:3000");
    }
}
