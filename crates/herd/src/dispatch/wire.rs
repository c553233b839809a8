//! The dispatch socket's wire format: Node's own handle protocol, one JSON
//! line per message (see the parent module). Pure: bytes in, what the
//! worker said out.

/// The worker's fd number for its end of the dispatch socket.
pub const WORKER_FD: i32 = 3;
/// The line sent with each connection's fd.
pub const CONN_LINE: &[u8] =
    b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_HERD_CONN\"}}\n";
/// Longest answer line; longer lines (a chatty app's own messages) are skipped.
pub const LINE_MAX: usize = 4096;

/// One line from a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// `NODE_HANDLE_ACK`: it took the oldest connection it had not answered.
    Took,
    /// `NODE_HANDLE_NACK`: it did not; hand that one to someone else.
    Refused,
    /// `{"herd":"open","open":N}`: its open connections now (least-conn).
    Open(u32),
    /// `{"herd":"closed"}`: send no more.
    Closed,
    /// `{"herd":"listening"}`, or PM2's `process.send('ready')`.
    Listening,
    /// Not the dispatch protocol: an app's own `process.send()` when herd's
    /// Node preload is not there to send it on fd 4 instead.
    Other,
}

#[derive(serde::Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    cmd: Option<&'a str>,
    #[serde(borrow)]
    herd: Option<&'a str>,
    open: Option<u32>,
}

/// What `line` (without its newline) says.
pub fn parse(line: &[u8]) -> Said {
    // Node's own ack, byte for byte: the common case, without JSON.
    const ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}";
    if line == ACK {
        return Said::Took;
    }
    if line == b"\"ready\"" {
        return Said::Listening;
    }
    let Ok(a) = serde_json::from_slice::<Answer<'_>>(line) else {
        return Said::Other;
    };
    match (a.cmd, a.herd) {
        (Some("NODE_HANDLE_ACK"), _) => Said::Took,
        (Some("NODE_HANDLE_NACK"), _) => Said::Refused,
        (_, Some("open")) => Said::Open(a.open.unwrap_or(0)),
        (_, Some("closed")) => Said::Closed,
        (_, Some("listening")) => Said::Listening,
        _ => Said::Other,
    }
}

/// Splits a byte stream into lines in one fixed buffer of [`LINE_MAX`]:
/// allocated once per worker, and a line longer than it is skipped whole.
pub struct Lines {
    buf: Vec<u8>,
    filled: usize,
    skipping: bool,
}

impl Lines {
    pub fn new() -> Lines {
        Lines {
            buf: vec![0; LINE_MAX],
            filled: 0,
            skipping: false,
        }
    }

    /// Where the next read goes.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// `n` bytes were read into [`Lines::spare`]: calls `each` with every
    /// complete line, keeps the rest for the next read.
    pub fn filled(&mut self, n: usize, mut each: impl FnMut(&[u8])) {
        self.filled += n;
        let mut start = 0;
        while let Some(nl) = self.buf[start..self.filled]
            .iter()
            .position(|&b| b == b'\n')
        {
            if !self.skipping {
                each(&self.buf[start..start + nl]);
            }
            self.skipping = false;
            start += nl + 1;
        }
        self.buf.copy_within(start..self.filled, 0);
        self.filled -= start;
        if self.filled == self.buf.len() {
            // A line longer than any answer: not ours; skip to its end.
            self.filled = 0;
            self.skipping = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_is_understood() {
        assert_eq!(parse(b"{\"cmd\":\"NODE_HANDLE_ACK\"}"), Said::Took);
        assert_eq!(parse(b"{ \"cmd\": \"NODE_HANDLE_ACK\" }"), Said::Took);
        assert_eq!(parse(b"{\"cmd\":\"NODE_HANDLE_NACK\"}"), Said::Refused);
        assert_eq!(parse(b"{\"herd\":\"open\",\"open\":7}"), Said::Open(7));
        assert_eq!(parse(b"{\"herd\":\"closed\"}"), Said::Closed);
        assert_eq!(parse(b"{\"herd\":\"listening\"}"), Said::Listening);
        assert_eq!(parse(b"\"ready\""), Said::Listening);
        assert_eq!(parse(b"{\"hello\":1}"), Said::Other);
        assert_eq!(parse(b"not json"), Said::Other);
    }

    fn feed(l: &mut Lines, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        l.spare()[..bytes.len()].copy_from_slice(bytes);
        l.filled(bytes.len(), |line| got.push(line.to_vec()));
        got
    }

    #[test]
    fn lines_split_across_reads() {
        let mut l = Lines::new();
        assert_eq!(feed(&mut l, b"ab\ncd"), [b"ab".to_vec()]);
        assert_eq!(
            feed(&mut l, b"e\n\nf\n"),
            [b"cde".to_vec(), b"".to_vec(), b"f".to_vec()]
        );
        assert_eq!(l.filled, 0);
    }

    #[test]
    fn a_line_longer_than_the_buffer_is_skipped_whole() {
        let mut l = Lines::new();
        let long = vec![b'x'; LINE_MAX];
        assert!(feed(&mut l, &long).is_empty());
        assert_eq!(feed(&mut l, b"xxx\nok\n"), [b"ok".to_vec()]);
    }
}
