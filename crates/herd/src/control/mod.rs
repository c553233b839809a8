//! The control socket: how `herd status`, `reload`, `scale`… reach a
//! running master. A Unix socket, mode 0600, in herd's runtime directory
//! (`<name>.sock`); newline-delimited JSON, one request line per
//! connection, answered by zero or more `{"progress": …}` lines and one
//! final line with `"ok"`. Only the same user (or root) is answered.

pub mod client;
mod protocol;

pub use protocol::{
    DeployPlan, DeployStatus, Done, HostReport, Line, Reloads, Request, Status, UpstreamRow,
    VersionRow, WorkerRow, WorkerState, parse_signal,
};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::os::rundir;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("a cluster named {0:?} is already running (its control socket answers)")]
    NameTaken(String),
    #[error("cannot create control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no herd cluster is running{0}")]
    NotRunning(String),
    #[error("several herd clusters are running ({0}); pick one with --name")]
    Ambiguous(String),
    #[error("cannot reach cluster {name:?}: {source}")]
    Connect {
        name: String,
        source: std::io::Error,
    },
    #[error("the master closed the connection without an answer")]
    NoAnswer,
    #[error(
        "the master of {name:?} did not answer within {secs}s: it may be stuck (its log says what it did last)"
    )]
    Unresponsive { name: String, secs: u64 },
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Usage(String),
}

/// A request on its way to the supervisor, with where its answer lines go.
pub struct Call {
    pub req: Request,
    pub reply: mpsc::UnboundedSender<Line>,
    /// Resolves once every reply has been written (the connection's task
    /// ends): a master stopping on request waits for it, so the caller
    /// gets its answer even when there is nothing to drain.
    pub written: tokio::sync::oneshot::Receiver<()>,
}

/// Path of the control socket for cluster `name`.
pub fn socket_path(name: &str) -> PathBuf {
    rundir::base_dir().join(format!("{name}.sock"))
}

/// Holds a cluster name for as long as it lives: an exclusive `flock` on
/// `<name>.lock`, which the kernel releases even on `kill -9`. A master that
/// ends removes the file, still holding the lock, so names used once do not
/// pile up in the runtime directory; [`bind`] checks that the file it
/// locked is still the one under that name.
pub struct NameLock {
    path: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl NameLock {
    /// The lock this process already holds on `file` for `name` (handed
    /// across `herd upgrade`'s exec: the lock belongs to the open file,
    /// which stayed open).
    pub fn held(name: &str, file: std::fs::File) -> Option<NameLock> {
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .ok()
            .map(|l| NameLock {
                path: lock_path(name),
                _lock: l,
            })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self._lock.as_raw_fd()
    }
}

impl Drop for NameLock {
    /// Runs before the lock is released: whoever opened the file meanwhile
    /// finds it gone once they lock it, and opens the name afresh.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock_path(name: &str) -> PathBuf {
    socket_path(name).with_extension("lock")
}

/// Locks the name lock file at `path` (made if `create`); `None` when
/// another process holds it (or, without `create`, when there is none).
fn claim(path: &Path, create: bool) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use nix::fcntl::{Flock, FlockArg};
    for _ in 0..100 {
        let file = match std::fs::OpenOptions::new()
            .create(create)
            .truncate(false)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) if still_at(&l, path) => return Ok(Some(l)),
            // Its holder ended between our open and our lock, and removed
            // the file: the name is free, under a new file.
            Ok(_) => continue,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Removes the lock files no master holds: those of masters killed with
/// `kill -9`, or kept by herd versions that never removed them. Each is
/// removed holding its lock, as a master that ends removes its own.
fn remove_stale_locks() {
    let Ok(entries) = std::fs::read_dir(rundir::base_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "lock")
            && e.file_type().is_ok_and(|t| t.is_file())
            && let Ok(Some(lock)) = claim(&path, false)
        {
            let _ = std::fs::remove_file(&path);
            drop(lock);
        }
    }
}

/// Whether `file` is still the file at `path` (not removed or replaced
/// since it was opened).
fn still_at(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Binds the control socket under `name`. A given name that a live master
/// holds is an error; a derived one takes the first free `name-2`, `name-3`…
/// Returns the listener, its path, the name used and the lock on it.
pub fn bind_name(
    name: &str,
    given: bool,
) -> Result<(UnixListener, PathBuf, String, NameLock), ControlError> {
    remove_stale_locks();
    if given {
        let (l, p, lock) = bind(name)?;
        return Ok((l, p, name.to_string(), lock));
    }
    for i in 1..1000 {
        let candidate = if i == 1 {
            name.to_string()
        } else {
            format!("{name}-{i}")
        };
        match bind(&candidate) {
            Ok((l, p, lock)) => return Ok((l, p, candidate, lock)),
            Err(ControlError::NameTaken(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ControlError::NameTaken(name.to_string()))
}

/// Claims `name` (its lock), then binds its control socket. Checking for a
/// live socket and then binding would race with another master starting
/// under the same name; the lock makes the claim atomic.
pub fn bind(name: &str) -> Result<(UnixListener, PathBuf, NameLock), ControlError> {
    let path = socket_path(name);
    let bind_err = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    let lock_path = lock_path(name);
    let mut lock = None;
    // Another master's sweep (see `remove_stale_locks`) holds a free name's
    // lock for an instant: a lock still held a few ms later is a master's.
    for wait in [0, 2, 4, 8] {
        std::thread::sleep(Duration::from_millis(wait));
        lock = claim(&lock_path, true).map_err(bind_err)?;
        if lock.is_some() {
            break;
        }
    }
    let Some(lock) = lock else {
        return Err(ControlError::NameTaken(name.to_string()));
    };
    // A master whose control socket is in another of the user's directories
    // (started where XDG_RUNTIME_DIR differed) holds the name too.
    let elsewhere = rundir::base_dirs()
        .into_iter()
        .skip(1)
        .any(|d| StdUnixStream::connect(d.join(format!("{name}.sock"))).is_ok());
    if elsewhere {
        return Err(ControlError::NameTaken(name.to_string()));
    }
    // The sticky bit keeps systemd-tmpfiles' aging (10 days in /tmp on
    // Fedora, RHEL, Debian 13) away from the file a long-lived master holds.
    let _ = std::fs::set_permissions(&lock_path, std::fs::Permissions::from_mode(0o1600));
    let held = NameLock {
        path: lock_path,
        _lock: lock,
    };
    // The name is ours: any socket file left under it is stale.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(bind_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok((listener, path, held))
}

/// Serves the control socket, passing each request to the supervisor.
pub async fn serve(
    listener: UnixListener,
    calls: mpsc::UnboundedSender<Call>,
    mut hold: tokio::sync::watch::Receiver<bool>,
) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => Some(a),
            Ok(_) = hold.wait_for(|held| *held) => None,
        };
        let Some(accepted) = accepted else {
            // `herd upgrade`'s last moments: connections wait in the queue
            // for the new master, which is handed this socket (kept open
            // here), rather than be accepted here and dropped at the exec.
            let _ = hold.wait_for(|held| !*held).await;
            continue;
        };
        let Ok((stream, _)) = accepted else {
            // Out of descriptors, the connection stays queued and accept
            // fails again at once: wait rather than spin the supervisor's thread.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == me || c.uid() == 0)
            .unwrap_or(false);
        if !allowed {
            continue; // Dropping it closes the connection unanswered.
        }
        tokio::spawn(answer(stream, calls.clone()));
    }
}

async fn answer(stream: UnixStream, calls: mpsc::UnboundedSender<Call>) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_LINE as u64 + 1);
    let reply = |l: &Line| {
        let mut s = serde_json::to_string(l).unwrap_or_default();
        s.push('\n');
        s
    };
    let first = match reader.read_until(b'\n', &mut line).await {
        Ok(0) | Err(_) => return,
        Ok(_) if line.len() > MAX_LINE => Err(format!("request longer than {MAX_LINE} bytes")),
        Ok(_) => serde_json::from_slice::<Request>(&line).map_err(|e| {
            let known = "status, reload, restart, scale, stop, send, broadcast";
            format!("bad request: {e} (commands: {known})")
        }),
    };
    let req = match first {
        Ok(r) => r,
        Err(e) => {
            let _ = write
                .write_all(reply(&Done::failed(e).into()).as_bytes())
                .await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Dropped when this task ends, which resolves `written`.
    let (_written, written) = tokio::sync::oneshot::channel::<()>();
    if calls
        .send(Call {
            req,
            reply: tx,
            written,
        })
        .is_err()
    {
        return;
    }
    while let Some(l) = rx.recv().await {
        if write.write_all(reply(&l).as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The control sockets of running clusters: (name, path). Stale sockets of
/// masters that died are removed on the way.
pub fn running() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let entries = rundir::base_dirs()
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten();
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".sock"))
        else {
            continue;
        };
        if StdUnixStream::connect(&path).is_ok() {
            out.push((name.to_string(), path.clone()));
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    out.sort();
    out
}

/// The cluster to talk to: `name`, or the only one running.
pub fn find(name: Option<&str>) -> Result<(String, PathBuf), ControlError> {
    let all = running();
    match name {
        Some(n) => all.iter().find(|(m, _)| m == n).cloned().ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|(m, _)| m.as_str()).collect();
            let running = match names.as_slice() {
                [] => String::new(),
                some => format!(" (running: {})", some.join(", ")),
            };
            ControlError::NotRunning(format!(" under the name {n:?}{running}{}", id_hint(n)))
        }),
        None => match all.len() {
            0 => Err(ControlError::NotRunning(String::new())),
            1 => Ok(all.into_iter().next().unwrap_or_default()),
            _ => Err(ControlError::Ambiguous(
                all.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        },
    }
}

/// What to say after a name that is a number (`herd restart 0`, typed as
/// PM2's `pm2 restart 0`): clusters have names, not ids.
pub fn id_hint(name: &str) -> &'static str {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        "; clusters go by name here, not by PM2's numeric id"
    } else {
        ""
    }
}

/// How long a status may take before its master is called stuck.
const STATUS_WITHIN: Duration = Duration::from_secs(10);

/// Sends `req` and returns its final line as `T` ([`Done`] or [`Status`]),
/// passing progress lines to `progress`.
pub fn call<T: serde::de::DeserializeOwned>(
    name: &str,
    path: &Path,
    req: &Request,
    mut progress: impl FnMut(&str),
) -> Result<T, ControlError> {
    let connect_err = |source| ControlError::Connect {
        name: name.to_string(),
        source,
    };
    let mut s = StdUnixStream::connect(path).map_err(connect_err)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(connect_err)?;
    // A status is answered at once by a master that is not stuck; other
    // requests (a reload) take as long as they take, with progress lines.
    if matches!(req, Request::Status | Request::Relaunch) {
        s.set_read_timeout(Some(STATUS_WITHIN))
            .map_err(connect_err)?;
    }
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(connect_err)?;
    for l in BufReader::new(s).lines() {
        let l = l.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ControlError::Unresponsive {
                    name: name.to_string(),
                    secs: STATUS_WITHIN.as_secs(),
                }
            }
            _ => connect_err(e),
        })?;
        let v: Value = serde_json::from_str(&l).map_err(|_| ControlError::NoAnswer)?;
        if let Some(p) = v.get("progress").and_then(Value::as_str) {
            progress(p);
            continue;
        }
        return match v.get("ok").and_then(Value::as_bool) {
            Some(true) => serde_json::from_value(v).map_err(|_| ControlError::NoAnswer),
            _ => Err(ControlError::Failed(
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("request failed")
                    .to_string(),
            )),
        };
    }
    Err(ControlError::NoAnswer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire format the README documents, pinned: scripts read it.
    #[test]
    fn answers_keep_their_documented_json() {
        let status = Status {
            ok: true,
            name: "api".into(),
            pid: 42,
            mode: "proxy".into(),
            listen: "0.0.0.0:8000".into(),
            uptime: 1.5,
            command: None,
            cwd: None,
            reloading: false,
            stopping: false,
            log_file: None,
            out_file: None,
            error_file: None,
            user: None,
            worker_max_conns: 0,
            workers: vec![WorkerRow {
                id: 0,
                version: 0,
                pid: 43,
                state: WorkerState::Ready,
                uptime: 1.0,
                restarts: 2,
                cpu: 0.5,
                cpu_seconds: 2.0,
                memory: 1024,
                connections: Some(1),
                requests: Some(10),
                rps: None,
                p50_ms: None,
                p99_ms: None,
                last_exit: Some("exited with status 1".into()),
                down: false,
                taken_out: false,
            }],
            upstreams: Vec::new(),
            deploy: None,
            reloads: Reloads {
                done: 3,
                aborted: 1,
            },
            restarts: Default::default(),
            host: None,
            hosts: Vec::new(),
        };
        assert_eq!(
            serde_json::to_string(&Line::Status(Box::new(status))).unwrap(),
            r#"{"ok":true,"name":"api","pid":42,"mode":"proxy","listen":"0.0.0.0:8000","uptime":1.5,"reloading":false,"log_file":null,"workers":[{"id":0,"pid":43,"state":"ready","uptime":1.0,"restarts":2,"cpu":0.5,"cpu_seconds":2.0,"memory":1024,"connections":1,"requests":10,"rps":null,"last_exit":"exited with status 1"}],"reloads":{"done":3,"aborted":1}}"#
        );
        let lines = [
            (
                Line::progress("reloading 2 workers"),
                r#"{"progress":"reloading 2 workers"}"#,
            ),
            (
                Done {
                    replaced: Some(2),
                    ..Done::ok()
                }
                .into(),
                r#"{"ok":true,"replaced":2}"#,
            ),
            (
                Done {
                    workers: Some(4),
                    ..Done::ok()
                }
                .into(),
                r#"{"ok":true,"workers":4}"#,
            ),
            (
                Done {
                    stopping: Some(true),
                    ..Done::ok()
                }
                .into(),
                r#"{"ok":true,"stopping":true}"#,
            ),
            (
                Done {
                    delivered: Some(1),
                    ..Done::failed("worker 3 is not running")
                }
                .into(),
                r#"{"ok":false,"error":"worker 3 is not running","delivered":1}"#,
            ),
        ];
        for (line, json) in lines {
            assert_eq!(serde_json::to_string(&line).unwrap(), json);
        }
        // And the CLI reads them back.
        let d: Done = serde_json::from_str(r#"{"ok":true,"restarted":3}"#).unwrap();
        assert_eq!(d.restarted, Some(3));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn only_one_claimant_of_a_name_wins() {
        // As a master makes it: mode 0700 (herd refuses one open to others).
        let _dir = rundir::RunDir::create().unwrap();
        let name = format!("race-{}", std::process::id());
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
        let rt = tokio::runtime::Handle::current();
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (barrier, rt, name) = (barrier.clone(), rt.clone(), name.clone());
                std::thread::spawn(move || {
                    let _in = rt.enter();
                    barrier.wait();
                    bind(&name).ok()
                })
            })
            .collect();
        let won: Vec<_> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(won.len(), 1, "several masters claimed one name");
        let (_listener, path, _lock) = &won[0];
        assert!(path.exists(), "the winner's socket was removed");
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(path.with_extension("lock"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_name_freed_and_claimed_again_has_one_holder_at_a_time() {
        // Masters ending remove their lock file; one opening it just then
        // must not take the removed file's lock beside a newer holder.
        let _dir = rundir::RunDir::create().unwrap();
        let name = format!("again-{}", std::process::id());
        let holders = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (won, both) = (
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        );
        let rt = tokio::runtime::Handle::current();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (rt, name) = (rt.clone(), name.clone());
                let (holders, won, both) = (holders.clone(), won.clone(), both.clone());
                std::thread::spawn(move || {
                    let _in = rt.enter();
                    let until = std::time::Instant::now() + Duration::from_secs(2);
                    while std::time::Instant::now() < until {
                        if let Ok(claim) = bind(&name) {
                            use std::sync::atomic::Ordering::SeqCst;
                            won.fetch_add(1, SeqCst);
                            if holders.fetch_add(1, SeqCst) > 0 {
                                both.fetch_add(1, SeqCst);
                            }
                            std::thread::yield_now();
                            holders.fetch_sub(1, SeqCst);
                            drop(claim);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        use std::sync::atomic::Ordering::SeqCst;
        assert!(won.load(SeqCst) > 100, "{} claims", won.load(SeqCst));
        assert_eq!(both.load(SeqCst), 0, "two masters held one name at once");
        let sock = socket_path(&name);
        assert!(
            !lock_path(&name).exists(),
            "the last holder left its lock file"
        );
        let _ = std::fs::remove_file(sock);
    }

    #[tokio::test]
    async fn lock_files_no_master_holds_are_swept_and_held_ones_kept() {
        let _dir = rundir::RunDir::create().unwrap();
        let pid = std::process::id();
        let (stale, live) = (format!("stale-{pid}"), format!("live-{pid}"));
        std::fs::write(lock_path(&stale), b"").unwrap();
        let (_l, sock, held) = bind(&live).unwrap();
        remove_stale_locks();
        assert!(
            !lock_path(&stale).exists(),
            "a lock file nobody holds stayed"
        );
        assert!(lock_path(&live).exists(), "a held lock file was removed");
        assert!(
            matches!(bind(&live), Err(ControlError::NameTaken(_))),
            "the sweep freed a held name"
        );
        drop(held);
        assert!(!lock_path(&live).exists());
        let _ = std::fs::remove_file(sock);
    }

    #[test]
    fn requests_are_json_objects() {
        let r: Request = serde_json::from_str(r#"{"cmd":"scale","n":"+2"}"#).unwrap();
        assert_eq!(r, Request::Scale { n: "+2".into() });
        assert_eq!(
            serde_json::to_string(&Request::Reload { update_env: None }).unwrap(),
            r#"{"cmd":"reload"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        let r: Request = serde_json::from_str(r#"{"cmd":"relaunch"}"#).unwrap();
        assert_eq!(r, Request::Relaunch);
        let changed = crate::config::relaunch::Relaunch {
            instances: Some(3),
            ..Default::default()
        };
        let done = Done {
            relaunch: Some(Box::new(changed)),
            ..Done::ok()
        };
        assert_eq!(
            serde_json::to_string(&done).unwrap(),
            r#"{"ok":true,"relaunch":{"instances":3}}"#
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"signal","signal":"SIGUSR2"}"#).unwrap();
        assert_eq!(
            r,
            Request::Signal {
                signal: "SIGUSR2".into(),
                id: None
            }
        );
    }

    #[test]
    fn signals_are_named_as_kill_takes_them() {
        use nix::sys::signal::Signal;
        for s in ["SIGUSR2", "USR2", "usr2", "12"] {
            assert_eq!(parse_signal(s), Ok(Signal::SIGUSR2), "{s}");
        }
        assert!(
            parse_signal("SIGNOPE")
                .unwrap_err()
                .contains("not a signal")
        );
        assert!(parse_signal("99").is_err());
    }
}
