//! The dispatch thread's I/O: the accept loop, the last drain of the
//! kernel's queue on stop, and each worker's answer reader. Decisions are
//! the bookkeeping's ([`super::handoff`]).

use std::io::{ErrorKind, Read};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::handoff::{Conn, Shared};
use super::wire::Lines;
use super::{BATCH, PENDING_MAX};
use crate::os::listen::AcceptErrors;

pub(super) async fn accept_loop(
    listener: tokio::io::unix::AsyncFd<TcpListener>,
    st: Shared,
    room: Rc<Notify>,
    stop: Rc<Notify>,
) {
    let mut errors = AcceptErrors::default();
    loop {
        let full = room.notified();
        if st.borrow().pending.len() >= PENDING_MAX {
            tokio::select! {
                _ = full => continue,
                _ = stop.notified() => break,
            }
        }
        drop(full);
        let mut guard = tokio::select! {
            g = listener.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("dispatch: listening socket failed: {e}");
                    break;
                }
            },
            _ = stop.notified() => break,
        };
        let mut drained = false;
        let mut failed = None;
        {
            let mut s = st.borrow_mut();
            for _ in 0..BATCH {
                match listener.get_ref().accept() {
                    Ok((stream, peer)) => {
                        let conn = Conn {
                            fd: stream.into(),
                            peer,
                        };
                        s.dispatch(conn);
                        if s.pending.len() >= PENDING_MAX {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failed {
            // EMFILE and friends: back off instead of spinning.
            errors.warn(&e);
            tokio::time::sleep(AcceptErrors::BACKOFF).await;
        } else if !drained {
            // More may be queued: let the answers in first.
            tokio::task::yield_now().await;
        }
    }
    drain_backlog(listener.get_ref(), &st);
}

/// The last step of [`accept_loop`] on stop: what the kernel has already
/// queued was accepted from the client's point of view, so it is taken
/// and handed out too (bounded, in case of a flood), then the socket closes.
fn drain_backlog(listener: &TcpListener, st: &Shared) {
    let mut s = st.borrow_mut();
    for _ in 0..PENDING_MAX * 4 {
        match listener.accept() {
            Ok((stream, peer)) => s.dispatch(Conn {
                fd: stream.into(),
                peer,
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) => {}
            Err(_) => break,
        }
    }
    s.check_stopped();
}

/// Reads one worker's answers until its socket closes.
pub(super) async fn read_answers(key: u64, chan: Rc<AsyncFd<UnixStream>>, st: Shared) {
    let mut lines = Lines::new();
    loop {
        let Ok(mut ready) = chan.readable().await else {
            break;
        };
        let n = match ready.try_io(|c| c.get_ref().read(lines.spare())) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        };
        let mut s = st.borrow_mut();
        let Some(pi) = s.peers.iter().position(|p| p.key == key) else {
            return;
        };
        lines.filled(n, |line| s.answer(pi, line));
        s.peers[pi].update();
        s.flush();
        s.check_stopped();
    }
    // Closed or failed: whatever it did not answer goes to the others.
    let mut s = st.borrow_mut();
    if let Some(i) = s.peers.iter().position(|p| p.key == key) {
        let out = std::mem::take(&mut s.peers[i].outstanding);
        s.peers[i].refused = true;
        s.peers[i].update();
        s.requeue(out);
        s.flush();
        s.check_stopped();
    }
}
