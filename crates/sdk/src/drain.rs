//! Letting keep-alive clients go without an error when the worker stops.
//!
//! A server that closes its idle keep-alive connections the moment it
//! stops races its clients: one may be sending its next request on a
//! connection just as it closes, and gets a reset. HAProxy's soft stop
//! answers that race, and so does this: once draining, every answer says
//! `Connection: close` (the client closes after it, cleanly), and only a
//! connection still idle after a grace is closed by the server.
//!
//! ```no_run
//! let drain = herd_sdk::Drain::new();
//! // On SIGTERM: stop accepting, then
//! drain.start();
//! // When writing each answer:
//! if drain.close_after_answer() { /* add `Connection: close` */ }
//! // For each idle connection, once `drain.close_idle_now()`: close it.
//! ```

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle connection is kept once draining (fd modes).
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// A worker's drain state, shared by its connections (cheap to clone).
#[derive(Clone, Debug)]
pub struct Drain(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    since: OnceLock<Instant>,
    grace: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    /// With [`IDLE_GRACE`], or none in proxy mode: there herd itself is the
    /// only client, stops sending to a worker before it stops it, and
    /// retries a pooled connection that closes.
    pub fn new() -> Drain {
        let proxy = std::env::var(crate::env::MODE).is_ok_and(|m| m == "proxy");
        Drain::with_grace(if proxy { Duration::ZERO } else { IDLE_GRACE })
    }

    pub fn with_grace(grace: Duration) -> Drain {
        Drain(Arc::new(Inner {
            since: OnceLock::new(),
            grace,
        }))
    }

    /// Starts draining (the first call counts).
    pub fn start(&self) {
        let _ = self.0.since.set(Instant::now());
    }

    pub fn is_draining(&self) -> bool {
        self.0.since.get().is_some()
    }

    /// Whether the answer being written should say `Connection: close`.
    pub fn close_after_answer(&self) -> bool {
        self.is_draining()
    }

    /// When idle connections are to be closed, once draining.
    pub fn idle_deadline(&self) -> Option<Instant> {
        self.0.since.get().map(|t| *t + self.0.grace)
    }

    /// Whether an idle connection should be closed now.
    pub fn close_idle_now(&self) -> bool {
        self.idle_deadline().is_some_and(|d| Instant::now() >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_close_once_draining_and_idle_connections_after_the_grace() {
        let d = Drain::with_grace(Duration::from_secs(3600));
        assert!(!d.close_after_answer() && !d.close_idle_now());
        assert_eq!(d.idle_deadline(), None);
        let before = Instant::now();
        d.clone().start();
        assert!(d.close_after_answer(), "clones share the state");
        assert!(!d.close_idle_now(), "not within the grace");
        let deadline = d.idle_deadline().expect("draining");
        assert!(deadline >= before + Duration::from_secs(3600));
        d.start();
        assert_eq!(d.idle_deadline(), Some(deadline), "the first start counts");

        let now = Drain::with_grace(Duration::ZERO);
        now.start();
        assert!(now.close_idle_now());
    }
}
