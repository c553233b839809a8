//! Kills worker process groups when the master dies, even by `kill -9`.
//!
//! A worker's own process gets SIGKILL from the kernel when the master dies
//! (parent-death signal, see `sys`), but its children — `npm start` runs
//! `sh` which runs `node` — do not. The guardian is a tiny `herd __guard`
//! process, in a process group of its own, that learns each worker's group
//! over a pipe and, when the pipe closes because the master is gone,
//! SIGKILLs every group it still knows.

use std::collections::BTreeSet;
use std::io::PipeWriter;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The master's handle on its guardian.
pub struct Guardian {
    child: Option<(Child, PipeWriter)>,
    groups: BTreeSet<u32>,
}

impl Guardian {
    pub fn spawn() -> std::io::Result<Guardian> {
        let mut g = Guardian {
            child: None,
            groups: BTreeSet::new(),
        };
        g.respawn()?;
        Ok(g)
    }

    fn respawn(&mut self) -> std::io::Result<()> {
        if let Some((mut c, _)) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The groups go into the pipe before the guardian exists: a master
        // killed the moment a new guardian runs still leaves them in it.
        let (reader, mut stdin) = std::io::pipe()?;
        let mut known = String::new();
        for g in &self.groups {
            known.push_str(&format!("+{g}\n"));
        }
        stdin.write_all(known.as_bytes())?;
        // /proc/self/exe still works when the binary was replaced on disk.
        let child = Command::new("/proc/self/exe")
            .arg("__guard")
            .stdin(Stdio::from(reader))
            .process_group(0)
            .spawn()?;
        self.child = Some((child, stdin));
        Ok(())
    }

    /// Its pid, so that it is not taken for an adopted child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|(c, _)| c.id())
    }

    pub fn watch(&mut self, pgid: u32) {
        self.groups.insert(pgid);
        self.send(&format!("+{pgid}\n"));
    }

    pub fn forget(&mut self, pgid: u32) {
        self.groups.remove(&pgid);
        self.send(&format!("-{pgid}\n"));
    }

    /// Starts another guardian if someone killed this one (on each SIGCHLD
    /// and tick): until the next worker start it would otherwise sit as a
    /// zombie, and a master killed meanwhile would leave its workers'
    /// children behind.
    pub fn check(&mut self) {
        let dead = match &mut self.child {
            Some((c, _)) => !matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        if dead {
            tracing::warn!("the guardian process died; starting a new one");
            if let Err(e) = self.respawn() {
                tracing::error!("cannot restart the guardian process: {e}");
            }
        }
    }

    fn send(&mut self, line: &str) {
        let ok = match &mut self.child {
            Some((_, stdin)) => stdin.write_all(line.as_bytes()).is_ok(),
            None => false,
        };
        if !ok {
            // Killed by someone: start another, told every group still alive.
            tracing::warn!("the guardian process died; starting a new one");
            if let Err(e) = self.respawn() {
                tracing::error!("cannot restart the guardian process: {e}");
            }
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        // Closing its stdin lets the guardian kill what is left, then exit.
        if let Some((mut child, stdin)) = self.child.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// `herd __guard`: reads `+PGID` / `-PGID` lines until EOF, then SIGKILLs
/// every group still listed.
pub fn run() -> i32 {
    // Its job is to outlive the master: only the pipe's end (or SIGKILL)
    // ends it. A `pkill herd` stops the master, whose exit closes the pipe.
    use Signal::*;
    let _ = crate::os::sys::clear_signal_mask();
    crate::os::sys::ignore_signals(&[
        SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO,
        SIGPWR, SIGXCPU, SIGXFSZ, SIGSTKFLT, SIGSYS, SIGTRAP, SIGABRT, SIGPIPE,
    ]);
    let mut groups = BTreeSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, n) = line.split_at(line.len().min(1));
        let Ok(pgid) = n.parse::<i32>() else { continue };
        match op {
            "+" if pgid > 1 => {
                groups.insert(pgid);
            }
            "-" => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    for g in groups {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    0
}
