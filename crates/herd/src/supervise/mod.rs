//! The supervisor: one task that owns every worker slot and reacts to
//! events (exits, readiness, timers, signals). No locks — the only shared
//! state it writes is the ready-backend list the proxy reads.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

mod ops;
mod policy;
mod signals;

use policy::{Decision, Ending, RestartPolicy};
use signals::StopSignals;

use crate::config::{Mode, Protocol, Settings};
use crate::control::{self, Call, ControlError};
use crate::dispatch::{DispatchError, Dispatcher, PeerInfo};
use crate::os::guardian::Guardian;
use crate::os::listen::{ListenError, Listeners};
use crate::os::rundir::{RunDir, RunDirError};
use crate::os::sys::{self, ExecSpec};
use crate::output::{Output, Stream};
use crate::proxy::{self, Active, HttpProxy, TcpProxy};
use crate::upstream::{self, Target, Upstreams};
use herd_balance::BackendConfig;
use herd_sdk::env as contract;

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
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
    #[error("cannot write the Node preload module: {0}")]
    NodeShim(std::io::Error),
}

/// In fd modes a worker that never speaks sd_notify is taken as ready after this.
const FD_READY_GRACE: Duration = Duration::from_secs(1);
/// Interval of the proxy-mode port probe.
const PROBE_EVERY: Duration = Duration::from_millis(50);

enum Event {
    Exited {
        epoch: u64,
        status: std::io::Result<ExitStatus>,
    },
    Ready {
        epoch: u64,
        /// The loopback address the port probe reached, if it did.
        addr: Option<SocketAddr>,
    },
    ReadyTimeout {
        epoch: u64,
    },
    Restart {
        slot: usize,
    },
    /// A retiring worker has no request in flight any more (or the wait
    /// timed out): time for SIGTERM.
    Drained {
        epoch: u64,
    },
    /// `--kill-timeout` after SIGTERM: SIGKILL if it is still there.
    KillCheck {
        epoch: u64,
    },
    /// A line from a worker's message channel.
    Message {
        epoch: u64,
        msg: Result<serde_json::Value, String>,
    },
}

/// Where a worker of a given epoch is.
#[derive(Clone, Copy)]
enum Place {
    /// Serving its slot.
    Current(usize),
    /// Starting to replace its slot's worker (rolling reload).
    Next(usize),
    /// Leaving: index into `retiring`.
    Retiring(usize),
}

struct Worker {
    epoch: u64,
    pid: u32,
    started: Instant,
    ready: bool,
    port: Option<u16>,
    /// Proxy mode: this worker as a balancing target.
    target: Option<Arc<Target>>,
    failed_start: bool,
    notify_path: PathBuf,
    tasks: Vec<AbortHandle>,
    /// When it last sent WATCHDOG=1, in ms on `Supervisor::started` (+1; 0 = never).
    pings: Arc<AtomicU64>,
    /// Ticks in a row its RSS was above `--max-memory`.
    over_memory: u32,
    watchdog_fired: bool,
    ipc: Option<crate::ipc::Channel>,
    /// Dispatch mode: its hand-off counts.
    dispatch: Option<Arc<PeerInfo>>,
}

#[derive(Default)]
struct Slot {
    worker: Option<Worker>,
    /// The replacement a rolling reload is starting.
    next: Option<Worker>,
    /// Its quick exits in a row, for the restart policy.
    record: policy::Record,
    restarts: u64,
    last_exit: Option<String>,
}

pub struct Supervisor {
    s: Settings,
    listeners: Option<Listeners>,
    rundir: RunDir,
    guardian: Guardian,
    output: Output,
    slots: Vec<Slot>,
    next_epoch: u64,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    up: Arc<Upstreams>,
    active: Arc<Active>,
    stop_accepting: CancellationToken,
    all_ready_once: bool,
    exit_code: i32,
    /// Workers on their way out: drained, then SIGTERM, then SIGKILL.
    retiring: Vec<(usize, Worker)>,
    reload: Option<ops::Reload>,
    started: Instant,
    dispatcher: Option<Dispatcher>,
    /// `NODE_OPTIONS` preloading herd's Node module, when it is used.
    node_options: Option<OsString>,
    /// A `herd stop` caller's connection, answered before the master exits.
    stop_reply: Option<tokio::sync::oneshot::Receiver<()>>,
    /// CPU samples of `herd status`, kept by the blocking task that reads `/proc`.
    samples: ops::Samples,
}

/// Runs the cluster until it is stopped; returns the process exit code.
///
/// Must be awaited on the main thread (`main` runs it with `block_on`): the
/// kernel's parent-death signal fires when the *thread* that forked a
/// worker exits, and the main thread lives exactly as long as the master.
pub async fn run(s: Settings) -> Result<i32, SuperviseError> {
    raise_nofile();
    let proxy_threads = crate::os::cpus::usable();
    let listen_slots = match s.mode {
        Mode::Proxy => proxy_threads,
        _ => s.instances,
    };
    let listeners = Listeners::bind(s.mode, s.listen, listen_slots)?;
    let bound = listeners.local_addr().unwrap_or(s.listen);
    let rundir = RunDir::create()?;
    let guardian = Guardian::spawn().map_err(SuperviseError::Guardian)?;
    let (control_listener, control_path, name, _name_lock) =
        control::bind_name(&s.name, s.name_given)?;
    let mut s = s;
    s.name = name;
    s.listen = bound;
    let _control_file = RemoveOnDrop(control_path);
    let mut stop = StopSignals::new().map_err(SuperviseError::Signals)?;
    signals::log_unused();
    let mut sighup = signal(SignalKind::hangup()).map_err(SuperviseError::Signals)?;
    let mut sigttin =
        signal(SignalKind::from_raw(libc::SIGTTIN)).map_err(SuperviseError::Signals)?;
    let mut sigttou =
        signal(SignalKind::from_raw(libc::SIGTTOU)).map_err(SuperviseError::Signals)?;
    let (calls_tx, mut calls) = mpsc::unbounded_channel::<Call>();
    tokio::spawn(control::serve(control_listener, calls_tx));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (tx, rx) = mpsc::unbounded_channel();
    let up = Arc::new(Upstreams::new(s.balance.clone(), &s.upstreams));
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
    let node_options = if s.node_shim && !s.command.is_empty() {
        let path = crate::node::write_shim(rundir.path()).map_err(SuperviseError::NodeShim)?;
        Some(crate::node::node_options(&path, &s.env))
    } else {
        None
    };
    let mut sup = Supervisor {
        slots: (0..s.instances).map(|_| Slot::default()).collect(),
        s,
        listeners: Some(listeners),
        rundir,
        guardian,
        output: Output::start(),
        next_epoch: 0,
        tx,
        rx,
        up,
        active: Arc::new(Active::default()),
        stop_accepting: CancellationToken::new(),
        all_ready_once: false,
        exit_code: 0,
        retiring: Vec::new(),
        reload: None,
        started: Instant::now(),
        dispatcher,
        node_options,
        stop_reply: None,
        samples: ops::Samples::default(),
    };
    if let Some(Listeners::Proxy(socks)) = &sup.listeners {
        let mut listeners = Vec::new();
        for l in socks {
            listeners.push(l.try_clone().map_err(|source| ListenError::Bind {
                addr: bound,
                source,
            })?);
        }
        let proto = match sup.s.protocol {
            Protocol::Http => {
                proxy::Protocol::Http(Arc::new(HttpProxy::new(sup.up.clone(), sup.s.http.clone())))
            }
            Protocol::Tcp => proxy::Protocol::Tcp(Arc::new(TcpProxy {
                up: sup.up.clone(),
                connect_timeout: sup.s.connect_timeout,
                wait_for_backend: sup.s.ready_timeout,
            })),
        };
        proxy::start_threads(
            listeners,
            proto,
            sup.active.clone(),
            sup.stop_accepting.clone(),
        )
        .map_err(|source| ListenError::Bind {
            addr: bound,
            source,
        })?;
        tokio::spawn(upstream::health_loop(sup.up.clone(), sup.s.health.clone()));
    }
    for slot in 0..sup.slots.len() {
        if let Err(e) = sup.spawn(slot) {
            sup.shutdown(&mut stop).await;
            return Err(e);
        }
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
    if sup.slots.is_empty() {
        sup.all_ready_once = true;
        tracing::info!("all workers ready (0)");
    }
    tracing::info!(
        "{}: {} worker{}, {} mode, listening on {bound}",
        sup.s.name,
        sup.s.instances,
        if sup.s.instances == 1 { "" } else { "s" },
        sup.s.mode.as_str()
    );

    loop {
        tokio::select! {
            Some(ev) = sup.rx.recv() => {
                if sup.handle(ev) {
                    break;
                }
            }
            sig = stop.recv() => {
                tracing::info!("{sig}: stopping gracefully (again to stop now)");
                break;
            }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: rolling reload");
                sup.reload_start(None);
            }
            _ = sigttin.recv() => sup.scale_signal(1),
            _ = sigttou.recv() => sup.scale_signal(-1),
            _ = tick.tick() => sup.on_tick(),
            Some(call) = calls.recv() => {
                if sup.on_call(call) {
                    break;
                }
            }
        }
    }
    sup.shutdown(&mut stop).await;
    if let Some(written) = sup.stop_reply.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), written).await;
    }
    tracing::info!("{}: stopped", sup.s.name);
    Ok(sup.exit_code)
}

impl Supervisor {
    /// Returns true when the cluster must stop.
    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Ready { epoch, addr } => match self.place(epoch) {
                Some(Place::Current(slot)) => {
                    if let Some(w) = self.slots[slot].worker.as_mut() {
                        w.serving_at(addr);
                    }
                    self.on_ready(slot, epoch);
                }
                Some(Place::Next(slot)) => {
                    if let Some(w) = self.slots[slot].next.as_mut() {
                        w.serving_at(addr);
                    }
                    self.reload_swap(slot);
                }
                _ => {}
            },
            Event::ReadyTimeout { epoch } => {
                let limit = self.s.ready_timeout;
                match self.place(epoch) {
                    Some(Place::Current(slot)) => {
                        let dispatch = self.s.mode == Mode::Dispatch;
                        if let Some(w) = self.slots[slot].worker.as_mut().filter(|w| !w.ready) {
                            let hint = if dispatch {
                                " (in dispatch mode a worker says READY=1, or takes connections on HERD_DISPATCH_FD; see the README)"
                            } else {
                                ""
                            };
                            tracing::warn!(
                                "worker {slot} (pid {}) not ready within {limit:?}; killing it{hint}",
                                w.pid
                            );
                            w.failed_start = true;
                            kill_group(w.pid, Signal::SIGKILL);
                        }
                    }
                    Some(Place::Next(slot)) => {
                        self.reload_abort(
                            slot,
                            &format!("the new worker was not ready within {limit:?}"),
                        );
                    }
                    _ => {}
                }
            }
            Event::Exited { epoch, status } => match self.place(epoch) {
                Some(Place::Current(slot)) => return self.on_exit(slot, epoch, status),
                Some(Place::Next(slot)) => {
                    // Already gone: clean up here, no further event will come.
                    if let Some(w) = self.slots[slot].next.take() {
                        self.retire(&w);
                    }
                    let how = status.map_or_else(|e| e.to_string(), |s| describe(&s));
                    self.reload_fail(&format!(
                        "worker {slot}: the new worker {how} before it was ready"
                    ));
                }
                Some(Place::Retiring(i)) => {
                    let (slot, w) = self.retiring.remove(i);
                    self.retire(&w);
                    let how = status.map_or_else(|e| e.to_string(), |s| describe(&s));
                    tracing::info!("worker {slot} (pid {}) {how} (retired)", w.pid);
                    self.reload_old_gone(epoch);
                }
                None => {}
            },
            Event::Restart { slot } => {
                if slot < self.slots.len()
                    && self.slots[slot].worker.is_none()
                    && let Err(e) = self.spawn(slot)
                {
                    tracing::error!("worker {slot}: {e}");
                    return self.on_end(slot, &Ending::SpawnFailed { why: e.to_string() });
                }
            }
            Event::Message { epoch, msg } => self.on_message(epoch, msg),
            Event::Drained { epoch } => {
                if let Some(Place::Retiring(i)) = self.place(epoch) {
                    let w = &self.retiring[i].1;
                    let notice = w.ipc.as_ref().map(|ch| ch.shutdown_notice());
                    let (pid, tx, grace) = (w.pid, self.tx.clone(), self.s.kill_timeout);
                    // The notice first, then SIGTERM, then SIGKILL after the grace.
                    tokio::spawn(async move {
                        crate::ipc::notice_written(notice).await;
                        kill_group(pid, Signal::SIGTERM);
                        tokio::time::sleep(grace).await;
                        let _ = tx.send(Event::KillCheck { epoch });
                    });
                }
            }
            Event::KillCheck { epoch } => {
                if let Some(Place::Retiring(i)) = self.place(epoch) {
                    let w = &self.retiring[i].1;
                    tracing::warn!(
                        "worker {} (pid {}) still running after SIGTERM; SIGKILL",
                        self.retiring[i].0,
                        w.pid
                    );
                    kill_group(w.pid, Signal::SIGKILL);
                }
            }
        }
        false
    }

    fn place(&self, epoch: u64) -> Option<Place> {
        for (i, s) in self.slots.iter().enumerate() {
            if s.worker.as_ref().is_some_and(|w| w.epoch == epoch) {
                return Some(Place::Current(i));
            }
            if s.next.as_ref().is_some_and(|w| w.epoch == epoch) {
                return Some(Place::Next(i));
            }
        }
        self.retiring
            .iter()
            .position(|(_, w)| w.epoch == epoch)
            .map(Place::Retiring)
    }

    /// Sends `ev` to the supervisor after `delay`.
    fn after(&self, delay: Duration, ev: Event) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(ev);
        });
    }

    fn current(&mut self, slot: usize, epoch: u64) -> Option<&mut Worker> {
        self.slots[slot]
            .worker
            .as_mut()
            .filter(|w| w.epoch == epoch)
    }

    fn on_ready(&mut self, slot: usize, epoch: u64) {
        let Some(w) = self.current(slot, epoch) else {
            return;
        };
        if w.ready {
            return; // READY=1 and a dispatch `listening` line both came
        }
        w.ready = true;
        let pid = w.pid;
        tracing::info!("worker {slot} ready (pid {pid})");
        self.publish();
        if !self.all_ready_once
            && self
                .slots
                .iter()
                .all(|s| s.worker.as_ref().is_some_and(|w| w.ready))
        {
            self.all_ready_once = true;
            tracing::info!("all workers ready ({})", self.slots.len());
            // Tell systemd (Type=notify) when herd itself runs under it.
            let _ = herd_sdk::ready();
        }
    }

    fn on_exit(&mut self, slot: usize, epoch: u64, status: std::io::Result<ExitStatus>) -> bool {
        let Some(w) = self.slots[slot].worker.take_if(|w| w.epoch == epoch) else {
            return false;
        };
        self.retire(&w);
        self.publish();
        let uptime = w.started.elapsed();
        let how = match &status {
            Ok(st) => describe(st),
            Err(e) => format!("could not be waited for ({e})"),
        };
        self.slots[slot].last_exit = Some(how.clone());
        self.slots[slot].restarts += 1;
        tracing::warn!(
            "worker {slot} (pid {}) {how} after {:.1?}",
            w.pid,
            Duration::from_millis(uptime.as_millis() as u64)
        );
        let ending = if w.failed_start {
            Ending::NotReady
        } else {
            Ending::Exited { ran: uptime, how }
        };
        self.on_end(slot, &ending)
    }

    /// Carries out the restart policy's decision for a slot whose worker
    /// ended; true when the cluster must stop (a crash loop).
    fn on_end(&mut self, slot: usize, ending: &Ending) -> bool {
        let policy = RestartPolicy {
            min_uptime: self.s.min_uptime,
            restart_delay: self.s.restart_delay,
            max_restart_delay: self.s.max_restart_delay,
            max_restarts: self.s.max_restarts,
            ready_timeout: self.s.ready_timeout,
        };
        match policy.on_end(slot, &mut self.slots[slot].record, ending) {
            Decision::Restart { after } => {
                self.schedule_restart(slot, after);
                false
            }
            Decision::CrashLoop { message } => {
                tracing::error!("{message}");
                self.exit_code = 1;
                true
            }
        }
    }

    fn schedule_restart(&self, slot: usize, delay: Duration) {
        if delay.is_zero() {
            tracing::info!("restarting worker {slot} now");
        } else {
            tracing::info!("restarting worker {slot} in {delay:?}");
        }
        self.after(delay, Event::Restart { slot });
    }

    /// Cleans up after a worker's main process exited.
    fn retire(&mut self, w: &Worker) {
        for t in &w.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&w.notify_path);
        // Whatever the worker left behind in its group is of no use now and
        // may hold the port: a worker is its whole process group.
        kill_group(w.pid, Signal::SIGKILL);
        self.guardian.forget(w.pid);
        if let Some(d) = &self.dispatcher {
            d.remove(w.epoch);
        }
    }

    fn publish(&self) {
        if let Some(d) = &self.dispatcher {
            let ready = self
                .slots
                .iter()
                .filter_map(|s| s.worker.as_ref())
                .filter(|w| w.ready)
                .map(|w| w.epoch)
                .collect();
            d.serving(ready);
            return;
        }
        if self.s.mode != Mode::Proxy {
            return;
        }
        let ready = self
            .slots
            .iter()
            .filter_map(|s| s.worker.as_ref())
            .filter(|w| w.ready)
            .filter_map(|w| w.target.clone())
            .collect();
        self.up.set_workers(ready);
    }

    /// Starts a worker for `slot` as its current one.
    fn spawn(&mut self, slot: usize) -> Result<(), SuperviseError> {
        let w = self.start(slot)?;
        self.slots[slot].worker = Some(w);
        Ok(())
    }

    /// Starts a worker process for `slot`; the caller places it.
    fn start(&mut self, slot: usize) -> Result<Worker, SuperviseError> {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let spawn_err = |source: std::io::Error| SuperviseError::Spawn {
            command: self.s.command[0].to_string_lossy().into_owned(),
            source,
        };
        let port = match self.s.mode {
            Mode::Proxy => Some(self.free_port().map_err(spawn_err)?),
            _ => None,
        };
        let notify_path = self.rundir.path().join(format!("n{slot}.{epoch}"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).map_err(spawn_err)?;

        let mut env = worker_env(&self.s, slot, port, &notify_path);
        if let Some(opts) = &self.node_options {
            env.retain(|(k, _)| k != "NODE_OPTIONS");
            env.push(("NODE_OPTIONS".into(), opts.clone()));
        }
        let mut fds = Vec::new();
        // Dispatch mode: the worker's end of its hand-off socket at fd 3,
        // which Node also opens as its IPC channel.
        let dispatch_pair = match self.dispatcher {
            Some(_) => {
                let (master, worker) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
                fds.push((worker.as_raw_fd(), crate::dispatch::WORKER_FD));
                let fd = crate::dispatch::WORKER_FD.to_string();
                env.push((contract::DISPATCH_FD.into(), fd.clone().into()));
                if self.node_options.is_some() {
                    env.push(("NODE_CHANNEL_FD".into(), fd.into()));
                    env.push(("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into()));
                }
                if self.s.balance == herd_balance::StrategyKind::LeastConn {
                    env.push((contract::REPORT_OPEN.into(), "1".into()));
                }
                Some((master, worker))
            }
            None => None,
        };
        let listen_pid = match self.listen_fd(slot) {
            Some(fd) => {
                fds.push((fd, 3));
                env.push((contract::LISTEN_FDS.into(), "1".into()));
                env.push((contract::LISTEN_FDNAMES.into(), "herd".into()));
                true
            }
            None => false,
        };
        let (ipc_master, ipc_worker) = crate::ipc::pair().map_err(spawn_err)?;
        fds.push((crate::ipc::raw(&ipc_worker), crate::ipc::WORKER_FD));
        env.push((
            contract::IPC_FD.into(),
            crate::ipc::WORKER_FD.to_string().into(),
        ));
        let mut cmd = tokio::process::Command::new(&self.s.program);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        if let Some(dir) = &self.s.cwd {
            cmd.current_dir(dir);
        }
        sys::install(
            &mut cmd,
            ExecSpec {
                program: self.s.program.clone(),
                argv: self.s.command.clone(),
                env,
                listen_pid,
                fds,
                parent: std::process::id() as i32,
            },
        )?;
        let mut child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_file(&notify_path);
            spawn_err(e)
        })?;
        drop(ipc_worker); // the worker has its copy at fd 4
        let dispatch = dispatch_pair.map(|(master, worker)| {
            drop(worker);
            let info = PeerInfo::new(slot);
            if let Some(d) = &self.dispatcher {
                d.add(epoch, master, info.clone());
            }
            info
        });
        let pid = child.id().unwrap_or(0);
        self.guardian.watch(pid);
        let ipc = {
            let tx = self.tx.clone();
            crate::ipc::start(ipc_master, move |msg| {
                let _ = tx.send(Event::Message { epoch, msg });
            })
            .ok()
        };
        if let Some(out) = child.stdout.take() {
            self.output.pipe(slot, Stream::Out, out);
        }
        if let Some(err) = child.stderr.take() {
            self.output.pipe(slot, Stream::Err, err);
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Event::Exited { epoch, status });
        });
        let pings = Arc::new(AtomicU64::new(0));
        let readiness = tokio::spawn(readiness(
            notify,
            self.probe(port),
            self.s.ready_timeout,
            self.tx.clone(),
            epoch,
            (pings.clone(), self.started),
        ));
        tracing::info!("worker {slot} started (pid {pid})");
        let target = port.map(|p| {
            Arc::new(Target::new(
                SocketAddr::from((Ipv4Addr::LOCALHOST, p)),
                format!("worker-{slot}"),
                format!("worker {slot}"),
                BackendConfig::default(),
            ))
        });
        Ok(Worker {
            epoch,
            pid,
            started: Instant::now(),
            ready: false,
            port,
            target,
            failed_start: false,
            notify_path,
            tasks: vec![readiness.abort_handle()],
            pings,
            over_memory: 0,
            watchdog_fired: false,
            ipc,
            dispatch,
        })
    }

    /// A loopback port free right now and not given to a live worker that
    /// may not have bound it yet, for a proxy-mode worker to serve on.
    fn free_port(&self) -> std::io::Result<u16> {
        for _ in 0..16 {
            let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            let taken = self
                .slots
                .iter()
                .flat_map(|s| s.worker.iter().chain(s.next.iter()))
                .chain(self.retiring.iter().map(|(_, w)| w))
                .any(|w| w.port == Some(port));
            if !taken {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("no free loopback port"))
    }

    fn listen_fd(&self, slot: usize) -> Option<i32> {
        match self.listeners.as_ref()? {
            Listeners::Proxy(_) => None,
            Listeners::Shared(s) => Some(s.as_raw_fd()),
            Listeners::ReusePort(v) => v.get(slot).map(|s| s.as_raw_fd()),
            Listeners::Dispatch(_) => None,
        }
    }

    fn probe(&self, port: Option<u16>) -> Probe {
        match (self.s.wait_ready, port) {
            _ if self.s.mode == Mode::Dispatch => Probe::Dispatch,
            (true, _) => Probe::NotifyOnly,
            (false, Some(p)) => Probe::Port(p),
            (false, None) => Probe::Grace(FD_READY_GRACE.min(self.s.ready_timeout)),
        }
    }

    fn all_workers(&self) -> impl Iterator<Item = &Worker> {
        self.slots
            .iter()
            .flat_map(|s| s.worker.iter().chain(s.next.iter()))
            .chain(self.retiring.iter().map(|(_, w)| w))
    }

    fn live_workers(&self) -> usize {
        self.all_workers().count()
    }

    fn signal_all(&self, sig: Signal) {
        for w in self.all_workers() {
            kill_group(w.pid, sig);
        }
    }

    /// Stop accepting, drain relayed connections, SIGTERM every worker
    /// group, SIGKILL what is left after `--kill-timeout`. A second signal
    /// skips straight to SIGKILL.
    async fn shutdown(&mut self, stop: &mut StopSignals) {
        self.stop_accepting.cancel();
        if matches!(self.listeners, Some(Listeners::Proxy(_))) {
            // Refuse new connections now rather than queue them for no one;
            // the accept loop drops its clone as it sees the cancellation.
            self.listeners = None;
        }
        let grace = self.s.kill_timeout;
        let mut hurry = false;
        if let Some(d) = &self.dispatcher {
            // The dispatch thread's copy of the listening socket is then the
            // last: it takes what the kernel queued, closes, and every
            // connection accepted goes to a worker before any SIGTERM.
            self.listeners = None;
            tokio::select! {
                _ = d.stop() => {}
                _ = tokio::time::sleep(grace) => {
                    tracing::warn!("accepted connections still not taken by a worker after {grace:?}");
                }
                _ = stop.recv() => hurry = true,
            }
        }
        if self.s.mode == Mode::Proxy && self.active.get() > 0 {
            tracing::info!("waiting for {} open connections", self.active.get());
            let active = self.active.clone();
            tokio::select! {
                _ = active.drained() => {}
                _ = tokio::time::sleep(grace) => {
                    tracing::warn!("{} connections still open after {grace:?}", active.get());
                }
                _ = stop.recv() => hurry = true,
            }
        }
        if !hurry {
            let notices: Vec<_> = self
                .all_workers()
                .filter_map(|w| w.ipc.as_ref().map(|ch| ch.shutdown_notice()))
                .collect();
            for n in notices {
                crate::ipc::notice_written(Some(n)).await;
            }
            self.signal_all(Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + grace;
            while self.live_workers() > 0 {
                tokio::select! {
                    Some(ev) = self.rx.recv() => self.handle_while_stopping(ev),
                    _ = tokio::time::sleep_until(deadline) => {
                        tracing::warn!("workers still running after {grace:?}; sending SIGKILL");
                        break;
                    }
                    _ = stop.recv() => break,
                }
            }
        }
        self.signal_all(Signal::SIGKILL);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.live_workers() > 0 {
            tokio::select! {
                Some(ev) = self.rx.recv() => self.handle_while_stopping(ev),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // In fd modes the master's copies go last: workers still drain
        // the queues, and a reuseport slot's queue lives as long as its socket.
        self.listeners = None;
    }

    fn handle_while_stopping(&mut self, ev: Event) {
        let Event::Exited { epoch, status } = ev else {
            return;
        };
        let w = match self.place(epoch) {
            Some(Place::Current(slot)) => self.slots[slot].worker.take().map(|w| (slot, w)),
            Some(Place::Next(slot)) => self.slots[slot].next.take().map(|w| (slot, w)),
            Some(Place::Retiring(i)) => Some(self.retiring.remove(i)),
            None => None,
        };
        if let Some((slot, w)) = w {
            self.retire(&w);
            let how = status.map_or_else(|e| e.to_string(), |s| describe(&s));
            tracing::info!("worker {slot} (pid {}) {how}", w.pid);
        }
    }
}

impl Worker {
    /// A worker that listens on `[::1]` only (Node binding `localhost` where
    /// it resolves to ::1) is proxied there rather than to 127.0.0.1.
    fn serving_at(&mut self, addr: Option<SocketAddr>) {
        let (Some(addr), Some(t)) = (addr, &self.target) else {
            return;
        };
        if t.addr != addr {
            let (name, label) = (t.backend.name().to_string(), t.label.clone());
            self.target = Some(Arc::new(Target::new(
                addr,
                name,
                label,
                t.backend.config().clone(),
            )));
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

enum Probe {
    /// Ready when the worker's private port accepts a connection.
    Port(u16),
    /// Ready after a fixed grace (fd modes: the kernel queues meanwhile).
    Grace(Duration),
    /// Only `READY=1` counts (`--wait-ready`).
    NotifyOnly,
    /// Dispatch mode: only the worker's `listening` line on its dispatch
    /// socket counts (the dispatcher reports it), since a worker that says
    /// READY=1 but never reads that socket would strand connections.
    Dispatch,
}

/// Reports a worker ready on `READY=1` or when its probe passes, whichever
/// comes first, or a timeout; then keeps reading so later sd_notify
/// messages from the worker do not fail.
async fn readiness(
    sock: UnixDatagram,
    probe: Probe,
    timeout: Duration,
    tx: mpsc::UnboundedSender<Event>,
    epoch: u64,
    (pings, clock): (Arc<AtomicU64>, Instant),
) {
    let mut buf = vec![0u8; 4096];
    // Reads one message; true if it says READY=1. Records WATCHDOG=1 pings.
    let read = |buf: &[u8]| {
        let mut ready = false;
        for line in buf.split(|&b| b == b'\n') {
            match line {
                b"READY=1" => ready = true,
                b"WATCHDOG=1" => {
                    let ms = clock.elapsed().as_millis() as u64 + 1;
                    pings.store(ms, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        ready
    };
    let heed_ready = !matches!(probe, Probe::Dispatch);
    let notified = async {
        loop {
            match sock.recv(&mut buf).await {
                Ok(n) if read(&buf[..n]) && heed_ready => return,
                Ok(_) => {}
                Err(_) => std::future::pending::<()>().await,
            }
        }
    };
    let probed = async {
        match probe {
            Probe::Port(p) => loop {
                for ip in [
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ] {
                    let addr = SocketAddr::new(ip, p);
                    if tokio::net::TcpStream::connect(addr).await.is_ok() {
                        return Some(addr);
                    }
                }
                tokio::time::sleep(PROBE_EVERY).await;
            },
            Probe::Grace(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Probe::NotifyOnly | Probe::Dispatch => std::future::pending().await,
        }
    };
    let outcome = tokio::time::timeout(timeout, async {
        tokio::select! {
            _ = notified => None,
            addr = probed => addr,
        }
    })
    .await;
    let ev = match outcome {
        Ok(addr) => Event::Ready { epoch, addr },
        Err(_) => Event::ReadyTimeout { epoch },
    };
    let _ = tx.send(ev);
    // Keep reading for the worker's life: watchdog pings, and so that its
    // later sd_notify calls do not fail.
    while let Ok(n) = sock.recv(&mut buf).await {
        read(&buf[..n]);
    }
}

/// The worker's environment: the master's, minus protocol variables meant
/// for herd itself, plus the user's `--env`, plus the worker contract
/// (which wins, since herd depends on it).
fn worker_env(
    s: &Settings,
    slot: usize,
    port: Option<u16>,
    notify: &std::path::Path,
) -> Vec<(OsString, OsString)> {
    const STRIP: &[&str] = &[
        // Node's IPC variables: only meaningful with the fd they name,
        // which a worker never inherits from herd's own parent.
        "NODE_CHANNEL_FD",
        "NODE_CHANNEL_SERIALIZATION_MODE",
        "NODE_UNIQUE_ID",
        contract::DISPATCH_FD,
        contract::REPORT_OPEN,
        contract::LISTEN_FDS,
        contract::LISTEN_PID,
        contract::LISTEN_FDNAMES,
        contract::NOTIFY_SOCKET,
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ];
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !STRIP.iter().any(|s| k == s))
        .collect();
    let mut set = |k: &str, v: OsString| {
        env.retain(|(ek, _)| ek != k);
        env.push((k.into(), v));
    };
    for (k, v) in &s.env {
        set(k, v.into());
    }
    set(contract::WORKER_ID, slot.to_string().into());
    set(contract::NODE_APP_INSTANCE, slot.to_string().into());
    set(contract::WORKERS, s.instances.to_string().into());
    set(contract::NAME, s.name.clone().into());
    set(contract::MODE, s.mode.as_str().into());
    set(contract::LISTEN, s.listen.to_string().into());
    set(contract::NOTIFY_SOCKET, notify.as_os_str().to_owned());
    if let Some(w) = s.watchdog {
        set("WATCHDOG_USEC", w.as_micros().to_string().into());
    }
    if let Some(p) = port {
        set(contract::PORT, p.to_string().into());
    }
    env
}

fn kill_group(pgid: u32, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid as i32), sig);
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
