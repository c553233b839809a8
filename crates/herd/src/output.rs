//! Worker stdout/stderr, line by line, prefixed with the worker id.
//!
//! One writer thread owns the master's stdout and stderr, so whole lines
//! never interleave and a slow terminal blocks no async task; readers wait
//! on a bounded queue instead (back-pressure to the workers).

use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

/// Longer lines are cut into pieces of this size, each prefixed.
const MAX_LINE: u64 = 16 * 1024;

#[derive(Clone, Copy)]
pub enum Stream {
    Out,
    Err,
}

#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<(Stream, Vec<u8>)>,
}

impl Output {
    pub fn start() -> Output {
        let (tx, mut rx) = mpsc::channel::<(Stream, Vec<u8>)>(1024);
        std::thread::Builder::new()
            .name("herd-output".into())
            .spawn(move || {
                while let Some((stream, line)) = rx.blocking_recv() {
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
        let prefix = format!("[{slot}] ").into_bytes();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            loop {
                let mut line = prefix.clone();
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
                        if tx.send((stream, line)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
