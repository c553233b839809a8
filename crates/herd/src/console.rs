//! Printing that cannot panic.
//!
//! `println!` and `eprintln!` panic when the write fails (a closed pipe: `herd
//! run … | head`, a terminal that went away, a full disk). A master must
//! outlive its terminal and its log pipeline, and a CLI piped into `head`
//! should end quietly, so herd prints only through these. A command whose
//! output was lost otherwise (`herd jlist > state.json` on a full disk)
//! must not say it succeeded: [`lost_output`] tells the binary's edge.

use std::fmt;
use std::io::{self, Write};
use std::sync::OnceLock;

/// The first failed write to stdout other than a closed pipe.
static LOST: OnceLock<io::Error> = OnceLock::new();

/// Why part of stdout was lost, unless only its reader left (`| head`).
pub fn lost_output() -> Option<&'static io::Error> {
    LOST.get()
}

/// Passes the result on, remembering a loss that is not a closed pipe.
fn noted(r: io::Result<()>) -> io::Result<()> {
    if let Err(e) = &r
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        let _ = LOST.set(io::Error::new(e.kind(), e.to_string()));
    }
    r
}

/// `println!` that drops the line when stdout is gone.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{ let _ = $crate::console::out(format_args!($($arg)*)); }};
}

/// `eprintln!` that drops the line when stderr is gone.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{ let _ = $crate::console::err(format_args!($($arg)*)); }};
}

/// One line on stdout; the error tells a follower (`herd logs -f`) to stop.
pub fn out(args: fmt::Arguments) -> io::Result<()> {
    noted(writeln!(io::stdout().lock(), "{args}"))
}

/// One line on stderr.
pub fn err(args: fmt::Arguments) -> io::Result<()> {
    writeln!(io::stderr().lock(), "{args}")
}

/// Raw bytes on stdout, flushed (a follower's reader wants them now).
pub fn out_bytes(bytes: &[u8]) -> io::Result<()> {
    let mut o = io::stdout().lock();
    noted(o.write_all(bytes).and_then(|()| o.flush()))
}

/// Whether stdout is a pipe whose reader left, though nothing was written
/// since: a follower with nothing new to print ends then (`herd logs -f |
/// head -1`), as `tail -f` does, rather than at the next line.
pub fn reader_gone() -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let out = io::stdout();
    // Errors and hang-ups are reported whatever is asked for.
    let mut fds = [PollFd::new(out.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

/// What is still buffered on stdout (a last line without its newline).
pub fn flush_out() -> io::Result<()> {
    noted(io::stdout().lock().flush())
}

/// "1 worker", "3 workers": counts in messages read as English.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `listen` in a status while a Node app's own port is not known yet
/// (`Settings::port_from_app`; a queue consumer's stays so).
pub const NO_PORT_YET: &str = "the app's port (none yet)";

/// "proxy mode on 0.0.0.0:8000", or "fork mode (no port)": fork mode's
/// address is a placeholder no one listens on.
pub fn served(mode: &str, listen: &str) -> String {
    if mode == crate::config::Mode::Fork.as_str() {
        format!("{mode} mode (no port)")
    } else {
        format!("{mode} mode on {listen}")
    }
}

/// A command's words on one line, for people (`herd status`, a deploy's
/// versions): not quoted for a shell.
pub fn command_line(words: &[std::ffi::OsString]) -> String {
    words
        .iter()
        .map(|w| w.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An error and its causes on one line, as `{:#}` prints them, but without
/// a cause whose text the message above it already ends with: herd's error
/// enums print their source (`cannot read X: {source}`) and also return it
/// from `source()`, so `{:#}` would say it twice.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x: {source}")]
    struct Read {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_is_said_once() {
        let e = anyhow::Error::from(Read {
            source: std::io::Error::other("gone"),
        })
        .context("starting");
        assert_eq!(super::chain(e.as_ref()), "starting: cannot read x: gone");
    }

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(super::count(1, "worker"), "1 worker");
        assert_eq!(super::count(0, "worker"), "0 workers");
        assert_eq!(super::count(3, "worker"), "3 workers");
    }
}
