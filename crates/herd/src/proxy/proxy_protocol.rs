//! `--accept-proxy`: the PROXY protocol header (HAProxy's, versions 1 and
//! 2) that a load balancer in front (HAProxy's `send-proxy`, nginx's
//! `proxy_protocol on`, AWS's NLB, Google's and Azure's) sends before the
//! client's bytes, to say whose connection it relays. The client's address
//! then stands for the balancer's everywhere herd uses it: forwarding
//! headers, the access log, `ip-hash`.
//!
//! The header is peeked at, parsed here (pure), then exactly its bytes are
//! read off the socket: what follows stays queued for whichever engine
//! serves the connection (HTTP/1.1, TLS, h2c, TCP).
//!
//! `--send-proxy` writes one ([`header`]) before TCP mode's backend
//! connections, so the backend learns the client as well.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::os::lazy::LazyStream;

/// The longest header taken: a version 1 line is at most 107 bytes; a
/// version 2 header is 16 bytes and its addresses, then TLVs (the cloud
/// balancers' are tens of bytes). HAProxy takes what fits its buffer.
pub const MAX_HEADER: usize = 1024;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// A version 1 line's most bytes, CRLF included (the specification's).
const V1_MAX: usize = 107;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error(
        "no PROXY protocol header (the connection did not come through a load balancer that sends one)"
    )]
    Missing,
    #[error("a malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("a PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("no whole PROXY protocol header within {0:?} (--header-timeout)")]
    Timeout(Duration),
    /// Closed before sending anything (not worth a warning: TCP health
    /// checks do it).
    #[error("the connection closed before it sent anything")]
    Closed,
    #[error("reading a PROXY protocol header: {0}")]
    Io(std::io::ErrorKind),
}

/// Takes the header off `io`, waiting for it up to `within`: the client's
/// address it names, else `peer` (the connection's own).
pub async fn read(
    io: &LazyStream,
    peer: SocketAddr,
    within: Duration,
) -> Result<SocketAddr, ProxyHeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    let mut parsed = Ok(Parsed::More);
    let peeked = io.peek_until(&mut buf, |b| {
        parsed = parse(b);
        parsed != Ok(Parsed::More)
    });
    // The deadline's timer is set only if the header is not there at once
    // (with the deferred accept, it is).
    let n = tokio::time::timeout(within, peeked)
        .await
        .map_err(|_| ProxyHeaderError::Timeout(within))?
        .map_err(|e| ProxyHeaderError::Io(e.kind()))?;
    match parsed {
        _ if n == 0 => Err(ProxyHeaderError::Closed),
        Ok(Parsed::Header { len, source }) => {
            io.read_queued(&mut buf[..len])
                .map_err(|e| ProxyHeaderError::Io(e.kind()))?;
            Ok(source.unwrap_or(peer))
        }
        // A full buffer still short of a header (cannot be: see MAX_HEADER).
        Ok(Parsed::More) => Err(ProxyHeaderError::TooLong),
        Err(e) => Err(e),
    }
}

/// `--send-proxy`: the header that tells a backend the connection it gets
/// relays one from `client` to `to` (herd's address the client reached).
/// Addresses of two families (an IPv6 client named by a balancer in front
/// of an IPv4 listener) are both written as IPv6, as HAProxy does.
pub fn header(version: crate::config::SendProxy, client: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (src, dst) = match (client.ip().to_canonical(), to.ip().to_canonical()) {
        (s @ IpAddr::V4(_), d @ IpAddr::V4(_)) | (s @ IpAddr::V6(_), d @ IpAddr::V6(_)) => (s, d),
        (s, d) => (IpAddr::V6(v6(s)), IpAddr::V6(v6(d))),
    };
    match version {
        crate::config::SendProxy::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {src} {dst} {} {}\r\n",
                client.port(),
                to.port()
            )
            .into_bytes()
        }
        crate::config::SendProxy::V2 => {
            let mut h = Vec::with_capacity(16 + 36);
            h.extend_from_slice(V2_SIGNATURE);
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    h.extend_from_slice(&[0x21, 0x21, 0, 36]);
                    h.extend_from_slice(&v6(s).octets());
                    h.extend_from_slice(&v6(d).octets());
                }
            }
            h.extend_from_slice(&client.port().to_be_bytes());
            h.extend_from_slice(&to.port().to_be_bytes());
            h
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header begins, and more bytes are needed.
    More,
    /// A whole header of `len` bytes. `source` is the client's address,
    /// `None` when the balancer speaks for itself (version 2's `LOCAL`,
    /// its health checks; version 1's `UNKNOWN`) or relays something other
    /// than TCP over IP: the connection's own peer stands then.
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
}

/// Parses the header at the start of `b`.
pub fn parse(b: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    // The first byte tells most requests apart at once: the HTTP engine
    // asks this of every new connection's first bytes.
    let (prefix, v2_header): (&[u8], bool) = match b.first() {
        None => return Ok(Parsed::More),
        Some(b'\r') => (V2_SIGNATURE, true),
        Some(b'P') => (V1_PREFIX, false),
        Some(_) => return Err(ProxyHeaderError::Missing),
    };
    let n = b.len().min(prefix.len());
    if b[..n] != prefix[..n] {
        Err(ProxyHeaderError::Missing)
    } else if n < prefix.len() {
        Ok(Parsed::More)
    } else if v2_header {
        v2(b)
    } else {
        v1(b)
    }
}

fn v1(b: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    let window = &b[..b.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&c| c == b'\r' || c == b'\n') else {
        return if b.len() >= V1_MAX {
            Err(bad("no CRLF within 107 bytes"))
        } else {
            Ok(Parsed::More)
        };
    };
    if window[cr] == b'\n' {
        return Err(bad("a line ending in a bare LF"));
    }
    match b.get(cr + 1) {
        None => return Ok(Parsed::More),
        Some(b'\n') if cr + 2 <= V1_MAX => {}
        Some(b'\n') => return Err(bad("a line longer than 107 bytes")),
        Some(_) => return Err(bad("a CR not followed by LF")),
    }
    let line = std::str::from_utf8(&b[V1_PREFIX.len()..cr]).map_err(|_| bad("not ASCII"))?;
    let len = cr + 2;
    let mut words = line.split(' ');
    let family = words.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The rest is to be ignored.
        return Ok(Parsed::Header { len, source: None });
    }
    // Evaluated left to right: the four fields, and nothing after them.
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return Err(bad("not four fields after the protocol"));
    };
    let ip: IpAddr = match family {
        "TCP4" => src
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| bad("a TCP4 source that is not an IPv4 address"))?,
        "TCP6" => src
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| bad("a TCP6 source that is not an IPv6 address"))?,
        _ => return Err(bad("a protocol other than TCP4, TCP6 or UNKNOWN")),
    };
    let port = |p: &str| {
        let ok = !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|c| c.is_ascii_digit())
            && (p == "0" || !p.starts_with('0'));
        ok.then(|| p.parse::<u16>().ok())
            .flatten()
            .ok_or(bad("a port that is not a number from 0 to 65535"))
    };
    let sport = port(sport)?;
    port(dport)?;
    match dst.parse::<IpAddr>() {
        Ok(d) if d.is_ipv4() == ip.is_ipv4() => {}
        _ => {
            return Err(bad(
                "a destination that is not an address of the source's family",
            ));
        }
    }
    Ok(Parsed::Header {
        len,
        source: Some(SocketAddr::new(ip, sport)),
    })
}

fn v2(b: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    if b.len() < 16 {
        return Ok(Parsed::More);
    }
    let (version, command) = (b[12] >> 4, b[12] & 0x0f);
    if version != 2 {
        return Err(bad("a version 2 signature with another version"));
    }
    let rest = u16::from_be_bytes([b[14], b[15]]) as usize;
    let len = 16 + rest;
    if len > MAX_HEADER {
        return Err(ProxyHeaderError::TooLong);
    }
    if b.len() < len {
        return Ok(Parsed::More);
    }
    let addrs = &b[16..len];
    let source = match command {
        // LOCAL: the balancer's own connection (a health check).
        0 => None,
        1 => match b[13] {
            // TCP over IPv4: source, destination, source port, destination port.
            0x11 if addrs.len() >= 12 => {
                let ip = Ipv4Addr::new(addrs[0], addrs[1], addrs[2], addrs[3]);
                let port = u16::from_be_bytes([addrs[8], addrs[9]]);
                Some(SocketAddr::new(IpAddr::V4(ip), port))
            }
            0x21 if addrs.len() >= 36 => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&addrs[..16]);
                let port = u16::from_be_bytes([addrs[32], addrs[33]]);
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
            }
            0x11 | 0x21 => return Err(bad("addresses shorter than their family needs")),
            // UNSPEC, UDP, Unix sockets: no TCP client address to stand for.
            _ => None,
        },
        _ => return Err(bad("a command other than LOCAL or PROXY")),
    };
    Ok(Parsed::Header { len, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(len: usize, source: &str) -> Parsed {
        Parsed::Header {
            len,
            source: Some(source.parse().unwrap()),
        }
    }

    #[test]
    fn version_1_lines() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(parse(line), Ok(found(41, "192.0.2.7:56324")));
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 80\r\n";
        assert_eq!(parse(line), Ok(found(line.len(), "[2001:db8::7]:65535")));
        let unknown = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(
            parse(unknown),
            Ok(Parsed::Header {
                len: unknown.len(),
                source: None
            })
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").map(|_| ()), Ok(()));
        // Every prefix of a header asks for more.
        let whole = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n";
        for n in 0..whole.len() {
            assert_eq!(parse(&whole[..n]), Ok(Parsed::More), "{n} bytes");
        }
    }

    #[test]
    fn version_1_refusals() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443 9\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7  10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\rX",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyHeaderError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyHeaderError::Malformed(_))));
        // 108 bytes, its CR the 107th: one too many, whole or in pieces.
        let line = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 92], b"\r\n"].concat();
        assert_eq!(line.len(), 108);
        assert!(matches!(parse(&line), Err(ProxyHeaderError::Malformed(_))));
        assert_eq!(parse(&line[..107]), Ok(Parsed::More));
        let fits = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 91], b"\r\n"].concat();
        assert!(matches!(parse(&fits), Ok(Parsed::Header { len: 107, .. })));
        // What a client sends straight to herd is no header.
        for plain in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"PRI * HTTP/2.0",
            b"PROXZ",
        ] {
            assert_eq!(parse(plain), Err(ProxyHeaderError::Missing));
        }
    }

    fn v2_header(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn version_2_headers() {
        let v4 = [192, 0, 2, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb];
        let h = v2_header(1, 0x11, &v4);
        assert_eq!(parse(&h), Ok(found(28, "192.0.2.7:56324")));
        // TLVs after the addresses (AWS's VPC endpoint id) are skipped.
        let mut tlv = v4.to_vec();
        tlv.extend_from_slice(&[0xea, 0x00, 0x03, b'v', b'p', b'c']);
        let mut h = v2_header(1, 0x11, &tlv);
        h.extend_from_slice(b"GET /");
        assert_eq!(parse(&h), Ok(found(34, "192.0.2.7:56324")));
        let mut v6 = [0u8; 36];
        v6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse(&v2_header(1, 0x21, &v6)),
            Ok(found(52, "[2001:db8::7]:443"))
        );
        // LOCAL (a health check), UNSPEC and Unix sockets: the peer stands.
        for (command, family, addrs) in [
            (0, 0x11, &v4[..]),
            (0, 0, &[][..]),
            (1, 0x31, &[0; 216][..]),
        ] {
            let h = v2_header(command, family, addrs);
            assert_eq!(
                parse(&h),
                Ok(Parsed::Header {
                    len: h.len(),
                    source: None
                })
            );
        }
        let whole = v2_header(1, 0x11, &v4);
        for n in 0..whole.len() {
            assert_eq!(parse(&whole[..n]), Ok(Parsed::More), "{n} bytes");
        }
    }

    proptest::proptest! {
        /// Any bytes: a header found is no longer than what was read and
        /// every shorter prefix of it asks for more; bytes after it do not
        /// change it; and what asks for more never grows past the limits.
        #[test]
        fn any_bytes_parse_consistently(
            v1 in proptest::collection::vec(proptest::sample::select(
                b"PROXY TCP4 TCP6 UNKNOWN 0123456789.:abcdef \r\n\0".to_vec()), 0..120),
            v2 in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..16),
        ) {
            let v2 = [&V2_SIGNATURE[..], &v2].concat();
            let v1 = [&V1_PREFIX[..], &v1].concat();
            for input in [v1, v2] {
                match parse(&input) {
                    Ok(Parsed::Header { len, source }) => {
                        proptest::prop_assert!(len <= input.len());
                        for n in 0..len {
                            proptest::prop_assert_eq!(parse(&input[..n]), Ok(Parsed::More));
                        }
                        let longer = [&input[..], &tail].concat();
                        proptest::prop_assert_eq!(parse(&longer), Ok(Parsed::Header { len, source }));
                    }
                    Ok(Parsed::More) => proptest::prop_assert!(input.len() < MAX_HEADER),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn headers_written_are_read_back() {
        use crate::config::SendProxy;
        let pairs = [
            ("192.0.2.7:56324", "10.0.0.1:443", "192.0.2.7:56324"),
            ("[2001:db8::7]:1", "[2001:db8::1]:2", "[2001:db8::7]:1"),
            // A v4-mapped client (a dual-stack listener) is written as IPv4.
            ("[::ffff:192.0.2.7]:9", "10.0.0.1:443", "192.0.2.7:9"),
            // Two families: both as IPv6.
            ("[2001:db8::7]:1", "10.0.0.1:2", "[2001:db8::7]:1"),
            ("192.0.2.7:1", "[2001:db8::1]:2", "[::ffff:192.0.2.7]:1"),
        ];
        for version in [SendProxy::V1, SendProxy::V2] {
            for (client, to, read) in pairs {
                let h = super::header(version, client.parse().unwrap(), to.parse().unwrap());
                assert_eq!(
                    parse(&h),
                    Ok(found(h.len(), read)),
                    "{version:?} {client} {to}"
                );
            }
        }
        assert_eq!(
            super::header(
                SendProxy::V1,
                "192.0.2.7:56324".parse().unwrap(),
                "10.0.0.1:443".parse().unwrap()
            ),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n"
        );
    }

    #[test]
    fn version_2_refusals() {
        let v4 = [192, 0, 2, 7, 10, 0, 0, 1, 0, 1, 0, 2];
        let mut other_version = v2_header(1, 0x11, &v4);
        other_version[12] = 0x11;
        let short = v2_header(1, 0x11, &v4[..8]);
        let command = v2_header(2, 0x11, &v4);
        for bad in [other_version, short, command] {
            assert!(
                matches!(parse(&bad), Err(ProxyHeaderError::Malformed(_))),
                "{bad:?}"
            );
        }
        let huge = v2_header(1, 0x11, &[0; 2000]);
        assert_eq!(parse(&huge[..16]), Err(ProxyHeaderError::TooLong));
    }
}
