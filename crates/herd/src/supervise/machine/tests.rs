//! The machine on a fake clock: every time is `t0` plus milliseconds.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn limits() -> Limits {
    Limits {
        restart: RestartPolicy {
            min_uptime: 1000 * MS,
            restart_delay: 100 * MS,
            max_restart_delay: 1000 * MS,
            max_restarts: 5,
            ready_timeout: 2000 * MS,
            autorestart: true,
            stop_exit_codes: crate::config::ExitCodes::default(),
        },
        drain_timeout: 3000 * MS,
        kill_timeout: 5000 * MS,
        watchdog: None,
        max_memory: None,
        not_ready_hint: "",
        stop_first: false,
    }
}

/// A machine and its clock; spawns are reported started with pid 1000+epoch.
struct H {
    m: Machine,
    t0: Instant,
    now: Instant,
}

impl H {
    fn new(n: usize, limits: Limits) -> H {
        let t0 = Instant::now();
        H {
            m: Machine::new(n, limits),
            t0,
            now: t0,
        }
    }

    /// A cluster of `n` whose workers are all serving; returns their epochs.
    fn serving(n: usize, limits: Limits) -> (H, Vec<Epoch>) {
        let mut h = H::new(n, limits);
        let epochs: Vec<_> = spawns(&h.on(Input::Start)).iter().map(|s| s.1).collect();
        for &e in &epochs {
            h.on(Input::Ready { epoch: e });
        }
        (h, epochs)
    }

    fn at(&mut self, ms: u64) -> &mut H {
        self.now = self.t0 + Duration::from_millis(ms);
        self
    }

    fn ms(&self, t: Instant) -> u64 {
        t.duration_since(self.t0).as_millis() as u64
    }

    fn on(&mut self, input: Input) -> Vec<Action> {
        let mut out = self.m.on(input, self.now);
        let started: Vec<_> = spawns(&out)
            .into_iter()
            .map(|(_, epoch)| Input::Started {
                epoch,
                pid: 1000 + epoch as u32,
            })
            .collect();
        for s in started {
            out.extend(self.m.on(s, self.now));
        }
        out
    }

    fn timer(&mut self, ms: u64) -> Vec<Action> {
        self.at(ms).on(Input::Timer)
    }

    fn exit(&mut self, epoch: Epoch) -> Vec<Action> {
        self.on(Input::Exited {
            epoch,
            how: "exited with code 1".into(),
            code: Some(1),
        })
    }

    fn serving_epochs(&self) -> Vec<Epoch> {
        self.m.serving().map(|w| w.epoch).collect()
    }

    fn deadline(&self) -> Option<u64> {
        self.m.next_deadline().map(|t| self.ms(t))
    }
}

fn spawns(actions: &[Action]) -> Vec<(usize, Epoch)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { slot, epoch, .. } => Some((*slot, *epoch)),
            _ => None,
        })
        .collect()
}

fn has(actions: &[Action], a: &Action) -> bool {
    actions.contains(a)
}

fn crash_loop(actions: &[Action]) -> Option<&str> {
    actions.iter().find_map(|a| match a {
        Action::CrashLoop(m) => Some(m.as_str()),
        _ => None,
    })
}

#[test]
fn start_spawns_every_slot_and_says_all_ready_once() {
    let mut h = H::new(2, limits());
    let out = h.on(Input::Start);
    assert_eq!(spawns(&out), [(0, 1), (1, 2)]);
    assert_eq!(h.m.find(1).map(|w| w.pid), Some(1001));
    assert!(!has(&h.on(Input::Ready { epoch: 1 }), &Action::AllReady));
    let out = h.on(Input::Ready { epoch: 2 });
    assert!(has(&out, &Action::Publish) && has(&out, &Action::AllReady));
    assert_eq!(h.serving_epochs(), [1, 2]);
    // A second readiness signal of the same worker changes nothing.
    assert!(h.on(Input::Ready { epoch: 2 }).is_empty());
}

#[test]
fn quick_exits_restart_on_the_timer_with_a_doubling_back_off_up_to_the_cap() {
    let (mut h, e) = H::serving(1, limits());
    let mut epoch = e[0];
    let mut t = 0;
    for delay in [100, 200, 400, 800, 1000] {
        t += 10;
        let out = h.at(t).exit(epoch);
        assert!(has(&out, &Action::Forget { epoch }) && has(&out, &Action::Publish));
        assert!(spawns(&out).is_empty(), "not before the back-off");
        assert_eq!(h.deadline(), Some(t + delay));
        assert!(spawns(&h.timer(t + delay - 1)).is_empty());
        let out = h.timer(t + delay);
        let [(0, next)] = spawns(&out)[..] else {
            panic!("{out:?}")
        };
        epoch = next;
        t += delay;
        h.on(Input::Ready { epoch });
    }
}

/// `herd reset`: the slots' restart counts go back to 0; the counts by
/// cause (the metrics' counters) do not.
#[test]
fn reset_zeroes_the_slots_restart_counts_but_not_the_metrics() {
    let (mut h, e) = H::serving(1, limits());
    h.at(10).exit(e[0]);
    h.timer(110);
    assert_eq!(h.m.history(0).0, 1);
    let counted = |h: &H| h.m.restarts_by_cause().map(|(_, n)| n).sum::<u64>();
    assert_eq!(counted(&h), 1);
    h.m.reset_restarts();
    assert_eq!(h.m.history(0).0, 0);
    assert_eq!(counted(&h), 1);
}

#[test]
fn one_more_quick_exit_than_max_restarts_is_a_crash_loop() {
    let (mut h, e) = H::serving(1, limits());
    let mut epoch = e[0];
    let mut t = 0;
    for _ in 0..5 {
        t += 10;
        assert!(crash_loop(&h.at(t).exit(epoch)).is_none());
        t += 1000;
        epoch = spawns(&h.timer(t))[0].1;
    }
    let out = h.at(t + 10).exit(epoch);
    let msg = crash_loop(&out).expect("crash loop");
    assert!(msg.contains("worker 0 exited 6 times in a row"), "{msg}");
    assert_eq!(h.m.history(0).0, 6, "restarts counted");
}

#[test]
fn without_autorestart_ended_workers_stay_down_and_the_last_one_ends_the_cluster() {
    let mut l = limits();
    l.restart.autorestart = false;
    let (mut h, e) = H::serving(2, l);
    let out = h.at(5000).exit(e[0]);
    assert!(spawns(&out).is_empty() && h.deadline().is_none(), "{out:?}");
    assert!(!has(&out, &Action::AllEnded), "worker 1 still serves");
    assert_eq!(h.serving_epochs(), [e[1]]);
    assert_eq!(
        h.m.empty_slots().collect::<Vec<_>>(),
        [(0, 0, false)],
        "down for good"
    );
    let out = h.at(5010).exit(e[1]);
    assert!(
        spawns(&out).is_empty() && has(&out, &Action::AllEnded),
        "{out:?}"
    );
}

#[test]
fn an_empty_slot_is_told_apart_waiting_for_its_restart_or_stopped() {
    let (mut h, e) = H::serving(2, limits());
    assert_eq!(h.m.empty_slots().count(), 0);
    h.at(10).exit(e[1]);
    assert_eq!(
        h.m.empty_slots().collect::<Vec<_>>(),
        [(1, 0, true)],
        "a back-off runs"
    );
    h.timer(110);
    assert_eq!(h.m.empty_slots().count(), 0, "its successor is starting");
    // Stop-first: between a worker's exit and its successor's start.
    let (mut h, _) = H::serving(1, stop_first());
    h.at(10).on(Input::Restart);
    assert_eq!(h.m.empty_slots().collect::<Vec<_>>(), [(0, 0, true)]);
}

#[test]
fn a_worker_that_ran_min_uptime_comes_back_at_once() {
    let (mut h, e) = H::serving(1, limits());
    let out = h.at(1000).exit(e[0]);
    assert_eq!(spawns(&out), [(0, 2)]);
    assert_eq!(h.m.history(0), (1, Some("exited with code 1")));
}

#[test]
fn a_worker_not_ready_in_time_is_killed_and_its_exit_counts_as_never_ready() {
    let mut l = limits();
    l.restart.max_restarts = 0;
    let mut h = H::new(1, l);
    h.on(Input::Start);
    assert_eq!(h.deadline(), Some(2000));
    assert!(h.timer(1999).is_empty());
    assert_eq!(h.timer(2000), [Action::Kill { epoch: 1 }]);
    // Ready after the kill is too late.
    assert!(h.on(Input::Ready { epoch: 1 }).is_empty());
    let out = h.at(2100).exit(1);
    let msg = crash_loop(&out).expect("crash loop");
    assert!(msg.contains("not ready within 2s"), "{msg}");
}

#[test]
fn a_worker_that_cannot_start_counts_as_a_quick_exit() {
    let mut h = H::new(1, limits());
    h.m.on(Input::Start, h.now);
    let out = h.on(Input::SpawnFailed {
        epoch: 1,
        why: "cannot execute ./app".into(),
    });
    assert!(spawns(&out).is_empty());
    assert_eq!(h.deadline(), Some(100));
    assert_eq!(spawns(&h.timer(100)), [(0, 2)]);
}

#[test]
fn a_rolling_reload_replaces_one_slot_at_a_time_never_serving_fewer() {
    let (mut h, old) = H::serving(2, limits());
    let out = h.at(10).on(Input::Reload { slots: None });
    assert!(has(&out, &Action::ReloadBegun));
    assert!(has(
        &out,
        &Action::Progress("worker 0: new worker started (pid 1003)".into())
    ));
    assert_eq!(spawns(&out), [(0, 3)], "one slot at a time");
    assert!(h.m.reloading());

    let out = h.at(20).on(Input::Ready { epoch: 3 });
    assert!(has(&out, &Action::Publish) && has(&out, &Action::Drain { epoch: old[0] }));
    assert!(spawns(&out).is_empty(), "the old one must leave first");
    assert_eq!(h.serving_epochs(), [3, old[1]]);
    assert_eq!(
        h.at(30).on(Input::Drained { epoch: old[0] }),
        [Action::Terminate { epoch: old[0] }]
    );
    let out = h.at(40).exit(old[0]);
    assert_eq!(spawns(&out), [(1, 4)], "then the next slot");
    assert_eq!(h.m.history(0).0, 1, "the replacement counts as a restart");

    h.at(50).on(Input::Ready { epoch: 4 });
    h.on(Input::Drained { epoch: old[1] });
    let out = h.at(60).exit(old[1]);
    assert!(has(&out, &Action::ReloadDone { replaced: 2 }));
    assert!(!h.m.reloading());
    assert_eq!(h.serving_epochs(), [3, 4]);
}

fn stop_first() -> Limits {
    Limits {
        stop_first: true,
        ..limits()
    }
}

#[test]
fn stop_first_a_reload_stops_each_slots_worker_before_its_successor_starts() {
    let (mut h, old) = H::serving(2, stop_first());
    let out = h.at(10).on(Input::Reload { slots: None });
    assert!(
        spawns(&out).is_empty(),
        "not while the old one runs: {out:?}"
    );
    assert!(has(&out, &Action::Drain { epoch: old[0] }) && has(&out, &Action::Publish));
    assert_eq!(h.serving_epochs(), [old[1]], "the other slot serves on");
    h.at(20).on(Input::Drained { epoch: old[0] });
    let out = h.at(30).exit(old[0]);
    assert_eq!(spawns(&out), [(0, 3)], "once it has exited");
    assert_eq!(h.m.current(0).map(|w| w.epoch), Some(3));
    assert!(h.m.reloading());
    // The next slot waits for this one's successor to be ready.
    let out = h.at(40).on(Input::Ready { epoch: 3 });
    assert!(has(&out, &Action::Drain { epoch: old[1] }), "{out:?}");
    h.on(Input::Drained { epoch: old[1] });
    assert_eq!(spawns(&h.at(50).exit(old[1])), [(1, 4)]);
    let out = h.at(60).on(Input::Ready { epoch: 4 });
    assert!(has(&out, &Action::ReloadDone { replaced: 2 }), "{out:?}");
    assert_eq!(h.serving_epochs(), [3, 4]);
    assert_eq!(h.m.history(0).0, 1, "counted as a restart");
}

#[test]
fn stop_first_a_successor_that_fails_is_restarted_by_the_policy_and_ends_the_reload() {
    let (mut h, old) = H::serving(2, stop_first());
    h.at(10).on(Input::Reload {
        slots: Some(vec![1, 0]),
    });
    h.on(Input::Drained { epoch: old[1] });
    assert_eq!(spawns(&h.at(20).exit(old[1])), [(1, 3)]);
    let out = h.at(30).exit(3);
    assert!(out.iter().any(|a| matches!(a,
        Action::ReloadFailed(m) if m.contains("worker 1: the new worker exited with code 1") && m.contains("restarted as after a crash"))), "{out:?}");
    assert!(!h.m.reloading());
    assert_eq!(h.deadline(), Some(130), "the policy's back-off");
    assert_eq!(spawns(&h.timer(130)), [(1, 4)]);
    assert_eq!(h.serving_epochs(), [old[0]], "slot 0 was not reached");
}

#[test]
fn stop_first_a_restart_starts_each_successor_as_its_predecessor_exits() {
    let (mut h, old) = H::serving(2, stop_first());
    let out = h.at(10).on(Input::Restart);
    assert!(spawns(&out).is_empty(), "{out:?}");
    assert!(has(&out, &Action::Answer(Ok(Answer::Restarted(2)))));
    assert!(
        matches!(&h.on(Input::Reload { slots: None })[..], [Action::ReloadFailed(m)] if m.contains("still stopping")),
        "nothing else until they are back"
    );
    h.on(Input::Drained { epoch: old[1] });
    assert_eq!(spawns(&h.at(20).exit(old[1])), [(1, 3)]);
    h.on(Input::Drained { epoch: old[0] });
    assert_eq!(spawns(&h.at(30).exit(old[0])), [(0, 4)]);
    h.on(Input::Ready { epoch: 3 });
    h.on(Input::Ready { epoch: 4 });
    assert_eq!(h.serving_epochs(), [4, 3]);
    assert!(h.m.busy("reload").is_none());
}

#[test]
fn stop_first_a_stop_during_the_gap_starts_nothing() {
    let (mut h, old) = H::serving(1, stop_first());
    h.at(10).on(Input::Restart);
    h.on(Input::Stop);
    let out = h.at(20).exit(old[0]);
    assert!(spawns(&out).is_empty(), "{out:?}");
    assert_eq!(h.m.live(), 0);
}

#[test]
fn a_new_worker_not_ready_in_time_aborts_the_reload_and_the_old_ones_keep_serving() {
    let (mut h, old) = H::serving(2, limits());
    h.at(100).on(Input::Reload { slots: None });
    assert_eq!(h.deadline(), Some(2100));
    let out = h.timer(2100);
    assert!(has(&out, &Action::Kill { epoch: 3 }));
    assert!(out.iter().any(|a| matches!(a,
        Action::ReloadFailed(m) if m.contains("not ready within 2s") && m.contains("old workers keep serving"))));
    assert_eq!(h.serving_epochs(), old);
    // Its exit restarts nothing and fails nothing more.
    let out = h.at(2200).exit(3);
    assert_eq!(out, [Action::Forget { epoch: 3 }]);
    assert_eq!(h.m.live(), 2);
}

#[test]
fn a_new_worker_that_exits_aborts_the_reload() {
    let (mut h, old) = H::serving(1, limits());
    h.on(Input::Reload { slots: None });
    let out = h.at(50).exit(2);
    assert!(out.iter().any(|a| matches!(a,
        Action::ReloadFailed(m) if m.contains("the new worker exited with code 1 before it was ready"))));
    assert!(spawns(&out).is_empty());
    assert_eq!(h.serving_epochs(), old);
    assert_eq!(
        h.m.history(0),
        (0, None),
        "the old worker's slot is untouched"
    );
}

#[test]
fn nothing_else_runs_during_a_reload() {
    let (mut h, _) = H::serving(2, limits());
    h.on(Input::Reload { slots: None });
    let out = h.on(Input::Reload { slots: None });
    assert!(matches!(&out[..], [Action::ReloadFailed(m)] if m.contains("already running")));
    assert!(matches!(
        &h.on(Input::Scale { to: 4 })[..],
        [Action::Answer(Err(_))]
    ));
    assert!(matches!(
        &h.on(Input::Restart)[..],
        [Action::Answer(Err(_))]
    ));
    assert_eq!(h.m.instances(), 2);
}

#[test]
fn scaling_down_drains_the_highest_slots_and_scaling_up_meanwhile_starts_new_ones() {
    let (mut h, old) = H::serving(3, limits());
    let out = h.at(10).on(Input::Scale { to: 1 });
    assert!(
        has(&out, &Action::Drain { epoch: old[1] }) && has(&out, &Action::Drain { epoch: old[2] })
    );
    assert!(has(&out, &Action::Answer(Ok(Answer::Scaled(1)))));
    assert_eq!(h.serving_epochs(), [old[0]]);
    // Up again while they drain: new workers, the draining ones stay retiring.
    let out = h.at(20).on(Input::Scale { to: 3 });
    assert_eq!(spawns(&out), [(1, 4), (2, 5)]);
    assert_eq!(h.m.live(), 5);
    // The drained ones' exits restart nothing.
    for e in [old[1], old[2]] {
        h.on(Input::Drained { epoch: e });
        assert_eq!(h.at(30).exit(e), [Action::Forget { epoch: e }]);
    }
    assert_eq!(h.m.instances(), 3);
    assert_eq!(h.m.live(), 3);
}

#[test]
fn a_retirement_takes_at_most_the_drain_timeout_then_the_kill_timeout() {
    let (mut h, old) = H::serving(2, limits());
    h.at(1000).on(Input::Scale { to: 1 });
    assert_eq!(h.deadline(), Some(1000 + 3000), "drain time-out");
    assert_eq!(h.timer(4000), [Action::Terminate { epoch: old[1] }]);
    assert_eq!(
        h.deadline(),
        Some(4000 + 5000),
        "kill time-out from SIGTERM"
    );
    assert!(h.timer(8999).is_empty());
    assert_eq!(h.timer(9000), [Action::Kill { epoch: old[1] }]);
    assert_eq!(h.deadline(), None);
    // Drained early: SIGTERM at once, SIGKILL a kill time-out later.
    let (mut h, old) = H::serving(2, limits());
    h.at(1000).on(Input::Scale { to: 1 });
    assert_eq!(
        h.at(1200).on(Input::Drained { epoch: old[1] }),
        [Action::Terminate { epoch: old[1] }]
    );
    assert_eq!(h.deadline(), Some(6200));
}

#[test]
fn restart_retires_every_worker_and_starts_each_slot_again_at_once() {
    let (mut h, old) = H::serving(2, limits());
    let out = h.at(10).on(Input::Restart);
    assert_eq!(spawns(&out), [(0, 3), (1, 4)]);
    assert!(
        has(&out, &Action::Drain { epoch: old[0] }) && has(&out, &Action::Drain { epoch: old[1] })
    );
    assert!(has(&out, &Action::Answer(Ok(Answer::Restarted(2)))));
    assert!(h.serving_epochs().is_empty());
}

#[test]
fn a_worker_silent_past_its_watchdog_is_killed_and_leaves_traffic() {
    let mut l = limits();
    l.watchdog = Some(1000 * MS);
    let (mut h, e) = H::serving(2, l);
    assert_eq!(h.deadline(), None, "no watchdog before the first ping");
    h.at(100).on(Input::Pinged { epoch: e[0] });
    h.at(600).on(Input::Pinged { epoch: e[0] });
    assert_eq!(h.deadline(), Some(1600));
    assert!(h.timer(1599).is_empty());
    let out = h.timer(1600);
    assert!(has(&out, &Action::Kill { epoch: e[0] }) && has(&out, &Action::Publish));
    assert_eq!(h.serving_epochs(), [e[1]]);
    // Its exit is a normal one: it ran past min-uptime, so back at once.
    assert_eq!(spawns(&h.at(1700).exit(e[0])), [(0, 3)]);
}

#[test]
fn a_worker_above_max_memory_for_three_samples_is_replaced_without_downtime() {
    let mut l = limits();
    l.max_memory = Some(100 << 20);
    let (mut h, e) = H::serving(2, l);
    let big = 200 << 20;
    h.on(Input::Memory {
        epoch: e[1],
        rss: big,
    });
    h.on(Input::Memory {
        epoch: e[1],
        rss: big,
    });
    h.on(Input::Memory {
        epoch: e[1],
        rss: 1,
    });
    h.on(Input::Memory {
        epoch: e[1],
        rss: big,
    });
    assert!(
        h.on(Input::Memory {
            epoch: e[1],
            rss: big
        })
        .is_empty(),
        "the count starts over"
    );
    let out = h.on(Input::Memory {
        epoch: e[1],
        rss: big,
    });
    assert!(has(&out, &Action::ReloadBegun));
    assert_eq!(spawns(&out), [(1, 3)]);
    assert_eq!(
        h.serving_epochs(),
        e,
        "the old one serves until its replacement is ready"
    );
    // The other slot going over meanwhile joins the running reload.
    for _ in 0..3 {
        h.on(Input::Memory {
            epoch: e[0],
            rss: big,
        });
    }
    h.on(Input::Ready { epoch: 3 });
    let out = h.exit(e[1]);
    assert_eq!(spawns(&out), [(0, 4)]);
}

#[test]
fn stop_terminates_every_worker_restarts_nothing_and_kills_after_the_kill_timeout() {
    let (mut h, e) = H::serving(3, limits());
    h.at(10).on(Input::Scale { to: 2 }); // e[2] draining
    h.exit(e[0]); // quick exit: a restart is pending
    let out = h.at(20).on(Input::Stop);
    assert_eq!(
        out,
        [
            Action::Terminate { epoch: e[1] },
            Action::Terminate { epoch: e[2] }
        ]
    );
    assert_eq!(h.deadline(), Some(5020), "no restart timer any more");
    assert_eq!(h.at(30).exit(e[1]), [Action::Forget { epoch: e[1] }]);
    assert_eq!(h.timer(5020), [Action::Kill { epoch: e[2] }]);
    assert!(
        matches!(&h.on(Input::Reload { slots: None })[..], [Action::ReloadFailed(m)] if m.contains("stopping"))
    );
    h.exit(e[2]);
    assert_eq!(h.m.live(), 0);
}

#[test]
fn a_second_stop_signal_kills_at_once() {
    let (mut h, e) = H::serving(2, limits());
    h.on(Input::Stop);
    assert_eq!(
        h.on(Input::Hurry),
        [Action::Kill { epoch: e[0] }, Action::Kill { epoch: e[1] }]
    );
    assert!(h.on(Input::Hurry).is_empty());
}

#[test]
fn stop_aborts_a_running_reload() {
    let (mut h, _) = H::serving(1, limits());
    h.on(Input::Reload { slots: None });
    let out = h.on(Input::Stop);
    assert!(matches!(&out[0], Action::ReloadFailed(m) if m.contains("stopping")));
    assert_eq!(out.len(), 3, "then SIGTERM to the old and the new worker");
}

#[test]
fn scale_targets() {
    assert_eq!(scale_target("4", 2), Ok(4));
    assert_eq!(scale_target("+2", 2), Ok(4));
    assert_eq!(scale_target(" -1 ", 2), Ok(1));
    assert!(scale_target("-2", 2).unwrap_err().contains("at least 1"));
    assert!(
        scale_target("5000", 2)
            .unwrap_err()
            .contains("at most 4096")
    );
    assert!(scale_target("many", 2).unwrap_err().contains("not a count"));
}

#[test]
fn a_worker_that_asks_to_be_replaced_serves_until_its_successor_is_ready() {
    let (mut h, e) = H::serving(2, limits());
    let out = h.on(Input::Replace { epoch: e[1] });
    assert!(has(&out, &Action::ReloadBegun));
    assert_eq!(spawns(&out), [(1, 3)]);
    assert_eq!(h.serving_epochs(), e, "it serves until then");
    let out = h.on(Input::Ready { epoch: 3 });
    assert!(has(&out, &Action::Drain { epoch: e[1] }));
    assert_eq!(h.serving_epochs(), [e[0], 3]);
    // Asking again while being replaced, or before being ready, does nothing.
    assert!(h.on(Input::Replace { epoch: e[1] }).is_empty());
    let (mut h, _) = H::serving(1, limits());
    h.on(Input::Restart);
    assert!(h.on(Input::Replace { epoch: 2 }).is_empty());
}

fn versions(actions: &[Action]) -> Vec<(usize, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { slot, version, .. } => Some((*slot, *version)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_deploy_adds_new_slots_beside_the_stable_ones_and_promote_replaces_them() {
    let (mut h, stable) = H::serving(2, limits());
    let out = h.on(Input::Deploy {
        version: 7,
        workers: 1,
    });
    assert_eq!(versions(&out), [(2, 7)]);
    assert!(has(&out, &Action::Answer(Ok(Answer::Deployed(1)))));
    h.on(Input::Ready { epoch: 3 });
    assert!(h.m.group_serving(Group::New));
    assert_eq!(
        h.m.serving()
            .map(|w| (w.group, w.version))
            .collect::<Vec<_>>(),
        [(Group::Stable, 0), (Group::Stable, 0), (Group::New, 7)]
    );
    // Nothing else that changes slots meanwhile.
    assert!(matches!(
        &h.on(Input::Deploy {
            version: 8,
            workers: 1
        })[..],
        [Action::Answer(Err(_))]
    ));
    assert!(matches!(
        &h.on(Input::Scale { to: 4 })[..],
        [Action::Answer(Err(_))]
    ));
    // A restart of a new slot runs the new version again.
    let out = h.at(5000).exit(3);
    assert_eq!(versions(&out), [(2, 7)]);
    h.on(Input::Ready { epoch: 4 });

    // Promote: the stable slots are reloaded with version 7, then the
    // deploy's slot leaves.
    let out = h.on(Input::Promote);
    assert!(has(&out, &Action::ReloadBegun));
    assert_eq!(versions(&out), [(0, 7)]);
    h.on(Input::Ready { epoch: 5 });
    let out = h.exit(stable[0]);
    assert_eq!(versions(&out), [(1, 7)]);
    h.on(Input::Ready { epoch: 6 });
    let out = h.exit(stable[1]);
    assert!(
        has(&out, &Action::Drain { epoch: 4 }),
        "the deploy's worker leaves"
    );
    assert!(has(&out, &Action::ReloadDone { replaced: 2 }));
    assert_eq!(h.m.deploying(), None);
    assert_eq!(h.m.instances(), 2);
    assert_eq!(h.m.stable_version(), 7);
    assert_eq!(h.serving_epochs(), [5, 6]);
}

#[test]
fn rollback_stops_the_new_slots_and_undoes_a_promote_that_was_aborted() {
    let (mut h, stable) = H::serving(2, limits());
    h.on(Input::Deploy {
        version: 3,
        workers: 1,
    });
    h.on(Input::Ready { epoch: 3 });
    h.on(Input::Promote);
    // Slot 0 takes version 3, slot 1's new worker never becomes ready.
    h.on(Input::Ready { epoch: 4 });
    h.at(100).exit(stable[0]);
    let out = h.timer(100 + 2000);
    assert!(out.iter().any(|a| matches!(a, Action::ReloadFailed(_))));
    assert_eq!(h.m.stable_version(), 0, "back to the old version");
    let out = h.on(Input::Rollback);
    assert!(has(&out, &Action::Answer(Ok(Answer::RolledBack(1)))));
    assert!(has(&out, &Action::Drain { epoch: 3 }));
    // Slot 0 runs version 3: reloaded back to version 0.
    assert_eq!(versions(&out), [(0, 0)]);
    assert_eq!(h.m.deploying(), None);
    assert!(
        matches!(&h.on(Input::Rollback)[..], [Action::Answer(Err(m))] if m.contains("nothing to roll back"))
    );
}

#[test]
fn new_workers_are_counted_by_why() {
    let mut l = limits();
    l.watchdog = Some(1000 * MS);
    l.max_memory = Some(1);
    let (mut h, e) = H::serving(2, l);
    h.at(5000).exit(e[0]); // a crash: back at once (epoch 3)
    h.on(Input::Ready { epoch: 3 });
    h.on(Input::Pinged { epoch: e[1] });
    h.timer(6000); // watchdog kills e[1]
    h.at(6100).exit(e[1]); // epoch 4
    h.on(Input::Ready { epoch: 4 });
    for _ in 0..3 {
        h.on(Input::Memory { epoch: 4, rss: 2 }); // a one-slot reload of slot 1 (epoch 5)
    }
    h.on(Input::Ready { epoch: 5 });
    h.at(6200).exit(4);
    h.on(Input::ReplaceSlot { slot: 0 }); // epoch 6
    h.on(Input::Ready { epoch: 6 });
    h.exit(3);
    h.on(Input::Restart);
    let by: std::collections::HashMap<_, _> =
        h.m.restarts_by_cause()
            .map(|(c, n)| (c.as_str(), n))
            .collect();
    assert_eq!(
        (
            by["exit"],
            by["watchdog"],
            by["memory"],
            by["replace"],
            by["restart"],
            by["reload"]
        ),
        (1, 1, 1, 1, 2, 0),
        "{by:?}"
    );
}
