//! `--redis`: the master's link to the masters of the same cluster name on
//! other hosts. Broadcasts go to a Redis stream trimmed to the last
//! 10,000, which every master reads from where it left off, so a master
//! cut off for a while catches up when it is back; sends go to a host's
//! inbox channel (pub/sub) and are answered by an ack; each master keeps
//! its status under an expiring key for `herd status --all-hosts`.
//!
//! A send to a host whose master is not subscribed fails at once (PUBLISH
//! counts no receiver), and one that is not acknowledged within 2 s fails
//! then, so its sender learns of every send that may not have reached a
//! worker. One task owns the link and reconnects with back-off; while
//! Redis is down every cross-host request fails at once with the reason.
//! The supervisor never awaits it and the proxy never touches it.

pub mod wire;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use crate::config::RedisConfig;
use crate::control::{HostReport, Status};
use wire::{Keys, Wire};

/// How long a host has to acknowledge a send, and Redis to answer a command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// A status key outlives this many report intervals.
const REPORT_EVERY: Duration = Duration::from_secs(2);
const STATUS_TTL_SECS: u64 = 10;
/// Hosts silent this long leave the list of hosts.
const FORGET_SECS: f64 = 3600.0;
/// Broadcasts kept for masters that were away (trimmed approximately).
const BACKLOG: u64 = 10_000;
/// How long one read of the broadcast stream waits for an entry.
const READ_BLOCK_MS: u64 = 1000;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A request from another host, for the supervisor to deliver.
#[derive(Debug)]
pub enum Incoming {
    Broadcast {
        from: Value,
        data: Value,
    },
    /// Deliver, then `Hosts::ack(host, token, result)`.
    Send {
        host: String,
        token: u64,
        to: usize,
        from: Value,
        data: Value,
    },
}

enum Cmd {
    Broadcast {
        from: Value,
        data: Value,
        done: oneshot::Sender<Result<usize, String>>,
    },
    Send {
        host: String,
        to: usize,
        from: Value,
        data: Value,
        done: oneshot::Sender<Result<(), String>>,
    },
    Ack {
        host: String,
        token: u64,
        error: Option<String>,
    },
    Report(String),
    Reports {
        done: oneshot::Sender<Result<Vec<HostReport>, String>>,
    },
}

impl Cmd {
    /// Answers the request with `error` (Redis is down).
    fn fail(self, error: &str) {
        match self {
            Cmd::Broadcast { done, .. } => drop(done.send(Err(error.to_string()))),
            Cmd::Send { done, .. } => drop(done.send(Err(error.to_string()))),
            Cmd::Reports { done } => drop(done.send(Err(error.to_string()))),
            Cmd::Ack { .. } | Cmd::Report(_) => {}
        }
    }
}

/// The supervisor's handle on the link; cheap to clone.
#[derive(Clone)]
pub struct Hosts {
    tx: mpsc::UnboundedSender<Cmd>,
    /// This host's name.
    pub host: String,
}

/// Awaits a request's answer; a closed link counts as Redis being down.
async fn answer<T>(rx: oneshot::Receiver<Result<T, String>>) -> Result<T, String> {
    rx.await
        .unwrap_or_else(|_| Err("the link to redis has ended".into()))
}

impl Hosts {
    /// Starts the link's task; `deliver` hands requests from other hosts to
    /// the supervisor.
    pub fn start(
        cfg: &RedisConfig,
        cluster: &str,
        deliver: impl Fn(Incoming) + Send + Sync + 'static,
    ) -> Hosts {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(cfg.clone(), Keys::new(cluster), rx, Box::new(deliver)));
        Hosts {
            tx,
            host: cfg.host.clone(),
        }
    }

    /// To every worker of every other host: how many hosts heard it.
    pub async fn broadcast(&self, from: Value, data: Value) -> Result<usize, String> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Broadcast { from, data, done });
        answer(rx).await
    }

    /// To worker `to` of `host`, acknowledged.
    pub async fn send(
        &self,
        host: String,
        to: usize,
        from: Value,
        data: Value,
    ) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Send {
            host,
            to,
            from,
            data,
            done,
        });
        answer(rx).await
    }

    /// The answer to another host's `Incoming::Send`.
    pub fn ack(&self, host: String, token: u64, error: Option<String>) {
        let _ = self.tx.send(Cmd::Ack { host, token, error });
    }

    /// This host's status for the others' `herd status --all-hosts`.
    pub fn report(&self, status: &Status) {
        if let Ok(json) = serde_json::to_string(status) {
            let _ = self.tx.send(Cmd::Report(json));
        }
    }

    /// Every host's last report (this one's included).
    pub async fn reports(&self) -> Result<Vec<HostReport>, String> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Reports { done });
        answer(rx).await
    }
}

type Deliver = Box<dyn Fn(Incoming) + Send + Sync>;
/// Sends awaiting their ack, by token: deadline, host, the sender's answer.
type Pending = HashMap<u64, (Instant, String, oneshot::Sender<Result<(), String>>)>;

/// Connects, serves until the link fails, waits out the back-off
/// (failing requests meanwhile), again; ends when the supervisor does.
async fn run(
    cfg: RedisConfig,
    keys: Keys,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    deliver: Deliver,
) {
    let client = match redis::Client::open(cfg.url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("--redis {}: {e}", cfg.url);
            while let Some(c) = cmds.recv().await {
                c.fail(&format!("--redis {}: {e}", cfg.url));
            }
            return;
        }
    };
    let mut delay = BACKOFF_MIN;
    let mut last_error = String::new();
    // The last broadcast read: kept across reconnections, so what was
    // broadcast meanwhile is read then. Empty until the first connection,
    // which starts at the stream's end.
    let mut last_read = String::new();
    loop {
        let error = match Link::connect(&client, &keys, &cfg.host, &mut last_read).await {
            Ok(link) => {
                tracing::info!("redis {}: connected as host {}", cfg.url, cfg.host);
                delay = BACKOFF_MIN;
                last_error.clear();
                match link
                    .serve(&cfg.host, &mut cmds, &deliver, &mut last_read)
                    .await
                {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        // Said once per outage, not once per attempt.
        if error != last_error {
            tracing::warn!(
                "redis {}: {error}; other hosts are out of reach, trying again with back-off",
                cfg.url
            );
            last_error = error.clone();
        }
        let reason = format!("redis at {} is unreachable ({error})", cfg.url);
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(c) => c.fail(&reason),
                    None => return,
                },
                _ = sleep_until(until) => break,
            }
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// A connected link: commands on a multiplexed connection, the blocking
/// reads of the broadcast stream on a second, subscriptions on a third.
struct Link {
    conn: MultiplexedConnection,
    reader: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
    keys: Keys,
}

/// One blocking read of the broadcast stream after `last`.
async fn read_after(
    mut reader: MultiplexedConnection,
    key: String,
    last: String,
) -> redis::RedisResult<Option<redis::streams::StreamReadReply>> {
    redis::cmd("XREAD")
        .arg("COUNT")
        .arg(100)
        .arg("BLOCK")
        .arg(READ_BLOCK_MS)
        .arg("STREAMS")
        .arg(key)
        .arg(last)
        .query_async(&mut reader)
        .await
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Link {
    async fn connect(
        client: &redis::Client,
        keys: &Keys,
        host: &str,
        last_read: &mut String,
    ) -> Result<Link, String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(ANSWER_TIMEOUT))
            .set_response_timeout(Some(ANSWER_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(err)?;
        let reader =
            client
                .get_multiplexed_async_connection_with_config(&config.set_response_timeout(Some(
                    ANSWER_TIMEOUT + Duration::from_millis(READ_BLOCK_MS),
                )))
                .await
                .map_err(err)?;
        if last_read.is_empty() {
            // A new master reads only what is broadcast from now on.
            let newest: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(keys.broadcasts())
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            *last_read = newest
                .ids
                .first()
                .map_or_else(|| "0-0".to_string(), |e| e.id.clone());
        }
        let pubsub = timeout(ANSWER_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| "no answer within 2 s".to_string())?
            .map_err(err)?;
        let (mut sink, stream) = pubsub.split();
        timeout(ANSWER_TIMEOUT, sink.subscribe(keys.inbox(host)))
            .await
            .map_err(|_| "no answer to SUBSCRIBE within 2 s".to_string())?
            .map_err(err)?;
        Ok(Link {
            conn,
            reader,
            sink,
            stream,
            keys: keys.clone(),
        })
    }

    async fn publish(&mut self, channel: String, w: &Wire) -> Result<usize, String> {
        let payload = serde_json::to_string(w).map_err(err)?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.conn)
            .await
            .map_err(err)
    }

    /// Until the supervisor ends (`Ok`) or the link fails (`Err`).
    async fn serve(
        mut self,
        host: &str,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        deliver: &Deliver,
        last_read: &mut String,
    ) -> Result<(), String> {
        let mut pending = Pending::new();
        let mut token = 0u64;
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let (reader, stream_key) = (self.reader.clone(), self.keys.broadcasts());
        let reading = |last: &str| {
            Box::pin(read_after(
                reader.clone(),
                stream_key.clone(),
                last.to_string(),
            ))
        };
        let mut read = reading(last_read);
        let result = loop {
            tokio::select! {
                r = &mut read => {
                    match r {
                        Ok(reply) => {
                            for e in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                                let Some(redis::Value::BulkString(m)) = e.map.get("m") else { continue };
                                match serde_json::from_slice::<Wire>(m) {
                                    Ok(Wire::Broadcast { host: from_host, from, data }) if from_host != host => {
                                        deliver(Incoming::Broadcast { from: wire::remote_sender(&from_host, &from), data })
                                    }
                                    Ok(_) => {}
                                    Err(e) => tracing::debug!("redis: ignored a broadcast: {e}"),
                                }
                                *last_read = e.id;
                            }
                        }
                        Err(e) => break Err(err(e)),
                    }
                    read = reading(last_read);
                }
                c = cmds.recv() => {
                    let Some(c) = c else { break Ok(()) };
                    if let Err(e) = self.on_cmd(host, c, &mut pending, &mut token).await {
                        break Err(e);
                    }
                }
                m = self.stream.next() => {
                    let Some(m) = m else { break Err("the subscription connection closed".into()) };
                    match serde_json::from_slice::<Wire>(m.get_payload_bytes()) {
                        Ok(w) if w.host() == host => {}
                        // Broadcasts come by the stream.
                        Ok(Wire::Broadcast { .. }) => {}
                        Ok(Wire::Send { host: from_host, token, to, from, data }) => deliver(Incoming::Send {
                            from: wire::remote_sender(&from_host, &from),
                            host: from_host,
                            token,
                            to,
                            data,
                        }),
                        Ok(Wire::Ack { token, error, host: from_host }) => {
                            if let Some((_, _, done)) = pending.remove(&token) {
                                let _ = done.send(error.map_or(Ok(()), |e| Err(format!("on host {from_host}: {e}"))));
                            }
                        }
                        Err(e) => tracing::debug!("redis: ignored a message on {}: {e}", m.get_channel_name()),
                    }
                }
                _ = tick.tick() => {
                    // A cut link shows no error by itself: a ping must come back.
                    match timeout(ANSWER_TIMEOUT, self.sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => break Err(err(e)),
                        Err(_) => break Err("no answer to PING within 2 s".into()),
                    }
                    let now = Instant::now();
                    let late: Vec<u64> = pending.iter().filter(|(_, p)| p.0 <= now).map(|(t, _)| *t).collect();
                    for t in late {
                        if let Some((_, to, done)) = pending.remove(&t) {
                            let _ = done.send(Err(format!("host {to} did not acknowledge within 2 s")));
                        }
                    }
                }
            }
        };
        let reason = match &result {
            Ok(()) => "herd is stopping".to_string(),
            Err(e) => format!("the link to redis failed ({e})"),
        };
        for (_, (_, to, done)) in pending {
            let _ = done.send(Err(format!("no acknowledgement from host {to}: {reason}")));
        }
        result
    }

    /// One request; `Err` when Redis did not answer (the link is redone).
    async fn on_cmd(
        &mut self,
        host: &str,
        c: Cmd,
        pending: &mut Pending,
        token: &mut u64,
    ) -> Result<(), String> {
        match c {
            Cmd::Broadcast { from, data, done } => {
                let w = Wire::Broadcast {
                    host: host.to_string(),
                    from,
                    data,
                };
                match self.broadcast(host, &w).await {
                    Ok(n) => drop(done.send(Ok(n))),
                    Err(e) => {
                        let _ = done.send(Err(format!("redis: {e}")));
                        return Err(e);
                    }
                }
            }
            Cmd::Send {
                host: to_host,
                to,
                from,
                data,
                done,
            } => {
                *token += 1;
                let w = Wire::Send {
                    host: host.to_string(),
                    token: *token,
                    to,
                    from,
                    data,
                };
                match self.publish(self.keys.inbox(&to_host), &w).await {
                    Ok(0) => drop(done.send(Err(format!(
                        "host {to_host} is not connected to redis (no master of this cluster there)"
                    )))),
                    Ok(_) => {
                        pending.insert(*token, (Instant::now() + ANSWER_TIMEOUT, to_host, done));
                    }
                    Err(e) => {
                        let _ = done.send(Err(format!("redis: {e}")));
                        return Err(e);
                    }
                }
            }
            Cmd::Ack {
                host: to_host,
                token,
                error,
            } => {
                let w = Wire::Ack {
                    host: host.to_string(),
                    token,
                    error,
                };
                self.publish(self.keys.inbox(&to_host), &w).await?;
            }
            Cmd::Report(json) => {
                let now = unix_now();
                redis::pipe()
                    .cmd("SET")
                    .arg(self.keys.status(host))
                    .arg(json)
                    .arg("EX")
                    .arg(STATUS_TTL_SECS)
                    .ignore()
                    .cmd("ZADD")
                    .arg(self.keys.hosts())
                    .arg(now)
                    .arg(host)
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(self.keys.hosts())
                    .arg("-inf")
                    .arg(now - FORGET_SECS)
                    .ignore()
                    .query_async::<()>(&mut self.conn)
                    .await
                    .map_err(err)?;
            }
            Cmd::Reports { done } => match self.reports().await {
                Ok(r) => drop(done.send(Ok(r))),
                Err(e) => {
                    let _ = done.send(Err(format!("redis: {e}")));
                    return Err(e);
                }
            },
        }
        Ok(())
    }

    /// Appends a broadcast to the stream; the other hosts that reported
    /// lately (those expected to read it).
    async fn broadcast(&mut self, host: &str, w: &Wire) -> Result<usize, String> {
        let payload = serde_json::to_string(w).map_err(err)?;
        let (alive,): (Vec<String>,) = redis::pipe()
            .cmd("XADD")
            .arg(self.keys.broadcasts())
            .arg("MAXLEN")
            .arg("~")
            .arg(BACKLOG)
            .arg("*")
            .arg("m")
            .arg(payload)
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(self.keys.hosts())
            .arg(unix_now() - STATUS_TTL_SECS as f64)
            .arg("+inf")
            .query_async(&mut self.conn)
            .await
            .map_err(err)?;
        Ok(alive.iter().filter(|h| *h != host).count())
    }

    async fn reports(&mut self) -> Result<Vec<HostReport>, String> {
        let hosts: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.hosts())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut self.conn)
            .await
            .map_err(err)?;
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = hosts.iter().map(|(h, _)| self.keys.status(h)).collect();
        let statuses: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn)
            .await
            .map_err(err)?;
        let now = unix_now();
        Ok(hosts
            .into_iter()
            .zip(statuses)
            .map(|((host, seen), status)| HostReport {
                host,
                age: (now - seen).max(0.0),
                status: status
                    .and_then(|s| serde_json::from_str::<Status>(&s).ok())
                    .map(Box::new),
            })
            .collect())
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
