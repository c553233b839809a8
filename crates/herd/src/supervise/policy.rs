//! What to do when a worker's life ends: restart it now, restart it after
//! a back-off, or give up on a crash loop. Pure: the supervisor tells it
//! how the worker ended and how long it ran (time is passed in), and
//! carries out the decision; this module forks, signals and sleeps nothing.
//!
//! The rules, as under PM2: a worker that ran at least `min_uptime` comes
//! back at once and clears its slot's record. One that ends sooner (or was
//! never ready, or could not be started) is a quick exit: it comes back
//! after `restart_delay`, doubled with each quick exit in a row up to
//! `max_restart_delay`, and one more than `max_restarts` in a row is a crash
//! loop, which stops the cluster. With `--autorestart=false` (PM2's
//! `autorestart: false`) an ended worker stays down; with
//! `--stop-exit-codes` (PM2's `stop_exit_codes`), one that exits with one
//! of those codes does.

use std::time::Duration;

/// The restart settings (`--restart-delay`, `--max-restart-delay`,
/// `--max-restarts`, `--min-uptime`, and `--ready-timeout` for messages).
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub min_uptime: Duration,
    pub restart_delay: Duration,
    pub max_restart_delay: Duration,
    pub max_restarts: u32,
    pub ready_timeout: Duration,
    /// `false` (`--autorestart=false`): an ended worker stays down.
    pub autorestart: bool,
    /// `--stop-exit-codes`: a worker that exits with one of these stays down.
    pub stop_exit_codes: crate::config::ExitCodes,
}

/// How a worker's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Its process exited (`how`: "exited with status 1", "was killed by
    /// signal SIGSEGV"…) after running `ran`; `code`: its exit code, if it
    /// exited rather than died of a signal.
    Exited {
        ran: Duration,
        how: String,
        code: Option<i32>,
    },
    /// It was killed for not being ready within the ready time-out.
    NotReady,
    /// It could not be started at all (`why`: the error).
    SpawnFailed { why: String },
}

/// One slot's quick exits in a row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    quick_exits: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the slot's worker again after this delay.
    Restart { after: Duration },
    /// Stop the cluster; `message` names the cause and what to change.
    CrashLoop { message: String },
    /// Leave the slot empty (`why`: the setting that says so).
    StayDown { why: &'static str },
}

impl RestartPolicy {
    /// Decides what follows `ending` for a slot with `record`, which it updates.
    pub fn on_end(&self, slot: usize, record: &mut Record, ending: &Ending) -> Decision {
        if !self.autorestart {
            return Decision::StayDown {
                why: "--autorestart=false",
            };
        }
        if let Ending::Exited { code: Some(c), .. } = ending
            && self.stop_exit_codes.contains(*c)
        {
            return Decision::StayDown {
                why: "--stop-exit-codes",
            };
        }
        let quick = match ending {
            Ending::Exited { ran, .. } => *ran < self.min_uptime,
            Ending::NotReady | Ending::SpawnFailed { .. } => true,
        };
        if !quick {
            record.quick_exits = 0;
            return Decision::Restart {
                after: Duration::ZERO,
            };
        }
        record.quick_exits += 1;
        let n = record.quick_exits;
        if n > self.max_restarts {
            return Decision::CrashLoop {
                message: self.crash_loop_message(slot, n, ending),
            };
        }
        let after = self
            .restart_delay
            .saturating_mul(1u32 << (n - 1).min(20))
            .min(self.max_restart_delay);
        Decision::Restart { after }
    }

    /// The cause, in one line, with the setting that would change it.
    fn crash_loop_message(&self, slot: usize, n: u32, last: &Ending) -> String {
        match last {
            Ending::Exited { how, .. } => format!(
                "crash loop: worker {slot} exited {n} times in a row, each within {:?} of starting (last: {how}); giving up. Fix the program, or raise --max-restarts / lower --min-uptime",
                self.min_uptime
            ),
            Ending::NotReady => format!(
                "crash loop: worker {slot} was not ready within {:?}, {n} times in a row; giving up. Check that it listens (or sends READY=1 with --wait-ready), or raise --ready-timeout; a program that serves no port (a queue consumer, a scheduler) runs with --mode fork",
                self.ready_timeout
            ),
            Ending::SpawnFailed { why } => format!(
                "crash loop: worker {slot} could not be started {n} times in a row (last: {why}); giving up"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> RestartPolicy {
        RestartPolicy {
            min_uptime: 1000 * MS,
            restart_delay: 100 * MS,
            max_restart_delay: 1000 * MS,
            max_restarts: 5,
            ready_timeout: 2000 * MS,
            autorestart: true,
            stop_exit_codes: crate::config::ExitCodes::default(),
        }
    }

    fn crash(ran_ms: u32) -> Ending {
        Ending::Exited {
            ran: ran_ms * MS,
            how: "exited with status 1".into(),
            code: Some(1),
        }
    }

    #[test]
    fn quick_exits_back_off_doubling_up_to_the_cap() {
        let p = policy();
        let mut r = Record::default();
        let delays: Vec<_> = (0..5)
            .map(|_| match p.on_end(0, &mut r, &crash(10)) {
                Decision::Restart { after } => after,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS]);
    }

    #[test]
    fn one_more_than_max_restarts_in_a_row_is_a_crash_loop() {
        let p = policy();
        let mut r = Record::default();
        for _ in 0..5 {
            assert!(matches!(
                p.on_end(3, &mut r, &crash(10)),
                Decision::Restart { .. }
            ));
        }
        let Decision::CrashLoop { message } = p.on_end(3, &mut r, &crash(10)) else {
            panic!("no crash loop")
        };
        assert!(
            message.contains("worker 3 exited 6 times in a row"),
            "{message}"
        );
        assert!(message.contains("each within 1s") && message.contains("--min-uptime"));
    }

    #[test]
    fn a_worker_that_ran_min_uptime_comes_back_at_once_and_clears_the_record() {
        let p = policy();
        let mut r = Record::default();
        for _ in 0..5 {
            p.on_end(0, &mut r, &crash(10));
        }
        // Exactly min-uptime counts as a worker that ran.
        assert_eq!(
            p.on_end(0, &mut r, &crash(1000)),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        assert_eq!(r, Record::default());
        assert_eq!(
            p.on_end(0, &mut r, &crash(10)),
            Decision::Restart { after: 100 * MS },
            "the back-off starts over"
        );
    }

    #[test]
    fn a_worker_never_ready_is_a_quick_exit_named_as_such() {
        // It may have run past --min-uptime while not ready: the message
        // must not blame --min-uptime (issue 18, item 3).
        let p = RestartPolicy {
            max_restarts: 1,
            ..policy()
        };
        let mut r = Record::default();
        assert_eq!(
            p.on_end(1, &mut r, &Ending::NotReady),
            Decision::Restart { after: 100 * MS }
        );
        let Decision::CrashLoop { message } = p.on_end(1, &mut r, &Ending::NotReady) else {
            panic!("no crash loop")
        };
        assert!(
            message.contains("was not ready within 2s, 2 times"),
            "{message}"
        );
        assert!(message.contains("--ready-timeout") && !message.contains("--min-uptime"));
    }

    #[test]
    fn without_autorestart_every_ending_stays_down() {
        let p = RestartPolicy {
            autorestart: false,
            ..policy()
        };
        let mut r = Record::default();
        for ending in [
            Ending::Exited {
                ran: 5000 * MS,
                how: "exited with code 0".into(),
                code: Some(0),
            },
            Ending::Exited {
                ran: MS,
                how: "exited with code 1".into(),
                code: Some(1),
            },
            Ending::NotReady,
        ] {
            assert_eq!(
                p.on_end(0, &mut r, &ending),
                Decision::StayDown {
                    why: "--autorestart=false"
                }
            );
        }
    }

    #[test]
    fn a_stop_exit_code_stays_down_and_the_others_restart() {
        let p = RestartPolicy {
            stop_exit_codes: crate::config::ExitCodes::of(&[0, 3, 255]),
            ..policy()
        };
        let mut r = Record::default();
        let ended = |code: Option<i32>| Ending::Exited {
            ran: 5000 * MS,
            how: "exited".into(),
            code,
        };
        for code in [0, 3, 255] {
            assert_eq!(
                p.on_end(0, &mut r, &ended(Some(code))),
                Decision::StayDown {
                    why: "--stop-exit-codes"
                }
            );
        }
        // Another code, a signal (no code), or a code out of range restart.
        for code in [Some(1), Some(64), None, Some(-1), Some(256)] {
            assert_eq!(
                p.on_end(0, &mut r, &ended(code)),
                Decision::Restart {
                    after: Duration::ZERO
                },
                "{code:?}"
            );
        }
    }

    #[test]
    fn start_failures_count_too() {
        let p = RestartPolicy {
            max_restarts: 0,
            ..policy()
        };
        let mut r = Record::default();
        let why = "cannot execute ./app: Permission denied".to_string();
        let Decision::CrashLoop { message } =
            p.on_end(0, &mut r, &Ending::SpawnFailed { why: why.clone() })
        else {
            panic!("no crash loop")
        };
        assert!(message.contains(&why), "{message}");
    }
}
