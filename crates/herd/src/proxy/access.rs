//! The access log (`--access-log FILE|-`): one line per request (HTTP) or
//! connection (TCP), in nginx's `combined` format or as JSON.
//!
//! A proxy thread formats the line and hands it to the writer thread
//! without waiting: the queue is bounded, and when the writer falls behind
//! a line is dropped and counted (`herd_access_log_dropped_total`) rather
//! than a request slowed. The writer drains whatever is queued into one
//! write, so lines go out in batches under load; the file rotates by the
//! main log's size rule.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use crate::config::{AccessLogConfig as Config, AccessLogFormat as Format};

/// Lines queued for the writer at most.
const QUEUE: usize = 16 * 1024;

pub struct AccessLog {
    tx: SyncSender<String>,
    format: Format,
}

/// Lines dropped because the writer fell behind (one log per process).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// One request or connection, as it is logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    #[serde(skip)]
    pub at: SystemTime,
    pub client: IpAddr,
    /// `-` for a TCP connection.
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    /// 0 for a TCP connection.
    pub status: u16,
    /// Answer body bytes sent to the client (TCP: bytes each way, summed).
    pub bytes: u64,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    pub upstream: Option<SocketAddr>,
    #[serde(serialize_with = "opt_secs")]
    pub upstream_time: Option<Duration>,
    /// The backend's name: `worker-2`, or an upstream's.
    pub worker: Option<&'a str>,
    pub retries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e6)
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => secs(d, s),
        None => s.serialize_none(),
    }
}

impl AccessLog {
    /// Opens the file (an error if it cannot be) and starts the writer.
    pub fn start(cfg: &Config) -> std::io::Result<AccessLog> {
        let out: Box<dyn Sink> = match &cfg.path {
            Some(p) => Box::new(crate::logfile::RotatingFile::open(
                p,
                cfg.max_size,
                cfg.keep,
            )?),
            None => Box::new(Stdout),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("herd-access-log".into())
            .spawn(move || writer(rx, out))?;
        Ok(AccessLog {
            tx,
            format: cfg.format,
        })
    }

    /// Queues `e`'s line; never waits.
    pub fn write(&self, e: &Entry<'_>) {
        let line = match self.format {
            Format::Combined => combined(e),
            Format::Json => {
                let mut l = serde_json::to_string(e).unwrap_or_default();
                // The time first, as the other fields: RFC 3339, UTC.
                l.replace_range(..1, &format!("{{\"time\":\"{}\",", rfc3339(e.at)));
                l.push('\n');
                l
            }
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            DROPPED.fetch_add(1, Relaxed);
        }
    }
}

trait Sink: Send {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for crate::logfile::RotatingFile {
    fn put(&mut self, bytes: &[u8]) {
        self.write_all_lines(bytes);
    }
}

struct Stdout;

impl Sink for Stdout {
    fn put(&mut self, bytes: &[u8]) {
        // A closed stdout drops the lines, as herd's own log does.
        let _ = std::io::stdout().lock().write_all(bytes);
    }
}

fn writer(rx: Receiver<String>, mut out: Box<dyn Sink>) {
    let mut batch = String::new();
    while let Ok(first) = rx.recv() {
        batch.clear();
        batch.push_str(&first);
        while batch.len() < 1 << 20
            && let Ok(more) = rx.try_recv()
        {
            batch.push_str(&more);
        }
        out.put(batch.as_bytes());
    }
}

/// `client - - [time] "request" status bytes "referer" "user-agent"`.
fn combined(e: &Entry<'_>) -> String {
    let mut l = String::with_capacity(160);
    let _ = write!(l, "{} - - [{}] \"", e.client, clf_time(e.at));
    if e.method == "-" {
        l.push('-');
    } else {
        escaped(&mut l, e.method);
        l.push(' ');
        escaped(&mut l, e.path);
        l.push(' ');
        escaped(&mut l, e.protocol);
    }
    let _ = write!(l, "\" {} {} \"", e.status, e.bytes);
    escaped(&mut l, e.referer.unwrap_or("-"));
    l.push_str("\" \"");
    escaped(&mut l, e.user_agent.unwrap_or("-"));
    l.push_str("\"\n");
    l
}

/// As nginx escapes log fields: `"`, `\` and bytes outside printable
/// ASCII as `\xHH`.
fn escaped(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

/// Calendar date and time (UTC) of `t`.
fn civil(t: SystemTime) -> (i64, u32, u32, u64, u64, u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        d.subsec_millis(),
    )
}

/// nginx's `$time_local`, in UTC: `02/Dec/2026:01:45:00 +0000`.
fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, _) = civil(t);
    let m = MONTHS[(mo as usize - 1).min(11)];
    format!("{d:02}/{m}/{y}:{h:02}:{mi:02}:{s:02} +0000")
}

fn rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ms) = civil(t);
    format!("{y}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: SystemTime) -> Entry<'static> {
        Entry {
            at,
            client: "10.0.0.7".parse().unwrap(),
            method: "GET",
            path: "/a?b=\"c\"",
            protocol: "HTTP/1.1",
            status: 200,
            bytes: 12,
            duration: Duration::from_micros(1500),
            upstream: Some("127.0.0.1:4000".parse().unwrap()),
            upstream_time: Some(Duration::from_micros(1200)),
            worker: Some("worker-1"),
            retries: 0,
            referer: None,
            user_agent: Some("curl/8"),
        }
    }

    #[test]
    fn times_are_the_calendars() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_175_900); // 2026-12-02 01:45:00 UTC
        assert_eq!(clf_time(t), "02/Dec/2026:01:45:00 +0000");
        assert_eq!(
            rfc3339(t + Duration::from_millis(7)),
            "2026-12-02T01:45:00.007Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn combined_is_nginxs_and_escapes_as_it_does() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_175_900);
        assert_eq!(
            combined(&entry(t)),
            "10.0.0.7 - - [02/Dec/2026:01:45:00 +0000] \"GET /a?b=\\x22c\\x22 HTTP/1.1\" 200 12 \"-\" \"curl/8\"\n"
        );
    }
}
