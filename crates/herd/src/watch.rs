//! `--watch`: a rolling reload when files change, as PM2's `--watch` does.
//!
//! Directories are watched one by one (inotify), skipping ignored ones, so
//! a large `node_modules` costs no watch at all; directories created later
//! are added as they appear. The supervisor debounces what this reports.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::{RecursiveMode, Watcher};

/// Always ignored, as by PM2: dependencies (a virtualenv too), VCS data,
/// logs (rotated too), and the `__pycache__/*.pyc` Python writes as it
/// imports, which would reload a Python app once after each start.
pub const DEFAULT_IGNORE: &[&str] = &[
    "node_modules",
    ".git",
    "*.log",
    "*.log.[0-9]*",
    "__pycache__",
    "*.py[co]",
    ".venv",
];
/// Directories watched at most (inotify watches are a per-user limit).
const MAX_DIRS: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("--watch-ignore {pattern:?}: {source}")]
    Glob {
        pattern: String,
        source: globset::Error,
    },
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot start the file watcher: {0}")]
    Start(std::io::Error),
}

/// Which changed paths do not count.
pub struct Ignore {
    roots: Vec<PathBuf>,
    globs: GlobSet,
    files: Vec<PathBuf>,
}

impl Ignore {
    /// `patterns` beside [`DEFAULT_IGNORE`]; `files` (herd's own log) too.
    pub fn new(
        roots: &[PathBuf],
        patterns: &[String],
        files: &[PathBuf],
    ) -> Result<Ignore, WatchError> {
        let mut b = GlobSetBuilder::new();
        for p in DEFAULT_IGNORE
            .iter()
            .copied()
            .chain(patterns.iter().map(String::as_str))
        {
            let g = Glob::new(p).map_err(|source| WatchError::Glob {
                pattern: p.to_string(),
                source,
            })?;
            b.add(g);
        }
        let globs = b.build().map_err(|source| WatchError::Glob {
            pattern: patterns.join(" "),
            source,
        })?;
        Ok(Ignore {
            roots: roots.to_vec(),
            globs,
            files: files.to_vec(),
        })
    }

    /// Whether a change at `path` is ignored: its path under its watched
    /// root, or one of that path's components, matches a pattern.
    pub fn ignored(&self, path: &Path) -> bool {
        if self
            .files
            .iter()
            .any(|f| path.starts_with(f) || rotated(path, f))
        {
            return true;
        }
        let rel = self
            .roots
            .iter()
            .filter_map(|r| path.strip_prefix(r).ok())
            .min_by_key(|rel| rel.components().count())
            .unwrap_or(path);
        self.globs.is_match(rel) || rel.components().any(|c| self.globs.is_match(c.as_os_str()))
    }
}

/// Whether `path` is `file.N`, one of the rotated copies of a log file.
fn rotated(path: &Path, file: &Path) -> bool {
    let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    path.parent() == file.parent()
        && name(path)
            .zip(name(file))
            .and_then(|(n, base)| Some(n.strip_prefix(&base)?.strip_prefix('.')?.to_owned()))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Watches `roots` on a thread of its own and calls `on_change` with each
/// changed path that is not ignored, until it returns false.
pub fn start(
    roots: Vec<PathBuf>,
    ignore: Ignore,
    on_change: impl Fn(PathBuf) -> bool + Send + 'static,
) -> Result<(), WatchError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut w = notify::recommended_watcher(tx).map_err(|source| WatchError::Watch {
        path: roots.first().cloned().unwrap_or_default(),
        source,
    })?;
    let mut dirs = 0;
    for root in &roots {
        if root.is_dir() {
            add_tree(&mut w, root, &ignore, &mut dirs)?;
        } else {
            w.watch(root, RecursiveMode::NonRecursive)
                .map_err(|source| WatchError::Watch {
                    path: root.clone(),
                    source,
                })?;
        }
    }
    std::thread::Builder::new()
        .name("herd-watch".into())
        .spawn(move || {
            for ev in rx.into_iter().flatten() {
                if !(ev.kind.is_create() || ev.kind.is_modify() || ev.kind.is_remove()) {
                    continue;
                }
                for path in ev.paths {
                    if ignore.ignored(&path) {
                        continue;
                    }
                    if ev.kind.is_create()
                        && path.is_dir()
                        && let Err(e) = add_tree(&mut w, &path, &ignore, &mut dirs)
                    {
                        tracing::warn!("{e}");
                    }
                    if !on_change(path) {
                        return;
                    }
                }
            }
        })
        .map_err(WatchError::Start)?;
    Ok(())
}

/// Watches `dir` and every directory under it that is not ignored.
fn add_tree(
    w: &mut impl Watcher,
    dir: &Path,
    ignore: &Ignore,
    dirs: &mut usize,
) -> Result<(), WatchError> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if *dirs >= MAX_DIRS {
            tracing::warn!(
                "--watch: more than {MAX_DIRS} directories; {} and others not watched",
                d.display()
            );
            return Ok(());
        }
        w.watch(&d, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Watch {
                path: d.clone(),
                source,
            })?;
        *dirs += 1;
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) && !ignore.ignored(&p) {
                todo.push(p);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_patterns_are_ignored_anywhere_under_a_root() {
        let root = PathBuf::from("/srv/app");
        let log = PathBuf::from("/srv/app/herd.out");
        let ig = Ignore::new(&[root], &["dist/**".into(), "*.tmp".into()], &[log]).unwrap();
        for p in [
            "/srv/app/node_modules/x/index.js",
            "/srv/app/.git/HEAD",
            "/srv/app/logs/app.log",
            "/srv/app/app.log.2",
            "/srv/app/dist/bundle.js",
            "/srv/app/src/a.tmp",
            "/srv/app/herd.out",
            "/srv/app/herd.out.3",
            "/srv/app/__pycache__/helper.cpython-312.pyc",
            "/srv/app/.venv/lib/site.py",
        ] {
            assert!(ig.ignored(Path::new(p)), "{p}");
        }
        for p in [
            "/srv/app/server.js",
            "/srv/app/src/routes/a.js",
            "/srv/app/logic.js",
            "/srv/app/herd.out.js",
            "/srv/app/src/herd.out.1",
        ] {
            assert!(!ig.ignored(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_it() {
        let e = Ignore::new(&[], &["a[".into()], &[]).err().expect("error");
        assert!(e.to_string().contains("\"a[\""), "{e}");
    }
}
