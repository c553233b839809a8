//! Settings: `herd.toml` merged under the command line, validated into one
//! [`Settings`] value before anything is bound or spawned.
//!
//! Long because each setting's value type (durations, sizes, addresses,
//! upstream specs) is parsed here, beside `Options` and `Settings::resolve`:
//! one file to read for one setting.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use herd_balance::{BackendConfig, StrategyKind};

pub mod apps;
pub mod moment;
pub mod relaunch;

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
        "--max-headers {0}: 1 to {MAX_HEADERS} (the upper bound is HAProxy's for tune.http.maxhdr)"
    )]
    TooManyHeaders(usize),
    #[error(
        "--balance {0} needs per-request information the master does not have in dispatch mode; use round-robin, least-conn, random2 or ip-hash (or --mode proxy)"
    )]
    NotForDispatch(String),
    #[error("command not found: {0}")]
    NotFound(String),
    #[error(
        "{0} is a Node program that would take dispatch mode's channel (connections reach only the process herd starts): give Node the app itself (`node server.js`; a package's command as `node node_modules/.bin/next start`), or use --mode proxy, shared or reuseport"
    )]
    ManagerInDispatch(String),
    #[error(
        "Bun serves only the port or socket it binds itself (it ignores an inherited socket and takes no handed-over connections), so it cannot run in {0} mode: use --mode proxy (the default)"
    )]
    BunNeedsProxy(&'static str),
    #[error(
        "{0} is a file, but herd knows no interpreter for it and it is not executable: name one (--interpreter PROGRAM), or give the whole command (herd start -- PROGRAM {0}){1}"
    )]
    NoInterpreter(String, &'static str),
    #[error("not an executable file: {0}")]
    NotExecutable(String),
    #[error("--cwd {0}: not a directory")]
    BadCwd(PathBuf),
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--group {0}: no such group")]
    NoSuchGroup(String),
    #[error("--group needs --user (the workers' user, whose group it replaces)")]
    GroupWithoutUser,
    #[error("--user {0}: only root can run workers as another user; run herd as {0} instead")]
    UserNeedsRoot(String),
    #[error("invalid name {0:?}: use letters, digits, '.', '_' or '-' (at most 64)")]
    BadName(String),
    #[error("script not found: {script} (looked in {dir})")]
    NoScript { script: String, dir: String },
    #[error(
        "{0} comes after the command: put herd's options before it, and the app's own after `--`"
    )]
    FlagAfterCommand(String),
    #[error("--watch {0}: no such file or directory")]
    BadWatch(PathBuf),
    #[error("--watch-ignore {pattern:?}: {message}")]
    BadGlob { pattern: String, message: String },
    #[error("--watch needs a command: there are no workers to reload")]
    WatchWithoutCommand,
    #[error(
        "--admin {0} is not a loopback address: give --admin-token (or HERD_ADMIN_TOKEN) so that only you can use it"
    )]
    AdminNeedsToken(SocketAddr),
    #[error(
        "--env {0}: give KEY=VAL; a bare name picks env_{0} of an ecosystem file (herd start ecosystem.config.js --env {0})"
    )]
    Profile(String),
    #[error("{path} has no app named {app:?}{}", if names.is_empty() { String::new() } else { format!(" (it has: {names})") })]
    NoSuchApp {
        app: String,
        path: PathBuf,
        names: String,
    },
    #[error(
        "{path} holds several apps ({names}): `herd start {path}` starts them all; `herd run --app NAME` runs one"
    )]
    SeveralApps { path: PathBuf, names: String },
    #[error("$PORT {0} (herd listens on $PORT when --listen is not given)")]
    BadPort(String),
    #[error("--upstream-srv {0:?}: expected _SERVICE._PROTO.NAME[,weight=N…]")]
    BadSrv(String),
    #[error("--upstream-srv: {0}")]
    BadSrvName(String),
    #[error("--resolver {0:?}: expected IP or IP:PORT")]
    BadResolver(String),
    #[error("--redis {url:?}: {message}")]
    BadRedis { url: String, message: String },
    #[error("--host-name {0:?}: expected 1 to 64 letters, digits, '.', '-' or '_'")]
    BadHostName(String),
    #[error("--host-name needs --redis: the name is this host's among those sharing Redis")]
    HostNameWithoutRedis,
    #[error("--upstream-cert and --upstream-key go together")]
    UpstreamPair,
    #[error("--tls-client-optional needs --tls-client-ca")]
    OptionalWithoutCa,
    #[error("--tls-client-crl needs --tls-client-ca")]
    CrlWithoutCa,
    #[error("--tls-cert and --tls-key come in pairs: {certs} certificate(s), {keys} key(s)")]
    TlsPairs { certs: usize, keys: usize },
    #[error("--redirect-http, --tls-strict-sni and --tls-client-* need --tls-cert and --tls-key")]
    RedirectWithoutTls,
    #[error("TLS is terminated in proxy mode with --protocol http only")]
    TlsNeedsHttp,
    #[error("--backend-protocol h2 is for proxy mode with --protocol http")]
    H2NeedsHttp,
    #[error("--worker-socket unix is for proxy mode with --backend-protocol h1")]
    UnixNeedsHttp,
    #[error(
        "--worker-socket unix cannot be used with --user: the workers would own the socket herd connects to"
    )]
    UnixWithUser,
    #[error(
        "--balance hash:sni picks by the TLS server name of --protocol tcp connections: add --protocol tcp"
    )]
    SniNeedsTcp,
    #[error(
        "--send-proxy is for --protocol tcp (over HTTP herd names the client in X-Forwarded-For and Forwarded)"
    )]
    SendProxyNeedsTcp,
    #[error("{0} counts or reads HTTP requests: it is for --protocol http")]
    NeedsHttp(&'static str),
    #[error("--real-ip-header needs --real-ip-from: the balancers whose header herd may believe")]
    RealIpHeaderAlone,
    #[error("--real-ip-header {0:?} is not a header name")]
    BadRealIpHeader(String),
    #[error("--increment-var PORT: in proxy mode herd gives each worker its own PORT")]
    IncrementPort,
    #[error(
        "--listen with --mode fork: in fork mode herd opens no port and the program binds its own; drop --listen (or use another --mode)"
    )]
    ListenInFork,
    #[error("--{flag} 0: {why}; give it a length (default {default:?})")]
    ZeroTimeout {
        flag: &'static str,
        why: &'static str,
        default: Duration,
    },
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
    /// No port: each worker runs as it is, as in PM2's fork mode (a queue
    /// consumer, a scheduler, or a server that binds its own port).
    Fork,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Proxy => "proxy",
            Mode::Reuseport => "reuseport",
            Mode::Shared => "shared",
            Mode::Dispatch => "dispatch",
            Mode::Fork => "fork",
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

/// `--send-proxy`: the PROXY protocol header's version for backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    /// Text (nginx's `proxy_protocol on`, HAProxy's `send-proxy`).
    V1,
    /// Binary (HAProxy's `send-proxy-v2`).
    V2,
}

/// A byte size written like `16384`, `16k`, `16KiB`, `1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NumOrStr")]
pub struct Size(pub usize);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<SizeOrZero>()? {
            SizeOrZero(0) => Err(format!(
                "{s:?}: a size here is more than 0 (write 16384, 16k or 1m)"
            )),
            SizeOrZero(n) => Ok(Size(n)),
        }
    }
}

impl TryFrom<NumOrStr> for Size {
    type Error = String;
    fn try_from(r: NumOrStr) -> Result<Self, String> {
        r.parse()
    }
}

/// A [`Size`] that may be 0, for limits where 0 turns something off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NumOrStr")]
pub struct SizeOrZero(pub usize);

impl FromStr for SizeOrZero {
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
        let n = num.parse::<usize>().map_err(|e| match e.kind() {
            std::num::IntErrorKind::PosOverflow => format!("{s:?} is too large"),
            _ => format!("{s:?} is not a size (write 16384, 16k or 1m)"),
        })?;
        n.checked_mul(mult)
            .map(SizeOrZero)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl TryFrom<NumOrStr> for SizeOrZero {
    type Error = String;
    fn try_from(r: NumOrStr) -> Result<Self, String> {
        r.parse()
    }
}

/// A duration written like `500ms`, `5s`, `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DurWritten")]
pub struct Dur(pub Duration);

/// A duration as a config file may write it: a number is read only to say
/// which unit it needs (`kill-timeout = 3000`, from PM2's milliseconds).
#[derive(Deserialize)]
#[serde(untagged)]
enum DurWritten {
    Text(String),
    Number(u64),
}

impl TryFrom<DurWritten> for Dur {
    type Error = String;
    fn try_from(w: DurWritten) -> Result<Self, String> {
        match w {
            DurWritten::Text(s) => s.parse(),
            DurWritten::Number(n) => n.to_string().parse(),
        }
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        // 0 needs no unit (`--health-interval 0` turns checks off).
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.bytes().any(|b| b != b'0') {
            // PM2's flags take bare milliseconds; guessing would turn a
            // 3-second timeout into 50 minutes, or the other way round.
            return Err(format!(
                "a duration needs a unit: {s}ms (PM2's numbers are milliseconds) or {s}s"
            ));
        }
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("{e} (write durations like 500ms, 5s, 2m)"))?;
        if d > MAX_DUR {
            return Err(format!("{s} is too long: at most 3650d"));
        }
        Ok(Dur(d))
    }
}

/// The most `--max-headers` may be.
const MAX_HEADERS: usize = 32767;

/// The longest duration herd takes: ten years is past any timeout's use,
/// and far from where a deadline (now + it) would overflow the clock.
const MAX_DUR: Duration = Duration::from_secs(3650 * 24 * 3600);

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

/// `--kill-signal`: what stops a worker (systemd's `KillSignal=`); `none`:
/// only the shutdown message on its channel (PM2's `shutdown_with_message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct KillSignal(pub Option<nix::sys::signal::Signal>);

impl FromStr for KillSignal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(KillSignal(None));
        }
        parse_signal(s)
            .map(|sig| KillSignal(Some(sig)))
            .map_err(|e| format!("{e}, or none"))
    }
}

impl TryFrom<String> for KillSignal {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// A `--real-ip-from` network: an address alone is itself (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TrustedNet(pub ipnet::IpNet);

impl FromStr for TrustedNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(TrustedNet)
            .map_err(|_| {
                format!(
                    "{s:?} is not an address or a network (10.0.0.0/8, 192.0.2.1, 2001:db8::/32)"
                )
            })
    }
}

/// Whether `ip` is in one of `nets`; an IPv4-mapped IPv6 address (a peer
/// on a dual-stack listener) as the IPv4 one.
pub fn in_nets(nets: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

impl TryFrom<String> for TrustedNet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// `--accept-proxy`: which connections begin with a PROXY protocol header:
/// none, all, or those from some addresses only (HAProxy's `tcp-request
/// connection expect-proxy layer4 if { src … }`), the others being clients
/// that reach herd directly. In `herd.toml`: `true`, `false` or a list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AcceptProxy {
    #[default]
    Off,
    All,
    From(Vec<ipnet::IpNet>),
}

impl AcceptProxy {
    pub fn is_on(&self) -> bool {
        *self != AcceptProxy::Off
    }

    /// Whether a connection from `peer` begins with a header.
    pub fn expects(&self, peer: std::net::IpAddr) -> bool {
        match self {
            AcceptProxy::Off => false,
            AcceptProxy::All => true,
            AcceptProxy::From(nets) => in_nets(nets, peer),
        }
    }
}

impl FromStr for AcceptProxy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "true" => Ok(AcceptProxy::All),
            "false" => Ok(AcceptProxy::Off),
            list => list
                .split(',')
                .map(|n| n.parse::<TrustedNet>().map(|n| n.0))
                .collect::<Result<Vec<_>, _>>()
                .map(AcceptProxy::From)
                .map_err(|e| format!("{e}; or true, false")),
        }
    }
}

impl<'de> Deserialize<'de> for AcceptProxy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AcceptProxy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or a list of addresses and networks")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<AcceptProxy, E> {
                Ok(if on {
                    AcceptProxy::All
                } else {
                    AcceptProxy::Off
                })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<AcceptProxy, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<AcceptProxy, A::Error> {
                let mut nets = Vec::new();
                while let Some(n) = seq.next_element::<TrustedNet>()? {
                    nets.push(n.0);
                }
                // `[]`: from nowhere, that is off.
                Ok(if nets.is_empty() {
                    AcceptProxy::Off
                } else {
                    AcceptProxy::From(nets)
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `--rate-limit N/s|N/m[,burst=N]`: requests per client address (nginx's
/// `limit_req rate=Nr/s burst=N nodelay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RateLimit {
    /// Between two requests at the steady rate.
    pub interval: Duration,
    /// Requests a client may make at once.
    pub burst: u32,
}

impl FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a rate: write N/s or N/m, and ,burst=N to allow N at once (10/s,burst=20)"
            )
        };
        let mut parts = s.trim().split(',');
        let rate = parts.next().unwrap_or_default().trim();
        let (n, unit) = rate.split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().trim_end_matches('r').parse().map_err(|_| bad())?;
        let unit = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            _ => return Err(bad()),
        };
        if n == 0 {
            return Err(bad());
        }
        // A second's worth at once, at least one.
        let mut burst = n.div_ceil(unit).max(1);
        for p in parts {
            match p.trim().split_once('=') {
                Some(("burst", b)) => {
                    burst = b.trim().parse().ok().filter(|&b| b > 0).ok_or_else(bad)?
                }
                _ => return Err(bad()),
            }
        }
        Ok(RateLimit {
            interval: Duration::from_secs(unit.into()) / n,
            burst,
        })
    }
}

impl TryFrom<String> for RateLimit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// `--real-ip-from` and `--real-ip-header`: whose word on the client's
/// address herd takes, and the header it reads (see `proxy::real_ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealIp {
    pub from: Vec<ipnet::IpNet>,
    /// The header's name, as given.
    pub header: String,
    /// It is RFC 7239's `Forwarded`: each element's `for=` names a hop.
    pub forwarded: bool,
}

impl RealIp {
    pub fn new(from: Vec<ipnet::IpNet>, header: &str) -> RealIp {
        RealIp {
            from,
            forwarded: header.eq_ignore_ascii_case("forwarded"),
            header: header.to_string(),
        }
    }
}

/// A header name (RFC 9110's `token`).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A `--cron-restart` pattern (PM2's `cron_restart`), in local time: five
/// fields, minute first, or six with seconds first, read by croner, the
/// parser PM2 itself uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct CronSpec(pub croner::Cron);

impl FromStr for CronSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim().parse().map(CronSpec).map_err(|e| {
            format!(
                "{s:?} is not a cron pattern: {e} (write 5 fields, minute first: \"0 3 * * *\")"
            )
        })
    }
}

impl TryFrom<String> for CronSpec {
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
    /// `-N`: all usable CPUs but N (at least one worker), as PM2's `-i -1`.
    AllBut(usize),
}

const INSTANCES_HINT: &str = "must be a positive number, `max`, or -N (all CPUs but N)";

/// The most workers a cluster may have (`-i`, `herd scale`): a typo such
/// as `-i 10000` would otherwise fork until the machine gives out.
pub const MAX_WORKERS: usize = 4096;

impl FromStr for Instances {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("max") {
            return Ok(Instances::Max);
        }
        if let Some(n) = s.strip_prefix('-') {
            return match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Instances::AllBut(n)),
                _ => Err(INSTANCES_HINT.into()),
            };
        }
        match s.parse::<usize>() {
            Ok(n) if n > MAX_WORKERS => Err(format!("{n} workers: at most {MAX_WORKERS}")),
            Ok(n) if n > 0 => Ok(Instances::Count(n)),
            // PM2 reads 0 as all CPUs; herd asks for the word.
            Ok(_) => Err(format!("{INSTANCES_HINT}; PM2's 0 is `max` here")),
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

/// Merges a layer of settings over the one below it (flags over the file).
pub trait Layer {
    fn over(self, below: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn over(self, below: Self) -> Self {
        self.or(below)
    }
}

/// `--env` adds to `[env]`; a key given in both takes the flag's value.
impl Layer for Vec<EnvPair> {
    fn over(self, below: Self) -> Self {
        let mut all = below;
        all.extend(self);
        all
    }
}

/// Declares [`Options`] and its merge from one list of fields, so a new
/// setting is one field (with its flag and its doc) and nothing else.
macro_rules! options {
    ($( $(#[$attr:meta])* $field:ident : $ty:ty, )*) => {
        /// Every setting of `herd run`, each both a flag and a `herd.toml`
        /// key of the same name (`--kill-timeout` / `kill-timeout`), unset
        /// unless given; [`Settings::resolve`] applies the defaults.
        #[derive(Debug, Default, Clone, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct Options {
            $( $(#[$attr])* pub $field: $ty, )*
        }

        impl Layer for Options {
            fn over(self, below: Options) -> Options {
                Options { $( $field: self.$field.over(below.$field), )* }
            }
        }
    };
}

options! {
    /// Name of the cluster (default: derived from the command).
    #[arg(short = 'n', long)]
    name: Option<String>,
    /// Where clients connect: PORT, HOST:PORT or [V6]:PORT [default: $PORT, else for a Node app
    /// in proxy mode the port its listen() names, else 0.0.0.0:8000].
    #[arg(long, value_name = "ADDR")]
    listen: Option<ListenAddr>,
    /// Number of workers, `max` for the usable CPUs, or -N for all of them but N
    /// (at least one) [default: max; 1 in fork mode].
    #[arg(short = 'i', long = "instances", value_name = "N|max|-N", allow_negative_numbers = true)]
    instances: Option<Instances>,
    /// How workers share the port [default: proxy]; `fork`: no port, for a
    /// program that serves none or binds its own (1 worker by default).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Grace between the kill signal and SIGKILL [default: 5s].
    #[arg(long, value_name = "DUR")]
    kill_timeout: Option<Dur>,
    /// The signal that stops a worker [default: SIGTERM]; PM2 sends SIGINT;
    /// `none`: only the shutdown message (PM2's shutdown_with_message).
    #[arg(long, value_name = "SIGNAL")]
    kill_signal: Option<KillSignal>,
    /// How long a leaving worker (or, on stop, the proxy) may take to finish its requests before the kill signal [default: 5s].
    #[arg(long, value_name = "DUR")]
    drain_timeout: Option<Dur>,
    /// How long a new worker may take to become ready [default: 30s].
    #[arg(long, value_name = "DUR", alias = "listen-timeout")]
    ready_timeout: Option<Dur>,
    /// Only sd_notify READY=1 marks a worker ready (no port probe, no grace).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    wait_ready: Option<bool>,
    /// `--autorestart=false` (PM2's --no-autorestart, `autorestart: false`): a worker that
    /// exits is not started again, and the cluster stops once none is left [default: true].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    autorestart: Option<bool>,
    /// Exit codes that mean "done" (PM2's --stop-exit-codes): a worker that exits with one
    /// stays down, as with --autorestart=false; others restart as usual. Comma-separated or
    /// repeated: --stop-exit-codes 0,3.
    #[arg(long, value_name = "CODE", value_delimiter = ',', num_args = 1..)]
    stop_exit_codes: Option<Vec<u8>>,
    /// Delay before restarting a worker after a quick exit; doubles per quick exit in a row
    /// (a worker that ran at least --min-uptime comes back at once) [default: 100ms].
    #[arg(long, value_name = "DUR")]
    restart_delay: Option<Dur>,
    /// Cap of the restart back-off [default: 10s].
    #[arg(long, value_name = "DUR")]
    max_restart_delay: Option<Dur>,
    /// Quick exits in a row a slot may have before herd gives up [default: 5].
    #[arg(long, value_name = "N")]
    max_restarts: Option<u32>,
    /// A worker that exits sooner than this after starting counts as a crash loop step [default: 1s].
    #[arg(long, value_name = "DUR")]
    min_uptime: Option<Dur>,
    /// Replace a worker gracefully once its RSS stays above SIZE for 3 s (e.g. 300M).
    #[arg(long, value_name = "SIZE", alias = "max-memory-restart")]
    max_memory: Option<Size>,
    /// Give workers WATCHDOG_USEC; one that sent WATCHDOG=1 and then goes quiet
    /// this long is killed and replaced.
    #[arg(long, value_name = "DUR")]
    watchdog: Option<Dur>,
    /// Rolling reload when files change (PM2's --watch): `--watch` watches the
    /// working directory, `--watch=PATH` a file or directory (repeatable).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = ".", value_name = "PATH")]
    watch: Option<Vec<PathBuf>>,
    /// Changes to paths matching GLOB do not count (repeatable; node_modules,
    /// .git and *.log never do).
    #[arg(long, value_name = "GLOB", alias = "ignore-watch")]
    watch_ignore: Option<Vec<String>>,
    /// Quiet time after the last change before the reload [default: 1s].
    #[arg(long, value_name = "DUR")]
    watch_delay: Option<Dur>,
    /// Rolling reload at the times of a cron pattern, local time (PM2's
    /// --cron-restart): "0 3 * * *" is every day at 03:00.
    #[arg(long, value_name = "PATTERN", alias = "cron")]
    cron_restart: Option<CronSpec>,
    /// Admin listener for the web dashboard (/), /metrics (Prometheus) and /status:
    /// ADDR, off by default; a non-loopback ADDR needs --admin-token.
    #[arg(long, value_name = "ADDR")]
    admin: Option<ListenAddr>,
    /// Bearer token the admin listener requires (or HERD_ADMIN_TOKEN).
    #[arg(long, value_name = "TOKEN", env = "HERD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Serve /metrics without the token (the rest still needs it).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    admin_public_metrics: Option<bool>,
    /// Log each request (each connection with --protocol tcp) to FILE, or `-` for stdout.
    #[arg(long, value_name = "FILE|-")]
    access_log: Option<PathBuf>,
    /// The access log's format: nginx's `combined`, or `json` [default: combined].
    #[arg(long, value_enum, value_name = "FORMAT")]
    access_log_format: Option<AccessLogFormat>,
    /// Write herd's log and worker output to FILE instead of stdout/stderr.
    #[arg(short = 'l', long, value_name = "FILE", alias = "log")]
    log_file: Option<PathBuf>,
    /// Also write the workers' stdout to FILE, as they print it (PM2's --output and
    /// out_file); /dev/null keeps it out of the log as well.
    #[arg(short = 'o', long, value_name = "FILE", alias = "out-file")]
    output: Option<PathBuf>,
    /// Also write the workers' stderr to FILE (PM2's --error and error_file); /dev/null
    /// keeps it out of the log as well.
    #[arg(short = 'e', long, value_name = "FILE", alias = "error-file")]
    error: Option<PathBuf>,
    /// Keep the workers' output nowhere, not even in herd's log (PM2's
    /// --disable-logs): --output and --error default to /dev/null.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    disable_logs: Option<bool>,
    /// Run the workers as this user (a name or a uid; PM2's --uid and
    /// --user), with its primary group, its HOME and no supplementary
    /// groups. Only root can: the master stays root, as nginx's does.
    #[arg(long, value_name = "USER", alias = "uid")]
    user: Option<String>,
    /// With --user: the workers' group instead of the user's own (a name
    /// or a gid; PM2's --gid).
    #[arg(long, value_name = "GROUP", alias = "gid")]
    group: Option<String>,
    /// Begin each line of --output and --error with its time (PM2's --time; the log
    /// always has it).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    time: Option<bool>,
    /// The time before each line of --output and --error in a moment.js format, in local
    /// time, as PM2's --log-date-format (`YYYY-MM-DD HH:mm:ss Z`); implies --time.
    #[arg(long, value_name = "FORMAT")]
    log_date_format: Option<String>,
    /// `json`: write each line of --output and --error as PM2's JSON object (message,
    /// timestamp, type, process_id, app_name), as PM2's --log-type json [default: raw].
    #[arg(long, value_enum, value_name = "TYPE")]
    log_type: Option<LogType>,
    /// Rotate the log file past this size [default: 10M].
    #[arg(long, value_name = "SIZE")]
    log_max_size: Option<Size>,
    /// Rotated log files kept (FILE.1 … FILE.N) [default: 3].
    #[arg(long, value_name = "N")]
    log_keep: Option<u32>,
    /// Working directory of the workers.
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Give each worker NAME = its value (from --env or the environment, else 0) plus
    /// the worker's id, as PM2's increment_var does.
    #[arg(long, value_name = "NAME")]
    increment_var: Option<String>,
    /// The variable that carries the worker's id besides HERD_WORKER_ID
    /// [default: NODE_APP_INSTANCE], as PM2's instance_var (node-config reads
    /// NODE_APP_INSTANCE for a file per instance).
    #[arg(long, value_name = "NAME")]
    instance_var: Option<String>,
    /// Extra environment for the workers, KEY=VAL (repeatable; `[env]` in the file).
    #[arg(long = "env", value_name = "KEY=VAL")]
    #[serde(default, deserialize_with = "env_table")]
    env: Vec<EnvPair>,
    /// Balancing strategy: round-robin, weighted, least-conn, random2, ewma,
    /// ip-hash, hash:header:NAME, hash:cookie:NAME, hash:sni (--protocol tcp) [default: round-robin].
    #[arg(long, value_name = "STRATEGY")]
    #[serde(default, deserialize_with = "strategy")]
    balance: Option<StrategyKind>,
    /// What the proxy speaks: `http` balances per request, `tcp` per connection [default: http].
    #[arg(long, value_enum)]
    protocol: Option<Protocol>,
    /// Each client connection begins with a PROXY protocol header (v1 or v2) from a
    /// load balancer in front (HAProxy's `send-proxy`, nginx's `proxy_protocol`, AWS NLB),
    /// whose client address herd uses; one without it is closed. `=CIDR,…`: only
    /// connections from those addresses do; others are clients themselves [default: false].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL|CIDR,…")]
    accept_proxy: Option<AcceptProxy>,
    /// A balancer in front whose word on the client's address herd takes: ADDR or
    /// ADDR/LEN (repeatable or comma-separated); a request from it names the client in
    /// --real-ip-header, as nginx's set_real_ip_from [default: none].
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    real_ip_from: Option<Vec<TrustedNet>>,
    /// Requests per client address, N/s or N/m, with ,burst=N at once [default: a
    /// second's worth]; more get a 429 with Retry-After (nginx's limit_req) [default: none].
    #[arg(long, value_name = "N/s[,burst=N]")]
    rate_limit: Option<RateLimit>,
    /// Where a request from --real-ip-from names its client: X-Forwarded-For,
    /// Forwarded (its for=), X-Real-IP, CF-Connecting-IP, … [default: X-Forwarded-For].
    #[arg(long, value_name = "NAME")]
    real_ip_header: Option<String>,
    /// With --protocol tcp: begin each connection to a backend with a PROXY protocol
    /// header naming the client, `v1` (text) or `v2` (binary) [default: none; alone: v1].
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "v1", value_name = "VERSION")]
    send_proxy: Option<SendProxy>,
    /// A remote backend: ADDR[,weight=N][,max_fails=N][,fail_timeout=DUR][,max_conns=N][,backup],
    /// ADDR being HOST:PORT or unix:PATH (repeatable; `upstream = [...]` in the file).
    #[arg(long = "upstream", value_name = "SPEC")]
    #[serde(rename = "upstream")]
    upstreams: Option<Vec<UpstreamSpec>>,
    /// Backends from DNS: NAME:PORT, each A/AAAA record one backend, resolved again
    /// on the records' TTL; `,weight=N` etc. as for --upstream (repeatable).
    #[arg(long, value_name = "NAME:PORT")]
    upstream_dns: Option<Vec<Discovery>>,
    /// Backends from a DNS SRV record: _SERVICE._PROTO.NAME, with its ports and weights;
    /// the lowest priority serves, the others are backups (repeatable).
    #[arg(long, value_name = "_SVC._PROTO.NAME")]
    upstream_srv: Option<Vec<String>>,
    /// DNS server for --upstream-dns and --upstream-srv: IP or IP:PORT [default: /etc/resolv.conf's].
    #[arg(long, value_name = "ADDR")]
    resolver: Option<String>,
    /// TLS: a PEM certificate chain for --listen (repeatable, paired in order with
    /// --tls-key; the first pair is the default, the others are picked by SNI).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<Vec<PathBuf>>,
    /// The PEM private key of each --tls-cert, in the same order.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<Vec<PathBuf>>,
    /// With TLS: a client without SNI, or naming no certificate's host, gets an
    /// alert instead of the first pair.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    tls_strict_sni: Option<bool>,
    /// With TLS: accept only clients that present a certificate signed by one of
    /// these CA certificates (PEM), as nginx's `ssl_verify_client on`.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: a client may also come without a certificate (nginx's
    /// `ssl_verify_client optional`); one it presents must still be valid.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    tls_client_optional: Option<bool>,
    /// With --tls-client-ca: certificate revocation lists (PEM, one per CA of the
    /// chain) that refuse revoked client certificates, as nginx's `ssl_crl`.
    #[arg(long, value_name = "FILE")]
    tls_client_crl: Option<PathBuf>,
    /// With TLS: also listen on ADDR (or PORT) for plain HTTP and answer 301 to https://.
    #[arg(long, value_name = "ADDR")]
    redirect_http: Option<ListenAddr>,
    /// CA certificates (PEM) that upstreams marked `tls` are checked against
    /// [default: the system's].
    #[arg(long, value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM, one per CA of the chain) that refuse
    /// upstreams with revoked certificates, as nginx's `proxy_ssl_crl`.
    #[arg(long, value_name = "FILE")]
    upstream_crl: Option<PathBuf>,
    /// A client certificate chain (PEM) that herd presents to upstreams marked
    /// `tls` that ask for one, with --upstream-key (nginx's proxy_ssl_certificate).
    #[arg(long, value_name = "FILE")]
    upstream_cert: Option<PathBuf>,
    /// The PEM private key of --upstream-cert.
    #[arg(long, value_name = "FILE")]
    upstream_key: Option<PathBuf>,
    /// What the workers speak on their port: `h1` (HTTP/1.1) or `h2` (HTTP/2 with
    /// prior knowledge, h2c) [default: h1].
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    backend_protocol: Option<BackendProtocol>,
    /// How the proxy reaches its workers: `tcp`, the loopback port in PORT;
    /// `unix`, a Unix socket whose path is in HERD_SOCKET (cheaper per
    /// request); `auto`, the socket for a worker that listens there (herd's
    /// Node preload and herd-sdk do), else the port [default: auto].
    #[arg(long, value_enum, value_name = "KIND")]
    worker_socket: Option<WorkerSocket>,
    /// Proxy mode: the most requests (connections with --protocol tcp) each
    /// worker holds at once, as an upstream's max_conns; the others wait for
    /// room up to --connect-timeout, then get a 503 [default: no limit].
    #[arg(long, value_name = "N")]
    worker_max_conns: Option<u32>,
    /// Redis for messages across hosts (redis://[:PASSWORD@]HOST[:PORT][/DB]): the
    /// workers of clusters of this name on every host share broadcasts and `send HOST/ID`.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// This host's name among the hosts sharing --redis [default: the machine's hostname].
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,
    /// Active health check: `GET PATH` must answer 2xx/3xx [default: a TCP connect].
    #[arg(long, value_name = "PATH")]
    health_path: Option<String>,
    /// Time between health checks; 0 turns them off [default: 2s].
    #[arg(long, value_name = "DUR")]
    health_interval: Option<Dur>,
    /// Time a health check may take [default: 1s].
    #[arg(long, value_name = "DUR")]
    health_timeout: Option<Dur>,
    /// Passed checks in a row that bring a backend back [default: 2].
    #[arg(long, value_name = "N")]
    health_rise: Option<u32>,
    /// Failed checks in a row that take a backend out [default: 3].
    #[arg(long, value_name = "N")]
    health_fall: Option<u32>,
    /// Time to connect to a backend [default: 5s].
    #[arg(long, value_name = "DUR")]
    connect_timeout: Option<Dur>,
    /// Time for a backend to start answering a request, and between two reads of its
    /// answer [default: 60s].
    #[arg(long, value_name = "DUR")]
    response_timeout: Option<Dur>,
    /// Time for a client to send a request head once begun (then 408) [default: 10s].
    #[arg(long, value_name = "DUR")]
    header_timeout: Option<Dur>,
    /// Time a keep-alive client connection may sit idle [default: 60s].
    #[arg(long, value_name = "DUR")]
    idle_timeout: Option<Dur>,
    /// Largest request head (request line + headers), e.g. 16k (then 431) [default: 16k].
    #[arg(long, value_name = "SIZE")]
    max_header_size: Option<Size>,
    /// Most request headers (then 431), at most 32767 [default: 100].
    #[arg(long, value_name = "N")]
    max_headers: Option<usize>,
    /// Largest request body, e.g. 10M (then 413, as nginx's `client_max_body_size`);
    /// 0 for none [default: none].
    #[arg(long, value_name = "SIZE")]
    max_body_size: Option<SizeOrZero>,
    /// Read a request body of up to SIZE whole before picking a backend, so a slow
    /// upload holds herd's memory rather than a worker (nginx's `proxy_request_buffering`,
    /// HAProxy's `http-buffer-request`); larger bodies stream; 0 streams all [default: 64k].
    #[arg(long, value_name = "SIZE")]
    request_buffer: Option<SizeOrZero>,
    /// Preload herd's Node module (NODE_OPTIONS=--require) even though the
    /// command is not `node` itself (e.g. a script with a `#!` line); `=false`
    /// turns it off, and herd's Python and Perl preloads too [default: on when
    /// the command is node].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    node_shim: Option<bool>,
    /// The server program and its arguments (put them after `--`); `$PORT` and
    /// `$HERD_WORKER_ID` in its arguments become each worker's values.
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    #[serde(default, deserialize_with = "command_words")]
    command: Option<Vec<OsString>>,
}

/// `[env]` in the file: a table of strings.
fn env_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<EnvPair>, D::Error> {
    let t = BTreeMap::<String, String>::deserialize(d)?;
    Ok(t.into_iter().map(|(k, v)| EnvPair(k, v)).collect())
}

/// `command = ["node", "server.js"]` in the file.
fn command_words<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<OsString>>, D::Error> {
    let words = Vec::<String>::deserialize(d)?;
    Ok(Some(words.into_iter().map(OsString::from).collect()))
}

fn strategy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<StrategyKind>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// A TOML error's message on one line; for a misspelt key, the nearest
/// key herd knows (as clap suggests a flag) instead of every one of them.
pub(crate) fn toml_message(e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    if let Some(said) = out_of_range(&message) {
        return said;
    }
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((key, known)) = rest.split_once("`, expected one of ") else {
        return message;
    };
    let nearest = known
        .split(", ")
        .map(|k| k.trim_matches('`'))
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match nearest {
        Some((_, k)) => format!("unknown key `{key}`; did you mean `{k}`?"),
        None => format!(
            "unknown key `{key}` (the keys are herd run's long options without their dashes: `kill-timeout`, `instances`…)"
        ),
    }
}

/// An integer past 64 bits reaches serde as an `i128` no field takes, and
/// serde says so in its own terms ("invalid type: integer `N` as i128,
/// expected any value"): said plainly instead.
fn out_of_range(message: &str) -> Option<String> {
    let rest = message.strip_prefix("invalid type: integer `")?;
    let (n, expected) = rest.split_once("` as i128, expected ")?;
    Some(match expected {
        "any value" => format!("integer `{n}` is out of range (TOML's integers are 64-bit)"),
        _ => format!(
            "integer `{n}` is out of range (TOML's integers are 64-bit; expected {expected})"
        ),
    })
}

impl Options {
    /// Reads a `herd.toml`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => {
                let (line, col) = line_col(text, span.start);
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    line,
                    col,
                    message: toml_message(&e),
                }
            }
            None => ConfigError::ParseNoSpan {
                path: path.to_path_buf(),
                message: toml_message(&e),
            },
        })
    }

    /// The config file's options: `--config FILE` (which must exist),
    /// else `./herd.toml` when present; of app `app` when the file holds
    /// several. Also the warning for keys herd ignores, and the file used.
    pub fn load(
        explicit: Option<&Path>,
        app: Option<&str>,
        profile: Option<&str>,
    ) -> Result<(Self, Option<String>, Option<PathBuf>), ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from("herd.toml");
                if !p.is_file() {
                    if let Some(profile) = profile {
                        return Err(ConfigError::Profile(profile.to_string()));
                    }
                    if let Some(app) = app {
                        return Err(ConfigError::NoSuchApp {
                            app: app.to_string(),
                            path: "(no config file)".into(),
                            names: String::new(),
                        });
                    }
                    return Ok((Options::default(), None, None));
                }
                p
            }
        };
        if !path.is_file() {
            // The read names the path and why.
            std::fs::read(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
        }
        let (opts, warning) = apps::select(&path, app, profile)?;
        let full = path.canonicalize().unwrap_or(path);
        Ok((opts, warning, Some(full)))
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A set of exit codes (0 to 255), kept in four words so that the policy
/// stays `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCodes([u64; 4]);

impl ExitCodes {
    pub fn of(codes: &[u8]) -> ExitCodes {
        let mut set = ExitCodes::default();
        for &c in codes {
            set.0[usize::from(c / 64)] |= 1 << (c % 64);
        }
        set
    }

    pub fn contains(&self, code: i32) -> bool {
        u8::try_from(code).is_ok_and(|c| self.0[usize::from(c / 64)] & (1 << (c % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
}

/// Everything the master needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    /// Whether the name was given (`--name`/`name =`) rather than derived.
    pub name_given: bool,
    pub listen: SocketAddr,
    /// No port was given (`--listen`, the file, `$PORT`) for a Node app in
    /// proxy mode: herd serves it on the port its own `listen()` names, as
    /// PM2's cluster mode does, and binds only once the first worker said
    /// which (`listen` is the fallback when it names none). A Python script
    /// is served so too, with herd's Python preload.
    pub port_from_app: bool,
    pub instances: usize,
    pub mode: Mode,
    pub kill_timeout: Duration,
    /// `--kill-signal`: what stops a worker (then SIGKILL after `kill_timeout`);
    /// none: only the shutdown message on its channel.
    pub kill_signal: Option<nix::sys::signal::Signal>,
    pub drain_timeout: Duration,
    pub ready_timeout: Duration,
    pub wait_ready: bool,
    /// `--autorestart=false`: a worker that exits stays down.
    pub autorestart: bool,
    /// `--stop-exit-codes`: a worker that exits with one of these stays down.
    pub stop_exit_codes: ExitCodes,
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
    /// `--accept-proxy`: which connections begin with a PROXY protocol header.
    pub accept_proxy: AcceptProxy,
    /// `--send-proxy`: TCP mode's backend connections begin with one.
    pub send_proxy: Option<SendProxy>,
    pub upstreams: Vec<UpstreamSpec>,
    /// `--upstream-dns` and `--upstream-srv`: what to resolve, and how often.
    pub discovery: Vec<Discovery>,
    /// `--resolver`, else the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// `--redis`: messages and status shared with the other hosts.
    pub redis: Option<RedisConfig>,
    /// `--tls-cert`/`--tls-key`: the listener speaks TLS.
    pub tls: Option<TlsConfig>,
    /// `--backend-protocol h2`: workers speak h2c.
    pub workers_h2: bool,
    /// `--worker-socket`: how the proxy reaches its workers.
    pub worker_socket: WorkerSocket,
    /// `--worker-max-conns`: each worker's `max_conns` (0: no limit).
    pub worker_max_conns: u32,
    /// `--upstream-ca`, absolute.
    pub upstream_ca: Option<PathBuf>,
    /// `--upstream-crl`, absolute.
    pub upstream_crl: Option<PathBuf>,
    /// `--upstream-cert` and `--upstream-key`, absolute.
    pub upstream_client: Option<TlsPair>,
    pub health: HealthConfig,
    pub http: HttpConfig,
    pub connect_timeout: Duration,
    pub max_memory: Option<u64>,
    pub watchdog: Option<Duration>,
    pub admin: Option<AdminConfig>,
    pub access_log: Option<AccessLogConfig>,
    /// `--watch`, absolute.
    pub watch: Vec<PathBuf>,
    pub watch_ignore: Vec<String>,
    pub watch_delay: Duration,
    /// `--cron-restart`: a rolling reload at each of its times.
    pub cron_restart: Option<CronSpec>,
    /// `--log-file`, with its rotation size and how many old files to keep.
    pub log_file: Option<PathBuf>,
    /// `--output` and `--error`, absolute, with `--time` (and its
    /// `--log-date-format`, as a strftime format).
    pub out_file: Option<PathBuf>,
    pub error_file: Option<PathBuf>,
    pub time: bool,
    pub log_date_format: Option<String>,
    pub log_type: LogType,
    pub log_max_size: u64,
    pub log_keep: u32,
    /// Preload herd's Node module into the workers (`NODE_OPTIONS=--require`).
    pub node_shim: bool,
    /// Put herd's Python preload first on a Python command's `PYTHONPATH`
    /// (unless `--no-node-shim` or `node-shim = false` turns preloads off).
    pub python_shim: bool,
    /// In proxy, shared and reuseport modes, put it first on every worker's
    /// `PYTHONPATH` for how Python servers stop (same switches): hypercorn's
    /// spawned process stops on SIGTERM as its parent would make it stop,
    /// and in the fd modes uvicorn and hypercorn drain their clients.
    pub python_stop: bool,
    /// In the shared and reuseport modes, load herd's Perl preload into a
    /// Perl worker (`PERL5OPT`, same switches): Starman and Mojolicious'
    /// daemon then drain their clients when they stop.
    pub perl_stop: bool,
    /// `--user`: the workers' user, group and home.
    pub run_as: Option<RunAs>,
    /// `--increment-var`: NAME = its value + the worker's id.
    pub increment_var: Option<String>,
    /// `--instance-var`: where the worker's id goes besides HERD_WORKER_ID
    /// (`None`: NODE_APP_INSTANCE).
    pub instance_var: Option<String>,
    /// To log at start: keys of the config file herd ignores.
    pub warnings: Vec<String>,
    pub source: ConfigSource,
    /// The command line's options and `--no-node-shim`, to resolve again
    /// over the file (`reload --update-env`).
    pub flags: Options,
    pub no_node_shim: bool,
    /// What changed since the start (scale, promote, `--update-env`),
    /// here or in the master before this one; it lies over `flags`.
    pub relaunch: relaunch::Relaunch,
}

/// `--upstream ADDR[,weight=N][,max_fails=N][,fail_timeout=DUR][,max_conns=N][,backup]`;
/// ADDR is `HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    pub name: String,
    /// Unspecified (`0.0.0.0:0`) for one on a Unix socket.
    pub addr: SocketAddr,
    /// `unix:PATH` (nginx's `server unix:…`): its socket, made absolute.
    pub unix: Option<PathBuf>,
    pub config: BackendConfig,
    /// `,h2`: it speaks HTTP/2 (h2c, prior knowledge; over TLS, by ALPN).
    pub h2: bool,
    /// `,tls`: herd speaks TLS to it.
    pub tls: bool,
}

/// One DNS lookup whose answers are backends (`--upstream-dns`,
/// `--upstream-srv`), with the parameters every backend it gives gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovery {
    /// A host name (A/AAAA records), or an SRV name (`_svc._tcp.name`).
    pub name: String,
    /// `Some` for a host name; an SRV record gives each backend's port.
    pub port: Option<u16>,
    pub config: BackendConfig,
    /// `,h2`: the backends it gives speak HTTP/2 (h2c).
    pub h2: bool,
    /// `,tls`: herd speaks TLS to them (checked against NAME).
    pub tls: bool,
}

impl FromStr for Discovery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (head, rest) = s.split_once(',').map_or((s, ""), |(h, r)| (h, r));
        let (name, port) = head
            .rsplit_once(':')
            .ok_or_else(|| format!("{head:?}: expected NAME:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{head:?}: {port:?} is not a port"))?;
        dns_name(name).map_err(|why| format!("{head:?}: {why}"))?;
        let p = backend_params(rest)?;
        Ok(Discovery {
            name: name.to_string(),
            port: Some(port),
            config: p.config,
            h2: p.h2,
            tls: p.tls,
        })
    }
}

/// Whether `name` can be looked up at all (RFC 1035's lengths; letters,
/// digits, `-` and `_` in labels): a typo like `api..internal` is then a
/// start-up error, not a lookup that fails every few seconds forever.
fn dns_name(name: &str) -> Result<(), String> {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.is_empty() {
        return Err("no name".into());
    }
    if n.len() > 253 {
        return Err("a DNS name is at most 253 characters".into());
    }
    for label in n.split('.') {
        if label.is_empty() {
            return Err(format!("{name:?} is not a DNS name (an empty label)"));
        }
        if label.len() > 63 {
            return Err(format!(
                "{name:?} is not a DNS name (a label over 63 characters)"
            ));
        }
        if !label
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "{name:?} is not a DNS name (letters, digits, - and _ only)"
            ));
        }
    }
    Ok(())
}

/// `weight=N,max_fails=N,…,h2,tls` as an `--upstream` reads them.
fn backend_params(list: &str) -> Result<UpstreamSpec, String> {
    format!("127.0.0.1:1,{list}")
        .trim_end_matches(',')
        .parse::<UpstreamSpec>()
}

impl TryFrom<String> for Discovery {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl<'de> serde::Deserialize<'de> for Discovery {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl FromStr for UpstreamSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',').map(str::trim);
        let mut name = parts.next().unwrap_or_default().to_string();
        let (addr, unix) = match name.strip_prefix("unix:") {
            Some(path) => {
                let path = unix_upstream(path).map_err(|why| format!("{name:?}: {why}"))?;
                name = format!("unix:{}", path.display());
                (SocketAddr::from(([0, 0, 0, 0], 0)), Some(path))
            }
            None => {
                let addr = name
                    .to_socket_addrs()
                    .map_err(|e| format!("{name:?}: {e} (expected HOST:PORT or unix:PATH)"))?
                    .next()
                    .ok_or_else(|| format!("{name:?} resolves to no address"))?;
                (addr, None)
            }
        };
        let mut config = BackendConfig::default();
        let (mut h2, mut tls) = (false, false);
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
                "max_conns" => config.max_conns = num()?,
                "fail_timeout" => {
                    let d: Dur = v.parse()?;
                    config.fail_timeout = d.0.as_nanos() as u64;
                }
                "backup" if v.is_empty() => config.backup = true,
                "h2" if v.is_empty() => h2 = true,
                "tls" if v.is_empty() => tls = true,
                _ => {
                    return Err(format!(
                        "unknown upstream parameter {p:?} (weight=N, max_fails=N, fail_timeout=DUR, max_conns=N, backup, h2, tls)"
                    ));
                }
            }
        }
        if tls && unix.is_some() {
            return Err(format!(
                "{name:?}: tls is for upstreams on a port, not on a Unix socket"
            ));
        }
        Ok(UpstreamSpec {
            name,
            addr,
            unix,
            config,
            h2,
            tls,
        })
    }
}

/// The socket of a `unix:PATH` upstream, absolute (relative to the
/// directory herd starts in) and short enough to connect to.
fn unix_upstream(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("expected unix:PATH".into());
    }
    let path = std::path::absolute(path).map_err(|e| e.to_string())?;
    if path.as_os_str().len() >= crate::os::UNIX_PATH_MAX {
        return Err(format!(
            "a Unix socket path is at most 107 bytes ({} is {})",
            path.display(),
            path.as_os_str().len()
        ));
    }
    Ok(path)
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
    /// `--real-ip-from`: the balancers whose word on the client herd takes.
    pub real_ip: Option<RealIp>,
    /// `--rate-limit`: requests per client address.
    pub rate_limit: Option<RateLimit>,
}

/// How `--output` and `--error` write a line (PM2's `log_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogType {
    /// As the worker printed it.
    #[default]
    Raw,
    /// PM2's JSON object: message, timestamp, type, process_id, app_name.
    Json,
}

/// The access log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// nginx's `combined`.
    Combined,
    /// One JSON object per line, with timings and the backend.
    Json,
}

/// `--access-log`.
#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    /// `None`: stdout (`-`).
    pub path: Option<PathBuf>,
    pub format: AccessLogFormat,
    pub max_size: u64,
    pub keep: u32,
}

/// The admin listener (`--admin`).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Required as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
    /// `/metrics` without the token.
    pub public_metrics: bool,
}

/// What a client may send, and how slowly.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus headers, in bytes.
    pub max_head: usize,
    pub max_headers: usize,
    /// `--max-body-size`: the most body bytes a request may have.
    pub max_body: Option<u64>,
    /// `--request-buffer`: bodies up to this size are read whole before a
    /// backend is picked (0: none).
    pub request_buffer: usize,
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

/// The defaults, in one place (the flags' help repeats them).
mod default {
    use std::time::Duration;

    pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);
    pub const WATCH_DELAY: Duration = Duration::from_secs(1);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
    pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
    pub const RESTART_DELAY: Duration = Duration::from_millis(100);
    pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
    pub const MAX_RESTARTS: u32 = 5;
    pub const MIN_UPTIME: Duration = Duration::from_secs(1);
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
    pub const HEALTH_RISE: u32 = 2;
    pub const HEALTH_FALL: u32 = 3;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const MAX_HEADER_SIZE: usize = 16 * 1024;
    pub const REQUEST_BUFFER: usize = 64 * 1024;
    pub const MAX_HEADERS: usize = 100;
    pub const LOG_MAX_SIZE: u64 = 10 << 20;
    pub const LOG_KEEP: u32 = 3;
}

impl Settings {
    /// Whether the workers go without `PORT`, so that a Node app's
    /// `process.env.PORT || 3000` reads 3000. A Python script keeps it: one
    /// that reads `os.environ["PORT"]` would fail without it, and herd's
    /// Python preload learns a port written in the code at its bind().
    pub fn withholds_port(&self) -> bool {
        self.port_from_app && !self.python_shim
    }

    /// Whether workers are given a Unix socket to serve on (`HERD_SOCKET`):
    /// `Some(true)` if they must use it (`--worker-socket unix`),
    /// `Some(false)` if they may (`auto`: the proxy uses it for those that
    /// listen there). Proxy mode (HTTP or TCP) with HTTP/1.1 workers only,
    /// and not under `--user`, whose workers would own the path herd
    /// connects to.
    pub fn worker_unix(&self) -> Option<bool> {
        let fits = self.mode == Mode::Proxy && !self.workers_h2 && self.run_as.is_none();
        match self.worker_socket {
            WorkerSocket::Tcp => None,
            _ if !fits => None,
            WorkerSocket::Auto => Some(false),
            WorkerSocket::Unix => Some(true),
        }
    }

    /// Validates `flags` layered over the config file (`config`, else
    /// `./herd.toml` when present). `no_node_shim` is `--no-node-shim`.
    pub fn resolve(
        flags: Options,
        from: &ConfigSource,
        no_node_shim: bool,
    ) -> Result<Settings, ConfigError> {
        let (file, warning, config) = Options::load(
            from.config.as_deref(),
            from.app.as_deref(),
            from.profile.as_deref(),
        )?;
        let given = flags.clone();
        let mut o = flags.over(file);
        o.cwd = o.cwd.map(|p| home_path(&p));
        for f in [&mut o.log_file, &mut o.output, &mut o.error] {
            *f = f.take().map(|p| log_path(&p));
        }
        if o.disable_logs == Some(true) {
            o.output.get_or_insert_with(|| PathBuf::from("/dev/null"));
            o.error.get_or_insert_with(|| PathBuf::from("/dev/null"));
        }
        let command = one_line(o.command.unwrap_or_default(), o.cwd.as_deref());
        script_exists(&command, o.cwd.as_deref())?;
        let command = with_interpreter(command, o.cwd.as_deref());
        let upstreams = o.upstreams.unwrap_or_default();
        let mut discovery = o.upstream_dns.unwrap_or_default();
        for srv in o.upstream_srv.unwrap_or_default() {
            let (name, rest) = srv
                .split_once(',')
                .map_or((srv.as_str(), ""), |(h, r)| (h, r));
            if !name.starts_with('_') {
                return Err(ConfigError::BadSrv(srv.clone()));
            }
            dns_name(name).map_err(ConfigError::BadSrvName)?;
            let p = backend_params(rest).map_err(|e| ConfigError::BadSrv(format!("{srv}: {e}")))?;
            discovery.push(Discovery {
                name: name.to_string(),
                port: None,
                config: p.config,
                h2: p.h2,
                tls: p.tls,
            });
        }
        let resolver = match o.resolver {
            None => None,
            Some(r) => Some(
                r.parse::<SocketAddr>()
                    .or_else(|_| {
                        r.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| ConfigError::BadResolver(r.clone()))?,
            ),
        };
        let workers_h2 = o.backend_protocol == Some(BackendProtocol::H2);
        if workers_h2
            && (o.mode.is_some_and(|m| m != Mode::Proxy) || o.protocol == Some(Protocol::Tcp))
        {
            return Err(ConfigError::H2NeedsHttp);
        }
        let worker_socket = o.worker_socket.unwrap_or(WorkerSocket::Auto);
        if worker_socket == WorkerSocket::Unix
            && (o.mode.is_some_and(|m| m != Mode::Proxy) || workers_h2)
        {
            return Err(ConfigError::UnixNeedsHttp);
        }
        let tls = match (o.tls_cert, o.tls_key) {
            (None, None)
                if o.redirect_http.is_some()
                    || o.tls_strict_sni.is_some()
                    || o.tls_client_ca.is_some()
                    || o.tls_client_optional.is_some()
                    || o.tls_client_crl.is_some() =>
            {
                return Err(ConfigError::RedirectWithoutTls);
            }
            (None, None) => None,
            (certs, keys) => {
                let (certs, keys) = (certs.unwrap_or_default(), keys.unwrap_or_default());
                if certs.len() != keys.len() || certs.is_empty() {
                    return Err(ConfigError::TlsPairs {
                        certs: certs.len(),
                        keys: keys.len(),
                    });
                }
                if o.mode.is_some_and(|m| m != Mode::Proxy) || o.protocol == Some(Protocol::Tcp) {
                    return Err(ConfigError::TlsNeedsHttp);
                }
                let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
                Some(TlsConfig {
                    pairs: certs
                        .into_iter()
                        .zip(keys)
                        .map(|(cert, key)| TlsPair {
                            cert: abs(cert),
                            key: abs(key),
                        })
                        .collect(),
                    redirect: o.redirect_http.map(|a| a.0),
                    strict_sni: o.tls_strict_sni.unwrap_or(false),
                    client_optional: match (&o.tls_client_ca, o.tls_client_optional) {
                        (None, Some(_)) => return Err(ConfigError::OptionalWithoutCa),
                        (_, optional) => optional.unwrap_or(false),
                    },
                    client_crl: match (&o.tls_client_ca, o.tls_client_crl) {
                        (None, Some(_)) => return Err(ConfigError::CrlWithoutCa),
                        (_, crl) => crl.map(abs),
                    },
                    client_ca: o.tls_client_ca.map(abs),
                })
            }
        };
        let upstream_client = match (o.upstream_cert, o.upstream_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsPair {
                cert: std::path::absolute(&cert).unwrap_or(cert),
                key: std::path::absolute(&key).unwrap_or(key),
            }),
            _ => return Err(ConfigError::UpstreamPair),
        };
        let redis = match (o.redis, o.host_name) {
            (None, Some(_)) => return Err(ConfigError::HostNameWithoutRedis),
            (None, None) => None,
            (Some(url), host) => Some(RedisConfig::new(url, host)?),
        };
        if command.first().is_none_or(|c| c.is_empty())
            && upstreams.is_empty()
            && discovery.is_empty()
        {
            return Err(ConfigError::NoCommand);
        }
        let mode = o.mode.unwrap_or(Mode::Proxy);
        let balance = o.balance;
        let protocol = o.protocol;
        if balance == Some(StrategyKind::SniHash) && protocol != Some(Protocol::Tcp) {
            return Err(ConfigError::SniNeedsTcp);
        }
        if o.send_proxy.is_some() && protocol != Some(Protocol::Tcp) {
            return Err(ConfigError::SendProxyNeedsTcp);
        }
        if o.rate_limit.is_some() && protocol == Some(Protocol::Tcp) {
            return Err(ConfigError::NeedsHttp("--rate-limit"));
        }
        let real_ip = match (o.real_ip_from.as_deref(), o.real_ip_header.as_deref()) {
            (None | Some([]), Some(_)) => return Err(ConfigError::RealIpHeaderAlone),
            (None | Some([]), None) => None,
            (Some(_), _) if protocol == Some(Protocol::Tcp) => {
                return Err(ConfigError::NeedsHttp("--real-ip-from"));
            }
            (Some(from), header) => {
                let header = header.unwrap_or("X-Forwarded-For").trim();
                if !is_token(header) {
                    return Err(ConfigError::BadRealIpHeader(header.to_string()));
                }
                Some(RealIp::new(from.iter().map(|n| n.0).collect(), header))
            }
        };
        if mode != Mode::Proxy {
            if !upstreams.is_empty() {
                return Err(ConfigError::NeedsProxy("--upstream"));
            }
            if !discovery.is_empty() {
                return Err(ConfigError::NeedsProxy("--upstream-dns and --upstream-srv"));
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
            if o.accept_proxy.as_ref().is_some_and(AcceptProxy::is_on) {
                return Err(ConfigError::NeedsProxy("--accept-proxy"));
            }
            if o.real_ip_from.is_some() {
                return Err(ConfigError::NeedsProxy("--real-ip-from"));
            }
            if o.rate_limit.is_some() {
                return Err(ConfigError::NeedsProxy("--rate-limit"));
            }
            if o.worker_max_conns.is_some() {
                return Err(ConfigError::NeedsProxy("--worker-max-conns"));
            }
        }
        let cwd = o.cwd;
        if let Some(dir) = &cwd
            && !dir.is_dir()
        {
            return Err(ConfigError::BadCwd(dir.clone()));
        }
        let watch = o.watch.unwrap_or_default();
        let base = match &cwd {
            Some(dir) => dir.clone(),
            None => std::env::current_dir().unwrap_or_default(),
        };
        let watch = watch
            .into_iter()
            .map(|p| {
                let full = base.join(&p);
                full.canonicalize().map_err(|_| ConfigError::BadWatch(p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let watch_ignore = o.watch_ignore.unwrap_or_default();
        for g in &watch_ignore {
            globset::Glob::new(g).map_err(|e| ConfigError::BadGlob {
                pattern: g.clone(),
                message: e.kind().to_string(),
            })?;
        }
        let env: Vec<(String, String)> = o.env.into_iter().map(|EnvPair(k, v)| (k, v)).collect();
        let program = program_of(&command, cwd.as_deref(), &env)?;
        // npm's Node would read the connections herd sends on Node's IPC
        // channel, and its child would never get them: a crash loop.
        if mode == Mode::Dispatch
            && let Some(manager) = package_manager(&program)
        {
            return Err(ConfigError::ManagerInDispatch(manager.to_string()));
        }
        let bun = runs_bun(&program);
        if bun && matches!(mode, Mode::Shared | Mode::Reuseport | Mode::Dispatch) {
            return Err(ConfigError::BunNeedsProxy(mode.as_str()));
        }
        let node_shim = match (no_node_shim, o.node_shim) {
            (true, _) => false,
            (_, Some(on)) => on,
            _ => bun || runs_node(&program) || runs_node_script(&program, &command, cwd.as_deref()),
        };
        // `--no-node-shim` and `node-shim = false` turn every preload off.
        let preloads_on = !no_node_shim && o.node_shim != Some(false);
        let python_shim = preloads_on
            && crate::python::is_python(&program)
            && crate::python::runs_script(&command);
        if !watch.is_empty() && command.is_empty() {
            return Err(ConfigError::WatchWithoutCommand);
        }
        let run_as = run_as(o.user.as_deref(), o.group.as_deref())?;
        if worker_socket == WorkerSocket::Unix && run_as.is_some() {
            // Workers of another user would own the path herd connects to,
            // and could point it at any socket the master may reach.
            return Err(ConfigError::UnixWithUser);
        }
        let name_given = o.name.is_some();
        let name = match o.name {
            Some(n) => validate_name(n)?,
            None if command.is_empty() => "lb".to_string(),
            None => derive_name(&command),
        };
        if o.increment_var.as_deref() == Some("PORT") && mode == Mode::Proxy {
            return Err(ConfigError::IncrementPort);
        }
        if mode == Mode::Fork && o.listen.is_some() {
            return Err(ConfigError::ListenInFork);
        }
        // Fork mode runs programs that are not a cluster's workers by nature
        // (a scheduler must not run twice): one unless asked, as in PM2.
        let default_instances = match mode {
            Mode::Fork => Instances::Count(1),
            _ => Instances::Max,
        };
        let instances = match o.instances.unwrap_or(default_instances) {
            _ if command.is_empty() => 0,
            Instances::Max => crate::os::cpus::usable(),
            Instances::Count(n) => n,
            Instances::AllBut(k) => crate::os::cpus::usable().saturating_sub(k).max(1),
        };
        // Time-outs that cannot be none: each would end at once what it
        // times (HAProxy reads 0 as no time-out, nginx's keepalive_timeout as
        // no keep-alive; herd says so rather than guess).
        for (v, flag, why, default) in [
            (
                o.ready_timeout,
                "ready-timeout",
                "every worker would be killed before it could listen",
                default::READY_TIMEOUT,
            ),
            (
                o.connect_timeout,
                "connect-timeout",
                "no backend could be connected to",
                default::CONNECT_TIMEOUT,
            ),
            (
                o.response_timeout,
                "response-timeout",
                "no backend's answer could be waited for",
                default::RESPONSE_TIMEOUT,
            ),
            (
                o.header_timeout,
                "header-timeout",
                "a request head arriving in pieces would get 408",
                default::HEADER_TIMEOUT,
            ),
            (
                o.idle_timeout,
                "idle-timeout",
                "keep-alive connections would close under their clients, and a pausing upload get 408",
                default::IDLE_TIMEOUT,
            ),
            (
                o.health_timeout,
                "health-timeout",
                "every health check would fail (--health-interval 0 turns them off)",
                default::HEALTH_TIMEOUT,
            ),
        ] {
            if v.is_some_and(|d| d.0.is_zero()) {
                return Err(ConfigError::ZeroTimeout { flag, why, default });
            }
        }
        let d = |v: Option<Dur>, default: Duration| v.map_or(default, |d| d.0);
        let ready_timeout = d(o.ready_timeout, default::READY_TIMEOUT);
        let connect_timeout = d(o.connect_timeout, default::CONNECT_TIMEOUT);
        let health = HealthConfig {
            path: o.health_path,
            interval: d(o.health_interval, default::HEALTH_INTERVAL),
            timeout: d(o.health_timeout, default::HEALTH_TIMEOUT),
            rise: o.health_rise.unwrap_or(default::HEALTH_RISE).max(1),
            fall: o.health_fall.unwrap_or(default::HEALTH_FALL).max(1),
        };
        // Each proxy thread holds room for that many parsed headers; with
        // none, every request that has a header (all but HTTP/1.0's) is a 431.
        if let Some(n) = o.max_headers.filter(|&n| n == 0 || n > MAX_HEADERS) {
            return Err(ConfigError::TooManyHeaders(n));
        }
        let http = HttpConfig {
            connect_timeout,
            response_timeout: d(o.response_timeout, default::RESPONSE_TIMEOUT),
            limits: Limits {
                max_head: o.max_header_size.map_or(default::MAX_HEADER_SIZE, |s| s.0),
                max_headers: o.max_headers.unwrap_or(default::MAX_HEADERS),
                max_body: o.max_body_size.map(|s| s.0 as u64).filter(|&n| n > 0),
                request_buffer: o.request_buffer.map_or(default::REQUEST_BUFFER, |s| s.0),
                header_timeout: d(o.header_timeout, default::HEADER_TIMEOUT),
                idle_timeout: d(o.idle_timeout, default::IDLE_TIMEOUT),
            },
            wait_for_backend: ready_timeout,
            real_ip,
            rate_limit: o.rate_limit,
        };
        let admin = match o.admin {
            Some(ListenAddr(addr)) if !addr.ip().is_loopback() && o.admin_token.is_none() => {
                return Err(ConfigError::AdminNeedsToken(addr));
            }
            Some(ListenAddr(addr)) => Some(AdminConfig {
                addr,
                token: o.admin_token.filter(|t| !t.is_empty()),
                public_metrics: o.admin_public_metrics.unwrap_or(false),
            }),
            None => None,
        };
        Ok(Settings {
            name,
            name_given,
            port_from_app: mode == Mode::Proxy
                && (node_shim || python_shim)
                && !command.is_empty()
                && o.listen.is_none()
                && tls.is_none()
                && std::env::var_os("PORT").is_none_or(|p| p.is_empty()),
            // Fork mode: unused, and a $PORT meant for the program is not herd's.
            listen: match mode {
                Mode::Fork => DEFAULT_LISTEN,
                _ => listen_default(o.listen)?,
            },
            instances,
            mode,
            kill_timeout: d(o.kill_timeout, default::KILL_TIMEOUT),
            kill_signal: o
                .kill_signal
                .map_or(Some(nix::sys::signal::Signal::SIGTERM), |k| k.0),
            drain_timeout: d(o.drain_timeout, default::DRAIN_TIMEOUT),
            ready_timeout,
            wait_ready: o.wait_ready.unwrap_or(false),
            autorestart: o.autorestart.unwrap_or(true),
            stop_exit_codes: ExitCodes::of(&o.stop_exit_codes.unwrap_or_default()),
            restart_delay: d(o.restart_delay, default::RESTART_DELAY),
            max_restart_delay: d(o.max_restart_delay, default::MAX_RESTART_DELAY),
            max_restarts: o.max_restarts.unwrap_or(default::MAX_RESTARTS),
            min_uptime: d(o.min_uptime, default::MIN_UPTIME),
            cwd,
            env,
            command,
            program,
            balance: balance.unwrap_or(StrategyKind::RoundRobin),
            protocol: protocol.unwrap_or(Protocol::Http),
            accept_proxy: o.accept_proxy.unwrap_or_default(),
            send_proxy: o.send_proxy,
            upstreams,
            discovery,
            resolver,
            redis,
            tls,
            workers_h2,
            worker_socket,
            worker_max_conns: o.worker_max_conns.unwrap_or(0),
            upstream_ca: o.upstream_ca.map(|p| std::path::absolute(&p).unwrap_or(p)),
            upstream_crl: o.upstream_crl.map(|p| std::path::absolute(&p).unwrap_or(p)),
            upstream_client,
            health,
            http,
            connect_timeout,
            max_memory: o.max_memory.map(|s| s.0 as u64),
            watchdog: o.watchdog.map(|d| d.0).filter(|d| !d.is_zero()),
            admin,
            access_log: o.access_log.map(|p| AccessLogConfig {
                path: (p.as_os_str() != "-").then_some(p),
                format: o.access_log_format.unwrap_or(AccessLogFormat::Combined),
                max_size: o.log_max_size.map_or(default::LOG_MAX_SIZE, |s| s.0 as u64),
                keep: o.log_keep.unwrap_or(default::LOG_KEEP),
            }),
            watch,
            watch_ignore,
            watch_delay: d(o.watch_delay, default::WATCH_DELAY),
            cron_restart: o.cron_restart,
            log_file: o.log_file,
            out_file: o.output.map(|p| std::path::absolute(&p).unwrap_or(p)),
            error_file: o.error.map(|p| std::path::absolute(&p).unwrap_or(p)),
            time: o.time.unwrap_or(false) || o.log_date_format.is_some(),
            log_date_format: o.log_date_format.as_deref().map(moment::to_strftime),
            log_type: o.log_type.unwrap_or_default(),
            log_max_size: o.log_max_size.map_or(default::LOG_MAX_SIZE, |s| s.0 as u64),
            log_keep: o.log_keep.unwrap_or(default::LOG_KEEP),
            node_shim,
            python_shim,
            python_stop: preloads_on && (mode.passes_fd() || mode == Mode::Proxy),
            perl_stop: preloads_on && mode.passes_fd(),
            run_as,
            increment_var: o.increment_var,
            instance_var: o.instance_var,
            warnings: warning.into_iter().collect(),
            source: ConfigSource {
                config,
                app: from.app.clone(),
                profile: from.profile.clone(),
            },
            flags: given,
            no_node_shim,
            relaunch: Default::default(),
        })
    }
}

/// `--worker-socket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerSocket {
    Auto,
    Tcp,
    Unix,
}

/// `--backend-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    H1,
    H2,
}

/// `--tls-cert`, `--tls-key`, `--redirect-http`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// The first is the default; absolute paths.
    pub pairs: Vec<TlsPair>,
    pub redirect: Option<SocketAddr>,
    /// `--tls-strict-sni`: no default pair.
    pub strict_sni: bool,
    /// `--tls-client-ca`: clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// `--tls-client-optional`: or none at all.
    pub client_optional: bool,
    /// `--tls-client-crl`: revoked client certificates.
    pub client_crl: Option<PathBuf>,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `--redis` and `--host-name`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    pub host: String,
}

impl RedisConfig {
    fn new(url: String, host: Option<String>) -> Result<RedisConfig, ConfigError> {
        let bad = |message: String| ConfigError::BadRedis {
            url: url.clone(),
            message,
        };
        if url.starts_with("rediss://") {
            return Err(bad(
                "TLS (rediss://) is not supported; use redis:// on a private network".into(),
            ));
        }
        redis::Client::open(url.as_str()).map_err(|e| bad(e.to_string()))?;
        let host = match host {
            Some(h) => h,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
        };
        let valid = |h: &str| {
            (1..=64).contains(&h.len())
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !valid(&host) {
            return Err(ConfigError::BadHostName(host));
        }
        Ok(RedisConfig { url, host })
    }
}

/// Where the settings came from besides the flags: the config file (made
/// absolute once read), the app of it, and the ecosystem `env_NAME`.
/// `reload --update-env` reads them again.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize)]
pub struct ConfigSource {
    pub config: Option<PathBuf>,
    pub app: Option<String>,
    pub profile: Option<String>,
}

/// `--listen` (or the file's `listen`), else `$PORT` as platforms that
/// assign the port set it (Heroku, Render, Cloud Run), else 0.0.0.0:8000.
fn listen_default(given: Option<ListenAddr>) -> Result<SocketAddr, ConfigError> {
    if let Some(l) = given {
        return Ok(l.0);
    }
    match std::env::var("PORT") {
        Ok(p) if !p.trim().is_empty() => p
            .parse::<ListenAddr>()
            .map(|l| l.0)
            .map_err(|e| ConfigError::BadPort(format!("{p:?}: {e}"))),
        _ => Ok(DEFAULT_LISTEN),
    }
}

/// What one release runs: `herd run`'s command, or a `herd deploy`'s.
#[derive(Debug, Clone)]
pub struct Release {
    pub command: Vec<OsString>,
    pub program: PathBuf,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// The environment `env` adds to: the master's own, unless `herd
    /// reload --update-env` gave the caller's.
    pub base_env: Option<Vec<(OsString, OsString)>>,
}

impl Release {
    /// Resolves `command` in `cwd` as `herd run` resolves its own: a script
    /// runs with its interpreter; the program must exist and be executable.
    pub fn resolve(
        command: Vec<OsString>,
        cwd: Option<PathBuf>,
        env: Vec<(String, String)>,
    ) -> Result<Release, ConfigError> {
        if let Some(dir) = &cwd
            && !dir.is_dir()
        {
            return Err(ConfigError::BadCwd(dir.clone()));
        }
        let command = one_line(command, cwd.as_deref());
        script_exists(&command, cwd.as_deref())?;
        if command.is_empty() {
            return Err(ConfigError::NoCommand);
        }
        let command = with_interpreter(command, cwd.as_deref());
        let program = program_of(&command, cwd.as_deref(), &env)?;
        Ok(Release {
            command,
            program,
            cwd,
            env,
            base_env: None,
        })
    }

    /// Node or a Node program (`tsx`), Bun (which runs the same preload),
    /// or a package manager running a script that starts Node.
    pub fn is_node(&self) -> bool {
        runs_node(&self.program)
            || runs_bun(&self.program)
            || runs_node_script(&self.program, &self.command, self.cwd.as_deref())
    }

    /// Whether the program is Python: `python3 …`, or a console script
    /// whose `#!` line names python (`gunicorn`, `uvicorn`, `manage.py`).
    pub fn runs_python(&self) -> bool {
        self.runs(crate::python::is_python)
    }

    /// Whether the program is Bun, which only proxy and fork mode serve.
    pub fn runs_bun(&self) -> bool {
        runs_bun(&self.program)
    }

    /// Whether the program is Deno: `deno run …`, `deno serve …`, or a
    /// script whose `#!` line names deno.
    pub fn runs_deno(&self) -> bool {
        self.runs(|p| p.file_name().is_some_and(|n| n == "deno"))
    }

    /// Whether the program is Perl: `perl …`, or a script whose `#!` line
    /// names perl (`starman`, `plackup`).
    pub fn runs_perl(&self) -> bool {
        self.runs(crate::perl::is_perl)
    }

    /// Whether the program is an interpreter `is` knows, or a script whose
    /// `#!` line names one.
    fn runs(&self, is: fn(&Path) -> bool) -> bool {
        is(&self.program)
            || shebang_of(&self.program)
                .and_then(|words| words.into_iter().next())
                .is_some_and(|w| is(Path::new(&w)))
    }

    pub fn is_python(&self) -> bool {
        crate::python::is_python(&self.program)
    }
}

/// A command that starts with a script name (`app.js`) needs the script.
fn script_exists(command: &[OsString], cwd: Option<&Path>) -> Result<(), ConfigError> {
    if let Some(first) = command.first().and_then(|w| w.to_str())
        && is_script_name(first)
        && !cwd.unwrap_or(Path::new(".")).join(first).exists()
    {
        return Err(ConfigError::NoScript {
            script: first.to_string(),
            dir: shown_dir(cwd),
        });
    }
    Ok(())
}

/// What the workers get in `key`: the last `--env key=…`, else herd's own.
pub fn worker_var(env: &[(String, String)], key: &str) -> Option<OsString> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os(key))
}

/// The program `command` runs, looked up in `PATH` (the workers' own, if
/// `env` sets one), and checked.
fn program_of(
    command: &[OsString],
    cwd: Option<&Path>,
    env: &[(String, String)],
) -> Result<PathBuf, ConfigError> {
    let path_var = worker_var(env, "PATH");
    let program = match command.first() {
        Some(word) => resolve_program(word, cwd, path_var.as_deref()).map_err(|e| {
            // `herd start app.ts` with no TypeScript runner, `main.lua`…
            let path = cwd.map_or_else(|| PathBuf::from(word), |d| d.join(word));
            match e {
                ConfigError::NotFound(shown) if path.is_file() => {
                    let ts = is_typescript(&shown).then_some(
                        "; TypeScript runs with bun, tsx or ts-node (none is on PATH), or compile it and start the .js",
                    );
                    ConfigError::NoInterpreter(shown, ts.unwrap_or(""))
                }
                e => e,
            }
        })?,
        None => PathBuf::new(),
    };
    check_script(&program, command, cwd)?;
    Ok(program)
}

/// `herd start "npm run dev"`, as `pm2 start "npm run dev"`: a whole
/// command line in one word that names no file runs through `sh -c`,
/// which also expands its `$PORT`, unless it is plain words.
fn one_line(command: Vec<OsString>, cwd: Option<&Path>) -> Vec<OsString> {
    let [line] = command.as_slice() else {
        return command;
    };
    let text = line.to_string_lossy();
    let spaced = text.trim().contains(char::is_whitespace);
    let path = cwd.map_or_else(|| PathBuf::from(line), |d| d.join(line));
    if !spaced || path.exists() {
        return command;
    }
    // Plain words (`node app.js`, `python3 app.py`) are run as such, so that
    // herd's preloads see the interpreter; anything a shell would read
    // otherwise (`$PORT`, quotes, `&&`, `A=1 cmd`) goes to sh.
    let shell = |c: char| "$`'\"\\|&;<>()*?[]{}~#\n".contains(c);
    let assignment = text
        .split_whitespace()
        .next()
        .is_some_and(|w| w.contains('='));
    if !text.contains(shell) && !assignment && line.to_str().is_some() {
        return text.split_whitespace().map(OsString::from).collect();
    }
    vec!["sh".into(), "-c".into(), line.clone()]
}

/// `herd start app.js`, as `pm2 start app.js`: a script that is not an
/// executable runs with the interpreter its `#!` line names, else the one
/// its extension names. Express's `bin/www` (no extension, `#!/usr/bin/env
/// node`) runs with node even when executable, as PM2 runs it, and a
/// Python script (Django's `manage.py`) with its python: herd's preload
/// then applies, which it would not to `./bin/www` itself. Any other
/// executable file named without a `/` is the file here (`./start.sh`),
/// not a program of that name on PATH.
fn with_interpreter(mut command: Vec<OsString>, cwd: Option<&Path>) -> Vec<OsString> {
    let Some(first) = command.first() else {
        return command;
    };
    let path = cwd.map_or_else(|| PathBuf::from(first), |d| d.join(first));
    if !path.is_file() {
        return command;
    }
    let executable = matches!(check_executable(&path), Exec::Yes);
    let preloaded = |w: &OsString| is_node(Path::new(w)) || crate::python::is_python(Path::new(w));
    let interpreter = match shebang_of(&path) {
        Some(words) if !executable || words.first().is_some_and(preloaded) => {
            python3_for_python(words, std::env::var_os("PATH").as_deref())
        }
        Some(_) => Vec::new(),
        None => match interpreter_of(&path) {
            Some(i) => interpreter_words(i, []),
            None if executable => Vec::new(),
            None => return command,
        },
    };
    if interpreter.is_empty() {
        if !first.to_string_lossy().contains('/') {
            let mut here = OsString::from("./");
            here.push(first);
            command[0] = here;
        }
        return command;
    }
    command.splice(0..0, interpreter);
    command
}

/// `#!/usr/bin/env python` (Django's `manage.py`) where only `python3` is
/// installed, as on Debian without python-is-python3: python3, as PEP 394
/// allows, rather than "command not found: python".
fn python3_for_python(mut words: Vec<OsString>, path: Option<&std::ffi::OsStr>) -> Vec<OsString> {
    let found = |w: &str| resolve_program(&OsString::from(w), None, path).is_ok();
    if words.first().is_some_and(|w| w == "python") && !found("python") && found("python3") {
        words[0] = "python3".into();
    }
    words
}

/// Who the workers run as (`--user`, `--group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: PathBuf,
}

/// Looks `--user` and `--group` up (a name, else a number) in the
/// system's user and group databases.
fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, ConfigError> {
    use nix::unistd::{Gid, Group, Uid, User};
    let Some(name) = user else {
        return match group {
            Some(_) => Err(ConfigError::GroupWithoutUser),
            None => Ok(None),
        };
    };
    let by_id = || {
        name.parse()
            .ok()
            .and_then(|n| User::from_uid(Uid::from_raw(n)).ok()?)
    };
    let u = match User::from_name(name).ok().flatten().or_else(by_id) {
        Some(u) => u,
        None => return Err(ConfigError::NoSuchUser(name.to_string())),
    };
    let gid = match group {
        None => u.gid,
        Some(g) => {
            let by_id = || {
                g.parse()
                    .ok()
                    .and_then(|n| Group::from_gid(Gid::from_raw(n)).ok()?)
            };
            match Group::from_name(g).ok().flatten().or_else(by_id) {
                Some(group) => group.gid,
                None => return Err(ConfigError::NoSuchGroup(g.to_string())),
            }
        }
    };
    let me = nix::unistd::geteuid();
    if !me.is_root() && (u.uid != me || gid != nix::unistd::getegid()) {
        return Err(ConfigError::UserNeedsRoot(name.to_string()));
    }
    Ok(Some(RunAs {
        uid: u.uid.as_raw(),
        gid: gid.as_raw(),
        name: u.name,
        home: u.dir,
    }))
}

/// A path as PM2 reads its options' paths: a leading `~` is the home
/// directory (PM2's `resolveHome`), for a path written where no shell
/// expands it (a config file, `--output=~/out.log`).
pub(crate) fn home_path(p: &Path) -> PathBuf {
    expand_home(p, std::env::var_os("HOME").as_deref())
}

fn expand_home(p: &Path, home: Option<&std::ffi::OsStr>) -> PathBuf {
    match (p.strip_prefix("~"), home.filter(|h| !h.is_empty())) {
        (Ok(rest), Some(home)) => Path::new(home).join(rest),
        _ => p.to_path_buf(),
    }
}

/// A log file's path as PM2 reads it: as [`home_path`], and `NULL` (PM2's
/// other spelling of `/dev/null`) is `/dev/null`.
pub(crate) fn log_path(p: &Path) -> PathBuf {
    if p == Path::new("NULL") {
        return PathBuf::from("/dev/null");
    }
    home_path(p)
}

/// The interpreter and its options a script's `#!` line names, with
/// `/usr/bin/env` (and its `-S`) left out: `#!/usr/bin/env node` → `node`.
fn shebang_of(path: &Path) -> Option<Vec<OsString>> {
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let mut words = std::str::from_utf8(line)
        .ok()?
        .split_whitespace()
        .peekable();
    if words
        .peek()
        .is_some_and(|w| Path::new(w).file_name().is_some_and(|n| n == "env"))
    {
        words.next();
        words.next_if(|w| *w == "-S");
    }
    let words: Vec<OsString> = words.map(OsString::from).collect();
    (!words.is_empty()).then_some(words)
}

/// The interpreter a script's extension names (`app.js` → node).
pub(crate) fn interpreter_of(script: &Path) -> Option<&'static str> {
    if !is_script_name(&script.to_string_lossy()) {
        return None;
    }
    match script.extension().and_then(|e| e.to_str()) {
        Some("js" | "mjs" | "cjs") => Some("node"),
        // PM2 runs TypeScript with bun; tsx and ts-node as well here.
        Some("ts" | "tsx" | "mts" | "cts") => TS_RUNNERS.iter().copied().find(|r| {
            resolve_program(
                &OsString::from(r),
                None,
                std::env::var_os("PATH").as_deref(),
            )
            .is_ok()
        }),
        Some("py") => Some("python3"),
        Some("rb") => Some("ruby"),
        Some("pl") => Some("perl"),
        Some("php") => Some("php"),
        Some("sh") => Some("sh"),
        // A Spring Boot or other runnable jar; the JVM's options go
        // before `-jar` (see `interpreter_words`).
        Some("jar") => Some("java -jar"),
        _ => None,
    }
}

/// An interpreter from [`interpreter_of`] in words, with `options` (PM2's
/// `--interpreter-args`) after its program: `java -Xmx1g -jar`.
pub(crate) fn interpreter_words(
    interpreter: &str,
    options: impl IntoIterator<Item = OsString>,
) -> Vec<OsString> {
    let mut words = interpreter.split(' ').map(OsString::from);
    let mut out: Vec<OsString> = words.next().into_iter().collect();
    out.extend(options);
    out.extend(words);
    out
}

/// A file name an interpreter runs (`app.js`, `main.py`…).
pub(crate) fn is_script_name(word: &str) -> bool {
    [
        ".js", ".mjs", ".cjs", ".py", ".rb", ".pl", ".php", ".sh", ".jar",
    ]
    .iter()
    .any(|ext| word.ends_with(ext))
        || is_typescript(word)
}

/// What runs a TypeScript file, in the order tried.
const TS_RUNNERS: [&str; 3] = ["bun", "tsx", "ts-node"];

fn is_typescript(word: &str) -> bool {
    [".ts", ".tsx", ".mts", ".cts"]
        .iter()
        .any(|ext| word.ends_with(ext) && !word.ends_with(".d.ts"))
}

/// A directory as an error names it: absolute when it can be.
fn shown_dir(cwd: Option<&Path>) -> String {
    let dir = cwd.map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::canonicalize(&dir)
        .unwrap_or(dir)
        .display()
        .to_string()
}

/// `node app.js`, `python3 app.py`: the common mistake of a missing script
/// is told in one line before anything starts (PM2's "Script not found"),
/// instead of a crash loop of the interpreter's stack traces. Only a plain
/// script argument is checked: not `-e`/`-c` code, nor `-m` modules.
fn check_script(
    program: &Path,
    command: &[OsString],
    cwd: Option<&Path>,
) -> Result<(), ConfigError> {
    let name = program.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let python = name.starts_with("python");
    if !is_node(program) && !python {
        return Ok(());
    }
    // Options that take the next word as their value.
    let takes_value: &[&str] = if python {
        &["-W", "-X", "--check-hash-based-pycs"]
    } else {
        &[
            "-r",
            "--require",
            "--import",
            "--loader",
            "--experimental-loader",
            "--env-file",
            "--input-type",
            "--conditions",
            "-C",
            "--title",
        ]
    };
    let inline: &[&str] = if python {
        &["-c", "-m"]
    } else {
        &["-e", "--eval", "-p", "--print"]
    };
    let mut args = command.iter().skip(1).filter_map(|a| a.to_str());
    let script = loop {
        let Some(a) = args.next() else { return Ok(()) };
        if inline.contains(&a) || a == "-" {
            return Ok(());
        }
        if takes_value.contains(&a) {
            args.next();
            continue;
        }
        if a.starts_with('-') {
            continue;
        }
        break a;
    };
    let dir = cwd.map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    if dir.join(script).exists() {
        return Ok(());
    }
    Err(ConfigError::NoScript {
        script: script.to_string(),
        dir: shown_dir(cwd),
    })
}

/// `python3.12` for `python`: the interpreter `name`, with or without a
/// version after it.
pub(crate) fn is_versioned(program: &Path, name: &str) -> bool {
    program
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(name))
        .is_some_and(|v| v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
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

/// Node, or a Node program: a script whose `#!` line names node (`tsx`,
/// `ts-node`, `nodemon`, `next` in `node_modules/.bin`), which starts Node
/// in its own process or in a child that shares its stdio.
fn runs_node(program: &Path) -> bool {
    is_node(program)
        || shebang_of(program)
            .and_then(|words| words.into_iter().next())
            .is_some_and(|w| is_node(Path::new(&w)))
}

/// Bun, or a script whose `#!` line names it (`#!/usr/bin/env bun`).
fn runs_bun(program: &Path) -> bool {
    let bun = |p: &Path| p.file_name().is_some_and(|n| n == "bun");
    bun(program)
        || shebang_of(program)
            .and_then(|words| words.into_iter().next())
            .is_some_and(|w| bun(Path::new(&w)))
}

/// npm, npx, yarn or pnpm: Node programs that run a package's script.
fn package_manager(program: &Path) -> Option<&str> {
    program
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| matches!(*n, "npm" | "npx" | "yarn" | "pnpm"))
}

/// `npm start`, `yarn dev`, `pnpm run start`, `npx next start`: a package
/// manager (itself a Node program) running a package.json script whose
/// first word is `node` or a Node program of `node_modules/.bin` (`next`,
/// `nodemon`, `ts-node`…). herd preloads its module then as for `node
/// app.js`: the app's `listen()` is found through the manager, which hands
/// it herd's descriptors. A script that starts something else (`python3
/// app.py`) gets `PORT` as any program does.
fn runs_node_script(program: &Path, command: &[OsString], cwd: Option<&Path>) -> bool {
    let Some(manager) = package_manager(program) else {
        return false;
    };
    let Some(dir) = cwd
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok())
    else {
        return false;
    };
    let mut words = command
        .iter()
        .skip(1)
        .filter_map(|w| w.to_str())
        .filter(|w| !w.starts_with('-'));
    let first = words.next().unwrap_or("");
    let node_bin = |name: &str| {
        !name.contains('/')
            && shebang_of(&dir.join("node_modules/.bin").join(name))
                .and_then(|w| w.first().map(|p| is_node(Path::new(p))))
                .unwrap_or(false)
    };
    if manager == "npx" {
        return node_bin(first);
    }
    let script = match first {
        "run" | "run-script" => words.next().unwrap_or(""),
        s => s,
    };
    let scripts = std::fs::read_to_string(dir.join("package.json"))
        .ok()
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|p| p.get("scripts")?.get(script)?.as_str().map(str::to_owned));
    let line = match scripts {
        Some(line) => line,
        // npm's own default for a package without a start script.
        None if script == "start" && dir.join("server.js").is_file() => "node server.js".into(),
        None => return false,
    };
    // The first word that is not a `NAME=value` assignment.
    let run = line.split_whitespace().find(|w| !w.contains('='));
    run.is_some_and(|w| is_node(Path::new(w)) || node_bin(w))
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
        "npx", "tsx", "ts-node",
    ];
    let stem = |s: &OsString| {
        Path::new(s)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let prog = stem(&command[0]);
    // `sh -c 'exec python3 app.py $PORT'` is named as `python3 app.py`:
    // what the last `exec` runs, else the line's first command.
    if matches!(prog.as_str(), "sh" | "bash" | "dash" | "zsh")
        && command.get(1).is_some_and(|a| a == "-c")
        && let Some(line) = command.get(2)
    {
        let line = line.to_string_lossy();
        let all: Vec<&str> = line.split_whitespace().collect();
        let from = all.iter().rposition(|w| *w == "exec").map_or(0, |i| i + 1);
        let words: Vec<OsString> = all[from..]
            .iter()
            .skip_while(|w| w.contains('='))
            .map(OsString::from)
            .collect();
        if !words.is_empty() {
            return derive_name(&words);
        }
    }
    // `deno run -A app.ts`, `deno serve main.ts`, `bun run app.ts`.
    let sub = matches!(prog.as_str(), "deno" | "bun")
        && command.get(1).is_some_and(|w| w == "run" || w == "serve");
    let pick = if INTERPRETERS.contains(&prog.as_str()) {
        script_name(&command[1 + usize::from(sub)..]).unwrap_or(prog)
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
    const TAKES_VALUE: &[&str] = &[
        "-r",
        "--require",
        "--import",
        "--loader",
        "-W",
        "-X",
        "--preload",
        // Deno's.
        "--port",
        "--host",
        "--config",
        "--import-map",
        "--location",
    ];
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
    fn sizes_and_where_zero_is_allowed() {
        assert_eq!("16k".parse::<Size>(), Ok(Size(16384)));
        assert_eq!(" 1MiB".parse::<Size>(), Ok(Size(1 << 20)));
        assert!(
            "0".parse::<Size>().is_err(),
            "a head or log size of 0 is a mistake"
        );
        assert_eq!(
            "0".parse::<SizeOrZero>(),
            Ok(SizeOrZero(0)),
            "0 turns a limit off"
        );
        for bad in ["", "k", "-1", "1x", "99999999999999999999g"] {
            assert!(bad.parse::<SizeOrZero>().is_err(), "{bad:?}");
        }
        // The error says what is wrong with a number that is one.
        for big in ["99999999999999999999", "99999999999999g"] {
            let e = big.parse::<Size>().unwrap_err();
            assert!(e.ends_with("is too large"), "{e}");
        }
        let e = "0".parse::<Size>().unwrap_err();
        assert!(e.contains("more than 0"), "{e}");
    }

    #[test]
    fn a_package_managers_script_is_node_when_it_starts_node() {
        let dir = std::env::temp_dir().join(format!("herd-npm-script-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("node_modules/.bin")).unwrap();
        std::fs::write(
            dir.join("package.json"),
            r#"{"scripts": {"start": "NODE_ENV=production node app.js", "dev": "next dev",
                "py": "python3 app.py", "sh": "./run.sh"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("node_modules/.bin/next"), "#!/usr/bin/env node\n").unwrap();
        std::fs::write(dir.join("node_modules/.bin/tool"), "#!/bin/sh\n").unwrap();
        let node = |w: &[&str]| {
            let command: Vec<OsString> = w.iter().map(OsString::from).collect();
            runs_node_script(
                Path::new(&format!("/usr/bin/{}", w[0])),
                &command,
                Some(&dir),
            )
        };
        for yes in [
            &["npm", "start"][..],
            &["npm", "run", "start"],
            &["npm", "--silent", "run", "dev"],
            &["yarn", "dev"],
            &["pnpm", "run", "dev"],
            &["npx", "next", "start"],
        ] {
            assert!(node(yes), "{yes:?}");
        }
        for no in [
            &["npm", "run", "py"][..],
            &["npm", "run", "sh"],
            &["npm", "run", "nope"],
            &["npx", "tool"],
            &["make", "start"],
        ] {
            assert!(!node(no), "{no:?}");
        }
        // npm's default start script, `node server.js`.
        std::fs::write(dir.join("package.json"), "{}").unwrap();
        assert!(!node(&["npm", "start"]));
        std::fs::write(dir.join("server.js"), "").unwrap();
        assert!(node(&["npm", "start"]));
        let _ = std::fs::remove_dir_all(&dir);
    }

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
    fn dns_names_are_checked_before_any_lookup() {
        for ok in [
            "api.internal",
            "_http._tcp.svc.cluster.local.",
            "a-b_c.example",
            "bücher.example",
        ] {
            assert_eq!(dns_name(ok), Ok(()), "{ok}");
        }
        let long = format!("{}.example", "a".repeat(64));
        for bad in [
            "",
            ".",
            "api..internal",
            ".api",
            "a b.example",
            "a/b",
            &long,
        ] {
            assert!(dns_name(bad).is_err(), "{bad:?}");
        }
        assert!("api.internal:8080".parse::<Discovery>().is_ok());
        assert!("api..internal:8080".parse::<Discovery>().is_err());
    }

    #[test]
    fn parses_values_like_the_flags() {
        assert_eq!("max".parse::<Instances>(), Ok(Instances::Max));
        assert_eq!("3".parse::<Instances>(), Ok(Instances::Count(3)));
        assert_eq!("-1".parse::<Instances>(), Ok(Instances::AllBut(1)));
        assert!("-0".parse::<Instances>().is_err());
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
        // A deadline this far would overflow the clock (a panic).
        assert_eq!(
            "18446744073709551615s".parse::<Dur>(),
            Err("18446744073709551615s is too long: at most 3650d".into())
        );
        assert_eq!("3650d".parse::<Dur>().map(|d| d.0), Ok(MAX_DUR));
    }

    #[test]
    fn file_errors_name_the_line() {
        let text = "mode = \"proxy\"\ninstances = 0\n";
        let e = Options::parse(Path::new("herd.toml"), text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("herd.toml:2:"), "{msg}");
        assert!(msg.contains("positive number"), "{msg}");
        assert!(!msg.contains('\n'));

        let e = Options::parse(Path::new("h.toml"), "a = 1\nlisten = [\n").unwrap_err();
        assert!(e.to_string().starts_with("h.toml:"), "{e}");
        let e = Options::parse(Path::new("h.toml"), "\n\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("h.toml:3:1:"), "{e}");
        assert!(
            e.to_string().ends_with("unknown key `bogus` (the keys are herd run's long options without their dashes: `kill-timeout`, `instances`…)"),
            "{e}"
        );
        // A misspelt key gets the nearest one, not the list of all of them.
        let e = Options::parse(Path::new("h.toml"), "comand = [\"node\"]\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "h.toml:1:1: unknown key `comand`; did you mean `command`?"
        );
        let e = Options::parse(Path::new("h.toml"), "kill_timeout = \"5s\"\n").unwrap_err();
        assert!(
            e.to_string().ends_with("did you mean `kill-timeout`?"),
            "{e}"
        );
        // Past 64 bits: said plainly, not as serde's "i128, expected any value".
        let e =
            Options::parse(Path::new("h.toml"), "instances = 99999999999999999999\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "h.toml:1:13: integer `99999999999999999999` is out of range (TOML's integers are 64-bit)"
        );
        let e = Options::parse(
            Path::new("h.toml"),
            "max-restarts = -99999999999999999999\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "h.toml:1:16: integer `-99999999999999999999` is out of range (TOML's integers are 64-bit; expected u32)"
        );
        // PM2's bare milliseconds: the unit it needs, not "expected a string".
        let e = Options::parse(Path::new("h.toml"), "kill-timeout = 3000\n").unwrap_err();
        assert!(
            e.to_string().ends_with(
                "a duration needs a unit: 3000ms (PM2's numbers are milliseconds) or 3000s"
            ),
            "{e}"
        );
        let c = Options::parse(Path::new("h.toml"), "kill-timeout = \"3s\"\n").unwrap();
        assert_eq!(c.kill_timeout, Some(Dur(Duration::from_secs(3))));
        // 0 needs no unit (`--health-interval 0` turns checks off).
        assert_eq!("0".parse::<Dur>(), Ok(Dur(Duration::ZERO)));
        let c = Options::parse(Path::new("h.toml"), "health-interval = 0\n").unwrap();
        assert_eq!(c.health_interval, Some(Dur(Duration::ZERO)));
    }

    #[test]
    fn accept_proxy_is_a_switch_or_a_list() {
        let parse = |text: &str| Options::parse(Path::new("herd.toml"), text);
        let nets = |list: &[&str]| {
            let nets = list.iter().map(|n| n.parse::<TrustedNet>().unwrap().0);
            Some(AcceptProxy::From(nets.collect()))
        };
        assert_eq!(
            parse("accept-proxy = true").unwrap().accept_proxy,
            Some(AcceptProxy::All)
        );
        assert_eq!(
            parse("accept-proxy = false").unwrap().accept_proxy,
            Some(AcceptProxy::Off)
        );
        assert_eq!(
            parse("accept-proxy = []").unwrap().accept_proxy,
            Some(AcceptProxy::Off)
        );
        let listed = parse("accept-proxy = [\"10.0.0.0/8\", \"192.0.2.1\"]").unwrap();
        assert_eq!(listed.accept_proxy, nets(&["10.0.0.0/8", "192.0.2.1"]));
        let one = parse("accept-proxy = \"10.0.0.0/8\"").unwrap();
        assert_eq!(one.accept_proxy, nets(&["10.0.0.0/8"]));
        let e = parse("accept-proxy = [\"lb\"]").unwrap_err().to_string();
        assert!(e.contains("\"lb\" is not an address"), "{e}");
        assert_eq!("true".parse(), Ok(AcceptProxy::All));
        assert_eq!(
            "10.0.0.1,::1"
                .parse::<AcceptProxy>()
                .map(|a| a.expects("::1".parse().unwrap())),
            Ok(true)
        );
        let from = AcceptProxy::From(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(from.expects("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!from.expects("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn rate_limits_as_nginx_writes_them() {
        let r = |s: &str| s.parse::<RateLimit>();
        let ms = Duration::from_millis;
        assert_eq!(
            r("10/s"),
            Ok(RateLimit {
                interval: ms(100),
                burst: 10
            })
        );
        assert_eq!(
            r("10r/s, burst=25"),
            Ok(RateLimit {
                interval: ms(100),
                burst: 25
            })
        );
        assert_eq!(
            r("30r/m"),
            Ok(RateLimit {
                interval: ms(2000),
                burst: 1
            })
        );
        assert_eq!(
            r("600/min"),
            Ok(RateLimit {
                interval: ms(100),
                burst: 10
            })
        );
        for bad in [
            "",
            "10",
            "0/s",
            "10/h",
            "10/s,burst=0",
            "10/s,delay=3",
            "x/s",
        ] {
            let e = r(bad).unwrap_err();
            assert!(e.contains("is not a rate: write N/s or N/m"), "{bad}: {e}");
        }
        let c = Options::parse(Path::new("herd.toml"), "rate-limit = \"5/s,burst=10\"").unwrap();
        assert_eq!(
            c.rate_limit,
            Some(RateLimit {
                interval: ms(200),
                burst: 10
            })
        );
    }

    #[test]
    fn real_ip_keys_in_the_file() {
        let text = r#"
            real-ip-from = ["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]
            real-ip-header = "X-Real-IP"
        "#;
        let c = Options::parse(Path::new("herd.toml"), text).unwrap();
        let nets: Vec<String> = c
            .real_ip_from
            .unwrap()
            .iter()
            .map(|n| n.0.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32"]);
        assert_eq!(c.real_ip_header.as_deref(), Some("X-Real-IP"));
        let bad = "real-ip-from = [\"10.0.0.0/8\", \"lb.internal\"]\n";
        let e = Options::parse(Path::new("herd.toml"), bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("herd.toml:1:") && e.contains("\"lb.internal\" is not an address"),
            "{e}"
        );
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
        let c = Options::parse(Path::new("herd.toml"), text).unwrap();
        assert_eq!(c.mode, Some(Mode::Reuseport));
        assert_eq!(c.instances, Some(Instances::Max));
        assert_eq!(c.kill_timeout, Some(Dur(Duration::from_secs(3))));
        assert_eq!(c.env, [EnvPair("NODE_ENV".into(), "production".into())]);
    }

    #[test]
    fn flags_layer_over_the_file() {
        let file = Options::parse(
            Path::new("herd.toml"),
            "mode = \"shared\"\nkill-timeout = \"3s\"\nupstream = [\"127.0.0.1:1\"]\n[env]\nA = \"file\"\nB = \"file\"\n",
        )
        .unwrap();
        let flags = Options {
            kill_timeout: Some(Dur(Duration::from_secs(9))),
            env: vec![EnvPair("B".into(), "flag".into())],
            ..Options::default()
        };
        let o = flags.over(file);
        assert_eq!(
            o.kill_timeout,
            Some(Dur(Duration::from_secs(9))),
            "the flag wins"
        );
        assert_eq!(o.mode, Some(Mode::Shared), "the file fills in");
        assert_eq!(o.upstreams.map(|u| u.len()), Some(1));
        // --env adds to [env]; the flag's B comes last, so it wins.
        let env: Vec<_> = o
            .env
            .iter()
            .map(|EnvPair(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(env, ["A=file", "B=file", "B=flag"]);
    }

    #[test]
    fn the_workers_user_is_looked_up_by_name_or_number() {
        assert!(matches!(
            run_as(None, Some("x")),
            Err(ConfigError::GroupWithoutUser)
        ));
        assert!(matches!(
            run_as(Some("no-such-user-here"), None),
            Err(ConfigError::NoSuchUser(_))
        ));
        assert_eq!(run_as(None, None).unwrap(), None);
        let me = nix::unistd::geteuid().as_raw();
        // This process's own user, by number: allowed for anyone.
        let mine = run_as(Some(&me.to_string()), None).unwrap().unwrap();
        assert_eq!((mine.uid, mine.gid), (me, nix::unistd::getegid().as_raw()));
        assert!(matches!(
            run_as(Some(&me.to_string()), Some("no-such-group-here")),
            Err(ConfigError::NoSuchGroup(_))
        ));
    }

    #[test]
    fn a_tilde_is_home_and_null_is_dev_null_as_in_pm2() {
        let home = Some(std::ffi::OsStr::new("/home/ann"));
        let at = |p: &str| expand_home(Path::new(p), home);
        assert_eq!(at("~/logs/out.log"), Path::new("/home/ann/logs/out.log"));
        assert_eq!(at("~"), Path::new("/home/ann"));
        assert_eq!(at("logs/~/x"), Path::new("logs/~/x"));
        assert_eq!(at("~ann/x"), Path::new("~ann/x"));
        assert_eq!(expand_home(Path::new("~/x"), None), Path::new("~/x"));
        assert_eq!(log_path(Path::new("NULL")), Path::new("/dev/null"));
        assert_eq!(
            log_path(Path::new("/var/log/a.log")),
            Path::new("/var/log/a.log")
        );
    }

    #[test]
    fn python_programs_are_known_by_name_or_by_their_hash_bang_line() {
        let dir = std::env::temp_dir().join(format!("herd-py-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let release = |name: &str, head: &str| {
            let program = dir.join(name);
            std::fs::write(&program, head).unwrap();
            Release {
                command: vec![program.clone().into()],
                program,
                cwd: None,
                env: Vec::new(),
                base_env: None,
            }
        };
        assert!(release("python3.11", "").runs_python());
        assert!(release("gunicorn", "#!/usr/local/bin/python3.11\nimport re\n").runs_python());
        assert!(release("uvicorn", "#!/usr/bin/env python3\n").runs_python());
        assert!(!release("tool", "#!/bin/sh\n").runs_python());
        assert!(!release("www", "#!/usr/bin/env node\n").runs_python());
        assert!(!release("bin", "\x7fELF").runs_python());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_script_runs_with_its_interpreter() {
        let words = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let dir = std::env::temp_dir().join(format!("herd-interp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("app.js"), "1").unwrap();
        std::fs::write(dir.join("app.py"), "1").unwrap();
        let got = with_interpreter(words(&["app.js", "--port", "1"]), Some(&dir));
        assert_eq!(got, words(&["node", "app.js", "--port", "1"]));
        assert_eq!(
            with_interpreter(words(&["app.py"]), Some(&dir)),
            words(&["python3", "app.py"])
        );
        // `#!/usr/bin/env python` where only python3 is on PATH.
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("python3"), "").unwrap();
        std::fs::set_permissions(bin.join("python3"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let python = || words(&["python", "-u"]);
        assert_eq!(
            python3_for_python(python(), Some(bin.as_os_str())),
            words(&["python3", "-u"])
        );
        std::fs::write(bin.join("python"), "").unwrap();
        std::fs::set_permissions(bin.join("python"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert_eq!(
            python3_for_python(python(), Some(bin.as_os_str())),
            python()
        );
        std::fs::write(dir.join("app.jar"), "PK").unwrap();
        assert_eq!(
            with_interpreter(words(&["app.jar", "--debug"]), Some(&dir)),
            words(&["java", "-jar", "app.jar", "--debug"])
        );
        // Programs on PATH and missing files are left alone.
        assert_eq!(
            with_interpreter(words(&["node", "app.js"]), Some(&dir)),
            words(&["node", "app.js"])
        );
        assert_eq!(
            with_interpreter(words(&["nope.js"]), Some(&dir)),
            words(&["nope.js"])
        );
        // No extension: its `#!` line says (Express's bin/www), executable
        // or not when that is node.
        use std::os::unix::fs::PermissionsExt;
        let file = |name: &str, text: &str, mode: u32| {
            std::fs::write(dir.join(name), text).unwrap();
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(mode))
                .unwrap();
        };
        file("www", "#!/usr/bin/env node\nrequire('x')\n", 0o644);
        assert_eq!(
            with_interpreter(words(&["www", "-v"]), Some(&dir)),
            words(&["node", "www", "-v"])
        );
        file("www", "#!/usr/bin/env node\nrequire('x')\n", 0o755);
        assert_eq!(
            with_interpreter(words(&["www"]), Some(&dir)),
            words(&["node", "www"])
        );
        file("tool", "#!/usr/bin/env -S python3 -u\nprint(1)\n", 0o644);
        assert_eq!(
            with_interpreter(words(&["tool"]), Some(&dir)),
            words(&["python3", "-u", "tool"])
        );
        // An executable Python script (Django's manage.py) runs with its
        // python too, for herd's preload; any other executable is the file
        // here, not a program of that name on PATH.
        file("manage.py", "#!/usr/bin/env python3\nprint(1)\n", 0o755);
        assert_eq!(
            with_interpreter(words(&["manage.py", "runserver"]), Some(&dir)),
            words(&["python3", "manage.py", "runserver"])
        );
        file("tool", "#!/bin/sh\nexec x\n", 0o755);
        assert_eq!(
            with_interpreter(words(&["tool"]), Some(&dir)),
            words(&["./tool"])
        );
        assert_eq!(
            with_interpreter(words(&["./tool"]), Some(&dir)),
            words(&["./tool"])
        );
        file("plain", "no line\n", 0o644);
        assert_eq!(
            with_interpreter(words(&["plain"]), Some(&dir)),
            words(&["plain"])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_script_is_named_before_anything_starts() {
        let node = Path::new("/usr/bin/node");
        let words = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let e = check_script(node, &words(&["node", "nope.js"]), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("script not found: nope.js (looked in /"),
            "{e}"
        );
        let e = check_script(
            node,
            &words(&["node", "-r", "dotenv/config", "nope.js"]),
            None,
        );
        assert!(e.is_err(), "the value of -r is not the script");
        for fine in [
            &["node", "-e", "1"][..],
            &["node"],
            &["node", "--inspect"],
            &["node", "Cargo.toml"], // exists in the crate's directory
        ] {
            assert!(check_script(node, &words(fine), None).is_ok(), "{fine:?}");
        }
        let py = Path::new("/usr/bin/python3");
        assert!(check_script(py, &words(&["python3", "-m", "http.server"]), None).is_ok());
        assert!(check_script(py, &words(&["python3", "-u", "nope.py"]), None).is_err());
        assert!(check_script(Path::new("/bin/sh"), &words(&["sh", "nope.sh"]), None).is_ok());
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
        assert_eq!(c(&["sh", "-c", "exec node app.js $PORT"]), "app");
        assert_eq!(c(&["sh", "-c", "NODE_ENV=production npm start"]), "npm");
        assert_eq!(c(&["sh", "-c", "sleep 1 & exec ./api --port $PORT"]), "api");
        assert_eq!(c(&["bash", "-c", "  "]), "bash");
        assert_eq!(c(&["deno", "run", "--allow-net", "srv.ts"]), "srv");
        assert_eq!(c(&["deno", "serve", "--port", "8000", "main.ts"]), "main");
        assert_eq!(c(&["bun", "run", "app.ts"]), "app");
        assert_eq!(c(&["bun", "app.ts"]), "app");
    }

    #[test]
    fn a_command_line_in_one_word_runs_as_words_or_through_sh() {
        let words = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let dir = std::env::temp_dir().join(format!("herd-line-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("my app.js"), "").unwrap();
        for line in [
            "npm run dev -- --port $PORT",
            "NODE_ENV=production node app.js",
            "npm ci && npm start",
        ] {
            assert_eq!(
                one_line(words(&[line]), Some(&dir)),
                words(&["sh", "-c", line])
            );
        }
        // Plain words need no shell, and keep herd's preloads.
        assert_eq!(
            one_line(words(&[" node  app.js --port=3000 "]), Some(&dir)),
            words(&["node", "app.js", "--port=3000"])
        );
        // A file of that name, or several words, stay as they are.
        assert_eq!(
            one_line(words(&["my app.js"]), Some(&dir)),
            words(&["my app.js"])
        );
        assert_eq!(
            one_line(words(&["npm", "start"]), None),
            words(&["npm", "start"])
        );
        assert_eq!(one_line(words(&["./api"]), None), words(&["./api"]));
    }

    #[test]
    fn parses_upstream_specs() {
        let u: UpstreamSpec =
            "127.0.0.1:8080,weight=3,max_fails=2,fail_timeout=30s,max_conns=8,backup"
                .parse()
                .unwrap();
        assert_eq!(u.config.max_conns, 8);
        assert_eq!(u.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(u.config.weight, 3);
        assert_eq!(u.config.max_fails, 2);
        assert_eq!(u.config.fail_timeout, 30_000_000_000);
        assert!(u.config.backup);
        assert!("127.0.0.1:1,weight=0".parse::<UpstreamSpec>().is_err());
        assert!("127.0.0.1:1,colour=red".parse::<UpstreamSpec>().is_err());
        assert!("nohost".parse::<UpstreamSpec>().is_err());
    }

    #[test]
    fn parses_unix_upstreams() {
        let u: UpstreamSpec = "unix:/run/app.sock,weight=2,h2".parse().unwrap();
        assert_eq!(u.unix.as_deref(), Some(Path::new("/run/app.sock")));
        assert_eq!(u.name, "unix:/run/app.sock");
        assert!(u.h2 && u.config.weight == 2);
        // Relative to where herd starts, and named so in logs.
        let u: UpstreamSpec = "unix:app.sock".parse().unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(u.unix, Some(cwd.join("app.sock")));
        assert_eq!(u.name, format!("unix:{}", cwd.join("app.sock").display()));
        for bad in ["unix:", "unix:/run/app.sock,tls"] {
            assert!(bad.parse::<UpstreamSpec>().is_err(), "{bad}");
        }
        let long = format!("unix:/{}", "x".repeat(107));
        let why = long.parse::<UpstreamSpec>().unwrap_err();
        assert!(why.contains("at most 107 bytes"), "{why}");
    }
}
