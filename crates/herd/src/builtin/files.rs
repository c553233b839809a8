//! The static file server behind `herd serve DIR PORT` (PM2's `pm2 serve`),
//! run as an ordinary worker (`herd static-files`) so that it is balanced,
//! reloaded and logged like any app. It reads PM2's variables, so an
//! ecosystem app with `script: 'serve'` works as under PM2:
//! `PM2_SERVE_PATH` (default `.`), `PM2_SERVE_SPA` (`true`: a path that
//! names no file gets the homepage, for client-side routing),
//! `PM2_SERVE_HOMEPAGE` (default `/index.html`), `PM2_SERVE_BASIC_AUTH`
//! with `PM2_SERVE_BASIC_AUTH_USERNAME` / `_PASSWORD`.
//!
//! Beyond PM2's: `HEAD`, conditional requests (`ETag`, `Last-Modified`),
//! one byte range (video seeking), `index.html` in any directory, and
//! files streamed rather than read whole. Paths are decoded once and
//! never leave the directory (`..` is refused); dot-files (`.env`,
//! `.git`) are not served, as Express's `static` does not serve them,
//! but `.well-known` is. Symbolic links are followed, as nginx does.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{BuiltinError, Source};

/// What the site serves, from PM2's variables.
#[derive(Debug, Clone)]
pub struct Site {
    pub root: PathBuf,
    pub spa: bool,
    /// The file `/` (and, with `spa`, any unknown path) is answered with.
    pub homepage: PathBuf,
    /// `user:password` when basic authentication is on.
    pub credentials: Option<String>,
}

impl Site {
    /// From `PM2_SERVE_*` (see the module's doc).
    pub fn from_env() -> Result<Site, BuiltinError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let on = |k: &str| var(k).is_some_and(|v| v == "true" || v == "1");
        let root = PathBuf::from(var("PM2_SERVE_PATH").unwrap_or_else(|| ".".into()));
        if !root.is_dir() {
            return Err(BuiltinError::Config(format!(
                "{}: not a directory to serve",
                root.display()
            )));
        }
        let page = var("PM2_SERVE_HOMEPAGE").unwrap_or_else(|| "/index.html".into());
        let homepage = relative(page.trim_start_matches('.')).map_err(|_| {
            BuiltinError::Config(format!(
                "PM2_SERVE_HOMEPAGE={page}: not a file in the directory"
            ))
        })?;
        let credentials = if on("PM2_SERVE_BASIC_AUTH") {
            let user = var("PM2_SERVE_BASIC_AUTH_USERNAME").unwrap_or_default();
            let pass = var("PM2_SERVE_BASIC_AUTH_PASSWORD").unwrap_or_default();
            if user.is_empty() || pass.is_empty() {
                return Err(BuiltinError::Config(
                    "basic authentication needs a user name and a password (--basic-auth-username, --basic-auth-password)".into(),
                ));
            }
            Some(format!("{user}:{pass}"))
        } else {
            None
        };
        Ok(Site {
            root,
            spa: on("PM2_SERVE_SPA"),
            homepage,
            credentials,
        })
    }
}

/// Runs the server as a worker: `herd static-files`.
pub fn run() -> Result<(), BuiltinError> {
    let site = Arc::new(Site::from_env()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let fallback = std::env::var("PM2_SERVE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(8080);
        let source = Source::take(fallback)?;
        crate::outln!("serving {} ({})", site.root.display(), source.describe());
        super::serve(source, move |req| answer(site.clone(), req)).await
    })
}

/// Why a request path names no file to open.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `..`: out of the directory.
    Forbidden,
    /// A dot-file: not served, as if absent.
    Hidden,
    /// A NUL byte.
    Malformed,
}

/// The file a request path names, relative to the directory: decoded
/// once (a `%` without two hex digits stays as it is), `.` and empty
/// segments dropped, `..` removing the segment before it, as nginx
/// normalizes a path (`/docs/../a.css` is `/a.css`); a `..` that would
/// leave the directory, dot-files (but `.well-known`) and NUL refused.
pub fn relative(path: &str) -> Result<PathBuf, Refusal> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    if decoded.contains(&0) {
        return Err(Refusal::Malformed);
    }
    let mut segs: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segs.pop().ok_or(Refusal::Forbidden)?;
            }
            s => segs.push(s),
        }
    }
    let mut out = PathBuf::new();
    for s in segs {
        if s.starts_with(b".") && s != b".well-known" {
            return Err(Refusal::Hidden);
        }
        out.push(OsStr::from_bytes(s));
    }
    Ok(out)
}

/// What `Range` asks of a body of `len` bytes: one range only (several
/// get the whole body, as nginx may answer them).
#[derive(Debug, PartialEq, Eq)]
pub enum Ranged {
    Whole,
    /// Bytes `start..=end`.
    Part(u64, u64),
    Unsatisfiable,
}

pub fn range(value: Option<&str>, len: u64) -> Ranged {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ranged::Whole;
    };
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ranged::Whole;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        // The last N bytes.
        (true, false) => match num(b) {
            Some(0) => return Ranged::Unsatisfiable,
            Some(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            None => return Ranged::Whole,
        },
        (false, true) => match num(a) {
            Some(s) => (s, len.saturating_sub(1)),
            None => return Ranged::Whole,
        },
        (false, false) => match (num(a), num(b)) {
            (Some(s), Some(e)) if s <= e => (s, e.min(len.saturating_sub(1))),
            _ => return Ranged::Whole,
        },
        (true, true) => return Ranged::Whole,
    };
    if len == 0 || start >= len {
        return Ranged::Unsatisfiable;
    }
    Ranged::Part(start, end)
}

/// nginx's entity tag: modification time and length, in hex.
pub fn etag(mtime: u64, len: u64) -> String {
    format!("\"{mtime:x}-{len:x}\"")
}

/// Whether the client's copy is current (answer 304): `If-None-Match`
/// when sent, else `If-Modified-Since` (whole seconds).
pub fn fresh(headers: &HeaderMap, tag: &str, mtime: u64) -> bool {
    if let Some(v) = headers.get(header::IF_NONE_MATCH) {
        let v = v.to_str().unwrap_or("");
        return v.trim() == "*"
            || v.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == tag);
    }
    headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .is_some_and(|since| mtime <= since.as_secs())
}

/// The media type of a file, by its extension (nginx's default type for
/// the others), with `charset=utf-8` for text.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(OsStr::to_str)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" | "cjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" | "md" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

/// Whether `Authorization` carries `user:password` (Basic).
pub fn authorized(value: Option<&HeaderValue>, credentials: &str) -> bool {
    use base64::Engine;
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .is_some_and(|d| d == credentials.as_bytes())
}

type Answer = Response<BoxBody<Bytes, std::io::Error>>;

fn text(status: StatusCode, body: &'static str) -> Answer {
    let mut res = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

async fn answer(site: Arc<Site>, req: Request<Incoming>) -> Answer {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    if let Some(c) = &site.credentials
        && !authorized(req.headers().get(header::AUTHORIZATION), c)
    {
        let mut res = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"herd\""),
        );
        return res;
    }
    let path = req.uri().path();
    let rel = match relative(path) {
        Ok(r) if r.as_os_str().is_empty() => site.homepage.clone(),
        Ok(r) => r,
        Err(Refusal::Forbidden) => return text(StatusCode::FORBIDDEN, "403 Forbidden\n"),
        Err(Refusal::Malformed) => return text(StatusCode::BAD_REQUEST, "400 Bad Request\n"),
        Err(Refusal::Hidden) => return not_found(&site, &req, head).await,
    };
    let mut file = site.root.join(&rel);
    if file.is_dir() {
        if !path.ends_with('/') {
            // Relative links in its index resolve against the directory.
            let mut res = text(StatusCode::MOVED_PERMANENTLY, "301 Moved Permanently\n");
            // One leading slash: `//docs/` would send the browser to host `docs`.
            let path = format!("/{}", path.trim_start_matches('/'));
            let to = match req.uri().query() {
                Some(q) => format!("{path}/?{q}"),
                None => format!("{path}/"),
            };
            if let Ok(v) = HeaderValue::from_str(&to) {
                res.headers_mut().insert(header::LOCATION, v);
            }
            return res;
        }
        file.push("index.html");
    }
    match send_file(&file, &req, head).await {
        Ok(res) => res,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) || e.raw_os_error() == Some(libc::EISDIR) =>
        {
            not_found(&site, &req, head).await
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            text(StatusCode::FORBIDDEN, "403 Forbidden\n")
        }
        Err(e) => {
            crate::errln!("{}: {e}", file.display());
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error\n",
            )
        }
    }
}

/// A path that names no file: the homepage with `spa`, else the
/// directory's `404.html`, else a line.
async fn not_found(site: &Site, req: &Request<Incoming>, head: bool) -> Answer {
    if site.spa
        && let Ok(res) = send_file(&site.root.join(&site.homepage), req, head).await
    {
        return res;
    }
    match send_file(&site.root.join("404.html"), req, head).await {
        Ok(mut res) if res.status() == StatusCode::OK => {
            *res.status_mut() = StatusCode::NOT_FOUND;
            res
        }
        _ => text(StatusCode::NOT_FOUND, "404 Not Found\n"),
    }
}

async fn send_file(path: &Path, req: &Request<Incoming>, head: bool) -> std::io::Result<Answer> {
    // O_NONBLOCK: opening a FIFO in the directory must not wait for a
    // writer (and hold a thread for good); it changes nothing for a file.
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .await?;
    let meta = file.metadata().await?;
    if meta.is_dir() {
        return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
    }
    if !meta.is_file() {
        // A FIFO, socket or device: not a file to send.
        return Err(std::io::ErrorKind::NotFound.into());
    }
    let len = meta.len();
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    let mtime = modified
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tag = etag(mtime, len);
    let mut res = Response::builder()
        .header(header::CONTENT_TYPE, content_type(path))
        .header(
            header::LAST_MODIFIED,
            httpdate::fmt_http_date(modified.max(UNIX_EPOCH)),
        )
        .header(header::ETAG, &tag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("x-content-type-options", "nosniff");
    if fresh(req.headers(), &tag, mtime) {
        return Ok(res
            .status(StatusCode::NOT_MODIFIED)
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap_or_else(|_| text(StatusCode::NOT_MODIFIED, "")));
    }
    // `If-Range`: the range only if the client's copy is this one.
    let if_range = req
        .headers()
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().is_ok_and(|v| v == tag));
    let asked = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (start, count) = match range(asked.filter(|_| if_range), len) {
        Ranged::Whole => (0, len),
        Ranged::Part(s, e) => {
            res = res
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{len}"));
            (s, e - s + 1)
        }
        Ranged::Unsatisfiable => {
            let mut r = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "416 Range Not Satisfiable\n",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    res = res.header(header::CONTENT_LENGTH, count);
    let body = if head || count == 0 {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed()
    } else {
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start)).await?;
        }
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 64 << 10);
        StreamBody::new(stream.map_ok(Frame::data)).boxed()
    };
    res.body(body).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_decoded_once_and_never_leave_the_directory() {
        assert_eq!(relative("/a/b.css"), Ok(PathBuf::from("a/b.css")));
        assert_eq!(relative("/a//./b%20c.txt"), Ok(PathBuf::from("a/b c.txt")));
        assert_eq!(relative("/"), Ok(PathBuf::new()));
        assert_eq!(relative("/../etc/passwd"), Err(Refusal::Forbidden));
        assert_eq!(relative("/a/%2e%2e/%2e%2e/x"), Err(Refusal::Forbidden));
        assert_eq!(relative("/a%2f..%2f..%2fx"), Err(Refusal::Forbidden));
        assert_eq!(relative("/a/b/../../../x"), Err(Refusal::Forbidden));
        // Inside the directory, `..` is resolved as nginx resolves it.
        assert_eq!(relative("/a%2f..%2fx"), Ok(PathBuf::from("x")));
        assert_eq!(relative("/docs/../a.css"), Ok(PathBuf::from("a.css")));
        assert_eq!(relative("/sub/.."), Ok(PathBuf::new()));
        assert_eq!(
            relative("/.git/../index.html"),
            Ok(PathBuf::from("index.html"))
        );
        assert_eq!(relative("/x/./../.env"), Err(Refusal::Hidden));
        // Decoded once: %252e stays the three characters `%2e`.
        assert_eq!(relative("/%252e%252e/x"), Ok(PathBuf::from("%2e%2e/x")));
        assert_eq!(relative("/.env"), Err(Refusal::Hidden));
        assert_eq!(relative("/x/.git/config"), Err(Refusal::Hidden));
        assert_eq!(
            relative("/.well-known/security.txt"),
            Ok(PathBuf::from(".well-known/security.txt"))
        );
        assert_eq!(relative("/a%00.html"), Err(Refusal::Malformed));
        assert_eq!(relative("/a%zz"), Ok(PathBuf::from("a%zz")));
        assert_eq!(relative("/a%2"), Ok(PathBuf::from("a%2")));
    }

    #[test]
    fn one_byte_range_is_served_and_the_rest_whole() {
        assert_eq!(range(None, 10), Ranged::Whole);
        assert_eq!(range(Some("bytes=0-3"), 10), Ranged::Part(0, 3));
        assert_eq!(range(Some("bytes=5-"), 10), Ranged::Part(5, 9));
        assert_eq!(range(Some("bytes=-4"), 10), Ranged::Part(6, 9));
        assert_eq!(range(Some("bytes=-40"), 10), Ranged::Part(0, 9));
        assert_eq!(range(Some("bytes=8-100"), 10), Ranged::Part(8, 9));
        assert_eq!(range(Some("bytes=10-"), 10), Ranged::Unsatisfiable);
        assert_eq!(range(Some("bytes=-0"), 10), Ranged::Unsatisfiable);
        assert_eq!(range(Some("bytes=0-1,4-5"), 10), Ranged::Whole);
        assert_eq!(range(Some("bytes=5-2"), 10), Ranged::Whole);
        assert_eq!(range(Some("items=0-1"), 10), Ranged::Whole);
        assert_eq!(range(Some("bytes=0-0"), 0), Ranged::Unsatisfiable);
    }

    #[test]
    fn the_clients_copy_is_fresh_by_its_tag_else_by_its_date() {
        let tag = etag(0x5f00_0000, 0x10);
        assert_eq!(tag, "\"5f000000-10\"");
        let mut h = HeaderMap::new();
        assert!(!fresh(&h, &tag, 0x5f00_0000));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"x\", W/{tag}")).unwrap(),
        );
        assert!(fresh(&h, &tag, 0x5f00_0000));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        // A tag that differs wins over a date that would match.
        let later =
            httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(0x6000_0000));
        h.insert(
            header::IF_MODIFIED_SINCE,
            HeaderValue::from_str(&later).unwrap(),
        );
        assert!(!fresh(&h, &tag, 0x5f00_0000));
        h.remove(header::IF_NONE_MATCH);
        assert!(fresh(&h, &tag, 0x5f00_0000));
        h.insert(
            header::IF_MODIFIED_SINCE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert!(!fresh(&h, &tag, 0x5f00_0000));
    }

    #[test]
    fn types_and_credentials() {
        assert_eq!(
            content_type(Path::new("a/B.HTML")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("app.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.bin")), "application/octet-stream");
        assert_eq!(
            content_type(Path::new("Makefile")),
            "application/octet-stream"
        );
        // "user:pass" in base64.
        let ok = HeaderValue::from_static("Basic dXNlcjpwYXNz");
        assert!(authorized(Some(&ok), "user:pass"));
        assert!(!authorized(Some(&ok), "user:other"));
        assert!(!authorized(
            Some(&HeaderValue::from_static("Bearer x")),
            "user:pass"
        ));
        assert!(!authorized(None, "user:pass"));
    }
}
