//! Request and response heads: each parsed once (httparse), checked by RFC
//! 9112's framing rules, and written for the next hop by copying the bytes
//! received, with only the edits a proxy must make (hop-by-hop headers
//! out, forwarding headers in). No header map, no per-header allocation.
//!
//! Pure: bytes in, bytes and a verdict out, so every rule is unit tested.
//!
//! Requests and responses share one file: they share the header
//! classification and the writers. A third of it is tests.

use std::io::Write;
use std::mem::MaybeUninit;
use std::net::IpAddr;

use herd_balance::KeySource;

use super::real_ip;
use crate::config::RealIp;

/// A request herd answers itself, and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    TooLarge,
    /// A request line longer than the head's limit.
    UriTooLong,
    Timeout,
    NotAllowed,
    /// `HTTP/2.0` and above in an HTTP/1 request line.
    Version,
    /// A body larger than `--max-body-size`.
    BodyTooLarge,
    /// A PROXY protocol header herd did not expect (no `--accept-proxy`, an
    /// address it does not name, a second one): a 400, and a hint.
    ProxyHeader,
}

impl Refusal {
    /// The status and body length of [`Refusal::response`], for the access log.
    pub fn logged(self) -> (u16, u64) {
        match self {
            Refusal::BadRequest | Refusal::ProxyHeader => (400, 12),
            Refusal::TooLarge => (431, 23),
            Refusal::UriTooLong => (414, 17),
            Refusal::Timeout => (408, 16),
            Refusal::NotAllowed => (405, 19),
            Refusal::Version => (505, 27),
            Refusal::BodyTooLarge => (413, 23),
        }
    }

    pub fn response(self) -> &'static [u8] {
        match self {
            Refusal::BadRequest | Refusal::ProxyHeader => b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n",
            Refusal::TooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 23\r\nConnection: close\r\n\r\nrequest head too large\n",
            Refusal::UriTooLong => b"HTTP/1.1 414 URI Too Long\r\nContent-Type: text/plain\r\nContent-Length: 17\r\nConnection: close\r\n\r\nrequest too long\n",
            Refusal::Timeout => b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 16\r\nConnection: close\r\n\r\nrequest timeout\n",
            Refusal::NotAllowed => b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain\r\nContent-Length: 19\r\nAllow: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS\r\nConnection: close\r\n\r\nmethod not allowed\n",
            Refusal::Version => b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\nContent-Length: 27\r\nConnection: close\r\n\r\nHTTP version not supported\n",
            Refusal::BodyTooLarge => b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\nContent-Length: 23\r\nConnection: close\r\n\r\nrequest body too large\n",
        }
    }
}

/// The refusal of a head longer than `max`: 414 when its request line
/// alone is (as nginx answers), else 431.
pub fn too_large(head: &[u8], max: usize) -> Refusal {
    if head[..head.len().min(max)].contains(&b'\n') {
        Refusal::TooLarge
    } else {
        Refusal::UriTooLong
    }
}

/// A backend's answer that cannot be relayed (herd answers 502).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed response head")]
pub struct BadResponse;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body runs until the backend closes.
    UntilClose,
}

/// What the proxy needs to know of a request after its head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub body: Framing,
    pub http10: bool,
    /// The client wants the connection kept open after the answer.
    pub keep_alive: bool,
    /// `Upgrade` with `Connection: upgrade` (WebSocket and the like).
    pub upgrade: bool,
    /// HEAD: the answer has no body whatever its headers say.
    pub head_method: bool,
    /// Safe to send twice (RFC 9110, 9.2.2).
    pub idempotent: bool,
    /// The bytes a hashing strategy balances on, from the head.
    pub key: Option<(usize, usize)>,
    /// The bytes a deploy's split hashes on, from the head.
    pub split_key: Option<(usize, usize)>,
    /// The request line's method and target, in the head.
    pub method: (usize, usize),
    pub target: (usize, usize),
    /// For the access log (when asked): `Referer` and `User-Agent`.
    pub referer: Option<(usize, usize)>,
    pub user_agent: Option<(usize, usize)>,
    /// An HTTP/1.0 request without `Host`: the backend's head, sent as
    /// HTTP/1.1, needs one ([`add_host`]), or a strict server answers 400.
    pub no_host: bool,
    /// `Expect: 100-continue`: the client waits for a `100` before its body.
    pub expect_continue: bool,
    /// The client's address: the peer's, or the one a balancer in front
    /// named (`--real-ip-from`).
    pub client: IpAddr,
}

/// What the proxy needs to know of a response after its head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Framing,
    /// 1xx other than 101: another head follows.
    pub interim: bool,
    /// The backend connection may carry another request.
    pub backend_keep_alive: bool,
    /// The client connection stays open after this answer.
    pub client_keep_alive: bool,
    /// A chunked body goes to an HTTP/1.0 client without its chunk framing.
    pub dechunk: bool,
    /// A body that ends when the backend closes goes to an HTTP/1.1 client
    /// chunked, so that client's connection stays open (as nginx does).
    pub rechunk: bool,
}

/// Most headers a response may have.
const MAX_RESPONSE_HEADERS: usize = 128;

/// The end of a head in `b` (just past its blank line), looking from
/// `from` on so a head arriving byte by byte is not rescanned.
pub fn head_end(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from.saturating_sub(3);
    while let Some(p) = b[i..].iter().position(|&c| c == b'\n') {
        let nl = i + p;
        match b.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if b.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// How many bytes of empty lines (CRLF or bare LF) begin `b`.
pub fn leading_blank_lines(b: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match b.get(i..i + 2) {
            Some(b"\r\n") => i += 2,
            _ if b.get(i) == Some(&b'\n') => i += 1,
            _ => return i,
        }
    }
}

/// Whether the start of a head not yet whole already cannot be a request
/// line: its method holds a byte no token may (a TLS handshake sent to a
/// plain port, binary noise). Such a client is answered 400 at once, as
/// nginx does, rather than 408 after the header timeout. Only the method's
/// first 32 bytes are looked at; the full parse judges the rest.
pub fn cannot_begin_request(b: &[u8]) -> bool {
    for (i, &c) in b.iter().enumerate().take(32) {
        match c {
            b' ' => return i == 0,
            // Perhaps the first half of a blank line's CRLF.
            b'\r' if i == 0 && b.len() == 1 => return false,
            c if is_tchar(c) => {}
            _ => return true,
        }
    }
    false
}

/// RFC 9110, 5.6.2: the bytes of a token, such as a method.
const fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// A well-formed request-line version httparse does not read.
#[derive(Debug, PartialEq, Eq)]
enum Later {
    /// `HTTP/1.2`…`HTTP/1.9`: read as 1.1, the highest minor version herd
    /// implements (RFC 9112, 2.3), as nginx and HAProxy do; `at` is the
    /// minor digit's offset.
    Minor(usize),
    /// `HTTP/2.0` and above: 505 (RFC 9110, 15.6.6).
    Major,
}

fn later_version(head: &[u8]) -> Option<Later> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = &head[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line.get(line.len().checked_sub(9)?..)? {
        b" HTTP/1.2" | b" HTTP/1.3" | b" HTTP/1.4" | b" HTTP/1.5" | b" HTTP/1.6" | b" HTTP/1.7"
        | b" HTTP/1.8" | b" HTTP/1.9" => Some(Later::Minor(line.len() - 1)),
        [
            b' ',
            b'H',
            b'T',
            b'T',
            b'P',
            b'/',
            b'2'..=b'9',
            b'.',
            b'0'..=b'9',
        ] => Some(Later::Major),
        _ => None,
    }
}

/// How the first bytes of a connection begin HTTP/2 (RFC 9113, 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Headers a proxy consumes or replaces, by lower-case name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Known {
    ContentLength,
    TransferEncoding,
    Host,
    Connection,
    /// Hop-by-hop: `Keep-Alive`, `Proxy-Connection`, `TE`, `Proxy-Authorization`,
    /// `HTTP2-Settings`.
    HopByHop,
    Trailer,
    Upgrade,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    Forwarded,
    Other,
}

fn classify(name: &str) -> Known {
    let n = name.as_bytes();
    let is = |s: &str| n.eq_ignore_ascii_case(s.as_bytes());
    // Lengths first: most names are neither, and this rejects them cheaply.
    match n.len() {
        2 if is("te") => Known::HopByHop,
        4 if is("host") => Known::Host,
        7 if is("upgrade") => Known::Upgrade,
        7 if is("trailer") => Known::Trailer,
        9 if is("forwarded") => Known::Forwarded,
        10 if is("connection") => Known::Connection,
        10 if is("keep-alive") => Known::HopByHop,
        14 if is("content-length") => Known::ContentLength,
        14 if is("http2-settings") => Known::HopByHop,
        15 if is("x-forwarded-for") => Known::XForwardedFor,
        16 if is("proxy-connection") => Known::HopByHop,
        16 if is("x-forwarded-host") => Known::XForwardedHost,
        17 if is("transfer-encoding") => Known::TransferEncoding,
        17 if is("x-forwarded-proto") => Known::XForwardedProto,
        19 if is("proxy-authorization") => Known::HopByHop,
        _ => Known::Other,
    }
}

/// Whether a `Connection` header listing `name` removes it: not for the
/// headers herd frames, routes or forwards by (`Host`, `Content-Length`,
/// `X-Forwarded-For`, …), which a client could otherwise strip by naming
/// them; the hop-by-hop ones go anyway.
pub(super) fn listable(name: &str) -> bool {
    classify(name) == Known::Other
}

/// Whether `name` is one of the headers herd frames by or sets, spelled
/// with `_` for `-` (`Content_Length`, `X_Forwarded_For`). CGI-style servers
/// (WSGI, Rack, PHP) read both spellings as one variable, so a client could
/// reach the app's framing or forwarding through it: dropped, as nginx drops
/// every name with `_` by default.
pub(super) fn underscore_alias(name: &str) -> bool {
    let n = name.as_bytes();
    let mut dashed = [0u8; 19]; // the longest name `classify` knows
    if n.len() > dashed.len() || !n.contains(&b'_') {
        return false;
    }
    for (d, &b) in dashed.iter_mut().zip(n) {
        *d = if b == b'_' { b'-' } else { b };
    }
    std::str::from_utf8(&dashed[..n.len()]).is_ok_and(|d| classify(d) != Known::Other)
}

/// Whether an `Upgrade` protocol is HTTP/2 (`h2c`, or `h2`, which RFC 9113
/// forbids there). A backend that switched to it would take the client's
/// later requests straight, past the proxy's balancing, forwarding headers
/// and log ("h2c smuggling"); herd serves h2c itself, by prior knowledge.
pub(super) fn is_h2_upgrade(protocol: &[u8]) -> bool {
    let name = protocol.split(|&b| b == b'/').next().unwrap_or(protocol);
    name.eq_ignore_ascii_case(b"h2c") || name.eq_ignore_ascii_case(b"h2")
}

/// An `Upgrade` value without its HTTP/2 protocols, borrowed when it has none.
pub(super) fn upgrade_protocols(v: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !tokens(v).any(is_h2_upgrade) {
        return v.into();
    }
    let mut kept = Vec::new();
    for t in tokens(v).filter(|t| !is_h2_upgrade(t)) {
        if !kept.is_empty() {
            kept.extend_from_slice(b", ");
        }
        kept.extend_from_slice(t);
    }
    kept.into()
}

pub(super) fn tokens(v: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty())
}

pub(super) fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// What the `Connection` headers say, and which other headers they name.
#[derive(Default)]
struct ConnectionTokens<'a> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// The header values, to look up listed names in (rarely more than one).
    values: [&'a [u8]; 4],
    count: usize,
    /// More `Connection` lines than `values` holds: then every unknown
    /// header is checked against all of them through `overflow`.
    overflow: bool,
}

impl<'a> ConnectionTokens<'a> {
    fn add(&mut self, v: &'a [u8]) {
        for t in tokens(v) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            }
        }
        if self.count < self.values.len() {
            self.values[self.count] = v;
            self.count += 1;
        } else {
            self.overflow = true;
        }
    }

    /// Whether a `Connection` header names `name` (so it is hop-by-hop).
    fn lists(&self, name: &str, all: &[httparse::Header<'a>]) -> bool {
        let named = |v: &[u8]| tokens(v).any(|t| t.eq_ignore_ascii_case(name.as_bytes()));
        if self.overflow {
            return all
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .any(|h| named(h.value));
        }
        self.values[..self.count].iter().any(|v| named(v))
    }
}

/// A `Content-Length` value: digits only.
fn content_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether the `Transfer-Encoding` codings so far (this value after those
/// already in `norm`) end in `chunked`, applied once only (RFC 9112, 6.1:
/// `chunked, chunked` is no framing a backend reliably agrees on). Writes
/// the codings normalized (lower case, `, `-separated) to `norm`.
fn transfer_coding(v: &[u8], norm: &mut Vec<u8>) -> bool {
    for t in tokens(v) {
        if !norm.is_empty() {
            norm.extend_from_slice(b", ");
        }
        norm.extend(t.iter().map(u8::to_ascii_lowercase));
    }
    let mut codings = tokens(norm);
    codings.next_back() == Some(b"chunked") && codings.all(|t| t != b"chunked")
}

/// Parses the complete request head `head` (through its blank line),
/// checks it, and writes the head to send to a backend into `out`.
/// Who sent a request: the connection's peer, and (`--real-ip-from`) the
/// balancers whose word on the client herd takes.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    pub peer: IpAddr,
    pub real_ip: Option<&'a RealIp>,
}

pub fn request(
    head: &[u8],
    max_headers: usize,
    from: Sender<'_>,
    key_source: &KeySource,
    split_source: &KeySource,
    log: bool,
    out: &mut Vec<u8>,
) -> Result<Request, Refusal> {
    // Uninitialized: httparse fills only what it parses.
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut heap = Vec::new();
    let storage = if max_headers <= stack.len() {
        &mut stack[..max_headers]
    } else {
        heap.reserve_exact(max_headers);
        &mut heap.spare_capacity_mut()[..max_headers]
    };
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, storage) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refusal::BadRequest),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(httparse::Error::Version) => {
            return match later_version(head) {
                // Same length: offsets into the copy hold for `head`.
                Some(Later::Minor(at)) => {
                    let mut copy = head.to_vec();
                    copy[at] = b'1';
                    request(&copy, max_headers, from, key_source, split_source, log, out)
                }
                Some(Later::Major) => Err(Refusal::Version),
                None => Err(Refusal::BadRequest),
            };
        }
        Err(_) => return Err(Refusal::BadRequest),
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refusal::BadRequest);
    };
    if method == "CONNECT" {
        return Err(Refusal::NotAllowed);
    }
    let http10 = version == 0;
    let headers: &[httparse::Header<'_>] = req.headers;

    let mut conn = ConnectionTokens::default();
    let mut length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut te_norm = Vec::new();
    let mut host: Option<&[u8]> = None;
    let mut has_upgrade = false;
    let mut xfp = false;
    let mut xfh = false;
    let mut expect_continue = false;
    for h in headers {
        match classify(h.name) {
            Known::ContentLength => {
                let n = content_length(h.value).ok_or(Refusal::BadRequest)?;
                if length.is_some() {
                    return Err(Refusal::BadRequest); // repeated: a smuggling shape
                }
                length = Some(n);
            }
            Known::TransferEncoding => {
                te = true;
                chunked = transfer_coding(h.value, &mut te_norm);
            }
            Known::Host => {
                if host.is_some() || !valid_host(h.value) {
                    return Err(Refusal::BadRequest); // two or a bad one: RFC 9112, 3.2
                }
                host = Some(h.value);
            }
            Known::Connection => conn.add(h.value),
            Known::Upgrade => has_upgrade |= tokens(h.value).any(|t| !is_h2_upgrade(t)),
            Known::XForwardedProto => xfp = true,
            Known::XForwardedHost => xfh = true,
            Known::Other if h.name.len() == 6 && h.name.eq_ignore_ascii_case("expect") => {
                expect_continue |= h.value.eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
    }
    // Ambiguous framing is the request-smuggling shape: refuse it.
    if te && (length.is_some() || !chunked || http10) {
        return Err(Refusal::BadRequest);
    }
    // `*` names the server, not a resource: OPTIONS only (RFC 9112, 3.2.4).
    if target == "*" && method != "OPTIONS" {
        return Err(Refusal::BadRequest);
    }
    // Absolute form: the target's authority is the host (RFC 9112, 3.2.2).
    let (path, authority) = split_target(target)?;
    if host.is_none() && authority.is_none() && !http10 {
        return Err(Refusal::BadRequest);
    }
    let host = authority.or(host);
    let upgrade = has_upgrade && conn.upgrade && !http10;
    let body = if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };

    // The client, as a trusted balancer in front names it, stands for the
    // peer from here on (as with nginx's `realip`). Once balancers are
    // named, only theirs is the word on the scheme and host the client
    // asked for (gunicorn's and uvicorn's `--forwarded-allow-ips`).
    let (client, believed) = match from.real_ip {
        Some(r) => (
            real_ip::client(
                r,
                from.peer,
                headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(&r.header))
                    .map(|h| h.value),
            ),
            real_ip::trusts(r, from.peer),
        ),
        None => (from.peer, true),
    };
    let (xfp, xfh) = (xfp && believed, xfh && believed);

    // The backend's head.
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(a) = authority {
        put(out, "Host", a);
    }
    let mut xff: Option<&[u8]> = None;
    let mut xff_more = false;
    let mut fwd: Option<&[u8]> = None;
    let mut fwd_more = false;
    for h in headers {
        match classify(h.name) {
            Known::Host if authority.is_some() => {}
            Known::ContentLength | Known::TransferEncoding | Known::Connection => {}
            Known::HopByHop => {}
            Known::Upgrade if !upgrade => {}
            Known::Upgrade => {
                let kept = upgrade_protocols(h.value);
                if !kept.is_empty() {
                    put(out, h.name, &kept);
                }
            }
            Known::Trailer if !chunked => {}
            Known::XForwardedProto | Known::XForwardedHost if !believed => {}
            Known::XForwardedFor => {
                xff_more |= xff.is_some();
                xff.get_or_insert(h.value);
            }
            Known::Forwarded => {
                fwd_more |= fwd.is_some();
                fwd.get_or_insert(h.value);
            }
            Known::Other if conn.count > 0 && conn.lists(h.name, headers) => {}
            Known::Other if underscore_alias(h.name) => {}
            _ => put(out, h.name, h.value),
        }
    }
    match body {
        Framing::Chunked => put(out, "Transfer-Encoding", &te_norm),
        Framing::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // An explicit zero stays: some servers want it on a POST.
        _ if length == Some(0) => put(out, "Content-Length", b"0"),
        _ => {}
    }
    if upgrade {
        put(out, "Connection", b"upgrade");
    }
    let ip = client.to_canonical();
    // X-Forwarded-For and Forwarded: earlier hops (every line, in order), then this one.
    out.extend_from_slice(b"X-Forwarded-For: ");
    if xff.is_some() {
        join_all(out, headers, "x-forwarded-for", xff_more, xff);
        out.extend_from_slice(b", ");
    }
    put_ip(out, ip);
    out.extend_from_slice(b"\r\n");
    if !xfp {
        put(out, "X-Forwarded-Proto", b"http");
    }
    // An empty `Host` (allowed, RFC 9110, 7.2) names no host to pass on.
    let named = host.filter(|h| !h.is_empty());
    if !xfh && let Some(h) = named {
        put(out, "X-Forwarded-Host", h);
    }
    out.extend_from_slice(b"Forwarded: ");
    if fwd.is_some() {
        join_all(out, headers, "forwarded", fwd_more, fwd);
        out.extend_from_slice(b", ");
    }
    if ip.is_ipv6() {
        out.extend_from_slice(b"for=\"[");
        put_ip(out, ip);
        out.extend_from_slice(b"]\";proto=http");
    } else {
        out.extend_from_slice(b"for=");
        put_ip(out, ip);
        out.extend_from_slice(b";proto=http");
    }
    if let Some(h) = named {
        out.extend_from_slice(b";host=\"");
        // `valid_host` admits neither (the header and an absolute-form
        // target's authority both pass it): the filter is a guard, and the
        // common case one copy rather than a push per byte.
        if h.iter().any(|&c| c == b'"' || c == b'\\') {
            out.extend(h.iter().filter(|&&c| c != b'"' && c != b'\\'));
        } else {
            out.extend_from_slice(h);
        }
        out.push(b'"');
    }
    out.extend_from_slice(b"\r\n\r\n");

    let key = hash_key(key_source, headers, head);
    let split_key = hash_key(split_source, headers, head);
    let at = |v: &[u8]| {
        let start = v.as_ptr() as usize - head.as_ptr() as usize;
        (start, start + v.len())
    };
    let named = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| at(h.value))
    };
    let (referer, user_agent) = if log {
        (named("referer"), named("user-agent"))
    } else {
        (None, None)
    };
    Ok(Request {
        body,
        http10,
        keep_alive: if http10 {
            conn.keep_alive && !conn.close
        } else {
            !conn.close
        },
        upgrade,
        head_method: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        ),
        key,
        split_key,
        method: at(method.as_bytes()),
        target: at(target.as_bytes()),
        referer,
        user_agent,
        no_host: host.is_none(),
        expect_continue,
        client,
    })
}

/// Gives a backend's head written by [`request`] a `Host` line after its
/// request line, for a request that had none: the address the client
/// reached, as nginx falls back to the server's name.
pub fn add_host(out: &mut Vec<u8>, host: &[u8]) {
    let Some(line) = out.windows(2).position(|w| w == b"\r\n") else {
        return;
    };
    let mut field = Vec::with_capacity(host.len() + 8);
    put(&mut field, "Host", host);
    let at = line + 2;
    out.splice(at..at, field);
}

/// Adds `Connection: close` to a backend's head written by [`request`]
/// (any body bytes after it stay), for a connection herd will not keep
/// ([`crate::upstream::reuse`]): the backend then closes it after its
/// answer, as behind nginx without `keepalive`, rather than wait for the
/// next request on it until herd closes it (a one-thread Puma served less
/// than half as many requests so).
pub fn add_close(out: &mut Vec<u8>) {
    if let Some(end) = head_end(out, 0) {
        out.splice(end - 2..end - 2, *b"Connection: close\r\n");
    }
}

/// Takes `Expect` out of a backend's head written by [`request`]: herd
/// said `100 Continue` itself and read the body, which the backend gets
/// with the head (as nginx does when it buffers a body).
pub fn drop_expect(out: &mut Vec<u8>) {
    let mut at = match out.windows(2).position(|w| w == b"\r\n") {
        Some(line) => line + 2,
        None => return,
    };
    while let Some(len) = out[at..].windows(2).position(|w| w == b"\r\n") {
        if len == 0 {
            return; // the blank line
        }
        let line = &out[at..at + len];
        if line.len() > 7 && line[..7].eq_ignore_ascii_case(b"expect:") {
            out.drain(at..at + len + 2);
        } else {
            at += len + 2;
        }
    }
}

/// Writes `ip` without `core::fmt`, which costs more than the rest of a
/// head's edits (IPv6, rarer, still goes through it).
fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            // Into a stack buffer, then one copy: every request writes the
            // client's address twice (`X-Forwarded-For`, `Forwarded`).
            let mut b = [0u8; 15];
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    b[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    b[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    b[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                b[n] = b'0' + o % 10;
                n += 1;
            }
            out.extend_from_slice(&b[..n]);
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// Writes the values of every `name` header joined by `, `.
fn join_all(
    out: &mut Vec<u8>,
    headers: &[httparse::Header<'_>],
    name: &str,
    several: bool,
    first: Option<&[u8]>,
) {
    if !several {
        out.extend_from_slice(first.unwrap_or_default());
        return;
    }
    let mut sep = false;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        if sep {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(h.value);
        sep = true;
    }
}

fn put(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The bytes of a reg-name: unreserved, sub-delims and `%` of pct-encoded
/// (RFC 3986, 3.2.2). A table, as every request's `Host` goes through it.
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~!$&'()*+,;=%";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

/// Whether `v` is a valid `Host` (RFC 9110, 7.2: `uri-host [":" port]`, or
/// empty): RFC 9112, 3.2 has a server refuse any other. A name with `/`, `@`,
/// spaces or quotes would otherwise reach the app's links and redirects,
/// and `X-Forwarded-Host`.
pub(super) fn valid_host(v: &[u8]) -> bool {
    let reg = |b: &u8| REG_NAME[*b as usize];
    let (host, port) = match v {
        [b'[', ..] => match v.iter().position(|&b| b == b']') {
            // IP-literal: IPv6 (with a zone) or IPvFuture.
            Some(end) if v[1..end].iter().all(|b| reg(b) || *b == b':') => {
                (&v[..=end], &v[end + 1..])
            }
            _ => return false,
        },
        _ => match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &v[v.len()..]),
        },
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    port_ok && (host.first() == Some(&b'[') || host.iter().all(reg))
}

/// Splits a request target into the origin-form path and, for the
/// absolute form, its authority.
fn split_target(t: &str) -> Result<(&str, Option<&[u8]>), Refusal> {
    if t.starts_with('/') || t == "*" {
        return Ok((t, None));
    }
    let rest = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .or_else(|| {
            let lower = t.get(..8)?.to_ascii_lowercase();
            if lower.starts_with("http://") {
                t.get(7..)
            } else if lower == "https://" {
                t.get(8..)
            } else {
                None
            }
        })
        .ok_or(Refusal::BadRequest)?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || !valid_host(authority.as_bytes()) {
        return Err(Refusal::BadRequest);
    }
    // "http://h?q" would need a "/" inserted: rare enough to refuse.
    let path = match path.as_bytes().first() {
        None => "/",
        Some(b'/') => path,
        Some(_) => return Err(Refusal::BadRequest),
    };
    Ok((path, Some(authority.as_bytes())))
}

/// Where in `head` the hashing strategy's key is.
fn hash_key(
    src: &KeySource,
    headers: &[httparse::Header<'_>],
    head: &[u8],
) -> Option<(usize, usize)> {
    let at = |v: &[u8]| {
        let start = v.as_ptr() as usize - head.as_ptr() as usize;
        (start, start + v.len())
    };
    match src {
        KeySource::None | KeySource::ClientIp | KeySource::Sni => None,
        KeySource::Header(name) => headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| at(h.value)),
        KeySource::Cookie(name) => headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .flat_map(|h| h.value.split(|&b| b == b';'))
            .find_map(|kv| {
                let kv = trim(kv);
                let eq = kv.iter().position(|&b| b == b'=')?;
                (trim(&kv[..eq]) == name.as_bytes()).then(|| at(trim(&kv[eq + 1..])))
            }),
    }
}

/// The request's context for reading its answer.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    pub head_method: bool,
    pub upgrade: bool,
    pub http10: bool,
    /// The client's connection stays open if the answer allows it.
    pub keep_alive: bool,
}

/// Parses a backend's response head. `Ok(None)`: not complete yet. The
/// head for the client goes to `out`.
pub fn response(
    buf: &[u8],
    asked: Asked,
    out: &mut Vec<u8>,
) -> Result<Option<(usize, Response)>, BadResponse> {
    let mut headers =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BadResponse),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(BadResponse);
    };
    // httparse takes any three digits; under 100 is no status (RFC 9110,
    // 15), and would reach the client as `HTTP/1.1 0`.
    if status < 100 {
        return Err(BadResponse);
    }
    let reason = resp.reason.unwrap_or("");
    let headers: &[httparse::Header<'_>] = resp.headers;
    let mut conn = ConnectionTokens::default();
    let mut length: Option<Option<u64>> = None;
    let mut te = false;
    let mut chunked = false;
    let mut te_norm = Vec::new();
    for h in headers {
        match classify(h.name) {
            Known::ContentLength => {
                // `42, 42` is one length (RFC 9110, 8.6), as nginx and
                // HAProxy read it; a request with it is refused instead.
                let mut values = h.value.split(|&b| b == b',').map(content_length);
                let first = values.next().flatten();
                let n = first.filter(|_| values.all(|v| v == first));
                // Repeats must agree; a bad one leaves the length unknown.
                length = match length {
                    None => Some(n),
                    Some(prev) if prev == n => Some(n),
                    Some(_) => Some(None),
                };
            }
            Known::TransferEncoding => {
                te = true;
                chunked = transfer_coding(h.value, &mut te_norm);
            }
            Known::Connection => conn.add(h.value),
            _ => {}
        }
    }
    let interim = (100..200).contains(&status) && status != 101;
    let switching = status == 101;
    if switching && !asked.upgrade {
        return Err(BadResponse); // a protocol switch nobody asked for
    }
    let body = if asked.head_method || interim || switching || status == 204 || status == 304 {
        Framing::None
    } else if te {
        if chunked {
            Framing::Chunked
        } else if tokens(&te_norm).filter(|t| *t == b"chunked").count() > 1 {
            return Err(BadResponse); // chunked twice: no reliable framing
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(Some(0)) => Framing::None,
            Some(Some(n)) => Framing::Length(n),
            Some(None) => return Err(BadResponse), // no way to tell where it ends
            None => Framing::UntilClose,
        }
    };
    let backend_keep_alive = !switching
        && body != Framing::UntilClose
        && !(te && length.is_some())
        && if version == 0 {
            conn.keep_alive && !conn.close
        } else {
            !conn.close
        };
    let dechunk = body == Framing::Chunked && asked.http10;
    // Only without any Transfer-Encoding: `gzip` alone would need `gzip,
    // chunked`, too rare to be worth it.
    let rechunk = body == Framing::UntilClose && !te && asked.keep_alive && !asked.http10;
    let client_keep_alive = !interim
        && !switching
        && asked.keep_alive
        && (body != Framing::UntilClose || rechunk)
        && !dechunk;
    let pass_chunked = body == Framing::Chunked && !dechunk;

    out.clear();
    // httparse reads exactly three digits.
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    // 1xx and 204 answers have no length to give (RFC 9110, 8.6); a client
    // that believed one would wait for a body that never comes.
    let mut cl_written = interim || status == 204;
    for h in headers {
        match classify(h.name) {
            Known::Connection | Known::HopByHop | Known::TransferEncoding => {}
            // Written once, as a number: repeats and `42, 42` agreed.
            Known::ContentLength if te || cl_written => {}
            Known::ContentLength => {
                if let Some(Some(n)) = length {
                    out.extend_from_slice(b"Content-Length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                cl_written = true;
            }
            Known::Upgrade if !switching => {}
            Known::Trailer if !pass_chunked => {}
            Known::Other if conn.count > 0 && conn.lists(h.name, headers) => {}
            _ => put(out, h.name, h.value),
        }
    }
    if pass_chunked {
        put(out, "Transfer-Encoding", &te_norm);
    } else if te && body == Framing::UntilClose {
        // `gzip` alone, or `chunked, gzip`: passed on as it came, with the
        // body, ended by the close; without it the client would take the
        // coded bytes for the content.
        put(out, "Transfer-Encoding", &te_norm);
    } else if rechunk {
        put(out, "Transfer-Encoding", b"chunked");
    }
    if switching {
        put(out, "Connection", b"upgrade");
    } else if !interim {
        if !client_keep_alive {
            put(out, "Connection", b"close");
        } else if asked.http10 {
            put(out, "Connection", b"keep-alive");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((
        len,
        Response {
            status,
            body,
            interim,
            backend_keep_alive,
            client_keep_alive,
            dechunk,
            rechunk,
        },
    )))
}

/// A short answer of herd's own: status, reason and body, `extra` header
/// lines (each ending in CRLF) first; to a `HEAD`, the head alone (RFC
/// 9110, 9.3.2: a client that reads no body would take it for the next
/// answer's start).
pub fn own_answer(
    out: &mut Vec<u8>,
    (status, reason, body): (u16, &str, &str),
    extra: std::fmt::Arguments<'_>,
    keep_alive: bool,
    head_method: bool,
) {
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    );
    if !head_method {
        out.extend_from_slice(body.as_bytes());
    }
}

/// `--rate-limit`'s answer, with `Retry-After`.
pub const RATE_LIMITED: (u16, &str, &str) = (429, "Too Many Requests", "too many requests\n");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_goes_at_the_end_of_the_head_and_the_body_bytes_stay() {
        let mut out = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi".to_vec();
        add_close(&mut out);
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
    }

    #[test]
    fn only_bytes_no_method_may_hold_end_a_head_early() {
        for ok in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"GET /x",
            b"PRI * HT",
            b"\r",
            b"M-SEARCH * HTTP/1.1",
            b"get /",
        ] {
            assert!(!cannot_begin_request(ok), "{ok:?}");
        }
        for bad in [
            &b"\x16\x03\x01"[..],
            b"GE\x00",
            b" GET",
            b"\rX",
            b"G\tET /",
            b"{\"a\":1}",
        ] {
            assert!(cannot_begin_request(bad), "{bad:?}");
        }
    }

    #[test]
    fn an_address_is_written_as_std_writes_it() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let edges = [
            0u32,
            1,
            9,
            10,
            99,
            100,
            255,
            0x0a00_0001,
            0x7f00_0001,
            u32::MAX,
        ];
        let random = (0..2000).map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u32
        });
        for a in edges.into_iter().chain(random) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(a));
            let mut out = Vec::new();
            put_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().into_bytes());
        }
    }

    #[test]
    fn the_host_table_is_the_rfc_set() {
        for b in 0..=255u8 {
            let rfc = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b);
            assert_eq!(REG_NAME[b as usize], rfc, "byte {b}");
        }
    }

    fn peer() -> Sender<'static> {
        Sender {
            peer: "192.0.2.7".parse().unwrap(),
            real_ip: None,
        }
    }

    fn req(head: &str) -> Result<(Request, String), Refusal> {
        let mut out = Vec::new();
        let r = request(
            head.as_bytes(),
            100,
            peer(),
            &KeySource::None,
            &KeySource::None,
            false,
            &mut out,
        )?;
        Ok((r, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn a_plain_get_is_copied_with_forwarding_headers() {
        let (r, out) = req("GET /a?b HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(r.body, Framing::None);
        assert!(r.keep_alive && r.idempotent && !r.upgrade);
        assert_eq!(
            out,
            "GET /a?b HTTP/1.1\r\nHost: example\r\nAccept: */*\r\nX-Forwarded-For: 192.0.2.7\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: example\r\n\
             Forwarded: for=192.0.2.7;proto=http;host=\"example\"\r\n\r\n"
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            put_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_earlier_hops_are_kept() {
        let (r, out) = req(
            "POST / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\
             Keep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\
             Forwarded: for=10.0.0.1\r\nX-Forwarded-Proto: https\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, Framing::Length(3));
        assert!(!r.keep_alive && !r.idempotent);
        let lower = out.to_ascii_lowercase();
        for gone in ["x-secret", "keep-alive", "te:", "connection"] {
            assert!(!lower.contains(gone), "{gone} in {out}");
        }
        assert!(
            out.contains("X-Forwarded-For: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\n"),
            "{out}"
        );
        assert!(out.contains("Forwarded: for=10.0.0.1, for=192.0.2.7;proto=http;host=\"h\"\r\n"));
        assert!(out.contains("X-Forwarded-Proto: https\r\n") && !out.contains("proto: http\r"));
        assert!(out.contains("Content-Length: 3\r\n"));
    }

    #[test]
    fn framing_that_two_parsers_could_read_differently_is_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1 EXTRA\r\nHost: h\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET ftp://x/ HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            assert_eq!(req(bad).err(), Some(Refusal::BadRequest), "{bad:?}");
        }
        assert_eq!(
            req("CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n").err(),
            Some(Refusal::NotAllowed)
        );
        let (_, out) = req("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert!(out.starts_with("OPTIONS * HTTP/1.1\r\n"), "{out}");
    }

    #[test]
    fn underscore_spellings_of_framing_and_forwarding_headers_are_dropped() {
        let (r, out) = req(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nTransfer_Encoding: chunked\r\n\
             content_length: 9\r\nX_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Proto: https\r\n\
             My_Header: kept\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, Framing::Length(2));
        for gone in [
            "Transfer_Encoding",
            "content_length",
            "X_Forwarded_For",
            "X_Forwarded_Proto",
        ] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert!(out.contains("My_Header: kept\r\n"), "{out}");
        assert!(out.contains("X-Forwarded-Proto: http\r\n"), "{out}");
    }

    #[test]
    fn chunked_is_forwarded_normalized() {
        let (r, out) =
            req("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\ntransfer-encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(r.body, Framing::Chunked);
        assert!(
            out.contains("Transfer-Encoding: gzip, chunked\r\n"),
            "{out}"
        );
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_host() {
        let (_, out) =
            req("GET http://Example.com:81/p?q HTTP/1.1\r\nHost: other\r\n\r\n").unwrap();
        assert!(
            out.starts_with("GET /p?q HTTP/1.1\r\nHost: Example.com:81\r\n"),
            "{out}"
        );
        assert!(!out.contains("other"), "{out}");
        let (_, out) = req("GET http://e HTTP/1.1\r\n\r\n").unwrap();
        assert!(out.starts_with("GET / HTTP/1.1\r\nHost: e\r\n"), "{out}");
    }

    #[test]
    fn a_host_must_be_a_host() {
        for good in [
            "a",
            "",
            "Example.com:8080",
            "a_b.c-d~e",
            "xn--bcher-kva.example",
            "127.0.0.1:80",
            "[::1]",
            "[fe80::1%25eth0]:80",
            "h:",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert!(req(&head).is_ok(), "{good:?}");
        }
        for bad in [
            "a b", "a/b", "a@b", "a\\b", "a\"b", "a<b", "a?b", "a#b", "a:80:90", "a:x", "[::1",
            "[::1]x", "[::1]:y", "\u{e9}",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert!(req(&head).is_err(), "{bad:?}");
            // In a target, `/` and `?` end the authority.
            let head = format!("GET http://{bad}/ HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(
                bad.contains(['/', '?']) || req(&head).is_err(),
                "absolute {bad:?}"
            );
        }
    }

    #[test]
    fn expect_is_seen_and_can_be_taken_out() {
        let head = "POST / HTTP/1.1\r\nHost: h\r\nEXPECT: 100-Continue\r\nContent-Length: 3\r\nX-Expected: 1\r\n\r\n";
        let (r, out) = req(head).unwrap();
        assert!(r.expect_continue);
        let mut out = out.into_bytes();
        drop_expect(&mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.to_ascii_lowercase().contains("expect:"), "{out}");
        assert!(out.contains("Host: h\r\nX-Expected: 1\r\n"), "{out}");
        assert!(out.contains("Content-Length: 3\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "{out}");
        let (r, _) = req("POST / HTTP/1.1\r\nHost: h\r\nExpect: nothing\r\n\r\n").unwrap();
        assert!(!r.expect_continue);
    }

    #[test]
    fn http10_and_upgrades() {
        let (r, out) = req("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(r.http10 && !r.keep_alive && r.no_host);
        // Sent on as HTTP/1.1, which must name a host (RFC 9112, 3.2).
        let mut out = out.into_bytes();
        add_host(&mut out, b"127.0.0.1:8000");
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nX-Forwarded-For: "),
            "{out}"
        );
        assert!(
            !out.contains("X-Forwarded-Host") && !out.contains(";host="),
            "{out}"
        );
        let (r, _) = req("GET / HTTP/1.0\r\nHost: h\r\n\r\n").unwrap();
        assert!(!r.no_host);
        let (r, out) = req("GET / HTTP/1.1\r\nHost:\r\n\r\n").unwrap();
        assert!(!r.no_host);
        assert!(
            out.starts_with("GET / HTTP/1.1\r\nHost: \r\nX-Forwarded-For: "),
            "{out}"
        );
        assert!(
            !out.contains("X-Forwarded-Host") && !out.contains(";host="),
            "{out}"
        );
        let (r, _) = req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(r.keep_alive);
        let (r, out) =
            req("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap();
        assert!(r.upgrade);
        assert!(out.contains("Upgrade: websocket\r\n") && out.contains("Connection: upgrade\r\n"));
        let (r, out) = req("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(!r.upgrade && !out.contains("websocket"), "{out}");
    }

    #[test]
    fn h2c_upgrades_are_not_passed_on() {
        // curl --http2 sends this; a backend that switched would own the
        // connection's later requests.
        let h2c = "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                   Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n";
        let (r, out) = req(h2c).unwrap();
        assert!(!r.upgrade && r.keep_alive, "{out}");
        let lower = out.to_ascii_lowercase();
        assert!(
            !lower.contains("upgrade") && !lower.contains("http2-settings"),
            "{out}"
        );
        for v in ["H2C", "h2", "h2c, h2", " h2c/1 "] {
            let head =
                format!("GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: {v}\r\n\r\n");
            let (r, out) = req(&head).unwrap();
            assert!(
                !r.upgrade && !out.to_ascii_lowercase().contains("upgrade"),
                "{v}: {out}"
            );
        }
        // Another protocol offered beside h2c still goes, without h2c.
        let both = "GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\
                    Upgrade: h2c, websocket\r\n\r\n";
        let (r, out) = req(both).unwrap();
        assert!(r.upgrade, "{out}");
        assert!(
            out.contains("Upgrade: websocket\r\n") && !out.contains("h2c"),
            "{out}"
        );
        // An HTTP2-Settings header alone is hop-by-hop too.
        let (_, out) = req("GET / HTTP/1.1\r\nHost: h\r\nHTTP2-Settings: x\r\n\r\n").unwrap();
        assert!(!out.contains("HTTP2-Settings"), "{out}");
    }

    #[test]
    fn a_trusted_balancers_client_stands_for_the_peer() {
        let r = RealIp::new(vec!["192.0.2.0/24".parse().unwrap()], "X-Forwarded-For");
        let head = "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 2001:db8::9\r\n\
                    X-Forwarded-Proto: https\r\nX-Forwarded-Host: a.example\r\n\r\n";
        let ask = |peer: &str| {
            let from = Sender {
                peer: peer.parse().unwrap(),
                real_ip: Some(&r),
            };
            let mut out = Vec::new();
            let none = KeySource::None;
            let req = request(head.as_bytes(), 100, from, &none, &none, false, &mut out).unwrap();
            (req.client.to_string(), String::from_utf8(out).unwrap())
        };
        let (client, out) = ask("192.0.2.7");
        assert_eq!(client, "2001:db8::9");
        assert!(
            out.contains("X-Forwarded-For: 2001:db8::9, 2001:db8::9\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Forwarded: for=\"[2001:db8::9]\";proto=http"),
            "{out}"
        );
        assert!(out.contains("X-Forwarded-Proto: https\r\n"), "{out}");
        assert!(out.contains("X-Forwarded-Host: a.example\r\n"), "{out}");
        // Not from a balancer named: its word on the scheme and host is not taken.
        let (client, out) = ask("198.51.100.1");
        assert_eq!(client, "198.51.100.1");
        assert!(
            out.contains("X-Forwarded-Proto: http\r\n") && !out.contains("https"),
            "{out}"
        );
        assert!(
            out.contains("X-Forwarded-Host: h\r\n") && !out.contains("a.example"),
            "{out}"
        );
        assert!(
            out.contains("X-Forwarded-For: 2001:db8::9, 198.51.100.1\r\n"),
            "{out}"
        );
    }

    #[test]
    fn hash_keys_point_into_the_head() {
        let head = "GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1; sid=xyz ; b=2\r\nX-User: bob\r\n\r\n";
        let mut out = Vec::new();
        let key = |src| {
            request(
                head.as_bytes(),
                100,
                peer(),
                &src,
                &KeySource::None,
                false,
                &mut Vec::new(),
            )
            .unwrap()
            .key
            .map(|(a, b)| &head[a..b])
        };
        assert_eq!(key(KeySource::Cookie("sid".into())), Some("xyz"));
        assert_eq!(key(KeySource::Header("x-user".into())), Some("bob"));
        assert_eq!(key(KeySource::Cookie("none".into())), None);
        let _ = request(
            head.as_bytes(),
            100,
            peer(),
            &KeySource::None,
            &KeySource::None,
            false,
            &mut out,
        );
    }

    fn resp(head: &str, asked: Asked) -> Result<(Response, String), BadResponse> {
        let mut out = Vec::new();
        let (n, r) = response(head.as_bytes(), asked, &mut out)?.ok_or(BadResponse)?;
        assert_eq!(n, head.len());
        Ok((r, String::from_utf8(out).unwrap()))
    }

    const GET11: Asked = Asked {
        head_method: false,
        upgrade: false,
        http10: false,
        keep_alive: true,
    };

    #[test]
    fn a_long_request_line_is_414_and_long_headers_431() {
        let line = format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(100));
        assert_eq!(too_large(line.as_bytes(), 64), Refusal::UriTooLong);
        assert_eq!(too_large(&line.as_bytes()[..80], 64), Refusal::UriTooLong);
        let headers = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(too_large(headers.as_bytes(), 64), Refusal::TooLarge);
    }

    #[test]
    fn a_refusal_logs_what_it_answers() {
        for r in [
            Refusal::BadRequest,
            Refusal::TooLarge,
            Refusal::UriTooLong,
            Refusal::Timeout,
            Refusal::NotAllowed,
            Refusal::Version,
            Refusal::BodyTooLarge,
        ] {
            let text = std::str::from_utf8(r.response()).unwrap();
            let (status, len) = r.logged();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            assert_eq!(text.split_once("\r\n\r\n").unwrap().1.len() as u64, len);
        }
    }

    #[test]
    fn later_http_1_minor_versions_are_read_as_1_1_and_later_majors_refused() {
        let (r, out) = req("GET /a HTTP/1.2\r\nHost: h\r\nX-Up: 1\r\n\r\n").unwrap();
        assert!(r.keep_alive && !r.http10);
        assert_eq!(r.target, (4, 6));
        assert!(
            out.starts_with("GET /a HTTP/1.1\r\nHost: h\r\nX-Up: 1\r\n"),
            "{out}"
        );
        assert!(req("GET / HTTP/1.9\nHost: h\n\n").is_ok());
        for v in ["2.0", "3.0", "9.9"] {
            let head = format!("GET / HTTP/{v}\r\nHost: h\r\n\r\n");
            assert_eq!(req(&head).unwrap_err(), Refusal::Version, "{v}");
        }
        for bad in ["1.10", "0.9", "10.0", "1.x", "2", "2.0.1"] {
            let head = format!("GET / HTTP/{bad}\r\nHost: h\r\n\r\n");
            assert_eq!(req(&head).unwrap_err(), Refusal::BadRequest, "{bad}");
        }
        assert_eq!(
            req("GET / http/1.2\r\nHost: h\r\n\r\n").unwrap_err(),
            Refusal::BadRequest
        );
    }

    #[test]
    fn responses_are_framed_as_rfc_9112_says() {
        let (r, out) = resp(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: x\r\n\r\n",
            GET11,
        )
        .unwrap();
        assert_eq!(r.body, Framing::Length(5));
        assert!(r.backend_keep_alive && r.client_keep_alive);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        let (r, _) = resp(
            "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            GET11,
        )
        .unwrap();
        assert_eq!(r.body, Framing::None);
        assert_eq!(
            resp(
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                GET11
            )
            .unwrap()
            .1,
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
        assert_eq!(
            resp(
                "HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\nLink: </a>\r\n\r\n",
                GET11
            )
            .unwrap()
            .1,
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        );
        // A coding that is not chunked goes on with a body ended by the close.
        let (r, out) = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            GET11,
        )
        .unwrap();
        assert_eq!(r.body, Framing::UntilClose);
        assert!(!r.client_keep_alive);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\nConnection: close\r\n\r\n"
        );
        let head = Asked {
            head_method: true,
            ..GET11
        };
        let (r, out) = resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head).unwrap();
        assert_eq!(r.body, Framing::None);
        assert!(out.contains("Content-Length: 5"));
        for odd in ["000", "099"] {
            let head = format!("HTTP/1.1 {odd} X\r\nContent-Length: 0\r\n\r\n");
            assert!(resp(&head, GET11).is_err(), "{odd}");
        }
        let (r, out) = resp("HTTP/1.1 200 OK\r\n\r\n", GET11).unwrap();
        assert_eq!(r.body, Framing::UntilClose);
        assert!(r.rechunk && !r.backend_keep_alive && r.client_keep_alive);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let closing = Asked {
            keep_alive: false,
            ..GET11
        };
        let (r, out) = resp("HTTP/1.0 200 OK\r\n\r\n", closing).unwrap();
        assert!(!r.rechunk && !r.client_keep_alive);
        assert!(out.ends_with("Connection: close\r\n\r\n"));
        let (r, out) = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", GET11).unwrap();
        assert!(
            !r.rechunk && !r.client_keep_alive,
            "gzip alone: until close"
        );
        assert!(out.ends_with("Connection: close\r\n\r\n"));
        let (r, out) =
            resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nTrailer: X\r\n\r\n", GET11)
                .unwrap();
        assert_eq!(r.body, Framing::Chunked);
        assert!(
            !r.backend_keep_alive,
            "TE with CL: the backend connection is not reused"
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTrailer: X\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert!(
            resp(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                GET11
            )
            .is_err()
        );
        // Agreeing repeats, on lines or in a list, are one length, written once.
        for same in [
            "Content-Length: 5, 5\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5,5\r\nContent-Length: 5\r\n",
        ] {
            let (r, out) = resp(&format!("HTTP/1.1 200 OK\r\n{same}\r\n"), GET11).unwrap();
            assert_eq!(r.body, Framing::Length(5), "{same}");
            assert_eq!(
                out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                "{same}"
            );
        }
        for differ in ["5, 6", "5,", ", 5", "5, x"] {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {differ}\r\n\r\n");
            assert!(resp(&head, GET11).is_err(), "{differ}");
        }
        let (r, _) = resp("HTTP/1.1 100 Continue\r\n\r\n", GET11).unwrap();
        assert!(r.interim);
        assert!(
            resp(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                GET11
            )
            .is_err()
        );
        assert!(resp("NOT HTTP\r\n\r\n", GET11).is_err());
        assert!(
            resp(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                GET11
            )
            .is_err(),
            "chunked twice"
        );
        let (r, _) = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            GET11,
        )
        .unwrap();
        assert_eq!(
            r.body,
            Framing::UntilClose,
            "not last: read until close (RFC 9112, 6.3)"
        );
    }

    #[test]
    fn http10_clients_get_no_chunks() {
        let asked = Asked {
            http10: true,
            keep_alive: true,
            ..GET11
        };
        let (r, out) = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            asked,
        )
        .unwrap();
        assert!(r.dechunk && !r.client_keep_alive);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let (r, out) = resp("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", asked).unwrap();
        assert!(r.client_keep_alive);
        assert!(out.ends_with("Connection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn head_end_resumes_where_it_stopped() {
        let b = b"GET / HTTP/1.1\r\nHost: h\r\n\r\nBODY";
        for from in 0..b.len() - 4 {
            assert_eq!(head_end(b, from), Some(b.len() - 4), "from {from}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nX", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: h\r\n", 0), None);
    }

    #[test]
    fn leading_blank_lines_stop_at_anything_else() {
        assert_eq!(leading_blank_lines(b"\r\n\r\n\nGET"), 5);
        assert_eq!(leading_blank_lines(b"GET / HTTP/1.1\r\n"), 0);
        assert_eq!(
            leading_blank_lines(b"\r\n\r"),
            2,
            "a lone CR may be half a CRLF"
        );
        assert_eq!(leading_blank_lines(b"\r\r\n"), 0);
        assert_eq!(leading_blank_lines(b" \r\n"), 0);
    }
}
