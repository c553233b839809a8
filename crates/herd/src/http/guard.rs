//! A front line for client connections, between the socket and hyper.
//!
//! hyper accepts a few things a proxy must refuse (a request with both
//! `Content-Length` and `Transfer-Encoding`, repeated `Content-Length`),
//! and closes a slow header silently where nginx answers 408. So each
//! HTTP/1 request head is held here until it is complete, checked, and
//! only then passed on; body framing (length or chunks) is followed to
//! find where the next head starts. A bad head gets a short error response
//! and the connection ends; hyper never sees it.
//!
//! HTTP/2 (prior-knowledge h2c) and upgraded connections pass straight
//! through: h2 frames carry their own lengths.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus headers, in bytes.
    pub max_head: usize,
    pub max_headers: usize,
    /// Time to send a whole request head once it has begun.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request, and a
    /// request body for its next bytes (then the request fails with 408).
    pub idle_timeout: Duration,
}

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n";
const TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 16\r\nConnection: close\r\n\r\nrequest timeout\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 23\r\nConnection: close\r\n\r\nrequest head too large\n";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Size { digits: u8, value: u64 },
    Ext,
    SizeLf { value: u64 },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    EndLf,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Collecting a request head in `buf`.
    Head,
    /// `n` body bytes to pass.
    Fixed(u64),
    Chunked(Chunk),
    /// No more checking: h2, upgraded tunnels, or framing hyper will reject.
    Opaque,
    /// Writing `msg[written..]`, then EOF.
    Rejecting {
        msg: &'static [u8],
        written: usize,
    },
    Closed,
}

pub struct Guard<IO> {
    io: IO,
    limits: Limits,
    state: State,
    /// Bytes read from the socket and not yet handed on.
    buf: Vec<u8>,
    start: usize,
    /// `buf[start..release]` is checked and may be handed on.
    release: usize,
    /// State after `release` bytes are handed on.
    after: State,
    first: bool,
    timer: Pin<Box<Sleep>>,
    /// Whether the timer is the header timeout (answer 408) or idle (just close).
    timer_is_header: bool,
    /// In a body: whether the timer is counting a wait for the client's next bytes.
    body_wait: bool,
    /// Whether response bytes went out since the last request head: then a
    /// 408 of ours would corrupt that response, and the connection just ends.
    answered: bool,
}

impl<IO> Guard<IO> {
    pub fn new(io: IO, limits: Limits) -> Guard<IO> {
        Guard {
            io,
            limits,
            state: State::Head,
            buf: Vec::new(),
            start: 0,
            release: 0,
            after: State::Head,
            first: true,
            // A new connection that sends nothing is closed quietly after
            // the header timeout; once bytes come, the same timeout answers 408.
            timer: Box::pin(tokio::time::sleep(limits.header_timeout)),
            timer_is_header: false,
            body_wait: false,
            answered: false,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn reset_timer(&mut self, header: bool) {
        let d = if header {
            self.limits.header_timeout
        } else {
            self.limits.idle_timeout
        };
        self.timer.as_mut().reset(Instant::now() + d);
        self.timer_is_header = header;
    }

    fn reject(&mut self, msg: &'static [u8]) {
        self.state = State::Rejecting { msg, written: 0 };
    }

    /// Checks a complete head (`len` bytes at `start`) and sets what follows.
    fn accept_head(&mut self, len: usize) {
        let head = &self.buf[self.start..self.start + len];
        match check_head(head, self.limits.max_headers, self.first) {
            Ok(next) => {
                self.first = false;
                self.answered = false;
                self.release = self.start + len;
                self.after = next;
            }
            Err(msg) => self.reject(msg),
        }
    }
}

/// What follows a valid head, or the error response for an invalid one.
fn check_head(head: &[u8], max_headers: usize, first: bool) -> Result<State, &'static [u8]> {
    if first && head.starts_with(H2_PREFACE) {
        return Ok(State::Opaque); // h2c prior knowledge
    }
    // On the stack for the usual limits, a larger limit costs an allocation;
    // uninitialized either way, as httparse fills only what it parses.
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut heap = Vec::new();
    let headers = if max_headers <= stack.len() {
        &mut stack[..max_headers]
    } else {
        heap.reserve_exact(max_headers);
        &mut heap.spare_capacity_mut()[..max_headers]
    };
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(BAD_REQUEST),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(_) => return Err(BAD_REQUEST),
    }
    let http10 = req.version == Some(0);
    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut chunked_last = false;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .map_err(|_| BAD_REQUEST)?
                .trim();
            if content_length.is_some() || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BAD_REQUEST); // repeated, empty, or not a plain number
            }
            content_length = Some(v.parse().map_err(|_| BAD_REQUEST)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_seen = true;
            let v = std::str::from_utf8(h.value).map_err(|_| BAD_REQUEST)?;
            chunked_last = v
                .rsplit(',')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te_seen && (content_length.is_some() || !chunked_last || http10) {
        return Err(BAD_REQUEST); // ambiguous framing: the request-smuggling shape
    }
    Ok(if upgrade {
        State::Opaque
    } else if te_seen {
        State::Chunked(Chunk::Size {
            digits: 0,
            value: 0,
        })
    } else {
        State::Fixed(content_length.unwrap_or(0))
    })
}

/// End of a request head in `b`: the index just past the blank line.
fn head_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = memchr(b'\n', &b[i..]) {
        let nl = i + p;
        match b.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if b.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Follows chunked framing over `data`. Returns how many bytes belong to
/// this body, and whether it ended there; `Err` on framing hyper will reject.
fn scan_chunks(st: &mut Chunk, data: &[u8]) -> Result<(usize, bool), ()> {
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        *st = match *st {
            Chunk::Size { digits, value } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits >= 15 {
                        return Err(());
                    }
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    Chunk::Size {
                        digits: digits + 1,
                        value: value * 16 + d,
                    }
                }
                _ if digits == 0 => return Err(()),
                b';' | b' ' | b'\t' => Chunk::Ext,
                b'\r' => Chunk::SizeLf { value },
                b'\n' => size_done(value),
                _ => return Err(()),
            },
            Chunk::Ext => match b {
                b'\r' => Chunk::SizeLf { value: 0 },
                b'\n' => return Err(()),
                _ => Chunk::Ext,
            },
            Chunk::SizeLf { value } => match b {
                b'\n' => size_done(value),
                _ => return Err(()),
            },
            Chunk::Data(n) => {
                let take = (n as usize).min(data.len() - i);
                i += take;
                let left = n - take as u64;
                *st = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            Chunk::DataCr => match b {
                b'\r' => Chunk::DataLf,
                b'\n' => Chunk::Size {
                    digits: 0,
                    value: 0,
                },
                _ => return Err(()),
            },
            Chunk::DataLf => match b {
                b'\n' => Chunk::Size {
                    digits: 0,
                    value: 0,
                },
                _ => return Err(()),
            },
            Chunk::TrailerStart => match b {
                b'\r' => Chunk::EndLf,
                b'\n' => return Ok((i + 1, true)),
                _ => Chunk::TrailerLine,
            },
            Chunk::TrailerLine => match b {
                b'\n' => Chunk::TrailerStart,
                _ => Chunk::TrailerLine,
            },
            Chunk::EndLf => match b {
                b'\n' => return Ok((i + 1, true)),
                _ => return Err(()),
            },
        };
        i += 1;
    }
    Ok((i, false))
}

fn size_done(value: u64) -> Chunk {
    if value == 0 {
        Chunk::TrailerStart
    } else {
        Chunk::Data(value)
    }
}

/// Room made in the buffer before each read.
const READ_SIZE: usize = 4096;

/// How a prior-knowledge h2c connection begins (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl<IO: AsyncRead + AsyncWrite + Unpin> Guard<IO> {
    /// Reads until the first bytes tell HTTP/2's preface from an HTTP/1
    /// request (the first byte usually does), keeping them for hyper, so
    /// the protocol is chosen without a second look at the socket. EOF, an
    /// error or the header timeout answer `false`: the HTTP/1 path then
    /// meets them again and handles them as always.
    pub fn poll_is_h2(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            let seen = self.pending();
            let n = seen.len().min(H2_PREFACE.len());
            if seen[..n] != H2_PREFACE[..n] {
                return Poll::Ready(false);
            }
            if n == H2_PREFACE.len() {
                return Poll::Ready(true);
            }
            if n > 0 && !self.timer_is_header {
                self.reset_timer(true);
            }
            match self.fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => {
                    return match self.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    /// Reads more of the socket into `buf`; Ok(0) is EOF.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.release = 0;
        }
        // Straight into the buffer's spare room: nothing to zero or copy.
        self.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// `fill` for body bytes. A client that sends none for `idle_timeout`
    /// (nginx's `client_body_timeout`) gets 408 from here and the read side
    /// ends: hyper would drop the connection on a read error before any
    /// answer of the handler's could be written. `Ok(None)`: timed out.
    fn fill_body(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<usize>>> {
        match self.fill(cx) {
            Poll::Pending => {
                if !self.body_wait {
                    self.body_wait = true;
                    let d = self.limits.idle_timeout;
                    self.timer.as_mut().reset(Instant::now() + d);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    if self.answered {
                        self.state = State::Closed;
                    } else {
                        self.reject(TIMEOUT);
                    }
                    return Poll::Ready(Ok(None));
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                self.body_wait = false;
                Poll::Ready(r.map(Some))
            }
        }
    }

    /// Hands `buf[start..start+n]` to the reader.
    fn give(&mut self, out: &mut ReadBuf<'_>, n: usize) {
        let n = n.min(out.remaining());
        out.put_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        loop {
            // Checked bytes waiting to be handed on go first.
            if me.release > me.start {
                let n = me.release - me.start;
                me.give(out, n);
                if me.start == me.release {
                    me.state = me.after;
                    if me.state == State::Head {
                        me.reset_timer(false);
                    }
                }
                return Poll::Ready(Ok(()));
            }
            match me.state {
                State::Closed => return Poll::Ready(Ok(())),
                State::Opaque => {
                    if me.start < me.buf.len() {
                        let n = me.buf.len() - me.start;
                        me.give(out, n);
                        return Poll::Ready(Ok(()));
                    }
                    return Pin::new(&mut me.io).poll_read(cx, out);
                }
                State::Rejecting { msg, written } => {
                    if written < msg.len() {
                        let n = ready!(Pin::new(&mut me.io).poll_write(cx, &msg[written..]))?;
                        if n == 0 {
                            me.state = State::Closed;
                            continue;
                        }
                        me.state = State::Rejecting {
                            msg,
                            written: written + n,
                        };
                        continue;
                    }
                    let _ = ready!(Pin::new(&mut me.io).poll_shutdown(cx));
                    me.state = State::Closed;
                    return Poll::Ready(Ok(()));
                }
                State::Fixed(0) => {
                    me.state = State::Head;
                    me.reset_timer(false);
                }
                State::Fixed(n) => {
                    if me.start == me.buf.len() {
                        match ready!(me.fill_body(cx))? {
                            None => continue,                      // timed out: answer, then EOF
                            Some(0) => return Poll::Ready(Ok(())), // EOF mid-body: hyper reports it
                            Some(_) => {}
                        }
                    }
                    let k = ((me.buf.len() - me.start) as u64).min(n) as usize;
                    let k = k.min(out.remaining());
                    me.give(out, k);
                    me.state = State::Fixed(n - k as u64);
                    return Poll::Ready(Ok(()));
                }
                State::Chunked(mut st) => {
                    if me.start == me.buf.len() {
                        match ready!(me.fill_body(cx))? {
                            None => continue,                      // timed out: answer, then EOF
                            Some(0) => return Poll::Ready(Ok(())), // EOF mid-body: hyper reports it
                            Some(_) => {}
                        }
                    }
                    let avail = (me.buf.len() - me.start).min(out.remaining());
                    match scan_chunks(&mut st, &me.buf[me.start..me.start + avail]) {
                        Ok((k, done)) => {
                            me.give(out, k);
                            me.state = if done {
                                State::Head
                            } else {
                                State::Chunked(st)
                            };
                            if done {
                                me.reset_timer(false);
                            }
                        }
                        Err(()) => me.state = State::Opaque,
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Head => {
                    let pending = me.pending();
                    if let Some(end) = head_end(pending) {
                        me.accept_head(end);
                        continue;
                    }
                    if pending.len() >= me.limits.max_head {
                        me.reject(TOO_LARGE);
                        continue;
                    }
                    // A request has begun: from now on it is the header timeout.
                    if !pending.is_empty() && !me.timer_is_header {
                        me.reset_timer(true);
                    }
                    match me.fill(cx) {
                        Poll::Ready(Ok(0)) => {
                            me.state = State::Closed;
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            if me.timer.as_mut().poll(cx).is_ready() {
                                if me.pending().is_empty() {
                                    me.state = State::Closed; // idle: close quietly
                                    return Poll::Ready(Ok(()));
                                }
                                me.reject(TIMEOUT);
                                continue;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.answered = true;
        // A response is going out: the idle clock starts after it.
        if self.state == State::Head && self.start == self.buf.len() && !self.timer_is_header {
            let d = self.limits.idle_timeout;
            self.timer.as_mut().reset(Instant::now() + d);
        }
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.answered = true;
        if self.state == State::Head && self.start == self.buf.len() && !self.timer_is_header {
            let d = self.limits.idle_timeout;
            self.timer.as_mut().reset(Instant::now() + d);
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_head_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nxx"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nxx"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn checks_framing() {
        let ok = |h: &str| check_head(h.as_bytes(), 100, false);
        assert_eq!(ok("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(State::Fixed(0)));
        assert_eq!(
            ok("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Ok(State::Fixed(5))
        );
        assert!(matches!(
            ok("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(State::Chunked(_))
        ));
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert_eq!(ok(bad), Err(BAD_REQUEST), "{bad}");
        }
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", 2, false),
            Err(TOO_LARGE)
        );
    }

    #[test]
    fn follows_chunks_to_the_next_request() {
        let body = b"5;x=y\r\nhello\r\n0\r\nTrailer: t\r\n\r\nGET /next";
        let mut st = Chunk::Size {
            digits: 0,
            value: 0,
        };
        let (n, done) = scan_chunks(&mut st, body).unwrap();
        assert!(done);
        assert_eq!(&body[n..], b"GET /next");
        // Byte by byte gives the same answer.
        let mut st = Chunk::Size {
            digits: 0,
            value: 0,
        };
        let mut total = 0;
        for b in body.chunks(1) {
            let (k, done) = scan_chunks(&mut st, b).unwrap();
            total += k;
            if done {
                break;
            }
        }
        assert_eq!(total, n);
        let mut st = Chunk::Size {
            digits: 0,
            value: 0,
        };
        assert!(scan_chunks(&mut st, b"zz\r\n").is_err());
        let mut st = Chunk::Size {
            digits: 0,
            value: 0,
        };
        assert!(scan_chunks(&mut st, b"3\r\nabcX").is_err());
    }
}

#[cfg(test)]
mod io_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            max_head: 16 * 1024,
            max_headers: 100,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn passes_pipelined_requests_unchanged() {
        let input: &[u8] = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\nGET /z HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut g = Guard::new(server, limits());
        let mut out = Vec::new();
        let mut buf = [0u8; 7]; // small reads, as a reader may do
        loop {
            let n = g.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(input)
        );
    }
}
