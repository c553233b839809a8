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

use tokio::signal::unix::{Signal, SignalKind, signal};

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
