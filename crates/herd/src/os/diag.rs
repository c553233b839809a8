//! Whether a server on this host has accepted one of herd's connections
//! yet, read from the kernel's socket table as `ss` reads it (`sock_diag`
//! netlink). A connection the server has not accepted waits in its accept
//! queue with no file behind it (inode 0). A server that serves one
//! connection at a time leaves herd's new connections there while it
//! waits for the next request on one herd keeps idle; see
//! `upstream::Reuse`. Safe code: the request and the answer are plain
//! bytes laid out as `linux/inet_diag.h` says. And whether such a server
//! is asleep meanwhile (`/proc`, through `procfs`), which tells it from a
//! busy one, and how many connections it holds for how many processes,
//! which tells it from a pool of threads.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The kernel's `TCP_ESTABLISHED` state.
const TCP_ESTABLISHED: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `struct nlmsghdr`.
const NL_HEADER: usize = 16;
/// Where `idiag_inode` sits in `struct inet_diag_msg`: family, state,
/// timer, retrans (4), the socket id (48), expires, rqueue, wqueue, uid.
const INODE_AT: usize = 4 + 48 + 16;
/// Where `idiag_rqueue` sits: after the id and `idiag_expires`.
const RQUEUE_AT: usize = 4 + 48 + 4;

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("socket table: {0}")]
    Io(#[from] std::io::Error),
    #[error("socket table: the kernel's answer is malformed")]
    Malformed,
    #[error("socket table: the kernel refused the query (errno {0})")]
    Refused(i32),
}

/// The server end of one of herd's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerEnd {
    /// The server has accepted it.
    pub accepted: bool,
    /// Bytes herd sent that the server has not read yet.
    pub unread: u32,
}

/// The server end of herd's connection from `ours` to `server`: `None` if
/// it is not a socket of this host.
pub fn server_end(ours: SocketAddr, server: SocketAddr) -> Result<Option<ServerEnd>, DiagError> {
    let s = netlink()?;
    s.send(&query(server, ours))?;
    let mut buf = [0u8; 512];
    let n = (&s).read(&mut buf)?;
    parse(&buf[..n])
}

/// The server end of herd's Unix stream connection `ours` (its fd): `None`
/// if it is gone. Unix sockets are in the table by inode (`unix_diag`):
/// the peer of a connection the server has not accepted has no file yet
/// (inode 0), and what herd sent but the server has not read is still
/// charged to herd's end (its write queue).
pub fn unix_server_end(ours: std::os::fd::BorrowedFd<'_>) -> Result<Option<ServerEnd>, DiagError> {
    unix_server_end_of(inode(ours)?)
}

/// A socket's inode, by which the Unix socket table knows it.
pub fn inode(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u32> {
    Ok(nix::sys::stat::fstat(fd)
        .map_err(std::io::Error::from)?
        .st_ino as u32)
}

/// herd's end of a connection to a server on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ours {
    Tcp(SocketAddr),
    /// A Unix socket's inode.
    Unix(u32),
}

/// The server end of herd's connection from `ours` (to `server`, for TCP).
pub fn end_of(ours: Ours, server: SocketAddr) -> Result<Option<ServerEnd>, DiagError> {
    match ours {
        Ours::Tcp(a) => server_end(a, server),
        Ours::Unix(inode) => unix_server_end_of(inode),
    }
}

/// [`unix_server_end`] by the inode of herd's end.
pub fn unix_server_end_of(inode: u32) -> Result<Option<ServerEnd>, DiagError> {
    const UDIAG_SHOW_PEER: u32 = 0x4;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    let mut m = Vec::with_capacity(NL_HEADER + 24);
    m.extend_from_slice(&((NL_HEADER + 24) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&[0; 8]); // sequence, port id
    m.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&inode.to_ne_bytes());
    m.extend_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    m.extend_from_slice(&[0xff; 8]); // no cookie
    let s = netlink()?;
    s.send(&m)?;
    let mut buf = [0u8; 512];
    let n = (&s).read(&mut buf)?;
    parse_unix(&buf[..n])
}

/// A `unix_diag_msg` (16 bytes) and its attributes: the peer's inode and
/// the queues.
fn parse_unix(m: &[u8]) -> Result<Option<ServerEnd>, DiagError> {
    const UNIX_DIAG_PEER: u16 = 2;
    const UNIX_DIAG_RQLEN: u16 = 4;
    const UNIX_DIAG_SHUTDOWN: u16 = 6;
    let (u16_at, u32_at) = (|i| u16_at(m, i), |i| u32_at(m, i));
    match u16_at(4).ok_or(DiagError::Malformed)? {
        NLMSG_ERROR => refusal(m),
        SOCK_DIAG_BY_FAMILY => {
            let end = (u32_at(0).ok_or(DiagError::Malformed)? as usize).min(m.len());
            let (mut peer, mut unread, mut closed) = (None, 0, false);
            let mut at = NL_HEADER + 16;
            while at + 4 <= end {
                let len = u16_at(at).ok_or(DiagError::Malformed)? as usize;
                if len < 4 {
                    return Err(DiagError::Malformed);
                }
                match u16_at(at + 2).ok_or(DiagError::Malformed)? {
                    UNIX_DIAG_PEER => peer = u32_at(at + 4),
                    // rqueue, then wqueue: herd's bytes the peer holds unread.
                    UNIX_DIAG_RQLEN => unread = u32_at(at + 8).ok_or(DiagError::Malformed)?,
                    // The server closed (or shut down) its end: it had
                    // accepted, and a closed end has no file either.
                    UNIX_DIAG_SHUTDOWN => closed = m.get(at + 4).is_some_and(|b| b & 1 != 0),
                    _ => {}
                }
                at += (len + 3) & !3;
            }
            Ok(peer.filter(|_| !closed).map(|p| ServerEnd {
                accepted: p != 0,
                unread,
            }))
        }
        _ => Err(DiagError::Malformed),
    }
}

/// How many connections the listening socket on `addr` (or on its port,
/// any address) queues unaccepted (its backlog), from a dump of this host's
/// listening TCP sockets: a server that serves one connection at a time
/// leaves the others there, and the kernel drops the handshakes of any
/// beyond (the client retries only a second later).
pub fn listen_backlog(addr: SocketAddr) -> Result<Option<u32>, DiagError> {
    const TCP_LISTEN: u32 = 10;
    let mut found = None;
    dump(addr, 1 << TCP_LISTEN, None, |msg| {
        if let Some(backlog) = listener_backlog(msg, addr) {
            // An exact address beats the wildcard.
            if found.is_none() || listener_ip(msg, addr) {
                found = Some(backlog);
            }
        }
    })?;
    Ok(found)
}

/// How many connections to `addr` (a server's address on this host) its
/// server holds accepted. A server of one connection at a time holds at
/// most one per process; a pool of threads holds several, and may leave a
/// new one waiting a moment while each thread waits on its own (Puma's
/// wait 200 ms for a next request on the connection they served).
pub fn accepted_at(addr: SocketAddr) -> Result<usize, DiagError> {
    let mut n = 0;
    dump(addr, 1 << TCP_ESTABLISHED, Some(addr.port()), |msg| {
        let port = msg.get(4..6).map(|p| u16::from_be_bytes([p[0], p[1]]));
        if port == Some(addr.port())
            && listener_ip(msg, addr)
            && u32_at(msg, INODE_AT).is_some_and(|i| i != 0)
        {
            n += 1;
        }
    })?;
    Ok(n)
}

/// Hands `each` every `inet_diag_msg` of this host's TCP sockets of
/// `addr`'s family in the `states` (a mask of `1 << TCP_*`), only those
/// whose local port is `sport` if given: the kernel filters them (as `ss
/// sport = :N` asks), and a host's thousands of connections are not copied.
fn dump(
    addr: SocketAddr,
    states: u32,
    sport: Option<u16>,
    mut each: impl FnMut(&[u8]),
) -> Result<(), DiagError> {
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_DONE: u16 = 3;
    const INET_DIAG_REQ_BYTECODE: u16 = 1;
    const INET_DIAG_BC_S_EQ: u8 = 11;
    let s = netlink()?;
    let any = match addr.ip() {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let mut req = query(any, any);
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[NL_HEADER + 4..NL_HEADER + 8].copy_from_slice(&states.to_ne_bytes());
    if let Some(port) = sport {
        // An attribute holding two `inet_diag_bc_op`s: "local port equal
        // to the next op's `no`": then 8 bytes on (the end: a match), else
        // 12 (past it: no match); then the port, in host order.
        req.extend_from_slice(&12u16.to_ne_bytes());
        req.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        req.extend_from_slice(&[INET_DIAG_BC_S_EQ, 8]);
        req.extend_from_slice(&12u16.to_ne_bytes());
        req.extend_from_slice(&[0, 0]);
        req.extend_from_slice(&port.to_ne_bytes());
        let len = req.len() as u32;
        req[0..4].copy_from_slice(&len.to_ne_bytes());
    }
    s.send(&req)?;
    let mut buf = vec![0u8; 32 * 1024];
    // Bounded: a few reads for a host's listeners or one port's
    // connections.
    for _ in 0..1024 {
        let n = (&s).read(&mut buf)?;
        let mut m = &buf[..n];
        while m.len() >= NL_HEADER {
            let len = u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize;
            let kind = u16::from_ne_bytes([m[4], m[5]]);
            if len < NL_HEADER || len > m.len() {
                return Err(DiagError::Malformed);
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return parse(&m[..len]).map(|_| ()),
                SOCK_DIAG_BY_FAMILY => each(&m[NL_HEADER..len]),
                _ => {}
            }
            m = &m[((len + 3) & !3).min(m.len())..]; // NLMSG_ALIGN
        }
    }
    Ok(())
}

/// The backlog of the listener in `msg` (an `inet_diag_msg`) if it listens
/// on `addr`'s port, on its address or on every one.
fn listener_backlog(msg: &[u8], addr: SocketAddr) -> Option<u32> {
    let port = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
    if port != addr.port() {
        return None;
    }
    let ip = msg.get(8..24)?;
    let wildcard = ip.iter().all(|b| *b == 0);
    if !wildcard && !listener_ip(msg, addr) {
        return None;
    }
    // idiag_wqueue: a listener's backlog.
    let w = msg.get(4 + 48 + 8..4 + 48 + 12)?;
    Some(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
}

fn listener_ip(msg: &[u8], addr: SocketAddr) -> bool {
    let Some(ip) = msg.get(8..24) else {
        return false;
    };
    match addr.ip() {
        IpAddr::V4(v) => ip[..4] == v.octets(),
        IpAddr::V6(v) => ip == v.octets(),
    }
}

/// Whether every thread of process `pid` and of all its descendants is
/// asleep (state `S`): a server that is, while a connection waits in its
/// accept queue, waits for something else than new connections, such as
/// the next request on the one connection it serves. A busy server has a
/// thread running (`R`) or in disk wait (`D`). `None` if `pid` is gone.
pub fn asleep(pid: u32) -> Option<bool> {
    /// Bounds the walk (a prefork server's children, their threads).
    const MOST: usize = 512;
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        let tasks = i32::try_from(p)
            .ok()
            .and_then(|p| procfs::process::Process::new(p).ok()?.tasks().ok());
        let Some(tasks) = tasks else {
            if p == pid {
                return None;
            }
            continue; // exited meanwhile
        };
        for t in tasks.flatten() {
            seen += 1;
            if seen > MOST {
                return Some(false);
            }
            let Ok(stat) = t.stat() else {
                continue;
            };
            if !matches!(stat.state, 'S' | 'I') {
                return Some(false);
            }
            if let Ok(kids) = t.children() {
                todo.extend(kids);
            }
        }
    }
    Some(true)
}

/// How many processes worker `pid` is: it and its descendants in its
/// process group (at most 512).
pub fn processes(pid: u32) -> usize {
    super::usage::members(pid).len().max(1)
}

/// A socket for one query. The kernel answers while it takes the request;
/// the time-out only guards against a kernel that would not.
fn netlink() -> Result<Socket, DiagError> {
    let s = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

/// The request for the socket whose local end is `local` and remote end
/// `remote`: `nlmsghdr` then `inet_diag_req_v2`, in host byte order but for
/// ports and addresses.
fn query(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let family = match local.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    let mut m = Vec::with_capacity(NL_HEADER + 56);
    m.extend_from_slice(&((NL_HEADER + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&[0; 8]); // sequence, port id
    m.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&remote.port().to_be_bytes());
    for a in [local.ip(), remote.ip()] {
        let mut b = [0u8; 16];
        match a {
            IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
            IpAddr::V6(v) => b = v.octets(),
        }
        m.extend_from_slice(&b);
    }
    m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    m
}

fn u16_at(m: &[u8], i: usize) -> Option<u16> {
    m.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]))
}

fn u32_at(m: &[u8], i: usize) -> Option<u32> {
    m.get(i..i + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// An `NLMSG_ERROR` answer: no such socket (gone), or the kernel's refusal.
fn refusal(m: &[u8]) -> Result<Option<ServerEnd>, DiagError> {
    match u32_at(m, NL_HEADER).ok_or(DiagError::Malformed)? as i32 {
        0 => Err(DiagError::Malformed),
        e if -e == libc::ENOENT => Ok(None),
        e => Err(DiagError::Refused(-e)),
    }
}

fn parse(m: &[u8]) -> Result<Option<ServerEnd>, DiagError> {
    let u32_at = |i| u32_at(m, i);
    match u16_at(m, 4).ok_or(DiagError::Malformed)? {
        NLMSG_ERROR => refusal(m),
        SOCK_DIAG_BY_FAMILY => {
            let inode = u32_at(NL_HEADER + INODE_AT).ok_or(DiagError::Malformed)?;
            let unread = u32_at(NL_HEADER + RQUEUE_AT).ok_or(DiagError::Malformed)?;
            Ok(Some(ServerEnd {
                accepted: inode != 0,
                unread,
            }))
        }
        _ => Err(DiagError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// Whether the server end of the connection from `ours` to `server` has
    /// been accepted: `None` if it is not a socket of this host.
    fn accepted(ours: SocketAddr, server: SocketAddr) -> Result<Option<bool>, DiagError> {
        Ok(server_end(ours, server)?.map(|e| e.accepted))
    }

    #[test]
    fn a_unix_connection_is_seen_waiting_then_accepted_then_read() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = std::env::temp_dir().join(format!("herd-diag-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        let end = |c: &UnixStream| unix_server_end(c.as_fd()).unwrap().unwrap();
        assert_eq!(
            end(&c),
            ServerEnd {
                accepted: false,
                unread: 0
            }
        );
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let waiting = end(&c);
        assert!(!waiting.accepted && waiting.unread > 0, "{waiting:?}");
        let (mut s, _) = l.accept().unwrap();
        let got = end(&c);
        assert!(got.accepted && got.unread > 0, "{got:?}");
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).unwrap();
        assert_eq!(
            end(&c),
            ServerEnd {
                accepted: true,
                unread: 0
            }
        );
        drop(s);
        assert_eq!(unix_server_end(c.as_fd()).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connection to `l` is seen waiting, then accepted.
    fn waiting_then_accepted(l: TcpListener) -> SocketAddr {
        let server = l.local_addr().unwrap();
        let c = TcpStream::connect(server).unwrap();
        let ours = c.local_addr().unwrap();
        assert_eq!(accepted(ours, server).unwrap(), Some(false));
        let (_s, _) = l.accept().unwrap();
        assert_eq!(accepted(ours, server).unwrap(), Some(true));
        ours
    }

    #[test]
    fn a_connection_is_seen_waiting_then_accepted() {
        let ours = waiting_then_accepted(TcpListener::bind("127.0.0.1:0").unwrap());
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(accepted(ours, nobody).unwrap(), None);
    }

    #[test]
    fn bytes_the_server_has_not_read_are_counted() {
        use std::io::{Read, Write};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = l.local_addr().unwrap();
        let mut c = TcpStream::connect(server).unwrap();
        let ours = c.local_addr().unwrap();
        c.write_all(b"hello").unwrap();
        let (mut s, _) = l.accept().unwrap();
        let end = |want: u32| {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let e = server_end(ours, server).unwrap().unwrap();
                if e.unread == want || std::time::Instant::now() > until {
                    return e;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let seen = end(5);
        assert!(seen.accepted && seen.unread == 5, "{seen:?}");
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(end(0).unread, 0);
    }

    #[test]
    fn a_listeners_backlog_is_read() {
        let s = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        s.listen(7).unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(listen_backlog(addr).unwrap(), Some(7));
        drop(s);
        // Gone once every copy is closed: a process another test forks
        // holds one until it execs.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while listen_backlog(addr).unwrap().is_some() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(listen_backlog(addr).unwrap(), None);
    }

    #[test]
    fn the_connections_a_server_accepted_are_counted() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _a = TcpStream::connect(addr).unwrap();
        let _b = TcpStream::connect(addr).unwrap();
        assert_eq!(accepted_at(addr).unwrap(), 0);
        let (_sa, _) = l.accept().unwrap();
        assert_eq!(accepted_at(addr).unwrap(), 1);
        let (_sb, _) = l.accept().unwrap();
        assert_eq!(accepted_at(addr).unwrap(), 2);
        // Another server's are not counted.
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (_sc, _) = other.accept().unwrap();
        assert_eq!(accepted_at(addr).unwrap(), 2);
        assert_eq!(accepted_at(other.local_addr().unwrap()).unwrap(), 1);
        // The kernel sent only the server's two ends, of the six.
        let mut sent = 0;
        dump(addr, 1 << TCP_ESTABLISHED, Some(addr.port()), |_| sent += 1).unwrap();
        assert_eq!(sent, 2);
    }

    #[test]
    fn a_process_tree_is_counted() {
        let mut tree = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while processes(tree.id()) < 3 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let n = processes(tree.id());
        let _ = tree.kill();
        let _ = tree.wait();
        assert_eq!(n, 3);
    }

    #[test]
    fn over_ipv6_too() {
        let Ok(l) = TcpListener::bind("[::1]:0") else {
            return; // no IPv6 loopback here
        };
        waiting_then_accepted(l);
    }

    #[test]
    fn a_sleeping_process_tree_is_told_from_a_busy_one() {
        let mut sleeper = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; :"])
            .spawn()
            .unwrap();
        let mut busy = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & while :; do :; done"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (mut quiet, mut running) = (None, None);
        while std::time::Instant::now() < deadline {
            quiet = asleep(sleeper.id());
            running = asleep(busy.id());
            if quiet == Some(true) && running == Some(false) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in [&mut sleeper, &mut busy] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!((quiet, running), (Some(true), Some(false)));
        assert_eq!(asleep(sleeper.id()), None, "gone");
    }

    #[test]
    fn odd_answers_are_errors_not_panics() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0; 20]).is_err());
        let mut short = vec![0u8; NL_HEADER];
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(parse(&short).is_err());
        assert!(parse_unix(&[]).is_err());
        assert!(parse_unix(&[0; 20]).is_err());
        // A unix_diag_msg with an attribute claiming less than its header.
        let mut bad = vec![0u8; NL_HEADER + 16 + 4];
        let len = bad.len() as u32;
        bad[0..4].copy_from_slice(&len.to_ne_bytes());
        bad[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(parse_unix(&bad).is_err());
        // Cut short: no peer attribute, so no server end.
        bad.truncate(NL_HEADER + 16);
        let len = bad.len() as u32;
        bad[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_unix(&bad).unwrap(), None);
    }
}
