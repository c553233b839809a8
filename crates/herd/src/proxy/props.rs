//! Property tests of the parser: requests built from valid parts and
//! hostile mutations (obfuscated `Transfer-Encoding`, list-valued or
//! repeated `Content-Length`, obs-fold, bare LF, NUL and control bytes,
//! odd chunk sizes and extensions). Whatever herd accepts, it must forward
//! with framing that an independent strict reading finds exactly where
//! herd found it; everything else must be refused.

use proptest::prelude::*;

use super::chunked::Chunked;
use super::head::{self, Framing};
use herd_balance::KeySource;

fn te_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("chunked".to_string()),
        Just("Chunked".to_string()),
        Just(" chunked".to_string()),
        Just("chunked ".to_string()),
        Just("gzip, chunked".to_string()),
        Just("chunked, gzip".to_string()),
        Just("xchunked".to_string()),
        Just("chunked\x0b".to_string()),
        Just("chu nked".to_string()),
        Just("identity".to_string()),
        Just("".to_string()),
    ]
}

fn cl_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..40).prop_map(|n| n.to_string()),
        Just("05".to_string()),
        Just("+5".to_string()),
        Just("-1".to_string()),
        Just("5, 5".to_string()),
        Just("5 5".to_string()),
        Just("0x5".to_string()),
        Just("99999999999999999999".to_string()),
        Just("".to_string()),
    ]
}

/// One header line, possibly hostile.
fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => te_value().prop_map(|v| format!("Transfer-Encoding: {v}\r\n")),
        4 => cl_value().prop_map(|v| format!("Content-Length: {v}\r\n")),
        1 => te_value().prop_map(|v| format!("Transfer-Encoding : {v}\r\n")),
        1 => te_value().prop_map(|v| format!("X-Pad: a\r\n {v}\r\n")), // obs-fold
        1 => te_value().prop_map(|v| format!("Transfer-Encoding: {v}\n")), // bare LF
        1 => cl_value().prop_map(|v| format!("Content-Length:{v}\r\n")),
        1 => Just("Connection: close, Transfer-Encoding\r\n".to_string()),
        1 => Just("Connection: keep-alive\r\n".to_string()),
        1 => Just("X-Nul: a\0b\r\n".to_string()),
        1 => Just("X-Ctl: a\x01b\r\n".to_string()),
        1 => Just("X\x01Name: v\r\n".to_string()),
        2 => "[a-zA-Z-]{1,12}: [ -~]{0,16}\r\n",
    ]
}

/// A chunked body, possibly hostile.
fn chunked_body() -> impl Strategy<Value = Vec<u8>> {
    let chunk = (
        1usize..20,
        prop_oneof![
            6 => Just(String::new()),
            1 => Just(";a=b".to_string()),
            1 => Just(" ".to_string()),
            1 => Just(";a\nb".to_string()),
        ],
        prop_oneof![8 => Just("\r\n"), 1 => Just("\n")],
        any::<bool>(), // data shorter than its size
    )
        .prop_map(|(n, ext, eol, short)| {
            let data = "x".repeat(if short { n - 1 } else { n });
            format!("{n:x}{ext}{eol}{data}{eol}")
        });
    (
        prop::collection::vec(chunk, 0..4),
        prop_oneof![4 => Just("0\r\n\r\n"), 1 => Just("0\r\nX-T: 1\r\n\r\n"), 1 => Just("0\n\n")],
    )
        .prop_map(|(chunks, last)| {
            let mut b = chunks.concat().into_bytes();
            b.extend_from_slice(last.as_bytes());
            b.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
            b
        })
}

/// The framing an independent strict reader finds in a forwarded head.
fn strict_framing(out: &[u8]) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len(), "junk after the head"),
        other => panic!(
            "forwarded head does not parse: {other:?}\n{}",
            String::from_utf8_lossy(out)
        ),
    }
    let mut cl = Vec::new();
    let mut te = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl.push(std::str::from_utf8(h.value).unwrap().to_string());
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(std::str::from_utf8(h.value).unwrap().to_string());
        }
    }
    assert!(
        cl.len() <= 1 && te.len() <= 1,
        "repeated framing headers forwarded"
    );
    assert!(cl.is_empty() || te.is_empty(), "both framings forwarded");
    if let Some(te) = te.first() {
        assert!(te == "chunked" || te.ends_with(", chunked"), "{te:?}");
        return Framing::Chunked;
    }
    match cl.first() {
        Some(v) => {
            assert!(v.bytes().all(|b| b.is_ascii_digit()), "{v:?}");
            match v.parse::<u64>().unwrap() {
                0 => Framing::None,
                n => Framing::Length(n),
            }
        }
        None => Framing::None,
    }
}

/// Where a strict chunked reader says the body ends, if it is valid.
fn strict_chunked_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    let line = |i: usize| -> Option<(usize, &[u8])> {
        let p = b[i..].windows(2).position(|w| w == b"\r\n")?;
        let l = &b[i..i + p];
        (!l.contains(&b'\n') && !l.contains(&b'\r')).then_some((i + p + 2, l))
    };
    loop {
        let (next, l) = line(i)?;
        let size_part = l.split(|&c| c == b';').next()?;
        if size_part.is_empty() || !size_part.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        if l.len() > size_part.len() && l[size_part.len()..].iter().any(|&c| c < 0x20 && c != b'\t')
        {
            return None;
        }
        let size = usize::from_str_radix(std::str::from_utf8(size_part).ok()?, 16).ok()?;
        i = next;
        if size == 0 {
            loop {
                let (next, l) = line(i)?;
                i = next;
                if l.is_empty() {
                    return Some(i);
                }
            }
        }
        if b.len() < i + size + 2 || &b[i + size..i + size + 2] != b"\r\n" {
            return None;
        }
        i += size + 2;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn accepted_requests_are_framed_alike_by_a_strict_reader(
        method in prop_oneof![Just("GET"), Just("POST"), Just("PUT")],
        headers in prop::collection::vec(header(), 0..5),
        body in chunked_body(),
    ) {
        let head = format!("{method} /p HTTP/1.1\r\nHost: h\r\n{}\r\n", headers.concat());
        let peer = head::Sender { peer: "192.0.2.1".parse().unwrap(), real_ip: None };
        let mut out = Vec::new();
        let Some(end) = head::head_end(head.as_bytes(), 0) else {
            return Ok(()); // never a complete head: herd waits, then 408/431
        };
        let Ok(req) = head::request(&head.as_bytes()[..end], 100, peer, &KeySource::None, &KeySource::None, false, &mut out) else {
            return Ok(()); // refused: 400
        };
        prop_assert_eq!(strict_framing(&out), req.body);
        if req.body == Framing::Chunked {
            let mut c = Chunked::new(16 * 1024);
            match c.scan(&body, |_| {}) {
                Ok(k) if c.is_done() => prop_assert_eq!(strict_chunked_end(&body), Some(k)),
                Ok(_) => prop_assert_eq!(strict_chunked_end(&body), None),
                Err(_) => {} // refused mid-body: 400 and close
            }
        }
    }
}
