//! The cluster's stop: the proxy and the dispatcher finish what they took,
//! then the machine's stop (SIGTERM, SIGKILL after `--kill-timeout`), with
//! a second stop signal skipping to SIGKILL.

use std::time::Duration;

use super::machine::Input;
use super::signals::StopSignals;
use super::{Event, Supervisor, sleep_until};
use crate::config::Mode;
use crate::os::listen::Listeners;

impl Supervisor {
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
        if self.dispatcher.is_some() {
            // The dispatch thread's copy of the listening socket is then the
            // last: it takes what the kernel queued, closes, and every
            // connection accepted goes to a worker before any SIGTERM.
            self.listeners = None;
            let until = tokio::time::Instant::now() + grace;
            let taken = async {
                if let Some(d) = &self.dispatcher {
                    d.stop().await
                }
            };
            tokio::pin!(taken);
            loop {
                tokio::select! {
                    _ = &mut taken => break,
                    _ = tokio::time::sleep_until(until) => {
                        tracing::warn!("accepted connections still not taken by a worker after {grace:?}");
                        break;
                    }
                    _ = stop.recv() => {
                        hurry = true;
                        break;
                    }
                    Some(call) = self.calls.recv() => self.on_call_stopping(call),
                }
            }
        }
        if !hurry && self.s.mode == Mode::Proxy && self.active.get() > 0 {
            tracing::info!("waiting for {} open connections", self.active.get());
            let active = self.active.clone();
            let drained = active.drained();
            tokio::pin!(drained);
            let until = tokio::time::Instant::now() + grace;
            loop {
                tokio::select! {
                    _ = &mut drained => break,
                    _ = tokio::time::sleep_until(until) => {
                        tracing::warn!("{} connections still open after {grace:?}", active.get());
                        break;
                    }
                    _ = stop.recv() => {
                        hurry = true;
                        break;
                    }
                    Some(call) = self.calls.recv() => self.on_call_stopping(call),
                }
            }
        }
        self.stop_workers(stop, hurry).await;
        // In fd modes the master's copies go last: workers still drain
        // the queues, and a reuseport slot's queue lives as long as its socket.
        self.listeners = None;
    }

    /// The machine's stop: SIGTERM to every worker group, SIGKILL after
    /// `--kill-timeout` (at once on a second stop signal); returns when
    /// they are gone.
    pub(super) async fn stop_workers(&mut self, stop: &mut StopSignals, hurry: bool) {
        self.apply(Input::Stop, None);
        if hurry {
            self.apply(Input::Hurry, None);
        }
        // Bounded: SIGKILL comes at the latest a kill time-out from now.
        let limit = tokio::time::Instant::now() + self.s.kill_timeout + Duration::from_secs(5);
        while self.m.live() > 0 {
            let deadline = self.m.next_deadline();
            tokio::select! {
                Some(ev) = self.rx.recv() => {
                    if let Event::Exited { .. } = ev {
                        self.on_event(ev);
                    }
                }
                _ = sleep_until(deadline) => self.apply(Input::Timer, None),
                _ = stop.recv() => self.apply(Input::Hurry, None),
                Some(call) = self.calls.recv() => self.on_call_stopping(call),
                _ = tokio::time::sleep_until(limit) => {
                    tracing::warn!("{} still running after SIGKILL", crate::console::count(self.m.live(), "worker"));
                    break;
                }
            }
        }
    }
}
