//! Telling a listening socket nobody accepts from from a busy one, in the
//! fd modes, where the workers accept and herd only holds the socket: the
//! accept queue, sampled once a second, never empties and never shrinks
//! for [`AFTER`]. Only an `accept` takes a connection off the queue (one
//! whose client gave up stays on it), so a queue that never shrinks has
//! had no accept, or as many arrivals as accepts with no let-up; either
//! way clients wait. Pure: the driver passes the time and the samples.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long the queue must stay non-empty and not shrink.
pub const AFTER: Duration = Duration::from_secs(5);

/// One listening socket's recent accept queue.
#[derive(Debug, Default)]
pub struct Stall {
    /// Since when, and its length at the last sample.
    since: Option<(Instant, u32)>,
    /// Said once for this stall; again only after the queue moved.
    said: bool,
}

impl Stall {
    /// Takes a sample; `Some(queued)` the first time the stall has lasted
    /// [`AFTER`].
    pub fn observe(&mut self, now: Instant, queued: u32) -> Option<u32> {
        match self.since {
            _ if queued == 0 => {
                *self = Stall::default();
                None
            }
            Some((t, last)) if queued >= last => {
                self.since = Some((t, queued));
                let due = !self.said && now.saturating_duration_since(t) >= AFTER;
                self.said |= due;
                due.then_some(queued)
            }
            // First sample, or one was accepted: start again from here.
            _ => {
                self.since = Some((now, queued));
                self.said = false;
                None
            }
        }
    }
}

/// The log line for a stalled socket (`slot`: a reuseport worker's own)
/// while workers listen on ports of their own (`elsewhere`, not empty).
pub fn message(
    listen: SocketAddr,
    slot: Option<usize>,
    queued: u32,
    mode: &str,
    elsewhere: &[(usize, Vec<SocketAddr>)],
) -> String {
    let on = match slot {
        Some(s) => format!("worker {s}'s socket for {listen}"),
        None => listen.to_string(),
    };
    let n = crate::console::count(queued as usize, "connection");
    let mut m = format!("{n} waited on {on} for {AFTER:?} or more, and ");
    let workers: Vec<String> = elsewhere
        .iter()
        .map(|(slot, addrs)| {
            let shown = crate::os::sockets::shown(addrs);
            format!("worker {slot} listens on {shown}")
        })
        .collect();
    m.push_str(&workers.join(", "));
    m.push_str(&format!(
        ". In {mode} mode a worker must accept on the socket herd passes as fd 3 (LISTEN_FDS=1; \
         gunicorn does by itself, uvicorn needs --fd 3); for a server that binds its own port, use --mode proxy"
    ));
    m
}

#[cfg(test)]
mod tests {
    use super::{AFTER, Stall, message};
    use std::time::{Duration, Instant};

    fn run(samples: &[u32]) -> Vec<Option<u32>> {
        let t0 = Instant::now();
        let mut s = Stall::default();
        let sec = |i: usize| t0 + Duration::from_secs(i as u64);
        samples
            .iter()
            .enumerate()
            .map(|(i, &q)| s.observe(sec(i), q))
            .collect()
    }

    #[test]
    fn a_queue_that_never_shrinks_is_reported_once() {
        assert_eq!(AFTER, Duration::from_secs(5));
        let got = run(&[1, 1, 2, 2, 3, 3, 4, 9]);
        assert_eq!(got[..5], [None; 5]);
        assert_eq!(got[5], Some(3), "five seconds after the first sample");
        assert_eq!(got[6..], [None, None], "said once");
    }

    #[test]
    fn a_queue_that_empties_or_shrinks_is_a_busy_one() {
        // Busy: connections come and go, the queue dips now and then.
        let got = run(&[3, 5, 4, 6, 7, 2, 8, 9, 9, 1, 3]);
        assert!(got.iter().all(Option::is_none), "{got:?}");
        let got = run(&[1, 1, 1, 0, 1, 1, 1, 1, 1]);
        assert!(got.iter().all(Option::is_none), "{got:?}");
        assert!(run(&[0; 10]).iter().all(Option::is_none));
    }

    #[test]
    fn a_stall_that_moved_and_stalled_again_is_reported_again() {
        let got = run(&[2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1]);
        assert_eq!(got[5], Some(2));
        assert_eq!(got[11], Some(1));
        assert_eq!(got.iter().flatten().count(), 2);
    }

    #[test]
    fn the_message_names_the_socket_and_the_ports_of_their_own() {
        let listen = "0.0.0.0:8000".parse().unwrap();
        let own = vec![(0, vec!["0.0.0.0:9000".parse().unwrap()])];
        let m = message(listen, None, 3, "shared", &own);
        assert!(
            m.starts_with("3 connections waited on 0.0.0.0:8000 for 5s or more, and worker 0 listens on 0.0.0.0:9000. In shared mode"),
            "{m}"
        );
        assert!(m.ends_with("use --mode proxy"), "{m}");
        let own = vec![(1, vec!["127.0.0.1:9000".parse().unwrap()])];
        let m = message(listen, Some(1), 2, "reuseport", &own);
        assert!(m.contains("on worker 1's socket for 0.0.0.0:8000"), "{m}");
    }
}
