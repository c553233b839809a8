//! The master's private runtime directory, for its sd_notify sockets.
//!
//! `$XDG_RUNTIME_DIR/herd/<pid>` or `/tmp/herd-<uid>/<pid>`, mode 0700.
//! Each master holds an exclusive `flock` on its directory's `lock` file for
//! as long as it lives (the kernel drops it even on `kill -9`), so
//! directories whose lock is free are stale and removed at start. A lock,
//! not the pid: masters in other PID namespaces (containers sharing the
//! directory) have pids this one cannot see, and may have the same pid.

use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create runtime directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("runtime directory {0} is not owned by this user or is open to others; remove it")]
    Insecure(PathBuf),
}

pub struct RunDir {
    path: PathBuf,
    /// `--user`: where the workers find what they must reach (see
    /// [`RunDir::for_workers`]), and who they run as.
    workers: Option<(PathBuf, u32, u32)>,
    _lock: nix::fcntl::Flock<std::fs::File>,
    /// Exclusive locks on the directories themselves, held for life:
    /// systemd-tmpfiles' aging (`/tmp` after 10 days on Fedora, RHEL,
    /// Debian 13) skips a directory it cannot lock, with all below it. It
    /// would otherwise remove the preloads workers load at each start, and
    /// the lock file above (a master starting in another PID namespace,
    /// which cannot see this pid, would then take the directory for stale
    /// and remove the workers' sockets with it).
    _kept: Vec<nix::fcntl::Flock<std::fs::File>>,
}

/// Holds an exclusive `flock` on directory `dir` (see `RunDir::_kept`).
fn keep(dir: &Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    exclusive(std::fs::File::open(dir)?)
}

/// An exclusive `flock` on `f`, or `EWOULDBLOCK` when another holds one.
fn exclusive(f: std::fs::File) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| std::io::Error::from(e))
}

/// The file in a master's directory that names its workers' directory, so
/// that whoever removes the first as stale removes the second too.
const WORKERS_FILE: &str = "workers";

impl RunDir {
    pub fn create() -> Result<RunDir, RunDirError> {
        let base = base_dir();
        mkdir(&base)?;
        let meta = std::fs::metadata(&base).map_err(|source| RunDirError::Create {
            path: base.clone(),
            source,
        })?;
        if meta.uid() != nix::unistd::geteuid().as_raw() || meta.permissions().mode() & 0o077 != 0 {
            return Err(RunDirError::Insecure(base));
        }
        remove_stale(&base);
        let pid = std::process::id();
        // Made and locked under a name no cleanup looks at, then renamed:
        // no other master ever sees it unlocked.
        let tmp = base.join(format!(".new-{pid}-{}", fastrand::u64(..)));
        mkdir(&tmp)?;
        let lock = lock_new(&tmp).map_err(|source| RunDirError::Create {
            path: tmp.clone(),
            source,
        })?;
        // (The lock stays with the directory through its rename.)
        let kept = keep(&tmp).map_err(|source| RunDirError::Create {
            path: tmp.clone(),
            source,
        })?;
        for i in 1..100 {
            let name = match i {
                1 => pid.to_string(),
                i => format!("{pid}-{i}"),
            };
            let path = base.join(name);
            if path.exists() {
                // Another namespace's master with our pid keeps its own.
                if self::lock(&path).is_err() {
                    continue;
                }
                remove(&path);
            }
            if std::fs::rename(&tmp, &path).is_ok() {
                return Ok(RunDir {
                    path,
                    workers: None,
                    _lock: lock,
                    _kept: vec![kept],
                });
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        Err(RunDirError::Create {
            path: base.join(pid.to_string()),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Workers run as another user (`--user`) cannot reach this private
    /// directory, so what they must (herd's preloads, their sd_notify
    /// sockets) goes in another, made here in the temporary directory:
    /// still the master's, mode 0711, so they can open what is in it by
    /// name but neither list nor change it (a worker that could would swap
    /// a socket for a symlink before the master hands the socket over).
    pub fn for_workers(&mut self, uid: u32, gid: u32) -> Result<(), RunDirError> {
        let name = format!(
            "herd-{}-workers-{}-{}",
            nix::unistd::geteuid(),
            std::process::id(),
            fastrand::u32(..)
        );
        let dir = std::env::temp_dir().join(name);
        let create = |source| RunDirError::Create {
            path: dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(create)?;
        // The umask may have taken bits away.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).map_err(create)?;
        self._kept.push(keep(&dir).map_err(create)?);
        self.workers = Some((dir.clone(), uid, gid));
        std::fs::write(
            self.path.join(WORKERS_FILE),
            dir.as_os_str().as_encoded_bytes(),
        )
        .map_err(create)
    }

    /// Where the workers' files go: their own directory under `--user`.
    pub fn workers_path(&self) -> &Path {
        self.workers.as_ref().map_or(&self.path, |(p, _, _)| p)
    }

    /// Under `--user`, makes `path` the workers' (a socket they send to,
    /// which others cannot: connecting needs write permission on it).
    pub fn give(&self, path: &Path) -> std::io::Result<()> {
        let Some((_, uid, gid)) = self.workers else {
            return Ok(());
        };
        // Whatever the umask: the owner alone may connect.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Some((dir, _, _)) = &self.workers {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes a stale master's directory, and its workers' if it had one.
fn remove(dir: &Path) {
    if let Ok(workers) = std::fs::read(dir.join(WORKERS_FILE)) {
        let workers = PathBuf::from(std::ffi::OsString::from_vec(workers));
        if workers.starts_with(std::env::temp_dir()) {
            let _ = std::fs::remove_dir_all(workers);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `$XDG_RUNTIME_DIR/herd`, or `/tmp/herd-<uid>` without one or when it
/// ends with the login session (see [`ends_with_session`]): control
/// sockets live here, each master's private directory below.
pub fn base_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d)
            if d.is_dir() && !ends_with_session(&d, nix::unistd::geteuid().as_raw(), lingers) =>
        {
            d.join("herd")
        }
        _ => tmp_base(),
    }
}

fn tmp_base() -> PathBuf {
    std::env::temp_dir().join(format!("herd-{}", nix::unistd::geteuid()))
}

/// Every directory a cluster of this user may have its control socket in,
/// [`base_dir`] first: `$XDG_RUNTIME_DIR/herd`, logind's
/// `/run/user/<uid>/herd` and `/tmp/herd-<uid>`, so that `herd` in a login
/// session finds a cluster started from cron or at boot, and the reverse.
pub fn base_dirs() -> Vec<PathBuf> {
    let uid = nix::unistd::geteuid();
    let mut all = vec![base_dir()];
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("herd"));
    let logind = PathBuf::from(format!("/run/user/{uid}/herd"));
    for d in xdg.into_iter().chain([logind, tmp_base()]) {
        if !all.contains(&d) && d.is_dir() {
            all.push(d);
        }
    }
    all
}

/// Whether `dir` is logind's runtime directory of user `uid`
/// (`/run/user/<uid>`) for a user who does not linger: logind removes it
/// at the user's last logout, with every socket in it, while a master
/// started from that session runs on. Its workers' sockets gone, every
/// request got 503; its control socket gone, no `herd` command found it.
pub(crate) fn ends_with_session(dir: &Path, uid: u32, lingers: impl Fn(u32) -> bool) -> bool {
    dir == Path::new(&format!("/run/user/{uid}")) && !lingers(uid)
}

/// `loginctl enable-linger`: the user's manager, and its runtime
/// directory, outlive their sessions.
fn lingers(uid: u32) -> bool {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => Path::new("/var/lib/systemd/linger").join(u.name).exists(),
        _ => false,
    }
}

fn mkdir(p: &Path) -> Result<(), RunDirError> {
    match std::fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(RunDirError::Create {
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// Takes the directory's lock; an error when another master holds it.
fn lock(dir: &Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    exclusive(f)
}

/// Locks a directory no other master knows yet. Its lock file is locked
/// before it takes its name: another master's cleanup takes a free lock as
/// the sign of a stale directory, and a lock file made then locked could be
/// seen free in between (two masters starting at once lost their directory
/// that way).
fn lock_new(dir: &Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    let unnamed = dir.join("lock.new");
    let f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&unnamed)?;
    let locked = exclusive(f)?;
    std::fs::rename(&unnamed, dir.join("lock"))?;
    Ok(locked)
}

/// Removes the directories of masters that no longer run: their lock is
/// free (or, from herd versions without one, their pid is gone).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let ours = name.starts_with(|c: char| c.is_ascii_digit()) || name.starts_with(".new-");
        if !e.path().is_dir() || !ours {
            continue;
        }
        if e.path().join("lock").exists() {
            if lock(&e.path()).is_ok() {
                remove(&e.path());
            }
            continue;
        }
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            || nix::errno::Errno::last() == nix::errno::Errno::EPERM;
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logind_runtime_directories_of_users_who_do_not_linger_end_with_their_session() {
        let never = |_| false;
        let always = |_| true;
        assert!(ends_with_session(Path::new("/run/user/1000"), 1000, never));
        assert!(!ends_with_session(
            Path::new("/run/user/1000"),
            1000,
            always
        ));
        // Another user's, or a directory logind does not manage.
        assert!(!ends_with_session(Path::new("/run/user/1001"), 1000, never));
        assert!(!ends_with_session(Path::new("/tmp/rt"), 1000, never));
        assert!(!ends_with_session(
            Path::new("/run/user/1000/x"),
            1000,
            never
        ));
    }

    /// A directory being made is locked under its lock file's final name
    /// from the moment that name exists, so a cleanup running beside it
    /// (another master starting) keeps it.
    #[test]
    fn a_directory_being_made_is_never_taken_for_stale() {
        let base = std::env::temp_dir().join(format!("herd-rundir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let new = base.join(".new-1-2");
        std::fs::create_dir(&new).unwrap();
        let held = lock_new(&new).unwrap();
        assert!(new.join("lock").exists());
        assert!(!new.join("lock.new").exists());
        assert!(lock(&new).is_err(), "another master could take the lock");
        remove_stale(&base);
        assert!(new.is_dir(), "the cleanup removed a directory being made");
        drop(held);
        // Once its master is gone (its lock free), it is stale.
        remove_stale(&base);
        assert!(!new.exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
