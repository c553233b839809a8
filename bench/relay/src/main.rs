//! Issue 11's io_uring experiment: one small HTTP/1.1 relay that runs on
//! monoio's io_uring driver or on its epoll driver, so that `bench/uring`
//! can measure what io_uring alone changes for a proxy's I/O on this
//! machine: same code, same buffers, one runtime per thread, one
//! `SO_REUSEPORT` listener per thread (thread-per-core).
//!
//! It is a yardstick, not a proxy: it relays what `wrk` sends (requests with
//! no body or a Content-Length one) to backends on Unix sockets that answer
//! with a Content-Length, round-robin, over pooled keep-alive connections,
//! with herd's deferred accept and `TCP_NODELAY`. The one edit it makes is
//! the one the backend pool needs: the client's `Connection` header is not
//! passed on, so a client's `Connection: close` does not close the pooled
//! connection.
//!
//! `uring` is monoio's io_uring as it comes (a ring of 1,024 entries, no
//! setup flags); `uring-tuned` adds the flags the kernel offers a ring that
//! one thread alone submits to and reaps (`COOP_TASKRUN`, `SINGLE_ISSUER`,
//! `DEFER_TASKRUN`: completions are run when the thread asks for them,
//! not by interrupting it).
//!
//! Usage: `herd-uring-relay uring|uring-tuned|epoll LISTEN THREADS BACKEND_SOCKET...`

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream, UnixStream};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

const BUF: usize = 8192;
const HEADERS: usize = 64;

fn main() {
    if let Err(e) = start() {
        eprintln!("herd-uring-relay: {e}");
        std::process::exit(1);
    }
}

fn start() -> Result<(), String> {
    let usage = "usage: herd-uring-relay uring|uring-tuned|epoll LISTEN THREADS BACKEND_SOCKET...";
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err(usage.into());
    }
    let driver = match args[0].as_str() {
        "uring" => Driver::Uring,
        "uring-tuned" => Driver::UringTuned,
        "epoll" => Driver::Epoll,
        _ => return Err(usage.into()),
    };
    let listen: SocketAddr = args[1].parse().map_err(|e| format!("{}: {e}", args[1]))?;
    let threads: usize = args[2].parse().map_err(|e| format!("{}: {e}", args[2]))?;
    let backends: Vec<PathBuf> = args[3..].iter().map(PathBuf::from).collect();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let backends = backends.clone();
            std::thread::spawn(move || thread(driver, listen, backends))
        })
        .collect();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("a relay thread panicked".into()),
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Driver {
    Uring,
    UringTuned,
    Epoll,
}

/// One runtime of the chosen driver on this thread, serving its own listener.
fn thread(driver: Driver, listen: SocketAddr, backends: Vec<PathBuf>) -> io::Result<()> {
    let l = listener(listen)?;
    match driver {
        Driver::Uring => RuntimeBuilder::<IoUringDriver>::new()
            .build()?
            .block_on(serve(l, backends)),
        Driver::UringTuned => {
            let mut ring = io_uring::IoUring::builder();
            ring.setup_coop_taskrun()
                .setup_single_issuer()
                .setup_defer_taskrun();
            RuntimeBuilder::<IoUringDriver>::new()
                .uring_builder(ring)
                .build()?
                .block_on(serve(l, backends))
        }
        Driver::Epoll => RuntimeBuilder::<LegacyDriver>::new()
            .build()?
            .block_on(serve(l, backends)),
    }
}

// The macro calls itself and its helpers unqualified.
use nix::{setsockopt_impl, sockopt_impl};
sockopt_impl!(
    /// Linux's `TCP_DEFER_ACCEPT`, which nix does not name (as herd's `os::listen`).
    TcpDeferAccept,
    SetOnly,
    libc::IPPROTO_TCP,
    libc::TCP_DEFER_ACCEPT,
    libc::c_int
);

/// A listener as herd's HTTP listener is set up: `SO_REUSEPORT` (one per
/// thread here), `TCP_NODELAY` inherited by each connection, deferred accept.
fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    let l: std::net::TcpListener = s.into();
    nix::sys::socket::setsockopt(&l, TcpDeferAccept, &1).map_err(io::Error::from)?;
    Ok(l)
}

async fn serve(l: std::net::TcpListener, backends: Vec<PathBuf>) -> io::Result<()> {
    let l = TcpListener::from_std(l)?;
    let pool = Rc::new(Pool {
        idle: backends.iter().map(|_| RefCell::new(Vec::new())).collect(),
        backends,
        next: Cell::new(0),
    });
    loop {
        match l.accept().await {
            Ok((c, _)) => {
                monoio::spawn(connection(c, pool.clone()));
            }
            // Out of descriptors and the like: the next accept may succeed.
            Err(e) => eprintln!("herd-uring-relay: accept: {e}"),
        }
    }
}

/// This thread's keep-alive connections to each backend.
struct Pool {
    backends: Vec<PathBuf>,
    idle: Vec<RefCell<Vec<UnixStream>>>,
    next: Cell<usize>,
}

impl Pool {
    /// The next backend round-robin, and a pooled connection to it or a new one.
    async fn take(&self) -> io::Result<(usize, UnixStream)> {
        let i = self.next.get() % self.backends.len();
        self.next.set(i + 1);
        let pooled = self.idle[i].borrow_mut().pop();
        match pooled {
            Some(s) => Ok((i, s)),
            None => Ok((i, UnixStream::connect(&self.backends[i]).await?)),
        }
    }

    fn put(&self, i: usize, s: UnixStream) {
        self.idle[i].borrow_mut().push(s);
    }
}

async fn connection(mut client: TcpStream, pool: Rc<Pool>) {
    // An error ends the connection: this is a yardstick.
    let _ = relay(&mut client, &pool).await;
}

async fn relay(client: &mut TcpStream, pool: &Pool) -> io::Result<()> {
    let mut req = Vec::with_capacity(BUF);
    let mut out = Vec::with_capacity(BUF);
    let mut resp = Vec::with_capacity(BUF);
    loop {
        let (head, body, close) = loop {
            if let Some(p) = parse_request(&req)? {
                break p;
            }
            let (n, b) = read_more(client, req).await;
            req = b;
            if n? == 0 {
                return Ok(());
            }
        };
        let total = head + body;
        req = read_to(client, req, total).await?;
        out.clear();
        without_connection(&req[..head], &mut out);
        out.extend_from_slice(&req[head..total]);
        req.drain(..total);

        let (i, mut backend) = pool.take().await?;
        let (res, b) = backend.write_all(out).await;
        out = b;
        res?;
        resp.clear();
        let (head, len, keep) = loop {
            if let Some((h, body, keep)) = parse_response(&resp)? {
                break (h, h + body, keep);
            }
            let (n, b) = read_more(&mut backend, resp).await;
            resp = b;
            if n? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        resp = read_to(&mut backend, resp, len).await?;
        resp.truncate(len);
        if keep {
            pool.put(i, backend);
        }
        if close {
            // Told, as herd and nginx tell it, so the client does not reuse it.
            out.clear();
            out.extend_from_slice(&resp[..head - 2]);
            out.extend_from_slice(b"Connection: close\r\n\r\n");
            out.extend_from_slice(&resp[head..]);
            let (res, _) = client.write_all(out).await;
            return res.map(drop);
        }
        let (res, b) = client.write_all(resp).await;
        resp = b;
        res?;
    }
}

/// Reads once more into BUF's spare room (growing it when little is left).
async fn read_more<S: AsyncReadRent>(s: &mut S, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    if buf.capacity() - buf.len() < BUF / 2 {
        buf.reserve(BUF);
    }
    let len = buf.len();
    let (res, slice) = s.read(buf.slice_mut(len..)).await;
    (res, slice.into_inner())
}

/// Reads until BUF holds at least LEN bytes.
async fn read_to<S: AsyncReadRent>(s: &mut S, mut buf: Vec<u8>, len: usize) -> io::Result<Vec<u8>> {
    while buf.len() < len {
        let (n, b) = read_more(s, buf).await;
        buf = b;
        if n? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn content_length(headers: &[httparse::Header]) -> io::Result<usize> {
    let mut len = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("chunked bodies are not relayed"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| invalid("bad Content-Length"))?;
        }
    }
    Ok(len)
}

fn says_close(headers: &[httparse::Header]) -> bool {
    headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("connection")
            && h.value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close"))
    })
}

/// The request's head length, body length and whether the client closes after it.
fn parse_request(buf: &[u8]) -> io::Result<Option<(usize, usize, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(head)) => {
            let close = says_close(r.headers) || r.version == Some(0);
            Ok(Some((head, content_length(r.headers)?, close)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(invalid(&e.to_string())),
    }
}

/// The answer's head length, body length and whether its connection can be reused.
fn parse_response(buf: &[u8]) -> io::Result<Option<(usize, usize, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(head)) => {
            let bodiless = matches!(r.code, Some(100..=199 | 204 | 304));
            let body = if bodiless {
                0
            } else {
                content_length(r.headers)?
            };
            Ok(Some((head, body, !says_close(r.headers))))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(invalid(&e.to_string())),
    }
}

/// HEAD's lines without the `Connection` header (hop-by-hop).
fn without_connection(head: &[u8], out: &mut Vec<u8>) {
    for line in head.split_inclusive(|&b| b == b'\n') {
        let named = line.len() > 11 && line[..11].eq_ignore_ascii_case(b"connection:");
        if !named {
            out.extend_from_slice(line);
        }
    }
}
