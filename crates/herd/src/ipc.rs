//! The master–worker message channel: one Unix stream socketpair per
//! worker, the worker's end at fd 4 (`HERD_IPC_FD`), carrying
//! newline-delimited JSON both ways.
//!
//! Worker → master: `{"type":"send","to":N,"data":…}`,
//! `{"type":"broadcast","data":…}` (every other worker),
//! `{"type":"master","data":…}` (logged by the master).
//! Master → worker: `{"type":"message","from":…,"data":…}`,
//! `{"type":"shutdown"}` (stop is about to begin),
//! `{"type":"undeliverable","to":N,"data":…,"error":…}` (its message could not be delivered).

use std::os::fd::{AsRawFd, OwnedFd};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// The worker's fd number for its end of the channel.
pub const WORKER_FD: i32 = 4;
/// Longest message line a worker may send.
pub const MAX_LINE: usize = 1 << 20;
/// Messages queued for a worker that is not reading before sends fail.
const QUEUE: usize = 1024;
/// A worker's messages read but not yet handled by the supervisor: past
/// this the reader stops reading, so a worker that floods its channel
/// fills its own socket (and memory), never the master's.
const UNHANDLED: usize = 256;

/// Held with each message read until it is handled; see [`UNHANDLED`].
pub type Credit = tokio::sync::OwnedSemaphorePermit;

/// The master's handle on one worker's channel.
pub struct Channel {
    tx: mpsc::Sender<(String, Option<oneshot::Sender<()>>)>,
}

impl Channel {
    /// Queues one message; `Err` says why it cannot be delivered.
    pub fn send(&self, msg: &Value) -> Result<(), &'static str> {
        self.queue(msg, None)
    }

    /// Queues `{"type":"shutdown"}`; the receiver resolves once it is
    /// written, so SIGTERM can follow it rather than overtake it.
    pub fn shutdown_notice(&self) -> oneshot::Receiver<()> {
        let (done, written) = oneshot::channel();
        let _ = self.queue(&serde_json::json!({"type": "shutdown"}), Some(done));
        written
    }

    fn queue(&self, msg: &Value, done: Option<oneshot::Sender<()>>) -> Result<(), &'static str> {
        let mut line = msg.to_string();
        line.push('\n');
        self.tx.try_send((line, done)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "its message queue is full (it is not reading)",
            mpsc::error::TrySendError::Closed(_) => "its channel is closed",
        })
    }
}

/// Waits (at most 200 ms) for a shutdown notice to be written.
pub async fn notice_written(written: Option<oneshot::Receiver<()>>) {
    if let Some(w) = written {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), w).await;
    }
}

/// A new pair: the master's side, and the fd to hand the worker (close it
/// in the master once the worker is spawned).
pub fn pair() -> std::io::Result<(std::os::unix::net::UnixStream, OwnedFd)> {
    let (master, worker) = std::os::unix::net::UnixStream::pair()?;
    master.set_nonblocking(true)?;
    Ok((master, OwnedFd::from(worker)))
}

pub fn raw(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}

/// Starts the reader and writer for a worker's channel: lines it sends are
/// handed to `on_line` as parsed JSON (or an error text), each with a
/// [`Credit`] to drop once it is handled.
pub fn start(
    master: std::os::unix::net::UnixStream,
    on_line: impl Fn(Result<Value, String>, Credit) + Send + 'static,
) -> std::io::Result<Channel> {
    let stream = UnixStream::from_std(master)?;
    let (read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<(String, Option<oneshot::Sender<()>>)>(QUEUE);
    tokio::spawn(async move {
        while let Some((line, done)) = rx.recv().await {
            if write.write_all(line.as_bytes()).await.is_err() {
                return; // Dropping rx makes later sends fail: the sender learns.
            }
            if let Some(d) = done {
                let _ = d.send(());
            }
        }
    });
    let credits = std::sync::Arc::new(tokio::sync::Semaphore::new(UNHANDLED));
    tokio::spawn(async move {
        let mut r = BufReader::new(read);
        loop {
            let Ok(credit) = credits.clone().acquire_owned().await else {
                return;
            };
            let mut line = Vec::new();
            match (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(_) if line.len() > MAX_LINE && !line.ends_with(b"\n") => {
                    on_line(
                        Err(format!("message longer than {MAX_LINE} bytes dropped")),
                        credit,
                    );
                    // Skip the rest of that line.
                    let mut rest = Vec::new();
                    let _ = r.read_until(b'\n', &mut rest).await;
                }
                Ok(_) => on_line(
                    serde_json::from_slice::<Value>(&line)
                        .map_err(|e| format!("malformed message: {e}")),
                    credit,
                ),
            }
        }
    });
    Ok(Channel { tx })
}
