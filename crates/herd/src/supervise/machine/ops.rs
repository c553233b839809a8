//! The machine's operations: rolling reload, restart, scale, stop, and the
//! `--max-memory` replacement, which is a one-slot reload.

use std::time::Instant;

use super::{
    Action, Answer, Cause, Deploying, Epoch, Group, Machine, Reload, Slot, State, all_mut,
    terminate,
};
use crate::console::count;

impl Machine {
    pub(super) fn memory(&mut self, epoch: Epoch, rss: u64, now: Instant) {
        let Some(max) = self.limits.max_memory else {
            return;
        };
        let Some(w) = self.slots.iter_mut().find_map(|s| {
            s.current
                .as_mut()
                .filter(|w| w.epoch == epoch && w.state == State::Serving)
        }) else {
            return;
        };
        w.over_memory = if rss > max { w.over_memory + 1 } else { 0 };
        if w.over_memory != 3 {
            return;
        }
        tracing::warn!(
            "worker {} (pid {}) uses {} MiB, above --max-memory ({} MiB) for 3 samples; replacing it",
            w.slot,
            w.pid,
            rss >> 20,
            max >> 20
        );
        let slot = w.slot;
        self.replace_slot(slot, Cause::Memory, now);
    }

    /// A worker asked to be replaced: its successor first, as in a reload.
    pub(super) fn replace(&mut self, epoch: Epoch, now: Instant) {
        let Some(w) = self
            .slots
            .iter()
            .filter_map(|s| s.current.as_ref())
            .find(|w| w.epoch == epoch)
        else {
            return;
        };
        if w.state != State::Serving {
            tracing::info!(
                "worker {} (pid {}) asked to be replaced before it was ready; not replaced",
                w.slot,
                w.pid
            );
            return;
        }
        tracing::info!("worker {} (pid {}) asked to be replaced", w.slot, w.pid);
        let slot = w.slot;
        self.replace_slot(slot, Cause::Replace, now);
    }

    /// A one-slot reload, or a running reload takes the slot on (unless it
    /// is replacing it now).
    fn replace_slot(&mut self, slot: usize, cause: Cause, now: Instant) {
        if self.stopping {
            return;
        }
        match self.reload.as_mut() {
            None => self.reload(Some(vec![slot]), cause, now),
            Some(r) => {
                if !r.todo.iter().any(|&(s, _)| s == slot) && self.slots[slot].next.is_none() {
                    r.todo.push_back((slot, cause));
                }
            }
        }
    }

    pub(super) fn progress(&mut self, msg: String) {
        tracing::info!("reload: {msg}");
        self.out.push(Action::Progress(msg));
    }

    pub(super) fn reload(&mut self, slots: Option<Vec<usize>>, cause: Cause, now: Instant) {
        if let Some(why) = self.busy("reload") {
            tracing::warn!("{why}");
            self.out.push(Action::ReloadFailed(why));
            return;
        }
        let slots = slots.unwrap_or_else(|| (0..self.slots.len()).collect());
        let n = count(slots.len(), "worker");
        tracing::info!("rolling reload of {n}");
        self.out.push(Action::ReloadBegun);
        self.progress(format!("reloading {n}, one at a time"));
        self.reload = Some(Reload {
            todo: slots.into_iter().map(|s| (s, cause)).collect(),
            cause,
            waiting_on: None,
            fresh: None,
            replaced: 0,
            started: now,
        });
        self.reload_next(now);
    }

    /// Why `what` cannot run now, if it cannot.
    pub(crate) fn busy(&self, what: &str) -> Option<String> {
        if self.stopping {
            Some(format!("cannot {what}: the cluster is stopping"))
        } else if self.reload.is_some() {
            Some(format!(
                "a reload is already running; {what} once it is done"
            ))
        } else if self.slots.iter().any(|s| s.start_after.is_some()) {
            Some(format!(
                "a restart is still stopping workers; {what} once they are back"
            ))
        } else {
            None
        }
    }

    /// One slot is done; go on with the next.
    pub(super) fn reload_step(&mut self, now: Instant) {
        if let Some(r) = self.reload.as_mut() {
            r.replaced += 1;
            r.waiting_on = None;
        }
        self.reload_next(now);
    }

    /// Starts the next slot's replacement, or finishes.
    pub(super) fn reload_next(&mut self, now: Instant) {
        loop {
            let Some(r) = self.reload.as_mut() else {
                return;
            };
            match r.todo.pop_front() {
                Some((slot, cause)) if slot < self.slots.len() => {
                    r.cause = cause;
                    if !self.limits.stop_first {
                        let w = self.new_worker(slot, now);
                        self.slots[slot].next = Some(w);
                    } else if let Some(pid) = self.stop_then_start(slot, cause, now) {
                        self.progress(format!(
                            "worker {slot}: stopping pid {pid}; its successor starts once it has exited"
                        ));
                    }
                    return;
                }
                Some(_) => continue, // scaled down meanwhile
                None => break,
            }
        }
        if let Some(r) = self.reload.take() {
            if self.deploy.is_some_and(|d| d.promoting) {
                let n = self.retire_new_slots(now);
                self.deploy = None;
                self.progress(format!(
                    "promoted version {}; the deploy's {} leaving",
                    self.stable_version,
                    count(n, "worker")
                ));
            }
            let took = now.saturating_duration_since(r.started);
            tracing::info!(
                "reload done: {} replaced in {took:.1?}",
                count(r.replaced, "worker")
            );
            self.out.push(Action::ReloadDone {
                replaced: r.replaced,
            });
        }
    }

    /// Stop-first: `slot`'s worker leaves, and its successor starts as the
    /// slot's current once it has exited (at once if the slot has none).
    /// The pid of the worker stopped, if any.
    fn stop_then_start(&mut self, slot: usize, cause: Cause, now: Instant) -> Option<u32> {
        let s = &mut self.slots[slot];
        s.restart_at = None;
        s.restarts += 1;
        self.count(cause);
        let Some(old) = self.slots[slot].current.take() else {
            self.start_fresh(slot, now);
            return None;
        };
        if old.state == State::Serving {
            self.out.push(Action::Publish);
        }
        let pid = old.pid;
        self.slots[slot].start_after = Some(old.epoch);
        self.retire(old, now);
        Some(pid)
    }

    /// Stop-first: a retiring worker exited; its slot's successor starts.
    pub(super) fn successor(&mut self, exited: Epoch, now: Instant) {
        let Some(slot) = self
            .slots
            .iter()
            .position(|s| s.start_after == Some(exited))
        else {
            return;
        };
        self.slots[slot].start_after = None;
        if !self.stopping {
            self.start_fresh(slot, now);
        }
    }

    /// Starts `slot`'s current worker; a stop-first reload waits for it.
    /// (While one runs, nothing else stops workers: see [`Machine::busy`].)
    fn start_fresh(&mut self, slot: usize, now: Instant) {
        if self.slots[slot].current.is_some() {
            return;
        }
        self.spawn_current(slot, now);
        let epoch = self.slots[slot].current.as_ref().map(|w| w.epoch);
        if let Some(r) = self.reload.as_mut() {
            r.fresh = epoch;
        }
    }

    /// Stop-first: the reload's new worker ended before it was ready. The
    /// restart policy takes it on as any worker's end; the reload stops.
    pub(super) fn fresh_failed(&mut self, slot: usize, epoch: Epoch, why: &str) {
        if self.reload.as_ref().is_some_and(|r| r.fresh == Some(epoch)) {
            self.reload_fail(&format!("worker {slot}: {why}"));
        }
    }

    pub(super) fn reload_fail(&mut self, why: &str) {
        if let Some(d) = self.deploy.as_mut().filter(|d| d.promoting) {
            // Slots already replaced keep the new version: `herd promote`
            // again goes on, `herd rollback` brings them back.
            d.promoting = false;
            self.stable_version = d.old;
        }
        if self.reload.take().is_some() {
            let msg = if self.limits.stop_first {
                format!(
                    "reload aborted: {why}; it is restarted as after a crash, and the slots not reached keep their workers"
                )
            } else {
                format!("reload aborted: {why}; the old workers keep serving")
            };
            tracing::error!("{msg}");
            self.out.push(Action::ReloadFailed(msg));
        }
    }

    pub(super) fn restart(&mut self, now: Instant) {
        if let Some(why) = self.busy("restart") {
            self.out.push(Action::Answer(Err(why)));
            return;
        }
        let mut n = 0;
        for slot in 0..self.slots.len() {
            if self.limits.stop_first {
                n += usize::from(self.stop_then_start(slot, Cause::Restart, now).is_some());
                continue;
            }
            if let Some(old) = self.slots[slot].current.take() {
                self.retire(old, now);
                n += 1;
            }
            self.slots[slot].restarts += 1;
            self.count(Cause::Restart);
            self.spawn_current(slot, now);
        }
        self.out.push(Action::Publish);
        tracing::info!("restarted {}", count(n, "worker"));
        self.out.push(Action::Answer(Ok(Answer::Restarted(n))));
    }

    pub(super) fn scale(&mut self, to: usize, now: Instant) {
        if let Some(why) = self.busy("scale") {
            self.out.push(Action::Answer(Err(why)));
            return;
        }
        if self.deploy.is_some() {
            let why = "a deploy is running; promote it or roll it back, then scale";
            self.out.push(Action::Answer(Err(why.into())));
            return;
        }
        while self.slots.len() < to {
            self.slots.push(Slot::default());
            self.spawn_current(self.slots.len() - 1, now);
        }
        while self.slots.len() > to {
            if let Some(s) = self.slots.pop() {
                for w in s.current.into_iter().chain(s.next) {
                    self.retire(w, now);
                }
            }
        }
        self.out.push(Action::Publish);
        self.out.push(Action::Answer(Ok(Answer::Scaled(to))));
    }

    pub(super) fn deploy(&mut self, version: u32, workers: usize, now: Instant) {
        let refused = match (self.busy("deploy"), self.deploy) {
            (Some(why), _) => Some(why),
            (None, Some(_)) => {
                Some("a deploy is already running; promote it or roll it back first".into())
            }
            (None, None) if workers == 0 => Some("a deploy needs at least 1 worker".into()),
            (None, None) => None,
        };
        if let Some(why) = refused {
            self.out.push(Action::Answer(Err(why)));
            return;
        }
        self.deploy = Some(Deploying {
            old: self.stable_version,
            new: version,
            promoting: false,
        });
        tracing::info!(
            "deploy: starting {} of version {version}",
            count(workers, "worker")
        );
        for _ in 0..workers {
            self.slots.push(Slot {
                group: Group::New,
                ..Slot::default()
            });
            self.spawn_current(self.slots.len() - 1, now);
        }
        self.out.push(Action::Answer(Ok(Answer::Deployed(workers))));
    }

    /// Answered as a reload: progress, then done or failed.
    pub(super) fn promote(&mut self, now: Instant) {
        let Some(d) = self.deploy else {
            self.out.push(Action::ReloadFailed(
                "nothing to promote: no deploy is running".into(),
            ));
            return;
        };
        if let Some(why) = self.busy("promote") {
            self.out.push(Action::ReloadFailed(why));
            return;
        }
        let stable: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].group == Group::Stable)
            .collect();
        tracing::info!("promote: version {} replaces version {}", d.new, d.old);
        self.stable_version = d.new;
        self.deploy = Some(Deploying {
            promoting: true,
            ..d
        });
        self.reload(Some(stable), Cause::Deploy, now);
    }

    pub(super) fn rollback(&mut self, now: Instant) {
        let Some(d) = self.deploy else {
            let why = "nothing to roll back: no deploy is running";
            self.out.push(Action::Answer(Err(why.into())));
            return;
        };
        if let Some(why) = self.busy("roll back") {
            self.out.push(Action::Answer(Err(why)));
            return;
        }
        let n = self.retire_new_slots(now);
        self.deploy = None;
        self.stable_version = d.old;
        tracing::info!(
            "rollback: version {}'s {} leaving",
            d.new,
            count(n, "worker")
        );
        self.out.push(Action::Answer(Ok(Answer::RolledBack(n))));
        // After an aborted promote, some stable slots run the new version.
        let mixed: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .current
                    .as_ref()
                    .is_some_and(|w| w.version != self.stable_version)
            })
            .collect();
        if !mixed.is_empty() {
            self.reload(Some(mixed), Cause::Deploy, now);
        }
    }

    /// The deploy's slots (always the last ones) leave.
    fn retire_new_slots(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while self.slots.last().is_some_and(|s| s.group == Group::New) {
            if let Some(s) = self.slots.pop() {
                for w in s.current.into_iter().chain(s.next) {
                    self.retire(w, now);
                    n += 1;
                }
            }
        }
        self.out.push(Action::Publish);
        n
    }

    pub(super) fn stop(&mut self, now: Instant) {
        self.stopping = true;
        if self.reload.take().is_some() {
            self.out.push(Action::ReloadFailed(
                "reload aborted: the cluster is stopping".into(),
            ));
        }
        let kill_timeout = self.limits.kill_timeout;
        for s in &mut self.slots {
            s.restart_at = None;
        }
        let out = &mut self.out;
        for w in all_mut(&mut self.slots, &mut self.retiring) {
            if !matches!(w.state, State::Terminating { .. }) {
                terminate(w, now, kill_timeout, out);
            }
        }
    }
}

/// `n` as `herd scale` takes it: a count, or a change (`+2`, `-1`) from `now`.
pub fn scale_target(n: &str, now: usize) -> Result<usize, String> {
    let now = now as i64;
    let t = n.trim();
    let to = if let Some(d) = t.strip_prefix('+') {
        d.parse::<i64>().map(|d| now + d)
    } else if let Some(d) = t.strip_prefix('-') {
        d.parse::<i64>().map(|d| now - d)
    } else {
        t.parse::<i64>()
    }
    .map_err(|_| format!("{n:?} is not a count (N, +K or -K)"))?;
    if to < 1 {
        return Err(format!(
            "cannot scale to {to}: a cluster needs at least 1 worker (use `herd stop`)"
        ));
    }
    if to > crate::config::MAX_WORKERS as i64 {
        let most = crate::config::MAX_WORKERS;
        return Err(format!("cannot scale to {to}: at most {most} workers"));
    }
    Ok(to as usize)
}
