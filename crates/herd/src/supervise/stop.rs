//! The cluster's stop: the proxy and the dispatcher finish what they took,
//! then the machine's stop (SIGTERM, SIGKILL after `--kill-timeout`), with
//! a second stop signal skipping to SIGKILL.

use std::time::Duration;

use super::machine::Input;
use super::signals::StopSignals;
use super::{Event, Supervisor, sleep_until};
use crate::config::Mode;
use crate::os::listen::Listeners;

/// How a wait of a stop or of an upgrade ended.
pub(super) enum Waited {
    /// What it waited for came.
    Done,
    /// Its time-out came first.
    TimedOut,
    /// A stop signal came (its name).
    Signal(&'static str),
    /// `herd stop` came during an upgrade.
    Stop,
}

impl Supervisor {
    /// Waits for `done` until `until`, answering control requests meanwhile
    /// (see `on_call_stopping`), and watching for stop signals.
    pub(super) async fn wait_answering(
        &mut self,
        done: impl std::future::Future<Output = ()>,
        until: tokio::time::Instant,
        stop: &mut StopSignals,
    ) -> Waited {
        tokio::pin!(done);
        loop {
            tokio::select! {
                _ = &mut done => return Waited::Done,
                _ = tokio::time::sleep_until(until) => return Waited::TimedOut,
                sig = stop.recv() => return Waited::Signal(sig),
                Some(call) = self.calls.recv() => {
                    if self.on_call_stopping(call) {
                        return Waited::Stop;
                    }
                }
            }
        }
    }

    /// Stop accepting and let the proxy and the dispatcher finish what they
    /// took (up to `--drain-timeout`), then the machine's stop: SIGTERM to
    /// every worker group, SIGKILL after `--kill-timeout`. A second stop
    /// signal skips to SIGKILL.
    pub(super) async fn shutdown(&mut self, stop: &mut StopSignals) {
        self.stopping = true;
        self.stop_accepting.cancel();
        // Idle client connections close at once on a stop (an upgrade
        // instead gives them the drain time to send one more request).
        self.close_idle.cancel();
        if matches!(self.listeners, Some(Listeners::Proxy(_))) {
            // Refuse new connections now rather than queue them for no one;
            // the accept loop drops its clone as it sees the cancellation.
            self.listeners = None;
        }
        let grace = self.s.drain_timeout;
        let mut hurry = false;
        if let Some(taken) = self.dispatcher.as_ref().map(|d| d.stop()) {
            // The dispatch thread's copy of the listening socket is then the
            // last: it takes what the kernel queued, closes, and every
            // connection accepted goes to a worker before any SIGTERM.
            self.listeners = None;
            let until = tokio::time::Instant::now() + grace;
            match self.wait_answering(taken, until, stop).await {
                Waited::TimedOut => tracing::warn!(
                    "accepted connections still not taken by a worker after {grace:?}"
                ),
                Waited::Signal(_) => hurry = true,
                Waited::Done | Waited::Stop => {}
            }
        }
        if !hurry && self.s.mode == Mode::Proxy && self.active.get() > 0 {
            tracing::info!("waiting for {} open connections", self.active.get());
            let active = self.active.clone();
            let until = tokio::time::Instant::now() + grace;
            match self
                .wait_answering(async move { active.drained().await }, until, stop)
                .await
            {
                Waited::TimedOut => tracing::warn!(
                    "{} connections still open after {grace:?}",
                    self.active.get()
                ),
                Waited::Signal(_) => hurry = true,
                Waited::Done | Waited::Stop => {}
            }
        }
        self.stop_workers(stop, hurry).await;
        // In fd modes the master's copies go last: workers still drain
        // the queues, and a reuseport slot's queue lives as long as its socket.
        self.listeners = None;
    }

    /// The machine's stop: SIGTERM to every worker group, SIGKILL after
    /// `--kill-timeout` (at once on a second stop signal); returns when
    /// they are gone. On an upgrade (not `stopping` yet), a stop signal or
    /// `herd stop` meanwhile turns it into the cluster's stop, and a
    /// second signal skips to SIGKILL.
    pub(super) async fn stop_workers(&mut self, stop: &mut StopSignals, hurry: bool) {
        self.apply(Input::Stop, None);
        if hurry {
            self.apply(Input::Hurry, None);
        }
        // Bounded: SIGKILL comes at the latest a kill time-out from now.
        let limit = tokio::time::Instant::now() + self.s.kill_timeout + Duration::from_secs(5);
        while self.m.live() > 0 {
            let deadline = self.m.next_deadline();
            // Nothing tells when a lingering group empties: looked at often.
            let lingering = !self.lingering.is_empty();
            tokio::select! {
                Some(ev) = self.rx.recv() => {
                    if let Event::Exited { .. } = ev {
                        self.on_event(ev);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)), if lingering => {
                    self.end_lingering();
                }
                _ = sleep_until(deadline) => self.apply(Input::Timer, None),
                sig = stop.recv() => {
                    if self.stopping {
                        self.apply(Input::Hurry, None);
                    } else {
                        self.abandon_upgrade(sig);
                    }
                }
                Some(call) = self.calls.recv() => {
                    if self.on_call_stopping(call) {
                        self.abandon_upgrade("herd stop");
                    }
                }
                _ = tokio::time::sleep_until(limit) => {
                    tracing::warn!("{} still running after SIGKILL", crate::console::count(self.m.live(), "worker"));
                    break;
                }
            }
        }
    }

    /// A stop asked for during an upgrade wins: the master stops instead
    /// of re-executing, as `systemctl stop` or `docker stop` expect.
    pub(super) fn abandon_upgrade(&mut self, by: &str) {
        tracing::info!("{by}: the upgrade is abandoned; stopping gracefully (again to stop now)");
        self.stopping = true;
    }
}
