//! A client socket that joins the event loop only when it must wait.
//!
//! With the deferred accept, a new HTTP connection is accepted with its
//! request already queued, and a `Connection: close` request is often read,
//! answered and closed without ever waiting on the client. Registering such
//! a socket with epoll costs two `epoll_ctl` (add, and tokio's delete before
//! the close) and an allocation, about 7% of the proxy's CPU under new
//! connections. [`LazyStream`] reads and writes the bare non-blocking
//! socket until an operation would block, and registers it then.
//!
//! [`Listener`] accepts through mio, whose accepted sockets are not
//! registered yet (tokio's listener registers each).
//!
//! `unsafe` here: the fd is owned by the bare socket until the registration,
//! then by the registered one; one of them closes it, never both. And the
//! listener's registration, which tokio marks `unsafe` for the fd's sake.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, Write};
use std::mem::{ManuallyDrop, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

/// A listening socket whose accepted connections are [`LazyStream`]s.
pub struct Listener(AsyncFd<mio::net::TcpListener>);

impl Listener {
    /// Registers `l` (non-blocking) with this thread's runtime.
    pub fn new(l: std::net::TcpListener) -> io::Result<Listener> {
        let l = mio::net::TcpListener::from_std(l);
        // SAFETY: the mio listener owns its fd, which stays open and the
        // same for as long as the `AsyncFd` owns the listener.
        let fd = unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) };
        fd.map(Listener).map_err(|e| e.into_parts().1)
    }

    /// The next connection (non-blocking, close-on-exec), and its peer.
    pub async fn accept(&self) -> io::Result<(LazyStream, std::net::SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// [`Listener::accept`] as a poll, for a loop that waits on more.
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(LazyStream, std::net::SocketAddr)>> {
        loop {
            let mut ready = std::task::ready!(self.0.poll_read_ready(cx))?;
            if let Ok(r) = ready.try_io(|l| l.get_ref().accept()) {
                return Poll::Ready(r.map(|(s, peer)| (LazyStream::new(s), peer)));
            }
        }
    }
}

/// A connected, non-blocking TCP socket, registered with the runtime's
/// reactor at the first wait. Once registered, everything goes through
/// tokio (whose cached readiness must see every `WouldBlock`).
pub struct LazyStream {
    /// Owns the fd while `reg` is unset; never dropped once it is set.
    raw: ManuallyDrop<std::net::TcpStream>,
    /// `Some`: registered, and owns the fd. `None`: registration failed,
    /// and the fd is closed (tokio drops what it could not register).
    reg: OnceLock<Option<TcpStream>>,
    /// The last bare read emptied the receive queue: the next read says
    /// "would block" without asking the kernel.
    drained: AtomicBool,
}

fn gone() -> io::Error {
    io::Error::other("the connection could not join the event loop")
}

impl LazyStream {
    /// `s` must be non-blocking (mio's accept makes it so).
    fn new(s: mio::net::TcpStream) -> LazyStream {
        LazyStream {
            raw: ManuallyDrop::new(std::net::TcpStream::from(s)),
            reg: OnceLock::new(),
            drained: AtomicBool::new(false),
        }
    }

    /// The registered socket, registering it now if it is not yet.
    pub fn registered(&self) -> io::Result<&TcpStream> {
        self.reg
            .get_or_init(|| {
                // SAFETY: the fd is open (`reg` was unset, so `raw` owns it).
                // From here on `reg` owns it and `raw` is never dropped; if
                // the registration fails tokio closes it and `reg` says so.
                let s = unsafe { std::net::TcpStream::from_raw_fd(self.raw.as_raw_fd()) };
                TcpStream::from_std(s).ok()
            })
            .as_ref()
            .ok_or_else(gone)
    }

    /// Whether it joined an event loop (a thread's: it stays on that thread).
    pub fn is_registered(&self) -> bool {
        self.reg.get().is_some()
    }

    /// As [`registered`](Self::registered), mutably (to split it).
    pub fn registered_mut(&mut self) -> io::Result<&mut TcpStream> {
        self.registered()?;
        match self.reg.get_mut() {
            Some(Some(s)) => Ok(s),
            _ => Err(gone()),
        }
    }

    /// The registered socket, for paths that hand it on (HTTP/2, TLS).
    pub fn into_tokio(mut self) -> io::Result<TcpStream> {
        self.registered()?;
        let s = self.reg.take().flatten();
        // `reg` owned the fd and `s` owns it now; `raw` must not close it.
        std::mem::forget(self);
        s.ok_or_else(gone)
    }

    /// The address the client connected to.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self.reg.get() {
            None => self.raw.local_addr(),
            Some(Some(s)) => s.local_addr(),
            Some(None) => Err(gone()),
        }
    }

    fn bare(&self) -> Option<&std::net::TcpStream> {
        match self.reg.get() {
            None => Some(&self.raw),
            Some(_) => None,
        }
    }

    /// One `send` with `flags` (and MSG_NOSIGNAL).
    pub fn try_send_flags(&self, b: &[u8], flags: libc::c_int) -> io::Result<usize> {
        let flags = flags | libc::MSG_NOSIGNAL;
        match self.bare() {
            Some(raw) => socket2::SockRef::from(raw).send_with_flags(b, flags),
            None => {
                let s = self.registered()?;
                s.try_io(Interest::WRITABLE, || {
                    socket2::SockRef::from(s).send_with_flags(b, flags)
                })
            }
        }
    }

    /// Looks at what the client sent without taking it, until `enough`
    /// says the bytes so far suffice, `buf` is full, or the client closed
    /// (`Ok(0)`); the bytes peeked are in `buf`.
    pub async fn peek_until(
        &self,
        buf: &mut [u8],
        mut enough: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<usize> {
        // `raw` holds the fd registered or not (it never closes it once
        // registered). Too few bytes read as "would block", which clears a
        // registered socket's readiness: the next wait is for more.
        let mut peek = || -> io::Result<usize> {
            let n = self.raw.peek(buf)?;
            if n == 0 || n == buf.len() || enough(&buf[..n]) {
                Ok(n)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        };
        if self.bare().is_some() {
            match peek() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
        }
        let s = self.registered()?;
        loop {
            s.readable().await?;
            match s.try_io(Interest::READABLE, &mut peek) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return done,
            }
        }
    }

    /// Reads `buf.len()` bytes known to be queued (peeked at already).
    pub fn read_queued(&self, buf: &mut [u8]) -> io::Result<()> {
        if matches!(self.reg.get(), Some(None)) {
            return Err(gone());
        }
        // Through `raw`, registered or not: the bytes are there, so no
        // readiness is consumed.
        std::io::Read::read_exact(&mut &*self.raw, buf)
    }

    /// Closes the sending side (the FIN goes out after what is queued).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self.reg.get() {
            None => socket2::SockRef::from(&*self.raw).shutdown(std::net::Shutdown::Write),
            Some(Some(s)) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
            Some(None) => Err(gone()),
        }
    }

    #[cfg(test)]
    pub fn new_for_test(s: mio::net::TcpStream) -> LazyStream {
        LazyStream::new(s)
    }
}

/// What the proxy's relay needs of a socket: the client's
/// ([`LazyStream`]) and a backend's (tokio's) alike.
pub trait Socket {
    /// One read appended to `v`'s spare room; `Ok(0)` is EOF.
    fn try_read_buf(&self, v: &mut Vec<u8>) -> io::Result<usize>;
    /// The receive queue is known to be empty (a read came back short): the
    /// next read waits for readiness instead of asking the kernel.
    fn forget_readable(&self);
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_write(&self, b: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, b: &[IoSlice<'_>]) -> io::Result<usize>;
    /// One `send` with `MSG_MORE`: the kernel may hold the bytes to join
    /// them with the next (for about 200 ms at most).
    fn try_write_more(&self, b: &[u8]) -> io::Result<usize>;
    /// Sends at once what `MSG_MORE` held back: setting `TCP_NODELAY` (on
    /// already) pushes the pending segment out.
    fn push_held(&self) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn try_read_buf(&self, v: &mut Vec<u8>) -> io::Result<usize> {
        TcpStream::try_read_buf(self, v)
    }
    fn forget_readable(&self) {
        let _ = self.try_io(Interest::READABLE, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
    fn try_write(&self, b: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, b)
    }
    fn try_write_vectored(&self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, b)
    }
    fn try_write_more(&self, b: &[u8]) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(self).send_with_flags(b, libc::MSG_MORE | libc::MSG_NOSIGNAL)
        })
    }
    fn push_held(&self) -> io::Result<()> {
        self.set_nodelay(true)
    }
}

impl Socket for LazyStream {
    fn try_read_buf(&self, v: &mut Vec<u8>) -> io::Result<usize> {
        let Some(raw) = self.bare() else {
            return self.registered()?.try_read_buf(v);
        };
        if self.drained.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let spare: &mut [MaybeUninit<u8>] = v.spare_capacity_mut();
        let n = socket2::SockRef::from(raw).recv(spare)?;
        // SAFETY: `recv` initialised the first `n` bytes of the spare room.
        unsafe { v.set_len(v.len() + n) };
        Ok(n)
    }

    fn forget_readable(&self) {
        match self.reg.get() {
            None => self.drained.store(true, Ordering::Relaxed),
            Some(Some(s)) => s.forget_readable(),
            Some(None) => {}
        }
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.registered() {
            Ok(s) => s.poll_read_ready(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.registered() {
            Ok(s) => s.poll_write_ready(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn try_write(&self, b: &[u8]) -> io::Result<usize> {
        match self.bare() {
            // std's `send` has MSG_NOSIGNAL.
            Some(mut raw) => raw.write(b),
            None => self.registered()?.try_write(b),
        }
    }

    fn try_write_vectored(&self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.bare() {
            Some(mut raw) => raw.write_vectored(b),
            None => self.registered()?.try_write_vectored(b),
        }
    }

    fn try_write_more(&self, b: &[u8]) -> io::Result<usize> {
        self.try_send_flags(b, libc::MSG_MORE)
    }

    fn push_held(&self) -> io::Result<()> {
        match self.reg.get() {
            None => socket2::SockRef::from(&*self.raw).set_tcp_nodelay(true),
            Some(Some(s)) => s.set_nodelay(true),
            Some(None) => Err(gone()),
        }
    }
}

impl Drop for LazyStream {
    fn drop(&mut self) {
        if self.reg.get().is_none() {
            // SAFETY: `reg` is unset, so `raw` still owns the fd; dropped once.
            unsafe { ManuallyDrop::drop(&mut self.raw) };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::{LazyStream, Listener, Socket};

    async fn pair() -> (LazyStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let l = Listener::new(l).unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (s, peer) = l.accept().await.unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        (s, c)
    }

    async fn readable(s: &LazyStream) {
        let ready = std::future::poll_fn(|cx| s.poll_read_ready(cx));
        tokio::time::timeout(Duration::from_secs(5), ready)
            .await
            .unwrap()
            .unwrap();
    }

    fn read_until_would_block(s: &LazyStream, v: &mut Vec<u8>) {
        loop {
            match s.try_read_buf(v) {
                Ok(0) => panic!("unexpected EOF"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn what_never_waits_never_joins_the_event_loop() {
        let (s, mut c) = pair().await;
        c.write_all(b"ping").unwrap();
        // On loopback the bytes are queued at the peer when the write returns.
        let mut v = Vec::with_capacity(64);
        assert_eq!(s.try_read_buf(&mut v).unwrap(), 4);
        assert_eq!(v, b"ping");
        assert_eq!(s.try_write(b"pong").unwrap(), 4);
        s.shutdown_write().unwrap();
        assert!(!s.is_registered());
        drop(s);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pong", "answer and EOF reach the peer");
    }

    #[tokio::test]
    async fn a_wait_registers_and_sees_what_came_meanwhile() {
        let (s, mut c) = pair().await;
        let mut v = Vec::with_capacity(64);
        read_until_would_block(&s, &mut v);
        assert!(v.is_empty());
        // Written before the registration: epoll reports it when the socket
        // is added, so the wait below still ends.
        c.write_all(b"late").unwrap();
        readable(&s).await;
        assert!(s.is_registered());
        read_until_would_block(&s, &mut v);
        assert_eq!(v, b"late");
        // Registered, reads go through tokio: a wait begun before new bytes
        // ends when they come.
        let mut wait = std::pin::pin!(std::future::poll_fn(|cx| s.poll_read_ready(cx)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        c.write_all(b"again").unwrap();
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap()
            .unwrap();
        read_until_would_block(&s, &mut v);
        assert_eq!(v, b"lateagain");
    }

    #[tokio::test]
    async fn a_drained_queue_is_not_read_again_until_ready() {
        let (s, mut c) = pair().await;
        s.forget_readable();
        // On loopback the byte is queued at the peer when the write returns.
        c.write_all(b"x").unwrap();
        let mut v = Vec::with_capacity(8);
        let e = s.try_read_buf(&mut v).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        readable(&s).await;
        read_until_would_block(&s, &mut v);
        assert_eq!(v, b"x");
    }

    #[tokio::test]
    async fn handed_on_it_keeps_the_connection() {
        let (s, mut c) = pair().await;
        c.write_all(b"h2").unwrap();
        let mut t = s.into_tokio().unwrap();
        let mut b = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut t, &mut b)
            .await
            .unwrap();
        assert_eq!(&b, b"h2");
        tokio::io::AsyncWriteExt::write_all(&mut t, b"ok")
            .await
            .unwrap();
        drop(t);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ok");
    }
}
