//! The CLI side of the control socket: `herd status`, `reload`, `scale`…

use serde_json::Value;

use crate::cli::Command;
use crate::control::{self, ControlError, Request};

/// Runs one control command; returns the exit code.
pub fn run(cmd: Command) -> Result<i32, ControlError> {
    let (target, req) = match cmd {
        Command::Status { target, json } => return status(target.name.as_deref(), json),
        Command::List => return list(),
        Command::Reload { target } => (target, Request::Reload),
        Command::Restart { target } => (target, Request::Restart),
        Command::Scale { target, n } => (target, Request::Scale { n }),
        Command::Stop { target } => (target, Request::Stop),
        Command::Send {
            target,
            id,
            message,
        } => (
            target,
            Request::Send {
                id,
                message: as_json(&message),
            },
        ),
        Command::Broadcast { target, message } => (
            target,
            Request::Broadcast {
                message: as_json(&message),
            },
        ),
        Command::Run(_) | Command::Start(_) | Command::Logs { .. } | Command::Guard => {
            return Ok(2);
        }
    };
    let (name, path) = control::find(target.name.as_deref())?;
    let answer = control::call(&name, &path, &req, |p| crate::outln!("{p}"))?;
    match req {
        Request::Reload => crate::outln!(
            "{name}: reloaded {} workers",
            answer["replaced"].as_u64().unwrap_or(0)
        ),
        Request::Restart => crate::outln!(
            "{name}: restarted {} workers",
            answer["restarted"].as_u64().unwrap_or(0)
        ),
        Request::Scale { .. } => crate::outln!(
            "{name}: {} workers",
            answer["workers"].as_u64().unwrap_or(0)
        ),
        Request::Stop => crate::outln!("{name}: stopping"),
        Request::Send { id, .. } => crate::outln!("{name}: delivered to worker {id}"),
        Request::Broadcast { .. } => crate::outln!(
            "{name}: delivered to {} workers",
            answer["delivered"].as_u64().unwrap_or(0)
        ),
        Request::Status => {}
    }
    Ok(0)
}

fn status(name: Option<&str>, as_json: bool) -> Result<i32, ControlError> {
    let (name, path) = control::find(name)?;
    let v = control::call(&name, &path, &Request::Status, |_| {})?;
    if as_json {
        crate::outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(0);
    }
    crate::outln!(
        "{name}: {} mode on {}, master pid {}, up {}{}",
        v["mode"].as_str().unwrap_or("?"),
        v["listen"].as_str().unwrap_or("?"),
        v["pid"],
        duration(v["uptime"].as_f64().unwrap_or(0.0)),
        if v["reloading"].as_bool() == Some(true) {
            " (reloading)"
        } else {
            ""
        }
    );
    crate::outln!(
        "{:>3}  {:>7}  {:<8}  {:>7}  {:>8}  {:>6}  {:>7}  {:>5}  {:>9}  {:>7}  last exit",
        "id",
        "pid",
        "state",
        "uptime",
        "restarts",
        "cpu",
        "memory",
        "conns",
        "requests",
        "req/s"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        let opt = |k: &str| match &w[k] {
            Value::Null => "-".to_string(),
            x => x.to_string(),
        };
        crate::outln!(
            "{:>3}  {:>7}  {:<8}  {:>7}  {:>8}  {:>5.1}%  {:>7}  {:>5}  {:>9}  {:>7}  {}",
            opt("id"),
            opt("pid"),
            w["state"].as_str().unwrap_or("?"),
            duration(w["uptime"].as_f64().unwrap_or(0.0)),
            opt("restarts"),
            w["cpu"].as_f64().unwrap_or(0.0),
            bytes(w["memory"].as_u64().unwrap_or(0)),
            opt("connections"),
            opt("requests"),
            opt("rps"),
            w["last_exit"].as_str().unwrap_or("-"),
        );
    }
    Ok(0)
}

fn list() -> Result<i32, ControlError> {
    let all = control::running();
    if all.is_empty() {
        crate::outln!("no herd cluster is running");
        return Ok(0);
    }
    crate::outln!(
        "{:<24}  {:>7}  {:>7}  {:<9}  {:<22}  uptime",
        "name",
        "pid",
        "workers",
        "mode",
        "listen"
    );
    for (name, path) in all {
        match control::call(&name, &path, &Request::Status, |_| {}) {
            Ok(v) => crate::outln!(
                "{:<24}  {:>7}  {:>7}  {:<9}  {:<22}  {}",
                name,
                v["pid"].to_string(),
                v["workers"].as_array().map_or(0, Vec::len),
                v["mode"].as_str().unwrap_or("?"),
                v["listen"].as_str().unwrap_or("?"),
                duration(v["uptime"].as_f64().unwrap_or(0.0))
            ),
            Err(e) => crate::outln!("{name:<24}  (not answering: {e})"),
        }
    }
    Ok(0)
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
