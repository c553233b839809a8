//! The CLI side of the control socket: `herd status`, `reload`, `scale`…

use serde_json::Value;

use crate::cli::Command;
use crate::control::{self, ControlError, Done, Request, Status, WorkerState};

/// Runs one control command; returns the exit code.
pub fn run(cmd: Command) -> Result<i32, ControlError> {
    let (name, req) = match cmd {
        Command::Status { target, json, .. } if target.is_all() => return status_all(json),
        Command::Status {
            target,
            json,
            all_hosts,
        } => return status(target.name(), json, all_hosts),
        Command::Pid { target } => return pids(target.name()),
        Command::Reset { target } => (target.name().map(str::to_string), Request::Reset),
        Command::Env { target, id } => return worker_env(target.name.as_deref(), id),
        Command::List { pm2: true, json } => return jlist(json),
        Command::List { json, .. } => return list(json),
        Command::Reload {
            target,
            update_env,
            env,
            only,
        } => {
            let req = Request::Reload {
                update_env: update_env.then(caller_env),
            };
            let picked = Picked {
                profile: env.as_deref(),
                only: only.apps.as_deref(),
            };
            if let Some(code) = replace_by_file(target.name(), picked, &req)? {
                return Ok(code);
            }
            (target.name().map(str::to_string), req)
        }
        Command::Restart {
            target,
            update_env,
            env,
            only,
        } => {
            let req = Request::Restart {
                update_env: update_env.then(caller_env),
            };
            let picked = Picked {
                profile: env.as_deref(),
                only: only.apps.as_deref(),
            };
            if let Some(code) = replace_by_file(target.name(), picked, &req)? {
                return Ok(code);
            }
            (target.name().map(str::to_string), req)
        }
        Command::Stop { target, only } => match config_file(target.name()) {
            Some(file) => {
                return by_file(
                    file,
                    Picked::only(only.apps.as_deref()),
                    &Request::Stop,
                    false,
                );
            }
            None if only.apps.is_some() => return Err(only_with_file()),
            None => (target.name().map(str::to_string), Request::Stop),
        },
        Command::Delete { target, only } => match config_file(target.name()) {
            Some(file) => {
                return by_file(
                    file,
                    Picked::only(only.apps.as_deref()),
                    &Request::Stop,
                    true,
                );
            }
            None if only.apps.is_some() => return Err(only_with_file()),
            None => return delete(target.name()),
        },
        Command::Scale { target, mut words } => {
            let n = words.pop().unwrap_or_default();
            match (target.name, words.pop()) {
                (Some(_), Some(_)) => {
                    return Err(ControlError::Usage(
                        "name the cluster once: `herd scale NAME N` or `herd scale --name NAME N`"
                            .into(),
                    ));
                }
                (name, word) => (name.or(word), Request::Scale { n }),
            }
        }
        Command::Send {
            target,
            id,
            message,
        } => {
            let (host, id) = match crate::hosts::wire::parse(&id, None) {
                Ok(crate::hosts::wire::Address::Local(id)) => (None, id),
                Ok(crate::hosts::wire::Address::Remote { host, id }) => (Some(host), id),
                Err(e) => return Err(ControlError::Usage(e)),
            };
            (
                target.name,
                Request::Send {
                    id,
                    host,
                    message: as_json(&message),
                },
            )
        }
        Command::Broadcast { target, message } => (
            target.name,
            Request::Broadcast {
                message: as_json(&message),
            },
        ),
        Command::Signal {
            mut target,
            signal,
            id,
        } => {
            let signal = control::parse_signal(&signal).map_err(ControlError::Usage)?;
            let id = match (id.as_str(), id.parse()) {
                ("all", _) => None,
                (_, Ok(n)) => Some(n),
                // `pm2 sendSignal SIGUSR2 api`: a name where the id goes.
                (n, Err(_)) if target.name.is_none() => {
                    target.name = Some(n.to_string());
                    None
                }
                (n, Err(_)) => {
                    let e = format!("{n:?} is not a worker id (a number, or all)");
                    return Err(ControlError::Usage(e));
                }
            };
            let signal = signal.as_str().to_string();
            (target.name, Request::Signal { signal, id })
        }
        Command::Deploy(d) => {
            let d = *d;
            let cwd = match d.cwd {
                Some(c) => Some(
                    std::path::absolute(&c)
                        .map_err(|e| ControlError::Usage(format!("--cwd {}: {e}", c.display())))?
                        .display()
                        .to_string(),
                ),
                None => None,
            };
            let ms = |v: Option<crate::config::Dur>| v.map(|d| d.0.as_millis() as u64);
            let plan = control::DeployPlan {
                canary: d.canary,
                blue_green: d.blue_green,
                by: d.by,
                cwd,
                env: d.env,
                command: d.command,
                workers: d.workers,
                max_error_rate: d.max_error_rate,
                max_p99_ms: ms(d.max_p99),
                promote_after_ms: ms(d.promote_after),
                window_ms: ms(d.window),
            };
            (
                d.target.name().map(str::to_string),
                Request::Deploy(Box::new(plan)),
            )
        }
        Command::Monit { .. } => return Ok(2),
        Command::Upgrade { target } => (target.name().map(str::to_string), Request::Upgrade),
        Command::Promote { target } => (target.name().map(str::to_string), Request::Promote),
        Command::Rollback { target } => (target.name().map(str::to_string), Request::Rollback),
        Command::Run(_)
        | Command::Start(_)
        | Command::Logs { .. }
        | Command::Guard
        | Command::Serve { .. }
        | Command::StaticFiles
        | Command::Save { .. }
        | Command::Resurrect
        | Command::Startup { .. }
        | Command::Systemd(_)
        | Command::Flush { .. } => {
            return Ok(2);
        }
    };
    if name.as_deref() == Some("all") {
        let all = control::running();
        if all.is_empty() {
            crate::outln!("no herd cluster is running");
        }
        let mut code = 0;
        for (name, path) in all {
            if let Err(e) = one(&name, &path, &req) {
                crate::errln!("herd: error: {name}: {e}");
                code = 1;
            }
        }
        return Ok(code);
    }
    if let Some(n) = name.as_deref()
        && let Some(code) = stopped_one(n, &req)?
    {
        return Ok(code);
    }
    let (name, path) = find(name.as_deref())?;
    one(&name, &path, &req)?;
    Ok(0)
}

/// What a command by config file picks of it: `--env NAME` (its
/// `env_NAME`) and `--only` (some of its apps), as PM2's deploy lines have
/// them (`pm2 reload ecosystem.config.js --only api --env production`).
#[derive(Clone, Copy, Default)]
struct Picked<'a> {
    profile: Option<&'a str>,
    only: Option<&'a str>,
}

impl<'a> Picked<'a> {
    fn only(only: Option<&'a str>) -> Self {
        Picked {
            profile: None,
            only,
        }
    }
}

fn only_with_file() -> ControlError {
    ControlError::Usage(
        "--only picks apps of a config file: name the file (`herd reload ecosystem.config.js --only api`)".into(),
    )
}

/// A reload or restart of a config file's apps (`Some`: its exit code);
/// `None`: NAME is a cluster's. `--env` and `--only` go with a file only.
fn replace_by_file(
    name: Option<&str>,
    picked: Picked<'_>,
    req: &Request,
) -> Result<Option<i32>, ControlError> {
    match (config_file(name), picked) {
        (Some(file), picked) => by_file(file, picked, req, false).map(Some),
        (None, Picked { profile: Some(_), .. }) => Err(ControlError::Usage(
            "--env NAME picks a config file's env_NAME: name the file (`herd reload ecosystem.config.js --env NAME`)".into(),
        )),
        (None, Picked { only: Some(_), .. }) => Err(only_with_file()),
        (None, _) => Ok(None),
    }
}

/// A name that is a config file here (`ecosystem.config.js`, `herd.toml`),
/// as PM2 takes one where a name goes.
fn config_file(name: Option<&str>) -> Option<&str> {
    name.filter(|n| crate::config::apps::is_config_name(n) && std::path::Path::new(n).is_file())
}

/// `herd reload ecosystem.config.js` (restart, stop; `delete`: a stop that
/// also forgets): the request for each app of the file. A reload or restart
/// starts the apps that are not running, with the file's `env_NAME` for
/// `--env NAME`, as PM2's `reload` of a file (and `startOrReload`) does.
fn by_file(
    file: &str,
    picked: Picked<'_>,
    req: &Request,
    delete: bool,
) -> Result<i32, ControlError> {
    let profile = picked.profile;
    let usage = |e: &dyn std::fmt::Display| ControlError::Usage(format!("{file}: {e}"));
    let path = std::path::Path::new(file);
    let (named, manual) =
        crate::config::apps::names_to_start(path, profile).map_err(|e| usage(&e))?;
    // An ecosystem file of one app may leave its name to its script.
    let (mut names, several) = if named.is_empty() {
        let args = crate::cli::RunArgs {
            config: Some(path.to_path_buf()),
            env_profile: profile.map(str::to_string),
            ..Default::default()
        };
        (vec![args.resolve().map_err(|e| usage(&e))?.name], false)
    } else {
        let several = named.len() > 1;
        (named, several)
    };
    if let Some(only) = picked.only {
        let wanted: Vec<&str> = only
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect();
        if let Some(unknown) = wanted.iter().find(|w| !names.iter().any(|n| n == *w)) {
            return Err(usage(&format!(
                "no app named {unknown:?} (it has: {})",
                names.join(", ")
            )));
        }
        names.retain(|n| wanted.contains(&n.as_str()));
    }
    let running = control::running();
    let mut code = 0;
    for name in &names {
        let done = match running.iter().find(|(n, _)| n == name) {
            Some((_, sock)) if delete => one(name, sock, &Request::Stop).and_then(|()| {
                crate::boot::forget_stopped(Some(name))
                    .map(|_| crate::outln!("{name}: deleted"))
                    .map_err(|e| ControlError::Failed(e.to_string()))
            }),
            Some((_, sock)) => one(name, sock, req),
            None => match req {
                // PM2's `autostart: false`: only `--only` starts it.
                Request::Reload { .. } | Request::Restart { .. }
                    if manual.contains(name) && picked.only.is_none() =>
                {
                    crate::outln!("{name}: not running (autostart: false)");
                    Ok(())
                }
                Request::Reload { .. } | Request::Restart { .. } => {
                    start_app(file, several.then_some(name.as_str()), profile)
                }
                _ if delete => {
                    match crate::boot::forget_stopped(Some(name)) {
                        Ok(gone) if !gone.is_empty() => crate::outln!("{name}: deleted"),
                        _ => crate::outln!("{name}: not running"),
                    }
                    Ok(())
                }
                _ => {
                    crate::outln!("{name}: not running");
                    Ok(())
                }
            },
        };
        if let Err(e) = done {
            crate::errln!("herd: error: {name}: {e}");
            code = 1;
        }
    }
    Ok(code)
}

/// `herd start FILE [--app NAME] [--env PROFILE]`, its output passed on.
fn start_app(file: &str, app: Option<&str>, profile: Option<&str>) -> Result<(), ControlError> {
    let exe = std::env::current_exe().map_err(|e| ControlError::Failed(e.to_string()))?;
    let mut c = std::process::Command::new(exe);
    c.args(["start", file]);
    if let Some(app) = app {
        c.args(["--app", app]);
    }
    if let Some(p) = profile {
        c.args(["--env", p]);
    }
    match c.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(ControlError::Failed("did not start".into())),
        Err(e) => Err(ControlError::Failed(format!("cannot run herd start: {e}"))),
    }
}

/// `control::find`, whose error says so when the name is a stopped cluster.
fn find(name: Option<&str>) -> Result<(String, std::path::PathBuf), ControlError> {
    control::find(name).map_err(|e| match (e, name) {
        (ControlError::NotRunning(_), Some(n)) if is_stopped(n) => ControlError::NotRunning(
            format!(" under the name {n:?}: it was stopped; `herd start {n}` starts it again"),
        ),
        (e, _) => e,
    })
}

fn is_stopped(name: &str) -> bool {
    crate::boot::stopped().iter().any(|c| c.name == name)
}

/// A request to a cluster `herd stop` ended (and none of that name runs):
/// a restart or reload starts it again, as PM2 does for a stopped app, and
/// a stop has nothing to do. `None`: not such a cluster, or another request.
fn stopped_one(name: &str, req: &Request) -> Result<Option<i32>, ControlError> {
    if !is_stopped(name) || control::running().iter().any(|(n, _)| n == name) {
        return Ok(None);
    }
    match req {
        Request::Restart { update_env } | Request::Reload { update_env } => {
            crate::boot::start_stopped(name, update_env.as_ref())
                .map_err(|e| ControlError::Failed(e.to_string()))?;
            Ok(Some(0))
        }
        Request::Stop => {
            crate::outln!("{name}: already stopped");
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// `herd delete`: stops the cluster if it runs, and forgets it, so `herd
/// start NAME` and `herd list` no longer know it (`pm2 delete`).
fn delete(name: Option<&str>) -> Result<i32, ControlError> {
    let forget = |n: Option<&str>| {
        crate::boot::forget_stopped(n).map_err(|e| ControlError::Failed(e.to_string()))
    };
    let running = control::running();
    if name == Some("all") {
        let mut code = 0;
        for (n, path) in &running {
            if let Err(e) = one(n, path, &Request::Stop) {
                crate::errln!("herd: error: {n}: {e}");
                code = 1;
            }
        }
        let forgotten = forget(None)?;
        for n in &forgotten {
            crate::outln!("{n}: deleted");
        }
        if running.is_empty() && forgotten.is_empty() {
            crate::outln!("no herd cluster is running");
        }
        return Ok(code);
    }
    if let Some(n) = name
        && !running.iter().any(|(m, _)| m == n)
        && !forget(Some(n))?.is_empty()
    {
        crate::outln!("{n}: deleted");
        return Ok(0);
    }
    let (n, path) = find(name)?;
    one(&n, &path, &Request::Stop)?;
    forget(Some(&n))?;
    crate::outln!("{n}: deleted");
    Ok(0)
}

/// One request to one cluster, and what it did, in a line.
fn one(name: &str, path: &std::path::Path, req: &Request) -> Result<(), ControlError> {
    if *req == Request::Upgrade {
        return upgrade(name, path);
    }
    if *req == Request::Stop {
        remember(name, path);
    }
    let answer: Done = control::call(name, path, req, |p| crate::outln!("{p}"))?;
    let n = |v: Option<usize>| crate::console::count(v.unwrap_or(0), "worker");
    match req {
        Request::Reload { .. } => crate::outln!("{name}: reloaded {}", n(answer.replaced)),
        Request::Restart { .. } => crate::outln!("{name}: restarted {}", n(answer.restarted)),
        Request::Scale { .. } => crate::outln!("{name}: {}", n(answer.workers)),
        Request::Stop => {
            crate::outln!("{name}: stopping");
            if let Some(pid) = answer.pid {
                wait_exit(name, pid)?;
            }
            crate::outln!("{name}: stopped");
        }
        Request::Send { id, host: None, .. } => {
            crate::outln!("{name}: delivered to worker {id}")
        }
        Request::Send {
            id, host: Some(h), ..
        } => crate::outln!("{name}: delivered to worker {id} on {h}"),
        Request::Broadcast { .. } => match answer.hosts {
            Some(k) => crate::outln!(
                "{name}: delivered to {} here and sent to {}",
                n(answer.delivered),
                crate::console::count(k, "other host")
            ),
            None => crate::outln!("{name}: delivered to {}", n(answer.delivered)),
        },
        Request::Signal { signal, .. } => {
            crate::outln!("{name}: {signal} sent to {}", n(answer.signalled))
        }
        Request::Deploy(_) => crate::outln!(
            "{name}: deploying: {} of the new version started (see `herd status`)",
            n(answer.deployed)
        ),
        Request::Promote => crate::outln!("{name}: promoted ({} replaced)", n(answer.replaced)),
        Request::Rollback => crate::outln!(
            "{name}: rolled back ({} of the new version stopping)",
            n(answer.rolled_back)
        ),
        Request::Replace { id } => crate::outln!("{name}: worker {id} replaced"),
        Request::Reset => crate::outln!("{name}: restart counts set to 0"),
        Request::Status | Request::Hosts | Request::Upgrade | Request::Relaunch => {}
    }
    Ok(())
}

fn status(name: Option<&str>, as_json: bool, all_hosts: bool) -> Result<i32, ControlError> {
    let (name, path) = match find(name) {
        Ok(found) => found,
        // `--json` answers in JSON even with no cluster (as `pm2 jlist`).
        Err(ControlError::NotRunning(_)) if as_json && name.is_none() => {
            crate::outln!("[]");
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let req = if all_hosts {
        Request::Hosts
    } else {
        Request::Status
    };
    let v: Status = control::call(&name, &path, &req, |_| {})?;
    if as_json {
        crate::outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if all_hosts {
        for h in &v.hosts {
            match &h.status {
                Some(s) => table(&format!("{}/{name}", h.host), s),
                None => crate::outln!(
                    "{}/{name}: no report for {} (stopped, or cut off from redis)",
                    h.host,
                    duration(h.age)
                ),
            }
        }
    } else {
        table(&name, &v);
    }
    Ok(0)
}

/// `herd status all`: every running cluster.
/// `pm2 pid NAME`: the pids of the cluster's workers, one per line; none
/// or `all`: every running cluster's.
fn pids(name: Option<&str>) -> Result<i32, ControlError> {
    let clusters = match name {
        None | Some("all") => control::running(),
        Some(n) => vec![control::find(Some(n))?],
    };
    let named = name.is_some_and(|n| n != "all");
    for (n, p) in clusters {
        match control::call::<Status>(&n, &p, &Request::Status, |_| {}) {
            Ok(v) => {
                for w in v.workers.iter().filter(|w| w.pid != 0) {
                    crate::outln!("{}", w.pid);
                }
            }
            // One gone between the listing and the call: the others still count.
            Err(e) if named => return Err(e),
            Err(_) => {}
        }
    }
    Ok(0)
}

/// `pm2 env ID`: the environment worker `id` was started with, as the
/// kernel keeps it (`/proc/PID/environ`), one `NAME=value` per line, sorted.
fn worker_env(name: Option<&str>, id: usize) -> Result<i32, ControlError> {
    let (n, p) = control::find(name)?;
    let v: Status = control::call(&n, &p, &Request::Status, |_| {})?;
    let Some(w) = v.workers.iter().find(|w| w.id == id && w.pid != 0) else {
        let ids: Vec<String> = v
            .workers
            .iter()
            .filter(|w| w.pid != 0)
            .map(|w| w.id.to_string())
            .collect();
        return Err(ControlError::Usage(format!(
            "{n} has no running worker {id} (running: {})",
            if ids.is_empty() {
                "none".into()
            } else {
                ids.join(", ")
            }
        )));
    };
    let raw = std::fs::read(format!("/proc/{}/environ", w.pid))
        .map_err(|e| ControlError::Usage(format!("cannot read worker {id}'s environment: {e}")))?;
    let mut vars: Vec<&[u8]> = raw.split(|&b| b == 0).filter(|v| !v.is_empty()).collect();
    vars.sort_unstable();
    for v in vars {
        crate::outln!("{}", String::from_utf8_lossy(v));
    }
    Ok(0)
}

fn status_all(as_json: bool) -> Result<i32, ControlError> {
    let all: Vec<Status> = control::running()
        .into_iter()
        .filter_map(|(n, p)| control::call(&n, &p, &Request::Status, |_| {}).ok())
        .collect();
    if as_json {
        crate::outln!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
    } else if all.is_empty() {
        crate::outln!("no herd cluster is running");
    } else {
        for v in &all {
            table(&v.name, v);
        }
    }
    Ok(0)
}

/// A cluster's workers as a table.
fn table(name: &str, v: &Status) {
    crate::outln!(
        "{name}: {}, master pid {}, up {}{}",
        crate::console::served(&v.mode, &v.listen),
        v.pid,
        duration(v.uptime),
        if v.stopping {
            " (stopping)"
        } else if v.reloading {
            " (reloading)"
        } else {
            ""
        }
    );
    // `pm2 describe`'s script path, exec cwd and log paths.
    if let Some(command) = &v.command {
        let copy = |what: &str, f: &Option<String>| {
            f.as_deref()
                .map(|f| format!("; {what}: {f}"))
                .unwrap_or_default()
        };
        crate::outln!(
            "command: {command}; cwd: {}; log: {}{}{}{}",
            v.cwd.as_deref().unwrap_or("-"),
            v.log_file.as_deref().unwrap_or("stderr"),
            copy("output", &v.out_file),
            copy("error", &v.error_file),
            copy("user", &v.user)
        );
    }
    crate::outln!(
        "{:>3}  {:>7}  {:<8}  {:>7}  {:>8}  {:>6}  {:>7}  {:>5}  {:>9}  {:>7}  {:>7}  last exit",
        "id",
        "pid",
        "state",
        "uptime",
        "restarts",
        "cpu",
        "memory",
        "conns",
        "requests",
        "req/s",
        "p99 ms"
    );
    fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
        v.map_or_else(|| "-".to_string(), |v| v.to_string())
    }
    let deploying = v.deploy.is_some();
    for w in &v.workers {
        // During a deploy the id says which version: `3 v2`.
        let id = if deploying {
            format!("{} v{}", w.id, w.version)
        } else {
            w.id.to_string()
        };
        // An empty slot (waiting, stopped) has no process to measure.
        let live = w.state.has_process();
        let or_dash = |s: String| if live { s } else { "-".to_string() };
        crate::outln!(
            "{:>3}  {:>7}  {:<8}  {:>7}  {:>8}  {:>6}  {:>7}  {:>5}  {:>9}  {:>7}  {:>7}  {}",
            id,
            or_dash(w.pid.to_string()),
            w.shown_state(),
            or_dash(duration(w.uptime)),
            w.restarts,
            or_dash(format!("{:.1}%", w.cpu)),
            or_dash(bytes(w.memory)),
            or_dash(opt(w.connections)),
            opt(w.requests),
            opt(w.rps),
            opt(w.p99_ms),
            w.last_exit.as_deref().unwrap_or("-"),
        );
    }
    if v.workers.iter().any(|w| w.state == WorkerState::Waiting) {
        crate::outln!(
            "waiting: no process; the next one is due (after the back-off, or once the one before it exited)"
        );
    }
    if v.workers.iter().any(|w| w.state == WorkerState::Stopped) {
        crate::outln!(
            "stopped: no process, and none starts (--autorestart=false); herd reload or restart starts one"
        );
    }
    if v.workers.iter().any(|w| w.shown_state() == "down") {
        crate::outln!("down: failing its health check; the proxy sends it nothing until it passes");
    }
    if v.workers.iter().any(|w| w.shown_state() == "out") {
        crate::outln!(
            "out: taken out after failed requests (max_fails); back when a request to it succeeds"
        );
    }
    if v.worker_max_conns > 0 {
        crate::outln!(
            "max_conns {}: the requests (TCP: connections) each worker holds at once; more wait in line",
            v.worker_max_conns
        );
    }
    for u in &v.upstreams {
        let limit = match u.max_conns {
            0 => String::new(),
            n => format!(" (max_conns {n})"),
        };
        crate::outln!(
            "{}: {}, {} in flight{limit}, {} requests",
            u.name,
            match (u.healthy, u.taken_out) {
                (false, _) => "down",
                (true, true) => "taken out (max_fails)",
                (true, false) => "up",
            },
            u.in_flight,
            u.requests
        );
    }
    if let Some(d) = &v.deploy {
        deploy_table(d);
    }
}

/// A deploy's versions, under the workers of `herd status`.
fn deploy_table(d: &control::DeployStatus) {
    crate::outln!(
        "deploy: {}, {}% of traffic to the new version, split {}",
        d.kind,
        d.percent,
        d.by
    );
    fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
        v.map_or_else(|| "-".to_string(), |v| v.to_string())
    }
    for r in &d.versions {
        crate::outln!(
            "  v{:<3} {:<6}  {:>2} workers  {:>8} requests  {:>6}% 5xx  p99 {:>8} ms  {}",
            r.version,
            r.role,
            r.workers,
            opt(r.requests),
            opt(r.error_rate),
            opt(r.p99_ms),
            r.command
        );
    }
    if let Some(a) = &d.analysis {
        crate::outln!("  analysis: {a}");
    }
}

/// `pm2 jlist`'s shape, for the scripts and exporters written against it
/// (`pm2 jlist | jq '.[] | select(.pm2_env.status != "online")'`): one
/// object per worker (PM2's process), `pm_id` counting across clusters,
/// `monit` (memory bytes, CPU percent) and `pm2_env` (status in PM2's
/// words, start time in ms, restarts, instances, exec_mode, cwd, log
/// paths); a
/// stopped cluster is one object with pid 0. `pretty`: `pm2 prettylist`.
fn jlist(pretty: bool) -> Result<i32, ControlError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut out: Vec<Value> = Vec::new();
    let entry = |pm_id: usize, pid: u32, name: &str, env: Value, memory: u64, cpu: f64| {
        serde_json::json!({
            "pid": pid,
            "name": name,
            "pm_id": pm_id,
            "monit": { "memory": memory, "cpu": cpu },
            "pm2_env": env,
        })
    };
    for (n, p) in control::running() {
        let Ok(v) = control::call::<Status>(&n, &p, &Request::Status, |_| {}) else {
            continue;
        };
        let exec_mode = if v.mode == "fork" {
            "fork_mode"
        } else {
            "cluster_mode"
        };
        for w in &v.workers {
            let status = match w.state {
                // The cluster drains them before they get the signal.
                _ if v.stopping && w.state.has_process() => "stopping",
                WorkerState::Starting => "launching",
                WorkerState::Ready => "online",
                WorkerState::Stopping => "stopping",
                WorkerState::Waiting => "waiting restart",
                WorkerState::Stopped => "stopped",
            };
            let env = serde_json::json!({
                "name": v.name,
                "status": status,
                "pm_id": out.len(),
                "pm_uptime": now_ms.saturating_sub((w.uptime * 1000.0) as u64),
                "restart_time": w.restarts,
                "unstable_restarts": 0,
                "instances": v.workers.len(),
                "exec_mode": exec_mode,
                "NODE_APP_INSTANCE": w.id,
                "pm_cwd": v.cwd,
                "pm_exec_path": v.command,
                "pm_log_path": v.log_file,
                "pm_out_log_path": v.out_file.as_ref().or(v.log_file.as_ref()),
                "pm_err_log_path": v.error_file.as_ref().or(v.log_file.as_ref()),
                "herd_listen": v.listen,
                "herd_mode": v.mode,
                "username": v.user,
            });
            out.push(entry(out.len(), w.pid, &v.name, env, w.memory, w.cpu));
        }
    }
    let running: Vec<String> = out
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    for c in crate::boot::stopped() {
        if running.contains(&c.name) {
            continue;
        }
        let env = serde_json::json!({
            "name": c.name,
            "status": if c.errored { "errored" } else { "stopped" },
            "pm_id": out.len(),
            "restart_time": 0,
            "unstable_restarts": 0,
            "instances": 0,
        });
        out.push(entry(out.len(), 0, &c.name, env, 0, 0.0));
    }
    let text = if pretty {
        serde_json::to_string_pretty(&out)
    } else {
        serde_json::to_string(&out)
    };
    crate::outln!("{}", text.unwrap_or_default());
    Ok(0)
}

fn list(as_json: bool) -> Result<i32, ControlError> {
    let all = control::running();
    let stopped: Vec<_> = crate::boot::stopped()
        .into_iter()
        .filter(|c| !all.iter().any(|(m, _)| *m == c.name))
        .collect();
    if as_json {
        // Each running cluster's status with `"status": "online"` (or
        // `"stopping"`), then the stopped ones, as `pm2 jlist` lists both
        // with PM2's words.
        let mut out: Vec<Value> = all
            .iter()
            .filter_map(|(n, p)| control::call::<Status>(n, p, &Request::Status, |_| {}).ok())
            .filter_map(|v| serde_json::to_value(v).ok())
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    let stopping = o.get("stopping").and_then(Value::as_bool) == Some(true);
                    let status = if stopping { "stopping" } else { "online" };
                    o.insert("status".into(), status.into());
                }
                v
            })
            .collect();
        out.extend(stopped.iter().map(|c| {
            serde_json::json!({
                "name": c.name,
                "status": if c.errored { "errored" } else { "stopped" },
                "workers": [],
            })
        }));
        crate::outln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(0);
    }
    if all.is_empty() && stopped.is_empty() {
        crate::outln!("no herd cluster is running");
        return Ok(0);
    }
    crate::outln!(
        "{:<24}  {:>7}  {:>7}  {:<9}  {:<22}  {:>8}  {:>6}  {:>8}  uptime",
        "name",
        "pid",
        "workers",
        "mode",
        "listen",
        "restarts",
        "cpu",
        "memory"
    );
    for (name, path) in all {
        match control::call::<Status>(&name, &path, &Request::Status, |_| {}) {
            // The workers' restarts, CPU and memory summed, as `pm2 ls`
            // shows them per process.
            Ok(v) => crate::outln!(
                "{:<24}  {:>7}  {:>7}  {:<9}  {:<22}  {:>8}  {:>5.1}%  {:>8}  {}",
                name,
                v.pid,
                v.workers.iter().filter(|w| w.state.has_process()).count(),
                v.mode,
                v.listen,
                v.workers.iter().map(|w| w.restarts).sum::<u64>(),
                // (From 0.0: an empty f64 sum is -0.0, "-0.0%".)
                v.workers.iter().map(|w| w.cpu).fold(0.0, |a, b| a + b),
                bytes(v.workers.iter().map(|w| w.memory).sum()),
                if v.stopping {
                    "stopping".to_string()
                } else {
                    duration(v.uptime)
                }
            ),
            Err(e) => crate::outln!("{name:<24}  (not answering: {e})"),
        }
    }
    // As `pm2 list` shows a stopped (or errored) app until `pm2 delete`.
    for c in stopped {
        crate::outln!(
            "{:<24}  {:>7}  {:>7}  {:<9}  {:<22}  {:>8}  {:>6}  {:>8}  {}",
            c.name,
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            if c.errored { "errored" } else { "stopped" }
        );
    }
    Ok(0)
}

/// Records a cluster about to stop, for `herd start NAME` and `herd list`.
/// A cluster that cannot be recorded stops all the same.
fn remember(name: &str, path: &std::path::Path) {
    let done = control::call::<Status>(name, path, &Request::Status, |_| {})
        .map_err(|e| e.to_string())
        .and_then(|s| {
            let changed = crate::boot::changes(name, path);
            crate::boot::remember_stopped(name, s.pid, false, changed).map_err(|e| e.to_string())
        });
    if let Err(e) = done {
        crate::errln!("herd: warning: {name}: `herd start {name}` will not know it: {e}");
    }
}

/// How long `herd stop` waits for the master to drain and exit.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits until the master `pid` has exited, as `pm2 stop` does, so the
/// name is free again once `herd stop` returns; says so every 5 s.
fn wait_exit(name: &str, pid: u32) -> Result<(), ControlError> {
    let start = std::time::Instant::now();
    let mut said = 0;
    while alive(pid) {
        let waited = start.elapsed();
        if waited > STOP_WAIT {
            return Err(ControlError::Failed(format!(
                "the master (pid {pid}) is still running after {STOP_WAIT:?}"
            )));
        }
        if waited.as_secs() / 5 > said {
            said = waited.as_secs() / 5;
            crate::outln!(
                "{name}: waiting for the master (pid {pid}) to finish its requests and exit ({}s)",
                waited.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// `herd upgrade`: the master answers with progress and then re-executes
/// itself, closing the connection; the new one is known by its pid (the
/// same) and its uptime (since the request), and done once its workers are
/// ready.
fn upgrade(name: &str, path: &std::path::Path) -> Result<(), ControlError> {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(120);
    let before: Status = control::call(name, path, &Request::Status, |_| {})?;
    let workers = before
        .workers
        .iter()
        .filter(|w| w.state != WorkerState::Stopping && w.state.has_process())
        .count();
    // Done once every worker is new: a young master's uptime alone does
    // not tell the upgraded one from the old.
    let old: std::collections::HashSet<u32> = before.workers.iter().map(|w| w.pid).collect();
    let asked = std::time::Instant::now();
    match control::call::<Done>(name, path, &Request::Upgrade, |p| {
        crate::outln!("{name}: {p}")
    }) {
        Ok(_) | Err(ControlError::NoAnswer) => {}
        Err(e) => return Err(e),
    }
    loop {
        match control::call::<Status>(name, path, &Request::Status, |_| {}) {
            Ok(st) if st.pid != before.pid => {
                return Err(ControlError::Failed(format!(
                    "another master (pid {}) answers now",
                    st.pid
                )));
            }
            Ok(st) if st.stopping => {
                return Err(ControlError::Failed(format!(
                    "{name} is stopping instead: a stop came during the upgrade"
                )));
            }
            Ok(st) if st.uptime < asked.elapsed().as_secs_f64() + 0.5 => {
                let ready = st
                    .workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Ready && !old.contains(&w.pid))
                    .count();
                if ready >= workers {
                    crate::outln!(
                        "{name}: upgraded in place (master pid {} kept), {}",
                        st.pid,
                        crate::console::count(ready, "worker")
                    );
                    return Ok(());
                }
            }
            _ if !alive(before.pid) => {
                return Err(ControlError::Failed(format!(
                    "the master (pid {}) exited during the upgrade: see its log",
                    before.pid
                )));
            }
            _ => {}
        }
        if asked.elapsed() > WAIT {
            return Err(ControlError::Failed(format!(
                "the upgraded master is not ready after {WAIT:?}: see `herd status {name}`"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Whether `pid` runs (a zombie, exited but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A message as given on the command line: JSON if it parses, else a string.
fn as_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "K", "M", "G"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// This shell's environment, for `--update-env`.
pub(crate) fn caller_env() -> std::collections::BTreeMap<String, String> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}
