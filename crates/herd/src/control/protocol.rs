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
    /// Zero-downtime rolling replacement of every worker.
    Reload,
    /// Stop and start every worker (not zero-downtime).
    Restart,
    /// `n`: a count (`"4"`), or a change (`"+2"`, `"-1"`).
    Scale { n: String },
    /// Graceful stop of the whole cluster.
    Stop,
    /// A message to one worker's channel (`HERD_IPC_FD`).
    Send { id: usize, message: Value },
    /// A message to every worker's channel.
    Broadcast { message: Value },
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
    /// `signal`: workers signalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signalled: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping: Option<bool>,
    /// `stop`: the master's pid, for the caller to wait for its exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
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
    pub log_file: Option<String>,
    pub workers: Vec<WorkerRow>,
}

/// One worker process in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerRow {
    /// Its slot.
    pub id: usize,
    pub pid: u32,
    pub state: WorkerState,
    /// Seconds.
    pub uptime: f64,
    /// Restarts of its slot.
    pub restarts: u64,
    /// Percent of one CPU since the last `status`.
    pub cpu: f64,
    /// RSS in bytes.
    pub memory: u64,
    /// Requests in flight (proxy) or established TCP connections (fd modes).
    pub connections: Option<usize>,
    /// Proxy mode only.
    pub requests: Option<u64>,
    pub rps: Option<f64>,
    /// How its slot's previous worker ended.
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Ready,
    Stopping,
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

/// A signal as `herd signal` takes it: `SIGUSR2`, `USR2`, `usr2` or `12`.
pub fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    use nix::sys::signal::Signal;
    let t = s.trim();
    let sig = if let Ok(n) = t.parse::<i32>() {
        Signal::try_from(n).ok()
    } else {
        let up = t.to_ascii_uppercase();
        let full = if up.starts_with("SIG") {
            up
        } else {
            format!("SIG{up}")
        };
        full.parse::<Signal>().ok()
    };
    sig.ok_or_else(|| format!("{s:?} is not a signal (for example SIGUSR2, USR2 or 12)"))
}
