//! Several apps in one file, each its own cluster: the `[[app]]` tables of a
//! `herd.toml` (over the file's top-level keys), or PM2's ecosystem file
//! (`ecosystem.config.js`, evaluated with `node`, `.json`, or `.yml` as
//! `pm2-runtime process.yml` reads it) with its keys
//! mapped to herd's [`Options`]. Keys herd cannot honour are named in one
//! warning, never ignored silently.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{
    ConfigError, Dur, EnvPair, Instances, KillSignal, Layer, ListenAddr, Mode, Options, Size,
};

/// What a config file holds: one cluster's options, or several apps.
#[derive(Debug, Default)]
pub struct FileApps {
    /// The file's top level (a `herd.toml` without `[[app]]`), or nothing.
    pub single: Option<Options>,
    /// Each app, its name set, with the file's top level under it.
    pub apps: Vec<Options>,
    /// Keys herd does not honour, for one warning.
    pub ignored: Vec<String>,
    /// Apps with PM2's `autostart: false`: `herd start FILE` leaves them
    /// out unless `--only` names them.
    pub manual: Vec<String>,
}

/// A file name `herd start FILE` reads as a config, as PM2 does.
pub fn is_config_name(word: &str) -> bool {
    [
        ".toml",
        ".json",
        ".yml",
        ".yaml",
        ".config.js",
        ".config.cjs",
        ".config.mjs",
    ]
    .iter()
    .any(|ext| word.ends_with(ext))
}

fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml")
}

/// Reads `path`; `profile` picks `env_NAME` of an ecosystem file.
pub fn read(path: &Path, profile: Option<&str>) -> Result<FileApps, ConfigError> {
    let err = |message: String| ConfigError::ParseNoSpan {
        path: path.to_path_buf(),
        message,
    };
    if is_toml(path) {
        if let Some(p) = profile {
            return Err(ConfigError::Profile(p.to_string()));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        return toml_apps(path, &text);
    }
    let dir = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let value = if ["json", "yml", "yaml"].contains(&ext) {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if ext == "json" {
            serde_json::from_str(&text).map_err(|e| err(e.to_string()))?
        } else {
            from_yaml(&text).map_err(|e| err(e.to_string()))?
        }
    } else {
        evaluate_js(path)?
    };
    let list = match value {
        Value::Object(mut o) if o.contains_key("apps") => o.remove("apps").unwrap_or_default(),
        v @ Value::Array(_) => v,
        v @ Value::Object(_) => Value::Array(vec![v]),
        _ => return Err(err("no `apps` list in it".into())),
    };
    let Value::Array(list) = list else {
        return Err(err("`apps` is not a list".into()));
    };
    // As PM2: an app without env_NAME runs with its env; a name no app
    // knows is a typo.
    if let Some(p) = profile
        && !list.iter().any(|a| a.get(format!("env_{p}")).is_some())
    {
        return Err(err(format!("no app has env_{p} (for --env {p})")));
    }
    let mut out = FileApps::default();
    for (i, app) in list.iter().enumerate() {
        let Value::Object(app) = app else {
            return Err(err(format!("apps[{i}] is not an object")));
        };
        let label = app
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("apps[{i}]"), str::to_string);
        let opts = ecosystem_app(app, &dir, profile, &label, &mut out.ignored)
            .map_err(|m| err(format!("{label}: {m}")))?;
        if app.get("autostart").and_then(Value::as_bool) == Some(false) {
            out.manual.push(label.clone());
        }
        out.apps.push(opts);
    }
    if out.apps.is_empty() {
        return Err(err("`apps` is empty".into()));
    }
    unique_names(path, &out.apps)?;
    Ok(out)
}

/// A YAML app declaration read as PM2 reads it (js-yaml, YAML 1.2): only
/// `true` and `false` are booleans, so an app named `y` or `no` keeps its
/// name; errors in one line, without the source snippet.
fn from_yaml(text: &str) -> Result<Value, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(
        text,
        serde_saphyr::options! { strict_booleans: true, with_snippet: false },
    )
}

/// A `herd.toml`: its top level, and each `[[app]]` over it.
fn toml_apps(path: &Path, text: &str) -> Result<FileApps, ConfigError> {
    let mut table: toml::Table = match text.parse() {
        Ok(t) => t,
        // Syntax errors keep their line and column.
        Err(_) => return Options::parse(path, text).map(|_| FileApps::default()),
    };
    // `[[apps]]` too, as PM2's ecosystem file names its list.
    let apps = match (table.remove("app"), table.remove("apps")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::ParseNoSpan {
                path: path.to_path_buf(),
                message: "both [[app]] and [[apps]] tables: use one of the two".into(),
            });
        }
        (one, other) => one.or(other),
    };
    let Some(apps) = apps else {
        return Ok(FileApps {
            single: Some(Options::parse(path, text)?),
            ..FileApps::default()
        });
    };
    let at = |what: String, e: toml::de::Error| ConfigError::ParseNoSpan {
        path: path.to_path_buf(),
        message: format!("{what}: {}", super::toml_message(&e)),
    };
    let base: Options = toml::Value::Table(table)
        .try_into()
        .map_err(|e| at("top level".into(), e))?;
    let toml::Value::Array(apps) = apps else {
        return Err(ConfigError::ParseNoSpan {
            path: path.to_path_buf(),
            message: "`app` must be a list of tables: write [[app]]".into(),
        });
    };
    let mut out = FileApps::default();
    for (i, app) in apps.into_iter().enumerate() {
        let label = app.get("name").and_then(toml::Value::as_str).map_or_else(
            || format!("[[app]] #{}", i + 1),
            |n| format!("[[app]] {n:?}"),
        );
        let opts: Options = app.try_into().map_err(|e| at(label.clone(), e))?;
        if opts.name.is_none() {
            return Err(ConfigError::ParseNoSpan {
                path: path.to_path_buf(),
                message: format!("{label} needs a name"),
            });
        }
        out.apps.push(opts.over(base.clone()));
    }
    unique_names(path, &out.apps)?;
    Ok(out)
}

fn unique_names(path: &Path, apps: &[Options]) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for a in apps {
        if let Some(n) = &a.name
            && !seen.insert(n)
        {
            return Err(ConfigError::ParseNoSpan {
                path: path.to_path_buf(),
                message: format!("two apps are named {n:?}"),
            });
        }
    }
    Ok(())
}

/// `module.exports` (or an ES module's default export) as JSON, from `node`.
fn evaluate_js(path: &Path) -> Result<Value, ConfigError> {
    const JS: &str = "import(require('url').pathToFileURL(process.argv[1]).href)\
        .then((m) => { const c = m.default ?? m; process.stdout.write(JSON.stringify(c)); })\
        .catch((e) => { console.error(String((e && e.message) || e).split('\\n')[0]); process.exit(1); });";
    let full = path.canonicalize().map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let out = std::process::Command::new("node")
        .args(["-e", JS])
        .arg(&full)
        .env_remove("NODE_OPTIONS")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| ConfigError::ParseNoSpan {
            path: path.to_path_buf(),
            message: format!(
                "reading a .js ecosystem file needs node ({e}); write it as .json or herd.toml"
            ),
        })?;
    if !out.status.success() {
        return Err(ConfigError::ParseNoSpan {
            path: path.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| ConfigError::ParseNoSpan {
        path: path.to_path_buf(),
        message: format!("its export is not plain data: {e}"),
    })
}

/// Keys that need nothing from herd: it always merges the workers' output
/// into one log, and always stamps it.
const SILENT: &[&str] = &["merge_logs", "combine_logs"];

/// The ecosystem keys herd reads (the arms of `ecosystem_app`), for the
/// nearest one to a misspelt key.
#[rustfmt::skip]
const READ: &[&str] = &[
    "name", "script", "args", "interpreter", "exec_interpreter", "interpreter_args", "node_args",
    "cwd", "instances", "env", "max_memory_restart", "kill_timeout", "listen_timeout",
    "wait_ready", "min_uptime", "max_restarts", "restart_delay", "exp_backoff_restart_delay",
    "watch", "ignore_watch", "watch_delay", "cron_restart", "increment_var", "instance_var",
    "log_file", "autorestart", "exec_mode", "shutdown_with_message", "stop_exit_codes",
    "autostart", "out_file", "output", "error_file", "error", "time", "log_date_format",
    "log_type", "port", "cmd", "command", "disable_logs", "user", "uid", "gid",
];

/// PM2's own keys that herd does not read: ignored, but not misspelt
/// (`namespace` is not a misspelt `name`).
#[rustfmt::skip]
const PM2_ONLY: &[&str] = &[
    "namespace", "log",
    "pid_file", "vizion", "post_update", "force", "source_map_support",
    "disable_source_map_support", "filter_env", "append_env_to_name", "treekill",
    "automation", "pmx",
    "deep_monitoring", "trace", "disable_trace", "max",
];

/// `app.key`, with the key herd reads that it is probably a misspelling of.
fn ignored_key(label: &str, key: &str) -> String {
    let near = if PM2_ONLY.contains(&key) {
        None
    } else {
        READ.iter()
            .map(|k| (strsim::jaro_winkler(key, k), *k))
            .filter(|(score, _)| *score > 0.85)
            .max_by(|a, b| a.0.total_cmp(&b.0))
    };
    match near {
        Some((_, k)) => format!("{label}.{key} (did you mean {k}?)"),
        None => format!("{label}.{key}"),
    }
}

/// One app of an ecosystem file as herd's options.
fn ecosystem_app(
    app: &Map<String, Value>,
    dir: &Path,
    profile: Option<&str>,
    label: &str,
    ignored: &mut Vec<String>,
) -> Result<Options, String> {
    let mut o = Options::default();
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let words = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(a) => a.iter().filter_map(text).collect(),
            v => text(v)
                .map(|s| s.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
        }
    };
    // PM2's durations are milliseconds, or strings like "10s".
    let ms = |key: &str, v: &Value| -> Result<Dur, String> {
        match v {
            Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| format!("{key}: {n} is not a number of milliseconds"))
                .and_then(|n| {
                    format!("{n}ms")
                        .parse::<Dur>()
                        .map_err(|e| format!("{key}: {e}"))
                }),
            Value::String(s) => s
                .parse::<u64>()
                .map_or_else(|_| s.parse::<Dur>(), |n| format!("{n}ms").parse::<Dur>())
                .map_err(|e| format!("{key}: {e}")),
            _ => Err(format!("{key}: expected milliseconds")),
        }
    };
    let profile_key = profile.map(|p| format!("env_{p}"));
    let mut script: Option<String> = None;
    let mut args: Vec<String> = Vec::new();
    let mut interpreter: Option<String> = None;
    let mut interpreter_args: Vec<String> = Vec::new();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut profile_env: Vec<(String, String)> = Vec::new();
    let mut cwd = dir.to_path_buf();
    let mut fork: Option<bool> = None;
    let (mut alias, mut port) = (None, None);
    for (key, v) in app {
        match key.as_str() {
            "name" => o.name = text(v),
            "script" => script = text(v),
            // PM2 reads them as `script` when it has none.
            "cmd" | "command" => alias = text(v),
            // PM2's `port: 3000` sets `env.PORT` (over `env` and `env_NAME`).
            "port" => port = text(v),
            "args" => args = words(v),
            // An empty one is none, as PM2 reads it (a falsy value).
            "interpreter" | "exec_interpreter" => {
                interpreter = text(v).filter(|i| !i.trim().is_empty())
            }
            "interpreter_args" | "node_args" => interpreter_args.extend(words(v)),
            "cwd" => cwd = dir.join(super::home_path(Path::new(&text(v).unwrap_or_default()))),
            "instances" => {
                o.instances = Some(match v {
                    Value::Number(n) => match n.as_i64() {
                        Some(0) => Instances::Max,
                        Some(n) if n > 0 => Instances::Count(n as usize),
                        Some(n) => Instances::AllBut(n.unsigned_abs() as usize),
                        None => return Err(format!("instances: {n}?")),
                    },
                    v => text(v)
                        .unwrap_or_default()
                        .parse()
                        .map_err(|e| format!("instances: {e}"))?,
                })
            }
            "env" => env = env_of(v).ok_or("env must be an object")?,
            k if Some(k) == profile_key.as_deref() => {
                profile_env = env_of(v).ok_or_else(|| format!("{k} must be an object"))?
            }
            k if k.starts_with("env_") => {} // other profiles
            "autostart" => {}                // read by `read`, for `herd start FILE`
            "max_memory_restart" => {
                let s = text(v).unwrap_or_default();
                o.max_memory = Some(
                    s.parse::<Size>()
                        .map_err(|e| format!("max_memory_restart: {e}"))?,
                );
            }
            "kill_timeout" => o.kill_timeout = Some(ms(key, v)?),
            "listen_timeout" => o.ready_timeout = Some(ms(key, v)?),
            "wait_ready" => o.wait_ready = v.as_bool(),
            "min_uptime" => o.min_uptime = Some(ms(key, v)?),
            "max_restarts" => o.max_restarts = v.as_u64().map(|n| n as u32),
            "restart_delay" | "exp_backoff_restart_delay" => o.restart_delay = Some(ms(key, v)?),
            "watch" => {
                o.watch = match v {
                    Value::Bool(false) => None,
                    Value::Bool(true) => Some(vec![PathBuf::from(".")]),
                    v => Some(words(v).into_iter().map(PathBuf::from).collect()),
                }
            }
            "ignore_watch" => o.watch_ignore = Some(words(v)),
            "watch_delay" => o.watch_delay = Some(ms(key, v)?),
            "cron_restart" => {
                let pattern = text(v).unwrap_or_default();
                o.cron_restart = Some(pattern.parse().map_err(|e| format!("cron_restart: {e}"))?);
            }
            "increment_var" => o.increment_var = text(v),
            "instance_var" => o.instance_var = text(v),
            "log_file" => o.log_file = text(v).map(|f| dir.join(super::log_path(Path::new(&f)))),
            "out_file" | "output" => {
                o.output = text(v).map(|f| dir.join(super::log_path(Path::new(&f))))
            }
            "error_file" | "error" => {
                o.error = text(v).map(|f| dir.join(super::log_path(Path::new(&f))))
            }
            "time" => o.time = v.as_bool(),
            "disable_logs" => o.disable_logs = v.as_bool(),
            "user" | "uid" => o.user = text(v),
            "gid" => o.group = text(v),
            "log_date_format" => o.log_date_format = text(v),
            "log_type" => {
                o.log_type = match text(v).as_deref() {
                    Some("json") => Some(super::LogType::Json),
                    Some("raw" | "") | None => Some(super::LogType::Raw),
                    Some(other) => return Err(format!("log_type: {other:?} is not json")),
                }
            }
            "autorestart" => o.autorestart = v.as_bool(),
            "stop_exit_codes" => {
                let codes = match v {
                    Value::Array(a) => a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>(),
                    v => v.as_u64().map(|c| vec![c]),
                };
                let codes = codes.ok_or("stop_exit_codes: a list of exit codes (numbers)")?;
                o.stop_exit_codes = Some(
                    codes
                        .into_iter()
                        .map(u8::try_from)
                        .collect::<Result<_, _>>()
                        .map_err(|_| "stop_exit_codes: exit codes go from 0 to 255")?,
                );
            }
            // No signal: the shutdown message alone (`--kill-signal none`).
            "shutdown_with_message" if v.as_bool() == Some(true) => {
                o.kill_signal = Some(KillSignal(None));
            }
            "shutdown_with_message" => {}
            "exec_mode" => {
                fork = match text(v).as_deref() {
                    Some("fork" | "fork_mode") => Some(true),
                    Some("cluster" | "cluster_mode") => Some(false),
                    _ => return Err("exec_mode: expected \"cluster\" or \"fork\"".into()),
                }
            }
            k if SILENT.contains(&k) => {}
            k => ignored.push(ignored_key(label, k)),
        }
    }
    script = script.or(alias);
    // `env_production` over `env`, and `port` over both.
    let port = port.map(|p| ("PORT".to_string(), p));
    for (k, v) in profile_env.into_iter().chain(port) {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    // PM2's default exec_mode: cluster for a Node app that names its
    // `instances`, else fork. herd also clusters any app whose port it
    // knows. A Node cluster without PORT is served on the port its code
    // names, and one that never listens (a queue consumer) runs as in fork
    // mode (see `supervise::port`).
    // PM2's `script: 'serve'`: its static file server (herd's, which reads
    // the same PM2_SERVE_* variables), one process on PM2_SERVE_PORT.
    if script.as_deref() == Some("serve") && interpreter.is_none() {
        let port = env
            .iter()
            .find(|(k, _)| k == "PM2_SERVE_PORT")
            .map_or("8080", |(_, v)| v.as_str());
        o.listen = Some(
            port.parse::<ListenAddr>()
                .map_err(|e| format!("env PM2_SERVE_PORT: {e}"))?,
        );
        let exe = crate::os::sys::exe_path().unwrap_or_else(|| PathBuf::from("herd"));
        o.command = Some(vec![exe.into(), "static-files".into()]);
        o.env = env.into_iter().map(|(k, v)| EnvPair(k, v)).collect();
        o.cwd = Some(cwd);
        o.instances.get_or_insert(Instances::Count(1));
        return Ok(o);
    }
    let port_known = env.iter().any(|(k, _)| k == "PORT");
    let node = match interpreter.as_deref() {
        Some("none") => false,
        Some(i) => super::is_node(Path::new(i)),
        // By its extension, else its `#!` line (Express's `bin/www`).
        None => script.as_ref().is_some_and(|s| {
            super::interpreter_of(Path::new(s)) == Some("node")
                || super::with_interpreter(vec![s.into()], Some(&cwd))
                    .first()
                    .is_some_and(|p| super::is_node(Path::new(p)))
        }),
    };
    let pm2_cluster = node && o.instances.is_some();
    // `increment_var: 'PORT'` (PM2's docs pair it with cluster mode): each
    // instance binds a port of its own, 3000, 3001…, which is fork mode.
    let own_ports = o.increment_var.as_deref() == Some("PORT");
    if own_ports || fork.unwrap_or(!(port_known || pm2_cluster)) {
        o.mode = Some(Mode::Fork);
    }
    // PM2 apps read their port from PORT; herd listens there for them and
    // gives each worker its own (proxy) or the socket (fd modes). In fork
    // mode the program binds it itself, as under PM2.
    if let Some(i) = env.iter().position(|(k, _)| k == "PORT")
        && o.mode != Some(Mode::Fork)
    {
        let (_, port) = env.remove(i);
        o.listen = Some(
            port.parse::<ListenAddr>()
                .map_err(|e| format!("env PORT: {e}"))?,
        );
    }
    o.env = env.into_iter().map(|(k, v)| EnvPair(k, v)).collect();
    let script = script.ok_or("it has no script")?;
    let mut command: Vec<OsString> = Vec::new();
    match interpreter.as_deref() {
        None | Some("none") if interpreter_args.is_empty() => {}
        None => command.push(if script.ends_with(".py") {
            "python3".into()
        } else {
            "node".into()
        }),
        Some("none") => return Err("interpreter_args need an interpreter".into()),
        Some(i) => command.push(i.into()),
    }
    command.extend(interpreter_args.into_iter().map(OsString::from));
    command.push(script.into());
    command.extend(args.into_iter().map(OsString::from));
    o.command = Some(command);
    o.cwd = Some(cwd);
    // PM2 starts one instance unless told otherwise; so does its file here.
    o.instances.get_or_insert(Instances::Count(1));
    Ok(o)
}

/// An `env` object: values as strings (numbers and booleans too).
fn env_of(v: &Value) -> Option<Vec<(String, String)>> {
    let Value::Object(m) = v else { return None };
    Some(
        m.iter()
            .filter_map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => return None,
                    v => v.to_string(),
                };
                Some((k.clone(), s))
            })
            .collect(),
    )
}

/// The options of `app` (or of the file's only one) from `path`, and the
/// warning to give for keys herd ignores.
pub fn select(
    path: &Path,
    app: Option<&str>,
    profile: Option<&str>,
) -> Result<(Options, Option<String>), ConfigError> {
    let f = read(path, profile)?;
    let warning = (!f.ignored.is_empty()).then(|| {
        format!(
            "{}: herd ignores these keys: {}",
            path.display(),
            f.ignored.join(", ")
        )
    });
    if let Some(single) = f.single {
        return match app {
            Some(a) => Err(ConfigError::NoSuchApp {
                app: a.to_string(),
                path: path.to_path_buf(),
                names: String::new(),
            }),
            None => Ok((single, warning)),
        };
    }
    let names = || {
        f.apps
            .iter()
            .filter_map(|a| a.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let picked = match app {
        Some(a) => f.apps.iter().find(|o| o.name.as_deref() == Some(a)),
        None if f.apps.len() == 1 => f.apps.first(),
        None => {
            return Err(ConfigError::SeveralApps {
                path: path.to_path_buf(),
                names: names(),
            });
        }
    };
    match picked {
        Some(o) => Ok((o.clone(), warning)),
        None => Err(ConfigError::NoSuchApp {
            app: app.unwrap_or_default().to_string(),
            path: path.to_path_buf(),
            names: names(),
        }),
    }
}

/// The apps' names, when `path` holds apps (not a single cluster's options).
pub fn names(path: &Path, profile: Option<&str>) -> Result<Vec<String>, ConfigError> {
    Ok(names_to_start(path, profile)?.0)
}

/// The apps' names, and those of them PM2's `autostart: false` keeps from
/// starting with the file.
pub fn names_to_start(
    path: &Path,
    profile: Option<&str>,
) -> Result<(Vec<String>, Vec<String>), ConfigError> {
    let f = read(path, profile)?;
    Ok((
        f.apps.iter().filter_map(|a| a.name.clone()).collect(),
        f.manual,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("herd-apps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn toml_apps_take_the_top_level_under_their_own_keys() {
        let p = temp(
            "two.toml",
            "kill-timeout = \"2s\"\ninstances = 3\n[env]\nA = \"1\"\n\
             [[app]]\nname = \"api\"\ncommand = [\"node\", \"api.js\"]\nlisten = 3000\n\
             [[app]]\nname = \"web\"\ncommand = [\"node\", \"web.js\"]\ninstances = 1\n[app.env]\nB = \"2\"\n",
        );
        let (api, _) = select(&p, Some("api"), None).unwrap();
        assert_eq!(api.instances, Some(Instances::Count(3)));
        assert_eq!(api.kill_timeout.unwrap().0.as_secs(), 2);
        let (web, _) = select(&p, Some("web"), None).unwrap();
        assert_eq!(web.instances, Some(Instances::Count(1)));
        let env: Vec<_> = web
            .env
            .iter()
            .map(|EnvPair(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(env, ["A=1", "B=2"]);
        assert_eq!(names(&p, None).unwrap(), ["api", "web"]);
        let e = select(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("api, web"), "{e}");
        let e = select(&p, Some("nope"), None).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("api, web"), "{e}");
    }

    #[test]
    fn toml_app_errors_name_the_app() {
        let p = temp(
            "bad.toml",
            "[[app]]\nname = \"api\"\ncommand = [\"x\"]\nkill-timout = \"2s\"\n",
        );
        let e = select(&p, Some("api"), None).unwrap_err().to_string();
        assert!(
            e.contains("[[app]] \"api\"")
                && e.ends_with("unknown key `kill-timout`; did you mean `kill-timeout`?"),
            "{e}"
        );
        let p = temp("anon.toml", "[[app]]\ncommand = [\"x\"]\n");
        let e = select(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("needs a name"), "{e}");
    }

    #[test]
    fn toml_apps_may_be_spelled_as_pm2_names_its_list() {
        let p = temp(
            "pm2ish.toml",
            "[[apps]]\nname = \"api\"\ncommand = [\"x\"]\n[[apps]]\nname = \"web\"\ncommand = [\"y\"]\n",
        );
        assert_eq!(names(&p, None).unwrap(), ["api", "web"]);
        let p = temp(
            "both.toml",
            "[[app]]\nname = \"api\"\ncommand = [\"x\"]\n[[apps]]\nname = \"web\"\ncommand = [\"y\"]\n",
        );
        let e = select(&p, Some("api"), None).unwrap_err().to_string();
        assert!(e.contains("both [[app]] and [[apps]]"), "{e}");
    }

    #[test]
    fn ecosystem_keys_map_to_herds_and_the_rest_are_named() {
        let p = temp(
            "ecosystem.json",
            r#"{"apps": [{
                "name": "api", "script": "server.js", "args": "--fast -v",
                "instances": -1, "exec_mode": "cluster", "max_memory_restart": "300M",
                "kill_timeout": 3000, "wait_ready": true, "listen_timeout": 8000,
                "env": {"NODE_ENV": "development", "PORT": 3000, "DEBUG": true},
                "env_production": {"NODE_ENV": "production"},
                "watch": ["src"], "ignore_watch": ["tmp"], "increment_var": "SHARD",
                "instance_var": "INSTANCE_ID",
                "autorestart": false, "namespace": "x", "cron_restart": "0 3 * * *",
                "instaces": 4, "shutdown_with_message": true, "stop_exit_codes": [0, 3]
            }, {"name": "worker", "script": "jobs.py", "cwd": "jobs"}]}"#,
        );
        let (api, warning) = select(&p, Some("api"), Some("production")).unwrap();
        let cmd: Vec<_> = api.command.clone().unwrap();
        assert_eq!(cmd, ["server.js", "--fast", "-v"]);
        assert_eq!(api.instances, Some(Instances::AllBut(1)));
        assert_eq!(api.max_memory.unwrap().0, 300 << 20);
        assert_eq!(api.kill_timeout.unwrap().0.as_millis(), 3000);
        assert_eq!(api.ready_timeout.unwrap().0.as_millis(), 8000);
        assert_eq!(api.wait_ready, Some(true));
        assert_eq!(api.listen.unwrap().0.port(), 3000);
        let env: Vec<_> = api
            .env
            .iter()
            .map(|EnvPair(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(env, ["DEBUG=true", "NODE_ENV=production"]);
        assert_eq!(api.watch, Some(vec![PathBuf::from("src")]));
        assert_eq!(api.increment_var.as_deref(), Some("SHARD"));
        assert_eq!(api.instance_var.as_deref(), Some("INSTANCE_ID"));
        assert_eq!(api.cron_restart.unwrap().0.pattern.to_string(), "0 3 * * *");
        assert_eq!(api.autorestart, Some(false));
        assert_eq!(api.stop_exit_codes, Some(vec![0, 3]));
        assert_eq!(api.kill_signal, Some(KillSignal(None)));
        let warning = warning.unwrap();
        assert!(
            // PM2's own key as it is; a misspelt one with the key meant.
            warning.ends_with(
                "ignores these keys: api.instaces (did you mean instances?), api.namespace"
            ) && !warning.contains("autorestart")
                && !warning.contains("exec_mode"),
            "{warning}"
        );
        let (worker, _) = select(&p, Some("worker"), None).unwrap();
        assert_eq!(worker.instances, Some(Instances::Count(1)));
        assert!(worker.cwd.unwrap().ends_with("jobs"));
        let e = select(&p, Some("api"), Some("staging"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("env_staging"), "{e}");
    }

    #[test]
    fn pm2s_port_and_cmd_keys_are_read_as_pm2_reads_them() {
        let p = temp(
            "aliases.json",
            r#"{"apps": [
                {"name": "api", "cmd": "a.js", "port": 4000, "env": {"PORT": 3000}},
                {"name": "both", "script": "s.js", "command": "c.js"},
                {"name": "blank", "script": "b.js", "interpreter": "", "instances": 2}
            ]}"#,
        );
        let (api, warning) = select(&p, Some("api"), None).unwrap();
        assert_eq!(api.command.unwrap(), ["a.js"]);
        // `port` sets env.PORT, over what `env` says.
        assert_eq!(api.listen.unwrap().0.port(), 4000);
        assert!(warning.is_none(), "{warning:?}");
        let (both, _) = select(&p, Some("both"), None).unwrap();
        assert_eq!(both.command.unwrap(), ["s.js"]);
        // An empty interpreter is none (a falsy value to PM2).
        let (blank, _) = select(&p, Some("blank"), None).unwrap();
        assert_eq!(blank.command.unwrap(), ["b.js"]);
        assert_eq!(blank.mode, None, "a Node app with instances: a cluster");
    }

    #[test]
    fn apps_run_in_fork_mode_as_pm2_runs_them_unless_herd_knows_their_port() {
        let p = temp(
            "modes.json",
            r#"{"apps": [
                {"name": "api", "script": "a.js", "env": {"PORT": 3000}},
                {"name": "jobs", "script": "jobs.js"},
                {"name": "workers", "script": "w.js", "instances": 2},
                {"name": "py", "script": "w.py", "instances": 2},
                {"name": "bin", "script": "w", "interpreter": "none", "instances": 2},
                {"name": "own", "script": "o.js", "instances": 4, "exec_mode": "cluster",
                 "increment_var": "PORT", "env": {"PORT": 3000}},
                {"name": "legacy", "script": "l.js", "exec_mode": "fork", "env": {"PORT": 4000}},
                {"name": "lb", "script": "b.js", "exec_mode": "cluster_mode"}
            ]}"#,
        );
        let mode = |app| select(&p, Some(app), None).unwrap().0.mode;
        assert_eq!(mode("api"), None, "a known port: herd's default, a cluster");
        assert_eq!(
            mode("jobs"),
            Some(Mode::Fork),
            "no port, no instances: PM2's default, fork"
        );
        assert_eq!(
            mode("workers"),
            None,
            "a Node app with instances: PM2's default, cluster"
        );
        assert_eq!(mode("py"), Some(Mode::Fork), "not Node: fork, as in PM2");
        assert_eq!(mode("bin"), Some(Mode::Fork), "interpreter none: fork");
        let (own, _) = select(&p, Some("own"), None).unwrap();
        assert_eq!(own.mode, Some(Mode::Fork), "a port per instance: fork");
        assert!(own.listen.is_none(), "each instance binds its own PORT");
        assert_eq!(mode("lb"), None, "exec_mode cluster is herd's default");
        let (legacy, _) = select(&p, Some("legacy"), None).unwrap();
        assert_eq!(legacy.mode, Some(Mode::Fork));
        assert!(legacy.listen.is_none(), "the program binds PORT itself");
        assert!(
            legacy
                .env
                .iter()
                .any(|EnvPair(k, v)| k == "PORT" && v == "4000")
        );
        let p = temp(
            "bad.json",
            r#"{"apps": [{"name": "bad", "script": "c.js", "exec_mode": "threads"}]}"#,
        );
        let e = select(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("exec_mode"), "{e}");
    }

    #[test]
    fn yaml_app_declarations_read_as_pm2_runtime_reads_them() {
        let p = temp(
            "process.yml",
            "apps:\n  - name: no\n    script: server.js\n    args: [\"--fast\", 1]\n    instances: max\n    exec_mode: cluster\n    env:\n      PORT: 3100\n      ON: yes\n",
        );
        let (app, warning) = select(&p, None, None).unwrap();
        assert_eq!(warning, None);
        assert_eq!(app.name.as_deref(), Some("no"));
        assert_eq!(app.command.unwrap(), ["server.js", "--fast", "1"]);
        assert_eq!(app.instances, Some(Instances::Max));
        assert_eq!(app.listen.unwrap().0.port(), 3100);
        let env: Vec<_> = app
            .env
            .iter()
            .map(|EnvPair(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(env, ["ON=yes"]);
        let bad = temp("bad.yaml", "apps:\n - name: a\n  script: b\n");
        let e = select(&bad, None, None).unwrap_err().to_string();
        assert!(e.contains("line 3") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn config_names_are_told_from_scripts() {
        assert!(is_config_name("ecosystem.config.js"));
        assert!(is_config_name("herd.toml") && is_config_name("process.json"));
        assert!(is_config_name("process.yml") && is_config_name("ecosystem.yaml"));
        assert!(!is_config_name("app.js") && !is_config_name("server.py"));
    }
}
