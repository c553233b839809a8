//! The master's private runtime directory, for its sd_notify sockets.
//!
//! `$XDG_RUNTIME_DIR/herd/<pid>` or `/tmp/herd-<uid>/<pid>`, mode 0700.
//! Directories of masters that died without cleaning up are removed at start.

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
}

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
        let path = base.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&path);
        mkdir(&path)?;
        Ok(RunDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `$XDG_RUNTIME_DIR/herd` or `/tmp/herd-<uid>`: control sockets live
/// here, each master's private directory below.
pub fn base_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if Path::new(&d).is_dir() => Path::new(&d).join("herd"),
        _ => std::env::temp_dir().join(format!("herd-{}", nix::unistd::geteuid())),
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

/// Removes `<pid>` directories whose master no longer runs.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            || nix::errno::Errno::last() == nix::errno::Errno::EPERM;
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
