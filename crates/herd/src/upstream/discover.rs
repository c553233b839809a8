//! Backends from DNS (`--upstream-dns NAME:PORT`, `--upstream-srv
//! _svc._tcp.NAME`), as Kubernetes headless services and Consul serve
//! them: resolved at start and again when the answers' TTL runs out
//! (bounded to [`MIN_WAIT`]..[`MAX_WAIT`]), so backends join and leave the
//! pool without a reload. A lookup that fails or comes back empty keeps its
//! last good answer. Resolution runs on the supervisor's runtime; the
//! request path only ever sees the published pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;

use super::{Dialect, Upstreams};
use crate::config::Discovery;
use herd_balance::BackendConfig;

/// Answers are asked for again no sooner than this, whatever their TTL.
pub const MIN_WAIT: Duration = Duration::from_secs(1);
/// …and no later than this.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Address, the name it was found under, its parameters, how to speak to it.
type Found = Vec<(SocketAddr, String, BackendConfig, Dialect)>;

/// Resolves `lookups` until the master ends, publishing what they give.
pub async fn run(up: Arc<Upstreams>, lookups: Vec<Discovery>, server: Option<SocketAddr>) {
    let builder = match server {
        Some(addr) => {
            let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                TokioConnectionProvider::default(),
            )
        }
        None => match Resolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cannot read /etc/resolv.conf for --upstream-dns: {e}");
                return;
            }
        },
    };
    let mut builder = builder;
    let opts = builder.options_mut();
    // A server that went away is noticed in seconds, and an answer is not
    // kept past our own bound.
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    opts.positive_max_ttl = Some(MAX_WAIT);
    opts.negative_max_ttl = Some(MIN_WAIT);
    let resolver = builder.build();
    let via = server.map_or("the resolvers of /etc/resolv.conf".to_string(), |a| {
        format!("{a} (--resolver)")
    });
    for l in &lookups {
        tracing::info!("discovering backends: {} through {via}", shown(l));
    }
    // Each lookup's last good answer, kept when a later one fails.
    let mut last: Vec<Option<Found>> = vec![None; lookups.len()];
    let mut failing = vec![false; lookups.len()];
    loop {
        let mut next = Instant::now() + MAX_WAIT;
        for (i, l) in lookups.iter().enumerate() {
            match resolve(&resolver, l).await {
                Ok((found, until)) if !found.is_empty() => {
                    if failing[i] {
                        tracing::info!("{}: answered again", shown(l));
                        failing[i] = false;
                    }
                    last[i] = Some(found);
                    next = next.min(until);
                }
                outcome => {
                    let why = match outcome {
                        Ok(_) => "no address in the answer".to_string(),
                        Err(e) => e,
                    };
                    if !failing[i] {
                        tracing::warn!(
                            "{}: {why}; keeping the {} backends it gave last",
                            shown(l),
                            last[i].as_ref().map_or(0, Vec::len)
                        );
                        failing[i] = true;
                    }
                    next = next.min(Instant::now() + MIN_WAIT);
                }
            }
        }
        let all: Found = last.iter().flatten().flatten().cloned().collect();
        let (came, went) = up.set_found(all);
        if came + went > 0 {
            tracing::info!("DNS: {came} backends came, {went} went");
        }
        let now = Instant::now();
        let wait = next
            .saturating_duration_since(now)
            .clamp(MIN_WAIT, MAX_WAIT);
        tokio::time::sleep(wait).await;
    }
}

fn shown(l: &Discovery) -> String {
    match l.port {
        Some(p) => format!("{}:{p} (A/AAAA)", l.name),
        None => format!("{} (SRV)", l.name),
    }
}

/// One lookup's backends, and when its answer stops being valid.
async fn resolve(
    r: &Resolver<TokioConnectionProvider>,
    l: &Discovery,
) -> Result<(Found, Instant), String> {
    let name = fqdn(&l.name);
    if let Some(port) = l.port {
        let ips = r
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let until = ips.valid_until();
        let found = ips
            .iter()
            .map(|ip| {
                (
                    SocketAddr::new(ip, port),
                    l.name.clone(),
                    l.config.clone(),
                    Dialect::of(l, &l.name),
                )
            })
            .collect();
        return Ok((dedup(found), until));
    }
    let srv = r
        .srv_lookup(name.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let mut until = srv.as_lookup().valid_until();
    let best = srv.iter().map(|s| s.priority()).min().unwrap_or(0);
    let mut found = Vec::new();
    for s in srv.iter() {
        let target = s.target().to_utf8();
        let ips = r
            .lookup_ip(target.as_str())
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        until = until.min(ips.valid_until());
        let mut cfg = l.config.clone();
        // SRV weights are relative shares, 0 meaning "rarely": at least 1.
        cfg.weight = cfg.weight.max(1) * u32::from(s.weight().max(1));
        cfg.backup = cfg.backup || s.priority() > best;
        for ip in ips.iter() {
            found.push((
                SocketAddr::new(ip, s.port()),
                l.name.clone(),
                cfg.clone(),
                Dialect::of(l, target.trim_end_matches('.')),
            ));
        }
    }
    Ok((dedup(found), until))
}

/// A name as asked: absolute (no search domains) when it has a dot.
fn fqdn(name: &str) -> String {
    if name.contains('.') && !name.ends_with('.') {
        format!("{name}.")
    } else {
        name.to_string()
    }
}

/// Sorted by address, once each: every front herd then lists the same
/// backends in the same order.
fn dedup(mut v: Found) -> Found {
    v.sort_by_key(|a| a.0);
    v.dedup_by(|a, b| a.0 == b.0);
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_with_a_dot_are_asked_as_absolute() {
        assert_eq!(super::fqdn("api.internal"), "api.internal.");
        assert_eq!(super::fqdn("api.internal."), "api.internal.");
        assert_eq!(super::fqdn("api"), "api");
    }
}
