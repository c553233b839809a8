//! A log file rotated by size, shared by herd's own log and worker output
//! (`--log-file`, which `herd start` always sets), and the access log.
//!
//! A file moved or deleted under herd (logrotate without `copytruncate`,
//! an operator's `mv`) is reopened at its path within a second, on the
//! next write, and at once after SIGUSR1 ([`reopen_all`]), as nginx does:
//! otherwise herd would go on writing into the renamed file for ever.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often a file's path is compared with the open file (one `stat`).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Bumped by [`reopen_all`]; a file that sees a new value reopens.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Every log file reopens its path on its next write (SIGUSR1).
pub fn reopen_all() {
    REOPEN.fetch_add(1, Ordering::Relaxed);
}

pub struct RotatingFile {
    path: PathBuf,
    max: u64,
    keep: u32,
    file: File,
    size: u64,
    /// Lines lost since writing began to fail (a full disk, say).
    dropped: u64,
    /// When the path was last compared with the open file.
    checked: Instant,
    /// The [`REOPEN`] value this file has acted on.
    reopened: u64,
}

static LOG: OnceLock<Mutex<RotatingFile>> = OnceLock::new();

/// Sends all later log and worker output to `path`.
pub fn install(path: &Path, max: u64, keep: u32) -> std::io::Result<()> {
    let _ = LOG.set(Mutex::new(RotatingFile::open(path, max, keep)?));
    Ok(())
}

pub fn installed() -> bool {
    LOG.get().is_some()
}

/// Writes whole lines to the log file; false if none is installed.
pub fn write(bytes: &[u8]) -> bool {
    let Some(log) = LOG.get() else {
        return false;
    };
    if let Ok(mut f) = log.lock() {
        f.write(bytes);
    }
    true
}

impl RotatingFile {
    /// Appends to `path` (creating it and its directory), rotating past
    /// `max` bytes and keeping `keep` old files.
    pub fn open(path: &Path, max: u64, keep: u32) -> std::io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max: max.max(1024),
            keep: keep.max(1),
            file,
            size,
            dropped: 0,
            checked: Instant::now(),
            reopened: REOPEN.load(Ordering::Relaxed),
        })
    }

    /// Opens the path anew when asked to (SIGUSR1), or when it no longer
    /// names the open file (moved or deleted), checked once a second. If
    /// it cannot be opened, the old file keeps the lines.
    fn reopen_if_moved(&mut self) {
        let asked = REOPEN.load(Ordering::Relaxed);
        let now = Instant::now();
        if asked == self.reopened && now.duration_since(self.checked) < CHECK_EVERY {
            return;
        }
        self.checked = now;
        if asked == self.reopened {
            let same = match (std::fs::metadata(&self.path), self.file.metadata()) {
                (Ok(p), Ok(f)) => p.dev() == f.dev() && p.ino() == f.ino(),
                (Err(_), _) => false,
                // The open file cannot be asked: leave it.
                (Ok(_), Err(_)) => true,
            };
            if same {
                return;
            }
        }
        self.reopened = asked;
        if let Ok(f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            self.size = f.metadata().map_or(0, |m| m.len());
            self.file = f;
        }
    }

    /// Writes whole lines, rotating first if they would pass the size.
    pub fn write_all_lines(&mut self, bytes: &[u8]) {
        self.write(bytes);
    }

    fn write(&mut self, bytes: &[u8]) {
        self.reopen_if_moved();
        if self.size > 0 && self.size + bytes.len() as u64 > self.max {
            // `herd flush` may have emptied the file under us.
            if let Ok(m) = self.file.metadata() {
                self.size = m.len();
            }
        }
        if self.size > 0 && self.size + bytes.len() as u64 > self.max {
            self.rotate();
        }
        if self.dropped > 0 && self.file.write_all(b"\n").is_ok() {
            // Writing works again: end a line cut off by the failure, and
            // say in the file itself what is missing.
            let note = format!(
                "herd: {} lines were lost here: {} could not be written\n",
                self.dropped,
                self.path.display()
            );
            let _ = self.file.write_all(note.as_bytes());
            self.size += 1 + note.len() as u64;
            self.dropped = 0;
        }
        match self.file.write_all(bytes) {
            Ok(()) => self.size += bytes.len() as u64,
            Err(e) => {
                if self.dropped == 0 {
                    // Once per failing stretch, on stderr: herd's own log
                    // may be this very file.
                    let say = format!(
                        "herd: cannot write to {}: {e}; its lines are dropped until it can\n",
                        self.path.display()
                    );
                    crate::output::emit(crate::output::Stream::Err, say.as_bytes());
                }
                self.dropped += crate::output::lines(bytes);
            }
        }
    }

    /// `log` → `log.1` → `log.2` …, keeping `keep` old files.
    fn rotate(&mut self) {
        let name = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(name(self.keep));
        for i in (1..self.keep).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        let _ = std::fs::rename(&self.path, name(1));
        if let Ok(f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            self.file = f;
            self.size = 0;
        }
    }
}

/// `tracing` writer that goes to the log file.
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::tail::push(buf);
        write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where `herd start` keeps a cluster's log: `$XDG_STATE_HOME/herd/NAME.log`,
/// else `~/.local/state/herd/NAME.log`, else the runtime directory.
pub fn default_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|d| d.join("herd"))
        .unwrap_or_else(crate::os::rundir::base_dir);
    dir.join(format!("{name}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file renamed under herd is noticed at the next check (time passed
    /// in), and a new one is written at the path; the renamed one keeps
    /// what came before.
    #[test]
    fn a_moved_file_is_reopened_at_its_path() {
        let dir = std::env::temp_dir().join(format!("herd-logmove-{}", std::process::id()));
        let path = dir.join("app.log");
        let mut f = RotatingFile::open(&path, 1 << 20, 1).unwrap();
        f.write(b"before\n");
        std::fs::rename(&path, dir.join("app.log.1")).unwrap();
        f.write(b"within the second\n");
        assert!(!path.exists(), "checked before its second");
        f.checked -= CHECK_EVERY;
        f.write(b"after\n");
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("app.log.1")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(now, "after\n");
        assert_eq!(old, "before\nwithin the second\n");
    }

    /// A full disk (`/dev/full` answers every write with ENOSPC) loses
    /// lines, counts them, and says so in the file once writing works.
    #[test]
    fn lines_lost_to_a_full_disk_are_counted_and_noted() {
        let dir = std::env::temp_dir().join(format!("herd-logfile-{}", std::process::id()));
        let path = dir.join("app.log");
        let mut f = RotatingFile::open(&path, 1 << 20, 1).unwrap();
        f.write(b"before\n");
        f.file = OpenOptions::new().append(true).open("/dev/full").unwrap();
        f.write(b"lost 1\nlost 2\n");
        f.write(b"lost 3\n");
        assert_eq!(f.dropped, 3);
        f.file = OpenOptions::new().append(true).open(&path).unwrap();
        f.write(b"after\n");
        assert_eq!(f.dropped, 0);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "before");
        assert!(
            lines[2].starts_with("herd: 3 lines were lost here"),
            "{text:?}"
        );
        assert_eq!(lines[3], "after");
        assert_eq!(f.size, text.len() as u64);
    }
}
