//! A worker's process, as mechanism only (the machine decides when):
//! starting it (its private port or inherited socket, notify socket,
//! message channel, dispatch socket, environment, and the task that reports
//! it ready), publishing it, watching it drain, signalling it, releasing
//! what it held.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::machine::{Epoch, Group, State};
use super::{Event, SuperviseError, Supervisor};
use crate::config::{Mode, Settings};
use crate::dispatch::PeerInfo;
use crate::os::listen::Listeners;
use crate::os::reaper;
use crate::os::sys::{self, ExecSpec};
use crate::output::Stream;
use crate::upstream::reuse::Reuse;
use crate::upstream::{Split, Target};
use herd_balance::BackendConfig;
use herd_sdk::env as contract;

/// In fd modes a worker that never speaks sd_notify is taken as ready after this.
const FD_READY_GRACE: Duration = Duration::from_secs(1);
/// Interval of the proxy-mode port probe.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// A worker not ready this long after its start is looked at, and again
/// each [`LOOK_EVERY`] (a JVM may bind late): the first time it listens on
/// a port of its own, the log says so (see [`elsewhere`]).
const LOOK_AFTER: Duration = Duration::from_secs(2);
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// A worker that still listens nowhere this long after its start may
/// serve no port at all: the log says so once (see [`nowhere`]). Later than
/// [`LOOK_AFTER`]: many servers take seconds to bind, and say nothing wrong.
const NOWHERE_AFTER: Duration = Duration::from_secs(7);
/// Whether a worker of this master has said [`nowhere`]'s hint: it is about
/// the program, so it is said once, not once per worker of a cluster.
static SAID_NOWHERE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where herd's preloads were written (none without a command to run).
pub(super) struct Preloads {
    node: std::path::PathBuf,
    python: std::path::PathBuf,
    perl: std::path::PathBuf,
}

impl Preloads {
    pub(super) fn write(dir: &std::path::Path) -> std::io::Result<Preloads> {
        Ok(Preloads {
            node: crate::node::write_shim(dir)?,
            python: crate::python::write_shim(dir)?,
            perl: crate::perl::write_shim(dir)?,
        })
    }
}

/// A release as the driver starts it: what to run, and `NODE_OPTIONS`
/// or `PYTHONPATH` with herd's preload when it is a Node program or a
/// Python script. In proxy, shared and reuseport modes every worker gets
/// `PYTHONPATH`, for how Python servers stop (a console script such as
/// `hypercorn` may start through a shell shim, pyenv's, that hides
/// Python); one that is not a Python script gets only that part.
pub(super) struct Spec {
    pub release: crate::config::Release,
    pub node_options: Option<OsString>,
    /// `BUN_OPTIONS` with the same module, for Bun (with `node_options`).
    pub bun_options: Option<OsString>,
    pub python_path: Option<OsString>,
    /// The Python preload is there only for how the worker stops, not to
    /// move a script's port (`HERD_PYTHON_PRELOAD=stop`).
    pub python_stop_only: bool,
    /// `PERL5LIB` and `PERL5OPT` with herd's Perl preload: a Perl program
    /// in the `shared` and `reuseport` modes.
    pub perl: Option<(OsString, OsString)>,
    /// A Python program: `PYTHONUNBUFFERED=1` unless the environment sets
    /// it, as PM2 sets it, so that `print()` reaches the log as it is
    /// called rather than in 8 KiB blocks (stdout is a pipe).
    pub unbuffered: bool,
    /// A Deno program: in proxy mode its `Deno.serve()` is pointed at the
    /// worker's port (`DENO_SERVE_ADDRESS`), whatever port its code names.
    pub deno: bool,
    /// Whether the proxy keeps idle connections to its workers: a program
    /// found to serve one connection at a time is so in every slot and
    /// after a restart.
    pub reuse: Arc<Reuse>,
}

impl Spec {
    /// `release` with the preloads asked for (`node`, `python`, `stop`,
    /// Python's for every worker, and `perl_stop`, Perl's for a Perl
    /// program) when they were written.
    pub(super) fn new(
        release: crate::config::Release,
        preloads: Option<&Preloads>,
        node: bool,
        python: bool,
        stop: bool,
        perl_stop: bool,
        reuse: Arc<Reuse>,
    ) -> Spec {
        let python_stop_only = stop && !python;
        let python = python || stop;
        Spec {
            python_stop_only,
            node_options: preloads
                .filter(|_| node)
                .map(|p| crate::node::node_options(&p.node, &release.env)),
            bun_options: preloads
                .filter(|_| node)
                .and_then(|p| crate::node::bun_options(&p.node, &release.env)),
            python_path: preloads
                .filter(|_| python)
                .map(|p| crate::python::python_path(&p.python, &release.env)),
            perl: preloads
                .filter(|_| perl_stop && release.runs_perl())
                .map(|p| crate::perl::perl_env(&p.perl, &release.env)),
            unbuffered: release.runs_python(),
            deno: release.runs_deno(),
            release,
            reuse,
        }
    }
}

/// What the driver holds for a live worker process, by epoch.
pub(super) struct Proc {
    pub pid: u32,
    pub port: Option<u16>,
    /// Proxy mode: this worker as a balancing target.
    pub target: Option<Arc<Target>>,
    pub notify_path: PathBuf,
    pub tasks: Vec<AbortHandle>,
    pub ipc: Option<crate::ipc::Channel>,
    /// Dispatch mode: its hand-off counts.
    pub dispatch: Option<Arc<PeerInfo>>,
    /// Set once it is ready by any path, so that its readiness task stops
    /// looking at its sockets (dispatch readiness comes from the dispatcher).
    pub ready: Arc<AtomicBool>,
    /// The Unix socket offered to it (`HERD_SOCKET`), removed when it ends.
    pub socket: Option<Arc<std::path::Path>>,
    /// `--worker-socket auto`: whether it serves on [`Proc::socket`] is
    /// still to be seen, once it is ready.
    pub settle: bool,
}

impl Proc {
    /// `--worker-socket auto`, once it is ready: a worker that bound the
    /// socket offered to it (herd's Node preload, herd-sdk) is reached
    /// there; one that did not, on its port.
    pub(super) fn settle(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        if !std::mem::take(&mut self.settle) {
            return;
        }
        let (Some(path), Some(t)) = (&self.socket, &self.target) else {
            return;
        };
        let bound = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        if bound && t.unix.is_none() {
            self.target = Some(t.reached_at(t.addr, Some(path.clone()), self.pid));
        }
    }

    /// A worker that listens on `[::1]` only (Node binding `localhost` where
    /// it resolves to ::1) is proxied there rather than to 127.0.0.1.
    pub(super) fn serving_at(&mut self, addr: Option<SocketAddr>) {
        self.ready.store(true, Ordering::Relaxed);
        let (Some(addr), Some(t)) = (addr, &self.target) else {
            return;
        };
        if t.addr != addr {
            self.target = Some(t.reached_at(addr, t.unix.clone(), self.pid));
        }
    }
}

impl Supervisor {
    /// Starts the process of worker `epoch` in `slot`; returns its pid.
    pub(super) fn spawn(
        &mut self,
        slot: usize,
        epoch: Epoch,
        version: u32,
    ) -> Result<u32, SuperviseError> {
        let Some(spec) = self.specs.get(&version).cloned() else {
            return Err(SuperviseError::Spawn {
                command: format!("version {version}"),
                source: std::io::Error::other("no such release"),
            });
        };
        let run_as = self.s.run_as.as_ref().map(|r| r.name.clone());
        let spawn_err = |source: std::io::Error| SuperviseError::Spawn {
            command: match &run_as {
                // `--user`: that user may not reach the program or its directory.
                Some(user) if source.kind() == std::io::ErrorKind::PermissionDenied => format!(
                    "{} as user {user}",
                    spec.release.command[0].to_string_lossy()
                ),
                _ => spec.release.command[0].to_string_lossy().into_owned(),
            },
            source,
        };
        let port = match self.s.mode {
            Mode::Proxy => Some(self.free_port().map_err(spawn_err)?),
            _ => None,
        };
        let notify_path = self.rundir.workers_path().join(format!("n{slot}.{epoch}"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).map_err(spawn_err)?;
        self.rundir.give(&notify_path).map_err(spawn_err)?;

        // `--worker-socket`: a path the worker may (or, `unix`, must) bind
        // and serve on instead of its port.
        let unix: Option<(Arc<std::path::Path>, bool)> = match (port, self.s.worker_unix()) {
            (Some(_), Some(must)) => {
                let path = self.rundir.workers_path().join(format!("s{slot}.{epoch}"));
                let _ = std::fs::remove_file(&path);
                if path.as_os_str().len() >= crate::os::UNIX_PATH_MAX {
                    return Err(spawn_err(std::io::Error::other(format!(
                        "the Unix socket path {} is too long (set XDG_RUNTIME_DIR to a shorter directory)",
                        path.display()
                    ))));
                }
                Some((path.into(), must))
            }
            _ => None,
        };
        let mut env = worker_env(
            &self.s,
            &spec.release,
            slot,
            self.m.instances(),
            port,
            self.awaiting_port.is_none(),
            &notify_path,
        );
        if let Some((path, must)) = &unix {
            socket_env(&mut env, path, *must);
        }
        if let Some(port) = port.filter(|_| spec.deno)
            && !env.iter().any(|(k, _)| k == "DENO_SERVE_ADDRESS")
        {
            // Deno's own override; a Unix path only when the worker must
            // serve there (Deno asks `--allow-read` and `--allow-write` for it).
            let addr = match &unix {
                Some((path, true)) => format!("unix:{}", path.display()),
                _ => format!("tcp:127.0.0.1:{port}"),
            };
            env.push(("DENO_SERVE_ADDRESS".into(), addr.into()));
        }
        if let Some(opts) = &spec.node_options {
            env.retain(|(k, _)| k != "NODE_OPTIONS");
            env.push(("NODE_OPTIONS".into(), opts.clone()));
        }
        if let Some(opts) = &spec.bun_options {
            env.retain(|(k, _)| k != "BUN_OPTIONS");
            env.push(("BUN_OPTIONS".into(), opts.clone()));
        }
        if let Some(path) = &spec.python_path {
            env.retain(|(k, _)| k != "PYTHONPATH");
            env.push(("PYTHONPATH".into(), path.clone()));
            if spec.python_stop_only {
                env.push(("HERD_PYTHON_PRELOAD".into(), "stop".into()));
            }
        }
        if let Some((lib, opt)) = &spec.perl {
            env.retain(|(k, _)| k != "PERL5LIB" && k != "PERL5OPT");
            env.push(("PERL5LIB".into(), lib.clone()));
            env.push(("PERL5OPT".into(), opt.clone()));
        }
        if spec.unbuffered && !env.iter().any(|(k, _)| k == "PYTHONUNBUFFERED") {
            env.push(("PYTHONUNBUFFERED".into(), "1".into()));
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
                if spec.node_options.is_some() {
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
        self.readopt(slot);
        if let Some(l) = &mut self.listeners {
            // Reuseport mode: a slot added by scaling gets its socket.
            l.ensure_reuseport(slot + 1, self.s.listen)?;
        }
        self.bound_sockets();
        let listen_pid = match self.listen_fd(slot) {
            Some(fd) => {
                fds.push((fd, 3));
                env.push((contract::LISTEN_FDS.into(), "1".into()));
                env.push((contract::LISTEN_FDNAMES.into(), "herd".into()));
                env.retain(|(k, _)| !FD3_ALIASES.iter().any(|(a, _)| k == a));
                env.extend(FD3_ALIASES.iter().map(|&(k, v)| (k.into(), v.into())));
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
        let mut cmd = tokio::process::Command::new(&spec.release.program);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        if let Some(dir) = &spec.release.cwd {
            cmd.current_dir(dir);
        }
        // `--user`: set before herd's own set-up in the child (std does
        // it first, dropping supplementary groups), and before the chdir.
        if let Some(r) = &self.s.run_as {
            cmd.uid(r.uid).gid(r.gid);
        }
        sys::install(
            &mut cmd,
            ExecSpec {
                program: spec.release.program.clone(),
                argv: with_worker_values(&spec.release.command, &env),
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
            crate::ipc::start(ipc_master, move |msg, credit| {
                let _ = tx.send(Event::Message { epoch, msg, credit });
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
        let ready = Arc::new(AtomicBool::new(false));
        let readiness = tokio::spawn(readiness(
            notify,
            self.probe(port),
            unix.clone(),
            self.tx.clone(),
            (epoch, slot, pid),
            ready.clone(),
        ));
        let target = port.map(|p| {
            Arc::new(
                Target::new(
                    SocketAddr::from((Ipv4Addr::LOCALHOST, p)),
                    format!("worker-{slot}"),
                    format!("worker {slot}"),
                    BackendConfig {
                        max_conns: self.s.worker_max_conns,
                        ..BackendConfig::default()
                    },
                )
                .speaking_h2(self.s.workers_h2)
                .reusing(spec.reuse.clone())
                .run_by(pid)
                .on_unix(unix.clone().filter(|(_, must)| *must).map(|(p, _)| p)),
            )
        });
        self.procs.insert(
            epoch,
            Proc {
                pid,
                port,
                target,
                notify_path,
                tasks: vec![readiness.abort_handle()],
                ipc,
                dispatch,
                ready,
                settle: unix.as_ref().is_some_and(|(_, must)| !must),
                socket: unix.map(|(p, _)| p),
            },
        );
        Ok(pid)
    }

    /// A loopback port free right now and not given to a live worker that
    /// may not have bound it yet, for a proxy-mode worker to serve on.
    fn free_port(&self) -> std::io::Result<u16> {
        for _ in 0..16 {
            let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            let taken = self.procs.values().any(|p| p.port == Some(port));
            if !taken {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("no free loopback port"))
    }

    pub(super) fn listen_fd(&self, slot: usize) -> Option<i32> {
        match self.listeners.as_ref()? {
            Listeners::Proxy(_) => None,
            Listeners::Shared(s) => Some(s.as_raw_fd()),
            Listeners::ReusePort(v) => v.get(slot).map(|s| s.as_raw_fd()),
            Listeners::Dispatch(_) | Listeners::None => None,
        }
    }

    fn probe(&self, port: Option<u16>) -> Probe {
        match (self.s.wait_ready, port) {
            _ if self.s.mode == Mode::Dispatch => Probe::Dispatch,
            (true, _) => Probe::NotifyOnly,
            (false, Some(p)) if self.awaiting_port.is_some() => {
                Probe::PortOrGrace(p, FD_READY_GRACE.min(self.s.ready_timeout))
            }
            (false, Some(p)) => Probe::Port(p),
            (false, None) => Probe::Grace(FD_READY_GRACE.min(self.s.ready_timeout)),
        }
    }

    /// Republishes the serving workers to the dispatcher or the proxy,
    /// with a deploy's new workers and split apart.
    pub(super) fn publish(&mut self) {
        if self.m.deploying().is_none()
            && let Some(r) = self.rollout.take()
            && self.m.stable_version() == r.version
        {
            self.promoted(&r);
        }
        self.close_unused_sockets();
        let split = self.rollout.as_ref().map(|r| Split {
            percent: r.percent(self.m.group_serving(Group::New)),
            by: r.by.clone(),
        });
        let of = |g: Group| -> Vec<Epoch> {
            self.m
                .serving()
                .filter(|w| w.group == g)
                .map(|w| w.epoch)
                .collect()
        };
        let (stable, new) = (of(Group::Stable), of(Group::New));
        if let Some(d) = &self.dispatcher {
            d.serving(stable, split.map(|s| (new, s)));
        } else if self.s.mode == Mode::Proxy {
            let mut targets = |epochs: Vec<Epoch>| -> Vec<_> {
                epochs
                    .iter()
                    .filter_map(|e| {
                        let p = self.procs.get_mut(e)?;
                        p.settle();
                        p.target.clone()
                    })
                    .collect()
            };
            let (stable, new) = (targets(stable), split.as_ref().map(|_| targets(new)));
            self.up
                .set_workers(stable, split.zip(new).map(|(s, n)| (n, s)));
        }
    }

    /// Waits, off the supervisor, until a worker out of traffic has nothing
    /// in flight: in proxy mode its requests, in dispatch mode its
    /// unanswered hand-offs; in the other fd modes the worker drains itself.
    /// The machine bounds the wait with `--drain-timeout`.
    pub(super) fn drain(&mut self, epoch: Epoch) {
        let tx = self.tx.clone();
        let Some(p) = self.procs.get(&epoch) else {
            return;
        };
        let (target, dispatch) = (p.target.clone(), p.dispatch.clone());
        let leaving = self.leaving_socket(epoch);
        let Some(p) = self.procs.get_mut(&epoch) else {
            return;
        };
        let task = tokio::spawn(async move {
            if let Some(sock) = leaving {
                super::steer::accept_queued(sock).await;
            }
            if let Some(d) = dispatch {
                // Out of the serving list already; wait for its answers to
                // what it was handed, so SIGTERM never races a hand-off.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while d.outstanding.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if let Some(t) = target {
                t.backend.set_draining(true);
                // A request may have picked it just before it left the pool.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while t.backend.in_flight() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let _ = tx.send(Event::Drained { epoch });
        });
        // Ends with the worker, if it exits first (killed after the time-out).
        p.tasks.push(task.abort_handle());
    }

    /// The shutdown notice on the worker's channel, then the kill signal
    /// (SIGTERM; none with `--kill-signal none`, where the notice alone asks
    /// the worker to exit, and SIGKILL follows after `--kill-timeout`).
    pub(super) fn terminate(&self, epoch: Epoch) {
        let Some(p) = self.procs.get(&epoch) else {
            return;
        };
        let notice = p.ipc.as_ref().map(|ch| ch.shutdown_notice());
        let (pid, signal) = (p.pid, self.s.kill_signal);
        // Fd modes: a worker may shut its listening socket down as it stops
        // (see `steer`), for every holder; looked at often while it is likely
        // to, as it handles the signal (until SIGKILL, at most 5 s: a long
        // --kill-timeout would keep this task waking for nothing), rather
        // than once a second.
        let watch = self.s.mode.passes_fd().then(|| {
            (
                self.tx.clone(),
                (self.s.kill_timeout + Duration::from_secs(1)).min(Duration::from_secs(5)),
            )
        });
        tokio::spawn(async move {
            crate::ipc::notice_written(notice).await;
            if let Some(signal) = signal {
                kill_group(pid, signal);
            }
            if let Some((tx, within)) = watch {
                let until = tokio::time::Instant::now() + within;
                while tokio::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.send(Event::CheckListeners).is_err() {
                        break;
                    }
                }
            }
        });
    }

    /// A worker's main process exited of herd's stop signal, and processes
    /// of its group run on: a shell script that ran the server without
    /// `exec`, `sh -c 'app; …'` or `go run` dies of the SIGTERM at once
    /// while the server it started drains. A worker is its whole group, so
    /// it has not exited yet: as systemd waits for a unit's whole cgroup,
    /// the machine learns of the exit once the group is empty, and its
    /// SIGKILL at the kill time-out goes to the group as before.
    pub(super) fn group_lives_on(&self, epoch: Epoch) -> bool {
        let terminating = self
            .m
            .find(epoch)
            .is_some_and(|w| matches!(w.state, State::Terminating { kill_at: Some(_) }));
        terminating && self.procs.get(&epoch).is_some_and(|p| group_alive(p.pid))
    }

    /// Tells the machine of each lingering worker whose group is empty now,
    /// or that got its SIGKILL; on each tick and SIGCHLD, and during a stop.
    pub(super) fn end_lingering(&mut self) {
        if self.lingering.is_empty() {
            return;
        }
        self.reap_adopted(); // a member that exited is a zombie until then
        let mut i = 0;
        while i < self.lingering.len() {
            let epoch = self.lingering[i].0;
            if self.group_lives_on(epoch) {
                i += 1;
            } else {
                let (epoch, status) = self.lingering.swap_remove(i);
                self.exited(epoch, status);
            }
        }
    }

    /// Releases what a worker whose process exited held.
    pub(super) fn forget(&mut self, epoch: Epoch) {
        self.left(epoch);
        let Some(p) = self.procs.remove(&epoch) else {
            return;
        };
        for t in &p.tasks {
            t.abort();
        }
        // Whatever the worker left behind in its group is of no use now and
        // may hold the port: a worker is its whole process group, and the
        // descendants that left the group (`setsid`, daemons) but were
        // reparented to herd and still carry its NOTIFY_SOCKET.
        kill_group(p.pid, Signal::SIGKILL);
        self.kill_left_behind(&p.notify_path);
        let _ = std::fs::remove_file(&p.notify_path);
        if let Some(path) = &p.socket {
            let _ = std::fs::remove_file(path);
        }
        self.guardian.forget(p.pid);
        if let Some(d) = &self.dispatcher {
            d.remove(epoch);
        }
    }
}

impl Supervisor {
    /// The processes herd started itself: workers and the guardian.
    fn known_pids(&self) -> std::collections::HashSet<u32> {
        let mut known: std::collections::HashSet<u32> =
            self.procs.values().map(|p| p.pid).collect();
        known.extend(self.guardian.pid());
        known
    }

    /// Reaps adopted children that exited (on SIGCHLD and each tick): as a
    /// subreaper, and as a container's PID 1, nobody else will.
    pub(super) fn reap_adopted(&mut self) {
        self.guardian.check();
        for a in reaper::adopted(&self.known_pids()) {
            if a.zombie {
                tracing::debug!("reaped adopted process {}", a.pid);
                reaper::reap(a.pid);
            }
        }
    }

    /// Kills what a worker left behind: each process reparented to herd
    /// that carries its `NOTIFY_SOCKET`, with its process group when that
    /// is neither herd's nor a live worker's (a daemon's own workers, not
    /// reparented to herd until it dies, would otherwise keep its port).
    fn kill_left_behind(&self, notify_path: &std::path::Path) {
        let mut tag = b"NOTIFY_SOCKET=".to_vec();
        tag.extend_from_slice(notify_path.as_os_str().as_encoded_bytes());
        let known = self.known_pids();
        let ours = nix::unistd::getpgrp().as_raw() as u32;
        for a in reaper::adopted(&known) {
            if !a.zombie && reaper::has_env(a.pid, &tag) {
                tracing::debug!("killing process {}, which a worker left behind", a.pid);
                if a.pgrp != ours && !known.contains(&a.pgrp) {
                    kill_group(a.pgrp, Signal::SIGKILL);
                }
                reaper::kill_now(a.pid);
            }
        }
    }

    /// A worker that ended by itself with code 0 while processes that left
    /// its process group, started since it did, run on reparented to herd:
    /// it daemonized (`hypnotoad`, `php-fpm`, `nginx` and `gunicorn
    /// --daemon` do, by default or when told). Kills them with their process
    /// groups, as those that kept its environment are killed in
    /// `forget` (a daemon that writes its process title over it, as nginx
    /// does, is not told apart that way), and returns what to log about it,
    /// once: "exited with code 0" and then a crash loop do not tell.
    pub(super) fn daemonized(&mut self, epoch: Epoch) -> Option<String> {
        let (slot, pid, age) = self
            .m
            .workers()
            .find(|w| w.epoch == epoch)
            .filter(|w| matches!(w.state, State::Starting { .. } | State::Serving))
            .map(|w| (w.slot, w.pid, w.started.elapsed()))?;
        let known = self.known_pids();
        let ours = nix::unistd::getpgrp().as_raw() as u32;
        let left: Vec<_> = reaper::adopted(&known)
            .into_iter()
            .filter(|a| !a.zombie && a.pgrp != pid && a.pgrp != ours && !known.contains(&a.pgrp))
            // Not an older orphan (herd as a container's PID 1 gets all).
            .filter(|a| reaper::age(a.pid).is_some_and(|t| t <= age + Duration::from_millis(100)))
            .collect();
        let first = left.first()?;
        let name = reaper::name(first.pid).unwrap_or_else(|| "?".into());
        let hint = format!(
            "worker {slot} (pid {pid}) left process {} ({name}) running in the background: it \
             daemonized, and herd killed it. A worker must stay in the foreground, as under PM2 \
             and systemd: run the program's foreground mode (hypnotoad -f, php-fpm -F, \
             nginx -g 'daemon off;', gunicorn without --daemon)",
            first.pid
        );
        for a in &left {
            kill_group(a.pgrp, Signal::SIGKILL);
            reaper::kill_now(a.pid);
        }
        (!std::mem::replace(&mut self.daemon_hinted, true)).then_some(hint)
    }

    /// At the end of a stop: every adopted process is a worker's leftover
    /// or an orphan of the namespace herd is PID 1 of; none outlives the
    /// cluster. Waits (up to a second) until they are reaped.
    pub(super) fn end_adopted(&mut self) {
        let known = self.known_pids();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let left = reaper::adopted(&known);
            if left.is_empty() || std::time::Instant::now() > end {
                return;
            }
            for a in left {
                if a.zombie {
                    reaper::reap(a.pid);
                } else {
                    reaper::kill_now(a.pid);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// The finest a worker's `WATCHDOG=1` pings are told to the supervisor.
const PING_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy)]
enum Probe {
    /// Ready when the worker's private port accepts a connection.
    Port(u16),
    /// The same, or after a grace: while a Node app's own port is not
    /// known, a worker that never listens (a queue consumer, as PM2's
    /// cluster mode runs one) is ready as in fork mode.
    PortOrGrace(u16, Duration),
    /// Ready after a fixed grace (fd modes: the kernel queues meanwhile).
    Grace(Duration),
    /// Only `READY=1` counts (`--wait-ready`).
    NotifyOnly,
    /// Dispatch mode: only the worker's `listening` line on its dispatch
    /// socket counts (the dispatcher reports it), since a worker that says
    /// READY=1 but never reads that socket would strand connections.
    Dispatch,
}

/// Where the worker's private port first accepts a connection; or its Unix
/// socket (`unix`, and whether only that counts), reported as 127.0.0.1
/// and the port.
async fn port_open(p: u16, unix: Option<&(Arc<std::path::Path>, bool)>) -> SocketAddr {
    loop {
        if let Some((path, must)) = unix {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return SocketAddr::from((Ipv4Addr::LOCALHOST, p));
            }
            if *must {
                tokio::time::sleep(PROBE_EVERY).await;
                continue;
            }
        }
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let addr = SocketAddr::new(ip, p);
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return addr;
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Reports the worker ready on `READY=1` or when its probe passes,
/// whichever comes first (the machine times it out), and each `WATCHDOG=1`;
/// keeps reading for the worker's life so its sd_notify calls never fail.
/// `ready` is set once the worker is ready by any path: in dispatch mode
/// the dispatcher says so, and this task goes on reading only.
async fn readiness(
    sock: UnixDatagram,
    probe: Probe,
    unix: Option<(Arc<std::path::Path>, bool)>,
    tx: mpsc::UnboundedSender<Event>,
    (epoch, slot, pid): (Epoch, usize, u32),
    ready: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 4096];
    // Reads one message; true if it says READY=1. Reports WATCHDOG=1, at
    // most every PING_EVERY: a worker that pings in a loop floods no queue
    // (the watchdog's periods are seconds).
    let last_ping = std::sync::Mutex::new(None::<std::time::Instant>);
    let read = |buf: &[u8]| {
        let mut ready = false;
        let mut pinged = false;
        for line in buf.split(|&b| b == b'\n') {
            match line {
                b"READY=1" => ready = true,
                b"WATCHDOG=1" => pinged = true,
                _ => {}
            }
        }
        if pinged && let Ok(mut last) = last_ping.lock() {
            let now = std::time::Instant::now();
            if last.is_none_or(|t| now.duration_since(t) >= PING_EVERY) {
                *last = Some(now);
                let _ = tx.send(Event::Pinged { epoch });
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
            Probe::Port(p) => Some(port_open(p, unix.as_ref()).await),
            Probe::PortOrGrace(p, d) => tokio::select! {
                addr = port_open(p, unix.as_ref()) => Some(addr),
                () = tokio::time::sleep(d) => None,
            },
            Probe::Grace(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Probe::NotifyOnly | Probe::Dispatch => std::future::pending().await,
        }
    };
    // Never ends: only says, once, why a worker may not be ready.
    let look = async {
        let pgid = match i32::try_from(pid) {
            // Only where herd waits on a port or a protocol (not on READY=1).
            Ok(p) if p > 0 && matches!(probe, Probe::Port(_) | Probe::Dispatch) => p,
            _ => std::future::pending().await,
        };
        let mut after = LOOK_AFTER;
        tokio::time::sleep(after).await;
        // A scan of every process and of the socket tables, which grow
        // with the load: only while the worker is not ready. Dispatch
        // readiness does not end this task, so it would scan for good.
        while !ready.load(Ordering::Relaxed) {
            let found = tokio::task::spawn_blocking(move || crate::os::sockets::listening(pgid));
            let Ok(found) = found.await else { break };
            let must = unix.as_ref().filter(|(_, must)| *must).map(|(p, _)| &**p);
            if let Some(why) = elsewhere(probe, &found, must) {
                tracing::warn!("worker {slot} (pid {pid}) is not ready after {after:?}: {why}");
                break;
            }
            if after >= NOWHERE_AFTER
                && let Some(why) = nowhere(probe, &found)
                && !SAID_NOWHERE.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!("worker {slot} (pid {pid}) is not ready after {after:?}: {why}");
            }
            tokio::time::sleep(LOOK_EVERY).await;
            after += LOOK_EVERY;
        }
        std::future::pending::<()>().await
    };
    let addr = tokio::select! {
        _ = notified => None,
        addr = probed => addr,
        () = look => None,
    };
    let _ = tx.send(Event::Ready { epoch, addr });
    while let Ok(n) = sock.recv(&mut buf).await {
        read(&buf[..n]);
    }
}

/// Why a worker that is not ready may never be, from the addresses its
/// processes listen on: a server on a port of its own choosing (a port
/// written in the code, a framework's default) while herd waits on another.
fn elsewhere(
    probe: Probe,
    listening: &[SocketAddr],
    unix: Option<&std::path::Path>,
) -> Option<String> {
    let shown = || crate::os::sockets::shown(listening);
    match probe {
        Probe::Port(_) if unix.is_some() && !listening.is_empty() => Some(format!(
            "it listens on {}, but herd sends it requests on the Unix socket {} (--worker-socket \
             unix), named in HERD_SOCKET. Make it listen there (gunicorn --bind unix:$HERD_SOCKET, \
             uvicorn --uds $HERD_SOCKET), or leave out --worker-socket unix",
            shown(),
            unix.map(|u| u.display().to_string()).unwrap_or_default()
        )),
        Probe::Port(p) if !listening.is_empty() && listening.iter().all(|a| a.port() != p) => {
            Some(format!(
                "it listens on {}, but herd sends it requests on 127.0.0.1:{p}, its PORT. \
                 Make it listen on $PORT; a command line in one word runs through a shell, which \
                 expands it (hypercorn: herd run -- 'hypercorn --bind 127.0.0.1:$PORT app:app'; \
                 Django: herd run -- 'python manage.py runserver $PORT'; Puma: herd run -- 'puma \
                 -p $PORT')",
                shown()
            ))
        }
        Probe::Dispatch if !listening.is_empty() => Some(format!(
            "it listens on {} itself; dispatch mode hands connections only to a worker that \
             speaks its protocol (herd's Node preload, herd-sdk). For this server use --mode proxy, shared or reuseport",
            shown()
        )),
        _ => None,
    }
}

/// Why a worker herd waits on to listen may never do so: it listens
/// nowhere (a queue consumer, a bot, a script run as a server).
fn nowhere(probe: Probe, listening: &[SocketAddr]) -> Option<String> {
    match probe {
        Probe::Port(p) if listening.is_empty() => Some(format!(
            "it listens on no port yet, and herd waits until it listens on its PORT ({p}), up to --ready-timeout. \
             A program that serves no port (a queue consumer, a scheduler) runs with --mode fork"
        )),
        _ => None,
    }
}

/// Servers that default to a fixed port and ignore `PORT` but read a
/// variable of their own, each with what goes before the port: with these
/// set, `herd run -i 2 -- uvicorn app:app` (or `flask run`, `perl app.pl
/// daemon`, a Spring Boot jar) serves on the port herd proxies to, instead
/// of every worker fighting over the framework's default.
const PORT_ALIASES: &[(&str, &str)] = &[
    ("UVICORN_PORT", ""),   // uvicorn's options come from UVICORN_* too
    ("FLASK_RUN_PORT", ""), // `flask run`
    ("MOJO_LISTEN", "http://127.0.0.1:"), // Mojolicious' daemon and prefork
    ("SERVER_PORT", ""),    // Spring Boot's server.port
    ("QUARKUS_HTTP_PORT", ""),
    ("MICRONAUT_SERVER_PORT", ""),
    ("ASPNETCORE_HTTP_PORTS", ""), // .NET 8 and later
];

/// The same servers' way to take a listening fd, set when fd 3 is one
/// (shared and reuseport modes): plain `uvicorn app:app` then accepts
/// there instead of binding 127.0.0.1:8000 (`--fd` wins over `--port` in
/// uvicorn), and so does Mojolicious.
const FD3_ALIASES: &[(&str, &str)] = &[("UVICORN_FD", "3"), ("MOJO_LISTEN", "http://*?fd=3")];

/// The worker's environment: the master's, minus protocol variables meant
/// for herd itself, plus the user's `--env`, plus the worker contract
/// (which wins, since herd depends on it).
fn worker_env(
    s: &Settings,
    release: &crate::config::Release,
    slot: usize,
    workers: usize,
    port: Option<u16>,
    listen_known: bool,
    notify: &std::path::Path,
) -> Vec<(OsString, OsString)> {
    const STRIP: &[&str] = &[
        // Node's IPC variables: only meaningful with the fd they name,
        // which a worker never inherits from herd's own parent.
        "NODE_CHANNEL_FD",
        "NODE_CHANNEL_SERIALIZATION_MODE",
        "NODE_UNIQUE_ID",
        contract::DISPATCH_FD,
        contract::PRIVATE_PORT,
        contract::SOCKET,
        contract::REPORT_OPEN,
        contract::SHUTDOWN_MESSAGE,
        contract::LISTEN_FDS,
        contract::LISTEN_PID,
        contract::LISTEN_FDNAMES,
        contract::NOTIFY_SOCKET,
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        // The admin listener's secret is herd's, not the app's.
        "HERD_ADMIN_TOKEN",
        // What a master hands itself across `herd upgrade`, or to the
        // master that takes its cluster over.
        "HERD_UPGRADE",
        crate::config::relaunch::VAR,
        // The Python preload's mark for a worker's children (a nested herd),
        // and what it is there for.
        "HERD_PORT_TAKEN",
        "HERD_PYTHON_PRELOAD",
    ];
    let base = match &release.base_env {
        Some(env) => env.clone(),
        None => std::env::vars_os().collect(),
    };
    let mut env: Vec<(OsString, OsString)> = base
        .into_iter()
        .filter(|(k, _)| !STRIP.iter().any(|s| k == s))
        // Served on the app's own port, whose PORT stays unset (a `reload
        // --update-env` from a shell with PORT set changes nothing).
        .filter(|(k, _)| !(s.withholds_port() && k == contract::PORT))
        .collect();
    let mut set = |k: &str, v: OsString| {
        env.retain(|(ek, _)| ek != k);
        env.push((k.into(), v));
    };
    // `--user`: that user's, as PM2 sets HOME (`--env` still wins).
    if let Some(r) = &s.run_as {
        set("HOME", r.home.clone().into());
        set("USER", r.name.clone().into());
        set("LOGNAME", r.name.clone().into());
    }
    for (k, v) in &release.env {
        set(k, v.into());
    }
    set(contract::WORKER_ID, slot.to_string().into());
    let instance_var = s.instance_var.as_deref();
    set(
        instance_var.unwrap_or(contract::NODE_APP_INSTANCE),
        slot.to_string().into(),
    );
    set(contract::WORKERS, workers.to_string().into());
    set(contract::NAME, s.name.clone().into());
    set(contract::MODE, s.mode.as_str().into());
    if s.kill_signal.is_none() {
        set(contract::SHUTDOWN_MESSAGE, "1".into());
    }
    if s.mode != Mode::Fork && listen_known {
        set(contract::LISTEN, s.listen.to_string().into());
    }
    set(contract::NOTIFY_SOCKET, notify.as_os_str().to_owned());
    if let Some(r) = &s.redis {
        set(contract::HOST, r.host.clone().into());
    }
    if let Some(w) = s.watchdog {
        set("WATCHDOG_USEC", w.as_micros().to_string().into());
    }
    if let Some(p) = port {
        set(contract::PRIVATE_PORT, p.to_string().into());
        // The app's own port: `process.env.PORT || 3000` must read 3000.
        if !s.withholds_port() {
            set(contract::PORT, p.to_string().into());
            for (k, before) in PORT_ALIASES {
                set(k, format!("{before}{p}").into());
            }
        }
    }
    // PM2's increment_var: NAME = its value + the worker's id.
    if let Some(var) = &s.increment_var {
        let base = env
            .iter()
            .find(|(k, _)| k == var.as_str())
            .and_then(|(_, v)| v.to_str()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        env.retain(|(k, _)| k != var.as_str());
        env.push((var.into(), (base + slot as u64).to_string().into()));
    }
    env
}

/// The variables whose `$NAME` or `${NAME}` in a worker's arguments become
/// that worker's values: what herd picks per worker, which a command run
/// without a shell (several words, herd.toml's `command = [...]`) could
/// not name otherwise.
const PER_WORKER: &[&str] = &[contract::PORT, contract::WORKER_ID];

/// `argv` with each `$PORT`, `${PORT}`, `$HERD_WORKER_ID` and
/// `${HERD_WORKER_ID}` after the program's name replaced by its value in
/// `env`, as systemd's `ExecStart=` expands variables (`redis-server --port
/// '$PORT'`). Anything else, a variable `env` lacks (`PORT` in shared mode,
/// unless herd's own environment had one) included, is left as it is, for
/// the program or the shell it names.
fn with_worker_values(argv: &[OsString], env: &[(OsString, OsString)]) -> Vec<OsString> {
    let value = |name: &str| {
        PER_WORKER.contains(&name).then_some(())?;
        env.iter().find(|(k, _)| k == name)?.1.to_str()
    };
    let expand = |word: &OsString| -> OsString {
        let Some(text) = word.to_str().filter(|t| t.contains('$')) else {
            return word.clone();
        };
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            // `${NAME}`, or `$NAME` up to the first byte no name holds.
            let (name, len) = match after.strip_prefix('{') {
                Some(inner) => match inner.find('}') {
                    Some(end) => (&inner[..end], end + 2),
                    None => ("", 0),
                },
                None => {
                    let end = after.find(|c| !ident(c)).unwrap_or(after.len());
                    (&after[..end], end)
                }
            };
            match value(name) {
                Some(v) if len > 0 => {
                    out.push_str(v);
                    rest = &after[len..];
                }
                _ => {
                    out.push('$');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out.into()
    };
    let mut out: Vec<OsString> = argv.iter().take(1).cloned().collect();
    out.extend(argv.iter().skip(1).map(expand));
    out
}

/// `HERD_SOCKET`, the Unix socket a worker may serve on; with `must`
/// (`--worker-socket unix`) servers that can serve there are told so too:
/// uvicorn binds `--uds` before any port, and gunicorn's command line still
/// wins over its `GUNICORN_CMD_ARGS`.
fn socket_env(env: &mut Vec<(OsString, OsString)>, path: &std::path::Path, must: bool) {
    let mut set = |k: &str, v: OsString| {
        env.retain(|(ek, _)| ek != k);
        env.push((k.into(), v));
    };
    set(contract::SOCKET, path.as_os_str().to_owned());
    if !must {
        return;
    }
    set("UVICORN_UDS", path.as_os_str().to_owned());
    let mut args = env
        .iter()
        .find(|(k, _)| k == "GUNICORN_CMD_ARGS")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if !args.is_empty() {
        args.push(" ");
    }
    args.push("--bind=unix:");
    args.push(path.as_os_str());
    env.retain(|(k, _)| k != "GUNICORN_CMD_ARGS");
    env.push(("GUNICORN_CMD_ARGS".into(), args));
}

/// A process of the group is alive (or a zombie its parent, herd or a
/// member, has not reaped yet).
fn group_alive(pgid: u32) -> bool {
    pgid > 1 && killpg(Pid::from_raw(pgid as i32), None).is_ok()
}

pub(super) fn kill_group(pgid: u32, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid as i32), sig);
    }
}

#[cfg(test)]
mod tests {
    use super::{Probe, elsewhere, nowhere, with_worker_values};
    use std::ffi::OsString;
    use std::net::SocketAddr;

    #[test]
    fn per_worker_variables_in_arguments_get_the_workers_values() {
        let env: Vec<(OsString, OsString)> = [
            ("PORT", "41000"),
            ("HERD_WORKER_ID", "1"),
            ("HOME", "/root"),
        ]
        .iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let run = |argv: &[&str]| -> Vec<String> {
            let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
            with_worker_values(&argv, &env)
                .into_iter()
                .map(|w| w.into_string().unwrap())
                .collect()
        };
        assert_eq!(
            run(&[
                "redis-server",
                "--port",
                "$PORT",
                "--x=${PORT}",
                "w$HERD_WORKER_ID.log"
            ]),
            ["redis-server", "--port", "41000", "--x=41000", "w1.log"]
        );
        assert_eq!(
            run(&["app", "127.0.0.1:$PORT/$PORT"]),
            ["app", "127.0.0.1:41000/41000"]
        );
        // Only herd's per-worker values, whole names, and not the program's name.
        let kept = [
            "$PORT",
            "$HOME",
            "$PORTS",
            "${PORT:-80}",
            "${PORT",
            "$",
            "a$",
            "$$",
            "${}",
        ];
        assert_eq!(run(&kept), kept);
        // A variable the worker does not have (no PORT in shared mode) stays.
        let none: Vec<(OsString, OsString)> = Vec::new();
        let argv = vec![OsString::from("app"), OsString::from("$PORT")];
        assert_eq!(with_worker_values(&argv, &none), argv);
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_worker_on_a_port_of_its_own_is_named_and_one_on_its_port_is_not() {
        let own = addrs(&["127.0.0.1:3000"]);
        let why = elsewhere(Probe::Port(41000), &own, None).unwrap();
        assert!(
            why.contains("127.0.0.1:3000") && why.contains("127.0.0.1:41000"),
            "{why}"
        );
        // Still binding, or on its port (any address), or one more port
        // beside it (metrics): nothing to say.
        assert_eq!(elsewhere(Probe::Port(41000), &[], None), None);
        let both = addrs(&["0.0.0.0:41000", "127.0.0.1:9090"]);
        assert_eq!(elsewhere(Probe::Port(41000), &both, None), None);
        assert_eq!(
            elsewhere(Probe::Port(41000), &addrs(&["[::]:41000"]), None),
            None
        );
        // Dispatch mode: any port of its own is the wrong model.
        let why = elsewhere(Probe::Dispatch, &own, None).unwrap();
        assert!(why.contains("--mode proxy"), "{why}");
        assert_eq!(elsewhere(Probe::Dispatch, &[], None), None);
        // fd modes are ready on their grace; --wait-ready waits on purpose.
        assert_eq!(elsewhere(Probe::NotifyOnly, &own, None), None);
        let many = addrs(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]);
        assert!(
            elsewhere(Probe::Dispatch, &many, None)
                .unwrap()
                .contains(":3, …")
        );
    }

    #[test]
    fn a_worker_that_listens_nowhere_is_pointed_at_fork_mode() {
        let why = nowhere(Probe::Port(41000), &[]).unwrap();
        assert!(
            why.contains("(41000)") && why.contains("--mode fork"),
            "{why}"
        );
        // Listening somewhere is `elsewhere`'s case; fd modes wait on a grace.
        assert_eq!(
            nowhere(Probe::Port(41000), &addrs(&["127.0.0.1:3000"])),
            None
        );
        assert_eq!(nowhere(Probe::Grace(std::time::Duration::ZERO), &[]), None);
    }
}
