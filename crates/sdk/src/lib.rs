//! Worker-side helpers for programs run by herd.
//!
//! A herd worker is any program; this crate only saves Rust workers from
//! re-implementing the contract herd documents in its README: where the
//! listening socket comes from (`LISTEN_FDS` or `PORT`), how to say
//! "ready" (systemd's `sd_notify` datagram on `NOTIFY_SOCKET`), and the
//! message channel to the master (`HERD_IPC_FD`), and, in dispatch mode,
//! the connections the master hands over (`HERD_DISPATCH_FD`); and
//! [`Drain`], which lets keep-alive clients go without an error on stop.
//!
//! `unsafe` is denied everywhere but in the one line that adopts the
//! channel's inherited fd (`fd` module).
#![deny(unsafe_code)]

mod channel;
mod dispatch;
mod drain;
mod fd;

pub use channel::{Channel, Incoming, channel};
#[cfg(feature = "tokio")]
pub use dispatch::AsyncDispatch;
pub use dispatch::{ConnGuard, Dispatch, dispatch};
pub use drain::{Drain, IDLE_GRACE};

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;

/// Names of the environment variables that make up the worker contract.
///
/// The master sets them and workers read them, so both sides take the
/// names from here.
pub mod env {
    /// Stable slot number of this worker, `0..HERD_WORKERS`, kept across restarts.
    pub const WORKER_ID: &str = "HERD_WORKER_ID";
    /// PM2's name for the worker id, exported too so PM2-aware apps keep working.
    pub const NODE_APP_INSTANCE: &str = "NODE_APP_INSTANCE";
    /// How many worker slots the cluster has.
    pub const WORKERS: &str = "HERD_WORKERS";
    /// The cluster's name.
    pub const NAME: &str = "HERD_NAME";
    /// With `--redis`: this host's name, as other hosts address its workers (`HOST/ID`).
    pub const HOST: &str = "HERD_HOST";
    /// The private loopback port to serve on (proxy mode).
    pub const PORT: &str = "PORT";
    /// Proxy mode: the same private port, also set when `PORT` is not (a
    /// Node app served on the port its code names, whose `PORT` stays
    /// unset as under PM2; herd's Node preload listens here for it).
    pub const PRIVATE_PORT: &str = "HERD_PORT";
    /// Proxy mode: the path of a Unix socket to serve on instead of `PORT`
    /// (the worker binds it); herd uses whichever the worker listens on,
    /// and with `--worker-socket unix` only this.
    pub const SOCKET: &str = "HERD_SOCKET";
    /// systemd's readiness socket (`READY=1`).
    pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
    /// systemd socket activation: number of passed fds, starting at fd 3.
    pub const LISTEN_FDS: &str = "LISTEN_FDS";
    /// systemd socket activation: the pid the fds are meant for.
    pub const LISTEN_PID: &str = "LISTEN_PID";
    /// systemd socket activation: colon-separated names of the passed fds.
    pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
    /// The fd of the worker's message channel to the master.
    pub const IPC_FD: &str = "HERD_IPC_FD";
    /// Dispatch mode: the fd of the socket connections arrive on.
    pub const DISPATCH_FD: &str = "HERD_DISPATCH_FD";
    /// Dispatch mode with `least-conn`: report open-connection counts.
    pub const REPORT_OPEN: &str = "HERD_REPORT_OPEN";
    /// How the cluster shares its port: proxy, shared, reuseport or dispatch.
    pub const MODE: &str = "HERD_MODE";
    /// `1` when no signal follows the `shutdown` message (`--kill-signal
    /// none`): the worker exits by itself, or is killed after the time-out.
    pub const SHUTDOWN_MESSAGE: &str = "HERD_SHUTDOWN_MESSAGE";
    /// The cluster's public address (`HOST:PORT`).
    pub const LISTEN: &str = "HERD_LISTEN";
}

/// Why a worker could not get its listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("LISTEN_FDS is set but fd 3 is not a TCP listener: {0}")]
    InheritedFd(std::io::Error),
    #[error("PORT={0:?} is not a port number")]
    BadPort(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    BindUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// This worker's slot number, if it runs under herd.
pub fn worker_id() -> Option<u32> {
    std::env::var(env::WORKER_ID).ok()?.parse().ok()
}

/// The listening socket this worker should serve on.
///
/// Prefers an inherited socket (fd 3, `shared` and `reuseport` modes, or
/// systemd); otherwise binds `PORT` — on loopback when run by herd, since the
/// master is then the only client — or `fallback_port` on all interfaces.
/// The returned listener is blocking, as std creates them.
pub fn listener(fallback_port: u16) -> Result<TcpListener, Error> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0
        && let Some(l) = fds.take_tcp_listener(0).map_err(Error::InheritedFd)?
    {
        return Ok(l);
    }
    let under_herd = std::env::var_os(env::WORKER_ID).is_some();
    let port = match std::env::var(env::PORT) {
        Ok(p) => p.trim().parse::<u16>().map_err(|_| Error::BadPort(p))?,
        Err(_) => fallback_port,
    };
    let ip = if under_herd {
        [127, 0, 0, 1]
    } else {
        [0, 0, 0, 0]
    };
    let addr = SocketAddr::from((ip, port));
    TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })
}

/// The Unix socket to serve on instead, when herd offers one (proxy mode,
/// `HERD_SOCKET`; unless `--worker-socket tcp`): `None` otherwise. Try it
/// before [`listener`]; a worker that serves there skips the loopback TCP
/// path between herd and itself.
pub fn unix_listener() -> Result<Option<std::os::unix::net::UnixListener>, Error> {
    let Some(path) = std::env::var_os(env::SOCKET) else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    std::os::unix::net::UnixListener::bind(&path)
        .map(Some)
        .map_err(|source| Error::BindUnix { path, source })
}

/// Sends one `sd_notify` message (e.g. `"READY=1"`); a no-op without `NOTIFY_SOCKET`.
///
/// Supports filesystem paths and Linux abstract names (`@name`), like libsystemd.
pub fn notify(state: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os(env::NOTIFY_SOCKET) else {
        return Ok(());
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(())
}

/// Tells herd (or systemd) this worker is ready to serve; in dispatch
/// mode, once [`dispatch()`] was taken, also on the dispatch socket.
pub fn ready() -> std::io::Result<()> {
    dispatch::say_listening()?;
    notify("READY=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("herd-sdk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        // `set_var` is `unsafe` in edition 2024, so the sender is a child
        // test process given NOTIFY_SOCKET in its environment.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::child_sends_ready",
                "--ignored",
                "--nocapture",
            ])
            .env(env::NOTIFY_SOCKET, &path)
            .status()
            .unwrap();
        assert!(status.success());
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[ignore = "a helper: notify_reaches_a_path_socket runs it with NOTIFY_SOCKET set"]
    fn child_sends_ready() {
        assert!(std::env::var_os(env::NOTIFY_SOCKET).is_some());
        ready().unwrap();
    }
}
