//! The master's dealings with the operating system, apart from policy:
//! fork/exec and fd passing (`sys`), listening sockets (`listen`), client
//! sockets that join the event loop only to wait (`lazy`), the guardian
//! process (`guardian`), usable CPUs (`cpus`), the private runtime directory
//! (`rundir`), adopted children (`reaper`), what a worker listens on
//! (`sockets`), what its processes use (`usage`) and whether a local server
//! accepted a connection (`diag`). `sys` and `lazy` are the only
//! modules with `unsafe`.

pub mod cpus;
pub mod diag;
pub mod guardian;
pub mod lazy;
pub mod listen;
pub mod reaper;
pub mod rundir;
pub mod sockets;
pub mod sys;
pub mod usage;

/// `sun_path`'s size, its closing NUL included: a Unix socket's path is
/// shorter.
pub const UNIX_PATH_MAX: usize = 108;

/// Whether `e` is herd's own shortage (descriptors, buffers, memory, local
/// ports) rather than anything a backend did: a connect failing so says
/// nothing of the backend's health, as nginx counts no failure for it.
pub fn short_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// The longest pause between two tries of [`connect_unix`].
const FULL_QUEUE_PAUSE: std::time::Duration = std::time::Duration::from_millis(32);

/// Connects to the Unix socket at `path`, waiting while its accept queue
/// is full; the caller bounds the wait with its connect time-out.
///
/// A Unix listener whose queue is full refuses a non-blocking connect at
/// once (`EAGAIN`), where a TCP one drops the SYN and the client waits. So
/// a burst onto a busy server with a small backlog would fail as if the
/// server were down (nginx's "Resource temporarily unavailable" 502s in
/// front of php-fpm). Tried again instead, after 1 ms doubling to 32 ms:
/// a busy server queues its clients as over TCP. `full` is set when the
/// queue was found full, for the time-out's message.
pub async fn connect_unix(
    path: &std::path::Path,
    full: &mut bool,
) -> std::io::Result<tokio::net::UnixStream> {
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                *full = true;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FULL_QUEUE_PAUSE);
            }
            done => return done,
        }
    }
}
