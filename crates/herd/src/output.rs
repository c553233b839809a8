//! Worker stdout/stderr, line by line, prefixed with the worker id (and,
//! in a log file, the time and `:err` for stderr: `… [2:err] text`).
//!
//! One writer thread owns the master's stdout and stderr, so whole lines
//! never interleave and a slow terminal blocks no async task; readers wait
//! on a bounded queue instead (back-pressure to the workers). An output
//! nobody reads (a stopped pipe reader) is not waited for past [`PATIENCE`]:
//! lines are then dropped and counted, and a note says how many once it
//! reads again, so the supervisor, the proxy and the workers keep going.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

use crate::config::Mode;

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

/// Where one stream of the workers also goes (`--output`, `--error`).
enum Copy {
    /// `/dev/null`: nowhere, not even into herd's log, as PM2 users mean it.
    Drop,
    /// The lines as the worker printed them, rotated as the log is.
    File(crate::logfile::RotatingFile),
}

/// The copies of the workers' stdout and stderr that PM2 users keep apart
/// from herd's log (`out_file`, `error_file`): the lines as printed, for a
/// log shipper or `tail -f`, with the time first under `--time`, or as
/// PM2's JSON objects under `--log-type json`.
#[derive(Default)]
pub struct Copies {
    out: Option<Copy>,
    err: Option<Copy>,
    /// `--time`: RFC 3339 in UTC, or `--log-date-format`'s local time.
    time: bool,
    format: Option<String>,
    json: bool,
    app: String,
}

impl Copies {
    /// Opens the files of `--output` and `--error`; `/dev/stdout` and
    /// `/dev/stderr` add nothing, since the lines already go there (or to the log).
    pub fn open(s: &crate::config::Settings) -> Result<Copies, (PathBuf, std::io::Error)> {
        let open = |path: &Option<PathBuf>| -> Result<Option<Copy>, (PathBuf, std::io::Error)> {
            let Some(path) = path else {
                return Ok(None);
            };
            let std_stream = ["/dev/stdout", "/dev/stderr", "/dev/fd/1", "/dev/fd/2"];
            if std_stream.iter().any(|p| path == Path::new(p)) {
                return Ok(None);
            }
            if path == Path::new("/dev/null") {
                return Ok(Some(Copy::Drop));
            }
            crate::logfile::RotatingFile::open(path, s.log_max_size, s.log_keep)
                .map(|f| Some(Copy::File(f)))
                .map_err(|e| (path.clone(), e))
        };
        // chrono panics on a format it cannot read; `moment` never makes one.
        let readable = |f: &&String| {
            chrono::format::StrftimeItems::new(f).all(|i| i != chrono::format::Item::Error)
        };
        Ok(Copies {
            out: open(&s.out_file)?,
            err: open(&s.error_file)?,
            time: s.time,
            format: s.log_date_format.as_ref().filter(readable).cloned(),
            json: s.log_type == crate::config::LogType::Json,
            app: s.name.clone(),
        })
    }

    /// Copies `text` of `stream` from worker `slot`; false if the stream is
    /// dropped altogether.
    fn copy(&mut self, stream: Stream, slot: usize, text: &[u8], line: &mut Vec<u8>) -> bool {
        let (copy, kind) = match stream {
            Stream::Out => (&mut self.out, "out"),
            Stream::Err => (&mut self.err, "err"),
        };
        let file = match copy {
            None => return true,
            Some(Copy::Drop) => return false,
            Some(Copy::File(f)) => f,
        };
        let stamp = self.time.then(|| match &self.format {
            Some(f) => chrono::Local::now().format(f).to_string(),
            None => crate::proxy::access::rfc3339(std::time::SystemTime::now()),
        });
        line.clear();
        if self.json {
            let message = String::from_utf8_lossy(text);
            let mut obj = serde_json::json!({
                "message": message.trim_end_matches(['\n', '\r']),
                "type": kind,
                "process_id": slot,
                "app_name": self.app,
            });
            if let Some(t) = stamp {
                obj["timestamp"] = t.into();
            }
            let _ = serde_json::to_writer(&mut *line, &obj);
            line.push(b'\n');
        } else {
            if let Some(t) = stamp {
                line.extend_from_slice(t.as_bytes());
                line.extend_from_slice(b": ");
            }
            line.extend_from_slice(text);
        }
        file.write_all_lines(line);
        true
    }
}

#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<(Stream, usize, Vec<u8>)>,
    /// For the hint a worker that cannot bind gets.
    mode: Mode,
}

impl Output {
    pub fn start(mut copies: Copies, mode: Mode) -> Output {
        let (tx, mut rx) = mpsc::channel::<(Stream, usize, Vec<u8>)>(1024);
        std::thread::Builder::new()
            .name("herd-output".into())
            .spawn(move || {
                let mut line = Vec::new();
                while let Some((stream, slot, text)) = rx.blocking_recv() {
                    if !copies.copy(stream, slot, &text, &mut line) {
                        continue;
                    }
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
                    emit(stream, &line);
                }
            })
            .ok();
        Output { tx, mode }
    }

    /// Copies `reader` line by line until EOF.
    pub fn pipe<R>(&self, slot: usize, stream: Stream, reader: R)
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, mode) = (self.tx.clone(), self.mode);
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
                        if !IN_USE_SAID.load(Relaxed) && says_in_use(&line) {
                            IN_USE_SAID.store(true, Relaxed);
                            tracing::warn!("{}", in_use_hint(slot, mode));
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

/// Whether the hint of [`in_use_hint`] was given (once per master).
static IN_USE_SAID: AtomicBool = AtomicBool::new(false);

/// A line in which a server says it could not bind: `EADDRINUSE` as
/// Python, Go, Java, PHP, Ruby and Node print it, or Django's "That port is
/// already in use".
fn says_in_use(line: &[u8]) -> bool {
    let has = |what: &[u8]| {
        line.windows(what.len())
            .any(|w| w.eq_ignore_ascii_case(what))
    };
    has(b"already in use") || has(b"EADDRINUSE")
}

/// Why a worker that cannot bind may be crash-looping: the usual cause is
/// a server that binds a port of its own choosing rather than the one herd
/// gives it, so it fights herd and its siblings for it. The way out depends
/// on the mode: only proxy mode gives a worker a port (`$PORT`, which needs
/// a shell: a command line in one word gets `sh -c`); the fd modes hold the
/// port in the master and hand over a socket, which the server must take.
fn in_use_hint(slot: usize, mode: Mode) -> String {
    const OR_PROXY: &str =
        "or run it in proxy mode (the default), which gives each worker a port of its own in $PORT";
    let head = format!("worker {slot} says an address is already in use.");
    match mode {
        Mode::Proxy => format!(
            "{head} A server that binds a port of its own (one written in its code, or its \
             framework's default such as 8000 or 3000) fights herd and the other workers for it. \
             Make it listen on $PORT, which herd sets for each worker; a command line in one word \
             runs through a shell, which expands it: herd run -- 'python3 -m http.server $PORT'"
        ),
        Mode::Shared | Mode::Reuseport => format!(
            "{head} In {} mode herd holds the port and hands each worker its listening socket \
             as fd 3 (LISTEN_FDS=1), so a server that binds the port (or one of its own) itself \
             finds it taken. Make it accept on fd 3 (gunicorn, uvicorn --fd 3, hypercorn --bind \
             fd://3, puma --bind-to-activated-sockets only, Node apps and Python scripts through \
             herd's preloads, Go's net.FileListener(os.NewFile(3, \"\")), Starman with \
             --env SERVER_STARTER_PORT=PORT=3, systemd socket activation), {OR_PROXY}",
            mode.as_str()
        ),
        Mode::Dispatch => format!(
            "{head} In dispatch mode herd accepts on the port and passes each connection to a \
             worker on fd 3 (HERD_DISPATCH_FD), so a server that binds the port (or one of its \
             own) itself finds it taken. Make it take its connections from herd (Node through \
             herd's preload, herd-sdk's dispatch()), {OR_PROXY}"
        ),
        Mode::Fork => format!(
            "{head} In fork mode herd holds no port and each worker binds what it likes, so \
             several workers of a server on one port fight for it. Run one (-i 1), {OR_PROXY}"
        ),
    }
}

/// How long a write waits for room in herd's stdout or stderr before
/// taking the output as stuck and dropping lines until it drains.
pub const PATIENCE: Duration = Duration::from_millis(500);

/// At most this much per write: a pipe with room (POLLOUT) takes it whole.
const PIPE_BUF: usize = 4096;

/// Lines dropped since herd's output stopped taking them; while non-zero,
/// writes do not wait.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Held while writing, so that room found for a line is still there.
static WRITING: Mutex<()> = Mutex::new(());

/// Writes whole lines to herd's stdout (`Out`) or stderr (`Err`) from any
/// thread without blocking on a reader that stopped reading: after
/// [`PATIENCE`] without room the lines are dropped and counted. A closed
/// output drops them too.
pub fn emit(stream: Stream, bytes: &[u8]) {
    let (out, err) = (std::io::stdout(), std::io::stderr());
    let fd = match stream {
        Stream::Out => out.as_fd(),
        Stream::Err => err.as_fd(),
    };
    let mut rest = bytes;
    let patience = if DROPPED.load(Relaxed) > 0 {
        Duration::ZERO
    } else {
        PATIENCE
    };
    let until = Instant::now() + patience;
    while !rest.is_empty() {
        // Wait without the lock, so another thread's wait does not add to this one's.
        if !room(fd, until.saturating_duration_since(Instant::now())) {
            DROPPED.fetch_add(lines(rest), Relaxed);
            return;
        }
        let Ok(_writing) = WRITING.lock() else {
            return;
        };
        if !room(fd, Duration::ZERO) {
            continue;
        }
        let dropped = DROPPED.swap(0, Relaxed);
        let wrote = if dropped > 0 {
            nix::unistd::write(fd, note(dropped).as_bytes()).map(|_| 0)
        } else {
            nix::unistd::write(fd, &rest[..rest.len().min(PIPE_BUF)])
        };
        match wrote {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => {}
            // Closed (EPIPE, EBADF) or failing: the line is lost, as it
            // would be to a terminal that went away.
            Err(_) => return,
        }
    }
}

/// Says how many lines were dropped.
fn note(dropped: u64) -> String {
    format!(
        "herd: {dropped} lines of output were dropped: nobody read herd's output for {PATIENCE:?}\n"
    )
}

/// At exit: if lines were dropped since herd last wrote, the note saying
/// so, once stderr takes it (waiting up to [`PATIENCE`]). Herd's last
/// lines were then among the dropped, and a reader that resumes (a
/// `| less` scrolled on) would otherwise not know.
pub fn farewell() {
    let err = std::io::stderr();
    let Ok(_writing) = WRITING.lock() else {
        return;
    };
    let dropped = DROPPED.swap(0, Relaxed);
    if dropped > 0 && room(err.as_fd(), PATIENCE) {
        let _ = nix::unistd::write(err.as_fd(), note(dropped).as_bytes());
    }
}

/// Whether `fd` takes a write now, waiting up to `wait`.
fn room(fd: std::os::fd::BorrowedFd<'_>, wait: Duration) -> bool {
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            // Any event: writable, or an error the write will report.
            Ok(n) => return n > 0,
            Err(Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// Lines in `bytes`, counting an unfinished one (for drop counts).
pub fn lines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count().max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::{Mode, Stream, in_use_hint, says_in_use, worker_line};

    #[test]
    fn servers_that_cannot_bind_are_recognised() {
        for line in [
            "OSError: [Errno 98] Address already in use\n",
            "Error: listen EADDRINUSE: address already in use :::3000",
            "Error: That port is already in use.",
            "listen tcp :8080: bind: address already in use",
            "java.net.BindException: Address already in use",
            "Errno::EADDRINUSE",
        ] {
            assert!(says_in_use(line.as_bytes()), "{line}");
        }
        assert!(!says_in_use(b"GET / 200 in 3 ms"));
        for mode in [
            Mode::Proxy,
            Mode::Shared,
            Mode::Reuseport,
            Mode::Dispatch,
            Mode::Fork,
        ] {
            assert!(
                in_use_hint(1, mode).starts_with("worker 1 says"),
                "{mode:?}"
            );
        }
        // Only proxy mode gives a worker a port to listen on.
        assert!(in_use_hint(0, Mode::Proxy).contains("Make it listen on $PORT"));
        assert!(in_use_hint(0, Mode::Reuseport).contains("accept on fd 3"));
        assert!(in_use_hint(0, Mode::Shared).contains("SERVER_STARTER_PORT=PORT=3"));
        assert!(!in_use_hint(0, Mode::Dispatch).contains("Make it listen on $PORT"));
    }

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
