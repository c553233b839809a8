//! Dispatch mode, worker side: the connections the master accepted arrive
//! on the Unix socket at `HERD_DISPATCH_FD`, one fd (`SCM_RIGHTS`) per
//! line `{"cmd":"NODE_HANDLE",…}`. Each is answered with
//! `{"cmd":"NODE_HANDLE_ACK"}` as it is taken (the master keeps its copy
//! until then, so a worker that dies first loses nothing), and, when the
//! master balances by least-conn (`HERD_REPORT_OPEN=1`), closing one sends
//! `{"herd":"open","open":N}`.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

const ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";
const LISTENING: &[u8] = b"{\"herd\":\"listening\"}\n";

static TAKEN: AtomicBool = AtomicBool::new(false);
/// The taken socket, so that [`crate::ready`] also says `listening` on it.
static READY_TO: std::sync::OnceLock<UnixStream> = std::sync::OnceLock::new();

/// Says `listening` on the dispatch socket if this worker took it.
pub(crate) fn say_listening() -> io::Result<()> {
    match READY_TO.get() {
        Some(s) => (&*s).write_all(LISTENING),
        None => Ok(()),
    }
}

/// The dispatch socket, if this worker runs in herd's dispatch mode;
/// `None` otherwise or on a second call.
pub fn dispatch() -> io::Result<Option<Dispatch>> {
    let Some(owned) = crate::fd::take_inherited(crate::env::DISPATCH_FD, &TAKEN) else {
        return Ok(None);
    };
    let report = std::env::var(crate::env::REPORT_OPEN).is_ok_and(|v| v == "1");
    let sock = UnixStream::from(owned);
    let _ = READY_TO.set(sock.try_clone()?);
    Dispatch::new(sock, report).map(Some)
}

/// Keep it as long as its connection is open: dropping it counts the
/// connection closed (least-conn balancing).
#[derive(Debug)]
pub struct ConnGuard(Arc<Counter>);

#[derive(Debug)]
struct Counter {
    open: AtomicU32,
    /// For reports; `None` when the master does not want them.
    report: Option<UnixStream>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let n = self.0.open.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        if let Some(s) = &self.0.report {
            // A hint: if the socket is full the next report corrects it.
            let _ = (&*s).write_all(format!("{{\"herd\":\"open\",\"open\":{n}}}\n").as_bytes());
        }
    }
}

/// Lines and fds read so far, paired up in order.
#[derive(Debug)]
struct Inbox {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    cmsg: Vec<u8>,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            buf: Vec::with_capacity(4096),
            fds: VecDeque::new(),
            cmsg: nix::cmsg_space!([RawFd; 8]),
        }
    }

    /// The next complete connection line's fd, if one has arrived.
    fn next(&mut self) -> Option<OwnedFd> {
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let is_conn = self.buf[..nl].windows(11).any(|w| w == b"NODE_HANDLE");
            self.buf.drain(..=nl);
            if is_conn && let Some(fd) = self.fds.pop_front() {
                return Some(fd);
            }
        }
        None
    }

    /// One `recvmsg`; `Ok(0)` at end of stream.
    fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut self.cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let n = msg.bytes;
        let mut got = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    got.extend(fds);
                }
            }
        }
        for raw in got {
            self.fds.push_back(crate::fd::adopt_received(raw));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

/// The worker's end of the dispatch socket (blocking).
#[derive(Debug)]
pub struct Dispatch {
    sock: UnixStream,
    inbox: Inbox,
    counter: Arc<Counter>,
}

impl Dispatch {
    fn new(sock: UnixStream, report: bool) -> io::Result<Dispatch> {
        let report = if report {
            Some(sock.try_clone()?)
        } else {
            None
        };
        Ok(Dispatch {
            sock,
            inbox: Inbox::new(),
            counter: Arc::new(Counter {
                open: AtomicU32::new(0),
                report,
            }),
        })
    }

    /// Waits for the next connection. `ConnectionAborted` once the master
    /// has closed the socket (it is stopping this worker).
    pub fn accept(&mut self) -> io::Result<(TcpStream, ConnGuard)> {
        loop {
            if let Some(fd) = self.inbox.next() {
                return self.take(fd);
            }
            if self.inbox.recv(self.sock.as_raw_fd())? == 0 {
                return Err(closed());
            }
        }
    }

    fn take(&mut self, fd: OwnedFd) -> io::Result<(TcpStream, ConnGuard)> {
        self.counter.open.fetch_add(1, Ordering::AcqRel);
        let guard = ConnGuard(self.counter.clone());
        (&self.sock).write_all(ACK)?;
        Ok((TcpStream::from(fd), guard))
    }

    /// Tells the master this worker is ready to take connections
    /// ([`crate::ready`] does this too).
    pub fn listening(&self) -> io::Result<()> {
        (&self.sock).write_all(LISTENING)
    }

    /// For tokio: the same socket, read without blocking a thread.
    #[cfg(feature = "tokio")]
    pub fn into_async(self) -> io::Result<AsyncDispatch> {
        self.sock.set_nonblocking(true)?;
        Ok(AsyncDispatch {
            sock: tokio::net::UnixStream::from_std(self.sock)?,
            inbox: self.inbox,
            counter: self.counter,
        })
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "herd closed the dispatch socket",
    )
}

/// [`Dispatch`] for tokio: yields `tokio::net::TcpStream`s.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncDispatch {
    sock: tokio::net::UnixStream,
    inbox: Inbox,
    counter: Arc<Counter>,
}

#[cfg(feature = "tokio")]
impl AsyncDispatch {
    /// Waits for the next connection (cancel-safe: nothing is taken until
    /// it is returned).
    pub async fn accept(&mut self) -> io::Result<(tokio::net::TcpStream, ConnGuard)> {
        loop {
            if let Some(fd) = self.inbox.next() {
                self.counter.open.fetch_add(1, Ordering::AcqRel);
                let guard = ConnGuard(self.counter.clone());
                self.write_all(ACK).await?;
                let std = TcpStream::from(fd);
                std.set_nonblocking(true)?;
                return Ok((tokio::net::TcpStream::from_std(std)?, guard));
            }
            self.sock.readable().await?;
            let raw = self.sock.as_raw_fd();
            let inbox = &mut self.inbox;
            match self
                .sock
                .try_io(tokio::io::Interest::READABLE, || inbox.recv(raw))
            {
                Ok(0) => return Err(closed()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            self.sock.writable().await?;
            match self.sock.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Tells the master this worker is ready to take connections
    /// ([`crate::ready`] does this too).
    pub async fn listening(&self) -> io::Result<()> {
        self.write_all(LISTENING).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    const CONN: &[u8] =
        b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_HERD_CONN\"}}\n";

    /// Sends one connection line with `fd` attached, as the master does.
    fn hand(sock: &UnixStream, fd: impl AsFd) {
        use nix::sys::socket::{ControlMessage, sendmsg};
        let raw = [fd.as_fd().as_raw_fd()];
        let iov = [std::io::IoSlice::new(CONN)];
        let n = sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(n, CONN.len());
    }

    #[test]
    fn handed_connections_come_out_as_streams_and_are_acked_in_order() {
        let (master, worker) = UnixStream::pair().unwrap();
        let mut d = Dispatch::new(worker, true).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (accepted, _) = listener.accept().unwrap();
            hand(&master, &accepted);
        }
        let mut answers = BufReader::new(master.try_clone().unwrap());
        let mut guards = Vec::new();
        for (i, client) in clients.iter_mut().enumerate() {
            let (mut stream, guard) = d.accept().unwrap();
            guards.push(guard);
            let mut line = String::new();
            answers.read_line(&mut line).unwrap();
            assert_eq!(line.as_bytes(), ACK, "connection {i}");
            // The stream is the client's connection, in the order handed.
            stream.write_all(&[i as u8]).unwrap();
            let mut b = [0u8; 1];
            client.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
        // Closing one reports the open count (least-conn).
        drop(guards.pop());
        let mut line = String::new();
        answers.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"herd\":\"open\",\"open\":2}\n");
        // The master closing its end ends accept with ConnectionAborted.
        drop(answers);
        drop(master);
        let err = d.accept().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
