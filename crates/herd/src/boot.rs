//! Clusters that come back after a reboot, as PM2's `save`, `resurrect`
//! and `startup`: `herd save` records each running master's command line,
//! working directory and environment (read from `/proc`, so a cluster
//! started any way is recorded as it really runs); `herd resurrect` starts
//! the ones not running with `herd start`; `herd startup` writes the systemd
//! unit that resurrects them at boot. `herd stop` records what it stops the
//! same way (and a master that stops by itself records itself), so `herd
//! start NAME` brings it back, as `pm2 start NAME` does.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::relaunch::{self, Relaunch};
use crate::control::{self, Done, Request, Status};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "no herd cluster is running: nothing to save (`herd save --force` saves the empty list, so that `herd resurrect` starts nothing)"
    )]
    NothingRunning,
    #[error("cannot read master {pid} of {name:?} from /proc: {source}")]
    Proc {
        name: String,
        pid: u32,
        source: std::io::Error,
    },
    #[error("{name}: {source}")]
    Control {
        name: String,
        source: control::ControlError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nothing saved yet ({path} is missing): run `herd save` first")]
    NoDump { path: PathBuf },
    #[error("{path}: {message}")]
    BadDump { path: PathBuf, message: String },
    #[error("{0} of the saved clusters did not start")]
    Failed(usize),
    #[error("{0} did not start")]
    NotStarted(String),
    #[error(
        "writing {0} needs root: sudo herd startup --install (or save the unit `herd startup` prints)"
    )]
    NeedsRoot(PathBuf),
    #[error(
        "in fork mode herd opens no port, so there is no .socket unit to hold it: use `herd startup` (herd save, then herd resurrect at boot)"
    )]
    ForkHasNoSocket,
    #[error("cannot find herd's own binary: {0}")]
    OwnBinary(std::io::Error),
}

/// One saved cluster.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Saved {
    pub name: String,
    /// The master's arguments after the program (`run …`), lossless as
    /// bytes would be for every UTF-8 argument; others are replaced.
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    /// Stopped by a crash loop (`herd list`: errored, as PM2 says).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub errored: bool,
    /// What changed since the master started (scale, promote,
    /// `--update-env`), which its command line does not say.
    #[serde(default, skip_serializing_if = "Relaunch::is_empty")]
    pub relaunch: Relaunch,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct Dump {
    clusters: Vec<Saved>,
}

/// Where `herd save` writes: beside the default logs
/// (`$XDG_STATE_HOME/herd/dump.json`, else `~/.local/state/herd/dump.json`).
pub fn dump_path() -> PathBuf {
    crate::logfile::default_path("dump").with_extension("json")
}

/// `herd save`: records every running cluster; returns their names.
pub fn save(force: bool) -> Result<(Vec<String>, PathBuf), BootError> {
    let running = control::running();
    if running.is_empty() && !force {
        return Err(BootError::NothingRunning);
    }
    let mut dump = Dump::default();
    for (name, path) in running {
        let status: Status =
            control::call(&name, &path, &Request::Status, |_| {}).map_err(|source| {
                BootError::Control {
                    name: name.clone(),
                    source,
                }
            })?;
        let mut saved = read_master(&name, status.pid)?;
        if let Some(r) = changes(&name, &path) {
            saved.relaunch = r;
        }
        dump.clusters.push(saved);
    }
    let path = dump_path();
    let names = dump.clusters.iter().map(|c| c.name.clone()).collect();
    let text = serde_json::to_string_pretty(&dump).unwrap_or_default();
    write_private(&path, text.as_bytes()).map_err(|source| BootError::Write {
        path: path.clone(),
        source,
    })?;
    Ok((names, path))
}

/// What the running master `name` changed since it started (`None`: it
/// did not say, as a herd older than this does not).
pub fn changes(name: &str, path: &Path) -> Option<Relaunch> {
    let done: Done = control::call(name, path, &Request::Relaunch, |_| {}).ok()?;
    done.relaunch.map(|r| *r)
}

/// A master's command line, directory and environment, from `/proc`; the
/// changes it was started with, from its `HERD_RELAUNCH`.
fn read_master(name: &str, pid: u32) -> Result<Saved, BootError> {
    let proc_err = |source| BootError::Proc {
        name: name.to_string(),
        pid,
        source,
    };
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(dir.join("cmdline")).map_err(proc_err)?;
    let environ = std::fs::read(dir.join("environ")).map_err(proc_err)?;
    let cwd = std::fs::read_link(dir.join("cwd")).map_err(proc_err)?;
    let words = |b: &[u8]| -> Vec<String> {
        b.split(|&c| c == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect()
    };
    let mut env: BTreeMap<String, String> = words(&environ)
        .into_iter()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    let relaunch = env
        .remove(relaunch::VAR)
        .and_then(|v| Relaunch::decode(&v))
        .unwrap_or_default();
    Ok(Saved {
        name: name.to_string(),
        args: words(&cmdline).into_iter().skip(1).collect(),
        cwd,
        env,
        errored: false,
        relaunch,
    })
}

/// Writes `bytes` to `path` readable by its owner only (the environment
/// may hold secrets), through a temporary file so a reader never sees half.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `herd resurrect`: starts each saved cluster that is not running, as it
/// was (`herd start` with its arguments, directory and environment).
/// `report` gets a line per cluster.
pub fn resurrect(mut report: impl FnMut(&str)) -> Result<usize, BootError> {
    let path = dump_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BootError::NoDump { path });
        }
        Err(source) => return Err(BootError::Write { path, source }),
    };
    let dump: Dump = serde_json::from_str(&text).map_err(|e| BootError::BadDump {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let exe = std::env::current_exe().map_err(BootError::OwnBinary)?;
    let running: Vec<String> = control::running().into_iter().map(|(n, _)| n).collect();
    if dump.clusters.is_empty() {
        report(&format!(
            "{} lists no cluster (saved with `herd save --force`): nothing to start",
            path.display()
        ));
    }
    let (mut started, mut failed) = (0, 0);
    for c in &dump.clusters {
        if running.contains(&c.name) {
            report(&format!("{}: already running", c.name));
            continue;
        }
        match start_saved(&exe, c) {
            Ok(true) => started += 1,
            Ok(false) => failed += 1,
            Err(why) => {
                report(&format!("{}: {why}; skipped", c.name));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(BootError::Failed(failed));
    }
    Ok(started)
}

/// Starts one recorded cluster with `herd start`, in its directory and
/// environment; whether it started (`herd start` says why not on stderr).
fn start_saved(exe: &Path, c: &Saved) -> Result<bool, String> {
    let status = saved_command(exe, c, "start")?
        .status()
        .map_err(|e| format!("cannot start it in {}: {e}", c.cwd.display()))?;
    Ok(status.success())
}

/// `herd VERB …` as the saved cluster `c` ran: its options, directory,
/// environment and what changed since.
fn saved_command(exe: &Path, c: &Saved, verb: &str) -> Result<std::process::Command, String> {
    let mut args: Vec<OsString> = c.args.iter().map(OsString::from).collect();
    let at = args
        .iter()
        .position(|a| a == "run")
        .ok_or("not a `herd run` command line")?;
    args[at] = verb.into();
    // A directory gone since is the likely cause of a failed spawn.
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args).current_dir(&c.cwd).env_clear().envs(&c.env);
    if !c.relaunch.is_empty() {
        cmd.env(relaunch::VAR, c.relaunch.encode());
    }
    Ok(cmd)
}

/// Where the stopped clusters are kept: beside `dump.json`.
fn stopped_path() -> PathBuf {
    crate::logfile::default_path("stopped").with_extension("json")
}

/// The clusters that `herd stop` ended, or that stopped by themselves, and
/// that no `herd delete` forgot, as PM2 keeps a stopped app in its list: `herd start NAME` or `herd restart
/// NAME` starts one again as it ran, and `herd list` shows them. Empty
/// when there is no record, or it cannot be read.
pub fn stopped() -> Vec<Saved> {
    std::fs::read_to_string(stopped_path())
        .ok()
        .and_then(|t| serde_json::from_str::<Dump>(&t).ok())
        .map(|d| d.clusters)
        .unwrap_or_default()
}

/// Changes the record of stopped clusters under a lock (two `herd stop`s
/// at once both land).
fn edit_stopped(change: impl FnOnce(&mut Vec<Saved>)) -> std::io::Result<()> {
    let path = stopped_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path.with_extension("lock"))?;
    lock.lock()?;
    let mut all = stopped();
    change(&mut all);
    let text = serde_json::to_string_pretty(&Dump { clusters: all }).unwrap_or_default();
    write_private(&path, text.as_bytes())
}

/// Records the running master `pid` of `name` before `herd stop` ends it,
/// or as it gives up by itself (`errored`: on a crash loop), with what it
/// `changed` since it started when it said.
pub fn remember_stopped(
    name: &str,
    pid: u32,
    errored: bool,
    changed: Option<Relaunch>,
) -> Result<(), BootError> {
    let mut saved = Saved {
        errored,
        ..read_master(name, pid)?
    };
    if let Some(r) = changed {
        saved.relaunch = r;
    }
    edit_stopped(|all| {
        all.retain(|c| c.name != name);
        all.push(saved);
    })
    .map_err(|source| BootError::Write {
        path: stopped_path(),
        source,
    })
}

/// `herd delete`: forgets the stopped cluster `name` (`None`: all of
/// them); returns the names forgotten.
pub fn forget_stopped(name: Option<&str>) -> Result<Vec<String>, BootError> {
    let mut gone = Vec::new();
    if stopped().iter().all(|c| name.is_some_and(|n| c.name != n)) {
        return Ok(gone);
    }
    edit_stopped(|all| {
        all.retain(|c| {
            let forget = name.is_none_or(|n| c.name == n);
            if forget {
                gone.push(c.name.clone());
            }
            !forget
        })
    })
    .map_err(|source| BootError::Write {
        path: stopped_path(),
        source,
    })?;
    Ok(gone)
}

/// Starts the stopped cluster `name` again as it ran (its options,
/// directory and environment; `env`: this one instead, for
/// `--update-env`), as `pm2 start NAME` or `pm2 restart NAME` do for a
/// stopped app. `Ok(false)`: no cluster of that name was stopped.
pub fn start_stopped(
    name: &str,
    env: Option<&BTreeMap<String, String>>,
) -> Result<bool, BootError> {
    let Some(mut c) = stopped().into_iter().find(|c| c.name == name) else {
        return Ok(false);
    };
    if let Some(env) = env {
        c.env = env.clone();
        // This environment replaces the one `reload --update-env` gave.
        c.relaunch.base_env = None;
    }
    let exe = std::env::current_exe().map_err(BootError::OwnBinary)?;
    match start_saved(&exe, &c) {
        Ok(true) => {
            forget_stopped(Some(name))?;
            Ok(true)
        }
        Ok(false) => Err(BootError::NotStarted(name.to_string())),
        Err(why) => Err(BootError::BadDump {
            path: stopped_path(),
            message: format!("{name}: {why}"),
        }),
    }
}

/// `herd start NAME --no-daemon` (PM2's foreground start, a container's
/// entry point) of the stopped cluster `name`: this process becomes its
/// master in the foreground, as it ran (`env`: this one instead). The
/// record stays, as PM2 keeps the app: a running cluster hides it in
/// `herd list`. Returns only when it cannot.
pub fn run_stopped(name: &str, env: Option<&BTreeMap<String, String>>) -> BootError {
    use std::os::unix::process::CommandExt;
    let Some(mut c) = stopped().into_iter().find(|c| c.name == name) else {
        return BootError::NotStarted(name.to_string());
    };
    if let Some(env) = env {
        c.env = env.clone();
        c.relaunch.base_env = None;
    }
    // In the foreground the lines go to the terminal (or the container's
    // log), not to the file `herd start` gave it when none was asked for.
    let default_log = crate::logfile::default_path(name);
    if let Some(at) = c
        .args
        .windows(2)
        .position(|w| w[0] == "--log-file" && Path::new(&w[1]) == default_log)
    {
        c.args.drain(at..at + 2);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return BootError::OwnBinary(e),
    };
    let message = match saved_command(&exe, &c, "run") {
        Ok(mut cmd) => format!("cannot run it in {}: {}", c.cwd.display(), cmd.exec()),
        Err(why) => why.to_string(),
    };
    BootError::BadDump {
        path: stopped_path(),
        message: format!("{name}: {message}"),
    }
}

/// The systemd unit `herd startup` prints: `herd resurrect` at boot as
/// `user`, `herd stop all` at shutdown.
pub fn unit(user: &str, uid: u32) -> Result<String, BootError> {
    let exe = std::env::current_exe().map_err(BootError::OwnBinary)?;
    let exe = exe.display();
    let mut env = String::new();
    for k in ["HOME", "PATH", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"] {
        if let Some(v) = std::env::var_os(k) {
            // systemd's quoting: double quotes, with \ and " escaped, and %
            // doubled (a specifier otherwise).
            let v = String::from_utf8_lossy(v.as_bytes())
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%");
            env.push_str(&format!("Environment=\"{k}={v}\"\n"));
        }
    }
    // The runtime directory (/run/user/UID), where herd keeps its control
    // sockets, exists at boot only if this unit asks for it.
    let runtime = if uid == 0 {
        String::new()
    } else {
        format!("Requires=user-runtime-dir@{uid}.service\nAfter=user-runtime-dir@{uid}.service\n")
    };
    Ok(format!(
        "# Written by `herd startup`: starts the clusters `herd save` recorded at boot.\n\
         [Unit]\n\
         Description=herd clusters of {user} (herd resurrect)\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         {runtime}\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         User={user}\n\
         {env}\
         ExecStart={exe} resurrect\n\
         ExecReload={exe} reload all\n\
         ExecStop={exe} stop all\n\
         TimeoutStartSec=300\n\
         TimeoutStopSec=120\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    ))
}

/// systemd's quoting of one word of a command line: double quotes when
/// needed, `\` and `"` escaped, `%` and `$` doubled (specifiers and
/// variables would expand otherwise).
fn exec_word(w: &str) -> String {
    let w = w.replace('%', "%%").replace('$', "$$");
    if !w.is_empty()
        && !w
            .contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'' || c == ';')
    {
        return w;
    }
    format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `herd systemd NAME`: a `.socket` unit holding the port (so it stays
/// open, and connections wait in its queue, while the master restarts) and
/// a `Type=notify` `.service` running `herd run` on it, with systemd's
/// watchdog fed by the supervisor loop. `run_args` are the words after
/// `herd run`; `s` the settings they resolve to.
pub fn service_units(
    name: &str,
    run_args: &[String],
    s: &crate::config::Settings,
    watchdog: std::time::Duration,
) -> Result<(String, String), BootError> {
    if s.mode == crate::config::Mode::Fork {
        return Err(BootError::ForkHasNoSocket);
    }
    let exe = std::env::current_exe().map_err(BootError::OwnBinary)?;
    let (user, _) = whoami();
    let cwd = std::env::current_dir().map_err(BootError::OwnBinary)?;
    let mut exec = vec![exe.display().to_string(), "run".into()];
    exec.extend(run_args.iter().cloned());
    let exec: Vec<String> = exec.iter().map(|w| exec_word(w)).collect();
    let reuse = if s.mode == crate::config::Mode::Reuseport {
        "ReusePort=yes\n"
    } else {
        ""
    };
    let socket = format!(
        "# Written by `herd systemd {name}`: holds the port of herd cluster {name}.\n\
         [Unit]\n\
         Description=herd cluster {name}: its port\n\
         \n\
         [Socket]\n\
         ListenStream={listen}\n\
         Backlog=4096\n\
         {reuse}\
         \n\
         [Install]\n\
         WantedBy=sockets.target\n",
        listen = s.listen,
    );
    let stop = s.drain_timeout + s.kill_timeout + std::time::Duration::from_secs(10);
    let watchdog = match watchdog.as_secs() {
        0 => String::new(),
        n => format!("WatchdogSec={}s\n", n.max(2)),
    };
    let service = format!(
        "# Written by `herd systemd {name}`: herd cluster {name} on {name}.socket.\n\
         [Unit]\n\
         Description=herd cluster {name}\n\
         Requires={name}.socket\n\
         After={name}.socket network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         User={user}\n\
         WorkingDirectory={cwd}\n\
         ExecStart={exec}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         KillMode=mixed\n\
         TimeoutStopSec={stop}s\n\
         {watchdog}\
         Restart=on-failure\n\
         RestartSec=1s\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        cwd = exec_word(&cwd.display().to_string()),
        exec = exec.join(" "),
        stop = stop.as_secs(),
    );
    Ok((socket, service))
}

/// `herd startup --install`: writes the unit into `dir` as
/// `herd-USER.service`, then enables it when `systemctl` is there.
/// Returns the unit's path and whether it was enabled.
pub fn install(dir: &Path, user: &str, uid: u32) -> Result<(PathBuf, bool), BootError> {
    let text = unit(user, uid)?;
    let path = dir.join(format!("herd-{user}.service"));
    if let Err(source) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &text)) {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            return Err(BootError::NeedsRoot(path));
        }
        return Err(BootError::Write { path, source });
    }
    let systemd = dir == Path::new("/etc/systemd/system");
    let enabled = systemd
        && std::process::Command::new("systemctl")
            .arg("daemon-reload")
            .status()
            .is_ok_and(|s| s.success())
        && std::process::Command::new("systemctl")
            .args(["enable", &format!("herd-{user}.service")])
            .status()
            .is_ok_and(|s| s.success());
    Ok((path, enabled))
}

/// The user herd runs as, and its uid.
pub fn whoami() -> (String, u32) {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    (name, uid.as_raw())
}
