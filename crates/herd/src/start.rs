//! `herd start` (a master in the background, logging to a file) and
//! `herd logs`.

use std::ffi::OsString;
use std::io::{Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::RunArgs;
use crate::control::{self, Request, Status, WorkerState};

/// How long `herd start` waits, once every worker is ready, for a Node app
/// to name its own port (see `supervise::port`).
const PORT_WAIT: Duration = Duration::from_secs(3);

/// `herd start`: one cluster, or each app of a config file that holds
/// several (`[[app]]` tables, an ecosystem file's `apps`), as `pm2 start
/// ecosystem.config.js` does. One app failing does not stop the others.
pub fn start(args: &RunArgs) -> anyhow::Result<()> {
    if let Some((name, update_env)) = bare_name(args) {
        if control::running().iter().any(|(n, _)| *n == name) {
            bail!("{name} is already running (`herd reload {name}` replaces its workers)");
        }
        let env = update_env.then(control::client::caller_env);
        if crate::boot::start_stopped(&name, env.as_ref())? {
            return Ok(());
        }
    }
    let config = args
        .config
        .clone()
        .or_else(|| Some(PathBuf::from("herd.toml")).filter(|p| p.is_file()));
    // Some apps left out: the others are named, even one alone.
    let mut left_out = false;
    let apps = match (&config, &args.app) {
        (Some(path), None) => {
            // PM2's `autostart: false`: left out unless `--only` names it.
            let (all, manual) =
                crate::config::apps::names_to_start(path, args.env_profile.as_deref())?;
            for m in &manual {
                crate::outln!(
                    "{m}: not started (autostart: false); `herd start {} --only {m}` starts it",
                    path.display()
                );
            }
            left_out = !manual.is_empty();
            all.into_iter().filter(|a| !manual.contains(a)).collect()
        }
        // PM2's `--only api,worker`: each of them.
        (Some(_), Some(list)) if list.contains(',') => list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    if apps.len() < 2 && !left_out {
        return start_one(args, true);
    }
    let mut failed = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let mut one = args.clone();
        one.app = Some(app.clone());
        one.argv = without_app(&args.argv);
        one.argv.extend(["--app".into(), app.into()]);
        if let Err(e) = start_one(&one, i == 0) {
            crate::errln!("herd: {app}: {}", crate::console::chain(e.as_ref()));
            failed.push(app.as_str());
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} apps did not start: {}",
            failed.len(),
            apps.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// The command line without its `--app`/`--only` choice, for one app's
/// master to be given its own.
fn without_app(argv: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(argv.len());
    let mut words = argv.iter();
    while let Some(w) = words.next() {
        if w == "--" {
            out.push(w.clone());
            out.extend(words.by_ref().cloned());
            break;
        }
        let s = w.to_string_lossy();
        if s == "--app" || s == "--only" {
            words.next();
        } else if !(s.starts_with("--app=") || s.starts_with("--only=")) {
            out.push(w.clone());
        }
    }
    out
}

/// `herd start NAME`, NAME alone (with PM2's `--update-env` or not) and
/// no file of that name here: maybe a cluster's name, as `pm2 start NAME`
/// takes it (a stopped one starts again as it ran, or in this shell's
/// environment with `--update-env`).
fn bare_name(args: &RunArgs) -> Option<(String, bool)> {
    // The words as typed: the PM2-style rewrite of `start NAME --update-env`
    // reads NAME as a program (`start --update-env -- NAME`).
    let (name, update_env) = start_name(std::env::args_os().skip(1).collect())?;
    (args.config.is_none() && !name.contains('/') && !Path::new(&name).exists())
        .then_some((name, update_env))
}

/// `herd start NAME --no-daemon` as typed (the CLI runs it as `herd run
/// NAME`, and NAME is no command): runs the stopped cluster NAME here, in
/// the foreground. `None`: other words were typed; else why it cannot.
pub fn stopped_in_foreground(name: &str) -> Option<crate::boot::BootError> {
    let mut words: Vec<OsString> = std::env::args_os().skip(1).collect();
    let before = words.len();
    words.retain(|w| w != "--no-daemon");
    if words.len() == before {
        return None;
    }
    let (typed, update_env) = start_name(words)?;
    let env = update_env.then(control::client::caller_env);
    (typed == name).then(|| crate::boot::run_stopped(name, env.as_ref()))
}

/// `start NAME` with `--update-env` set aside: NAME, and whether it was there.
fn start_name(mut words: Vec<OsString>) -> Option<(String, bool)> {
    let before = words.len();
    words.retain(|w| w != "--update-env");
    let update_env = words.len() < before;
    let [start, name] = words.as_slice() else {
        return None;
    };
    if start != "start" {
        return None;
    }
    Some((name.to_str()?.to_string(), update_env))
}

/// `herd start app.js` while cluster `app` runs that very command in the
/// same directory: refused, as PM2 refuses to launch a script twice, with
/// what to do instead (a second cluster of it would only fight for its port).
fn already_running(s: &crate::config::Settings) -> anyhow::Result<()> {
    let Ok((_, path)) = control::find(Some(&s.name)) else {
        return Ok(());
    };
    let Ok(st) = control::call::<Status>(&s.name, &path, &Request::Status, |_| {}) else {
        return Ok(());
    };
    let here = s.cwd.clone().or_else(|| std::env::current_dir().ok());
    let same_dir = match (&st.cwd, here) {
        (Some(theirs), Some(ours)) => {
            std::fs::canonicalize(theirs).ok() == std::fs::canonicalize(ours).ok()
        }
        _ => false,
    };
    let command = crate::console::command_line(&s.command);
    if same_dir && st.command.as_deref() == Some(command.as_str()) {
        bail!(
            "{name:?} already runs `{command}` here: `herd reload {name}` replaces its workers (`herd restart {name}` restarts them); a second cluster of it needs --name and a --listen of its own",
            name = s.name
        );
    }
    Ok(())
}

/// What `--check` prints of settings that passed (`nginx -t`'s "ok").
pub fn checked(s: &crate::config::Settings) -> String {
    format!(
        "ok: {}: {}, {}",
        s.name,
        crate::console::count(s.instances, "worker"),
        if s.port_from_app {
            format!(
                "{} mode on the port the app's listen() names (else {})",
                s.mode.as_str(),
                s.listen
            )
        } else {
            crate::console::served(s.mode.as_str(), &s.listen.to_string())
        }
    )
}

/// Validates the options here, in the foreground, then runs `herd run` in
/// its own process group with a log file, and returns once every worker is
/// ready (or fails with the log's last lines if the master gives up).
/// `warn`: print the config file's warnings (once for all its apps).
fn start_one(args: &RunArgs, warn: bool) -> anyhow::Result<()> {
    let s = args.clone().resolve()?;
    crate::proxy::check_tls(&s).map_err(anyhow::Error::msg)?;
    if warn {
        for w in &s.warnings {
            crate::errln!("herd: warning: {w}");
        }
    }
    if args.check {
        crate::outln!("{}", checked(&s));
        return Ok(());
    }
    let running: Vec<String> = control::running().into_iter().map(|(n, _)| n).collect();
    let name = if s.name_given {
        if running.contains(&s.name) {
            bail!("a cluster named {:?} is already running", s.name);
        }
        s.name.clone()
    } else {
        if running.contains(&s.name) {
            already_running(&s)?;
        }
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
    let mut argv: Vec<OsString> = if args.argv.is_empty() {
        std::env::args_os().skip(1).collect()
    } else {
        args.argv[1..].to_vec()
    };
    let at = argv.iter().position(|a| a == "start").unwrap_or(0);
    argv[at] = "run".into();
    // The command (if any) follows `--`; `--app` must come before it.
    if let Some(dash) = argv.iter().position(|a| a == "--")
        && let Some(app) = argv.iter().rposition(|a| a == "--app")
        && app > dash
    {
        let pair: Vec<OsString> = argv.drain(app..app + 2).collect();
        argv.splice(at + 1..at + 1, pair);
    }
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
    let mut port_wait: Option<Instant> = None;
    loop {
        if let Some(st) = child.try_wait()? {
            // A job run once (PM2's `--no-autorestart` script): its workers
            // ended before it could be seen ready, and the master with them.
            if st.success() && (!s.autorestart || !s.stop_exit_codes.is_empty()) {
                let why = if s.autorestart {
                    "with one of --stop-exit-codes"
                } else {
                    "(--autorestart=false)"
                };
                crate::outln!(
                    "{name}: ran and ended: every worker ended {why}, so the master stopped; `herd list` shows it as stopped. Last lines of {}:\n{}",
                    log.display(),
                    tail_from(&log, ours_from, 10)
                        .unwrap_or_default()
                        .trim_end()
                );
                return Ok(());
            }
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
            // A Node app slow to listen() is ready (as a queue consumer
            // would be) before herd knows its port: wait a little for it.
            let port_due = ready == s.instances
                && v.listen == crate::console::NO_PORT_YET
                && *port_wait.get_or_insert_with(|| Instant::now() + PORT_WAIT) > Instant::now();
            if ready == s.instances && !port_due {
                crate::outln!(
                    "{name}: started, master pid {}, {}, {}; logs: {}",
                    child.id(),
                    crate::console::count(ready, "worker"),
                    crate::console::served(&v.mode, &v.listen),
                    log.display()
                );
                // A stopped cluster of this name is superseded: `herd list`
                // and `herd start NAME` would show or start the old one once
                // this one ends some other way than by `herd stop`.
                if let Err(e) = crate::boot::forget_stopped(Some(&name)) {
                    crate::errln!("herd: warning: {e}");
                }
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster is not ready yet (pid {}); see `herd status --name {name}`; last lines of {}:\n{}",
                child.id(),
                log.display(),
                tail_from(&log, ours_from, 10)
                    .unwrap_or_default()
                    .trim_end()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints the last `lines` lines of a cluster's log; with `follow`, keeps
/// printing what is appended, across rotations. With no name and several
/// clusters running, or `all`, each running cluster's lines, each line
/// after its cluster's name, as `pm2 logs` shows every app's.
pub fn logs(name: Option<&str>, lines: usize, follow: bool, show: Shown) -> anyhow::Result<()> {
    let several = match name {
        Some("all") => true,
        None => control::running().len() > 1,
        Some(_) => false,
    };
    let paths = if several {
        let logs = running_logs()?;
        if logs.is_empty() {
            bail!("no running cluster logs to a file");
        }
        logs
    } else {
        vec![(String::new(), log_of_named(name)?)]
    };
    let width = paths.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut followed = Vec::new();
    for (n, path) in paths {
        // With --json, the app's name for each object instead.
        let prefix = if show.json {
            let stem = || path.file_stem().map(|s| s.to_string_lossy().into_owned());
            match (several, name) {
                (true, _) => n.clone(),
                (false, Some(one)) => one.to_string(),
                (false, None) => stem().unwrap_or_default(),
            }
            .into_bytes()
        } else if several {
            format!("{n:<width$} | ").into_bytes()
        } else {
            Vec::new()
        };
        // Opened once, read through the handle: a rotation renames this
        // file to FILE.1, and its last lines are read from the handle
        // before the new FILE is followed (`tail -F`), so no line is lost
        // at a rotation.
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut text = Vec::new();
        f.read_to_end(&mut text)?;
        let mut shown = Vec::new();
        let mut partial = Vec::new();
        show.filter(&text, &mut partial, &mut shown, &prefix);
        let last = last_lines(&shown, lines);
        // A reader that went away (`herd logs -f | head`) ends the command.
        if crate::console::out_bytes(last.as_bytes()).is_err() {
            return Ok(());
        }
        followed.push(Followed {
            path,
            f,
            partial,
            prefix,
        });
    }
    if !follow {
        return Ok(());
    }
    let mut buf = Vec::new();
    loop {
        let mut quiet = true;
        for one in &mut followed {
            match one.step(&show, &mut buf)? {
                Step::Printed => quiet = false,
                Step::Quiet => {}
                Step::ReaderGone => return Ok(()),
            }
        }
        if quiet {
            if crate::console::reader_gone() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The log files of the running clusters, by name.
fn running_logs() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut logs = Vec::new();
    for (n, sock) in control::running() {
        let v: Status = control::call(&n, &sock, &Request::Status, |_| {})?;
        if let Some(p) = v.log_file {
            logs.push((n, PathBuf::from(p)));
        }
    }
    Ok(logs)
}

/// The log of `name` (or of the only cluster), with an error that lists
/// the running clusters when there is none by that name.
fn log_of_named(name: Option<&str>) -> anyhow::Result<PathBuf> {
    let path = log_of(name)?;
    if let Some(n) = name
        && !path.exists()
    {
        let running: Vec<String> = control::running().into_iter().map(|(n, _)| n).collect();
        bail!(
            "no cluster named {n:?} is running or has logged to {} (running: {}){}",
            path.display(),
            if running.is_empty() {
                "none".into()
            } else {
                running.join(", ")
            },
            control::id_hint(n)
        );
    }
    Ok(path)
}

/// One log file `herd logs -f` follows.
struct Followed {
    path: PathBuf,
    f: std::fs::File,
    /// An unfinished last line, kept until its end arrives.
    partial: Vec<u8>,
    /// What goes before each line (the cluster's name, when several).
    prefix: Vec<u8>,
}

enum Step {
    Printed,
    Quiet,
    ReaderGone,
}

impl Followed {
    /// Prints what was appended since the last step: across an emptying
    /// (`herd flush`) and a rotation too.
    fn step(&mut self, show: &Shown, buf: &mut Vec<u8>) -> anyhow::Result<Step> {
        let emit = |bytes: &[u8], partial: &mut Vec<u8>, prefix: &[u8]| {
            let mut out = Vec::new();
            show.filter(bytes, partial, &mut out, prefix);
            out.is_empty() || crate::console::out_bytes(&out).is_ok()
        };
        buf.clear();
        self.f.read_to_end(buf)?;
        if !buf.is_empty() {
            if !emit(buf, &mut self.partial, &self.prefix) {
                return Ok(Step::ReaderGone);
            }
            return Ok(Step::Printed);
        }
        // Drained. Emptied in place (`herd flush`, `truncate`): what is
        // written from now on starts at its beginning, as `tail -F` reads.
        if let (Ok(at), Ok(m)) = (self.f.stream_position(), self.f.metadata())
            && m.len() < at
        {
            self.f.seek(std::io::SeekFrom::Start(0))?;
            self.partial.clear();
            return Ok(Step::Printed);
        }
        // If the path is another file now, it was rotated: the
        // old one was read to its end just above, so switch.
        if let (Ok(now), Ok(ours)) = (std::fs::metadata(&self.path), self.f.metadata())
            && (now.ino(), now.dev()) != (ours.ino(), ours.dev())
            && let Ok(next) = std::fs::File::open(&self.path)
        {
            // Ours is FILE.k now; FILE.k-1 … FILE.1 came after it, whole.
            let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.ino(), m.dev()));
            let ours = Some((ours.ino(), ours.dev()));
            let k = (1..=MAX_ROTATED).find(|&i| id(&rotated(&self.path, i)) == ours);
            for i in (1..k.unwrap_or(1)).rev() {
                if let Ok(whole) = std::fs::read(rotated(&self.path, i))
                    && !emit(&whole, &mut self.partial, &self.prefix)
                {
                    return Ok(Step::ReaderGone);
                }
            }
            self.f = next;
            return Ok(Step::Printed);
        }
        Ok(Step::Quiet)
    }
}

/// What `herd logs` shows of each line.
#[derive(Debug, Clone, Default)]
pub struct Shown {
    /// Keep the time at the start of worker lines.
    pub timestamps: bool,
    /// Show that time in this strftime format, local (PM2's `--timestamp
    /// FORMAT`, given in moment.js's).
    pub time_format: Option<String>,
    /// Only worker lines of this stream.
    pub only: Option<crate::output::Stream>,
    /// Each line as a JSON object, as `pm2 logs --json` prints them.
    pub json: bool,
    /// Each line as `pm2 logs --format` prints them (`key=value`).
    pub format: bool,
}

impl Shown {
    /// Appends to `out` the whole lines of `partial` + `bytes` as shown;
    /// keeps an unfinished last line in `partial`.
    /// `prefix` goes before each line.
    fn filter(&self, bytes: &[u8], partial: &mut Vec<u8>, out: &mut Vec<u8>, prefix: &[u8]) {
        partial.extend_from_slice(bytes);
        let Some(end) = partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        for line in partial[..=end].split_inclusive(|&b| b == b'\n') {
            self.line(line, out, prefix);
        }
        partial.drain(..=end);
    }

    fn line(&self, line: &[u8], out: &mut Vec<u8>, prefix: &[u8]) {
        let worker = crate::output::worker_line(line);
        match (self.only, worker) {
            (Some(_), None) => return,
            (Some(only), Some(w)) if w.stream != only => return,
            _ => {}
        }
        if self.json {
            json_line(line, worker, prefix, self.format, out);
            return;
        }
        out.extend_from_slice(prefix);
        match worker {
            Some(w) if !self.timestamps => out.extend_from_slice(&line[w.tag_at..]),
            Some(w) => match self
                .time_format
                .as_deref()
                .and_then(|f| local_time(&line[..w.tag_at], f))
            {
                Some(t) => {
                    out.extend_from_slice(t.as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(&line[w.tag_at..]);
                }
                None => out.extend_from_slice(line),
            },
            _ => out.extend_from_slice(line),
        }
    }
}

/// A worker line's time (`2026-12-04T15:42:23.664Z `) in `format`, local.
fn local_time(stamp: &[u8], format: &str) -> Option<String> {
    let stamp = std::str::from_utf8(stamp).ok()?.trim();
    let t = chrono::DateTime::parse_from_rfc3339(stamp).ok()?;
    Some(t.with_timezone(&chrono::Local).format(format).to_string())
}

/// One log line as PM2's `pm2 logs --json` object: `message`, `timestamp`,
/// `type` (`out`, `err`, or `herd` for herd's own lines, with their
/// `level`), `process_id` (the worker's id) and `app_name`; with
/// `format`, as `pm2 logs --format` prints it instead:
/// `timestamp=… app=… id=… type=… message=…`.
fn json_line(
    line: &[u8],
    worker: Option<crate::output::WorkerLine>,
    app: &[u8],
    format: bool,
    out: &mut Vec<u8>,
) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\n', '\r']);
    let mut obj = serde_json::Map::new();
    let stamp = |before: &str| {
        let t = before.trim();
        (!t.is_empty()).then(|| serde_json::Value::from(t))
    };
    match worker {
        Some(w) => {
            let rest = &text[w.tag_at.min(text.len())..];
            let message = rest.split_once("] ").map_or("", |(_, m)| m);
            obj.insert("message".into(), message.into());
            if let Some(t) = stamp(&text[..w.tag_at.min(text.len())]) {
                obj.insert("timestamp".into(), t);
            }
            let kind = match w.stream {
                crate::output::Stream::Out => "out",
                crate::output::Stream::Err => "err",
            };
            obj.insert("type".into(), kind.into());
            obj.insert("process_id".into(), w.slot.into());
        }
        None => {
            // herd's own: `TIME  LEVEL message`.
            let parsed = text.split_once(' ').and_then(|(t, rest)| {
                let rest = rest.trim_start();
                let (level, message) = rest.split_once(' ')?;
                ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
                    .contains(&level)
                    .then_some((t, level, message))
            });
            match parsed {
                Some((t, level, message)) => {
                    obj.insert("message".into(), message.into());
                    obj.insert("timestamp".into(), t.into());
                    obj.insert("type".into(), "herd".into());
                    obj.insert("level".into(), level.into());
                }
                None => {
                    obj.insert("message".into(), text.into());
                    obj.insert("type".into(), "herd".into());
                }
            }
        }
    }
    obj.insert(
        "app_name".into(),
        String::from_utf8_lossy(app).into_owned().into(),
    );
    if format {
        let field = |k: &str| match obj.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        let line = format!(
            "timestamp={} app={} id={} type={} message={}\n",
            field("timestamp"),
            field("app_name"),
            field("process_id"),
            field("type"),
            field("message")
        );
        out.extend_from_slice(line.as_bytes());
    } else if serde_json::to_writer(&mut *out, &obj).is_ok() {
        out.push(b'\n');
    }
}

/// The log file of cluster `name` (or of the only one running, or of the
/// only one that left a log).
fn log_of(name: Option<&str>) -> anyhow::Result<PathBuf> {
    Ok(match control::find(name) {
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
    })
}

/// `herd flush`: empties the log of cluster `name` (none or `all`: of every
/// running one) and removes its rotated files, as `pm2 flush` does. The
/// master keeps appending to the same file.
pub fn flush(name: Option<&str>) -> anyhow::Result<()> {
    let mut paths = match name {
        None | Some("all") => {
            let paths: Vec<PathBuf> = running_logs()?.into_iter().map(|(_, p)| p).collect();
            if paths.is_empty() {
                bail!("no running cluster logs to a file");
            }
            paths
        }
        Some(n) => {
            let path = log_of(name)?;
            if !path.exists() {
                bail!(
                    "no log to flush: no cluster named {n:?} is running or has logged to {}",
                    path.display()
                );
            }
            vec![path]
        }
    };
    paths.extend(copies_of(name));
    for path in paths {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
            f.set_len(0)
                .with_context(|| format!("cannot empty {}", path.display()))?;
        }
        for i in 1..=MAX_ROTATED {
            if std::fs::remove_file(rotated(&path, i)).is_err() {
                break;
            }
        }
        crate::outln!("flushed {}", path.display());
    }
    Ok(())
}

/// The `--output` and `--error` files of the running cluster `name` (none
/// or `all`: of every running one) that are files, not `/dev/null`.
fn copies_of(name: Option<&str>) -> Vec<PathBuf> {
    let clusters = match name {
        None | Some("all") => control::running(),
        Some(n) => control::find(Some(n)).into_iter().collect(),
    };
    let mut paths = Vec::new();
    for (n, sock) in clusters {
        if let Ok(v) = control::call::<Status>(&n, &sock, &Request::Status, |_| {}) {
            paths.extend(
                [v.out_file, v.error_file]
                    .into_iter()
                    .flatten()
                    .map(PathBuf::from)
                    .filter(|p| p.is_file()),
            );
        }
    }
    paths
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
/// them if the file is shorter: it was rotated in between), after herd's
/// own warnings from those lines: its hints ("make it listen on $PORT")
/// come before a crash loop's tracebacks push them out of the tail.
fn tail_from(path: &Path, from: u64, n: usize) -> std::io::Result<String> {
    let mut text = std::fs::read(path)?;
    if (from as usize) <= text.len() {
        text.drain(..from as usize);
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let cut = lines.len().saturating_sub(n);
    let mut shown: Vec<&str> = Vec::new();
    let mut out = String::new();
    for line in &lines[..cut] {
        if let Some(msg) = hint(line)
            && shown.len() < MAX_HINTS
            && !shown.contains(&msg)
        {
            shown.push(msg);
            out.push_str(line);
            out.push('\n');
        }
    }
    for line in &lines[cut..] {
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

/// How many of herd's warnings a failed start repeats at most.
const MAX_HINTS: usize = 3;

/// The message of a warning of herd's own (not a worker's line, nor the
/// report of an exit, which the tail shows anyway).
fn hint(line: &str) -> Option<&str> {
    let (stamp, msg) = line.split_once("  WARN ")?;
    let report = msg.contains(") exited ") || msg.contains(") was killed by ");
    (!stamp.contains(' ') && !report).then_some(msg)
}

/// The last `n` lines of `text`.
fn last_lines(text: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_lines_time_shows_in_the_format_asked() {
        let show = Shown {
            timestamps: true,
            // `--timestamp=YYYY`, translated.
            time_format: Some(crate::config::moment::to_strftime("YYYY")),
            ..Shown::default()
        };
        let log = "2026-06-04T13:47:41.031Z [1:err] boom\n\
                   2026-06-04T13:47:40.898345Z  WARN herd's own\n";
        assert_eq!(
            shown(&show, log, b""),
            "2026 [1:err] boom\n2026-06-04T13:47:40.898345Z  WARN herd's own\n"
        );
    }

    /// What `show` prints of `log`, for app `app`.
    fn shown(show: &Shown, log: &str, app: &[u8]) -> String {
        let (mut out, mut partial) = (Vec::new(), Vec::new());
        show.filter(log.as_bytes(), &mut partial, &mut out, app);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn formatted_logs_read_as_pm2s() {
        let show = Shown {
            json: true,
            format: true,
            ..Shown::default()
        };
        assert_eq!(
            shown(&show, "2026-12-04T13:47:41.031Z [1:err] boom\n", b"api"),
            "timestamp=2026-12-04T13:47:41.031Z app=api id=1 type=err message=boom\n"
        );
    }

    #[test]
    fn json_logs_read_as_pm2s() {
        let show = Shown {
            json: true,
            ..Shown::default()
        };
        let mut out = Vec::new();
        let mut partial = Vec::new();
        let log = "2026-12-04T13:47:41.031Z [1:err] boom \"x\"\n\
                   2026-12-04T13:47:40.898345Z  WARN worker 1 exited\n\
                   [0] no time\n";
        show.filter(log.as_bytes(), &mut partial, &mut out, b"api");
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"message": "boom \"x\"", "timestamp": "2026-12-04T13:47:41.031Z",
                "type": "err", "process_id": 1, "app_name": "api"})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"message": "worker 1 exited", "timestamp": "2026-12-04T13:47:40.898345Z",
                "type": "herd", "level": "WARN", "app_name": "api"})
        );
        assert_eq!(
            lines[2],
            serde_json::json!({"message": "no time", "type": "out", "process_id": 0, "app_name": "api"})
        );
    }

    #[test]
    fn a_failed_start_repeats_herds_hints_before_the_tail() {
        let path = std::env::temp_dir().join(format!("herd-tail-{}.log", std::process::id()));
        let mut log = String::from("old run\n");
        let from = log.len() as u64;
        log.push_str("2026-12-04T13:20:55.078Z  INFO worker 0 started (pid 1)\n");
        for _ in 0..2 {
            log.push_str(
                "2026-12-04T13:20:55.210Z  WARN worker 0 says an address is already in use\n",
            );
            log.push_str("2026-12-04T13:20:55.221Z  WARN worker 0 (pid 1) exited with code 1\n");
            log.push_str("2026-12-04T13:20:55.221Z [0:err]  WARN from the app\n");
        }
        for i in 0..3 {
            log.push_str(&format!("2026-12-04T13:20:58.948Z [0:err] traceback {i}\n"));
        }
        std::fs::write(&path, &log).unwrap();
        let shown = tail_from(&path, from, 3).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            shown,
            "2026-12-04T13:20:55.210Z  WARN worker 0 says an address is already in use\n\
             2026-12-04T13:20:58.948Z [0:err] traceback 0\n\
             2026-12-04T13:20:58.948Z [0:err] traceback 1\n\
             2026-12-04T13:20:58.948Z [0:err] traceback 2\n"
        );
    }
}
