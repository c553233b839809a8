//! Operations on a running cluster: rolling reload, restart, scaling and
//! status, driven by the control socket and by signals.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::{Event, Slot, Supervisor, Worker, kill_group};
use crate::config::Mode;
use crate::console::count;
use crate::control::{Call, Done, Line, Request, Status, WorkerRow, WorkerState};
use crate::os::listen::Listeners;

/// A rolling reload in progress: one slot at a time, new worker ready
/// before the old one leaves, old one gone before the next slot starts.
pub(super) struct Reload {
    todo: VecDeque<usize>,
    wait: Wait,
    reply: Option<UnboundedSender<Line>>,
    replaced: usize,
    started: Instant,
}

enum Wait {
    NewReady,
    OldExit(u64),
}

impl Supervisor {
    /// Handles a control request; true when the cluster must stop.
    pub(super) fn on_call(&mut self, call: Call) -> bool {
        let Call {
            req,
            reply,
            written,
        } = call;
        match req {
            Request::Status => self.status(reply),
            Request::Reload => self.reload_start(Some(reply)),
            Request::Restart => {
                let n = self.restart_all();
                let _ = reply.send(
                    Done {
                        restarted: Some(n),
                        ..Done::ok()
                    }
                    .into(),
                );
            }
            Request::Scale { n } => {
                let answer = match self.scale(&n) {
                    Ok(to) => Done {
                        workers: Some(to),
                        ..Done::ok()
                    },
                    Err(e) => Done::failed(e),
                };
                let _ = reply.send(answer.into());
            }
            Request::Send { id, message } => {
                let from = json!("cli");
                let answer = match self.deliver(id, &from, &message) {
                    Ok(()) => Done {
                        delivered: Some(1),
                        ..Done::ok()
                    },
                    Err(e) => Done::failed(e),
                };
                let _ = reply.send(answer.into());
            }
            Request::Broadcast { message } => {
                let (n, failed) = self.broadcast(None, &json!("cli"), &message);
                let answer = Done {
                    delivered: Some(n),
                    ..if failed.is_empty() {
                        Done::ok()
                    } else {
                        Done::failed(failed.join("; "))
                    }
                };
                let _ = reply.send(answer.into());
            }
            Request::Stop => {
                tracing::info!("stop requested on the control socket");
                let _ = reply.send(
                    Done {
                        stopping: Some(true),
                        pid: Some(std::process::id()),
                        ..Done::ok()
                    }
                    .into(),
                );
                self.stop_reply = Some(written);
                return true;
            }
        }
        false
    }

    /// Delivers `data` to worker `id`'s channel.
    fn deliver(&self, id: usize, from: &Value, data: &Value) -> Result<(), String> {
        let w = self
            .slots
            .get(id)
            .and_then(|s| s.worker.as_ref())
            .ok_or_else(|| format!("worker {id} is not running"))?;
        let ch = w
            .ipc
            .as_ref()
            .ok_or_else(|| format!("worker {id} has no message channel"))?;
        ch.send(&json!({"type": "message", "from": from, "data": data}))
            .map_err(|e| format!("worker {id} cannot receive: {e}"))
    }

    /// Delivers to every worker but `except`; returns (delivered, failures).
    fn broadcast(&self, except: Option<usize>, from: &Value, data: &Value) -> (usize, Vec<String>) {
        let (mut n, mut failed) = (0, Vec::new());
        for id in (0..self.slots.len()).filter(|&i| Some(i) != except) {
            match self.deliver(id, from, data) {
                Ok(()) => n += 1,
                Err(e) => failed.push(e),
            }
        }
        (n, failed)
    }

    /// A message from a worker's channel.
    pub(super) fn on_message(&mut self, epoch: u64, msg: Result<Value, String>) {
        let Some(slot) = (match self.place(epoch) {
            Some(super::Place::Current(s) | super::Place::Next(s)) => Some(s),
            Some(super::Place::Retiring(i)) => Some(self.retiring[i].0),
            None => None,
        }) else {
            return;
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("worker {slot}: {e}");
                return;
            }
        };
        // `ready` is READY=1 by another road (Node cannot send Unix
        // datagrams); `listening` (herd's Node preload) is as weak as a
        // passed port probe. In dispatch mode only the dispatch socket's
        // `listening` counts.
        let kind = msg.get("type").and_then(Value::as_str);
        if matches!(kind, Some("ready" | "listening")) {
            let weak = kind == Some("listening");
            if self.s.mode != Mode::Dispatch && !(weak && self.s.wait_ready) {
                self.handle(Event::Ready { epoch, addr: None });
            }
            return;
        }
        let from = json!(slot);
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        let failures: Vec<(Option<u64>, String)> = match msg.get("type").and_then(Value::as_str) {
            Some("master") => {
                tracing::info!("worker {slot} says: {data}");
                Vec::new()
            }
            Some("send") => match msg.get("to").and_then(Value::as_u64) {
                Some(to) => self
                    .deliver(to as usize, &from, &data)
                    .err()
                    .map(|e| (Some(to), e))
                    .into_iter()
                    .collect(),
                None => vec![(None, "\"send\" needs \"to\": a worker id".to_string())],
            },
            Some("broadcast") => self
                .broadcast(Some(slot), &from, &data)
                .1
                .into_iter()
                .map(|e| (None, e))
                .collect(),
            other => vec![(
                None,
                format!(
                    "unknown message type {other:?} (send, broadcast, master, ready, listening)"
                ),
            )],
        };
        // Never lost silently: the sender hears of every failed delivery.
        let sender = self
            .slots
            .get(slot)
            .and_then(|s| s.worker.as_ref())
            .and_then(|w| w.ipc.as_ref());
        for (to, error) in failures {
            tracing::debug!("worker {slot}: undeliverable: {error}");
            if let Some(ch) = sender {
                let _ = ch.send(
                    &json!({"type": "undeliverable", "to": to, "data": data, "error": error}),
                );
            }
        }
    }

    /// Once a second: the watchdog, and `--max-memory`.
    pub(super) fn on_tick(&mut self) {
        let now_ms = self.started.elapsed().as_millis() as u64 + 1;
        let page = procfs::page_size();
        let mut over = Vec::new();
        for (slot, s) in self.slots.iter_mut().enumerate() {
            let Some(w) = s.worker.as_mut() else { continue };
            if let Some(limit) = self.s.watchdog {
                let last = w.pings.load(std::sync::atomic::Ordering::Relaxed);
                let quiet = now_ms.saturating_sub(last);
                if last > 0 && quiet > limit.as_millis() as u64 && !w.watchdog_fired {
                    tracing::warn!(
                        "worker {slot} (pid {}) missed its watchdog: no WATCHDOG=1 for {:?}; killing it",
                        w.pid,
                        Duration::from_millis(quiet)
                    );
                    w.watchdog_fired = true;
                    kill_group(w.pid, Signal::SIGKILL);
                }
            }
            if let (Some(max), true) = (self.s.max_memory, w.ready) {
                let rss = procfs::process::Process::new(w.pid as i32)
                    .and_then(|p| p.stat())
                    .map_or(0, |st| st.rss * page);
                w.over_memory = if rss > max { w.over_memory + 1 } else { 0 };
                if w.over_memory == 3 {
                    tracing::warn!(
                        "worker {slot} (pid {}) uses {} MiB, above --max-memory ({} MiB) for 3 s; replacing it",
                        w.pid,
                        rss >> 20,
                        max >> 20
                    );
                    over.push(slot);
                }
            }
        }
        if !over.is_empty() && self.reload.is_none() {
            self.reload_slots(over, None);
        }
    }

    pub(super) fn reload_start(&mut self, reply: Option<UnboundedSender<Line>>) {
        if self.reload.is_some() {
            let msg = "a reload is already running; wait for it to finish";
            tracing::warn!("{msg}");
            if let Some(r) = reply {
                let _ = r.send(Done::failed(msg).into());
            }
            return;
        }
        self.reload_slots((0..self.slots.len()).collect(), reply);
    }

    /// Rolling replacement of `slots`, one at a time.
    fn reload_slots(&mut self, slots: Vec<usize>, reply: Option<UnboundedSender<Line>>) {
        let n = slots.len();
        tracing::info!("rolling reload of {}", count(n, "worker"));
        if let Some(r) = &reply {
            let _ = r.send(Line::progress(format!(
                "reloading {}, one at a time",
                count(n, "worker")
            )));
        }
        self.reload = Some(Reload {
            todo: slots.into(),
            wait: Wait::NewReady,
            reply,
            replaced: 0,
            started: Instant::now(),
        });
        self.reload_next();
    }

    fn progress(&self, msg: String) {
        tracing::info!("reload: {msg}");
        if let Some(Reload { reply: Some(r), .. }) = &self.reload {
            let _ = r.send(Line::progress(msg));
        }
    }

    /// Starts the next slot's replacement, or finishes.
    fn reload_next(&mut self) {
        loop {
            let Some(r) = self.reload.as_mut() else {
                return;
            };
            let Some(slot) = r.todo.pop_front() else {
                let r = self.reload.take();
                if let Some(r) = r {
                    let took = r.started.elapsed();
                    tracing::info!(
                        "reload done: {} replaced in {took:.1?}",
                        count(r.replaced, "worker")
                    );
                    if let Some(reply) = r.reply {
                        let _ = reply.send(
                            Done {
                                replaced: Some(r.replaced),
                                ..Done::ok()
                            }
                            .into(),
                        );
                    }
                }
                return;
            };
            if slot >= self.slots.len() {
                continue; // scaled down meanwhile
            }
            match self.start(slot) {
                Ok(w) => {
                    self.progress(format!("worker {slot}: new worker started (pid {})", w.pid));
                    self.slots[slot].next = Some(w);
                    if let Some(r) = self.reload.as_mut() {
                        r.wait = Wait::NewReady;
                    }
                    return;
                }
                Err(e) => {
                    self.reload_fail(&format!("worker {slot}: {e}"));
                    return;
                }
            }
        }
    }

    /// The new worker of `slot` is ready: it takes the slot's traffic and
    /// the old one retires.
    pub(super) fn reload_swap(&mut self, slot: usize) {
        let Some(mut new) = self.slots[slot].next.take() else {
            return;
        };
        new.ready = true;
        let new_pid = new.pid;
        let old = self.slots[slot].worker.replace(new);
        self.slots[slot].restarts += 1;
        self.publish();
        match old {
            Some(old) => {
                self.progress(format!(
                    "worker {slot}: pid {new_pid} ready and serving; pid {} draining",
                    old.pid
                ));
                let epoch = old.epoch;
                self.begin_retire(slot, old);
                if let Some(r) = self.reload.as_mut() {
                    r.wait = Wait::OldExit(epoch);
                }
            }
            None => {
                self.progress(format!("worker {slot}: pid {new_pid} ready and serving"));
                self.reload_done_with_slot();
            }
        }
    }

    /// A retired worker exited; if the reload waited on it, go on.
    pub(super) fn reload_old_gone(&mut self, epoch: u64) {
        if matches!(self.reload, Some(Reload { wait: Wait::OldExit(e), .. }) if e == epoch) {
            self.reload_done_with_slot();
        }
    }

    fn reload_done_with_slot(&mut self) {
        if let Some(r) = self.reload.as_mut() {
            r.replaced += 1;
        }
        self.reload_next();
    }

    /// The new worker of `slot` is still running but will not do: kill it
    /// (its exit is handled as a retiring worker's), keep the old ones.
    pub(super) fn reload_abort(&mut self, slot: usize, why: &str) {
        if let Some(w) = self.slots[slot].next.take() {
            kill_group(w.pid, Signal::SIGKILL);
            self.retiring.push((slot, w));
        }
        self.reload_fail(&format!("worker {slot}: {why}"));
    }

    pub(super) fn reload_fail(&mut self, why: &str) {
        let msg = format!("reload aborted: {why}; the old workers keep serving");
        tracing::error!("{msg}");
        if let Some(Reload { reply: Some(r), .. }) = self.reload.take() {
            let _ = r.send(Done::failed(msg).into());
        }
    }

    /// Takes `w` out of traffic and lets it finish: in proxy mode it gets
    /// SIGTERM once its in-flight requests are done (at most
    /// `--kill-timeout`); in fd modes at once, as the worker itself drains.
    pub(super) fn begin_retire(&mut self, slot: usize, w: Worker) {
        let epoch = w.epoch;
        let target = w.target.clone();
        let dispatch = w.dispatch.clone();
        self.retiring.push((slot, w));
        let tx = self.tx.clone();
        let limit = self.s.kill_timeout;
        tokio::spawn(async move {
            if let Some(d) = dispatch {
                // Out of the serving list already; wait for its answers to
                // what it was handed, so SIGTERM never races a hand-off.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let deadline = Instant::now() + limit;
                while d.outstanding.load(std::sync::atomic::Ordering::Relaxed) > 0
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if let Some(t) = target {
                t.backend.set_draining(true);
                // A request may have picked it just before it left the pool.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let deadline = Instant::now() + limit;
                while t.backend.in_flight() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let _ = tx.send(Event::Drained { epoch });
        });
    }

    /// Every worker stopped and started again at once (not zero-downtime).
    fn restart_all(&mut self) -> usize {
        let mut n = 0;
        for slot in 0..self.slots.len() {
            if let Some(old) = self.slots[slot].worker.take() {
                self.begin_retire(slot, old);
                n += 1;
            }
            self.slots[slot].restarts += 1;
            if let Err(e) = self.spawn(slot) {
                tracing::error!("worker {slot}: {e}");
                self.after(self.s.restart_delay, Event::Restart { slot });
            }
        }
        self.publish();
        tracing::info!("restarted {}", count(n, "worker"));
        n
    }

    pub(super) fn scale_signal(&mut self, delta: i64) {
        let n = format!("{delta:+}");
        match self.scale(&n) {
            Ok(to) => tracing::info!("scaled to {}", count(to, "worker")),
            Err(e) => tracing::warn!("cannot scale {n}: {e}"),
        }
    }

    /// `n` is a count or a change (`+2`, `-1`); returns the new count.
    fn scale(&mut self, n: &str) -> Result<usize, String> {
        if self.s.command.is_empty() {
            return Err("this cluster has no workers (upstreams only)".into());
        }
        if self.reload.is_some() {
            return Err("a reload is running; scale after it".into());
        }
        let now = self.slots.len() as i64;
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
        if to > 4096 {
            return Err(format!("cannot scale to {to}: at most 4096 workers"));
        }
        let to = to as usize;
        self.s.instances = to;
        while self.slots.len() < to {
            let slot = self.slots.len();
            if let Some(l) = &mut self.listeners {
                l.add_reuseport(self.s.listen).map_err(|e| e.to_string())?;
            }
            self.slots.push(Slot::default());
            if let Err(e) = self.spawn(slot) {
                self.slots.pop();
                return Err(e.to_string());
            }
        }
        while self.slots.len() > to {
            let slot = self.slots.len() - 1;
            if let Some(s) = self.slots.pop() {
                for w in s.worker.into_iter().chain(s.next) {
                    self.begin_retire(slot, w);
                }
            }
            if let Some(Listeners::ReusePort(socks)) = &mut self.listeners {
                socks.truncate(to);
            }
        }
        self.publish();
        Ok(to)
    }

    /// `herd status`: what the supervisor knows is gathered here; what
    /// `/proc` says (CPU, memory, connections: a read of every TCP socket
    /// in fd modes) is read on a blocking thread, which then answers.
    fn status(&self, reply: UnboundedSender<Line>) {
        let mut probes = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let mut add = |w: &Worker, state| {
                probes.push(Probe {
                    slot: i,
                    pid: w.pid,
                    state,
                    started: w.started,
                    target: w.target.clone(),
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                })
            };
            if let Some(w) = &s.worker {
                add(
                    w,
                    if w.ready {
                        WorkerState::Ready
                    } else {
                        WorkerState::Starting
                    },
                );
            }
            if let Some(w) = &s.next {
                add(w, WorkerState::Starting);
            }
        }
        for (i, w) in &self.retiring {
            let s = self.slots.get(*i);
            probes.push(Probe {
                slot: *i,
                pid: w.pid,
                state: WorkerState::Stopping,
                started: w.started,
                target: w.target.clone(),
                restarts: s.map_or(0, |s| s.restarts),
                last_exit: s.and_then(|s| s.last_exit.clone()),
            });
        }
        // By slot, so a scale-down's retiring workers sit with their slot.
        probes.sort_by_key(|p| p.slot);
        let mut status = Status {
            ok: true,
            name: self.s.name.clone(),
            pid: std::process::id(),
            mode: self.s.mode.as_str().to_string(),
            listen: self.s.listen.to_string(),
            uptime: self.started.elapsed().as_secs_f64(),
            reloading: self.reload.is_some(),
            log_file: self.s.log_file.as_ref().map(|p| p.display().to_string()),
            workers: Vec::new(),
        };
        let fd_mode = self.s.mode != Mode::Proxy;
        let samples = self.samples.clone();
        tokio::task::spawn_blocking(move || {
            status.workers = measure(probes, fd_mode, &samples);
            let _ = reply.send(Line::Status(Box::new(status)));
        });
    }
}

/// Inodes of every established TCP socket in this network namespace.
/// A worker as `status` reports it, gathered on the supervisor thread.
struct Probe {
    slot: usize,
    pid: u32,
    state: WorkerState,
    started: Instant,
    target: Option<std::sync::Arc<crate::upstream::Target>>,
    restarts: u64,
    last_exit: Option<String>,
}

/// Last CPU sample of each worker for `status`, by pid: (when, utime+stime
/// ticks, requests). Rates are over the time since the previous `status`.
pub(super) type Samples = std::sync::Arc<std::sync::Mutex<HashMap<u32, (Instant, u64, u64)>>>;

/// Reads `/proc` for each worker (blocking; off the supervisor thread).
fn measure(probes: Vec<Probe>, fd_mode: bool, samples: &Samples) -> Vec<WorkerRow> {
    // fd modes: the worker's established TCP connections, from /proc.
    let established = fd_mode.then(established_inodes);
    let ticks = procfs::ticks_per_second() as f64;
    let page = procfs::page_size();
    let Ok(mut samples) = samples.lock() else {
        return Vec::new();
    };
    samples.retain(|pid, _| probes.iter().any(|p| p.pid == *pid));
    probes
        .into_iter()
        .map(|w| {
            let stat = procfs::process::Process::new(w.pid as i32)
                .and_then(|p| p.stat())
                .ok();
            let cpu_ticks = stat.as_ref().map_or(0, |s| s.utime + s.stime);
            let rss = stat.as_ref().map_or(0, |s| s.rss * page);
            let requests = w.target.as_ref().map(|t| t.requests());
            let now = Instant::now();
            let (cpu, rps) = match samples.get(&w.pid) {
                Some(&(at, t0, r0)) => {
                    let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                    (
                        (cpu_ticks.saturating_sub(t0)) as f64 / ticks / secs * 100.0,
                        requests.map(|r| r.saturating_sub(r0) as f64 / secs),
                    )
                }
                None => {
                    let secs = w.started.elapsed().as_secs_f64().max(1e-3);
                    (
                        cpu_ticks as f64 / ticks / secs * 100.0,
                        requests.map(|r| r as f64 / secs),
                    )
                }
            };
            samples.insert(w.pid, (now, cpu_ticks, requests.unwrap_or(0)));
            WorkerRow {
                id: w.slot,
                pid: w.pid,
                state: w.state,
                uptime: w.started.elapsed().as_secs_f64(),
                restarts: w.restarts,
                cpu: (cpu * 10.0).round() / 10.0,
                memory: rss,
                connections: match (&w.target, &established) {
                    (Some(t), _) => Some(t.backend.in_flight() as usize),
                    (None, Some(est)) => Some(connections_of(w.pid, est)),
                    (None, None) => None,
                },
                requests,
                rps: rps.map(|r| (r * 10.0).round() / 10.0),
                last_exit: w.last_exit,
            }
        })
        .collect()
}

fn established_inodes() -> std::collections::HashSet<u64> {
    let v4 = procfs::net::tcp().unwrap_or_default();
    let v6 = procfs::net::tcp6().unwrap_or_default();
    v4.into_iter()
        .chain(v6)
        .filter(|e| e.state == procfs::net::TcpState::Established)
        .map(|e| e.inode)
        .collect()
}

/// How many established TCP connections process `pid` holds.
fn connections_of(pid: u32, established: &std::collections::HashSet<u64>) -> usize {
    let Ok(fds) = procfs::process::Process::new(pid as i32).and_then(|p| p.fd()) else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| matches!(fd.target, procfs::process::FDTarget::Socket(i) if established.contains(&i)))
        .count()
}
