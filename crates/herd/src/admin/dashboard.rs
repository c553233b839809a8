//! The web dashboard: one page embedded in the binary, fed once a second
//! over Server-Sent Events, and the actions its buttons post.
//!
//! Each open page costs the supervisor one status answer a second and the
//! admin task a walk over the backends; nothing on the request path.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode, header};
use serde::Serialize;
use tokio::sync::mpsc;

use super::{Body, call, reply, status};
use crate::control::{Call, Line, Request as Ask, Status};
use crate::upstream::{Sample, Upstreams};

const PAGE: &str = include_str!("dashboard.html");

/// How often the page hears from the cluster.
const EVERY: Duration = Duration::from_secs(1);

pub fn page() -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())).boxed());
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Everything is inline; nothing may be loaded from elsewhere, and no
    // other site may frame the buttons.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    res
}

/// One event of the stream.
#[derive(Serialize)]
struct Event<'a> {
    status: &'a Status,
    cluster: Cluster,
    backends: Vec<BackendRow>,
    /// Output lines since the last event (all kept ones in the first).
    log: Vec<String>,
}

/// The whole cluster over the last second (proxy mode; `None` elsewhere
/// and in the first event).
#[derive(Serialize, Default)]
struct Cluster {
    rps: Option<f64>,
    errors_per_s: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

#[derive(Serialize)]
struct BackendRow {
    name: String,
    healthy: bool,
    /// Out by passive health (`max_fails`) until a request succeeds.
    taken_out: bool,
    in_flight: u32,
    /// Its `max_conns` (0: no limit), shown beside `in_flight`.
    max_conns: u32,
    rps: Option<f64>,
}

/// `GET /events`: a `text/event-stream` that lasts until the page goes.
pub fn events(calls: mpsc::UnboundedSender<Call>, up: Arc<Upstreams>) -> Response<Body> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(feed(tx, calls, up));
    let mut res = Response::new(Stream(rx).boxed());
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    res
}

/// Writes an event a second until the page is gone (the send fails) or the
/// master stops (the status call fails).
async fn feed(tx: mpsc::Sender<Bytes>, calls: mpsc::UnboundedSender<Call>, up: Arc<Upstreams>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev: Option<(Instant, HashMap<u64, Sample>)> = None;
    let mut seen = 0;
    if tx
        .send(Bytes::from_static(b"retry: 2000\n\n"))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tick.tick().await;
        let Some(status) = status(&calls).await else {
            return;
        };
        let now = Instant::now();
        let pool = up.current();
        let mut total = Sample::default();
        let mut samples = HashMap::new();
        let mut backends = Vec::new();
        let secs = prev
            .as_ref()
            .map(|(at, _)| now.duration_since(*at).as_secs_f64().max(1e-3));
        for t in pool.all_targets() {
            let snap = t.answers.snapshot();
            let delta = prev.as_ref().map(|(_, p)| match p.get(&t.id) {
                Some(before) => snap.since(before),
                None => snap.clone(), // new since the last event
            });
            if let Some(d) = &delta {
                total.requests += d.requests;
                total.errors += d.errors;
                for (sum, n) in total.latency.iter_mut().zip(d.latency) {
                    *sum += n;
                }
            }
            backends.push(BackendRow {
                name: t.label.clone(),
                healthy: t.backend.is_healthy(),
                taken_out: t.backend.is_failed(),
                in_flight: t.backend.in_flight(),
                max_conns: t.backend.config().max_conns,
                rps: delta.zip(secs).map(|(d, s)| d.requests as f64 / s),
            });
            samples.insert(t.id, snap);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let cluster = match secs {
            Some(s) if status.mode == "proxy" => Cluster {
                rps: Some(total.requests as f64 / s),
                errors_per_s: Some(total.errors as f64 / s),
                p50_ms: total.quantile(50).map(ms),
                p99_ms: total.quantile(99).map(ms),
            },
            _ => Cluster::default(),
        };
        prev = Some((now, samples));
        let (log, next) = crate::tail::since(seen);
        seen = next;
        let event = Event {
            status: &status,
            cluster,
            backends,
            log,
        };
        let Ok(json) = serde_json::to_string(&event) else {
            return;
        };
        if tx
            .send(Bytes::from(format!("data: {json}\n\n")))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A body that yields what the feed sends, until it ends.
struct Stream(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// `POST /api/reload`, `/api/scale` (`{"n": "+1"}`), `/api/replace`
/// (`{"id": 2}`): the buttons. Answers the supervisor's `Done` as JSON.
pub async fn act(
    action: &str,
    req: Request<Incoming>,
    calls: &mpsc::UnboundedSender<Call>,
) -> Response<Body> {
    if let Err(why) = same_origin_json(&req) {
        return reply(StatusCode::FORBIDDEN, "text/plain", format!("{why}\n"));
    }
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, "text/plain", "unreadable body\n"),
    };
    let args: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let ask = match action {
        "reload" => Ask::Reload { update_env: None },
        "scale" => match args.get("n").and_then(|n| n.as_str()) {
            Some(n) => Ask::Scale { n: n.to_string() },
            None => return bad("scale needs {\"n\": \"+1\"}"),
        },
        "replace" => match args.get("id").and_then(|n| n.as_u64()) {
            Some(id) => Ask::Replace { id: id as usize },
            None => return bad("replace needs {\"id\": N}"),
        },
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "POST /api/reload, /api/scale or /api/replace\n",
            );
        }
    };
    match call(calls, ask).await {
        Some(Line::Done(done)) => {
            let code = if done.ok {
                StatusCode::OK
            } else {
                StatusCode::CONFLICT
            };
            reply(
                code,
                "application/json",
                serde_json::to_string(&done).unwrap_or_default(),
            )
        }
        _ => super::stopping(),
    }
}

fn bad(why: &str) -> Response<Body> {
    reply(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n"))
}

/// Another site's page can post a form to a loopback address, but not with
/// a JSON content type (that needs a CORS preflight this listener refuses),
/// and a browser names the page's origin, which must be this listener's.
fn same_origin_json(req: &Request<Incoming>) -> Result<(), &'static str> {
    let h = req.headers();
    let json = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err("actions need Content-Type: application/json");
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let host = h.get(header::HOST).map(|v| v.as_bytes());
        let origin = origin.as_bytes();
        let origin_host = origin
            .strip_prefix(b"http://")
            .or_else(|| origin.strip_prefix(b"https://"));
        if origin_host.is_none() || origin_host != host {
            return Err("actions are taken from the dashboard's own origin only");
        }
    }
    Ok(())
}
