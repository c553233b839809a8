//! Chunked transfer coding (RFC 9112, 7.1), followed byte by byte so a
//! chunked body is relayed as it comes and ends exactly where a strict
//! parser says it ends.
//!
//! Stricter than the RFC's tolerance on purpose: every line ends in CRLF
//! (no bare LF), nothing but `;` or CR follows the size digits (no
//! whitespace), extensions and trailers hold no control bytes, and each
//! trailer line is `name:value` with a token name that is not a framing or
//! routing field (`Content-Length`, `Transfer-Encoding`, `Host`, `Trailer`:
//! RFC 9110, 6.5.1 forbids them there, and a backend that merged one into
//! the head would frame the next message differently). What a lenient
//! backend and herd could read differently is refused instead.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size {
        digits: u8,
        value: u64,
    },
    Ext {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// In a trailer field's name.
    TrailerName,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Where a chunked body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    /// Trailer and chunk-extension bytes seen, bounded by `max_trailer`.
    trailer: usize,
    max_trailer: usize,
    /// The current trailer name's first bytes, lower-cased, and its length.
    name: [u8; NAME_KEPT],
    name_len: usize,
}

/// Enough of a name to tell the forbidden ones (`transfer-encoding`, 17).
const NAME_KEPT: usize = 17;

/// Trailer fields refused: framing and routing (RFC 9110, 6.5.1).
const FORBIDDEN: [&[u8]; 4] = [b"content-length", b"transfer-encoding", b"host", b"trailer"];

/// The body's framing is broken: the message cannot be delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked framing")]
pub struct BadChunk;

/// Size digits beyond this would overflow the chunk size.
const MAX_DIGITS: u8 = 15;

impl Chunked {
    pub fn new(max_trailer: usize) -> Chunked {
        Chunked {
            state: State::Size {
                digits: 0,
                value: 0,
            },
            trailer: 0,
            max_trailer,
            name: [0; NAME_KEPT],
            name_len: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Follows the framing over `data`. Returns how many bytes of `data`
    /// belong to this body (all of them unless it ended inside) and calls
    /// `on_data` with each run of payload bytes (for de-chunking).
    pub fn scan(
        &mut self,
        data: &[u8],
        mut on_data: impl FnMut(Range<usize>),
    ) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Size { digits, value } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= MAX_DIGITS {
                            return Err(BadChunk);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        State::Size {
                            digits: digits + 1,
                            value: value * 16 + d,
                        }
                    }
                    _ if digits == 0 => return Err(BadChunk),
                    b';' => State::Ext { value },
                    b'\r' => State::SizeLf { value },
                    _ => return Err(BadChunk),
                },
                State::Ext { value } => match b {
                    b'\r' => State::SizeLf { value },
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                        // Unbounded, an endless size line would stream on
                        // with no data (hyper caps them at 16 KiB too).
                        self.count_trailer()?;
                        State::Ext { value }
                    }
                    _ => return Err(BadChunk),
                },
                State::SizeLf { value } => match b {
                    b'\n' if value == 0 => State::TrailerStart,
                    b'\n' => State::Data(value),
                    _ => return Err(BadChunk),
                },
                State::Data(n) => {
                    let take = (n as usize).min(data.len() - i);
                    on_data(i..i + take);
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(BadChunk),
                },
                State::DataLf => match b {
                    b'\n' => State::Size {
                        digits: 0,
                        value: 0,
                    },
                    _ => return Err(BadChunk),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    _ => {
                        self.name_len = 0;
                        self.name_byte(b)?
                    }
                },
                State::TrailerName => self.name_byte(b)?,
                State::TrailerLine => self.trailer_byte(b)?,
                State::TrailerLf => match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err(BadChunk),
                },
                State::EndLf => match b {
                    b'\n' => {
                        self.state = State::Done;
                        return Ok(i + 1);
                    }
                    _ => return Err(BadChunk),
                },
            };
            i += 1;
        }
        Ok(i)
    }

    /// A byte of a trailer field's name: a token, ended by `:` (no
    /// whitespace before it, no obs-fold, no line without a colon).
    fn name_byte(&mut self, b: u8) -> Result<State, BadChunk> {
        self.count_trailer()?;
        if b == b':' {
            let name = &self.name[..self.name_len.min(NAME_KEPT)];
            if self.name_len == 0 || (self.name_len <= NAME_KEPT && FORBIDDEN.contains(&name)) {
                return Err(BadChunk);
            }
            return Ok(State::TrailerLine);
        }
        if !is_tchar(b) {
            return Err(BadChunk);
        }
        if let Some(slot) = self.name.get_mut(self.name_len) {
            *slot = b.to_ascii_lowercase();
        }
        self.name_len += 1;
        Ok(State::TrailerName)
    }

    fn count_trailer(&mut self) -> Result<(), BadChunk> {
        self.trailer += 1;
        if self.trailer > self.max_trailer {
            return Err(BadChunk);
        }
        Ok(())
    }

    fn trailer_byte(&mut self, b: u8) -> Result<State, BadChunk> {
        self.count_trailer()?;
        match b {
            b'\r' => Ok(State::TrailerLf),
            b'\t' | 0x20..=0x7e | 0x80..=0xff => Ok(State::TrailerLine),
            _ => Err(BadChunk),
        }
    }
}

/// RFC 9110's `tchar`: what a field name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Writes a chunk's size line (`{len:x}\r\n`) into `out`; returns its
/// length. 18 bytes hold any `usize`'s.
pub fn size_line(len: usize, out: &mut [u8; 18]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, d) in out[..digits].iter_mut().enumerate() {
        *d = HEX[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    out[digits..digits + 2].copy_from_slice(b"\r\n");
    digits + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_lines_read_back() {
        for len in [0, 1, 15, 16, 255, 4096, 65_535, 1 << 20, usize::MAX] {
            let mut b = [0u8; 18];
            let n = size_line(len, &mut b);
            assert_eq!(&b[..n], format!("{len:x}\r\n").as_bytes());
        }
    }

    /// Scans `input` in pieces of `step` bytes; returns (bytes in the body,
    /// payload) or the error.
    fn run(input: &[u8], step: usize) -> Result<(usize, Vec<u8>), BadChunk> {
        let mut c = Chunked::new(1024);
        let mut payload = Vec::new();
        let mut at = 0;
        while at < input.len() && !c.is_done() {
            let end = (at + step).min(input.len());
            let piece = &input[at..end];
            let n = c.scan(piece, |r| payload.extend_from_slice(&piece[r]))?;
            at += n;
            if n < piece.len() {
                break;
            }
        }
        assert!(c.is_done(), "not done after {input:?}");
        Ok((at, payload))
    }

    #[test]
    fn whole_bodies_in_any_pieces() {
        let body = b"5\r\nhello\r\n6;name=\"v\"\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (n, payload) = run(body, step).unwrap();
            assert_eq!(&body[n..], b"NEXT", "step {step}");
            assert_eq!(payload, b"hello world");
        }
    }

    #[test]
    fn extensions_count_against_the_trailer_budget() {
        let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "a".repeat(1000));
        assert!(run(long.as_bytes(), 64).is_ok());
        let endless = format!("1;{}", "a".repeat(1100));
        let mut c = Chunked::new(1024);
        assert_eq!(c.scan(endless.as_bytes(), |_| {}), Err(BadChunk));
    }

    #[test]
    fn an_extension_does_not_end_the_body() {
        // The old guard took "5;x" for a last chunk: a desync.
        let (n, payload) = run(b"5;x\r\nhello\r\n0\r\n\r\n", 64).unwrap();
        assert_eq!(n, 17);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn loose_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],     // bare LF after the size
            b"5\r\nhello\n0\r\n\r\n",          // bare LF after data
            b"5 \r\nhello\r\n0\r\n\r\n",       // whitespace after the size
            b"zz\r\n",                         // not hex
            b"\r\n",                           // no digits
            b"1234567890abcdef0\r\n",          // overflows
            b"5;a\x00b\r\nhello\r\n",          // NUL in an extension
            b"5;a\nb\r\nhello\r\n",            // LF in an extension
            b"5\r\nhelloXY0\r\n\r\n",          // data longer than its size
            b"0\r\nX: a\nb\r\n\r\n",           // bare LF in a trailer
            b"0\r\nX: a\r\n b\r\n\r\n",        // obs-fold in a trailer
            b"0\r\nX : a\r\n\r\n",             // whitespace before the colon
            b"0\r\nno colon\r\n\r\n",          // not a field
            b"0\r\n: a\r\n\r\n",               // no name
            b"0\r\nContent-Length: 5\r\n\r\n", // framing in a trailer
            b"0\r\ntransfer-encoding: chunked\r\n\r\n",
            b"0\r\nX: 1\r\nHOST: evil\r\n\r\n", // routing in a trailer
            b"0\r\n\n",                         // bare LF at the end
        ] {
            let mut c = Chunked::new(1024);
            assert_eq!(c.scan(bad, |_| {}), Err(BadChunk), "{bad:?}");
        }
    }

    #[test]
    fn ordinary_trailers_pass() {
        let body =
            b"0\r\nX-Checksum: abc\r\nContent-Length-Hint: 5\r\nServer-Timing: db;dur=53\r\n\r\n";
        for step in 1..body.len() {
            assert_eq!(run(body, step).unwrap().0, body.len(), "step {step}");
        }
    }

    #[test]
    fn trailers_are_bounded() {
        let mut c = Chunked::new(8);
        assert_eq!(
            c.scan(b"0\r\nX-Long: 123456\r\n\r\n", |_| {}),
            Err(BadChunk)
        );
    }
}
