//! The control protocol's messages, shared by the master (which answers)
//! and the CLI (which asks): one [`Request`] line, then [`Line`]s —
//! progress, and a final [`Done`] or [`Status`]. serde writes the JSON the
//! README documents; a test in the parent module pins it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One request, as the JSON object `{"cmd": "...", ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Per-worker state and stats.
    Status,
    /// `status`, with every host's last report in `hosts` (`--redis`).
    Hosts,
    /// Zero-downtime rolling replacement of every worker. With `update_env`
    /// (the caller's environment), the new workers run what the config file
    /// says now, in that environment (`herd reload --update-env`).
    Reload {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        update_env: Option<std::collections::BTreeMap<String, String>>,
    },
    /// Stop and start every worker (not zero-downtime); `update_env` as for
    /// `Reload` (`herd restart --update-env`).
    Restart {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        update_env: Option<std::collections::BTreeMap<String, String>>,
    },
    /// `n`: a count (`"4"`), or a change (`"+2"`, `"-1"`).
    Scale { n: String },
    /// Graceful stop of the whole cluster.
    Stop,
    /// Re-execute herd's binary on disk in place (same pid, sockets, name);
    /// the workers are replaced. The answer is progress, then the
    /// connection closes with the exec.
    Upgrade,
    /// A message to one worker's channel (`HERD_IPC_FD`); with `host`, a
    /// worker of the same cluster on that host (`--redis`).
    Send {
        id: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        message: Value,
    },
    /// A message to every worker's channel.
    Broadcast { message: Value },
    /// Start a new version beside the running one (canary or blue-green).
    Deploy(Box<DeployPlan>),
    /// The deploy's version replaces the running one (a rolling reload).
    Promote,
    /// The deploy's workers leave; all traffic returns to the running version.
    Rollback,
    /// Replace worker `id`: its successor first, then it drains (as a
    /// one-slot rolling reload).
    Replace { id: usize },
    /// What changed since the master started (scale, promote,
    /// `--update-env`), for a master that takes the cluster over: `herd
    /// stop` records it for `herd start NAME`, `herd save` for `herd
    /// resurrect`. Answered in `Done`'s `relaunch`.
    Relaunch,
    /// Every worker's restart count back to 0 (`pm2 reset`); the metrics'
    /// counters keep counting.
    Reset,
    /// A signal (`"SIGUSR2"`) to worker `id`'s main process, or to every worker's.
    Signal {
        signal: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<usize>,
    },
}

/// The last line of every answer but `status`'s: `ok`, and what was done.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Done {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `restart`: workers restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted: Option<usize>,
    /// `reload`: workers replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<usize>,
    /// `scale`: the worker count now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// `send`, `broadcast`: workers the message reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<usize>,
    /// `broadcast` with `--redis`: other hosts that heard it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<usize>,
    /// `deploy`: workers of the new version started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<usize>,
    /// `rollback`: workers of the new version stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<usize>,
    /// `signal`: workers signalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signalled: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping: Option<bool>,
    /// `stop`: the master's pid, for the caller to wait for its exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `relaunch`: what changed since the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relaunch: Option<Box<crate::config::relaunch::Relaunch>>,
}

impl Done {
    pub fn ok() -> Done {
        Done {
            ok: true,
            ..Done::default()
        }
    }

    pub fn failed(error: impl Into<String>) -> Done {
        Done {
            ok: false,
            error: Some(error.into()),
            ..Done::default()
        }
    }
}

/// `status`'s answer (`herd status --json` prints it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub ok: bool,
    pub name: String,
    pub pid: u32,
    pub mode: String,
    pub listen: String,
    /// Seconds.
    pub uptime: f64,
    pub reloading: bool,
    /// The cluster is stopping: its master drains and stops the workers,
    /// and answers `status` meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    pub log_file: Option<String>,
    /// `--output` and `--error`: the copies of the workers' stdout and stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_file: Option<String>,
    /// `--user`: who the workers run as (PM2's `username`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// What the workers run (the running version's command line) and where
    /// (`pm2 describe`'s script path and exec cwd); none with only upstreams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    pub workers: Vec<WorkerRow>,
    /// A deploy in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployStatus>,
    /// Proxy mode: the remote backends (`--upstream`, and those DNS gave).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamRow>,
    /// `--worker-max-conns`: requests each worker holds at once (0: no limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub worker_max_conns: u32,
    /// Rolling reloads that finished, and that were aborted.
    #[serde(default)]
    pub reloads: Reloads,
    /// New workers since the start, by cause (`exit`, `not_ready`,
    /// `spawn_failed`, `watchdog`, `reload`, `memory`, `replace`, `restart`,
    /// `deploy`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub restarts: std::collections::BTreeMap<String, u64>,
    /// With `--redis`: this host's name among those sharing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `herd status --all-hosts`: every host's last report, this one's included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostReport>,
}

/// One host's entry in `herd status --all-hosts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostReport {
    pub host: String,
    /// Seconds since its last report (one every 2 s).
    pub age: f64,
    /// Its status, unless the report expired (silent for 10 s).
    pub status: Option<Box<Status>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reloads {
    pub done: u64,
    pub aborted: u64,
}

/// `herd deploy`'s request: what the new version runs (each unset part as
/// the running version has it, `env` added to its environment) and how
/// traffic reaches it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeployPlan {
    /// Percent of the requests for the new version; unset with `blue_green`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<u8>,
    /// A full set of new workers that takes all traffic once all are ready.
    #[serde(default)]
    pub blue_green: bool,
    /// `ip`, `header:NAME` or `cookie:NAME`: what keeps a user on one
    /// version; unset: each request at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `KEY=VAL`, added to the running version's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// New workers to start (canary: the share of the workers, at least 1;
    /// blue-green: as many as run now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Roll back when the new version's 5xx rate (percent) over the window
    /// passes this and the running version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Roll back when the new version's p99 over the window passes this
    /// and the running version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<u64>,
    /// Promote once the new version has been healthy this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_after_ms: Option<u64>,
    /// The analysis window [default: 30 s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
}

/// A deploy in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeployStatus {
    /// `canary` or `blue-green`.
    pub kind: String,
    /// Share of the traffic the new version gets now, in percent.
    pub percent: u8,
    /// `random`, `ip`, `header:NAME` or `cookie:NAME`.
    pub by: String,
    /// The running version, then the new one.
    pub versions: Vec<VersionRow>,
    /// What the automatic analysis sees, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<String>,
}

/// One version in [`DeployStatus`]; figures over the analysis window
/// (proxy mode).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionRow {
    pub version: u32,
    /// `stable` or `new`.
    pub role: String,
    pub command: String,
    pub workers: usize,
    pub requests: Option<u64>,
    /// 5xx answers, percent of requests.
    pub error_rate: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One remote backend in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpstreamRow {
    /// `upstream ADDR`, or `upstream ADDR (NAME)` when DNS gave it.
    pub name: String,
    pub healthy: bool,
    /// Out by passive health (`max_fails` failures within `fail_timeout`)
    /// until a request to it succeeds again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub taken_out: bool,
    pub in_flight: u32,
    /// Its `max_conns` (0: no limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_conns: u32,
    /// Requests (HTTP) or connections (TCP) it was given.
    pub requests: u64,
}

/// One worker process in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerRow {
    /// Its slot.
    pub id: usize,
    /// The release it runs: 0 is the cluster's first, each deploy adds one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u32,
    pub pid: u32,
    pub state: WorkerState,
    /// Seconds.
    pub uptime: f64,
    /// Restarts of its slot.
    pub restarts: u64,
    /// Percent of one CPU since the last `status`.
    pub cpu: f64,
    /// CPU time used in all (user and system), in seconds.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// RSS in bytes.
    pub memory: u64,
    /// Requests in flight (proxy) or established TCP connections (fd modes).
    pub connections: Option<usize>,
    /// Proxy mode only.
    pub requests: Option<u64>,
    pub rps: Option<f64>,
    /// Proxy mode: time to the answer's head over the last minute, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// How its slot's previous worker ended.
    pub last_exit: Option<String>,
    /// Proxy mode: failing its active health check, so given no requests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub down: bool,
    /// Proxy mode: out by passive health (`max_fails` failures within
    /// `fail_timeout`) until a request to it succeeds again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub taken_out: bool,
}

impl WorkerRow {
    /// Its state as `status` and `monit` show it: a ready worker the
    /// proxy gives no requests says so (`down`, `out`), as HAProxy's stats
    /// say DOWN of a server that is up as a process.
    pub fn shown_state(&self) -> &'static str {
        match self.state {
            WorkerState::Ready if self.down => "down",
            WorkerState::Ready if self.taken_out => "out",
            WorkerState::Ready => "ready",
            WorkerState::Starting => "starting",
            WorkerState::Stopping => "stopping",
            WorkerState::Waiting => "waiting",
            WorkerState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Ready,
    Stopping,
    /// A slot without a process whose next one is due (a restart's
    /// back-off, or its predecessor still exiting): PM2's "waiting restart".
    Waiting,
    /// A slot without a process that stays so (`--autorestart=false`, or
    /// the cluster stopping): PM2's "stopped".
    Stopped,
}

impl WorkerState {
    /// Whether a process runs in this state (the others are empty slots).
    pub fn has_process(self) -> bool {
        matches!(
            self,
            WorkerState::Starting | WorkerState::Ready | WorkerState::Stopping
        )
    }
}

/// One line of an answer, as the master sends it.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Line {
    Progress { progress: String },
    Done(Done),
    Status(Box<Status>),
}

impl Line {
    pub fn progress(msg: impl Into<String>) -> Line {
        Line::Progress {
            progress: msg.into(),
        }
    }
}

impl From<Done> for Line {
    fn from(d: Done) -> Line {
        Line::Done(d)
    }
}

pub use crate::config::parse_signal;

fn is_zero(v: &u32) -> bool {
    *v == 0
}
