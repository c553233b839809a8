//! The supervisor's driver: one task, on the main thread, that owns every
//! worker. Its decisions are [`machine::Machine`]'s; this module carries
//! them out (spawn, signal, publish the serving set, answer the control
//! call) and feeds back what happened (exits, readiness, watchdog pings,
//! drains, timers). No locks: the only shared state it writes is the
//! serving list the proxy and the dispatcher read.
//!
//! Over 500 lines because `run` sets every part up in order (listeners,
//! proxy threads, dispatcher, admin listener, watcher) and `apply` carries
//! out every action the machine can ask for; each reads best whole.

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio_util::sync::CancellationToken;

mod cron;
mod deploy;
mod machine;
mod ops;
mod policy;
mod port;
mod process;
mod signals;
mod stall;
mod steer;
mod stop;
mod upgrade;

use machine::{Action, Answer, Epoch, Input, Limits, Machine};
use policy::RestartPolicy;
use process::{Proc, Spec, kill_group};
use signals::StopSignals;

use crate::config::{AcceptProxy, Mode, Protocol, Settings};
use crate::control::{self, Call, ControlError, Done, Line};
use crate::dispatch::{DispatchError, Dispatcher};
use crate::os::guardian::Guardian;
use crate::os::listen::{ListenError, Listeners};
use crate::os::rundir::{RunDir, RunDirError};
use crate::os::sys;
use crate::output::Output;
use crate::proxy::{self, Active, HttpProxy, TcpProxy};
use crate::upstream::{self, Upstreams};

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot listen on {addr}: in use by {holder}")]
    PortTaken {
        addr: std::net::SocketAddr,
        holder: String,
    },
    #[error(transparent)]
    Tls(#[from] crate::proxy::tls::TlsError),
    #[error("{0}")]
    UpstreamTls(String),
    #[error("--redirect-http {addr}: {source}")]
    Redirect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("cannot open {}: {source}", path.display())]
    OutputFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the guardian process: {0}")]
    Guardian(std::io::Error),
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot start {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("cannot write herd's preload modules: {0}")]
    Preload(std::io::Error),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error("--access-log: {0}")]
    AccessLog(std::io::Error),
    #[error("herd upgrade: what the old binary handed over is unusable: {0}")]
    Handed(std::io::Error),
    #[error("--admin {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A port in use names who holds it, so that the way out is on the same
/// line: often another herd cluster (`herd start other.js` on the default
/// port), or the app itself started by hand.
/// `own`: this master's name once its control socket is up, which it must
/// not ask (it would wait on itself).
fn taken(e: ListenError, own: &str) -> SuperviseError {
    let ListenError::Bind { addr, source } = &e else {
        return e.into();
    };
    if source.kind() != std::io::ErrorKind::AddrInUse {
        return e.into();
    }
    let pids = crate::os::sockets::holders_of(addr.port());
    // Another cluster's master holds its port; only then are they asked.
    let clusters = if pids.is_empty() {
        Vec::new()
    } else {
        control::running()
    };
    let cluster = clusters.into_iter().find_map(|(name, path)| {
        if name == own {
            return None;
        }
        let st = control::call::<control::Status>(&name, &path, &control::Request::Status, |_| {})
            .ok()?;
        pids.contains(&st.pid).then_some(name)
    });
    let holder = match (cluster, pids.first()) {
        (Some(name), _) => format!(
            "herd cluster {name:?}; give this one a port of its own with --listen (`herd reload {name}` replaces that one's workers)"
        ),
        (None, Some(pid)) => {
            let cmd = procfs::process::Process::new(*pid as i32)
                .and_then(|p| p.cmdline())
                .map(|c| c.join(" "))
                .unwrap_or_default();
            let cmd: String = cmd.chars().take(60).collect();
            format!("pid {pid} ({cmd}); give herd another port with --listen")
        }
        (None, None) => "another process; give herd another port with --listen".to_string(),
    };
    SuperviseError::PortTaken {
        addr: *addr,
        holder,
    }
}

/// What the worker tasks report to the supervisor.
enum Event {
    Exited {
        epoch: Epoch,
        status: std::io::Result<ExitStatus>,
    },
    Ready {
        epoch: Epoch,
        /// The loopback address the port probe reached, if it did.
        addr: Option<std::net::SocketAddr>,
    },
    /// `WATCHDOG=1`.
    Pinged { epoch: Epoch },
    /// A retiring worker has no request in flight any more.
    Drained { epoch: Epoch },
    /// Fd modes, while a worker stops: is each listening socket listening?
    CheckListeners,
    /// `--watch`: a file changed.
    Changed(PathBuf),
    /// A line from a worker's message channel.
    Message {
        epoch: Epoch,
        msg: Result<serde_json::Value, String>,
        /// Freed once handled: the worker's reader waits for it.
        credit: crate::ipc::Credit,
    },
    /// A message from another host (`--redis`).
    Remote(crate::hosts::Incoming),
    /// A worker's message did not reach another host: the worker hears why.
    Undeliverable {
        epoch: Epoch,
        to: serde_json::Value,
        data: serde_json::Value,
        error: String,
    },
}

pub struct Supervisor {
    s: Settings,
    m: Machine,
    procs: HashMap<Epoch, Proc>,
    listeners: Option<Listeners>,
    rundir: RunDir,
    guardian: Guardian,
    output: Output,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    up: Arc<Upstreams>,
    active: Arc<Active>,
    stop_accepting: CancellationToken,
    /// While true, the control socket accepts nothing (an upgrade's exec
    /// is imminent).
    hold_control: tokio::sync::watch::Sender<bool>,
    /// Once cancelled, idle client connections close (with `stop_accepting`
    /// on a stop; after the drain on an upgrade, which keeps them until
    /// their next answer says `Connection: close`).
    close_idle: CancellationToken,
    /// The control socket's and the name lock's fds, kept across an upgrade.
    control_fd: std::os::fd::RawFd,
    lock_fd: std::os::fd::RawFd,
    /// An upgrade asked for (`herd upgrade`, SIGUSR2): the binary, and the
    /// caller's answer channel.
    upgrading: Option<(PathBuf, Option<UnboundedSender<Line>>)>,
    exit_code: i32,
    /// The machine gave up (crash loop): the cluster stops.
    give_up: bool,
    started: Instant,
    dispatcher: Option<Dispatcher>,
    /// The releases workers run, by version: 0 is `herd run`'s own, others
    /// come with `herd deploy`.
    specs: HashMap<u32, Arc<Spec>>,
    /// Where herd's preloads were written, for releases that use them.
    preloads: Option<process::Preloads>,
    /// A canary or blue-green deploy in progress.
    rollout: Option<deploy::Rollout>,
    /// For `/metrics`.
    reloads: control::Reloads,
    /// Each target's latency over the last minute, for `herd status`.
    latency: crate::upstream::LatencyWindow,
    ticks: u64,
    /// Who asked for the running reload, told its progress and outcome.
    reload_reply: Option<UnboundedSender<Line>>,
    /// A `herd stop` caller's connection, answered before the master exits.
    stop_reply: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Requests from the control socket and the admin listener; answered
    /// while the cluster stops too, so `herd status` and `herd list` do not
    /// hang on a stopping master.
    calls: mpsc::UnboundedReceiver<Call>,
    /// The cluster is stopping (see `shutdown`).
    stopping: bool,
    /// CPU samples of `herd status`, kept by the blocking task that reads `/proc`.
    samples: ops::Samples,
    /// `--watch`: when the reload is due (the changes are quiet by then),
    /// and the first path that changed.
    watch_due: Option<(Instant, PathBuf)>,
    /// `--cron-restart`: when the next scheduled reload is due.
    cron: Option<cron::Schedule<chrono::Local>>,
    /// While the cluster starts: workers that could not be spawned, which
    /// fail the run rather than go to the restart policy.
    startup_failures: Option<Vec<(Epoch, SuperviseError)>>,
    /// `--redis`: the link to the other hosts of this cluster name.
    hosts: Option<crate::hosts::Hosts>,
    /// `--tls-cert`: the certificates, reloaded with the workers and when
    /// their files change.
    tls: Option<Arc<crate::proxy::tls::Tls>>,
    /// The HTTP proxy's shared state: a reload changes its upstreams, and
    /// `--upstream-crl` is read again when its file changes.
    http: Option<Arc<HttpProxy>>,
    /// Fd modes: each listening socket's accept queue, watched once a second.
    stalls: Vec<stall::Stall>,
    /// A Node app's own port (written in its code) was named in the log.
    port_hinted: bool,
    /// A worker was found to have daemonized (see `daemonized`); said once.
    daemon_hinted: bool,
    /// Workers whose main process exited of herd's stop signal while the
    /// rest of their group runs on (see `group_lives_on`), with how it
    /// exited.
    lingering: Vec<(Epoch, std::io::Result<ExitStatus>)>,
    /// Reuseport: steering failed; said once.
    said_steer_failed: bool,
    /// Reuseport: the sockets that get new connections, when not all do
    /// (see `steer`).
    steered: Option<Vec<u32>>,
    /// Reuseport: the sockets of slots gone, lowest first, kept while
    /// `leaving_workers` run (see `steer`).
    leaving: Vec<socket2::Socket>,
    leaving_workers: Vec<Epoch>,
    /// Reuseport: the kernel's order of the group (see `steer`).
    group: steer::Group,
    /// When `Event::CheckListeners` last looked.
    listeners_seen: Instant,
    /// `port_from_app` until the first worker names its port.
    awaiting_port: Option<port::AwaitingPort>,
    /// What ended the master after its start (the app's port was taken).
    failed: Option<SuperviseError>,
}

/// Runs the cluster until it is stopped; returns the process exit code.
///
/// Must be awaited on the main thread (`main` runs it with `block_on`): the
/// kernel's parent-death signal fires when the *thread* that forked a
/// worker exits, and the main thread lives exactly as long as the master.
pub async fn run(s: Settings) -> Result<i32, SuperviseError> {
    raise_nofile();
    // Certificates first: a bad one stops the start before anything binds.
    let tls = match &s.tls {
        Some(t) => Some(Arc::new(crate::proxy::tls::Tls::load(t)?)),
        None => None,
    };
    let proxy_threads = crate::os::cpus::usable();
    let listen_slots = match s.mode {
        Mode::Proxy => proxy_threads,
        _ => s.instances,
    };
    // After `herd upgrade`'s exec: the sockets and name this very process
    // held before it.
    let mut handed = crate::os::sys::handed();
    // Under systemd socket activation the port is the .socket unit's, and
    // stays open while the master restarts: connections wait in its queue.
    let inherited = match &handed {
        Some(_) => None,
        None => crate::os::sys::inherited_listener().map_err(ListenError::Inherited)?,
    };
    let activated = inherited.is_some();
    let listeners = match (inherited, handed.as_mut()) {
        (_, Some(h)) => Listeners::handed(s.mode, std::mem::take(&mut h.listeners))?,
        (Some(sock), None) => Listeners::adopt(s.mode, sock, listen_slots)?,
        // Bound once the first worker names its port (`on_port`).
        (None, None) if s.port_from_app => Listeners::None,
        (None, None) => {
            Listeners::bind(s.mode, s.listen, listen_slots).map_err(|e| taken(e, ""))?
        }
    };
    let bound = listeners.local_addr().unwrap_or(s.listen);
    let mut rundir = RunDir::create()?;
    if let Some(r) = &s.run_as {
        rundir.for_workers(r.uid, r.gid)?;
    }
    let guardian = Guardian::spawn().map_err(SuperviseError::Guardian)?;
    let upgraded = handed.is_some();
    let (control_listener, control_path, name, _name_lock) = match handed {
        Some(h) => {
            let path = control::socket_path(&h.name);
            let lock = control::NameLock::held(&h.name, h.lock)
                .ok_or_else(|| SuperviseError::Handed(std::io::Error::other("the name lock")))?;
            let _ = h.control.set_nonblocking(true);
            let l =
                tokio::net::UnixListener::from_std(h.control).map_err(SuperviseError::Handed)?;
            (l, path, h.name, lock)
        }
        None => control::bind_name(&s.name, s.name_given)?,
    };
    let control_fd = std::os::fd::AsRawFd::as_raw_fd(&control_listener);
    let lock_fd = _name_lock.fd();
    let mut s = s;
    s.name = name;
    s.listen = bound;
    let _control_file = RemoveOnDrop(control_path);
    let mut stop = StopSignals::new().map_err(SuperviseError::Signals)?;
    signals::reopen_logs_on_usr1();
    signals::log_unused();
    let mut ops = signals::OpSignals::new().map_err(SuperviseError::Signals)?;
    // Orphans of a worker's descendants come to herd (and, as a container's
    // PID 1, every orphan does): SIGCHLD says one may need reaping.
    if let Err(e) = crate::os::reaper::become_subreaper() {
        tracing::warn!(
            "cannot become a child subreaper ({e}): a worker's daemonized descendants will go to init"
        );
    }
    let mut sigchld = signal(SignalKind::child()).map_err(SuperviseError::Signals)?;
    // Every handler is in place: what an upgrading master blocked before
    // its exec (see `signals::caught`) is taken now.
    if let Err(e) = crate::os::sys::mask_signals(&signals::caught(), false) {
        tracing::warn!("cannot unblock signals: {e}");
    }
    // Under systemd with WatchdogSec=, the supervisor's own loop pings: a
    // stuck loop stops the pings and systemd restarts the service.
    let systemd_watchdog = systemd_watchdog();
    let (calls_tx, calls) = mpsc::unbounded_channel::<Call>();
    let admin_calls = calls_tx.clone();
    let (hold_control, held) = tokio::sync::watch::channel(false);
    tokio::spawn(control::serve(control_listener, calls_tx, held));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (tx, rx) = mpsc::unbounded_channel();
    let hosts = s.redis.as_ref().map(|r| {
        let tx = tx.clone();
        crate::hosts::Hosts::start(r, &s.name, move |m| {
            let _ = tx.send(Event::Remote(m));
        })
    });
    let up = Arc::new(Upstreams::new(s.balance.clone(), &s.upstreams));
    if let Some(admin) = &s.admin {
        let l = std::net::TcpListener::bind(admin.addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| SuperviseError::Admin {
                addr: admin.addr,
                source,
            })?;
        crate::tail::enable();
        tracing::info!(
            "admin listener on {} (dashboard at http://{}/, /metrics, /status)",
            admin.addr,
            admin.addr
        );
        tokio::spawn(crate::admin::serve(
            l,
            admin.clone(),
            admin_calls,
            up.clone(),
        ));
    }
    let dispatcher = match &listeners {
        Listeners::Dispatch(l) => {
            let l = l.try_clone().map_err(|source| ListenError::Bind {
                addr: bound,
                source,
            })?;
            let tx = tx.clone();
            Some(Dispatcher::start(l, s.balance.clone(), move |epoch| {
                let _ = tx.send(Event::Ready { epoch, addr: None });
            })?)
        }
        _ => None,
    };
    let preloads = if s.command.is_empty() {
        None
    } else {
        Some(process::Preloads::write(rundir.workers_path()).map_err(SuperviseError::Preload)?)
    };
    let stable = crate::config::Release {
        command: s.command.clone(),
        program: s.program.clone(),
        cwd: s.cwd.clone(),
        env: s.env.clone(),
        base_env: s
            .relaunch
            .base_env
            .as_ref()
            .map(|e| e.iter().map(|(k, v)| (k.into(), v.into())).collect()),
    };
    let stable = Spec::new(
        stable,
        preloads.as_ref(),
        s.node_shim,
        s.python_shim,
        s.python_stop,
        s.perl_stop,
        Default::default(),
    );
    let limits = Limits {
        restart: RestartPolicy {
            min_uptime: s.min_uptime,
            restart_delay: s.restart_delay,
            max_restart_delay: s.max_restart_delay,
            max_restarts: s.max_restarts,
            ready_timeout: s.ready_timeout,
            autorestart: s.autorestart,
            stop_exit_codes: s.stop_exit_codes,
        },
        drain_timeout: s.drain_timeout,
        kill_timeout: s.kill_timeout,
        watchdog: s.watchdog,
        max_memory: s.max_memory,
        not_ready_hint: match s.mode {
            Mode::Dispatch => {
                " (in dispatch mode a worker takes its connections from fd 3, HERD_DISPATCH_FD, and says {\"herd\":\"listening\"} there; READY=1 alone does not count. A server that binds a port itself, as gunicorn or uvicorn do, needs --mode proxy, shared or reuseport; see the README's Dispatch mode)"
            }
            Mode::Fork => "",
            _ if s.wait_ready => "",
            _ => {
                " (it has not listened; a program that serves no port, as a queue consumer, runs with --mode fork)"
            }
        },
        stop_first: s.mode == Mode::Fork,
    };
    let cron = s.cron_restart.clone().map(|c| {
        let now = chrono::Local::now();
        let c = cron::Schedule::new(c, &now);
        let next = c.next_text();
        tracing::info!("cron-restart {}: first reload at {next}", c.pattern());
        c
    });
    let copies = crate::output::Copies::open(&s)
        .map_err(|(path, source)| SuperviseError::OutputFile { path, source })?;
    let mode = s.mode;
    let group = match &listeners {
        Listeners::ReusePort(socks) => steer::Group::in_order(socks.len()),
        _ => steer::Group::default(),
    };
    let mut sup = Supervisor {
        m: Machine::new(s.instances, limits),
        procs: HashMap::new(),
        s,
        listeners: Some(listeners),
        rundir,
        guardian,
        output: Output::start(copies, mode),
        tx,
        rx,
        up,
        active: Arc::new(Active::default()),
        stop_accepting: CancellationToken::new(),
        hold_control,
        close_idle: CancellationToken::new(),
        control_fd,
        lock_fd,
        upgrading: None,
        exit_code: 0,
        give_up: false,
        started: Instant::now(),
        dispatcher,
        specs: HashMap::from([(0, Arc::new(stable))]),
        preloads,
        rollout: None,
        reloads: control::Reloads::default(),
        latency: Default::default(),
        ticks: 0,
        reload_reply: None,
        stop_reply: None,
        calls,
        stopping: false,
        samples: ops::Samples::default(),
        startup_failures: Some(Vec::new()),
        watch_due: None,
        cron,
        hosts,
        tls,
        http: None,
        stalls: Vec::new(),
        port_hinted: false,
        said_steer_failed: false,
        steered: None,
        leaving: Vec::new(),
        leaving_workers: Vec::new(),
        group,
        listeners_seen: Instant::now(),
        daemon_hinted: false,
        lingering: Vec::new(),
        awaiting_port: None,
        failed: None,
    };
    let access_log = match &sup.s.access_log {
        Some(cfg) if sup.s.mode == Mode::Proxy => Some(Arc::new(
            proxy::access::AccessLog::start(cfg).map_err(SuperviseError::AccessLog)?,
        )),
        _ => None,
    };
    if sup.s.mode == Mode::Proxy {
        let proto = match sup.s.protocol {
            Protocol::Http => {
                let s = &sup.s;
                let tls_up = s.upstreams.iter().any(|u| u.tls) || s.discovery.iter().any(|d| d.tls);
                let client_tls = proxy::h2::ClientTls::new(proxy::upstream_tls_files(s, tls_up))
                    .map_err(SuperviseError::UpstreamTls)?;
                let mut h = HttpProxy::new(
                    sup.up.clone(),
                    s.http.clone(),
                    access_log.clone(),
                    Arc::new(client_tls),
                );
                h.tls = sup.tls.clone();
                h.accept_proxy =
                    proxy::ExpectProxy::new(&s.accept_proxy, s.http.limits.header_timeout);
                let h2 = s.workers_h2
                    || tls_up
                    || s.upstreams.iter().any(|u| u.h2)
                    || s.discovery.iter().any(|d| d.h2);
                h.h2_backends
                    .store(h2, std::sync::atomic::Ordering::Relaxed);
                let h = Arc::new(h);
                sup.http = Some(h.clone());
                proxy::Protocol::Http(h)
            }
            Protocol::Tcp => proxy::Protocol::Tcp(Arc::new(TcpProxy {
                log: access_log.clone(),
                up: sup.up.clone(),
                connect_timeout: sup.s.connect_timeout,
                wait_for_backend: sup.s.ready_timeout,
                accept_proxy: proxy::ExpectProxy::new(
                    &sup.s.accept_proxy,
                    sup.s.http.limits.header_timeout,
                ),
                send_proxy: sup.s.send_proxy,
            })),
        };
        match &sup.listeners {
            Some(Listeners::Proxy(_)) => sup.serve(proto)?,
            _ => {
                sup.awaiting_port = Some(port::AwaitingPort {
                    proto,
                    held: Vec::new(),
                    since: None,
                    unbound: false,
                })
            }
        }
        tokio::spawn(upstream::health_loop(
            sup.up.clone(),
            sup.s.health.clone(),
            sup.stop_accepting.clone(),
        ));
        if let Some(addr) = sup.s.tls.as_ref().and_then(|t| t.redirect) {
            let redirect = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|source| SuperviseError::Redirect { addr, source })?;
            tracing::info!(
                "plain HTTP on {addr} redirects to https:// on port {}",
                bound.port()
            );
            tokio::spawn(proxy::tls::redirect(
                redirect,
                bound.port(),
                sup.s.accept_proxy.clone(),
            ));
        }
        if !sup.s.discovery.is_empty() {
            tokio::spawn(upstream::discover::run(
                sup.up.clone(),
                sup.s.discovery.clone(),
                sup.s.resolver,
            ));
        }
    }
    sup.apply(Input::Start, None);
    let mut failures = sup.startup_failures.take().unwrap_or_default();
    if !failures.is_empty() {
        sup.apply(Input::Stop, None);
        for (epoch, _) in &failures {
            let why = String::new();
            sup.apply(Input::SpawnFailed { epoch: *epoch, why }, None);
        }
        sup.shutdown(&mut stop).await;
        sup.end_adopted();
        return Err(failures.swap_remove(0).1);
    }
    if !sup.s.upstreams.is_empty() {
        tracing::info!(
            "{}: {} upstream{}, balance {}",
            sup.s.name,
            sup.s.upstreams.len(),
            if sup.s.upstreams.len() == 1 { "" } else { "s" },
            sup.s.balance
        );
    }
    if !sup.s.watch.is_empty() {
        // Writing a log must not count as a change.
        let log = [&sup.s.log_file, &sup.s.out_file, &sup.s.error_file]
            .into_iter()
            .flatten()
            .map(|f| std::path::absolute(f).unwrap_or(f.clone()));
        let ignore =
            crate::watch::Ignore::new(&sup.s.watch, &sup.s.watch_ignore, &log.collect::<Vec<_>>())?;
        let tx = sup.tx.clone();
        crate::watch::start(sup.s.watch.clone(), ignore, move |p| {
            tx.send(Event::Changed(p)).is_ok()
        })?;
        let shown: Vec<_> = sup
            .s
            .watch
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        tracing::info!("watching {} for changes", shown.join(", "));
    }
    for w in &sup.s.warnings {
        tracing::warn!("{w}");
    }
    if upgraded {
        tracing::info!(
            "upgraded in place to herd {} (master pid {} kept)",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
    }
    tracing::info!(
        "{}: {}, {}{}{}{}",
        sup.s.name,
        crate::console::count(sup.s.instances, "worker"),
        match sup.s.mode {
            Mode::Fork => crate::console::served(sup.s.mode.as_str(), ""),
            m if sup.awaiting_port.is_some() => format!(
                "{} mode, to listen on the port the app's listen() names (else {bound}; --listen picks one)",
                m.as_str()
            ),
            m => format!("{} mode, listening on {bound}", m.as_str()),
        },
        if activated {
            " (the socket systemd passed)"
        } else {
            ""
        },
        match &sup.s.accept_proxy {
            AcceptProxy::Off => String::new(),
            AcceptProxy::All => " (each connection must begin with a PROXY protocol header)".into(),
            AcceptProxy::From(nets) => format!(
                " (each connection from {} must begin with a PROXY protocol header)",
                nets.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        sup.s
            .source
            .config
            .as_ref()
            .map_or(String::new(), |c| format!(" (config: {})", c.display()))
    );

    while !sup.give_up {
        let deadline = sup.m.next_deadline();
        tokio::select! {
            Some(ev) = sup.rx.recv() => sup.on_event(ev),
            sig = stop.recv() => {
                tracing::info!("{sig}: stopping gracefully (again to stop now)");
                break;
            }
            _ = ops.hup.recv() => {
                tracing::info!("SIGHUP: rolling reload");
                sup.reload_tls();
                sup.reload_upstream_crl();
                sup.reload_upstreams();
                sup.apply(Input::Reload { slots: None }, None);
            }
            _ = ops.ttin.recv() => sup.scale_signal(1),
            _ = ops.ttou.recv() => sup.scale_signal(-1),
            _ = tick.tick() => {
                sup.on_tick();
                sup.reap_adopted();
                sup.end_lingering();
                if systemd_watchdog {
                    let _ = herd_sdk::notify("WATCHDOG=1");
                }
            }
            _ = sigchld.recv() => {
                sup.reap_adopted();
                sup.end_lingering();
            }
            _ = ops.usr2.recv() => match sup.upgrade_check() {
                Ok(exe) => {
                    tracing::info!("SIGUSR2: upgrading herd in place");
                    sup.upgrading = Some((exe, None));
                    break;
                }
                Err(e) => tracing::error!("SIGUSR2: cannot upgrade: {e}"),
            },
            _ = sleep_until(deadline) => sup.apply(Input::Timer, None),
            _ = sleep_until(sup.watch_due.as_ref().map(|d| d.0)) => sup.on_watch_due(),
            Some(call) = sup.calls.recv() => {
                if sup.on_call(call) {
                    break;
                }
            }
        }
    }
    if let Some((exe, reply)) = sup.upgrading.take() {
        if let Some(r) = &reply {
            let _ = r.send(Line::progress(format!("re-executing {}", exe.display())));
        }
        drop(reply); // the caller then waits for the new master's status
        if let Some(why) = sup.upgrade(exe, &mut stop, &mut ops).await {
            // The workers are gone: the master cannot go back. Exit non-zero;
            // systemd's Restart=on-failure starts it again on the same socket.
            tracing::error!("upgrade failed: {why}");
            return Ok(1);
        }
    }
    let _ = herd_sdk::notify("STOPPING=1");
    sup.shutdown(&mut stop).await;
    sup.end_adopted();
    if let Some(e) = sup.failed.take() {
        return Err(e);
    }
    if let Some(written) = sup.stop_reply.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), written).await;
    }
    if sup.s.access_log.is_some() && sup.s.mode == Mode::Proxy {
        // The proxy threads hand their last lines over as they end; give
        // the writer a moment to put them in the file.
        std::thread::sleep(Duration::from_millis(150));
    }
    if sup.give_up {
        // Ended by itself (a crash loop, or --autorestart=false or
        // --stop-exit-codes with no worker left): `herd list` shows it, `herd restart NAME` starts it
        // again, as PM2 keeps an errored or stopped app.
        let errored = sup.exit_code != 0;
        let relaunch = Some(sup.s.relaunch.clone());
        if let Err(e) =
            crate::boot::remember_stopped(&sup.s.name, std::process::id(), errored, relaunch)
        {
            tracing::debug!("not recorded as stopped: {e}");
        }
    }
    tracing::info!("{}: stopped", sup.s.name);
    Ok(sup.exit_code)
}

/// Whether systemd asked this process for watchdog pings (`WATCHDOG_USEC`,
/// with `WATCHDOG_PID` unset or ours). The supervisor pings every second,
/// so `WatchdogSec=` should be 2 s or more.
fn systemd_watchdog() -> bool {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let ours = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    match usec {
        Some(us) if ours && std::env::var_os("NOTIFY_SOCKET").is_some() => {
            if us < 2_000_000 {
                tracing::warn!("WatchdogSec= under 2s: herd pings once a second");
            }
            true
        }
        _ => false,
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    /// The worker's process group is gone (its main process first): the
    /// machine learns it exited.
    fn exited(&mut self, epoch: Epoch, status: std::io::Result<ExitStatus>) {
        let how = match &status {
            Ok(st) => describe(st),
            Err(e) => format!("could not be waited for ({e})"),
        };
        let code = status.as_ref().ok().and_then(ExitStatus::code);
        let daemon = (code == Some(0)).then(|| self.daemonized(epoch)).flatten();
        self.apply(Input::Exited { epoch, how, code }, None);
        // A server may shut its listening socket down as it ends.
        self.revive_listeners();
        if let Some(hint) = daemon {
            tracing::warn!("{hint}");
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Exited { epoch, status } => {
                if self.group_lives_on(epoch) {
                    if let (Some(w), Some(p)) = (self.m.find(epoch), self.procs.get(&epoch)) {
                        tracing::info!(
                            "worker {}: its main process (pid {}) ended; waiting for the processes it started (its group)",
                            w.slot,
                            p.pid
                        );
                    }
                    // Looked at again once the group's zombies are reaped.
                    self.lingering.push((epoch, status));
                    self.end_lingering();
                    return;
                }
                self.exited(epoch, status);
            }
            Event::Ready { epoch, addr } => {
                if let Some(p) = self.procs.get_mut(&epoch) {
                    p.serving_at(addr);
                }
                // Listening on its private port before its port message came.
                if addr.is_none() || !self.hold_ready(epoch) {
                    self.apply(Input::Ready { epoch }, None);
                }
            }
            Event::Pinged { epoch } => self.apply(Input::Pinged { epoch }, None),
            Event::Drained { epoch } => self.apply(Input::Drained { epoch }, None),
            Event::CheckListeners => {
                // One look serves every worker stopping at once.
                if self.listeners_seen.elapsed() >= Duration::from_millis(15) {
                    self.listeners_seen = Instant::now();
                    self.revive_listeners();
                }
            }
            Event::Message { epoch, msg, credit } => {
                self.on_message(epoch, msg);
                drop(credit);
            }
            Event::Remote(m) => self.on_remote(m),
            Event::Undeliverable {
                epoch,
                to,
                data,
                error,
            } => self.undeliverable(epoch, &to, &data, &error),
            // Debounced: the reload waits for the changes to be quiet.
            Event::Changed(path) => {
                let due = Instant::now() + self.s.watch_delay;
                let first = self.watch_due.take().map_or(path, |(_, p)| p);
                self.watch_due = Some((due, first));
            }
        }
    }

    fn on_watch_due(&mut self) {
        let Some((_, path)) = self.watch_due.take() else {
            return;
        };
        if self.m.reloading() {
            // After the running reload, so the new code is what serves.
            self.watch_due = Some((Instant::now() + self.s.watch_delay, path));
            return;
        }
        tracing::info!("{} changed: rolling reload", path.display());
        self.apply(Input::Reload { slots: None }, None);
    }

    /// Feeds `input` to the machine and carries out its actions, feeding
    /// back what they lead to (a spawn's pid or failure). `caller` is the
    /// control connection that asked, if one did.
    fn apply(&mut self, input: Input, mut caller: Option<UnboundedSender<Line>>) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for action in self.m.on(input, Instant::now()) {
                match action {
                    Action::Spawn {
                        slot,
                        epoch,
                        version,
                    } => match self.spawn(slot, epoch, version) {
                        Ok(pid) => inputs.push_back(Input::Started { epoch, pid }),
                        Err(e) => match &mut self.startup_failures {
                            Some(failed) => failed.push((epoch, e)),
                            None => inputs.push_back(Input::SpawnFailed {
                                epoch,
                                why: e.to_string(),
                            }),
                        },
                    },
                    Action::Publish => self.publish(),
                    Action::Drain { epoch } => self.drain(epoch),
                    Action::Terminate { epoch } => self.terminate(epoch),
                    Action::Kill { epoch } => {
                        if let Some(p) = self.procs.get(&epoch) {
                            kill_group(p.pid, Signal::SIGKILL);
                        }
                    }
                    Action::Forget { epoch } => self.forget(epoch),
                    // Tell systemd (Type=notify) when herd itself runs under it.
                    Action::AllReady => {
                        let _ = herd_sdk::ready();
                    }
                    Action::ReloadBegun => self.reload_reply = caller.take(),
                    Action::Progress(msg) => {
                        if let Some(r) = &self.reload_reply {
                            let _ = r.send(Line::progress(msg));
                        }
                    }
                    Action::ReloadDone { replaced } => {
                        self.reloads.done += 1;
                        if let Some(r) = self.reload_reply.take() {
                            let done = Done {
                                replaced: Some(replaced),
                                ..Done::ok()
                            };
                            let _ = r.send(done.into());
                        }
                    }
                    Action::ReloadFailed(msg) => {
                        if msg.starts_with("reload aborted") {
                            self.reloads.aborted += 1;
                        }
                        if let Some(r) = caller.take().or_else(|| self.reload_reply.take()) {
                            let _ = r.send(Done::failed(msg).into());
                        }
                    }
                    Action::Answer(answer) => {
                        let done = match answer {
                            Ok(Answer::Restarted(n)) => Done {
                                restarted: Some(n),
                                ..Done::ok()
                            },
                            Ok(Answer::Scaled(n)) => Done {
                                workers: Some(n),
                                ..Done::ok()
                            },
                            Ok(Answer::Deployed(n)) => Done {
                                deployed: Some(n),
                                ..Done::ok()
                            },
                            Ok(Answer::RolledBack(n)) => Done {
                                rolled_back: Some(n),
                                ..Done::ok()
                            },
                            Err(e) => Done::failed(e),
                        };
                        if let Some(r) = caller.take() {
                            let _ = r.send(done.into());
                        }
                    }
                    Action::CrashLoop(_) => {
                        self.exit_code = 1;
                        self.give_up = true;
                    }
                    Action::AllEnded => self.give_up = true,
                }
            }
        }
    }
}

/// Removes a file (the control socket) when the master ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn describe(st: &ExitStatus) -> String {
    if let Some(code) = st.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = st.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("was killed by {}", s.as_str()),
            Err(_) => format!("was killed by signal {sig}"),
        }
    } else {
        format!("ended ({st})")
    }
}

/// More connections than the usual soft limit of 1024, at no cost.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::debug!("cannot raise RLIMIT_NOFILE: {e}");
    }
}
