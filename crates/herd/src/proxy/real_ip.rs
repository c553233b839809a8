//! `--real-ip-from`: the client's address as a balancer in front names it
//! in a header (`X-Forwarded-For` by default), taken only from the peers
//! listed, as nginx's `realip` module does with `real_ip_recursive on`
//! and HAProxy with `http-request set-src` behind an ACL on `src`. The
//! address found then stands for the peer's wherever herd uses it: the
//! forwarding headers it writes, the access log, `ip-hash` and a release's
//! split by client address.
//!
//! Pure: the header's values in, an address out.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::RealIp;

/// The client a request from `peer` comes from: `peer` itself unless it is
/// trusted; else the header's addresses are read from the last one back
/// (each trusted hop appended the address it saw), and the first that is
/// not trusted is the client (all trusted: the first one). An entry that is
/// not an address (`unknown`, a `Forwarded` element without `for=`, an
/// obfuscated name) ends the walk at the last address found, so nothing
/// an untrusted hop wrote is ever taken. `lines` are the header's values
/// in the order they came.
pub fn client<'v, I>(r: &RealIp, peer: IpAddr, lines: I) -> IpAddr
where
    I: DoubleEndedIterator<Item = &'v [u8]>,
{
    if !trusts(r, peer) {
        return peer;
    }
    let mut found = peer;
    for line in lines.rev() {
        for entry in line.rsplit(|&b| b == b',') {
            let entry = entry.trim_ascii();
            if entry.is_empty() {
                continue; // `a, , b`: an empty list element (RFC 9110, 5.6.1)
            }
            let addr = if r.forwarded {
                forwarded_for(entry).and_then(address)
            } else {
                address(entry)
            };
            let Some(ip) = addr else {
                return found;
            };
            found = ip;
            if !trusts(r, ip) {
                return found;
            }
        }
    }
    found
}

/// Whether `ip` is one of the balancers named.
pub fn trusts(r: &RealIp, ip: IpAddr) -> bool {
    crate::config::in_nets(&r.from, ip)
}

/// `for=` of one `Forwarded` element (RFC 7239): `for=192.0.2.60;proto=http`,
/// `For="[2001:db8::1]:4711"`.
fn forwarded_for(element: &[u8]) -> Option<&[u8]> {
    element.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        pair[..eq]
            .trim_ascii()
            .eq_ignore_ascii_case(b"for")
            .then(|| pair[eq + 1..].trim_ascii())
    })
}

/// An address as balancers write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`, any of them in
/// quotes (`Forwarded`).
fn address(v: &[u8]) -> Option<IpAddr> {
    let v = match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    };
    let s = std::str::from_utf8(v).ok()?;
    let ip = if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else if let Ok(a) = s.parse::<SocketAddr>() {
        a.ip()
    } else {
        IpAddr::V6(
            s.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()?,
        )
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrustedNet;

    fn real(from: &[&str], header: &str) -> RealIp {
        let from = from.iter().map(|s| s.parse::<TrustedNet>().unwrap().0);
        RealIp::new(from.collect(), header)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pick(r: &RealIp, peer: &str, lines: &[&str]) -> IpAddr {
        client(r, ip(peer), lines.iter().map(|l| l.as_bytes()))
    }

    #[test]
    fn only_a_trusted_peer_is_believed() {
        let r = real(&["10.0.0.0/8"], "X-Forwarded-For");
        assert_eq!(pick(&r, "10.1.2.3", &["203.0.113.7"]), ip("203.0.113.7"));
        // A client that writes the header itself is not believed.
        assert_eq!(
            pick(&r, "198.51.100.9", &["203.0.113.7"]),
            ip("198.51.100.9")
        );
        // No header: the peer.
        assert_eq!(pick(&r, "10.1.2.3", &[]), ip("10.1.2.3"));
        // A peer on a dual-stack listener, IPv4-mapped.
        assert_eq!(
            pick(&r, "::ffff:10.1.2.3", &["203.0.113.7"]),
            ip("203.0.113.7")
        );
        assert_eq!(
            pick(&r, "::ffff:10.1.2.3", &["unknown"]),
            ip("::ffff:10.1.2.3")
        );
    }

    #[test]
    fn the_walk_goes_back_over_trusted_hops_only() {
        let r = real(&["10.0.0.0/8", "192.0.2.1"], "X-Forwarded-For");
        // What the client wrote itself (1.1.1.1) stays behind the first untrusted address.
        let xff = ["1.1.1.1, 203.0.113.7, 192.0.2.1"];
        assert_eq!(pick(&r, "10.0.0.2", &xff), ip("203.0.113.7"));
        // Over several lines, the last line's last entry first.
        let lines = ["1.1.1.1", "203.0.113.7", "10.9.9.9, 192.0.2.1"];
        assert_eq!(pick(&r, "10.0.0.2", &lines), ip("203.0.113.7"));
        // Every hop trusted: the first one.
        assert_eq!(
            pick(&r, "10.0.0.2", &["10.0.0.5, 192.0.2.1"]),
            ip("10.0.0.5")
        );
        // Empty list elements are skipped.
        assert_eq!(pick(&r, "10.0.0.2", &["203.0.113.7, ,"]), ip("203.0.113.7"));
    }

    #[test]
    fn a_word_that_is_not_an_address_ends_the_walk() {
        let r = real(&["10.0.0.0/8"], "X-Forwarded-For");
        assert_eq!(
            pick(&r, "10.0.0.2", &["203.0.113.7, unknown"]),
            ip("10.0.0.2")
        );
        assert_eq!(
            pick(&r, "10.0.0.2", &["203.0.113.7, junk, 10.0.0.3"]),
            ip("10.0.0.3")
        );
        assert_eq!(pick(&r, "10.0.0.2", &["203.0.113.7\u{0}"]), ip("10.0.0.2"));
    }

    #[test]
    fn addresses_with_ports_and_brackets() {
        let r = real(&["10.0.0.0/8", "::1/128"], "X-Forwarded-For");
        for (v, want) in [
            ("203.0.113.7:4711", "203.0.113.7"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("::ffff:203.0.113.7", "203.0.113.7"),
        ] {
            assert_eq!(pick(&r, "10.0.0.2", &[v]), ip(want), "{v}");
        }
        assert_eq!(pick(&r, "::1", &["203.0.113.7"]), ip("203.0.113.7"));
    }

    #[test]
    fn forwarded_is_read_by_its_for() {
        let r = real(&["10.0.0.0/8"], "Forwarded");
        let lines = [
            "for=1.1.1.1, For=\"[2001:db8::1]:4711\";proto=https",
            "for=10.0.0.9;by=10.0.0.2",
        ];
        assert_eq!(pick(&r, "10.0.0.2", &lines), ip("2001:db8::1"));
        assert_eq!(
            pick(&r, "10.0.0.2", &["for=_hidden, for=10.0.0.3"]),
            ip("10.0.0.3")
        );
        assert_eq!(pick(&r, "10.0.0.2", &["proto=https"]), ip("10.0.0.2"));
    }
}
