//! Canary and blue-green releases: `herd deploy`, `promote`, `rollback`,
//! and the automatic analysis, with real workers under real load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// The worker id that answered `/`.
fn who(port: u16, headers: &str) -> usize {
    get_with(port, "/", headers).map_or(usize::MAX, |(_, b)| parse_hello(&b).0)
}

fn status_json(n: &str) -> serde_json::Value {
    let out = ok(&herd(&["status", "--name", n, "--json"]));
    serde_json::from_str(&out).unwrap()
}

/// The cluster has `count` workers, all ready (none leaving).
fn all_ready(n: &str, count: usize) -> bool {
    status_json(n)["workers"]
        .as_array()
        .is_some_and(|w| w.len() == count && w.iter().all(|w| w["state"] == "ready"))
}

#[test]
fn a_canary_gets_its_share_and_a_user_stays_on_one_version() {
    let n = name("canary");
    let h = Herd::start(&["--name", &n, "-i", "2"], &[DEMO]);
    h.wait_ready(2);
    // The name as every other command takes it: first.
    let out = ok(&herd(&["deploy", &n, "--canary", "20"]));
    assert!(out.contains("1 worker of the new version started"), "{out}");
    assert!(h.wait_log("worker 2 ready", T), "{}", h.log());
    let new = (0..2000).filter(|_| who(h.port, "") == 2).count();
    assert!((360..=440).contains(&new), "{new} of 2000 to a 20% canary");
    // Figures over the analysis window: since its first sample, which the
    // once-a-second analysis may have taken after those requests (then
    // more are needed).
    let mut st = status_json(&n);
    wait_until(T, || {
        if st["deploy"]["versions"][1]["requests"] == 0 {
            (0..20).for_each(|_| {
                who(h.port, "");
            });
        }
        st = status_json(&n);
        let v = &st["deploy"]["versions"][1];
        v["requests"].as_u64().is_some_and(|r| r > 0) && v["p99_ms"].as_f64().is_some()
    });
    assert_eq!(st["deploy"]["kind"], "canary");
    assert_eq!(st["deploy"]["percent"], 20);
    assert_eq!(st["deploy"]["versions"][1]["workers"], 1);
    let v = &st["deploy"]["versions"][1];
    assert!(
        v["requests"].as_u64().unwrap() > 0 && v["p99_ms"].as_f64().is_some(),
        "{st}"
    );
    assert_eq!(v["error_rate"], 0.0, "{st}");

    // Sticky: by a header, each user always gets the same version.
    let out = ok(&herd(&["rollback", "--name", &n]));
    assert!(out.contains("rolled back"), "{out}");
    ok(&herd(&[
        "deploy",
        "--name",
        &n,
        "--canary",
        "30",
        "--by",
        "header:x-user",
    ]));
    assert!(h.wait_log_n("worker 2 ready", 2, T), "{}", h.log());
    let mut on_new = 0;
    for user in 0..40 {
        let header = format!("X-User: user-{user}\r\n");
        let first = who(h.port, &header) == 2;
        for _ in 0..5 {
            assert_eq!(
                who(h.port, &header) == 2,
                first,
                "user {user} changed version"
            );
        }
        on_new += usize::from(first);
    }
    assert!(
        (1..40).contains(&on_new),
        "{on_new} of 40 users on the canary"
    );
}

#[test]
fn a_canary_that_answers_500s_is_rolled_back_by_itself() {
    let n = name("autoroll");
    let h = Herd::start(&["--name", &n, "-i", "2"], &[DEMO]);
    h.wait_ready(2);
    ok(&herd(&[
        "deploy",
        "--name",
        &n,
        "--canary",
        "50",
        "--env",
        "HERD_DEMO_STATUS=500",
        "--max-error-rate",
        "5",
        "--window",
        "3s",
    ]));
    assert!(h.wait_log("worker 2 ready", T), "{}", h.log());
    let mut saw_500 = false;
    assert!(
        wait_until(T, || {
            saw_500 |= get_with(h.port, "/", "").is_ok_and(|r| r.0 == 500);
            h.log().contains("rolling back version 1")
        }),
        "{}",
        h.log()
    );
    assert!(saw_500, "the canary was never asked");
    assert!(h.log().contains("5xx rate is"), "{}", h.log());
    assert!(wait_until(T, || status_json(&n).get("deploy").is_none()));
    for _ in 0..50 {
        assert_eq!(
            get_with(h.port, "/", "").unwrap().0,
            200,
            "all traffic back on the old version"
        );
    }
}

#[test]
fn promote_and_rollback_under_keepalive_load_fail_nothing() {
    for mode in ["proxy", "dispatch"] {
        let n = name(&format!("promote-{mode}"));
        let h = Herd::start(&["--name", &n, "-i", "2", "--mode", mode], &[DEMO]);
        h.wait_ready(2);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let clients = load(h.port, true, stop.clone(), done.clone());
        assert!(wait_until(T, || done.load(Ordering::Relaxed) >= 40));

        let canary = [
            "deploy",
            "--name",
            &n,
            "--canary",
            "50",
            "--env",
            "HERD_DEMO_TAG=v2",
        ];
        ok(&herd(&canary));
        assert!(h.wait_log("worker 2 ready", T), "{mode}: {}", h.log());
        ok(&herd(&["rollback", "--name", &n]));
        assert!(h.wait_log("(retired)", T), "{mode}: {}", h.log());
        ok(&herd(&canary));
        assert!(h.wait_log_n("worker 2 ready", 2, T), "{mode}: {}", h.log());
        let out = ok(&herd(&["promote", "--name", &n]));
        assert!(
            out.contains("promoted (2 workers replaced)"),
            "{mode}: {out}"
        );
        let seen = done.load(Ordering::Relaxed);
        assert!(wait_until(T, || done.load(Ordering::Relaxed) > seen + 100));
        no_failures(&stop, clients);

        let st = status_json(&n);
        assert!(st.get("deploy").is_none(), "{st}");
        let workers = st["workers"].as_array().unwrap();
        assert!(
            wait_until(T, || status_json(&n)["workers"].as_array().unwrap().len()
                == 2),
            "the deploy's worker left: {workers:?}"
        );
        for _ in 0..10 {
            let (_, env) = get_with(h.port, "/env", "").unwrap();
            assert!(
                env.contains("HERD_DEMO_TAG=v2"),
                "{mode}: an old worker answered: {env}"
            );
        }
    }
}

#[test]
fn blue_green_switches_all_traffic_at_once_and_promote_keeps_it_on_the_new_version() {
    let n = name("bluegreen");
    let h = Herd::start(&["--name", &n, "-i", "2"], &[DEMO]);
    h.wait_ready(2);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(h.port, true, stop.clone(), done.clone());
    assert!(wait_until(T, || done.load(Ordering::Relaxed) >= 40));
    let out = ok(&herd(&[
        "deploy",
        "--name",
        &n,
        "--blue-green",
        "--env",
        "HERD_DEMO_TAG=green",
    ]));
    assert!(out.contains("2 workers of the new version"), "{out}");
    assert!(
        wait_until(T, || status_json(&n)["deploy"]["percent"] == 100),
        "{}",
        h.log()
    );
    for _ in 0..40 {
        assert!(who(h.port, "") >= 2, "all traffic on the green set");
    }
    ok(&herd(&["promote", "--name", &n]));
    no_failures(&stop, clients);
    for _ in 0..20 {
        let (_, env) = get_with(h.port, "/env", "").unwrap();
        assert!(env.contains("HERD_DEMO_TAG=green"), "{env}");
    }
}

#[test]
fn dispatch_splits_connections_and_the_fd_modes_refuse_what_they_cannot_do() {
    let n = name("dsplit");
    let h = Herd::start(&["--name", &n, "-i", "2", "--mode", "dispatch"], &[DEMO]);
    h.wait_ready(2);
    ok(&herd(&["deploy", "--name", &n, "--canary", "25"]));
    assert!(h.wait_log("worker 2 ready", T), "{}", h.log());
    let new = (0..400).filter(|_| who(h.port, "") == 2).count();
    assert!(
        (92..=108).contains(&new),
        "{new} of 400 connections to a 25% canary"
    );
    for (args, why) in [
        (
            vec!["--canary", "10", "--by", "header:x-user"],
            "dispatch mode splits connections",
        ),
        (
            vec!["--canary", "10", "--max-error-rate", "5"],
            "need proxy mode",
        ),
        (vec!["--canary", "10"], "a deploy is already running"),
    ] {
        let mut all = vec!["deploy", "--name", &n];
        all.extend(args);
        let out = herd(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{all:?}: {err}");
    }
    // A refused deploy leaves the running one as it was: still split.
    let st = status_json(&n);
    assert_eq!(st["deploy"]["percent"], 25, "{st}");
    let new = (0..100).filter(|_| who(h.port, "") == 2).count();
    assert!(
        (20..=30).contains(&new),
        "{new} of 100 after a refused deploy"
    );

    let s = name("ssplit");
    let h = Herd::start(&["--name", &s, "-i", "1", "--mode", "shared"], &[DEMO]);
    h.wait_ready(1);
    let out = herd(&["deploy", "--name", &s, "--canary", "50", "--by", "ip"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the split is by worker count"), "{err}");
    // A typo forks no thousands of workers; a limit is a percent.
    for (args, why) in [
        (vec!["-i", "99999"], "-i 99999: from 1 to 4095 new workers"),
        (vec!["--max-error-rate", "nan"], "a percent from 0 to 100"),
    ] {
        let mut all = vec!["deploy", "--name", &s, "--canary", "50"];
        all.extend(args);
        let out = herd(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{all:?}: {err}");
    }
    ok(&herd(&["deploy", "--name", &s, "--canary", "50"]));
    assert!(h.wait_log("worker 1 ready", T), "{}", h.log());
    assert!(
        wait_until(T, || who(h.port, "") == 1),
        "the new worker takes connections"
    );
}

#[test]
fn a_canary_healthy_for_promote_after_is_promoted_by_itself() {
    let n = name("autopromote");
    let h = Herd::start(&["--name", &n, "-i", "1"], &[DEMO]);
    h.wait_ready(1);
    ok(&herd(&[
        "deploy",
        "--name",
        &n,
        "--canary",
        "50",
        "--env",
        "HERD_DEMO_TAG=v2",
        "--max-error-rate",
        "5",
        "--window",
        "2s",
        "--promote-after",
        "1s",
    ]));
    assert!(
        wait_until(T, || {
            let _ = get_with(h.port, "/", "");
            h.log().contains("reload done")
        }),
        "{}",
        h.log()
    );
    assert!(
        h.log().contains("healthy for --promote-after; promoting"),
        "{}",
        h.log()
    );
    assert!(wait_until(T, || status_json(&n).get("deploy").is_none()));
    assert!(wait_until(T, || {
        get_with(h.port, "/env", "").is_ok_and(|r| r.1.contains("HERD_DEMO_TAG=v2"))
            && status_json(&n)["workers"].as_array().unwrap().len() == 1
    }));
}

/// Reuseport mode: a deploy's slot takes its socket with it when it leaves
/// (promoted or rolled back); the kernel would else go on giving a share
/// of new connections to a socket no worker accepts on.
#[test]
fn in_reuseport_mode_no_connection_waits_on_a_socket_a_deploy_left() {
    let n = name("rpdeploy");
    let h = Herd::start(&["--name", &n, "-i", "2", "--mode", "reuseport"], &[DEMO]);
    h.wait_ready(2);
    // Each on a connection of its own, which the kernel spreads by hash.
    let answered = || {
        (0..40)
            .filter(|_| get_within(h.port, Duration::from_secs(2)).is_some())
            .count()
    };
    for end in ["promote", "rollback"] {
        ok(&herd(&["deploy", "--name", &n, "--canary", "50"]));
        assert!(wait_until(T, || all_ready(&n, 3)), "{}", h.log());
        ok(&herd(&[end, "--name", &n]));
        assert!(wait_until(T, || all_ready(&n, 2)), "{}", h.log());
        assert_eq!(answered(), 40, "after the {end}: {}", h.log());
    }
    // The kernel was steered away from the leaving sockets: nothing to say.
    assert!(!h.log().contains("cannot steer"), "{}", h.log());
}

/// Reuseport mode: a slot that goes away closes its socket, and the kernel
/// resets the connections queued on it (unless `net.ipv4.tcp_migrate_req`
/// is 1). herd steers new connections to the slots that stay first, and
/// stops the leaving workers once they have accepted what was queued.
#[test]
fn in_reuseport_mode_a_scale_down_under_load_resets_no_connection() {
    let n = name("rpscale");
    let h = Herd::start(&["--name", &n, "-i", "3", "--mode", "reuseport"], &[DEMO]);
    h.wait_ready(3);
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let port = h.port;
    // A new connection per request, as many at once as the machine takes.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut first = None;
                while !stop.load(Ordering::Relaxed) {
                    let mut text = String::new();
                    let answered = std::net::TcpStream::connect(("127.0.0.1", port))
                        .and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            std::io::Write::write_all(
                                &mut s,
                                b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                            )?;
                            std::io::Read::read_to_string(&mut s, &mut text)
                        })
                        .map_err(|e| e.to_string());
                    match answered {
                        Ok(_) if text.starts_with("HTTP/1.1 200") => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first.get_or_insert(format!("{other:?} {text:?}"));
                        }
                    }
                }
                first
            })
        })
        .collect();
    for _ in 0..3 {
        ok(&herd(&["scale", "--name", &n, "1"]));
        assert!(wait_until(T, || all_ready(&n, 1)), "{}", h.log());
        ok(&herd(&["scale", "--name", &n, "3"]));
        assert!(wait_until(T, || all_ready(&n, 3)), "{}", h.log());
    }
    // An upgrade right after a scale-down (perhaps while steering: the new
    // master ends it), and the slots added back get connections again.
    ok(&herd(&["scale", "--name", &n, "1"]));
    ok(&herd(&["upgrade", "--name", &n]));
    ok(&herd(&["scale", "--name", &n, "3"]));
    assert!(wait_until(T, || all_ready(&n, 3)), "{}", h.log());
    assert!(
        wait_until(T, || {
            let seen: std::collections::HashSet<usize> = (0..30).map(|_| who(port, "")).collect();
            (0..3).all(|w| seen.contains(&w))
        }),
        "{}",
        h.log()
    );
    stop.store(true, Ordering::Relaxed);
    let why: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap())
        .collect();
    let (served, failed) = (
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {served} failed: {why:?}\n{}",
        h.log()
    );
    assert!(!h.log().contains("cannot steer"), "{}", h.log());
}
