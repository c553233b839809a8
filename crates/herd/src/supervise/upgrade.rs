//! `herd upgrade` and SIGUSR2: the master re-executes herd's binary on disk
//! in place, keeping its pid (systemd and `herd list` keep seeing it), its
//! listening sockets (open throughout, so connections wait in the kernel's
//! queue, none refused) and its control socket and name.
//!
//! The workers are replaced, not taken over: they stop gracefully before
//! the exec and the new master starts new ones. Taking over would mean
//! handing every worker's output pipes, message channel, notify socket and
//! dispatch channel across the exec, and a new binary may run workers
//! differently; with the sockets kept, a restart of the workers loses no
//! connection, it only delays the ones that arrive meanwhile.
//!
//! The new binary is checked first (`herd run --check` with this master's
//! own arguments): if it cannot run this cluster, nothing stops and the
//! command says why.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use super::Supervisor;
use super::signals::{OpSignals, StopSignals};
use super::stop::Waited;
use crate::os::listen::Listeners;

impl Supervisor {
    /// The binary to re-execute, once it has checked this cluster's options.
    pub(super) fn upgrade_check(&self) -> Result<PathBuf, String> {
        if self.m.deploying().is_some() {
            return Err("a deploy is in progress: promote or roll it back first".into());
        }
        if self.reload_reply.is_some() {
            return Err("a reload is in progress".into());
        }
        if self.awaiting_port.is_some() {
            return Err("the app has not named its port yet".into());
        }
        let exe = crate::os::sys::exe_path().ok_or("cannot tell where herd's binary is")?;
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let Some(at) = args.iter().position(|a| a == "run") else {
            return Err("this master was not started with `herd run`".into());
        };
        args.insert(at + 1, "--check".into());
        let out = std::process::Command::new(&exe)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .env(crate::config::relaunch::VAR, self.s.relaunch.encode())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            let why = why.lines().last().unwrap_or("it failed").trim();
            return Err(format!("{} cannot run this cluster: {why}", exe.display()));
        }
        Ok(exe)
    }

    /// Lets the proxy finish what it has (each connection's next answer says
    /// `Connection: close`; idle ones close after `--drain-timeout`), stops
    /// the workers gracefully, then execs `exe`. Control requests are
    /// answered meanwhile. Returns `None` when a stop signal or `herd stop`
    /// came first (the caller then stops the cluster), else only if the
    /// exec failed, with why.
    pub(super) async fn upgrade(
        &mut self,
        exe: PathBuf,
        stop: &mut StopSignals,
        ops: &mut OpSignals,
    ) -> Option<String> {
        tracing::info!("upgrading in place: re-executing {}", exe.display());
        let _ = herd_sdk::notify("RELOADING=1");
        self.stop_accepting.cancel();
        let grace = self.s.drain_timeout;
        if let Some(taken) = self.dispatcher.as_ref().map(|d| d.stop()) {
            let until = tokio::time::Instant::now() + grace;
            let waited = self.wait_answering(taken, until, stop).await;
            if self.upgrade_stopped(waited) {
                return None;
            }
        }
        for (close_idle, time) in [(false, grace), (true, Duration::from_secs(1))] {
            if close_idle {
                self.close_idle.cancel();
            }
            if self.active.get() == 0 {
                break;
            }
            let active = self.active.clone();
            let until = tokio::time::Instant::now() + time;
            let drained = async move { active.drained().await };
            let waited = self.wait_answering(drained, until, stop).await;
            if self.upgrade_stopped(waited) {
                return None;
            }
        }
        self.stop_workers(stop, false).await;
        if self.stopping {
            return None;
        }
        self.end_adopted();
        // From here a signal waits for the new master (see `signals::caught`).
        let caught = super::signals::caught();
        if let Err(e) = crate::os::sys::mask_signals(&caught, true) {
            tracing::warn!("cannot block signals across the exec: {e}");
        }
        // Requests from here on wait for the new master.
        self.hold_control.send_replace(true);
        // The output thread and the access log hand their last lines over.
        std::thread::sleep(Duration::from_millis(150));
        // What the handlers caught meanwhile reaches the streams.
        tokio::time::sleep(Duration::from_millis(1)).await;
        if let Some(sig) = stop.arrived() {
            let _ = crate::os::sys::mask_signals(&caught, false);
            self.hold_control.send_replace(false);
            self.abandon_upgrade(sig);
            return None;
        }
        self.carry_over(ops.arrived());
        let mut listen: Vec<RawFd> = Vec::new();
        if let Some(l) = &self.listeners {
            listen = l.fds();
        }
        if let Some(by_place) = self.sockets_by_place() {
            listen = by_place;
        }
        let handed = format!(
            "{};name={};control={};lock={};listen={}",
            std::process::id(),
            self.s.name,
            self.control_fd,
            self.lock_fd,
            listen
                .iter()
                .map(|fd| fd.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut keep = listen;
        keep.extend([self.control_fd, self.lock_fd]);
        let extra = [
            ("HERD_UPGRADE", handed),
            (crate::config::relaunch::VAR, self.s.relaunch.encode()),
        ];
        let e = crate::os::sys::exec_self(&exe, &keep, &extra);
        let _ = crate::os::sys::mask_signals(&caught, false);
        self.hold_control.send_replace(false);
        Some(format!("exec {}: {e}", exe.display()))
    }

    /// Signals that came while the upgrade ran: a scale is carried over to
    /// the new master's worker count; a reload or another upgrade is what
    /// the upgrade does anyway (new workers, configuration and certificates
    /// read again). Each is logged, not dropped silently.
    fn carry_over(&mut self, arrived: Vec<&'static str>) {
        for sig in arrived {
            let delta = match sig {
                "SIGTTIN" => "+1",
                "SIGTTOU" => "-1",
                "SIGUSR2" => {
                    tracing::info!("{sig} during the upgrade: already upgrading");
                    continue;
                }
                _ => {
                    tracing::info!(
                        "{sig} during the upgrade: the upgrade starts new workers anyway"
                    );
                    continue;
                }
            };
            let now = self.s.relaunch.instances.unwrap_or(self.m.instances());
            match super::machine::scale_target(delta, now) {
                Ok(to) if !self.s.command.is_empty() => {
                    self.s.relaunch.instances = Some(to);
                    tracing::info!(
                        "{sig} during the upgrade: the new master starts {}",
                        crate::console::count(to, "worker")
                    );
                }
                Ok(_) => tracing::warn!(
                    "{sig} during the upgrade: this cluster has no workers (upstreams only)"
                ),
                Err(e) => tracing::warn!("{sig} during the upgrade: cannot scale {delta}: {e}"),
            }
        }
    }

    /// Whether a wait of the upgrade's drain ended with a stop, which
    /// abandons the upgrade.
    fn upgrade_stopped(&mut self, waited: Waited) -> bool {
        match waited {
            Waited::Signal(sig) => self.abandon_upgrade(sig),
            Waited::Stop => self.abandon_upgrade("herd stop"),
            Waited::Done | Waited::TimedOut => return false,
        }
        true
    }
}

impl Listeners {
    /// The fds of the listening sockets the master holds.
    pub fn fds(&self) -> Vec<RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Listeners::Proxy(v) => v.iter().map(AsRawFd::as_raw_fd).collect(),
            Listeners::Shared(s) => vec![s.as_raw_fd()],
            Listeners::ReusePort(v) => v.iter().map(AsRawFd::as_raw_fd).collect(),
            Listeners::Dispatch(l) => vec![l.as_raw_fd()],
            Listeners::None => Vec::new(),
        }
    }
}
