//! The master's dealings with the operating system, apart from policy:
//! fork/exec and fd passing (`sys`), listening sockets (`listen`), client
//! sockets that join the event loop only to wait (`lazy`), the guardian
//! process (`guardian`), usable CPUs (`cpus`), the private runtime directory
//! (`rundir`), adopted children (`reaper`), what a worker listens on
//! (`sockets`) and whether a local server accepted a connection (`diag`). `sys` and `lazy` are the only
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
