//! Worker stdout/stderr, line by line, prefixed with the worker id (and,
//! in a log file, the time and `:err` for stderr: `… [2:err] text`).
//!
//! One writer thread owns the master's stdout and stderr, so whole lines
//! never interleave and a slow terminal blocks no async task; readers wait
//! on a bounded queue instead (back-pressure to the workers).

use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

/// Longer lines are cut into pieces of this size, each prefixed.
const MAX_LINE: u64 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

/// A worker's line as the log file has it, `TIME [ID] text` or
/// `TIME [ID:err] text` (or, from older files, without the time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLine {
    pub slot: usize,
    pub stream: Stream,
    /// Where `[ID…]` starts: the line from there has no time.
    pub tag_at: usize,
}

/// Reads a log line's worker tag; `None` for herd's own lines.
pub fn worker_line(line: &[u8]) -> Option<WorkerLine> {
    let tag_at = match line.first()? {
        b'[' => 0,
        b'0'..=b'9' => line.iter().position(|&b| b == b' ')? + 1,
        _ => return None,
    };
    let rest = line.get(tag_at..)?.strip_prefix(b"[")?;
    let close = rest.iter().position(|&b| b == b']')?;
    let (id, stream) = match rest[..close].strip_suffix(b":err") {
        Some(id) => (id, Stream::Err),
        None => (&rest[..close], Stream::Out),
    };
    let slot = std::str::from_utf8(id).ok()?.parse().ok()?;
    Some(WorkerLine {
        slot,
        stream,
        tag_at,
    })
}

#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<(Stream, usize, Vec<u8>)>,
}

impl Output {
    pub fn start() -> Output {
        let (tx, mut rx) = mpsc::channel::<(Stream, usize, Vec<u8>)>(1024);
        std::thread::Builder::new()
            .name("herd-output".into())
            .spawn(move || {
                let mut line = Vec::new();
                while let Some((stream, slot, text)) = rx.blocking_recv() {
                    line.clear();
                    let _ = write!(line, "[{slot}] ");
                    if crate::logfile::installed() {
                        // The file keeps when, and which stream (`herd logs
                        // --timestamps`, `--err`, `--out`).
                        line.clear();
                        let tag = match stream {
                            Stream::Out => "",
                            Stream::Err => ":err",
                        };
                        let now = crate::proxy::access::rfc3339(std::time::SystemTime::now());
                        let _ = write!(line, "{now} [{slot}{tag}] ");
                    }
                    line.extend_from_slice(&text);
                    crate::tail::push(&line);
                    if crate::logfile::write(&line) {
                        continue;
                    }
                    // A closed stdout must not stop the cluster: drop the line.
                    let _ = match stream {
                        Stream::Out => std::io::stdout().lock().write_all(&line),
                        Stream::Err => std::io::stderr().lock().write_all(&line),
                    };
                }
            })
            .ok();
        Output { tx }
    }

    /// Copies `reader` line by line until EOF.
    pub fn pipe<R>(&self, slot: usize, stream: Stream, reader: R)
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            loop {
                let mut line = Vec::new();
                match (&mut reader)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut line)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if line.last() != Some(&b'\n') {
                            line.push(b'\n');
                        }
                        if tx.send((stream, slot, line)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{Stream, worker_line};

    #[test]
    fn worker_lines_are_told_from_herds_own() {
        let l = worker_line(b"2026-12-02T03:28:11.643Z [12:err] boom").unwrap();
        assert_eq!((l.slot, l.stream, l.tag_at), (12, Stream::Err, 25));
        let l = worker_line(b"[3] up").unwrap();
        assert_eq!((l.slot, l.stream, l.tag_at), (3, Stream::Out, 0));
        assert_eq!(
            worker_line(b"2026-12-02T03:28:11.643280Z  INFO worker 0 ready"),
            None
        );
        assert_eq!(worker_line(b"[x] no"), None);
    }
}
