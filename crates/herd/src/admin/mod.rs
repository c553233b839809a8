//! The admin listener (`--admin`): `/metrics` in Prometheus' text format
//! (built with `prometheus-client`) and `/status` (the JSON of `herd status
//! --json`). It asks the supervisor as the control socket does, so a scrape
//! costs the supervisor one status answer, and it reads the proxy's
//! per-backend counts.
//!
//! Auth: with a token, every request needs `Authorization: Bearer TOKEN`
//! (but `/metrics` with `--admin-public-metrics`); without one the listener
//! must be on loopback (the configuration refuses otherwise).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::AdminConfig;
use crate::control::{Call, Line, Request as Ask, Status};
use crate::upstream::{Target, Upstreams, octave_buckets};

/// Serves the admin listener until the master ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: AdminConfig,
    calls: UnboundedSender<Call>,
    up: Arc<Upstreams>,
) {
    let cfg = Arc::new(cfg);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (cfg, calls, up) = (cfg.clone(), calls.clone(), up.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (cfg, calls, up) = (cfg.clone(), calls.clone(), up.clone());
                async move { Ok::<_, Infallible>(answer(req, &cfg, &calls, &up).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    cfg: &AdminConfig,
    calls: &UnboundedSender<Call>,
    up: &Upstreams,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let open = path == "/metrics" && cfg.public_metrics;
    if let Some(token) = &cfg.token
        && !open
        && !bearer_is(&req, token)
    {
        let mut res = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "a bearer token is required\n",
        );
        res.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return res;
    }
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let (route, want) = match path {
        "/metrics" => (path, true),
        "/status" => (path, false),
        _ => return reply(StatusCode::NOT_FOUND, "text/plain", "/metrics or /status\n"),
    };
    let Some(status) = status(calls).await else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the master is stopping\n",
        );
    };
    if !want {
        let json = serde_json::to_string(&status).unwrap_or_default();
        return reply(StatusCode::OK, "application/json", json);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        targets: up.current().all_targets().cloned().collect(),
        retries: up.retries.load(std::sync::atomic::Ordering::Relaxed),
        status,
    }));
    let mut text = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            text,
        ),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{route}: cannot encode\n"),
        ),
    }
}

/// The supervisor's `herd status` answer.
async fn status(calls: &UnboundedSender<Call>) -> Option<Status> {
    let (reply, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (_written, written) = tokio::sync::oneshot::channel();
    calls
        .send(Call {
            req: Ask::Status,
            reply,
            written,
        })
        .ok()?;
    match rx.recv().await? {
        Line::Status(s) => Some(*s),
        _ => None,
    }
}

/// Compares the bearer token in constant time.
fn bearer_is(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        res.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    res
}

/// One scrape's figures, written out by `prometheus-client`.
#[derive(Debug)]
struct Scrape {
    status: Status,
    targets: Vec<Arc<Target>>,
    retries: u64,
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: `name` with a value per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut e = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        metric.encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.status;
        let worker = |id: usize| vec![("worker", id.to_string())];
        family(
            &mut enc,
            "herd_info",
            "The cluster: its name, mode and address (always 1).",
            MetricType::Gauge,
            [(
                vec![
                    ("name", s.name.clone()),
                    ("mode", s.mode.clone()),
                    ("listen", s.listen.clone()),
                ],
                ConstGauge::new(1i64),
            )],
        )?;
        let states = ["starting", "ready", "stopping"];
        family(
            &mut enc,
            "herd_workers",
            "Worker processes by state.",
            MetricType::Gauge,
            states.map(|st| {
                let n = s
                    .workers
                    .iter()
                    .filter(|w| {
                        serde_json::to_value(w.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .as_deref()
                            == Some(st)
                    })
                    .count();
                (vec![("state", st.to_string())], ConstGauge::new(n as i64))
            }),
        )?;
        let current = || {
            s.workers
                .iter()
                .filter(|w| w.state != crate::control::WorkerState::Stopping)
        };
        family(
            &mut enc,
            "herd_worker_restarts",
            "Restarts of the worker's slot (crashes, reloads, replacements).",
            MetricType::Counter,
            current().map(|w| (worker(w.id), ConstCounter::new(w.restarts))),
        )?;
        family(
            &mut enc,
            "herd_worker_resident_memory_bytes",
            "The worker process's RSS.",
            MetricType::Gauge,
            current().map(|w| (worker(w.id), ConstGauge::new(w.memory as i64))),
        )?;
        family(
            &mut enc,
            "herd_worker_cpu_seconds",
            "CPU time the worker process used (user and system).",
            MetricType::Counter,
            current().map(|w| (worker(w.id), ConstCounter::new(w.cpu_seconds))),
        )?;
        family(
            &mut enc,
            "herd_worker_uptime_seconds",
            "Time since the worker process started.",
            MetricType::Gauge,
            current().map(|w| (worker(w.id), ConstGauge::new(w.uptime))),
        )?;
        family(
            &mut enc,
            "herd_worker_connections",
            "Requests in flight (proxy mode) or established TCP connections (fd modes).",
            MetricType::Gauge,
            current().filter_map(|w| Some((worker(w.id), ConstGauge::new(w.connections? as i64)))),
        )?;
        family(
            &mut enc,
            "herd_restarts",
            "New workers since the start, by why: exit, not_ready, spawn_failed, watchdog, reload, memory, replace, restart, deploy.",
            MetricType::Counter,
            s.restarts
                .iter()
                .map(|(cause, n)| (vec![("cause", cause.clone())], ConstCounter::new(*n))),
        )?;
        family(
            &mut enc,
            "herd_reloads",
            "Rolling reloads by outcome.",
            MetricType::Counter,
            [
                (
                    vec![("outcome", "done".to_string())],
                    ConstCounter::new(s.reloads.done),
                ),
                (
                    vec![("outcome", "aborted".to_string())],
                    ConstCounter::new(s.reloads.aborted),
                ),
            ],
        )?;
        if s.mode != "proxy" {
            return Ok(());
        }
        family(
            &mut enc,
            "herd_access_log_dropped",
            "Access log lines dropped because the writer fell behind.",
            MetricType::Counter,
            [(
                Vec::new(),
                ConstCounter::new(
                    crate::proxy::access::DROPPED.load(std::sync::atomic::Ordering::Relaxed),
                ),
            )],
        )?;
        family(
            &mut enc,
            "herd_proxy_retries",
            "Requests sent again, to another backend or on a fresh connection.",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(self.retries))],
        )?;
        let backend = |t: &Target| vec![("backend", t.backend.name().to_string())];
        family(
            &mut enc,
            "herd_backend_requests",
            "Answers relayed from each backend (workers and upstreams), by status class; 502/504 when none came.",
            MetricType::Counter,
            self.targets.iter().flat_map(|t| {
                (0..5).map(move |c| {
                    let mut l = backend(t);
                    l.push(("code", format!("{}xx", c + 1)));
                    let n = t.answers.classes[c].load(std::sync::atomic::Ordering::Relaxed);
                    (l, ConstCounter::new(n))
                })
            }),
        )?;
        family(
            &mut enc,
            "herd_backend_in_flight",
            "Requests in flight to each backend.",
            MetricType::Gauge,
            self.targets.iter().map(|t| {
                (
                    backend(t),
                    ConstGauge::new(i64::from(t.backend.in_flight())),
                )
            }),
        )?;
        family(
            &mut enc,
            "herd_backend_healthy",
            "1 if the backend takes requests (health checks), else 0.",
            MetricType::Gauge,
            self.targets.iter().map(|t| {
                (
                    backend(t),
                    ConstGauge::new(i64::from(t.backend.is_healthy())),
                )
            }),
        )?;
        let mut e = enc.encode_descriptor(
            "herd_backend_request_duration_seconds",
            "Time from sending a request to its answer's head, per backend.",
            None,
            MetricType::Histogram,
        )?;
        for t in &self.targets {
            let snap = t.answers.snapshot();
            let buckets = octave_buckets(&snap.latency);
            let count: u64 = snap.latency.iter().sum();
            // The sum is estimated from bucket midpoints (the buckets are
            // what the proxy keeps).
            let sum = buckets
                .iter()
                .scan((0.0, 0u64), |(lo, below), &(le, n)| {
                    let here = n - *below;
                    let mid = (*lo + le) / 2.0;
                    *lo = le;
                    *below = n;
                    Some(mid * here as f64)
                })
                .sum::<f64>();
            let labels = backend(t);
            e.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}
