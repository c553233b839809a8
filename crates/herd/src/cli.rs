//! Command-line surface. Values are parsed into the same types the config
//! file uses, so a bad value reads the same whichever way it was given.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::UpstreamSpec;
use crate::config::{Dur, EnvPair, Instances, ListenAddr, Mode, Protocol, Size};
use herd_balance::StrategyKind;

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
        target: Target,
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to show first.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// Show the workers of a running cluster (like `pm2 list`).
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Zero-downtime rolling reload: replace workers one at a time.
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Stop and start every worker at once (not zero-downtime).
    Restart {
        #[command(flatten)]
        target: Target,
    },
    /// Set the number of workers: N, +K or -K.
    Scale {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "N|+K|-K", allow_hyphen_values = true)]
        n: String,
    },
    /// Stop a running cluster gracefully.
    Stop {
        #[command(flatten)]
        target: Target,
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
    /// List the running herd clusters of this user.
    List,
    /// Internal: the helper that kills worker process groups if the master dies.
    #[command(name = "__guard", hide = true)]
    Guard,
}

/// Which running cluster a command is for.
#[derive(Debug, Args, Default)]
pub struct Target {
    /// The cluster's name [default: the only one running].
    #[arg(long)]
    pub name: Option<String>,
}

/// Every option is also a `herd.toml` key of the same name; flags win.
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// Config file (default: ./herd.toml when present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Name of the cluster (default: derived from the command).
    #[arg(long)]
    pub name: Option<String>,
    /// Where clients connect: PORT, HOST:PORT or [V6]:PORT [default: 0.0.0.0:8000].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<ListenAddr>,
    /// Number of workers, or `max` for the usable CPUs [default: max].
    #[arg(short = 'i', long = "instances", value_name = "N|max")]
    pub instances: Option<Instances>,
    /// How workers share the port [default: proxy].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Grace between SIGTERM and SIGKILL, and for draining on stop [default: 5s].
    #[arg(long, value_name = "DUR")]
    pub kill_timeout: Option<Dur>,
    /// How long a new worker may take to become ready [default: 30s].
    #[arg(long, value_name = "DUR")]
    pub ready_timeout: Option<Dur>,
    /// Only sd_notify READY=1 marks a worker ready (no port probe, no grace).
    #[arg(long)]
    pub wait_ready: bool,
    /// Delay before restarting a worker after a quick exit; doubles per quick exit in a row
    /// (a worker that ran at least --min-uptime comes back at once) [default: 100ms].
    #[arg(long, value_name = "DUR")]
    pub restart_delay: Option<Dur>,
    /// Cap of the restart back-off [default: 10s].
    #[arg(long, value_name = "DUR")]
    pub max_restart_delay: Option<Dur>,
    /// Quick exits in a row a slot may have before herd gives up [default: 5].
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// A worker that exits sooner than this after starting counts as a crash loop step [default: 1s].
    #[arg(long, value_name = "DUR")]
    pub min_uptime: Option<Dur>,
    /// Replace a worker gracefully once its RSS stays above SIZE for 3 s (e.g. 300M).
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<Size>,
    /// Give workers WATCHDOG_USEC; one that sent WATCHDOG=1 and then goes quiet
    /// this long is killed and replaced.
    #[arg(long, value_name = "DUR")]
    pub watchdog: Option<Dur>,
    /// Write herd's log and worker output to FILE instead of stdout/stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Rotate the log file past this size [default: 10M].
    #[arg(long, value_name = "SIZE")]
    pub log_max_size: Option<Size>,
    /// Rotated log files kept (FILE.1 … FILE.N) [default: 3].
    #[arg(long, value_name = "N")]
    pub log_keep: Option<u32>,
    /// Working directory of the workers.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Extra environment for the workers, KEY=VAL (repeatable).
    #[arg(long = "env", value_name = "KEY=VAL")]
    pub env: Vec<EnvPair>,
    /// Balancing strategy: round-robin, weighted, least-conn, random2, ewma,
    /// ip-hash, hash:header:NAME, hash:cookie:NAME [default: round-robin].
    #[arg(long, value_name = "STRATEGY")]
    pub balance: Option<StrategyKind>,
    /// What the proxy speaks: `http` balances per request, `tcp` per connection [default: http].
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// A remote backend: ADDR[,weight=N][,max_fails=N][,fail_timeout=DUR][,backup] (repeatable).
    #[arg(long = "upstream", value_name = "SPEC")]
    pub upstreams: Vec<UpstreamSpec>,
    /// Active health check: `GET PATH` must answer 2xx/3xx [default: a TCP connect].
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,
    /// Time between health checks; 0 turns them off [default: 2s].
    #[arg(long, value_name = "DUR")]
    pub health_interval: Option<Dur>,
    /// Time a health check may take [default: 1s].
    #[arg(long, value_name = "DUR")]
    pub health_timeout: Option<Dur>,
    /// Passed checks in a row that bring a backend back [default: 2].
    #[arg(long, value_name = "N")]
    pub health_rise: Option<u32>,
    /// Failed checks in a row that take a backend out [default: 3].
    #[arg(long, value_name = "N")]
    pub health_fall: Option<u32>,
    /// Time to connect to a backend [default: 5s].
    #[arg(long, value_name = "DUR")]
    pub connect_timeout: Option<Dur>,
    /// Time for a backend to start answering a request [default: 60s].
    #[arg(long, value_name = "DUR")]
    pub response_timeout: Option<Dur>,
    /// Time for a client to send a request head once begun (then 408) [default: 10s].
    #[arg(long, value_name = "DUR")]
    pub header_timeout: Option<Dur>,
    /// Time a keep-alive client connection may sit idle [default: 60s].
    #[arg(long, value_name = "DUR")]
    pub idle_timeout: Option<Dur>,
    /// Largest request head (request line + headers), e.g. 16k (then 431) [default: 16k].
    #[arg(long, value_name = "SIZE")]
    pub max_header_size: Option<Size>,
    /// Most request headers (then 431) [default: 100].
    #[arg(long, value_name = "N")]
    pub max_headers: Option<usize>,
    /// Preload herd's Node module (NODE_OPTIONS=--require) even though the
    /// command is not `node` itself (e.g. a script with a `#!` line)
    /// [default: on when the command is node].
    #[arg(long, conflicts_with = "no_node_shim")]
    pub node_shim: bool,
    /// Do not preload herd's Node module into a `node` command.
    #[arg(long)]
    pub no_node_shim: bool,
    /// The server program and its arguments (put them after `--`).
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}
