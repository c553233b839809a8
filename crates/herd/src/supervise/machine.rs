//! The supervisor's decisions as one state machine: [`Machine::on`] takes an
//! [`Input`] and the time, and returns the [`Action`]s to carry out. Pure:
//! it forks, signals, sleeps and reads nothing; the driver in the parent
//! module does, and reports back what happened. Its tests run on a fake
//! clock in milliseconds.
//!
//! # A worker's states
//!
//! ```text
//!            ready                leaves traffic          drained or
//! Starting ────────▶ Serving ───────────────────▶ Draining ──────────▶ Terminating ──▶ (exited)
//!    │  not ready by --ready-timeout: SIGKILL        --drain-timeout     SIGTERM; SIGKILL after
//!    └──────────────────────────────────────────────────────────────────▶ --kill-timeout
//! ```
//!
//! Each worker has an epoch (its identity for life) and a role in its slot:
//! the slot's *current* worker, the *next* one a rolling reload is starting,
//! or a *retiring* one. Only current workers in `Serving` take traffic.
//! A current worker's exit goes to the restart policy ([`super::policy`]);
//! a next one's exit or ready time-out aborts the reload; a retiring one's
//! exit lets the reload go on to the next slot.
//!
//! # Reload, restart, scale
//!
//! A rolling reload replaces one slot at a time: the next worker starts,
//! becomes current once ready, the old one retires, and the next slot
//! starts only once the old one has exited. `restart` retires every worker
//! and starts its replacement at once. Scaling adds slots, or retires the
//! highest ones. Neither runs during a reload, and nothing starts after
//! [`Input::Stop`].
//!
//! With [`Limits::stop_first`] (fork mode, where a program may bind a port
//! of its own) a slot's old worker exits before its successor starts, as
//! PM2 restarts fork-mode apps: a reload stops one slot's worker, starts
//! the new one as the slot's current (the restart policy applies to it),
//! and goes on to the next slot once it is ready; `restart` stops them all
//! and starts each successor as its predecessor exits.
//!
//! Over 500 lines because each state and every way out of it read best in
//! one file; the operations (reload, restart, scale, stop) are in [`ops`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::policy::{Decision, Ending, Record, RestartPolicy};

/// A worker's identity for its whole life, never reused.
pub type Epoch = u64;

/// The settings the machine decides with.
#[derive(Debug, Clone)]
pub struct Limits {
    pub restart: RestartPolicy,
    /// Time a retiring worker has to finish its in-flight work before SIGTERM.
    pub drain_timeout: Duration,
    /// Time from SIGTERM to SIGKILL.
    pub kill_timeout: Duration,
    /// `--watchdog`: a worker that pinged once and then is silent this long is killed.
    pub watchdog: Option<Duration>,
    /// `--max-memory` in bytes: replaced after 3 samples in a row above it.
    pub max_memory: Option<u64>,
    /// Added to the "not ready" warning (what readiness means in this mode).
    pub not_ready_hint: &'static str,
    /// A successor starts only once its predecessor exited (fork mode).
    pub stop_first: bool,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, not ready yet; SIGKILL at `deadline` if it still is not.
    Starting { deadline: Instant },
    /// Ready and taking traffic (current workers only).
    Serving,
    /// Out of traffic, finishing its work; SIGTERM when the driver reports
    /// it drained, or at `deadline`.
    Draining { deadline: Instant },
    /// SIGTERM sent; SIGKILL at `kill_at`, `None` once SIGKILL was sent.
    Terminating { kill_at: Option<Instant> },
}

/// Why a slot got a new worker, counted for `herd_restarts_total{cause}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It exited or crashed.
    Exit,
    NotReady,
    SpawnFailed,
    Watchdog,
    /// A rolling reload (`herd reload`, SIGHUP, `--watch`).
    Reload,
    Memory,
    /// The worker, or `herd monit`, asked for it.
    Replace,
    /// `herd restart`.
    Restart,
    /// A deploy's promote or rollback.
    Deploy,
}

impl Cause {
    pub const ALL: [Cause; 9] = [
        Cause::Exit,
        Cause::NotReady,
        Cause::SpawnFailed,
        Cause::Watchdog,
        Cause::Reload,
        Cause::Memory,
        Cause::Replace,
        Cause::Restart,
        Cause::Deploy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Exit => "exit",
            Cause::NotReady => "not_ready",
            Cause::SpawnFailed => "spawn_failed",
            Cause::Watchdog => "watchdog",
            Cause::Reload => "reload",
            Cause::Memory => "memory",
            Cause::Replace => "replace",
            Cause::Restart => "restart",
            Cause::Deploy => "deploy",
        }
    }
}

/// Which set of slots a worker belongs to: the cluster's own, or a
/// deploy's new ones (canary or blue-green) beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Group {
    #[default]
    Stable,
    New,
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub epoch: Epoch,
    pub slot: usize,
    pub group: Group,
    /// The release it runs (the driver keeps each one's command and environment).
    pub version: u32,
    /// 0 until the driver reports it started.
    pub pid: u32,
    pub state: State,
    pub started: Instant,
    last_ping: Option<Instant>,
    over_memory: u32,
    /// Killed for not being ready: its exit is a quick one whatever its uptime.
    not_ready: bool,
    /// Killed for missing its watchdog.
    watchdog: bool,
}

#[derive(Debug, Default)]
struct Slot {
    group: Group,
    current: Option<Worker>,
    next: Option<Worker>,
    record: Record,
    restarts: u64,
    last_exit: Option<String>,
    restart_at: Option<Instant>,
    /// Stop-first: start this slot's worker once this retiring one exits.
    start_after: Option<Epoch>,
}

/// What happened, as the driver reports it, or what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Start every slot's worker.
    Start,
    /// The process of `epoch` runs as `pid`.
    Started {
        epoch: Epoch,
        pid: u32,
    },
    /// The process of `epoch` could not be started.
    SpawnFailed {
        epoch: Epoch,
        why: String,
    },
    Ready {
        epoch: Epoch,
    },
    /// `WATCHDOG=1`.
    Pinged {
        epoch: Epoch,
    },
    /// The worker asked to be replaced (`{"type":"replace"}`).
    Replace {
        epoch: Epoch,
    },
    /// A sample of the worker's resident memory, in bytes.
    Memory {
        epoch: Epoch,
        rss: u64,
    },
    /// A draining worker has nothing in flight any more.
    Drained {
        epoch: Epoch,
    },
    /// The process exited; `how` says how ("exited with code 1"), `code`
    /// is its exit code (none when a signal killed it).
    Exited {
        epoch: Epoch,
        how: String,
        code: Option<i32>,
    },
    /// Time passed: [`Machine::next_deadline`] may have come.
    Timer,
    /// Rolling reload of these slots (`None`: all).
    Reload {
        slots: Option<Vec<usize>>,
    },
    /// Replace this slot's worker on request (answered as a reload).
    ReplaceSlot {
        slot: usize,
    },
    /// Stop and start every worker at once.
    Restart,
    Scale {
        to: usize,
    },
    /// Start `workers` new slots running `version` beside the others.
    Deploy {
        version: u32,
        workers: usize,
    },
    /// The deploy's version replaces the stable slots' (a rolling reload),
    /// then the deploy's slots leave.
    Promote,
    /// The deploy's slots leave; stable slots running another version than
    /// the stable one (a promote that was aborted) are reloaded back.
    Rollback,
    /// Stop: SIGTERM to every worker, SIGKILL after `--kill-timeout`.
    Stop,
    /// Stop now: SIGKILL to every worker.
    Hurry,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a process for `slot` as `epoch`; report `Started` or `SpawnFailed`.
    Spawn {
        slot: usize,
        epoch: Epoch,
        version: u32,
    },
    /// The set of serving workers changed: republish it.
    Publish,
    /// Take `epoch` out of traffic for good; report `Drained` once idle.
    Drain {
        epoch: Epoch,
    },
    /// Tell the worker it is shutting down, then SIGTERM its group.
    Terminate {
        epoch: Epoch,
    },
    /// SIGKILL its group.
    Kill {
        epoch: Epoch,
    },
    /// Its process exited: release what the driver holds for it.
    Forget {
        epoch: Epoch,
    },
    /// Every slot served for the first time.
    AllReady,
    /// A reload began: its progress and outcome go to whoever asked.
    ReloadBegun,
    Progress(String),
    ReloadDone {
        replaced: usize,
    },
    ReloadFailed(String),
    /// The answer to `Restart` or `Scale`.
    Answer(Result<Answer, String>),
    /// Give up and stop the cluster with this message.
    CrashLoop(String),
    /// `--autorestart=false`: every worker has ended; stop the cluster.
    AllEnded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Restarted(usize),
    Scaled(usize),
    Deployed(usize),
    RolledBack(usize),
}

/// A deploy in progress: its new slots run `new`; `old` is the stable
/// version it started from, to return to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deploying {
    pub old: u32,
    pub new: u32,
    /// A promote's reload is running.
    pub promoting: bool,
}

struct Reload {
    /// Slots still to replace, and why each.
    todo: VecDeque<(usize, Cause)>,
    /// Why the slot being replaced now is.
    cause: Cause,
    /// The retiring worker whose exit lets the next slot start.
    waiting_on: Option<Epoch>,
    /// Stop-first: the slot's new current worker, whose readiness lets
    /// the next slot start.
    fresh: Option<Epoch>,
    replaced: usize,
    started: Instant,
}

pub struct Machine {
    limits: Limits,
    slots: Vec<Slot>,
    retiring: Vec<Worker>,
    reload: Option<Reload>,
    next_epoch: Epoch,
    all_ready_once: bool,
    stopping: bool,
    /// The version stable slots start.
    stable_version: u32,
    deploy: Option<Deploying>,
    /// New workers by cause, in `Cause::ALL`'s order.
    restarts_by: [u64; Cause::ALL.len()],
    out: Vec<Action>,
}

impl Machine {
    pub fn new(instances: usize, limits: Limits) -> Machine {
        Machine {
            limits,
            slots: (0..instances).map(|_| Slot::default()).collect(),
            retiring: Vec::new(),
            reload: None,
            next_epoch: 0,
            all_ready_once: false,
            stopping: false,
            stable_version: 0,
            deploy: None,
            restarts_by: [0; Cause::ALL.len()],
            out: Vec::new(),
        }
    }

    /// Decides what follows `input` at `now`.
    pub fn on(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::Start => self.start(now),
            Input::Started { epoch, pid } => self.started(epoch, pid),
            Input::SpawnFailed { epoch, why } => self.spawn_failed(epoch, why, now),
            Input::Ready { epoch } => self.ready(epoch, now),
            Input::Pinged { epoch } => {
                if let Some(w) = self.find_mut(epoch) {
                    w.last_ping = Some(now);
                }
            }
            Input::Memory { epoch, rss } => self.memory(epoch, rss, now),
            Input::Replace { epoch } => self.replace(epoch, now),
            Input::Drained { epoch } => {
                if let Some(w) = self.retiring.iter_mut().find(|w| w.epoch == epoch)
                    && matches!(w.state, State::Draining { .. })
                {
                    terminate(w, now, self.limits.kill_timeout, &mut self.out);
                }
            }
            Input::Exited { epoch, how, code } => self.exited(epoch, how, code, now),
            Input::Timer => self.timer(now),
            Input::Reload { slots } => self.reload(slots, Cause::Reload, now),
            Input::ReplaceSlot { slot } => self.reload(Some(vec![slot]), Cause::Replace, now),
            Input::Restart => self.restart(now),
            Input::Scale { to } => self.scale(to, now),
            Input::Deploy { version, workers } => self.deploy(version, workers, now),
            Input::Promote => self.promote(now),
            Input::Rollback => self.rollback(now),
            Input::Stop => self.stop(now),
            Input::Hurry => {
                let out = &mut self.out;
                for w in all_mut(&mut self.slots, &mut self.retiring) {
                    if !matches!(w.state, State::Terminating { kill_at: None }) {
                        w.state = State::Terminating { kill_at: None };
                        out.push(Action::Kill { epoch: w.epoch });
                    }
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    /// When [`Input::Timer`] is next due, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timers = self.slots.iter().filter_map(|s| s.restart_at);
        let states = self.workers().filter_map(|w| match w.state {
            State::Starting { deadline } | State::Draining { deadline } => Some(deadline),
            State::Terminating { kill_at } => kill_at,
            State::Serving => None,
        });
        let watchdog = self.limits.watchdog.into_iter().flat_map(|limit| {
            self.slots
                .iter()
                .filter_map(|s| s.current.as_ref())
                .filter(|w| !matches!(w.state, State::Terminating { .. }))
                .filter_map(move |w| w.last_ping.map(|p| p + limit))
        });
        timers.chain(states).chain(watchdog).min()
    }

    /// Every worker alive, whatever its state or role.
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.slots
            .iter()
            .flat_map(|s| s.current.iter().chain(s.next.iter()))
            .chain(self.retiring.iter())
    }

    pub fn find(&self, epoch: Epoch) -> Option<&Worker> {
        self.workers().find(|w| w.epoch == epoch)
    }

    /// The slot's current worker.
    pub fn current(&self, slot: usize) -> Option<&Worker> {
        self.slots.get(slot)?.current.as_ref()
    }

    /// Current workers taking traffic.
    pub fn serving(&self) -> impl Iterator<Item = &Worker> {
        self.slots
            .iter()
            .filter_map(|s| s.current.as_ref())
            .filter(|w| w.state == State::Serving)
    }

    /// Slots with no worker starting or serving: each one's index, the
    /// version it runs, and whether a worker is due (after a back-off, or
    /// once its predecessor has exited).
    pub fn empty_slots(&self) -> impl Iterator<Item = (usize, u32, bool)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.current.is_none() && s.next.is_none())
            .map(|(i, s)| {
                let due = s.restart_at.is_some() || s.start_after.is_some();
                (i, self.version_of(s.group), due)
            })
    }

    /// The version a slot of `group` starts.
    fn version_of(&self, group: Group) -> u32 {
        match (group, self.deploy) {
            (Group::New, Some(d)) => d.new,
            _ => self.stable_version,
        }
    }

    /// `herd reset` (`pm2 reset`): every slot's restart count back to 0.
    /// The counts by cause stay: they are the metrics' counters, which
    /// never go down.
    pub fn reset_restarts(&mut self) {
        for s in &mut self.slots {
            s.restarts = 0;
        }
    }

    /// A slot's restarts and how its last worker ended.
    pub fn history(&self, slot: usize) -> (u64, Option<&str>) {
        self.slots
            .get(slot)
            .map_or((0, None), |s| (s.restarts, s.last_exit.as_deref()))
    }

    pub fn instances(&self) -> usize {
        self.slots.len()
    }

    pub fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    pub fn deploying(&self) -> Option<Deploying> {
        self.deploy
    }

    /// The version stable slots start now.
    pub fn stable_version(&self) -> u32 {
        self.stable_version
    }

    /// New workers so far, by why.
    pub fn restarts_by_cause(&self) -> impl Iterator<Item = (Cause, u64)> + '_ {
        Cause::ALL
            .iter()
            .copied()
            .zip(self.restarts_by.iter().copied())
    }

    fn count(&mut self, cause: Cause) {
        if let Some(i) = Cause::ALL.iter().position(|&c| c == cause) {
            self.restarts_by[i] += 1;
        }
    }

    /// Whether every slot of `group` has a serving worker (and there is one).
    pub fn group_serving(&self, group: Group) -> bool {
        let mut slots = self.slots.iter().filter(|s| s.group == group).peekable();
        slots.peek().is_some()
            && slots.all(|s| {
                s.current
                    .as_ref()
                    .is_some_and(|w| w.state == State::Serving)
            })
    }

    pub fn live(&self) -> usize {
        self.workers().count()
    }

    fn find_mut(&mut self, epoch: Epoch) -> Option<&mut Worker> {
        all_mut(&mut self.slots, &mut self.retiring).find(|w| w.epoch == epoch)
    }

    fn new_worker(&mut self, slot: usize, now: Instant) -> Worker {
        self.next_epoch += 1;
        let group = self.slots[slot].group;
        let version = self.version_of(group);
        self.out.push(Action::Spawn {
            slot,
            epoch: self.next_epoch,
            version,
        });
        Worker {
            epoch: self.next_epoch,
            slot,
            group,
            version,
            pid: 0,
            state: State::Starting {
                deadline: now + self.limits.restart.ready_timeout,
            },
            started: now,
            last_ping: None,
            over_memory: 0,
            not_ready: false,
            watchdog: false,
        }
    }

    fn spawn_current(&mut self, slot: usize, now: Instant) {
        let w = self.new_worker(slot, now);
        let s = &mut self.slots[slot];
        s.restart_at = None;
        s.current = Some(w);
    }

    fn start(&mut self, now: Instant) {
        for slot in 0..self.slots.len() {
            self.spawn_current(slot, now);
        }
        self.check_all_ready();
    }

    fn started(&mut self, epoch: Epoch, pid: u32) {
        let Some(w) = self.find_mut(epoch) else {
            return;
        };
        w.pid = pid;
        let slot = w.slot;
        let is_next = self
            .slots
            .get(slot)
            .and_then(|s| s.next.as_ref())
            .is_some_and(|w| w.epoch == epoch);
        if is_next {
            self.progress(format!("worker {slot}: new worker started (pid {pid})"));
        } else {
            tracing::info!("worker {slot} started (pid {pid})");
        }
    }

    fn spawn_failed(&mut self, epoch: Epoch, why: String, now: Instant) {
        let Some(slot) = self.find(epoch).map(|w| w.slot) else {
            return;
        };
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.current.take_if(|w| w.epoch == epoch).is_some() {
            if !self.stopping {
                tracing::error!("worker {slot}: {why}");
                self.fresh_failed(slot, epoch, &why);
                self.count(Cause::SpawnFailed);
                self.on_end(slot, &Ending::SpawnFailed { why }, now);
            }
        } else if s.next.take_if(|w| w.epoch == epoch).is_some() {
            self.reload_fail(&format!("worker {slot}: {why}"));
        }
    }

    fn ready(&mut self, epoch: Epoch, now: Instant) {
        let Some(w) = self.find(epoch) else { return };
        if !matches!(w.state, State::Starting { .. }) {
            return; // READY=1 and a `listening` line both came, or too late
        }
        let slot = w.slot;
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if let Some(w) = s.current.as_mut().filter(|w| w.epoch == epoch) {
            w.state = State::Serving;
            let pid = w.pid;
            tracing::info!("worker {slot} ready (pid {pid})");
            self.out.push(Action::Publish);
            self.check_all_ready();
            if let Some(r) = self.reload.as_mut()
                && r.fresh == Some(epoch)
            {
                r.fresh = None;
                self.progress(format!("worker {slot}: pid {pid} ready"));
                self.reload_step(now);
            }
        } else if let Some(mut new) = s.next.take_if(|w| w.epoch == epoch) {
            // A rolling reload's new worker takes the slot; the old one leaves.
            new.state = State::Serving;
            let new_pid = new.pid;
            let old = s.current.replace(new);
            s.restarts += 1;
            let cause = self.reload.as_ref().map_or(Cause::Reload, |r| r.cause);
            self.count(cause);
            self.out.push(Action::Publish);
            match old {
                Some(old) => {
                    self.progress(format!(
                        "worker {slot}: pid {new_pid} ready and serving; pid {} draining",
                        old.pid
                    ));
                    if let Some(r) = self.reload.as_mut() {
                        r.waiting_on = Some(old.epoch);
                    }
                    self.retire(old, now);
                }
                None => {
                    self.progress(format!("worker {slot}: pid {new_pid} ready and serving"));
                    self.reload_step(now);
                }
            }
        }
    }

    fn check_all_ready(&mut self) {
        if !self.all_ready_once
            && self.slots.iter().all(|s| {
                s.current
                    .as_ref()
                    .is_some_and(|w| w.state == State::Serving)
            })
        {
            self.all_ready_once = true;
            tracing::info!("all workers ready ({})", self.slots.len());
            self.out.push(Action::AllReady);
        }
    }

    /// Takes `w` (already out of its slot) out of traffic for good.
    fn retire(&mut self, mut w: Worker, now: Instant) {
        w.state = State::Draining {
            deadline: now + self.limits.drain_timeout,
        };
        self.out.push(Action::Drain { epoch: w.epoch });
        self.retiring.push(w);
    }

    fn exited(&mut self, epoch: Epoch, how: String, code: Option<i32>, now: Instant) {
        let Some(slot) = self.find(epoch).map(|w| w.slot) else {
            return;
        };
        self.out.push(Action::Forget { epoch });
        // Retiring first: a scale-down may have removed its slot.
        if let Some(i) = self.retiring.iter().position(|w| w.epoch == epoch) {
            let w = self.retiring.remove(i);
            tracing::info!("worker {slot} (pid {}) {how} (retired)", w.pid);
            self.successor(epoch, now);
            if self
                .reload
                .as_ref()
                .is_some_and(|r| r.waiting_on == Some(epoch))
            {
                self.reload_step(now);
            }
            return;
        }
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if let Some(w) = s.current.take_if(|w| w.epoch == epoch) {
            if w.state == State::Serving {
                self.out.push(Action::Publish);
            }
            if self.stopping {
                tracing::info!("worker {slot} (pid {}) {how}", w.pid);
                return;
            }
            let ran = now.saturating_duration_since(w.started);
            tracing::warn!(
                "worker {slot} (pid {}) {how} after {:.1?}",
                w.pid,
                Duration::from_millis(ran.as_millis() as u64)
            );
            s.last_exit = Some(how.clone());
            s.restarts += 1;
            self.count(if w.not_ready {
                Cause::NotReady
            } else if w.watchdog {
                Cause::Watchdog
            } else {
                Cause::Exit
            });
            self.fresh_failed(
                slot,
                epoch,
                &format!("the new worker {how} before it was ready"),
            );
            let ending = if w.not_ready {
                Ending::NotReady
            } else {
                Ending::Exited { ran, how, code }
            };
            self.on_end(slot, &ending, now);
        } else if let Some(w) = s.next.take_if(|w| w.epoch == epoch) {
            tracing::info!("worker {slot} (pid {}) {how}", w.pid);
            if self.reload.is_some() {
                self.reload_fail(&format!(
                    "worker {slot}: the new worker {how} before it was ready"
                ));
            }
        }
    }

    /// Carries out the restart policy's decision for a slot whose worker ended.
    fn on_end(&mut self, slot: usize, ending: &Ending, now: Instant) {
        let s = &mut self.slots[slot];
        match self.limits.restart.on_end(slot, &mut s.record, ending) {
            Decision::Restart { after } if after.is_zero() => {
                tracing::info!("restarting worker {slot} now");
                self.spawn_current(slot, now);
            }
            Decision::Restart { after } => {
                tracing::info!("restarting worker {slot} in {after:?}");
                s.restart_at = Some(now + after);
            }
            Decision::CrashLoop { message } => {
                tracing::error!("{message}");
                self.out.push(Action::CrashLoop(message));
            }
            Decision::StayDown { why } => {
                tracing::info!("worker {slot} stays down ({why})");
                let left = self.slots.iter().any(|s| {
                    s.current.is_some()
                        || s.next.is_some()
                        || s.restart_at.is_some()
                        || s.start_after.is_some()
                });
                if !left && self.reload.is_none() {
                    tracing::info!("no worker is left ({why}): stopping");
                    self.out.push(Action::AllEnded);
                }
            }
        }
    }

    fn timer(&mut self, now: Instant) {
        if !self.stopping {
            for slot in 0..self.slots.len() {
                let s = &self.slots[slot];
                if s.current.is_none() && s.restart_at.is_some_and(|t| t <= now) {
                    self.spawn_current(slot, now);
                }
            }
        }
        let limits = self.limits.clone();
        // Current workers: not ready in time, or silent past the watchdog.
        for s in &mut self.slots {
            let Some(w) = s.current.as_mut() else {
                continue;
            };
            match w.state {
                State::Starting { deadline } if deadline <= now => {
                    tracing::warn!(
                        "worker {} (pid {}) not ready within {:?}; killing it{}",
                        w.slot,
                        w.pid,
                        limits.restart.ready_timeout,
                        limits.not_ready_hint
                    );
                    w.not_ready = true;
                    kill(w, &mut self.out);
                }
                State::Starting { .. } | State::Serving => {
                    if let (Some(limit), Some(p)) = (limits.watchdog, w.last_ping)
                        && now.saturating_duration_since(p) >= limit
                    {
                        tracing::warn!(
                            "worker {} (pid {}) missed its watchdog: no WATCHDOG=1 for {:?}; killing it",
                            w.slot,
                            w.pid,
                            now.saturating_duration_since(p)
                        );
                        if w.state == State::Serving {
                            self.out.push(Action::Publish);
                        }
                        w.watchdog = true;
                        kill(w, &mut self.out);
                    }
                }
                _ => {}
            }
        }
        // A reload's new worker not ready in time aborts the reload.
        let late = self.slots.iter().position(|s| {
            s.next
                .as_ref()
                .is_some_and(|w| matches!(w.state, State::Starting { deadline } if deadline <= now))
        });
        if let Some(slot) = late
            && let Some(mut w) = self.slots[slot].next.take()
        {
            kill(&mut w, &mut self.out);
            self.retiring.push(w);
            self.reload_fail(&format!(
                "worker {slot}: the new worker was not ready within {:?}",
                limits.restart.ready_timeout
            ));
        }
        // Draining and terminating workers (all of them once stopping).
        for w in all_mut(&mut self.slots, &mut self.retiring) {
            match w.state {
                State::Draining { deadline } if deadline <= now => {
                    tracing::info!(
                        "worker {} (pid {}) still busy after {:?} of draining; SIGTERM",
                        w.slot,
                        w.pid,
                        limits.drain_timeout
                    );
                    terminate(w, now, limits.kill_timeout, &mut self.out);
                }
                State::Terminating { kill_at: Some(t) } if t <= now => {
                    tracing::warn!(
                        "worker {} (pid {}) still running {:?} after SIGTERM; SIGKILL",
                        w.slot,
                        w.pid,
                        limits.kill_timeout
                    );
                    kill(w, &mut self.out);
                }
                _ => {}
            }
        }
    }
}

fn all_mut<'a>(
    slots: &'a mut [Slot],
    retiring: &'a mut [Worker],
) -> impl Iterator<Item = &'a mut Worker> {
    slots
        .iter_mut()
        .flat_map(|s| s.current.iter_mut().chain(s.next.iter_mut()))
        .chain(retiring.iter_mut())
}

fn terminate(w: &mut Worker, now: Instant, kill_timeout: Duration, out: &mut Vec<Action>) {
    w.state = State::Terminating {
        kill_at: Some(now + kill_timeout),
    };
    out.push(Action::Terminate { epoch: w.epoch });
}

fn kill(w: &mut Worker, out: &mut Vec<Action>) {
    w.state = State::Terminating { kill_at: None };
    out.push(Action::Kill { epoch: w.epoch });
}

mod ops;
pub use ops::scale_target;

#[cfg(test)]
mod tests;
