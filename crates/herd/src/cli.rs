//! Command-line surface. Values are parsed into the same types the config
//! file uses, so a bad value reads the same whichever way it was given.

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
    },
    /// Show the workers of a running cluster (like `pm2 list`); `all`: every one.
    Status {
        #[command(flatten)]
        target: Named,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Zero-downtime rolling reload: replace workers one at a time; `all`: every cluster.
    Reload {
        #[command(flatten)]
        target: Named,
    },
    /// Stop and start every worker at once (not zero-downtime); `all`: every cluster.
    Restart {
        #[command(flatten)]
        target: Named,
    },
    /// Set the number of workers: N, +K or -K.
    Scale {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "N|+K|-K", allow_hyphen_values = true)]
        n: String,
    },
    /// Stop a running cluster gracefully; `all`: every cluster.
    Stop {
        #[command(flatten)]
        target: Named,
    },
    /// Send MESSAGE (JSON, or else a string) to worker ID's message channel.
    Send {
        #[command(flatten)]
        target: Target,
        id: usize,
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
        /// A worker id, or `all`.
        #[arg(value_name = "ID|all", default_value = "all")]
        id: String,
    },
    /// A terminal dashboard of a running cluster, like `pm2 monit`.
    Monit {
        #[command(flatten)]
        target: Named,
    },
    /// List the running herd clusters of this user.
    List {
        /// Print JSON (every cluster's status) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Internal: the helper that kills worker process groups if the master dies.
    #[command(name = "__guard", hide = true)]
    Guard,
}

/// `herd deploy`: what the new version runs (unset parts as the running
/// version has them), how traffic reaches it, and when to promote or roll
/// it back by itself.
#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub target: Target,
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
    #[arg(long, value_name = "PERCENT")]
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
pub fn parse() -> Result<Cli, clap::Error> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = Cli::try_parse_from(&argv)?;
    if argv.iter().any(|a| a == "--") {
        return Ok(cli);
    }
    let words = match &cli.command {
        Command::Run(a) | Command::Start(a) => a.opts.command.clone().unwrap_or_default(),
        _ => return Ok(cli),
    };
    let script_first = words
        .first()
        .and_then(|w| w.to_str())
        .is_some_and(crate::config::is_script_name);
    if !script_first || words.len() < 2 || words.len() > argv.len() {
        return Ok(cli);
    }
    // The command is the tail of argv: move the script behind a `--`.
    let at = argv.len() - words.len();
    let mut again = argv[..at].to_vec();
    again.extend(argv[at + 1..].iter().cloned());
    again.push("--".into());
    again.push(words[0].clone());
    Cli::try_parse_from(again)
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
    /// Config file (default: ./herd.toml when present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Do not preload herd's Node module into a `node` command.
    #[arg(long, conflicts_with = "node_shim")]
    pub no_node_shim: bool,
    /// Every setting, each also a `herd.toml` key of the same name; flags win.
    #[command(flatten)]
    pub opts: Options,
}

impl RunArgs {
    pub fn resolve(self) -> Result<Settings, crate::config::ConfigError> {
        if let Some(flag) = self.flag_after_command() {
            return Err(crate::config::ConfigError::FlagAfterCommand(flag));
        }
        Settings::resolve(self.opts, self.config.as_deref(), self.no_node_shim)
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
            run.get_arguments().any(|a| {
                flag.strip_prefix("--")
                    .is_some_and(|l| a.get_long() == Some(l))
                    || flag
                        .strip_prefix('-')
                        .and_then(|s| s.chars().next())
                        .is_some_and(|c| flag.len() == 2 && a.get_short() == Some(c))
            })
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
