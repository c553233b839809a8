//! Settings: `herd.toml` merged under the command line, validated into one
//! [`Settings`] value before anything is bound or spawned.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::cli::RunArgs;
use herd_balance::{BackendConfig, StrategyKind};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    ParseNoSpan { path: PathBuf, message: String },
    #[error(
        "no command given: put the server program after `--` (e.g. `herd run -- node server.js`), or give --upstream"
    )]
    NoCommand,
    #[error("{0} needs --mode proxy")]
    NeedsProxy(&'static str),
    #[error(
        "--balance {0} needs per-request information the master does not have in dispatch mode; use round-robin, least-conn, random2 or ip-hash (or --mode proxy)"
    )]
    NotForDispatch(String),
    #[error("command not found: {0}")]
    NotFound(String),
    #[error("not an executable file: {0}")]
    NotExecutable(String),
    #[error("--cwd {0}: not a directory")]
    BadCwd(PathBuf),
    #[error("invalid name {0:?}: use letters, digits, '.', '_' or '-' (at most 64)")]
    BadName(String),
}

/// A value TOML may give as a number or a string (`instances = 4` or
/// `"max"`); either way it is parsed as the command line would parse it.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    N(i64),
    S(String),
}

impl NumOrStr {
    fn parse<T: FromStr<Err = String>>(self) -> Result<T, String> {
        match self {
            NumOrStr::N(n) => n.to_string().parse(),
            NumOrStr::S(s) => s.parse(),
        }
    }
}

/// How workers share the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The master listens and relays each connection to a worker's private port.
    Proxy,
    /// One SO_REUSEPORT socket per worker slot, kept by the master across restarts.
    Reuseport,
    /// One listening socket inherited by every worker.
    Shared,
    /// The master accepts and passes each connection's fd to a worker
    /// (Node cluster's round-robin, for any language).
    Dispatch,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Proxy => "proxy",
            Mode::Reuseport => "reuseport",
            Mode::Shared => "shared",
            Mode::Dispatch => "dispatch",
        }
    }

    /// Whether workers get the listening socket as fd 3.
    pub fn passes_fd(self) -> bool {
        matches!(self, Mode::Shared | Mode::Reuseport)
    }
}

/// What proxy mode speaks to clients and backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and h2c: balanced per request, with retries and forwarding headers.
    Http,
    /// Bytes: balanced per connection.
    Tcp,
}

/// A byte size written like `16384`, `16k`, `16KiB`, `1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NumOrStr")]
pub struct Size(pub usize);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1024,
            "m" | "mb" | "mib" => 1024 * 1024,
            "g" | "gb" | "gib" => 1024 * 1024 * 1024,
            _ => return Err(format!("{s:?} is not a size (write 16384, 16k or 1m)")),
        };
        num.parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .filter(|&n| n > 0)
            .map(Size)
            .ok_or_else(|| format!("{s:?} is not a size (write 16384, 16k or 1m)"))
    }
}

impl TryFrom<NumOrStr> for Size {
    type Error = String;
    fn try_from(r: NumOrStr) -> Result<Self, String> {
        r.parse()
    }
}

/// A duration written like `500ms`, `5s`, `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("{e} (write durations like 500ms, 5s, 2m)"))
    }
}

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Worker count: a positive number or all usable CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NumOrStr")]
pub enum Instances {
    Max,
    Count(usize),
}

const INSTANCES_HINT: &str = "must be a positive number or `max`";

impl FromStr for Instances {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("max") {
            return Ok(Instances::Max);
        }
        match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Instances::Count(n)),
            _ => Err(INSTANCES_HINT.into()),
        }
    }
}

impl TryFrom<NumOrStr> for Instances {
    type Error = String;
    fn try_from(r: NumOrStr) -> Result<Self, String> {
        r.parse()
    }
}

/// The public address: `PORT`, `HOST:PORT` or `[V6]:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NumOrStr")]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(port) = s.parse::<u16>() {
            return Ok(ListenAddr(SocketAddr::from(([0, 0, 0, 0], port))));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr(addr));
        }
        // A host name such as `localhost:8000`: resolve it once, at start-up.
        match s.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(ListenAddr)
                .ok_or_else(|| format!("{s:?} resolves to no address")),
            Err(_) => Err(format!(
                "{s:?} is not PORT, HOST:PORT or [V6]:PORT (port 0-65535)"
            )),
        }
    }
}

impl TryFrom<NumOrStr> for ListenAddr {
    type Error = String;
    fn try_from(r: NumOrStr) -> Result<Self, String> {
        r.parse()
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One `--env KEY=VAL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPair(pub String, pub String);

impl FromStr for EnvPair {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
                Ok(EnvPair(k.to_string(), v.to_string()))
            }
            _ => Err("expected KEY=VAL".into()),
        }
    }
}

/// `herd.toml`: the same keys as the long flags, plus `command` and `[env]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub name: Option<String>,
    pub listen: Option<ListenAddr>,
    pub instances: Option<Instances>,
    pub mode: Option<Mode>,
    pub kill_timeout: Option<Dur>,
    pub ready_timeout: Option<Dur>,
    pub wait_ready: Option<bool>,
    pub restart_delay: Option<Dur>,
    pub max_restart_delay: Option<Dur>,
    pub max_restarts: Option<u32>,
    pub min_uptime: Option<Dur>,
    pub cwd: Option<PathBuf>,
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "strategy")]
    pub balance: Option<StrategyKind>,
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub upstream: Vec<UpstreamSpec>,
    pub health_path: Option<String>,
    pub health_interval: Option<Dur>,
    pub health_timeout: Option<Dur>,
    pub health_rise: Option<u32>,
    pub health_fall: Option<u32>,
    pub connect_timeout: Option<Dur>,
    pub response_timeout: Option<Dur>,
    pub header_timeout: Option<Dur>,
    pub idle_timeout: Option<Dur>,
    pub max_header_size: Option<Size>,
    pub max_headers: Option<usize>,
    pub max_memory: Option<Size>,
    pub watchdog: Option<Dur>,
    pub log_file: Option<PathBuf>,
    pub log_max_size: Option<Size>,
    pub log_keep: Option<u32>,
    pub node_shim: Option<bool>,
}

fn strategy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<StrategyKind>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

impl FileConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => {
                let (line, col) = line_col(text, span.start);
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    line,
                    col,
                    message: e.message().trim().replace('\n', " "),
                }
            }
            None => ConfigError::ParseNoSpan {
                path: path.to_path_buf(),
                message: e.message().trim().replace('\n', " "),
            },
        })
    }

    /// `--config FILE` must exist; otherwise `./herd.toml` is read if present.
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from("herd.toml");
                if !p.is_file() {
                    return Ok((FileConfig::default(), None));
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Ok((Self::parse(&path, &text)?, Some(path)))
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Everything the master needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    /// Whether the name was given (`--name`/`name =`) rather than derived.
    pub name_given: bool,
    pub listen: SocketAddr,
    pub instances: usize,
    pub mode: Mode,
    pub kill_timeout: Duration,
    pub ready_timeout: Duration,
    pub wait_ready: bool,
    pub restart_delay: Duration,
    pub max_restart_delay: Duration,
    pub max_restarts: u32,
    pub min_uptime: Duration,
    pub cwd: Option<PathBuf>,
    /// Extra worker environment, in the order given (later wins).
    pub env: Vec<(String, String)>,
    /// The command as given; `program` is its first word resolved to a
    /// path. Empty for a pure load balancer (upstreams only).
    pub command: Vec<OsString>,
    pub program: PathBuf,
    pub balance: StrategyKind,
    pub protocol: Protocol,
    pub upstreams: Vec<UpstreamSpec>,
    pub health: HealthConfig,
    pub http: HttpConfig,
    pub connect_timeout: Duration,
    pub max_memory: Option<u64>,
    pub watchdog: Option<Duration>,
    /// `--log-file`, with its rotation size and how many old files to keep.
    pub log_file: Option<PathBuf>,
    pub log_max_size: u64,
    pub log_keep: u32,
    /// Preload herd's Node module into the workers (`NODE_OPTIONS=--require`).
    pub node_shim: bool,
}

/// `--upstream ADDR[,weight=N][,max_fails=N][,fail_timeout=DUR][,backup]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub config: BackendConfig,
}

impl FromStr for UpstreamSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',').map(str::trim);
        let name = parts.next().unwrap_or_default().to_string();
        let addr = name
            .to_socket_addrs()
            .map_err(|e| format!("{name:?}: {e} (expected HOST:PORT)"))?
            .next()
            .ok_or_else(|| format!("{name:?} resolves to no address"))?;
        let mut config = BackendConfig::default();
        for p in parts {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let num = || {
                v.parse::<u32>()
                    .map_err(|_| format!("{k}={v:?}: expected a whole number"))
            };
            match k {
                "weight" => {
                    config.weight = num()?;
                    if config.weight == 0 {
                        return Err("weight must be at least 1".into());
                    }
                }
                "max_fails" => config.max_fails = num()?,
                "fail_timeout" => {
                    let d: Dur = v.parse()?;
                    config.fail_timeout = d.0.as_nanos() as u64;
                }
                "backup" if v.is_empty() => config.backup = true,
                _ => {
                    return Err(format!(
                        "unknown upstream parameter {p:?} (weight=N, max_fails=N, fail_timeout=DUR, backup)"
                    ));
                }
            }
        }
        Ok(UpstreamSpec { name, addr, config })
    }
}

impl TryFrom<String> for UpstreamSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl<'de> serde::Deserialize<'de> for UpstreamSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Active health checking (`--health-*`).
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// `None`: a TCP connect is the check. `Some(path)`: `GET path` must answer 2xx or 3xx.
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that bring a target back.
    pub rise: u32,
    /// Failures in a row that take it out.
    pub fall: u32,
}

/// Timeouts and limits of the HTTP proxy.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub connect_timeout: Duration,
    /// Time for a backend to start answering (response headers), and
    /// between two reads of its answer (nginx's `proxy_read_timeout`).
    pub response_timeout: Duration,
    pub limits: Limits,
    /// How long a request waits for a first worker to be ready.
    pub wait_for_backend: Duration,
}

/// What a client may send, and how slowly.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus headers, in bytes.
    pub max_head: usize,
    pub max_headers: usize,
    /// Time to send a whole request head once it has begun.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request, and a
    /// request body for its next bytes (then the request fails with 408).
    pub idle_timeout: Duration,
}

pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    8000,
));

impl Settings {
    pub fn resolve(args: RunArgs) -> Result<Settings, ConfigError> {
        let (file, _) = FileConfig::load(args.config.as_deref())?;
        let command: Vec<OsString> = if !args.command.is_empty() {
            args.command
        } else {
            file.command
                .unwrap_or_default()
                .into_iter()
                .map(OsString::from)
                .collect()
        };
        let upstreams = if args.upstreams.is_empty() {
            file.upstream
        } else {
            args.upstreams
        };
        if command.first().is_none_or(|c| c.is_empty()) && upstreams.is_empty() {
            return Err(ConfigError::NoCommand);
        }
        let mode = args.mode.or(file.mode).unwrap_or(Mode::Proxy);
        let balance = args.balance.or(file.balance);
        let protocol = args.protocol.or(file.protocol);
        if mode != Mode::Proxy {
            if !upstreams.is_empty() {
                return Err(ConfigError::NeedsProxy("--upstream"));
            }
            match (&balance, mode) {
                (None, _) => {}
                (
                    Some(
                        StrategyKind::RoundRobin
                        | StrategyKind::LeastConn
                        | StrategyKind::Random2
                        | StrategyKind::IpHash,
                    ),
                    Mode::Dispatch,
                ) => {}
                (Some(b), Mode::Dispatch) => {
                    return Err(ConfigError::NotForDispatch(b.to_string()));
                }
                (Some(_), _) => return Err(ConfigError::NeedsProxy("--balance")),
            }
            if protocol.is_some() {
                return Err(ConfigError::NeedsProxy("--protocol"));
            }
        }
        let cwd = args.cwd.or(file.cwd);
        if let Some(dir) = &cwd
            && !dir.is_dir()
        {
            return Err(ConfigError::BadCwd(dir.clone()));
        }
        let mut env: Vec<(String, String)> = file.env.into_iter().collect();
        env.extend(args.env.into_iter().map(|EnvPair(k, v)| (k, v)));
        let path_var = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| OsString::from(v))
            .or_else(|| std::env::var_os("PATH"));
        let program = match command.first() {
            Some(word) => resolve_program(word, cwd.as_deref(), path_var.as_deref())?,
            None => PathBuf::new(),
        };
        let node_shim = match (args.node_shim, args.no_node_shim, file.node_shim) {
            (true, _, _) => true,
            (_, true, _) => false,
            (_, _, Some(on)) => on,
            _ => is_node(&program),
        };
        let name_given = args.name.is_some() || file.name.is_some();
        let name = match args.name.or(file.name) {
            Some(n) => validate_name(n)?,
            None if command.is_empty() => "lb".to_string(),
            None => derive_name(&command),
        };
        let instances = match args.instances.or(file.instances).unwrap_or(Instances::Max) {
            _ if command.is_empty() => 0,
            Instances::Max => crate::os::cpus::usable(),
            Instances::Count(n) => n,
        };
        let d = |cli: Option<Dur>, file: Option<Dur>, default: Duration| {
            cli.or(file).map_or(default, |d| d.0)
        };
        let ready_timeout = d(
            args.ready_timeout,
            file.ready_timeout,
            Duration::from_secs(30),
        );
        let connect_timeout = d(
            args.connect_timeout,
            file.connect_timeout,
            Duration::from_secs(5),
        );
        let health = HealthConfig {
            path: args.health_path.or(file.health_path),
            interval: d(
                args.health_interval,
                file.health_interval,
                Duration::from_secs(2),
            ),
            timeout: d(
                args.health_timeout,
                file.health_timeout,
                Duration::from_secs(1),
            ),
            rise: args.health_rise.or(file.health_rise).unwrap_or(2).max(1),
            fall: args.health_fall.or(file.health_fall).unwrap_or(3).max(1),
        };
        let http = HttpConfig {
            connect_timeout,
            response_timeout: d(
                args.response_timeout,
                file.response_timeout,
                Duration::from_secs(60),
            ),
            limits: Limits {
                max_head: args
                    .max_header_size
                    .or(file.max_header_size)
                    .map_or(16 * 1024, |s| s.0),
                max_headers: args.max_headers.or(file.max_headers).unwrap_or(100).max(1),
                header_timeout: d(
                    args.header_timeout,
                    file.header_timeout,
                    Duration::from_secs(10),
                ),
                idle_timeout: d(
                    args.idle_timeout,
                    file.idle_timeout,
                    Duration::from_secs(60),
                ),
            },
            wait_for_backend: ready_timeout,
        };
        Ok(Settings {
            name,
            name_given,
            listen: args.listen.or(file.listen).map_or(DEFAULT_LISTEN, |l| l.0),
            instances,
            mode,
            kill_timeout: d(args.kill_timeout, file.kill_timeout, Duration::from_secs(5)),
            ready_timeout: d(
                args.ready_timeout,
                file.ready_timeout,
                Duration::from_secs(30),
            ),
            wait_ready: args.wait_ready || file.wait_ready.unwrap_or(false),
            restart_delay: d(
                args.restart_delay,
                file.restart_delay,
                Duration::from_millis(100),
            ),
            max_restart_delay: d(
                args.max_restart_delay,
                file.max_restart_delay,
                Duration::from_secs(10),
            ),
            max_restarts: args.max_restarts.or(file.max_restarts).unwrap_or(5),
            min_uptime: d(args.min_uptime, file.min_uptime, Duration::from_secs(1)),
            cwd,
            env,
            command,
            program,
            balance: balance.unwrap_or(StrategyKind::RoundRobin),
            protocol: protocol.unwrap_or(Protocol::Http),
            upstreams,
            health,
            http,
            connect_timeout,
            max_memory: args.max_memory.or(file.max_memory).map(|s| s.0 as u64),
            watchdog: args
                .watchdog
                .or(file.watchdog)
                .map(|d| d.0)
                .filter(|d| !d.is_zero()),
            log_file: args.log_file.or(file.log_file),
            log_max_size: args
                .log_max_size
                .or(file.log_max_size)
                .map_or(10 << 20, |s| s.0 as u64),
            log_keep: args.log_keep.or(file.log_keep).unwrap_or(3),
            node_shim,
        })
    }
}

/// Whether `program` is Node itself (`node`, `nodejs`, `node20`…), the
/// case where herd preloads its shim without being asked.
fn is_node(program: &Path) -> bool {
    program
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| {
            n == "nodejs"
                || n.strip_prefix("node")
                    .is_some_and(|v| v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        })
}

fn validate_name(n: String) -> Result<String, ConfigError> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(n)
    } else {
        Err(ConfigError::BadName(n))
    }
}

/// `node server.js` → `server`, `./api` → `api`: what PM2 users expect to see.
fn derive_name(command: &[OsString]) -> String {
    const INTERPRETERS: &[&str] = &[
        "node", "nodejs", "bun", "deno", "python", "python3", "ruby", "php", "perl", "java", "uv",
        "npx",
    ];
    let stem = |s: &OsString| {
        Path::new(s)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let prog = stem(&command[0]);
    let pick = if INTERPRETERS.contains(&prog.as_str()) {
        script_name(&command[1..]).unwrap_or(prog)
    } else {
        prog
    };
    let clean: String = pick
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if clean.is_empty() {
        "app".into()
    } else {
        clean
    }
}

/// The script or module an interpreter runs: `app.js` in `node app.js`,
/// `mod` in `python -m mod`; none for inline code (`-e`, `-c`).
fn script_name(args: &[OsString]) -> Option<String> {
    const TAKES_VALUE: &[&str] = &["-r", "--require", "--import", "--loader", "-W", "-X"];
    const INLINE: &[&str] = &["-e", "--eval", "-p", "--print", "-c"];
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == "-m" {
            return it
                .next()
                .map(|m| m.rsplit('.').next().unwrap_or(&m).to_string());
        }
        if INLINE.contains(&a.as_ref()) {
            return None;
        }
        if TAKES_VALUE.contains(&a.as_ref()) {
            it.next();
            continue;
        }
        if !a.starts_with('-') {
            return Path::new(a.as_ref())
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned());
        }
    }
    None
}

/// Finds the program the way `execvp` would, so a typo fails before any
/// socket is bound. A name with a slash is taken relative to the workers' cwd.
fn resolve_program(
    word: &OsString,
    cwd: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, ConfigError> {
    let shown = word.to_string_lossy().into_owned();
    let p = Path::new(word);
    if word.as_encoded_bytes().contains(&b'/') {
        let full = match cwd {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        };
        return match check_executable(&full) {
            Exec::Yes => Ok(std::path::absolute(&full).unwrap_or(full)),
            Exec::Missing => Err(ConfigError::NotFound(shown)),
            Exec::NotExecutable => Err(ConfigError::NotExecutable(shown)),
        };
    }
    let mut found_non_exec = false;
    for dir in std::env::split_paths(path_var.unwrap_or_default()) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let cand = dir.join(p);
        match check_executable(&cand) {
            Exec::Yes => return Ok(cand),
            Exec::NotExecutable => found_non_exec = true,
            Exec::Missing => {}
        }
    }
    if found_non_exec {
        Err(ConfigError::NotExecutable(shown))
    } else {
        Err(ConfigError::NotFound(shown))
    }
}

enum Exec {
    Yes,
    Missing,
    NotExecutable,
}

fn check_executable(p: &Path) -> Exec {
    match std::fs::metadata(p) {
        Err(_) => Exec::Missing,
        Ok(m) if !m.is_file() => Exec::NotExecutable,
        Ok(_) => match nix::unistd::access(p, nix::unistd::AccessFlags::X_OK) {
            Ok(()) => Exec::Yes,
            Err(_) => Exec::NotExecutable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_is_recognised_by_its_name() {
        for yes in ["node", "/usr/bin/node", "nodejs", "/opt/node20", "node22.1"] {
            assert!(is_node(Path::new(yes)), "{yes}");
        }
        for no in ["nodemon", "python3", "/usr/bin/npm", "node-gyp", "bun"] {
            assert!(!is_node(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn parses_values_like_the_flags() {
        assert_eq!("max".parse::<Instances>(), Ok(Instances::Max));
        assert_eq!("3".parse::<Instances>(), Ok(Instances::Count(3)));
        assert!("0".parse::<Instances>().is_err());
        assert!("abc".parse::<Instances>().is_err());
        assert_eq!(
            "9000".parse::<ListenAddr>().unwrap().0,
            "0.0.0.0:9000".parse().unwrap()
        );
        assert_eq!(
            "[::1]:80".parse::<ListenAddr>().unwrap().0,
            "[::1]:80".parse().unwrap()
        );
        assert!("70000".parse::<ListenAddr>().is_err());
        assert_eq!(
            "500ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("2m".parse::<Dur>().unwrap().0, Duration::from_secs(120));
        assert!("5".parse::<Dur>().is_err());
    }

    #[test]
    fn file_errors_name_the_line() {
        let text = "mode = \"proxy\"\ninstances = 0\n";
        let e = FileConfig::parse(Path::new("herd.toml"), text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("herd.toml:2:"), "{msg}");
        assert!(msg.contains("positive number"), "{msg}");
        assert!(!msg.contains('\n'));

        let e = FileConfig::parse(Path::new("h.toml"), "a = 1\nlisten = [\n").unwrap_err();
        assert!(e.to_string().starts_with("h.toml:"), "{e}");
        let e = FileConfig::parse(Path::new("h.toml"), "\n\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("h.toml:3:1:"), "{e}");
    }

    #[test]
    fn file_accepts_every_key() {
        let text = r#"
            name = "api"
            listen = "127.0.0.1:9000"
            instances = "max"
            mode = "reuseport"
            kill-timeout = "3s"
            ready-timeout = "10s"
            wait-ready = true
            restart-delay = "50ms"
            max-restart-delay = "5s"
            max-restarts = 3
            min-uptime = "2s"
            cwd = "/tmp"
            command = ["node", "server.js"]
            [env]
            NODE_ENV = "production"
        "#;
        let c = FileConfig::parse(Path::new("herd.toml"), text).unwrap();
        assert_eq!(c.mode, Some(Mode::Reuseport));
        assert_eq!(c.instances, Some(Instances::Max));
        assert_eq!(c.kill_timeout, Some(Dur(Duration::from_secs(3))));
        assert_eq!(
            c.env.get("NODE_ENV").map(String::as_str),
            Some("production")
        );
    }

    #[test]
    fn names_come_from_the_script() {
        let c = |v: &[&str]| derive_name(&v.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(c(&["node", "server.js"]), "server");
        assert_eq!(c(&["python3", "-u", "app.py"]), "app");
        assert_eq!(c(&["./target/release/api"]), "api");
        assert_eq!(c(&["node", "-r", "dotenv/config", "server.js"]), "server");
        assert_eq!(c(&["python3", "-m", "uvicorn", "main:app"]), "uvicorn");
        assert_eq!(c(&["node", "-e", "require('http')"]), "node");
    }

    #[test]
    fn parses_upstream_specs() {
        let u: UpstreamSpec = "127.0.0.1:8080,weight=3,max_fails=2,fail_timeout=30s,backup"
            .parse()
            .unwrap();
        assert_eq!(u.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(u.config.weight, 3);
        assert_eq!(u.config.max_fails, 2);
        assert_eq!(u.config.fail_timeout, 30_000_000_000);
        assert!(u.config.backup);
        assert!("127.0.0.1:1,weight=0".parse::<UpstreamSpec>().is_err());
        assert!("127.0.0.1:1,colour=red".parse::<UpstreamSpec>().is_err());
        assert!("nohost".parse::<UpstreamSpec>().is_err());
    }
}
