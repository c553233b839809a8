//! `/metrics`: one scrape's figures, written out by `prometheus-client`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::control::Status;
use crate::upstream::{Target, octave_buckets};

/// One scrape's figures, written out by `prometheus-client`.
#[derive(Debug)]
pub struct Scrape {
    pub status: Status,
    pub targets: Vec<Arc<Target>>,
    pub retries: u64,
    pub kernel: Kernel,
}

/// What the kernel tells of the listening port, in every mode.
#[derive(Debug, Default)]
pub struct Kernel {
    /// Connections waiting in the accept queues of the port's listening
    /// sockets (`Recv-Q` of `ss -lnt`).
    pub queued: Option<u64>,
    /// `TcpExt: ListenOverflows` of `/proc/net/netstat`: connections
    /// dropped because an accept queue was full, for the whole network
    /// namespace (the kernel keeps no per-socket count).
    pub overflows: Option<u64>,
}

impl Kernel {
    /// Reads `/proc` (blocking: run it off the async threads).
    pub fn read(port: u16) -> Kernel {
        let listening = |v: procfs::ProcResult<Vec<procfs::net::TcpNetEntry>>| {
            v.into_iter()
                .flatten()
                .filter(|e| {
                    e.state == procfs::net::TcpState::Listen && e.local_address.port() == port
                })
                .map(|e| u64::from(e.rx_queue))
                .collect::<Vec<_>>()
        };
        let mut socks = listening(procfs::net::tcp());
        socks.extend(listening(procfs::net::tcp6()));
        let queued = (!socks.is_empty()).then(|| socks.iter().sum());
        Kernel {
            queued,
            overflows: std::fs::read_to_string("/proc/net/netstat")
                .ok()
                .and_then(|t| netstat_field(&t, "TcpExt:", "ListenOverflows")),
        }
    }
}

/// A field of `/proc/net/netstat`, where each group is a line of names
/// followed by a line of values.
fn netstat_field(text: &str, group: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(group));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
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
        let states = ["starting", "ready", "stopping", "waiting", "stopped"];
        family(
            &mut enc,
            "herd_workers",
            "Workers by state (waiting, stopped: a slot without a process).",
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
            "The RSS of the worker's processes (its process group), summed.",
            MetricType::Gauge,
            current().map(|w| (worker(w.id), ConstGauge::new(w.memory as i64))),
        )?;
        family(
            &mut enc,
            "herd_worker_cpu_seconds",
            "CPU time the worker's processes (its process group) used, user and system.",
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
        if let Some(queued) = self.kernel.queued {
            family(
                &mut enc,
                "herd_listen_queue",
                "Connections waiting to be accepted on the port (all its listening sockets).",
                MetricType::Gauge,
                [(Vec::new(), ConstGauge::new(queued as i64))],
            )?;
        }
        if let Some(n) = self.kernel.overflows {
            family(
                &mut enc,
                "herd_listen_overflows",
                "Connections the kernel dropped because an accept queue was full (whole network namespace: TcpExt ListenOverflows).",
                MetricType::Counter,
                [(Vec::new(), ConstCounter::new(n))],
            )?;
        }
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
        family(
            &mut enc,
            "herd_rate_limited",
            "Requests answered 429 for --rate-limit.",
            MetricType::Counter,
            [(
                Vec::new(),
                ConstCounter::new(
                    crate::proxy::rate::REFUSED.load(std::sync::atomic::Ordering::Relaxed),
                ),
            )],
        )?;
        let queued = crate::upstream::WAITING.load(std::sync::atomic::Ordering::Relaxed);
        family(
            &mut enc,
            "herd_proxy_queued",
            "Requests (TCP mode: connections) waiting for room under max_conns.",
            MetricType::Gauge,
            [(Vec::new(), ConstGauge::new(queued as i64))],
        )?;
        family(
            &mut enc,
            "herd_proxy_connections",
            "Client connections each proxy thread holds, idle ones included.",
            MetricType::Gauge,
            crate::proxy::spread::loads()
                .into_iter()
                .enumerate()
                .map(|(i, n)| (vec![("thread", i.to_string())], ConstGauge::new(n as i64))),
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
            "herd_backend_bytes",
            "Bytes relayed per backend: to_client (HTTP: answer bodies), to_backend (HTTP: request bodies); both count upgraded tunnels and TCP mode's bytes.",
            MetricType::Counter,
            self.targets.iter().flat_map(|t| {
                let a = &t.answers;
                [
                    (
                        "to_client",
                        a.bytes_to_client.load(std::sync::atomic::Ordering::Relaxed),
                    ),
                    (
                        "to_backend",
                        a.bytes_to_backend
                            .load(std::sync::atomic::Ordering::Relaxed),
                    ),
                ]
                .map(|(dir, n)| {
                    let mut l = backend(t);
                    l.push(("direction", dir.to_string()));
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
        family(
            &mut enc,
            "herd_backend_taken_out",
            "1 while failed requests (max_fails) keep the backend out, else 0.",
            MetricType::Gauge,
            self.targets.iter().map(|t| {
                (
                    backend(t),
                    ConstGauge::new(i64::from(t.backend.is_failed())),
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
                .fold(0.0, |a, b| a + b);
            let labels = backend(t);
            e.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn netstat_fields_are_found_by_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 19\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(
            super::netstat_field(text, "TcpExt:", "ListenOverflows"),
            Some(17)
        );
        assert_eq!(super::netstat_field(text, "IpExt:", "InNoRoutes"), Some(3));
        assert_eq!(super::netstat_field(text, "TcpExt:", "Nope"), None);
    }
}
