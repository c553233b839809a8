//! Command-line surface. Values are parsed into the same types the config
//! file uses, so a bad value reads the same whichever way it was given.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Options, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "herd",
    version,
    about = "Run any server program as a supervised cluster of workers on one port."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run COMMAND as a cluster of workers on one port, in the foreground.
    Run(Box<RunArgs>),
    /// Like `run`, in the background, logging to a file; returns once ready.
    /// `herd start NAME`: a stopped cluster again, as it ran.
    Start(Box<RunArgs>),
    /// Show a cluster's log (herd's own lines and worker output).
    Logs {
        #[command(flatten)]
        target: Named,
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to show first.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        /// Show when each worker line was written (PM2's --time).
        #[arg(long, visible_alias = "time")]
        timestamps: bool,
        /// As --timestamps, that time in a moment.js FORMAT, local (PM2's
        /// --timestamp; its default YYYY-MM-DD-HH:mm:ss).
        #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true, default_missing_value = "YYYY-MM-DD-HH:mm:ss")]
        timestamp: Option<String>,
        /// Only the workers' stderr lines.
        #[arg(long, conflicts_with = "out")]
        err: bool,
        /// Only the workers' stdout lines.
        #[arg(long)]
        out: bool,
        /// Each line as a JSON object (message, timestamp, type, process_id,
        /// app_name), as `pm2 logs --json`.
        #[arg(long)]
        json: bool,
        /// Each line as `timestamp=… app=… id=… type=… message=…`, as
        /// `pm2 logs --format`.
        #[arg(long, conflicts_with = "json")]
        format: bool,
        /// PM2's --nostream (print and exit, which herd logs does without -f) and
        /// --raw (herd's worker lines carry no prefix to strip): accepted, change nothing.
        #[arg(long, hide = true)]
        nostream: bool,
        #[arg(long, hide = true)]
        raw: bool,
    },
    /// Show the workers of a running cluster (like `pm2 list`); `all`: every one.
    #[command(visible_aliases = ["describe", "show", "info"])]
    Status {
        #[command(flatten)]
        target: Named,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Every host's workers too (clusters started with --redis).
        #[arg(long)]
        all_hosts: bool,
    },
    /// Zero-downtime rolling reload: replace workers one at a time; `all`: every cluster;
    /// a config file: each of its apps, starting those not running (`pm2 startOrReload`).
    Reload {
        #[command(flatten)]
        target: Named,
        /// The new workers run what the config file says now (command, cwd, env),
        /// in this shell's environment, as PM2's --update-env.
        #[arg(long)]
        update_env: bool,
        /// With a config file: its env_NAME for the apps it starts (as `herd start FILE --env NAME`).
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
        #[command(flatten)]
        only: Only,
    },
    /// Stop and start every worker at once (not zero-downtime); `all`: every cluster;
    /// a config file: each of its apps, starting those not running (`pm2 startOrRestart`).
    Restart {
        #[command(flatten)]
        target: Named,
        /// The new workers run what the config file says now (command, cwd, env),
        /// in this shell's environment, as PM2's --update-env.
        #[arg(long)]
        update_env: bool,
        /// With a config file: its env_NAME for the apps it starts (as `herd start FILE --env NAME`).
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
        #[command(flatten)]
        only: Only,
    },
    /// Set the number of workers: N, +K or -K.
    ///
    /// `herd scale api 4` names the cluster as PM2's `pm2 scale api 4` does.
    Scale {
        #[command(flatten)]
        target: Target,
        /// [NAME] N: the cluster (default: the only one running), then the count.
        #[arg(value_name = "N|+K|-K", allow_hyphen_values = true, num_args = 1..=2, required = true)]
        words: Vec<String>,
    },
    /// Re-execute the herd binary on disk in place (same pid and sockets; new workers),
    /// as nginx's binary upgrade; `all`: every cluster.
    Upgrade {
        #[command(flatten)]
        target: Named,
    },
    /// Stop a running cluster gracefully; `all`: every cluster; a config file: each of
    /// its apps. It stays listed as stopped, and `herd start NAME` starts it again (`pm2 stop`).
    Stop {
        #[command(flatten)]
        target: Named,
        #[command(flatten)]
        only: Only,
    },
    /// Stop a cluster and forget it (`herd start NAME` no longer knows it),
    /// like `pm2 delete`; `all`: every cluster; a config file: each of its apps.
    #[command(visible_alias = "del")]
    Delete {
        #[command(flatten)]
        target: Named,
        #[command(flatten)]
        only: Only,
    },
    /// Send MESSAGE (JSON, or else a string) to worker ID's message channel;
    /// HOST/ID: a worker of the same cluster on another host (--redis).
    Send {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "[HOST/]ID")]
        id: String,
        message: String,
    },
    /// Send MESSAGE (JSON, or else a string) to every worker's message channel.
    Broadcast {
        #[command(flatten)]
        target: Target,
        message: String,
    },
    /// Start a new version beside the running one: a canary that gets PERCENT of the
    /// requests, or a blue-green set that takes all of them once ready.
    Deploy(Box<DeployArgs>),
    /// The deploy's version replaces the running one (a rolling reload).
    Promote {
        #[command(flatten)]
        target: Named,
    },
    /// Stop the deploy's workers; all traffic returns to the running version.
    Rollback {
        #[command(flatten)]
        target: Named,
    },
    /// Send SIGNAL to worker ID's main process, or to every worker's (like `pm2 sendSignal`).
    Signal {
        #[command(flatten)]
        target: Target,
        /// SIGUSR2, USR2 or 12.
        signal: String,
        /// A worker id, or `all`; without --name, a cluster's name (all its workers).
        #[arg(value_name = "ID|all|NAME", default_value = "all")]
        id: String,
    },
    /// A terminal dashboard of a running cluster, like `pm2 monit`.
    Monit {
        #[command(flatten)]
        target: Named,
    },
    /// Record the running clusters (command, options, directory, environment), like `pm2 save`.
    Save {
        /// Save even when none runs (an empty list: `herd resurrect` then starts nothing).
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Start the clusters `herd save` recorded that are not running, like `pm2 resurrect`.
    Resurrect,
    /// Print a systemd unit that runs `herd resurrect` at boot, like `pm2 startup`.
    Startup {
        /// PM2's platform word (`pm2 startup systemd`): systemd, or a distribution that
        /// runs it (ubuntu, debian, centos, redhat, fedora, arch, amazon, oracle).
        #[arg(value_name = "PLATFORM")]
        platform: Option<String>,
        /// Write it (herd-USER.service) and enable it, instead of printing it.
        #[arg(long)]
        install: bool,
        /// Where --install writes the unit.
        #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
    },
    /// Print a systemd .service and .socket pair that runs a cluster with socket
    /// activation (the port stays open while the master restarts).
    Systemd(Box<SystemdArgs>),
    /// Empty a cluster's log file (and drop its rotated ones), like `pm2 flush`; `all`: every one.
    Flush {
        #[command(flatten)]
        target: Named,
    },
    /// Set the workers' restart counts back to 0, as `pm2 reset` does; `all`: every
    /// cluster's (the metrics' counters keep counting).
    Reset {
        #[command(flatten)]
        target: Named,
    },
    /// Print a worker's environment, one NAME=value per line, as `pm2 env ID` does
    /// (what it was started with: PORT, HERD_WORKER_ID, --env's…).
    Env {
        #[command(flatten)]
        target: Target,
        /// The worker's id.
        #[arg(value_name = "ID", default_value_t = 0, value_parser = worker_id)]
        id: usize,
    },
    /// Print the pids of a cluster's workers, one per line, as `pm2 pid` does
    /// (`kill -USR2 $(herd pid api)`); no name or `all`: every running cluster's.
    Pid {
        #[command(flatten)]
        target: Named,
    },
    /// List the herd clusters of this user: the running ones, then the stopped ones.
    #[command(visible_alias = "ls", aliases = ["l", "ps"])]
    List {
        /// Print JSON (every cluster's status) instead of a table.
        #[arg(long)]
        json: bool,
        /// PM2's `jlist` shape: one object per worker, with `pm2_env` and `monit`,
        /// for scripts written against `pm2 jlist` (`herd jlist` prints it).
        #[arg(long, hide = true)]
        pm2: bool,
    },
    /// Internal: the helper that kills worker process groups if the master dies.
    #[command(name = "__guard", hide = true)]
    Guard,
    /// Serve a directory's files over HTTP as a cluster, like `pm2 serve`:
    /// `herd serve [DIR] [PORT] [--spa]`, named static-page-server-PORT.
    /// Other options are herd start's (-i, --name, --watch …).
    #[command(after_help = SERVE_HELP)]
    Serve {
        /// The directory [default: the current one].
        dir: Option<PathBuf>,
        /// The port [default: 8080].
        port: Option<u16>,
        /// The port, as PM2's --port.
        #[arg(long = "port", value_name = "PORT", conflicts_with = "port")]
        port_option: Option<u16>,
        /// Answer a path that names no file with the homepage (client-side routing).
        #[arg(long)]
        spa: bool,
        /// The homepage, relative to DIR.
        #[arg(long, value_name = "FILE", default_value = "/index.html")]
        homepage: String,
        /// Ask for this user name (HTTP basic authentication), with --basic-auth-password.
        #[arg(long, value_name = "USER", requires = "basic_auth_password")]
        basic_auth_username: Option<String>,
        #[arg(long, value_name = "PASSWORD", requires = "basic_auth_username")]
        basic_auth_password: Option<String>,
        /// herd start's options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        rest: Vec<OsString>,
    },
    /// Internal: the static file server a `herd serve` cluster runs as its workers.
    #[command(name = "static-files", hide = true)]
    StaticFiles,
}

const SERVE_HELP: &str = "Also as a PM2 ecosystem app: script: 'serve' with env PM2_SERVE_PATH, PM2_SERVE_PORT, PM2_SERVE_SPA, PM2_SERVE_HOMEPAGE.";

/// `herd deploy`: what the new version runs (unset parts as the running
/// version has them), how traffic reaches it, and when to promote or roll
/// it back by itself.
#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub target: Named,
    /// Send PERCENT of the requests (connections in dispatch mode) to the new version.
    #[arg(
        long,
        value_name = "PERCENT",
        required_unless_present = "blue_green",
        conflicts_with = "blue_green"
    )]
    pub canary: Option<u8>,
    /// Start a full set of new workers; switch all traffic to them once all are ready.
    #[arg(long)]
    pub blue_green: bool,
    /// What keeps a user on one version: ip, header:NAME or cookie:NAME [default: none, per request].
    #[arg(long, value_name = "ip|header:NAME|cookie:NAME")]
    pub by: Option<String>,
    /// Working directory of the new version.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Environment added for the new version, KEY=VAL (repeatable).
    #[arg(long = "env", value_name = "KEY=VAL")]
    pub env: Vec<String>,
    /// New workers to start [default: canary: PERCENT of the workers, at least 1; blue-green: as many as run].
    #[arg(short = 'i', long = "instances", value_name = "N")]
    pub workers: Option<usize>,
    /// Roll back when the new version's 5xx rate over the window is above PERCENT and the running one's.
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    pub max_error_rate: Option<f64>,
    /// Roll back when the new version's p99 over the window is above DUR and the running one's.
    #[arg(long, value_name = "DUR")]
    pub max_p99: Option<crate::config::Dur>,
    /// Promote once the new version has been healthy this long.
    #[arg(long, value_name = "DUR")]
    pub promote_after: Option<crate::config::Dur>,
    /// The analysis window [default: 30s].
    #[arg(long, value_name = "DUR")]
    pub window: Option<crate::config::Dur>,
    /// The new version's command [default: the running one's].
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `herd systemd NAME [RUN OPTIONS] -- COMMAND`.
#[derive(Debug, Args)]
pub struct SystemdArgs {
    /// The units' name (NAME.service, NAME.socket) and the cluster's.
    #[arg(value_name = "NAME")]
    pub unit: String,
    /// Write NAME.service and NAME.socket into DIR (e.g. /etc/systemd/system) instead of printing them.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// systemd's watchdog: restart the service when the master's supervisor stops answering this long; 0 turns it off.
    #[arg(long, value_name = "DUR", default_value = "30s")]
    pub watchdog_sec: crate::config::Dur,
    /// The cluster: every option of `herd run`, then `--` and the command.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Which running cluster a command is for.
#[derive(Debug, Args, Default)]
pub struct Target {
    /// The cluster's name [default: the only one running].
    #[arg(long)]
    pub name: Option<String>,
}

/// Parses the command line. `herd start app.js -i max --name api`, as PM2
/// users type it: when the command is a script (`app.js`, `app.py`…) and
/// no `--` was given, the words after the script are herd's options, and
/// the script is the whole command.
///
/// Also as PM2 users type them: `herd start ecosystem.config.js` (a config
/// file where the command would be) and `--env production` (a bare name:
/// the ecosystem file's `env_production`).
///
/// Once per cluster it names: `herd stop api web` (as `pm2 stop api web`)
/// is `herd stop api`, then `herd stop web`.
pub fn parse_each() -> Result<Vec<Cli>, clap::Error> {
    split_names(std::env::args_os().collect())
        .into_iter()
        .map(parse_from)
        .collect()
}

/// The commands that act on clusters by name and take several (PM2's
/// variadic `stop|restart|reload|delete <name...>`).
const BY_NAMES: &[&str] = &[
    "stop", "restart", "reload", "delete", "del", "flush", "upgrade",
];

/// One command line per cluster named, when several are.
fn split_names(argv: Vec<OsString>) -> Vec<Vec<OsString>> {
    if !argv
        .get(1)
        .and_then(|c| c.to_str())
        .is_some_and(|c| BY_NAMES.contains(&c))
    {
        return vec![argv];
    }
    let takes = ["--name", "--env", "--only", "--app"];
    let names: Vec<usize> = (2..argv.len())
        .filter(|&i| {
            let w = argv[i].to_str().unwrap_or("");
            !w.starts_with('-') && !argv[i - 1].to_str().is_some_and(|p| takes.contains(&p))
        })
        .collect();
    if names.len() < 2 {
        return vec![argv];
    }
    names
        .iter()
        .map(|&keep| {
            argv.iter()
                .enumerate()
                .filter(|&(i, _)| i == keep || !names.contains(&i))
                .map(|(_, w)| w.clone())
                .collect()
        })
        .collect()
}

fn parse_from(mut argv: Vec<OsString>) -> Result<Cli, clap::Error> {
    // `pm2 jlist` and `pm2 prettylist` (the same, indented): every worker
    // as JSON in PM2's shape.
    if argv.get(1).is_some_and(|c| c == "jlist") {
        argv.splice(1..2, ["list".into(), "--pm2".into()]);
    } else if argv.get(1).is_some_and(|c| c == "prettylist") {
        argv.splice(1..2, ["list".into(), "--pm2".into(), "--json".into()]);
    }
    // `pm2 startOrReload ecosystem.config.js` (deploy scripts' line): a
    // reload by file starts the apps that are not running.
    if let Some(c) = argv.get_mut(1) {
        if c == "startOrReload" || c == "startOrGracefulReload" {
            *c = "reload".into();
        } else if c == "startOrRestart" {
            *c = "restart".into();
        }
    }
    let argv = serve_words(argv)?;
    let argv = pm2_words(argv);
    let (mut cli, argv) = parse_script_first(argv)?;
    if let Command::Run(a) | Command::Start(a) = &mut cli.command {
        a.argv = argv;
    }
    Ok(cli)
}

/// `herd serve [DIR] [PORT] [--spa] [herd start's options]` (PM2's `pm2
/// serve`) as the `herd start` it stands for: a cluster named
/// static-page-server-PORT on PORT whose workers are herd's static file
/// server, told what to serve by PM2's own variables.
fn serve_words(argv: Vec<OsString>) -> Result<Vec<OsString>, clap::Error> {
    if argv.get(1).is_none_or(|c| c != "serve") || argv.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(argv);
    }
    // herd serve's own words, then the rest as herd start's options.
    let mut own = vec![argv[0].clone(), argv[1].clone()];
    let mut rest: Vec<OsString> = Vec::new();
    let serve_flags = [
        "--spa",
        "--port",
        "--homepage",
        "--basic-auth-username",
        "--basic-auth-password",
    ];
    let mut positional = 0;
    let mut i = 2;
    while i < argv.len() {
        let w = argv[i].to_str().unwrap_or("");
        let flag = w.split('=').next().unwrap_or(w);
        if serve_flags.contains(&flag) {
            own.push(argv[i].clone());
            if flag != "--spa"
                && !w.contains('=')
                && let Some(v) = argv.get(i + 1)
            {
                own.push(v.clone());
                i += 1;
            }
        } else if !w.starts_with('-') && positional < 2 {
            own.push(argv[i].clone());
            positional += 1;
        } else {
            rest.push(argv[i].clone());
            if takes_value(w)
                && !w.contains('=')
                && let Some(v) = argv.get(i + 1)
            {
                rest.push(v.clone());
                i += 1;
            }
        }
        i += 1;
    }
    let Command::Serve {
        mut dir,
        mut port,
        port_option,
        spa,
        homepage,
        basic_auth_username,
        basic_auth_password,
        ..
    } = Cli::try_parse_from(&own)?.command
    else {
        return Ok(argv);
    };
    // `herd serve 8080`: a lone number that is no directory is the port.
    if port.is_none()
        && port_option.is_none()
        && let Some(n) = dir.as_ref().and_then(|d| d.to_str()?.parse::<u16>().ok())
        && dir.as_ref().is_some_and(|d| !d.is_dir())
    {
        port = Some(n);
        dir = None;
    }
    let port = port_option.or(port);
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    if !dir.is_dir() {
        return Err(clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("{}: no such directory to serve\n", dir.display()),
        ));
    }
    if crate::builtin::files::relative(homepage.trim_start_matches('.')).is_err() {
        return Err(clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("--homepage {homepage}: not a file in {}\n", dir.display()),
        ));
    }
    let port = port.unwrap_or(8080);
    let exe = crate::os::sys::exe_path().unwrap_or_else(|| PathBuf::from("herd"));
    let mut out: Vec<OsString> = vec![argv[0].clone(), "start".into()];
    let given = |f: &str| {
        rest.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == f || a.starts_with(&format!("{f}=")))
        })
    };
    if !given("--name") && !given("-n") {
        out.extend(["--name".into(), format!("static-page-server-{port}").into()]);
    }
    if !given("--listen") && !given("-l") {
        out.extend(["--listen".into(), port.to_string().into()]);
    }
    if !given("--instances") && !given("-i") {
        // `pm2 serve` runs one process.
        out.extend(["-i".into(), "1".into()]);
    }
    let mut env = vec![
        format!("PM2_SERVE_PATH={}", dir.display()),
        format!("PM2_SERVE_PORT={port}"),
        format!("PM2_SERVE_HOMEPAGE={homepage}"),
    ];
    if spa {
        env.push("PM2_SERVE_SPA=true".into());
    }
    if let (Some(u), Some(p)) = (basic_auth_username, basic_auth_password) {
        env.push("PM2_SERVE_BASIC_AUTH=true".into());
        env.push(format!("PM2_SERVE_BASIC_AUTH_USERNAME={u}"));
        env.push(format!("PM2_SERVE_BASIC_AUTH_PASSWORD={p}"));
    }
    for e in env {
        out.extend(["--env".into(), e.into()]);
    }
    out.extend(rest);
    out.extend(["--".into(), exe.into(), "static-files".into()]);
    Ok(out)
}

/// Rewrites `--env NAME` to `--env-profile NAME`, PM2's flags herd spells
/// otherwise, and a lone config file in the command's place to `--config
/// FILE`, for `run` and `start`.
fn pm2_words(argv: Vec<OsString>) -> Vec<OsString> {
    let at = 1;
    if !argv.get(at).is_some_and(|a| a == "run" || a == "start") {
        return argv;
    }
    let end = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    let mut out: Vec<OsString> = argv[..=at].to_vec();
    let mut i = at + 1;
    while i < end {
        let w = argv[i].to_str().unwrap_or("");
        let bare = |v: &str| !v.is_empty() && !v.contains('=') && !v.starts_with('-');
        if w == "--env" && argv.get(i + 1).and_then(|v| v.to_str()).is_some_and(bare) {
            out.extend(["--env-profile".into(), argv[i + 1].clone()]);
            i += 2;
            continue;
        }
        if let Some(v) = w.strip_prefix("--env=").filter(|v| bare(v)) {
            out.extend(["--env-profile".into(), v.into()]);
            i += 1;
            continue;
        }
        // PM2's spellings of `--autorestart=false` and `--kill-signal none`.
        if w == "--no-autorestart" {
            out.push("--autorestart=false".into());
            i += 1;
            continue;
        }
        if w == "--shutdown-with-message" {
            out.push("--kill-signal=none".into());
            i += 1;
            continue;
        }
        // `pm2 start app.js --no-daemon` (a Dockerfile's CMD) keeps PM2 and
        // the app in the foreground: that is `herd run`.
        if w == "--no-daemon" {
            out[at] = "run".into();
            i += 1;
            continue;
        }
        out.push(argv[i].clone());
        i += 1;
    }
    out.extend(argv[end..].iter().cloned());
    // A config file where the command goes: the first word that is neither
    // a flag nor a flag's value names a config (`*.toml`, `*.json`,
    // `*.config.js`).
    if end == argv.len() {
        let first = (at + 1..out.len()).find(|&i| {
            let w = out[i].to_str().unwrap_or("");
            !w.starts_with('-') && !out[i - 1].to_str().is_some_and(takes_value)
        });
        if let Some(i) = first
            && out[i]
                .to_str()
                .is_some_and(crate::config::apps::is_config_name)
        {
            out.insert(i, "--config".into());
        }
    }
    out
}

/// Whether `word` is a flag of `herd run` that takes the next word as its value.
fn takes_value(word: &str) -> bool {
    use clap::CommandFactory;
    let cli = Cli::command();
    let Some(run) = cli.find_subcommand("run") else {
        return false;
    };
    run.get_arguments()
        .any(|a| named(a, word) && a.get_action().takes_values() && !a.is_require_equals_set())
}

/// Whether `flag` (`--long`, `-s`) names `arg`, by its name or an alias.
fn named(arg: &clap::Arg, flag: &str) -> bool {
    if let Some(long) = flag.strip_prefix("--") {
        arg.get_long() == Some(long) || arg.get_all_aliases().is_some_and(|all| all.contains(&long))
    } else {
        let mut chars = flag.chars();
        chars.next() == Some('-')
            && matches!((chars.next(), chars.next()), (Some(c), None) if arg.get_short() == Some(c))
    }
}

/// The command line as parsed, and the words that gave it (the master that
/// `herd start` spawns parses those again).
fn parse_script_first(argv: Vec<OsString>) -> Result<(Cli, Vec<OsString>), clap::Error> {
    let cli = Cli::try_parse_from(&argv)?;
    let words = match &cli.command {
        Command::Run(a) | Command::Start(a) => a.opts.command.clone().unwrap_or_default(),
        _ => return Ok((cli, argv)),
    };
    let script_first = words
        .first()
        .and_then(|w| w.to_str())
        .is_some_and(crate::config::is_script_name);
    // PM2 reads any program this way (`pm2 start npm --name api -- start`),
    // but only with `start`; a program's own flags (`node --inspect app.js`)
    // are then left to it.
    let program_first = matches!(cli.command, Command::Start(_))
        && words
            .first()
            .is_some_and(|w| !w.to_string_lossy().starts_with('-'));
    if !(script_first || program_first) || words.len() < 2 || words.len() > argv.len() {
        return Ok((cli, argv));
    }
    // A `--` after the script (PM2's `pm2 start app.js -i 2 -- --port 9000`)
    // is among the command's words; one before it (`herd run -- app.js …`)
    // already made every word the app's.
    let dash = words.iter().position(|w| w == "--");
    if dash.is_none() && argv.iter().any(|a| a == "--") {
        return Ok((cli, argv));
    }
    // The command is the tail of argv: herd's options are the words after
    // the script (up to a `--`), the app's arguments those after the `--`.
    let at = argv.len() - words.len();
    let mut again = argv[..at].to_vec();
    let end = dash.unwrap_or(words.len());
    again.extend(words[1..end].iter().cloned());
    again.push("--".into());
    let command = again.len();
    again.push(words[0].clone());
    if let Some(d) = dash {
        again.extend(words[d + 1..].iter().cloned());
    }
    let expected = again[command..].to_vec();
    match Cli::try_parse_from(&again) {
        // Every word between the program and the `--` was herd's: a stray
        // one (`herd start node app.js --port 1`) would have become the command.
        Ok(c) if command_of(&c) == Some(&expected) => Ok((c, again)),
        Ok(_) => Ok((cli, argv)),
        Err(e) if script_first => Err(e),
        Err(_) => Ok((cli, argv)),
    }
}

fn command_of(cli: &Cli) -> Option<&Vec<OsString>> {
    match &cli.command {
        Command::Run(a) | Command::Start(a) => a.opts.command.as_ref(),
        _ => None,
    }
}

/// `--only`: with a config file, only some of its apps (PM2's `--only`).
#[derive(Debug, Args, Default)]
pub struct Only {
    /// With a config file: only these of its apps, comma-separated (PM2's --only).
    #[arg(long = "only", value_name = "NAME[,NAME]", alias = "app")]
    pub apps: Option<String>,
}

/// A cluster named by `--name` or, as PM2 users type it, by a word:
/// `herd stop api`, `herd reload all`.
#[derive(Debug, Args, Default)]
pub struct Named {
    /// The cluster's name [default: the only one running].
    #[arg(long)]
    pub name: Option<String>,
    /// The cluster's name, or `all`.
    #[arg(value_name = "NAME", conflicts_with = "name")]
    pub cluster: Option<String>,
}

impl Named {
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref().or(self.cluster.as_deref())
    }

    /// `all`: every running cluster.
    pub fn is_all(&self) -> bool {
        self.name() == Some("all")
    }
}

/// `herd run` and `herd start`: the settings, plus what only a flag can say.
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// Config file: a herd.toml (default: ./herd.toml when present), or PM2's
    /// ecosystem.config.js / .json / .yml; `herd start FILE` says the same.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The app to run when the config file holds several ([[app]] or apps[]);
    /// PM2's --only says the same.
    #[arg(long, value_name = "NAME", alias = "only")]
    pub app: Option<String>,
    /// `--env NAME`: the ecosystem file's env_NAME, over its env (as PM2's).
    #[arg(long, value_name = "NAME", hide = true)]
    pub env_profile: Option<String>,
    /// The command line as parsed (after the PM2-style rewrites).
    #[arg(skip)]
    pub argv: Vec<OsString>,
    /// Check the options and the config file, print what would run, and exit
    /// (like `nginx -t`).
    #[arg(long)]
    pub check: bool,
    /// Do not preload herd's Node module into a `node` command (nor its
    /// Python and Perl preloads into their programs).
    #[arg(long, conflicts_with = "node_shim")]
    pub no_node_shim: bool,
    /// PM2's --interpreter: the program that runs the script (`bun`,
    /// `python3.12`; `none`: the script runs itself).
    #[arg(long, value_name = "PROGRAM", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub interpreter: Option<String>,
    /// PM2's --node-args (or --interpreter-args): options for the
    /// interpreter, before the script (`--node-args="--max-old-space-size=4096"`).
    #[arg(
        long,
        value_name = "ARGS",
        alias = "interpreter-args",
        allow_hyphen_values = true
    )]
    pub node_args: Option<String>,
    /// PM2's --update-env: `herd start NAME --update-env` starts a stopped
    /// cluster in this shell's environment; a new cluster takes it anyway.
    #[arg(long, hide = true)]
    pub update_env: bool,
    /// PM2's --merge-logs: herd's log file merges the workers' output already.
    #[arg(long, hide = true)]
    pub merge_logs: bool,
    /// Every setting, each also a `herd.toml` key of the same name; flags win.
    #[command(flatten)]
    pub opts: Options,
}

/// A worker's id; a cluster's name there (`herd env api`) is told where
/// it goes.
fn worker_id(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| {
        format!("not a worker id (0, 1, …); a cluster is named with --name: herd env 0 --name {s}")
    })
}

/// A percent from 0 to 100 (JSON has no NaN or infinity to carry).
fn percent(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
        .ok_or_else(|| "a percent from 0 to 100".to_string())
}

impl RunArgs {
    pub fn resolve(mut self) -> Result<Settings, crate::config::ConfigError> {
        if let Some(flag) = self.flag_after_command() {
            return Err(crate::config::ConfigError::FlagAfterCommand(flag));
        }
        if let Some(command) = self
            .opts
            .command
            .take_if(|_| self.interpreter.is_some() || self.node_args.is_some())
        {
            let args = self.node_args.as_deref().unwrap_or_default();
            self.opts.command = Some(interpreted(command, self.interpreter.as_deref(), args));
        }
        let from = crate::config::ConfigSource {
            config: self.config.clone(),
            app: self.app.clone(),
            profile: self.env_profile.clone(),
        };
        // A master started to take over a running cluster (`herd upgrade`,
        // `herd start NAME`, `herd resurrect`) runs it as it ran.
        let relaunch = crate::config::relaunch::Relaunch::from_env();
        let mut opts = self.opts.clone();
        relaunch.over(&mut opts);
        let mut s = Settings::resolve(opts, &from, self.no_node_shim)?;
        s.flags = self.opts;
        s.relaunch = relaunch;
        Ok(s)
    }

    /// A flag of herd's among the command's words when no `--` separated
    /// them (`herd start app.js --listen 9000`): it would go to the app
    /// unseen, so it is an error instead.
    fn flag_after_command(&self) -> Option<String> {
        use clap::CommandFactory;
        if std::env::args_os().any(|a| a == "--") {
            return None;
        }
        let cli = Cli::command();
        let run = cli.find_subcommand("run")?;
        let ours = |w: &str| {
            let (flag, _) = w.split_once('=').unwrap_or((w, ""));
            run.get_arguments().any(|a| named(a, flag))
        };
        let words = self.opts.command.as_deref().unwrap_or_default();
        words
            .iter()
            .skip(1)
            .filter_map(|w| w.to_str())
            .find(|w| ours(w))
            .map(str::to_string)
    }
}

/// The command with PM2's `--interpreter` and `--node-args` applied: the
/// interpreter (given, else the script's by its extension) and its options
/// go before the script; before a program that is not a script, only the
/// options go after it (`herd start node --node-args=--inspect app.js`
/// is `node --inspect app.js`).
fn interpreted(mut command: Vec<OsString>, interpreter: Option<&str>, args: &str) -> Vec<OsString> {
    let Some(first) = command.first() else {
        return command;
    };
    let args: Vec<OsString> = args.split_whitespace().map(OsString::from).collect();
    let script = crate::config::is_script_name(&first.to_string_lossy());
    let interpreter = match interpreter {
        Some("none") => None,
        // The program the user names, spaces and all.
        Some(i) => Some(
            std::iter::once(OsString::from(i))
                .chain(args.clone())
                .collect(),
        ),
        None if script => crate::config::interpreter_of(std::path::Path::new(first))
            .map(|i| crate::config::interpreter_words(i, args.clone())),
        None => None,
    };
    match interpreter {
        Some(mut out) => {
            out.extend(command);
            out
        }
        None => {
            let rest = command.split_off(1);
            command.extend(args);
            command.extend(rest);
            command
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{pm2_words, serve_words, split_names};

    #[test]
    fn several_names_are_one_command_each() {
        let split = |line: &str| -> Vec<String> {
            split_names(line.split_whitespace().map(Into::into).collect())
                .iter()
                .map(|a| {
                    a.iter()
                        .map(|w| w.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        };
        assert_eq!(
            split("herd stop api web"),
            ["herd stop api", "herd stop web"]
        );
        assert_eq!(
            split("herd reload --update-env api web"),
            [
                "herd reload --update-env api",
                "herd reload --update-env web"
            ]
        );
        assert_eq!(
            split("herd reload eco.json --only api --env prod"),
            ["herd reload eco.json --only api --env prod"]
        );
        assert_eq!(split("herd scale api 3"), ["herd scale api 3"]);
        assert_eq!(split("herd stop --name api"), ["herd stop --name api"]);
    }

    fn serve(line: &str) -> String {
        let argv = line.split_whitespace().map(Into::into).collect();
        match serve_words(argv) {
            Ok(out) => out
                .iter()
                .map(|w| w.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn serve_becomes_the_start_of_a_file_server_cluster() {
        // Run from the crate's directory: `src` is a directory, `9001` is not.
        let out = serve("herd serve src 9001 --spa -i 2 --watch");
        assert!(
            out.starts_with(
                "herd start --name static-page-server-9001 --listen 9001 --env PM2_SERVE_PATH=/"
            ) && out.contains("/src --env PM2_SERVE_PORT=9001")
                && out.contains("--env PM2_SERVE_SPA=true -i 2 --watch -- ")
                && out.ends_with(" static-files"),
            "{out}"
        );
        let out = serve("herd serve 9002 --name web");
        assert!(
            out.starts_with("herd start --listen 9002 -i 1 --env PM2_SERVE_PATH=")
                && out.contains(
                    "PM2_SERVE_PORT=9002 --env PM2_SERVE_HOMEPAGE=/index.html --name web --"
                ),
            "{out}"
        );
        let out = serve("herd serve --port 9003 --basic-auth-username u --basic-auth-password p");
        assert!(
            out.contains("--listen 9003")
                && out.contains("PM2_SERVE_BASIC_AUTH=true --env PM2_SERVE_BASIC_AUTH_USERNAME=u --env PM2_SERVE_BASIC_AUTH_PASSWORD=p"),
            "{out}"
        );
        assert!(serve("herd serve --basic-auth-username u").starts_with("error:"));
        assert!(serve("herd serve no-such-dir").contains("no such directory to serve"));
        assert!(serve("herd serve --homepage ../../etc/passwd").contains("not a file in"));
        assert_eq!(serve("herd serve --help"), "herd serve --help");
    }

    fn words(line: &str) -> Vec<String> {
        pm2_words(line.split_whitespace().map(Into::into).collect())
            .into_iter()
            .map(|w| w.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn pm2_style_words_become_herds_flags() {
        assert_eq!(
            words("herd start ecosystem.config.js --env production"),
            [
                "herd",
                "start",
                "--config",
                "ecosystem.config.js",
                "--env-profile",
                "production"
            ]
        );
        assert_eq!(
            words("herd start --env=staging -i 2 herd.toml"),
            [
                "herd",
                "start",
                "--env-profile",
                "staging",
                "-i",
                "2",
                "--config",
                "herd.toml"
            ]
        );
        // KEY=VAL stays an environment variable; a flag's value stays its value.
        assert_eq!(
            words("herd run --env A=1 --log-file x.json -- node a.js"),
            [
                "herd",
                "run",
                "--env",
                "A=1",
                "--log-file",
                "x.json",
                "--",
                "node",
                "a.js"
            ]
        );
        // After `--`, everything is the app's.
        assert_eq!(
            words("herd run -- node a.js --env production"),
            ["herd", "run", "--", "node", "a.js", "--env", "production"]
        );
        assert_eq!(words("herd status api"), ["herd", "status", "api"]);
        // PM2's foreground start is herd run; after `--` it is the app's.
        assert_eq!(
            words("herd start app.js -i 2 --no-daemon -- --no-daemon"),
            ["herd", "run", "app.js", "-i", "2", "--", "--no-daemon"]
        );
    }

    fn command_of(line: &str) -> (Option<String>, Vec<String>) {
        let argv: Vec<super::OsString> = line.split_whitespace().map(Into::into).collect();
        match super::parse_script_first(argv).unwrap().0.command {
            super::Command::Start(a) | super::Command::Run(a) => (
                a.opts.name.clone(),
                a.opts
                    .command
                    .unwrap_or_default()
                    .iter()
                    .map(|w| w.to_string_lossy().into_owned())
                    .collect(),
            ),
            _ => unreachable!(),
        }
    }

    #[test]
    fn after_a_script_herds_options_come_first_and_the_apps_after_dashes() {
        assert_eq!(
            command_of("herd start app.js --name api -i 2 -- --port 9000"),
            (
                Some("api".into()),
                vec!["app.js".into(), "--port".into(), "9000".into()]
            )
        );
        assert_eq!(
            command_of("herd start app.js --name api"),
            (Some("api".into()), vec!["app.js".to_string()])
        );
        // Dashes first: all of it is the app's.
        assert_eq!(
            command_of("herd run -- app.js --name x"),
            (None, vec!["app.js".into(), "--name".into(), "x".into()])
        );
        // A stray word after the script keeps it all the app's.
        assert_eq!(
            command_of("herd start app.js foo"),
            (None, vec!["app.js".into(), "foo".into()])
        );
    }

    #[test]
    fn pm2s_interpreter_and_its_options_go_before_the_script() {
        let w = |v: &[&str]| v.iter().map(super::OsString::from).collect::<Vec<_>>();
        let i = |c: &[&str], interp, args| super::interpreted(w(c), interp, args);
        assert_eq!(
            i(
                &["app.js", "--port", "1"],
                None,
                "--inspect --max-old-space-size=64"
            ),
            w(&[
                "node",
                "--inspect",
                "--max-old-space-size=64",
                "app.js",
                "--port",
                "1"
            ])
        );
        assert_eq!(i(&["server.ts"], Some("bun"), ""), w(&["bun", "server.ts"]));
        assert_eq!(
            i(&["app.py"], Some("python3.12"), "-u"),
            w(&["python3.12", "-u", "app.py"])
        );
        // A program: its options after it; `none`: no interpreter.
        assert_eq!(
            i(&["node", "app.js"], None, "--inspect"),
            w(&["node", "--inspect", "app.js"])
        );
        assert_eq!(i(&["./api"], Some("none"), ""), w(&["./api"]));
        // A runnable jar: the JVM's options before `-jar`.
        assert_eq!(
            i(&["app.jar", "--debug"], None, "-Xmx512m"),
            w(&["java", "-Xmx512m", "-jar", "app.jar", "--debug"])
        );
        assert_eq!(
            i(&["app.py"], Some("/opt/my python/bin/python3"), ""),
            w(&["/opt/my python/bin/python3", "app.py"])
        );
    }

    #[test]
    fn herd_start_reads_any_program_as_pm2_start_does() {
        let s = |v: &[&str]| v.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(
            command_of("herd start npm --name web -- run dev"),
            (Some("web".into()), s(&["npm", "run", "dev"]))
        );
        assert_eq!(
            command_of("herd start npm --name web"),
            (Some("web".into()), s(&["npm"]))
        );
        // The program's own flags, and its script, stay its own.
        assert_eq!(
            command_of("herd start node --inspect app.js"),
            (None, s(&["node", "--inspect", "app.js"]))
        );
        assert_eq!(
            command_of("herd start node app.js --port 1"),
            (None, s(&["node", "app.js", "--port", "1"]))
        );
        // `herd run` keeps its own syntax.
        assert_eq!(
            command_of("herd run npm --name web"),
            (None, s(&["npm", "--name", "web"]))
        );
    }
}
