//! TLS termination (rustls, ring): certificates and their reload, the SNI
//! pick, clients' certificates (`--tls-client-ca`, `--tls-client-crl`),
//! and serving a TLS connection. ALPN offers `h2` and `http/1.1`; both are
//! served through hyper (the handler h2c uses), since herd's own HTTP/1.1
//! engine works on the bare socket's readiness.
//!
//! The `ServerConfig` sits behind an `ArcSwap`: a reload swaps in a new one
//! for the next handshakes while open connections keep theirs. Session
//! tickets and the session cache outlive reloads, so resumption does too.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::HttpProxy;
use super::h2::Via;
use super::idle::{Seen, Watched};

use crate::config::{TlsConfig, TlsPair as Pair};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {why}", flag = .0.cert, path = .1.display(), why = .2)]
    Cert(Flags, PathBuf, String),
    #[error("{flag} {path}: {why}", flag = .0.key, path = .1.display(), why = .2)]
    Key(Flags, PathBuf, String),
    #[error("{kf} {key} does not match {cf} {cert} ({reason})", kf = .flags.key, cf = .flags.cert, key = .key.display(), cert = .cert.display())]
    Mismatch {
        flags: Flags,
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("--tls-client-ca {0}: {1}")]
    ClientCa(PathBuf, String),
    #[error("--tls-client-crl {0}: {1}")]
    ClientCrl(PathBuf, String),
    #[error("TLS: {0}")]
    Setup(String),
}

/// The certificates in use, and what a reload needs to make new ones.
pub struct Tls {
    pairs: Vec<Pair>,
    strict: bool,
    /// `--tls-client-ca` and what goes with it.
    client_ca: Option<ClientAuth>,
    config: ArcSwap<rustls::ServerConfig>,
    tickets: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions + Send + Sync>,
    /// The files' modification times and sizes when last loaded.
    stamps: std::sync::Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("pairs", &self.pairs).finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The flags a pair of files was given by, for errors that name them.
#[derive(Debug, Clone, Copy)]
pub struct Flags {
    cert: &'static str,
    key: &'static str,
}

/// `--tls-cert`/`--tls-key`: the listener's pairs.
const LISTENER: Flags = Flags {
    cert: "--tls-cert",
    key: "--tls-key",
};

/// `--upstream-cert`/`--upstream-key`: what herd shows `tls` upstreams.
pub(super) const UPSTREAM: Flags = Flags {
    cert: "--upstream-cert",
    key: "--upstream-key",
};

/// Reads one pair: the chain (leaf first) and a key that matches it.
pub(super) fn load_pair(
    p: &Pair,
    provider: &CryptoProvider,
    flags: Flags,
) -> Result<CertifiedKey, TlsError> {
    let io = |e: std::io::Error| e.to_string();
    let cert = |m: String| TlsError::Cert(flags, p.cert.clone(), m);
    let pem = std::fs::read(&p.cert).map_err(|e| cert(io(e)))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert("no CERTIFICATE in the file".into()));
    }
    webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| cert(format!("not a certificate: {e}")))?;
    let key = |m: String| TlsError::Key(flags, p.key.clone(), m);
    let pem = std::fs::read(&p.key).map_err(|e| key(io(e)))?;
    let der =
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| key(format!("no private key: {e}")))?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            flags,
            cert: p.cert.clone(),
            key: p.key.clone(),
            reason: "a different public key".into(),
        },
        other => key(other.to_string()),
    })
}

/// The CA certificates in a PEM file (`--tls-client-ca`, `--upstream-ca`):
/// every one must parse, so a typo is an error, not a CA fewer.
pub(super) fn load_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE in the file".into());
    }
    Ok(roots)
}

/// How clients' certificates are checked: `--tls-client-ca`,
/// `--tls-client-optional`, `--tls-client-crl`.
#[derive(Debug, Clone)]
struct ClientAuth {
    ca: PathBuf,
    optional: bool,
    crl: Option<PathBuf>,
}

/// The verifier of client certificates against the CA certificates in
/// `ca`; with `optional`, a client may send none. With revocation lists, as
/// OpenSSL's checks under nginx's `ssl_crl`: every certificate of the
/// client's chain below the CA needs its issuer's list, and an expired list
/// refuses everyone until a fresh one replaces it.
fn client_verifier(
    auth: &ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let bad = |m: String| TlsError::ClientCa(auth.ca.clone(), m);
    let roots = load_roots(&auth.ca).map_err(bad)?;
    let mut verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if auth.optional {
        verifier = verifier.allow_unauthenticated();
    }
    let bad_crl = |path: &PathBuf, m: String| TlsError::ClientCrl(path.clone(), m);
    if let Some(path) = &auth.crl {
        let crls = load_crls(path).map_err(|m| bad_crl(path, m))?;
        verifier = verifier.with_crls(crls).enforce_revocation_expiration();
    }
    // The roots were checked above: what fails here is a list.
    verifier.build().map_err(|e| match &auth.crl {
        Some(path) => bad_crl(path, e.to_string()),
        None => bad(e.to_string()),
    })
}

/// The certificate revocation lists in a PEM file (`--tls-client-crl`,
/// `--upstream-crl`): at least one.
pub(super) fn load_crls(
    path: &std::path::Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("not PEM: {e}"))?;
    if crls.is_empty() {
        return Err("no X509 CRL in the file".into());
    }
    Ok(crls)
}

/// A new ticket key and an empty cache of 4,096 sessions: what lets
/// clients resume the sessions made under them.
#[allow(clippy::type_complexity)]
fn resumption() -> Result<
    (
        Arc<dyn ProducesTickets>,
        Arc<dyn StoresServerSessions + Send + Sync>,
    ),
    TlsError,
> {
    let tickets =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok((tickets, rustls::server::ServerSessionMemoryCache::new(4096)))
}

pub(super) fn stamp(p: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Tls {
    /// Loads every pair (an error names the file); the first is the default
    /// unless `--tls-strict-sni`; and `--tls-client-ca`'s certificates.
    pub fn load(t: &TlsConfig) -> Result<Tls, TlsError> {
        let (tickets, sessions) = resumption()?;
        let (pairs, strict) = (t.pairs.clone(), t.strict_sni);
        let client_ca = t.client_ca.clone().map(|ca| ClientAuth {
            ca,
            optional: t.client_optional,
            crl: t.client_crl.clone(),
        });
        let stamps = Self::stamps_of(&pairs, client_ca.as_ref());
        let config = Self::build(&pairs, strict, client_ca.as_ref(), &tickets, &sessions)?;
        Ok(Tls {
            strict,
            client_ca,
            pairs,
            config: ArcSwap::from_pointee(config),
            tickets,
            sessions,
            stamps: std::sync::Mutex::new(stamps),
        })
    }

    fn stamps_of(pairs: &[Pair], client: Option<&ClientAuth>) -> Vec<Option<(SystemTime, u64)>> {
        pairs
            .iter()
            .flat_map(|p| [stamp(&p.cert), stamp(&p.key)])
            .chain(client.map(|c| stamp(&c.ca)))
            .chain(client.and_then(|c| c.crl.as_deref()).map(stamp))
            .collect()
    }

    fn build(
        pairs: &[Pair],
        strict: bool,
        client: Option<&ClientAuth>,
        tickets: &Arc<dyn ProducesTickets>,
        sessions: &Arc<dyn StoresServerSessions + Send + Sync>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let mut keys = Vec::with_capacity(pairs.len());
        for p in pairs {
            keys.push(Arc::new(load_pair(p, &provider, LISTENER)?));
        }
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = match client {
            Some(c) => builder.with_client_cert_verifier(client_verifier(c, provider)?),
            None => builder.with_no_client_auth(),
        };
        let mut c = builder.with_cert_resolver(Arc::new(Sni { keys, strict }));
        // `http/1.0` too, as nginx offers it: `curl --http1.0` asks for
        // nothing else, and without it the handshake would fail.
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        c.ticketer = tickets.clone();
        c.session_storage = sessions.clone();
        Ok(c)
    }

    /// Loads the files again; on any error the certificates in use stay.
    /// Sessions resume across it, except with `--tls-client-ca`: a resumed
    /// session keeps the client certificate it was made with unchecked, so a
    /// client of a CA just removed (or a certificate just revoked) would still
    /// get in; there every client makes a full handshake once after a reload.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ca = self.client_ca.as_ref();
        let stamps = Self::stamps_of(&self.pairs, ca);
        let (tickets, sessions) = match ca {
            Some(_) => resumption()?,
            None => (self.tickets.clone(), self.sessions.clone()),
        };
        let c = Self::build(&self.pairs, self.strict, ca, &tickets, &sessions)?;
        self.config.store(Arc::new(c));
        if let Ok(mut s) = self.stamps.lock() {
            *s = stamps;
        }
        Ok(())
    }

    /// Whether a file changed since it was last loaded (time or size).
    pub fn changed(&self) -> bool {
        let now = Self::stamps_of(&self.pairs, self.client_ca.as_ref());
        self.stamps.lock().map(|s| *s != now).unwrap_or(false)
    }

    /// Remembers the files as they are now, so one bad change is reported once.
    pub fn seen(&self) {
        if let Ok(mut s) = self.stamps.lock() {
            *s = Self::stamps_of(&self.pairs, self.client_ca.as_ref());
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }
}

/// Picks the first pair whose certificate is valid for the client's SNI
/// name, else the first pair (clients without SNI get it too, as nginx's
/// default server), or with `strict` none: the handshake then fails with
/// an alert.
#[derive(Debug)]
struct Sni {
    keys: Vec<Arc<CertifiedKey>>,
    strict: bool,
}

impl ResolvesServerCert for Sni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if (self.keys.len() > 1 || self.strict)
            && let Some(name) = hello.server_name()
            && let Ok(name) = ServerName::try_from(name)
        {
            for k in &self.keys {
                let valid = k
                    .end_entity_cert()
                    .ok()
                    .and_then(|c| webpki::EndEntityCert::try_from(c).ok())
                    .is_some_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok());
                if valid {
                    return Some(k.clone());
                }
            }
        }
        if self.strict {
            return None;
        }
        self.keys.first().cloned()
    }
}

/// The reason a handshake refused the client's certificate (missing,
/// another CA's, expired, revoked), from rustls's error. Any other failure
/// (garbage, an old version, no common cipher) is a scanner's as often as
/// not, and stays at debug level.
fn refused_certificate(e: &std::io::Error) -> Option<&rustls::Error> {
    let r = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    matches!(
        r,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
    .then_some(r)
}

/// Says why a client certificate was refused (an operator's question with
/// mutual TLS; nginx logs it at info level too), at most once per 10 s with
/// a count, so a client retrying in a loop does not flood the log.
fn note_refused_certificate(peer: IpAddr, why: &rustls::Error) {
    use crate::os::listen::AcceptErrors;
    static REFUSED: std::sync::Mutex<AcceptErrors> = std::sync::Mutex::new(AcceptErrors::new());
    let due = REFUSED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .failed(std::time::Instant::now());
    match due {
        Some(1) => tracing::info!("refused the client certificate of {peer}: {why}"),
        Some(n) => tracing::info!(
            "refused {n} client certificates since the last such line, the last of {peer}: {why}"
        ),
        None => {}
    }
}

/// Serves one TLS client connection: the handshake (bounded by the head
/// time-out), then HTTP/2 or HTTP/1.1 as ALPN chose. A failed handshake
/// (garbage, an old version, no common cipher) gets rustls's alert and
/// ends this connection only.
pub async fn serve(
    p: Arc<HttpProxy>,
    tls: Arc<Tls>,
    io: TcpStream,
    peer: IpAddr,
    stop: CancellationToken,
) {
    let local = io.local_addr().ok();
    // One time-out for the peek and the handshake together.
    let until = tokio::time::Instant::now() + p.cfg.limits.header_timeout;
    if plain_http(&io, until).await {
        refuse_plain(io).await;
        return;
    }
    let handshake = tls.acceptor().accept(io);
    let stream = match tokio::time::timeout_at(until, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            match refused_certificate(&e) {
                Some(why) => note_refused_certificate(peer, why),
                None => tracing::debug!("TLS handshake with {peer} failed: {e}"),
            }
            return;
        }
        Err(_) => return,
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| client_cert_field(leaf));
    let seen = Seen::new();
    let io = TokioIo::new(Watched::new(stream, &seen));
    let svc = super::h2::service(p.clone(), peer, local, Via::Tls(cert), seen.clone());
    let idle = p.cfg.limits.idle_timeout;
    if h2 {
        let conn = super::h2::http2_server(&p).serve_connection(io, svc);
        serve_gracefully!(conn, stop, seen, idle, None);
    } else {
        // The header time-out is `idle::watch`'s (hyper's also runs while idle).
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(p.cfg.limits.max_head.max(8192))
            .serve_connection(io, svc)
            .with_upgrades();
        let header = Some(p.cfg.limits.header_timeout);
        serve_gracefully!(conn, stop, seen, idle, header);
    }
}

/// Whether the client began with an HTTP method rather than a TLS record
/// (whose first byte is 22): `http://` sent to the TLS port. The listener
/// accepts once bytes have come, so the peek does not wait.
async fn plain_http(io: &TcpStream, until: tokio::time::Instant) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout_at(until, io.peek(&mut first)).await,
        Ok(Ok(1)) if first[0].is_ascii_uppercase()
    )
}

/// Answers a plain HTTP request on the TLS port as nginx does (`400 The
/// plain HTTP request was sent to HTTPS port`), where a TLS alert would
/// leave curl or a browser with an empty reply. What the client sent is
/// read first (and after, for a second), so that the close does not reset
/// the answer away.
async fn refuse_plain(mut io: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // On the heap: the connection's future stays as small for TLS clients.
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), io.read(&mut buf)).await;
    let _ = io.write_all(PLAIN_HTTP.as_bytes()).await;
    let _ = io.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(1..) = io.read(&mut buf).await {}
    })
    .await;
}

const PLAIN_HTTP: &str = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 51\r\nConnection: close\r\n\r\nThe plain HTTP request was sent to an HTTPS port.\r\n";

/// RFC 9440's `Client-Cert` value: the certificate's DER as a structured
/// field byte sequence (`:` base64 `:`). Only a certificate the verifier
/// accepted gets here (without `--tls-client-ca` clients send none).
fn client_cert_field(leaf: &CertificateDer<'_>) -> Option<hyper::header::HeaderValue> {
    use base64::Engine;
    let mut v = String::with_capacity(leaf.len() * 4 / 3 + 4);
    v.push(':');
    base64::engine::general_purpose::STANDARD.encode_string(leaf.as_ref(), &mut v);
    v.push(':');
    hyper::header::HeaderValue::from_str(&v).ok()
}

/// `--redirect-http`: answers every request with a `301` to the same host
/// and path over HTTPS on `https_port`, then closes. With `accept_proxy`,
/// the PROXY header of each connection it names is skipped first (the
/// address in it is of no use here).
pub async fn redirect(
    listener: tokio::net::TcpListener,
    https_port: u16,
    accept_proxy: crate::config::AcceptProxy,
) {
    loop {
        let Ok((io, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let accept_proxy = accept_proxy.expects(peer.ip());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                redirect_one(io, https_port, accept_proxy),
            )
            .await;
        });
    }
}

async fn redirect_one(
    mut io: TcpStream,
    https_port: u16,
    mut accept_proxy: bool,
) -> std::io::Result<()> {
    use super::proxy_protocol::{Parsed, parse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 8192];
    let (mut start, mut len) = (0, 0);
    let answer = loop {
        let n = io.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        if accept_proxy {
            match parse(&buf[..len]) {
                Ok(Parsed::More) => continue,
                Ok(Parsed::Header { len: header, .. }) => (start, accept_proxy) = (header, false),
                // Closed unanswered, as the main listener closes it.
                Err(_) => return Ok(()),
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[start..len]) {
            Ok(httparse::Status::Complete(_)) => break redirect_answer(&req, https_port),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => break BAD_REQUEST.to_string(),
        }
    };
    io.write_all(answer.as_bytes()).await?;
    io.shutdown().await
}

const BAD_REQUEST: &str =
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n";

/// The `301` for a parsed request: `https://HOST[:PORT]PATH`.
fn redirect_answer(req: &httparse::Request<'_, '_>, https_port: u16) -> String {
    let host = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        });
    let path = req.path.unwrap_or("/");
    let (Some(host), true) = (host, path.starts_with('/')) else {
        return BAD_REQUEST.to_string();
    };
    // The host without its port ([v6] kept whole).
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    let location = if https_port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{https_port}{path}")
    };
    format!(
        "HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(raw: &str, port: u16) -> String {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(raw.as_bytes()).unwrap();
        redirect_answer(&req, port)
    }

    #[test]
    fn redirects_keep_host_and_path_and_refuse_odd_hosts() {
        let a = answer("GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n", 443);
        assert!(a.contains("Location: https://example.com/a?b=1\r\n"), "{a}");
        let a = answer("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", 8443);
        assert!(a.contains("Location: https://[::1]:8443/\r\n"), "{a}");
        let a = answer("GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", 443);
        assert!(a.contains("Location: https://[::1]/\r\n"), "{a}");
        for bad in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: evil.com/x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\"b\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(answer(bad, 443).starts_with("HTTP/1.1 400"), "{bad}");
        }
    }
}
