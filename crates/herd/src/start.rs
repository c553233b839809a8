//! `herd start` (a master in the background, logging to a file) and
//! `herd logs`.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::RunArgs;
use crate::control::{self, Request, Status, WorkerState};

/// Validates the options here, in the foreground, then runs `herd run` in
/// its own process group with a log file, and returns once every worker is
/// ready (or fails with the log's last lines if the master gives up).
pub fn start(args: &RunArgs) -> anyhow::Result<()> {
    let s = args.clone().resolve()?;
    let running: Vec<String> = control::running().into_iter().map(|(n, _)| n).collect();
    let name = if s.name_given {
        if running.contains(&s.name) {
            bail!("a cluster named {:?} is already running", s.name);
        }
        s.name.clone()
    } else {
        (1..1000)
            .map(|i| {
                if i == 1 {
                    s.name.clone()
                } else {
                    format!("{}-{i}", s.name)
                }
            })
            .find(|n| !running.contains(n))
            .context("no free cluster name")?
    };
    let log = s
        .log_file
        .clone()
        .unwrap_or_else(|| crate::logfile::default_path(&name));
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let at = argv.iter().position(|a| a == "start").unwrap_or(0);
    argv[at] = "run".into();
    let mut extra: Vec<OsString> = Vec::new();
    if args.opts.name.is_none() {
        extra.extend(["--name".into(), name.clone().into()]);
    }
    if args.opts.log_file.is_none() {
        extra.extend(["--log-file".into(), log.clone().into()]);
    }
    argv.splice(at + 1..at + 1, extra);
    // Where this run's lines begin: a failure shows only those, not the
    // end of an older run in the same file.
    let ours_from = std::fs::metadata(&log).map_or(0, |m| m.len());
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut child = Command::new("/proc/self/exe")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own group: a Ctrl-C in this terminal is not for it.
        .process_group(0)
        .spawn()
        .context("cannot start the master")?;
    let deadline = Instant::now() + s.ready_timeout + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait()? {
            bail!(
                "the master exited ({st}) before the cluster was ready; last lines of {}:\n{}",
                log.display(),
                tail_from(&log, ours_from, 10).unwrap_or_default()
            );
        }
        if let Ok((_, path)) = control::find(Some(&name))
            && let Ok(v) = control::call::<Status>(&name, &path, &Request::Status, |_| {})
        {
            let ready = v
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count();
            if ready == s.instances {
                crate::outln!(
                    "{name}: started, master pid {}, {}, {} mode on {}; logs: {}",
                    child.id(),
                    crate::console::count(ready, "worker"),
                    v.mode,
                    v.listen,
                    log.display()
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster is not ready yet (pid {}); see `herd status --name {name}` and {}",
                child.id(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints the last `lines` lines of a cluster's log; with `follow`, keeps
/// printing what is appended, across rotations.
pub fn logs(name: Option<&str>, lines: usize, follow: bool) -> anyhow::Result<()> {
    if name == Some("all") {
        bail!("herd logs shows one cluster's log: name it (herd list shows them)");
    }
    let path = match control::find(name) {
        Ok((n, sock)) => {
            let v: Status = control::call(&n, &sock, &Request::Status, |_| {})?;
            match v.log_file {
                Some(p) => PathBuf::from(p),
                None => {
                    bail!("cluster {n:?} logs to its terminal (it was not started with --log-file)")
                }
            }
        }
        Err(e) => match name {
            Some(n) => crate::logfile::default_path(n),
            // No cluster runs: the log `herd start` left, if it is the only one.
            None => match stopped_logs().as_slice() {
                [one] => one.clone(),
                [] => return Err(e.into()),
                many => {
                    let names: Vec<String> = many
                        .iter()
                        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                        .collect();
                    bail!(
                        "no herd cluster is running; logs of stopped ones: {} (pick one with --name)",
                        names.join(", ")
                    )
                }
            },
        },
    };
    // Opened once, read through the handle: a rotation renames this file
    // to FILE.1, and its last lines are read from the handle before the
    // new FILE is followed (`tail -F`), so no line is lost at a rotation.
    let mut f =
        std::fs::File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut text = Vec::new();
    f.read_to_end(&mut text)?;
    let last = last_lines(&text, lines);
    // A reader that went away (`herd logs -f | head`) ends the command.
    if crate::console::out_bytes(last.as_bytes()).is_err() || !follow {
        return Ok(());
    }
    let mut buf = Vec::new();
    loop {
        buf.clear();
        f.read_to_end(&mut buf)?;
        if !buf.is_empty() {
            if crate::console::out_bytes(&buf).is_err() {
                return Ok(());
            }
            continue;
        }
        // Drained. If the path is another file now, it was rotated: the
        // old one was read to its end just above, so switch.
        if let (Ok(now), Ok(ours)) = (std::fs::metadata(&path), f.metadata())
            && (now.ino(), now.dev()) != (ours.ino(), ours.dev())
            && let Ok(next) = std::fs::File::open(&path)
        {
            // Ours is FILE.k now; FILE.k-1 … FILE.1 came after it, whole.
            let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.ino(), m.dev()));
            let ours = Some((ours.ino(), ours.dev()));
            let k = (1..=MAX_ROTATED).find(|&i| id(&rotated(&path, i)) == ours);
            for i in (1..k.unwrap_or(1)).rev() {
                if let Ok(whole) = std::fs::read(rotated(&path, i))
                    && crate::console::out_bytes(&whole).is_err()
                {
                    return Ok(());
                }
            }
            f = next;
            continue;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rotated files looked through when following a log.
const MAX_ROTATED: u32 = 100;

/// `FILE.i`, as `logfile` rotates.
fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{i}"));
    PathBuf::from(p)
}

/// The logs `herd start` writes by default (`NAME.log`, rotated files left out).
fn stopped_logs() -> Vec<PathBuf> {
    let Some(dir) = crate::logfile::default_path("x")
        .parent()
        .map(Path::to_path_buf)
    else {
        return Vec::new();
    };
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log") && p.is_file())
        .collect();
    logs.sort();
    logs
}

/// The last `n` lines of a file among those after byte `from` (all of
/// them if the file is shorter: it was rotated in between).
fn tail_from(path: &Path, from: u64, n: usize) -> std::io::Result<String> {
    let mut text = std::fs::read(path)?;
    if (from as usize) <= text.len() {
        text.drain(..from as usize);
    }
    Ok(last_lines(&text, n))
}

/// The last `n` lines of `text`.
fn last_lines(text: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].iter().map(|l| format!("{l}\n")).collect()
}
