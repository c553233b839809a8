//! Command-line surface. Values are parsed into the same types the config
//! file uses, so a bad value reads the same whichever way it was given.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Dur, EnvPair, Instances, ListenAddr, Mode};

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
    /// Internal: the helper that kills worker process groups if the master dies.
    #[command(name = "__guard", hide = true)]
    Guard,
}

/// Every option is also a `herd.toml` key of the same name; flags win.
#[derive(Debug, Args, Default)]
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
    /// First delay before restarting a crashed worker; doubles per quick crash [default: 100ms].
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
    /// Working directory of the workers.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Extra environment for the workers, KEY=VAL (repeatable).
    #[arg(long = "env", value_name = "KEY=VAL")]
    pub env: Vec<EnvPair>,
    /// The server program and its arguments (put them after `--`).
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}
