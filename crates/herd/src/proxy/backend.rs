//! A connection to a backend: TCP, or a Unix socket for a worker that
//! serves on one (`--worker-socket`). On loopback a Unix stream
//! skips TCP's whole path (segments, ACKs, timers, congestion state): the
//! kernel's work per request, most of the proxy's CPU, is smaller.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

use crate::os::diag::{DiagError, ServerEnd};
use crate::os::lazy::Socket;
use crate::upstream::Target;

pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connects to `t` (its Unix socket if it has one), within `timeout`.
pub async fn connect(t: &Target, timeout: Duration) -> io::Result<Conn> {
    let mut full = false;
    let work = async {
        match &t.unix {
            Some(path) => crate::os::connect_unix(path, &mut full)
                .await
                .map(Conn::Unix),
            None => {
                let s = TcpStream::connect(t.addr).await?;
                let _ = s.set_nodelay(true);
                Ok(Conn::Tcp(s))
            }
        }
    };
    let done = tokio::time::timeout(timeout, work).await;
    done.map_err(|_| {
        let why = if full {
            " (its accept queue stayed full)"
        } else {
            ""
        };
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}{why}"),
        )
    })?
}

impl Conn {
    /// The server end of this connection to `t`, from the socket table:
    /// whether the server has accepted it and read what herd sent. `None`
    /// when it is not on this host or gone.
    pub fn server_end(&self, t: &Target) -> Result<Option<ServerEnd>, DiagError> {
        match self {
            Conn::Tcp(s) => match s.local_addr() {
                Ok(ours) => crate::os::diag::server_end(ours, t.addr),
                Err(_) => Ok(None),
            },
            Conn::Unix(s) => crate::os::diag::unix_server_end(s.as_fd()),
        }
    }

    pub fn sock(&self) -> socket2::SockRef<'_> {
        match self {
            Conn::Tcp(s) => socket2::SockRef::from(s),
            Conn::Unix(s) => socket2::SockRef::from(s),
        }
    }

    /// Acknowledges at once what came (`TCP_QUICKACK`); a Unix socket has
    /// no delayed ACK to cut short.
    pub fn quickack(&self) {
        if let Conn::Tcp(s) = self {
            let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
        }
    }

    pub fn try_read(&self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.try_read(b),
            Conn::Unix(s) => s.try_read(b),
        }
    }
}

impl Socket for Conn {
    fn try_read_buf(&self, v: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.try_read_buf(v),
            Conn::Unix(s) => s.try_read_buf(v),
        }
    }
    fn forget_readable(&self) {
        let none = || Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock));
        let _ = match self {
            Conn::Tcp(s) => s.try_io(Interest::READABLE, none),
            Conn::Unix(s) => s.try_io(Interest::READABLE, none),
        };
    }
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Conn::Tcp(s) => s.poll_read_ready(cx),
            Conn::Unix(s) => s.poll_read_ready(cx),
        }
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Conn::Tcp(s) => s.poll_write_ready(cx),
            Conn::Unix(s) => s.poll_write_ready(cx),
        }
    }
    fn try_write(&self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.try_write(b),
            Conn::Unix(s) => s.try_write(b),
        }
    }
    fn try_write_vectored(&self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.try_write_vectored(b),
            Conn::Unix(s) => s.try_write_vectored(b),
        }
    }
    fn try_write_more(&self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => Socket::try_write_more(s, b),
            // Nothing to join: a Unix stream sends no segments.
            Conn::Unix(s) => s.try_write(b),
        }
    }
    fn push_held(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nodelay(true),
            Conn::Unix(_) => Ok(()),
        }
    }
}
