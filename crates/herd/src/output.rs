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
