//! The access log (`--access-log FILE|-`): one line per request (HTTP) or
//! connection (TCP), in nginx's `combined` format or as JSON.
//!
//! A proxy thread formats the line into a buffer of its own (no lock, no
//! allocation per line), and hands the buffer to the writer thread when it
//! holds 64 KiB, or on the thread's 100 ms tick, without waiting: the
//! queue is bounded, and when the writer falls behind a batch is dropped
//! and its lines counted (`herd_access_log_dropped_total`) rather than a
//! request slowed. The file rotates by the main log's size rule.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use crate::config::{AccessLogConfig as Config, AccessLogFormat as Format};

/// A thread's batch is handed over at this size.
const BATCH: usize = 64 * 1024;
/// Batches queued for the writer at most (about 4 MiB).
const QUEUE: usize = 64;

pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    format: Format,
}

thread_local! {
    static PENDING: RefCell<Batch> = RefCell::new(Batch::default());
}

/// A proxy thread's lines not yet handed to the writer.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    lines: u64,
    tx: Option<SyncSender<Vec<u8>>>,
}

impl Batch {
    fn hand_over(&mut self) {
        let Some(tx) = &self.tx else {
            return;
        };
        if self.buf.is_empty() {
            return;
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH + 1024));
        if tx.try_send(full).is_err() {
            DROPPED.fetch_add(self.lines, Relaxed);
        }
        self.lines = 0;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.hand_over();
    }
}

/// Hands this thread's lines to the writer (each proxy thread's tick).
pub fn flush() {
    let _ = PENDING.try_with(|b| b.borrow_mut().hand_over());
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
    pub upstream: Option<crate::upstream::Place<'a>>,
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

    /// Adds `e`'s line to this thread's batch; never waits.
    pub fn write(&self, e: &Entry<'_>) {
        let _ = PENDING.try_with(|b| {
            let mut b = b.borrow_mut();
            if b.tx.is_none() {
                b.tx = Some(self.tx.clone());
            }
            match self.format {
                Format::Combined => combined(&mut b.buf, e),
                Format::Json => json(&mut b.buf, e),
            }
            b.lines += 1;
            if b.buf.len() >= BATCH {
                b.hand_over();
            }
        });
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
        // A closed or stuck stdout drops the lines, as herd's own log does.
        crate::output::emit(crate::output::Stream::Out, bytes);
    }
}

fn writer(rx: Receiver<Vec<u8>>, mut out: Box<dyn Sink>) {
    while let Ok(batch) = rx.recv() {
        out.put(&batch);
    }
}

/// `client - - [time] "request" status bytes "referer" "user-agent"`.
fn combined(l: &mut Vec<u8>, e: &Entry<'_>) {
    let _ = write!(l, "{} - - [{}] \"", e.client, clf_time(e.at));
    if e.method == "-" {
        l.push(b'-');
    } else {
        escaped(l, e.method);
        l.push(b' ');
        escaped(l, e.path);
        l.push(b' ');
        escaped(l, e.protocol);
    }
    let _ = write!(l, "\" {} {} \"", e.status, e.bytes);
    escaped(l, e.referer.unwrap_or("-"));
    l.extend_from_slice(b"\" \"");
    escaped(l, e.user_agent.unwrap_or("-"));
    l.extend_from_slice(b"\"\n");
}

/// `{"time":…, …}`: the time first, as RFC 3339 in UTC.
fn json(l: &mut Vec<u8>, e: &Entry<'_>) {
    let _ = write!(l, "{{\"time\":\"{}\"", rfc3339(e.at));
    let at = l.len();
    if serde_json::to_writer(&mut *l, e).is_ok() && l.get(at) == Some(&b'{') {
        l[at] = b','; // the entry's own fields follow the time
        l.push(b'\n');
    } else {
        l.truncate(at);
        l.extend_from_slice(b"}\n");
    }
}

/// As nginx escapes log fields: `"`, `\` and bytes outside printable
/// ASCII as `\xHH`.
fn escaped(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
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

pub(crate) fn rfc3339(t: SystemTime) -> String {
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
            upstream: Some(crate::upstream::Place::Tcp(
                "127.0.0.1:4000".parse().unwrap(),
            )),
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
    fn json_lines_start_with_the_time_and_parse() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_175_900);
        let mut l = Vec::new();
        json(&mut l, &entry(t));
        let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert!(l.starts_with(b"{\"time\":\"2026-12-02T01:45:00.000Z\",\"client\""));
        assert_eq!(
            (v["worker"].as_str(), v["duration"].as_f64()),
            (Some("worker-1"), Some(0.0015))
        );
        assert_eq!(v["upstream"].as_str(), Some("127.0.0.1:4000"));
        let path = std::path::Path::new("/run/herd/7/s0.1");
        let on_unix = Entry {
            upstream: Some(crate::upstream::Place::Unix(path)),
            ..entry(t)
        };
        l.clear();
        json(&mut l, &on_unix);
        let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["upstream"].as_str(), Some("unix:/run/herd/7/s0.1"));
    }

    #[test]
    fn combined_is_nginxs_and_escapes_as_it_does() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_175_900);
        let mut l = Vec::new();
        combined(&mut l, &entry(t));
        assert_eq!(
            String::from_utf8(l).unwrap(),
            "10.0.0.7 - - [02/Dec/2026:01:45:00 +0000] \"GET /a?b=\\x22c\\x22 HTTP/1.1\" 200 12 \"-\" \"curl/8\"\n"
        );
    }
}
