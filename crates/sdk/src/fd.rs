//! The only `unsafe` in this crate: taking ownership of fds herd gave this
//! process. Sound because `channel()`/`dispatch()` adopt their inherited fd
//! at most once per process (an atomic flag), only the fd herd names, and
//! only after checking it is an open socket; and because a received
//! `SCM_RIGHTS` fd is new in this process and owned by no one else.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;

/// The inherited socket whose fd number the variable `var` holds, taken at
/// most once per process (`taken`).
pub(crate) fn take_inherited(var: &str, taken: &std::sync::atomic::AtomicBool) -> Option<OwnedFd> {
    let fd = std::env::var(var).ok()?.parse::<RawFd>().ok()?;
    if taken.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    adopt_socket(fd)
}

/// Adopts `fd` if it is an open socket.
pub(crate) fn adopt_socket(fd: RawFd) -> Option<OwnedFd> {
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?;
    if !meta.file_type().is_socket() {
        return None;
    }
    // SAFETY: the fd is open (its /proc entry exists), is a socket, and
    // nothing else in this process owns it: herd placed it for this worker
    // and `channel()` hands it out once.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Owns an fd the kernel just installed in this process (`SCM_RIGHTS`).
pub(crate) fn adopt_received(fd: RawFd) -> OwnedFd {
    // SAFETY: recvmsg created this fd for us a moment ago; nothing else in
    // the process knows its number, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
