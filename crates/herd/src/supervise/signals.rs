//! The master's signals: which stop it, and which it only logs.
//!
//! SIGUSR2 upgrades herd in place (`herd upgrade`), as nginx's binary upgrade;
//! SIGUSR1 reopens the log files, as nginx's does.
//! Every signal whose default action would end the process is either used
//! or caught and logged: a stray `kill -USR2` (PM2 users send it by habit)
//! must not take a cluster down and leave its run directory behind. They
//! are caught with a handler, not set to `SIG_IGN`, because an ignored
//! disposition survives `exec` into every worker and a handler does not.
//! Faults the process raises on itself (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
//! SIGABRT, SIGTRAP, SIGSYS) keep their default: they mean a bug, not a
//! message.

use std::task::{Context, Poll, Waker};

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Whether `sig` arrived and was not yet taken, without waiting.
fn arrived(sig: &mut Signal) -> bool {
    matches!(
        sig.poll_recv(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Some(()))
    )
}

/// Signals that stop the cluster gracefully; a second one stops it at once.
pub struct StopSignals {
    int: Signal,
    term: Signal,
    quit: Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// Waits for the next stop signal; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }

    /// A stop signal that arrived and was not taken, if any.
    pub fn arrived(&mut self) -> Option<&'static str> {
        [
            (&mut self.int, "SIGINT"),
            (&mut self.term, "SIGTERM"),
            (&mut self.quit, "SIGQUIT"),
        ]
        .into_iter()
        .find_map(|(s, name)| arrived(s).then_some(name))
    }
}

/// The signals that operate a running cluster: SIGHUP reloads, SIGTTIN
/// and SIGTTOU scale by one, SIGUSR2 upgrades herd in place.
pub struct OpSignals {
    pub hup: Signal,
    pub ttin: Signal,
    pub ttou: Signal,
    pub usr2: Signal,
}

impl OpSignals {
    pub fn new() -> std::io::Result<OpSignals> {
        Ok(OpSignals {
            hup: signal(SignalKind::hangup())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Those that arrived and were not acted on (during an upgrade), by
    /// name: each kind once, as the kernel merges a kind's arrivals.
    pub fn arrived(&mut self) -> Vec<&'static str> {
        [
            (&mut self.hup, "SIGHUP"),
            (&mut self.ttin, "SIGTTIN"),
            (&mut self.ttou, "SIGTTOU"),
            (&mut self.usr2, "SIGUSR2"),
        ]
        .into_iter()
        .filter_map(|(s, name)| arrived(s).then_some(name))
        .collect()
    }
}

/// Every signal the master catches. A handler does not survive `exec`:
/// until the upgraded master has its own, each would act by its default
/// (most end the process; SIGTTIN and SIGTTOU stop it). So `herd upgrade`
/// blocks them before its exec, they wait pending, and the new master
/// unblocks them once it has its handlers.
pub fn caught() -> Vec<libc::c_int> {
    let mut v = vec![
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ];
    v.extend(unused().into_iter().map(|(n, _)| n));
    v
}

/// Signals herd has no use for, by number and name.
fn unused() -> Vec<(libc::c_int, String)> {
    let mut v: Vec<(libc::c_int, String)> = [
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGSTKFLT, "SIGSTKFLT"),
        (libc::SIGXCPU, "SIGXCPU"),
        // Caught, a write past RLIMIT_FSIZE fails with EFBIG instead.
        (libc::SIGXFSZ, "SIGXFSZ"),
        // Sent by `kill`, these would dump core. One the kernel raises for
        // a real cause (seccomp's SECCOMP_RET_TRAP, a breakpoint) is forced
        // through when caught or not, and `abort()` raises SIGABRT again
        // with the default action after a handler returns. SIGSEGV, SIGBUS,
        // SIGILL and SIGFPE keep their default: a handler that returns from
        // a real fault would run the faulting instruction again, forever.
        (libc::SIGSYS, "SIGSYS"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGABRT, "SIGABRT"),
    ]
    .into_iter()
    .map(|(n, s)| (n, s.to_string()))
    .collect();
    let (lo, hi) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    v.extend((lo..=hi).map(|n| (n, format!("SIGRTMIN+{}", n - lo))));
    v
}

/// SIGUSR1 reopens the log files at their paths (after logrotate moved
/// them; herd also notices a moved file by itself within a second).
pub fn reopen_logs_on_usr1() {
    match signal(SignalKind::user_defined1()) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    crate::logfile::reopen_all();
                    tracing::info!("SIGUSR1 received: log files reopened");
                }
            });
        }
        Err(e) => tracing::warn!("cannot catch SIGUSR1: {e}"),
    }
}

/// Catches every signal in [`unused`] and logs each arrival. Must run
/// inside the tokio runtime; a signal that cannot be caught is reported
/// and left alone rather than stopping the start.
pub fn log_unused() {
    for (n, name) in unused() {
        match signal(SignalKind::from_raw(n)) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        tracing::warn!("{name} received: herd does not use it; ignored");
                    }
                });
            }
            Err(e) => tracing::debug!("cannot catch {name}: {e}"),
        }
    }
}
