//! The control socket's requests, worker messages and `herd status`: what
//! the machine decides goes to it; delivery and `/proc` reads are here.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::machine::{self, Input, State};
use super::{Event, Supervisor, stall};
use crate::config::Mode;
use crate::console::count;
use crate::control::{Call, Done, Line, Request, Status, WorkerRow, WorkerState};
use crate::hosts::Incoming;
use crate::hosts::wire::{self, Address};
use crate::os::listen::Listeners;

impl Supervisor {
    /// `herd reload --update-env` (or `restart`): the running version's next workers run
    /// what the master's own command line and config file say now, in
    /// `env` (the caller's environment). Other settings need a restart.
    fn update_release(
        &mut self,
        what: &str,
        env: std::collections::BTreeMap<String, String>,
    ) -> Result<(), String> {
        // A refused reload must not leave its release behind for the
        // replacements of the running one.
        if let Some(why) = self.m.busy(what) {
            return Err(why);
        }
        if self.m.deploying().is_some() {
            return Err("a deploy is in progress: promote or roll it back first".into());
        }
        // A promoted deploy's command, directory and `--env` stay.
        let mut flags = self.s.flags.clone();
        self.s.relaunch.over(&mut flags);
        let s = crate::config::Settings::resolve(flags, &self.s.source, self.s.no_node_shim)
            .map_err(|e| e.to_string())?;
        let version = self.m.stable_version();
        let release = crate::config::Release {
            command: s.command,
            program: s.program,
            cwd: s.cwd,
            env: s.env,
            base_env: Some(env.iter().map(|(k, v)| (k.into(), v.into())).collect()),
        };
        self.s.relaunch.base_env = Some(env);
        let reuse = match self.specs.get(&version) {
            Some(old) if old.release.command == release.command => old.reuse.clone(),
            _ => Default::default(),
        };
        let spec = super::process::Spec::new(
            release,
            self.preloads.as_ref(),
            s.node_shim,
            s.python_shim,
            s.python_stop,
            s.perl_stop,
            reuse,
        );
        self.specs.insert(version, std::sync::Arc::new(spec));
        Ok(())
    }

    /// What a master that takes this cluster over must know that the
    /// command line does not say (`herd stop`'s record, `herd save`).
    fn relaunch(&self) -> Done {
        Done {
            relaunch: Some(Box::new(self.s.relaunch.clone())),
            ..Done::ok()
        }
    }

    /// Handles a control request; true when the cluster must stop.
    pub(super) fn on_call(&mut self, call: Call) -> bool {
        let Call {
            req,
            reply,
            written,
        } = call;
        match req {
            Request::Status => self.status(reply),
            Request::Reload { update_env } => {
                let source = &self.s.source;
                let config = source
                    .config
                    .as_ref()
                    .map_or("no config file".to_string(), |c| {
                        format!("config {}", c.display())
                    });
                self.reload_tls();
                self.reload_upstream_crl();
                if let Some(m) = self.reload_upstreams() {
                    let _ = reply.send(Line::progress(m));
                }
                match update_env {
                    None => {
                        let _ = reply.send(Line::progress(format!("reloading ({config})")));
                    }
                    Some(env) => match self.update_release("reload", env) {
                        Ok(()) => {
                            let _ = reply.send(Line::progress(format!(
                                "reloading with {config} read again and the caller's environment"
                            )));
                        }
                        Err(e) => {
                            let _ = reply.send(Done::failed(e).into());
                            return false;
                        }
                    },
                }
                self.apply(Input::Reload { slots: None }, Some(reply))
            }
            Request::Restart { update_env } => {
                if let Some(env) = update_env
                    && let Err(e) = self.update_release("restart", env)
                {
                    let _ = reply.send(Done::failed(e).into());
                    return false;
                }
                self.apply(Input::Restart, Some(reply))
            }
            Request::Scale { n } => match self.scale_to(&n) {
                Ok(to) => self.scale(to, reply),
                Err(e) => {
                    let _ = reply.send(Done::failed(e).into());
                }
            },
            Request::Send { id, host, message } => self.send(id, host, message, reply),
            Request::Deploy(plan) => self.deploy(*plan, reply),
            // Answered as a reload: progress, then the workers replaced.
            Request::Promote => {
                if let Some(r) = &mut self.rollout {
                    r.promoting = true;
                }
                self.apply(Input::Promote, Some(reply));
            }
            Request::Rollback => self.apply(Input::Rollback, Some(reply)),
            Request::Relaunch => {
                let _ = reply.send(self.relaunch().into());
            }
            Request::Reset => {
                self.m.reset_restarts();
                tracing::info!("restart counts set to 0 (herd reset)");
                let _ = reply.send(Done::ok().into());
            }
            // Answered as a reload of that one slot.
            Request::Replace { id } => match self.m.current(id) {
                Some(w) if self.m.workers().filter(|o| o.slot == id).count() == 1 => {
                    let slot = w.slot;
                    self.apply(Input::ReplaceSlot { slot }, Some(reply));
                }
                Some(_) => {
                    let _ =
                        reply.send(Done::failed(format!("worker {id} is being replaced")).into());
                }
                None => {
                    let _ = reply.send(Done::failed(format!("there is no worker {id}")).into());
                }
            },
            Request::Signal { signal, id } => {
                let answer = match self.signal(&signal, id) {
                    Ok(n) => Done {
                        signalled: Some(n),
                        ..Done::ok()
                    },
                    Err(e) => Done::failed(e),
                };
                let _ = reply.send(answer.into());
            }
            Request::Broadcast { message } => self.cli_broadcast(message, reply),
            Request::Hosts => self.all_hosts(reply),
            Request::Upgrade => match self.upgrade_check() {
                Ok(exe) => {
                    tracing::info!("upgrade requested on the control socket");
                    self.upgrading = Some((exe, Some(reply)));
                    return true;
                }
                Err(e) => {
                    let _ = reply.send(Done::failed(e).into());
                }
            },
            Request::Stop => {
                self.accept_stop(reply, written);
                return true;
            }
        }
        false
    }

    /// Answers `herd stop`; the connection is kept so that the caller
    /// learns of the exit.
    fn accept_stop(
        &mut self,
        reply: UnboundedSender<Line>,
        written: tokio::sync::oneshot::Receiver<()>,
    ) {
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
    }

    /// A request that comes while the cluster stops, or while it drains
    /// and stops its workers for an upgrade: `status` is answered as ever
    /// (it says `stopping`), a `stop` as the first was (on an upgrade, it
    /// abandons the upgrade for a stop, as a stop signal does; true then),
    /// and anything else is refused, rather than left without an answer
    /// until the master exits or re-executes.
    pub(super) fn on_call_stopping(&mut self, call: Call) -> bool {
        let Call {
            req,
            reply,
            written,
        } = call;
        let answer = match req {
            Request::Status => {
                self.status(reply);
                return false;
            }
            Request::Relaunch => self.relaunch(),
            Request::Stop if self.stopping => Done {
                stopping: Some(true),
                pid: Some(std::process::id()),
                ..Done::ok()
            },
            Request::Stop => {
                self.accept_stop(reply, written);
                return true;
            }
            _ if self.stopping => Done::failed(format!("{} is stopping", self.s.name)),
            _ => Done::failed(format!(
                "{} is upgrading in place; try again once it is done",
                self.s.name
            )),
        };
        let _ = reply.send(answer.into());
        false
    }

    /// `herd signal`: to the main process of worker `id`, or of every
    /// current worker (not its group: a signal such as SIGUSR2 would kill
    /// the helpers of a wrapper that do not handle it).
    fn signal(&self, name: &str, id: Option<usize>) -> Result<usize, String> {
        let sig = crate::control::parse_signal(name)?;
        let ids: Vec<usize> = match id {
            Some(id) if id >= self.m.instances() => {
                return Err(format!(
                    "there is no worker {id} ({} running)",
                    count(self.m.instances(), "worker")
                ));
            }
            Some(id) => vec![id],
            None => (0..self.m.instances()).collect(),
        };
        let mut sent = 0;
        for id in ids {
            let Some(w) = self.m.current(id).filter(|w| w.pid > 0) else {
                continue;
            };
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.pid as i32), sig) {
                Ok(()) => sent += 1,
                Err(e) => tracing::warn!("worker {id} (pid {}): cannot send {sig}: {e}", w.pid),
            }
        }
        tracing::info!("{sig} sent to {}", count(sent, "worker"));
        if sent == 0 {
            return Err(format!("{sig} reached no worker"));
        }
        Ok(sent)
    }

    /// Delivers `data` to worker `id`'s channel.
    fn deliver(&self, id: usize, from: &Value, data: &Value) -> Result<(), String> {
        let w = self
            .m
            .current(id)
            .and_then(|w| self.procs.get(&w.epoch))
            .ok_or_else(|| format!("worker {id} is not running"))?;
        let ch = w
            .ipc
            .as_ref()
            .ok_or_else(|| format!("worker {id} has no message channel"))?;
        ch.send(&json!({"type": "message", "from": from, "data": data}))
            .map_err(|e| format!("worker {id} cannot receive: {e}"))
    }

    /// A Node app or Python program whose own `listen()` or `bind()` names
    /// a port other than its `PORT`, if it has one (a port written in its
    /// code, as apps run under PM2's cluster mode may have), is served on
    /// herd's port instead: the log says so once, with how to keep its port.
    fn port_hint(&mut self, epoch: u64, slot: usize, asked: u64) {
        // (The fd modes give no private port: the app's socket is herd's.
        // Fork mode serves no port: the app keeps the one it asks for.)
        let given = self.procs.get(&epoch).and_then(|p| p.port);
        let public = u64::from(self.s.listen.port());
        let fork = self.s.mode == crate::config::Mode::Fork;
        if fork || self.port_hinted || given.map(u64::from) == Some(asked) || asked == public {
            return;
        }
        self.port_hinted = true;
        tracing::warn!(
            "worker {slot}: the app asks for port {asked} in its code; herd serves it on {} (--listen), not on {asked}. To keep port {asked}, give --listen {asked} (in an ecosystem file, env.PORT: {asked})",
            self.s.listen
        );
    }

    /// Delivers to every worker but `except`; returns (delivered, failures).
    fn broadcast(&self, except: Option<usize>, from: &Value, data: &Value) -> (usize, Vec<String>) {
        let (mut n, mut failed) = (0, Vec::new());
        for id in (0..self.m.instances()).filter(|&i| Some(i) != except) {
            match self.deliver(id, from, data) {
                Ok(()) => n += 1,
                Err(e) => failed.push(e),
            }
        }
        (n, failed)
    }

    /// A message from a worker's channel.
    pub(super) fn on_message(&mut self, epoch: u64, msg: Result<Value, String>) {
        let Some(slot) = self.m.find(epoch).map(|w| w.slot) else {
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
        // `port` (herd's Python preload, at bind time): where the app asks to
        // be served, before it listens, maybe in a child process (uvicorn's
        // reloader binds, its server process listens); not readiness.
        if matches!(kind, Some("listening" | "port")) {
            let asked = msg.get("port").and_then(Value::as_u64);
            let host = msg.get("host").and_then(Value::as_str);
            self.on_port(Some(epoch), asked, host);
            if self.failed.is_some() {
                return;
            }
            // Still without a port (it could not be bound): nothing to hint.
            if let Some(asked) = asked.filter(|_| self.awaiting_port.is_none()) {
                self.port_hint(epoch, slot, asked);
            }
            if kind == Some("port") {
                return;
            }
        }
        if matches!(kind, Some("ready" | "listening")) {
            let weak = kind == Some("listening");
            if self.s.mode != Mode::Dispatch && !(weak && self.s.wait_ready) {
                self.apply(Input::Ready { epoch }, None);
            }
            return;
        }
        let from = json!(slot);
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        let failures: Vec<(Option<Value>, String)> = match msg.get("type").and_then(Value::as_str) {
            Some("replace") => {
                self.apply(Input::Replace { epoch }, None);
                Vec::new()
            }
            Some("master") => {
                tracing::info!("worker {slot} says: {data}");
                Vec::new()
            }
            Some("send") => match msg.get("to") {
                None => vec![(
                    None,
                    "\"send\" needs \"to\": a worker id or HOST/ID".to_string(),
                )],
                Some(to) => match wire::address(to, self.own_host()) {
                    Ok(Address::Local(id)) => self
                        .deliver(id, &from, &data)
                        .err()
                        .map(|e| (Some(to.clone()), e))
                        .into_iter()
                        .collect(),
                    Ok(Address::Remote { host, id }) => {
                        self.remote_send(epoch, to.clone(), host, id, from, data.clone());
                        Vec::new()
                    }
                    Err(e) => vec![(Some(to.clone()), e)],
                },
            },
            Some("broadcast") => {
                if let Some(hosts) = self.hosts.clone() {
                    let (tx, from, data) = (self.tx.clone(), from.clone(), data.clone());
                    tokio::spawn(async move {
                        if let Err(e) = hosts.broadcast(from, data.clone()).await {
                            let _ = tx.send(Event::Undeliverable {
                                epoch,
                                to: Value::Null,
                                data,
                                error: format!("other hosts not reached: {e}"),
                            });
                        }
                    });
                }
                self.broadcast(Some(slot), &from, &data)
                    .1
                    .into_iter()
                    .map(|e| (None, e))
                    .collect()
            }
            other => vec![(
                None,
                format!(
                    "unknown message type {other:?} (send, broadcast, master, replace, ready, listening)"
                ),
            )],
        };
        // Never lost silently: the sender hears of every failed delivery.
        for (to, error) in failures {
            self.undeliverable(epoch, &to.unwrap_or(Value::Null), &data, &error);
        }
    }

    /// Loads the certificates again; a bad new pair leaves the old ones
    /// serving, and says why.
    pub(super) fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        match tls.reload() {
            Ok(()) => tracing::info!("TLS certificates reloaded"),
            Err(e) => {
                tls.seen();
                tracing::error!("{e}; the certificates in use stay");
            }
        }
    }

    /// The `--upstream`s read again from the master's command line and
    /// config file on every reload, as nginx's reload reads its `upstream`
    /// blocks again (other settings need a restart). A file that no longer
    /// loads leaves them as they are. What to tell the caller, if anything.
    pub(super) fn reload_upstreams(&self) -> Option<String> {
        if self.s.mode != Mode::Proxy {
            return None;
        }
        let resolved = crate::config::Settings::resolve(
            self.s.flags.clone(),
            &self.s.source,
            self.s.no_node_shim,
        );
        let s = match resolved {
            Ok(s) => s,
            Err(e) => {
                let m = format!("upstreams not read again: {e}");
                tracing::error!("{m}");
                return Some(m);
            }
        };
        if let Some(h) = &self.http {
            if s.upstreams.iter().any(|u| u.tls)
                && let Err(e) = h.client_tls.trust_system_roots()
            {
                let m = format!("upstreams not read again: {e}");
                tracing::error!("{m}");
                return Some(m);
            }
            // Clients that connect from now on go through hyper, which
            // speaks HTTP/2 and TLS to backends.
            if s.upstreams.iter().any(|u| u.tls || u.h2) {
                h.h2_backends
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let (came, went) = self.up.set_fixed(&s.upstreams);
        if came + went == 0 {
            return None;
        }
        let m = format!("upstreams read again: {came} came, {went} went");
        tracing::info!("{m}");
        Some(m)
    }

    /// `--upstream-crl` read again (on a reload, and when its file changes).
    pub(super) fn reload_upstream_crl(&self) {
        let Some(t) = self
            .http
            .as_ref()
            .map(|h| &h.client_tls)
            .filter(|t| t.has_crl())
        else {
            return;
        };
        match t.reload() {
            Ok(()) => tracing::info!("upstream revocation lists reloaded"),
            Err(e) => tracing::error!("{e}; the lists in use stay"),
        }
    }

    /// Tells worker `epoch` that its message to `to` was not delivered.
    pub(super) fn undeliverable(&self, epoch: u64, to: &Value, data: &Value, error: &str) {
        tracing::debug!("worker epoch {epoch}: undeliverable: {error}");
        if let Some(ch) = self.procs.get(&epoch).and_then(|p| p.ipc.as_ref()) {
            let _ =
                ch.send(&json!({"type": "undeliverable", "to": to, "data": data, "error": error}));
        }
    }

    fn own_host(&self) -> Option<&str> {
        self.hosts.as_ref().map(|h| h.host.as_str())
    }

    /// A worker's send to `HOST/ID`: a failure comes back as undeliverable.
    fn remote_send(
        &self,
        epoch: u64,
        to: Value,
        host: String,
        id: usize,
        from: Value,
        data: Value,
    ) {
        let Some(hosts) = self.hosts.clone() else {
            self.undeliverable(
                epoch,
                &to,
                &data,
                &format!("{to} is on another host: start herd with --redis"),
            );
            return;
        };
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if let Err(error) = hosts.send(host, id, from, data.clone()).await {
                let _ = tx.send(Event::Undeliverable {
                    epoch,
                    to,
                    data,
                    error,
                });
            }
        });
    }

    /// `herd send [HOST/]ID`.
    fn send(&self, id: usize, host: Option<String>, message: Value, reply: UnboundedSender<Line>) {
        let from = json!("cli");
        let delivered = |r: Result<(), String>| -> Line {
            match r {
                Ok(()) => Done {
                    delivered: Some(1),
                    ..Done::ok()
                }
                .into(),
                Err(e) => Done::failed(e).into(),
            }
        };
        let host = host.filter(|h| Some(h.as_str()) != self.own_host());
        match (host, self.hosts.clone()) {
            (None, _) => {
                let _ = reply.send(delivered(self.deliver(id, &from, &message)));
            }
            (Some(h), None) => {
                let _ = reply.send(delivered(Err(format!(
                    "{h}/{id} is on another host: this cluster runs without --redis"
                ))));
            }
            (Some(h), Some(hosts)) => {
                tokio::spawn(async move {
                    let _ = reply.send(delivered(hosts.send(h, id, from, message).await));
                });
            }
        }
    }

    /// `herd broadcast`: this host's workers, then (`--redis`) the others'.
    fn cli_broadcast(&self, message: Value, reply: UnboundedSender<Line>) {
        let from = json!("cli");
        let (n, failed) = self.broadcast(None, &from, &message);
        let local = Done {
            delivered: Some(n),
            ..if failed.is_empty() {
                Done::ok()
            } else {
                Done::failed(failed.join("; "))
            }
        };
        let Some(hosts) = self.hosts.clone() else {
            let _ = reply.send(local.into());
            return;
        };
        tokio::spawn(async move {
            let answer = match hosts.broadcast(from, message).await {
                Ok(k) => Done {
                    hosts: Some(k),
                    ..local
                },
                Err(e) => Done {
                    ok: false,
                    error: Some(format!(
                        "delivered to {} here{}, but other hosts not reached: {e}",
                        count(n, "worker"),
                        local
                            .error
                            .as_deref()
                            .map(|l| format!(" ({l})"))
                            .unwrap_or_default()
                    )),
                    ..local
                },
            };
            let _ = reply.send(answer.into());
        });
    }

    /// `herd status --all-hosts`: this host's status, with every host's report.
    fn all_hosts(&self, reply: UnboundedSender<Line>) {
        let Some(hosts) = self.hosts.clone() else {
            let _ =
                reply.send(Done::failed("--all-hosts: this cluster runs without --redis").into());
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.status(tx);
        tokio::spawn(async move {
            let Some(Line::Status(mut st)) = rx.recv().await else {
                return;
            };
            match hosts.reports().await {
                Ok(r) => {
                    st.hosts = r;
                    let _ = reply.send(Line::Status(st));
                }
                Err(e) => {
                    let _ = reply.send(Done::failed(format!("--all-hosts: {e}")).into());
                }
            }
        });
    }

    /// A message from another host's master.
    pub(super) fn on_remote(&mut self, m: Incoming) {
        match m {
            Incoming::Broadcast { from, data } => {
                let (n, _) = self.broadcast(None, &from, &data);
                tracing::debug!("broadcast from {from} delivered to {n} workers");
            }
            Incoming::Send {
                host,
                token,
                to,
                from,
                data,
            } => {
                let error = self.deliver(to, &from, &data).err();
                if let Some(hosts) = &self.hosts {
                    hosts.ack(host, token, error);
                }
            }
        }
    }

    /// Every 2 s with `--redis`: this host's status, for the others.
    fn report(&self) {
        let Some(hosts) = self.hosts.clone() else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.status(tx);
        tokio::spawn(async move {
            if let Some(Line::Status(st)) = rx.recv().await {
                hosts.report(&st);
            }
        });
    }

    /// `--cron-restart`: a rolling reload when its time has come, unless
    /// one is running (then this time is skipped, as its workers are new).
    fn on_cron(&mut self) {
        let Some(cron) = self.cron.as_mut() else {
            return;
        };
        if !cron.due(&chrono::Local::now()) {
            return;
        }
        let next = cron.next_text();
        if self.m.reloading() {
            tracing::info!("cron-restart: a reload is running, so none now; next at {next}");
            return;
        }
        tracing::info!("cron-restart: rolling reload; next at {next}");
        self.apply(Input::Reload { slots: None }, None);
    }

    /// Once a second: `--cron-restart`, the deploy's analysis, a latency
    /// sample every 5 s (for `herd status`), and a memory sample of each
    /// serving worker for `--max-memory`.
    pub(super) fn on_tick(&mut self) {
        self.port_named_none();
        self.on_cron();
        self.analyse();
        self.revive_listeners();
        self.watch_accept_queues();
        self.close_left_sockets();
        self.ticks += 1;
        if self.ticks.is_multiple_of(2) {
            self.report();
            if self.tls.as_ref().is_some_and(|t| t.changed()) {
                tracing::info!("a certificate or key file changed");
                self.reload_tls();
            }
            if self.http.as_ref().is_some_and(|h| h.client_tls.changed()) {
                self.reload_upstream_crl();
            }
        }
        if self.s.mode == Mode::Proxy && self.ticks.is_multiple_of(5) {
            self.latency.sample(&self.up.current(), Instant::now());
        }
        if self.s.max_memory.is_none() {
            return;
        }
        // The whole group's: a wrapper's or a prefork master's own RSS
        // says nothing of the server behind it.
        let samples: Vec<_> = self
            .m
            .serving()
            .filter_map(|w| {
                let p = self.procs.get(&w.epoch)?;
                let u = crate::os::usage::usage(p.pid, None);
                Some((w.epoch, u.map_or(0, |u| u.rss)))
            })
            .collect();
        for (epoch, rss) in samples {
            self.apply(Input::Memory { epoch, rss }, None);
        }
    }

    /// Fd modes: a listening socket whose accept queue stalls (see
    /// [`super::stall`]) while a worker listens on a port of its own is
    /// logged: that worker serves there, not on fd 3, and clients of herd's
    /// port wait. (A stall alone may be a saturated server: not said.)
    fn watch_accept_queues(&mut self) {
        let socks: &[socket2::Socket] = match &self.listeners {
            Some(Listeners::Shared(s)) => std::slice::from_ref(s),
            Some(Listeners::ReusePort(v)) => v,
            _ => return,
        };
        self.stalls.resize_with(socks.len(), Default::default);
        let now = Instant::now();
        let mut stalled = Vec::new();
        for (i, (sock, stall)) in socks.iter().zip(&mut self.stalls).enumerate() {
            let queued = crate::os::sys::accept_queue(sock.as_fd()).unwrap_or(0);
            if let Some(n) = stall.observe(now, queued) {
                stalled.push((i, n));
            }
        }
        let reuseport = matches!(self.listeners, Some(Listeners::ReusePort(_)));
        let own = self.s.listen.port();
        for (i, n) in stalled {
            // Each worker on that socket (reuseport: the slot's), and what it
            // listens on besides herd's port.
            let elsewhere: Vec<(usize, Vec<std::net::SocketAddr>)> = self
                .m
                .serving()
                .filter(|w| !reuseport || w.slot == i)
                .map(|w| {
                    let pgid = i32::try_from(w.pid).unwrap_or(0);
                    let mut l = crate::os::sockets::listening(pgid);
                    l.retain(|a| a.port() != own);
                    (w.slot, l)
                })
                .filter(|(_, l)| !l.is_empty())
                .collect();
            if elsewhere.is_empty() {
                continue;
            }
            let whose = reuseport.then_some(i);
            tracing::warn!(
                "{}",
                stall::message(self.s.listen, whose, n, self.s.mode.as_str(), &elsewhere)
            );
        }
    }

    pub(super) fn scale_signal(&mut self, delta: i64) {
        let n = format!("{delta:+}");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        match self.scale_to(&n) {
            Ok(to) => self.scale(to, tx),
            Err(e) => {
                let _ = tx.send(Done::failed(e).into());
            }
        }
        match rx.try_recv() {
            Ok(Line::Done(d)) if d.ok => {
                tracing::info!("scaled to {}", count(d.workers.unwrap_or(0), "worker"))
            }
            Ok(Line::Done(d)) => {
                tracing::warn!("cannot scale {n}: {}", d.error.unwrap_or_default())
            }
            _ => {}
        }
    }

    /// `n` as `herd scale` gives it: the worker count it asks for.
    fn scale_to(&self, n: &str) -> Result<usize, String> {
        if self.s.command.is_empty() {
            return Err("this cluster has no workers (upstreams only)".into());
        }
        machine::scale_target(n, self.m.instances())
    }

    fn scale(&mut self, to: usize, reply: UnboundedSender<Line>) {
        let before = self.m.instances();
        self.apply(Input::Scale { to }, Some(reply));
        // The next master (upgrade, `herd start NAME`) starts this many.
        if self.m.instances() != before {
            self.s.relaunch.instances = Some(self.m.instances());
        }
        self.close_unused_sockets();
    }

    /// `herd status`: what the supervisor knows is gathered here; what
    /// `/proc` says (CPU, memory, connections: a read of every TCP socket
    /// in fd modes) is read on a blocking thread, which then answers.
    fn status(&self, reply: UnboundedSender<Line>) {
        let mut probes: Vec<Probe> = self
            .m
            .workers()
            .map(|w| {
                let (restarts, last_exit) = self.m.history(w.slot);
                Probe {
                    slot: w.slot,
                    version: w.version,
                    pid: w.pid,
                    state: match w.state {
                        State::Starting { .. } => WorkerState::Starting,
                        State::Serving => WorkerState::Ready,
                        State::Draining { .. } | State::Terminating { .. } => WorkerState::Stopping,
                    },
                    started: w.started,
                    target: self.procs.get(&w.epoch).and_then(|p| p.target.clone()),
                    recent: self
                        .procs
                        .get(&w.epoch)
                        .and_then(|p| p.target.as_ref())
                        .map(|t| self.latency.of(t)),
                    restarts,
                    last_exit: last_exit.map(str::to_string),
                }
            })
            .collect();
        // A slot without a process has its row too, as `pm2 ls` lists a
        // stopped app: waiting for its restart, or down for good.
        for (slot, version, due) in self.m.empty_slots() {
            let (restarts, last_exit) = self.m.history(slot);
            probes.push(Probe {
                slot,
                version,
                pid: 0,
                state: if due {
                    WorkerState::Waiting
                } else {
                    WorkerState::Stopped
                },
                started: Instant::now(),
                target: None,
                recent: None,
                restarts,
                last_exit: last_exit.map(str::to_string),
            });
        }
        // By slot, so a scale-down's retiring workers sit with their slot.
        probes.sort_by_key(|p| p.slot);
        // No command: a cluster of upstreams only.
        let running = self
            .specs
            .get(&self.m.stable_version())
            .filter(|s| !s.release.command.is_empty());
        let mut status = Status {
            ok: true,
            name: self.s.name.clone(),
            pid: std::process::id(),
            mode: self.s.mode.as_str().to_string(),
            listen: match self.s.mode {
                Mode::Fork => "-".into(),
                _ if self.awaiting_port.is_some() => crate::console::NO_PORT_YET.into(),
                _ => self.s.listen.to_string(),
            },
            uptime: self.started.elapsed().as_secs_f64(),
            reloading: self.m.reloading(),
            stopping: self.stopping,
            log_file: self.s.log_file.as_ref().map(|p| p.display().to_string()),
            out_file: self.s.out_file.as_ref().map(|p| p.display().to_string()),
            error_file: self.s.error_file.as_ref().map(|p| p.display().to_string()),
            user: self.s.run_as.as_ref().map(|r| r.name.clone()),
            command: running.map(|s| crate::console::command_line(&s.release.command)),
            cwd: running
                .and_then(|s| {
                    s.release
                        .cwd
                        .clone()
                        .or_else(|| std::env::current_dir().ok())
                })
                .map(|d| d.display().to_string()),
            workers: Vec::new(),
            upstreams: self.up.remote_rows(),
            worker_max_conns: self.s.worker_max_conns,
            deploy: self.deploy_status(),
            reloads: self.reloads,
            restarts: self
                .m
                .restarts_by_cause()
                .map(|(c, n)| (c.as_str().to_string(), n))
                .collect(),
            host: self.own_host().map(str::to_string),
            hosts: Vec::new(),
        };
        let fd_mode = self.s.mode != Mode::Proxy;
        let samples = self.samples.clone();
        tokio::task::spawn_blocking(move || {
            status.workers = measure(probes, fd_mode, &samples);
            let _ = reply.send(Line::Status(Box::new(status)));
        });
    }
}

/// A worker as `status` reports it, gathered on the supervisor thread.
struct Probe {
    slot: usize,
    version: u32,
    pid: u32,
    state: WorkerState,
    started: Instant,
    target: Option<std::sync::Arc<crate::upstream::Target>>,
    restarts: u64,
    last_exit: Option<String>,
    /// Proxy mode: its answers over the last minute.
    recent: Option<crate::upstream::Sample>,
}

/// Last sample of each worker for `status`, by pid. Rates are over the time
/// since the previous `status`.
pub(super) type Samples = std::sync::Arc<std::sync::Mutex<HashMap<u32, Sample>>>;

#[derive(Clone, Copy)]
pub(super) struct Sample {
    at: Instant,
    /// The group's CPU ticks as `/proc` last gave them.
    read: u64,
    /// Ticks the group's sum lost: a process of the group whose parent
    /// ends goes to herd (the subreaper), out of the walk from the main
    /// process, with the time it used (where one its parent reaps passes
    /// it on). Added back, so the counter never steps back (Prometheus
    /// would take that for a restart).
    lost: u64,
    requests: u64,
}

impl Sample {
    /// The sample after reading `read` ticks (`None`: nothing could be
    /// read, which loses nothing).
    fn next(prev: Option<&Sample>, at: Instant, read: Option<u64>, requests: u64) -> Sample {
        let read = read.or(prev.map(|p| p.read)).unwrap_or(0);
        let lost = prev.map_or(0, |p| p.lost + p.read.saturating_sub(read));
        Sample {
            at,
            read,
            lost,
            requests,
        }
    }

    fn ticks(&self) -> u64 {
        self.read + self.lost
    }
}

/// Reads `/proc` for each worker (blocking; off the supervisor thread).
fn measure(probes: Vec<Probe>, fd_mode: bool, samples: &Samples) -> Vec<WorkerRow> {
    // fd and fork modes: the worker's client connections, from /proc.
    let established = fd_mode.then(established_inodes);
    let ticks = procfs::ticks_per_second() as f64;
    let Ok(mut samples) = samples.lock() else {
        return Vec::new();
    };
    samples.retain(|pid, _| probes.iter().any(|p| p.pid == *pid));
    probes
        .into_iter()
        .map(|w| {
            // Its whole group (see `os::usage`); connections only in the
            // fd modes, where herd's proxy does not count them.
            let est = if w.target.is_none() {
                established.as_ref()
            } else {
                None
            };
            let used = crate::os::usage::usage(w.pid, est);
            let requests = w.target.as_ref().map(|t| t.requests());
            let now = Instant::now();
            let prev = samples.get(&w.pid).copied();
            let read = used.as_ref().map(|u| u.cpu_ticks);
            let sample = Sample::next(prev.as_ref(), now, read, requests.unwrap_or(0));
            let used = used.unwrap_or_default();
            let (cpu_ticks, rss) = (sample.ticks(), used.rss);
            let (cpu, rps) = match prev {
                Some(p) => {
                    let secs = now.duration_since(p.at).as_secs_f64().max(1e-3);
                    (
                        (cpu_ticks.saturating_sub(p.ticks())) as f64 / ticks / secs * 100.0,
                        requests.map(|r| r.saturating_sub(p.requests) as f64 / secs),
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
            samples.insert(w.pid, sample);
            WorkerRow {
                id: w.slot,
                version: w.version,
                pid: w.pid,
                state: w.state,
                uptime: w.started.elapsed().as_secs_f64(),
                restarts: w.restarts,
                cpu: (cpu * 10.0).round() / 10.0,
                cpu_seconds: cpu_ticks as f64 / ticks,
                memory: rss,
                connections: match (&w.target, &established) {
                    (Some(t), _) => Some(t.backend.in_flight() as usize),
                    (None, Some(_)) => Some(used.connections),
                    (None, None) => None,
                },
                requests,
                rps: rps.map(|r| (r * 10.0).round() / 10.0),
                p50_ms: w.recent.as_ref().and_then(|r| ms(r.quantile(50))),
                p99_ms: w.recent.as_ref().and_then(|r| ms(r.quantile(99))),
                last_exit: w.last_exit,
                down: w.target.as_ref().is_some_and(|t| !t.backend.is_healthy()),
                taken_out: w.target.as_ref().is_some_and(|t| t.backend.is_failed()),
            }
        })
        .collect()
}

/// Inodes of the established TCP connections that clients opened: those
/// whose local port is one something listens on. A worker's own outgoing
/// connections (a database, a queue, an API) have an ephemeral local port,
/// and are not what `conns` means.
fn established_inodes() -> std::collections::HashSet<u64> {
    use procfs::net::TcpState;
    let v4 = procfs::net::tcp().unwrap_or_default();
    let v6 = procfs::net::tcp6().unwrap_or_default();
    let all: Vec<_> = v4.into_iter().chain(v6).collect();
    let listening: std::collections::HashSet<u16> = all
        .iter()
        .filter(|e| e.state == TcpState::Listen)
        .map(|e| e.local_address.port())
        .collect();
    all.into_iter()
        .filter(|e| e.state == TcpState::Established && listening.contains(&e.local_address.port()))
        .map(|e| e.inode)
        .collect()
}

/// A latency in ms with 0.1 precision.
fn ms(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::Sample;
    use std::time::Instant;

    #[test]
    fn a_workers_cpu_ticks_never_step_back() {
        let at = Instant::now();
        let mut s = Sample::next(None, at, Some(100), 0);
        assert_eq!(s.ticks(), 100);
        // A process of the group went with its 60 ticks.
        s = Sample::next(Some(&s), at, Some(40), 0);
        assert_eq!(s.ticks(), 100);
        s = Sample::next(Some(&s), at, Some(45), 0);
        assert_eq!(s.ticks(), 105);
        // Nothing could be read: the same figure, not a drop.
        s = Sample::next(Some(&s), at, None, 0);
        assert_eq!(s.ticks(), 105);
        s = Sample::next(Some(&s), at, Some(50), 0);
        assert_eq!(s.ticks(), 110);
    }
}
