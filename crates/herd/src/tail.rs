//! The last lines of the cluster's output (workers' and herd's own), kept in
//! memory for the web dashboard's log tail. Off unless `--admin` is set, so
//! a cluster without a dashboard pays one atomic load per line.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Lines kept; older ones fall off.
const KEEP: usize = 200;
/// Longer lines are cut (the page shows a tail, not a log archive).
const MAX_LEN: usize = 1000;

static ON: AtomicBool = AtomicBool::new(false);
static RING: Mutex<Ring> = Mutex::new(Ring {
    lines: VecDeque::new(),
    next: 0,
});

struct Ring {
    lines: VecDeque<String>,
    /// Sequence number of the next line.
    next: u64,
}

/// Starts keeping lines.
pub fn enable() {
    ON.store(true, Relaxed);
}

/// Keeps each whole line of `bytes` (ANSI colours stripped).
pub fn push(bytes: &[u8]) {
    if !ON.load(Relaxed) {
        return;
    }
    let Ok(mut ring) = RING.lock() else {
        return;
    };
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let mut text = strip_ansi(&String::from_utf8_lossy(line));
        if text.len() > MAX_LEN {
            let mut cut = MAX_LEN;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        if ring.lines.len() == KEEP {
            ring.lines.pop_front();
        }
        ring.lines.push_back(text);
        ring.next += 1;
    }
}

/// The lines after sequence number `seen` that are still kept, and the
/// sequence number to ask with next time.
pub fn since(seen: u64) -> (Vec<String>, u64) {
    let Ok(ring) = RING.lock() else {
        return (Vec::new(), seen);
    };
    let first = ring.next - ring.lines.len() as u64;
    let skip = seen.saturating_sub(first) as usize;
    (ring.lines.iter().skip(skip).cloned().collect(), ring.next)
}

/// Drops `ESC [ … letter` sequences (tracing colours its levels on a terminal).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `tracing` writer for herd's own log on stderr that also keeps its lines.
pub struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        push(buf);
        // Never blocks the thread that logs (the supervisor, a proxy
        // thread) on a stderr nobody reads.
        crate::output::emit(crate::output::Stream::Err, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reader_gets_each_line_once_and_old_ones_fall_off() {
        super::enable();
        let (_, start) = super::since(u64::MAX);
        super::push(b"one\ntwo\n");
        let (lines, next) = super::since(start);
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(super::since(next).0, Vec::<String>::new());
        for i in 0..super::KEEP + 5 {
            super::push(format!("{i}\n").as_bytes());
        }
        let (lines, _) = super::since(start);
        assert_eq!(
            lines.len(),
            super::KEEP,
            "only the last {} are kept",
            super::KEEP
        );
        assert_eq!(lines.last().map(String::as_str), Some("204"));
    }

    #[test]
    fn colours_go_and_text_stays() {
        assert_eq!(
            super::strip_ansi("\x1b[32m INFO\x1b[0m worker 1 ready"),
            " INFO worker 1 ready"
        );
    }
}
