//! The only `unsafe` in this crate: taking ownership of the inherited
//! message-channel fd. Sound because `channel()` does it at most once per
//! process (an atomic flag), only for the fd herd names in `HERD_IPC_FD`,
//! and only after checking that fd is an open Unix socket.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;

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
