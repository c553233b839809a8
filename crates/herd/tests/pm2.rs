//! PM2 users' habits: the README's "Coming from PM2" commands, run as
//! written and in order, in a copy of `examples/pm2/`; several apps in one
//! `herd.toml`; `herd startup`'s unit checked by systemd's own verifier.
//!
//! Each test has its own runtime and state directories, so `herd list`,
//! `herd save` and `herd stop all` see only its clusters.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// A directory of its own, with `herd` first on PATH and private
/// `XDG_RUNTIME_DIR` / `TMPDIR` / `XDG_STATE_HOME` (herd looks for clusters
/// in the first two); stops its clusters when dropped.
struct Sandbox {
    dir: PathBuf,
    port: u16,
}

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        let dir = std::env::temp_dir().join(format!("herd-pm2-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["app", "run", "state", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // As /tmp, where `--user` workers' directory goes.
        for (sub, mode) in [("run", 0o700), ("tmp", 0o1777)] {
            std::fs::set_permissions(
                dir.join(sub),
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .unwrap();
        }
        Sandbox {
            dir,
            port: free_port(),
        }
    }

    fn app(&self) -> PathBuf {
        self.dir.join("app")
    }

    /// A copy of `examples/pm2/` with its apps on free ports (`edit` changes
    /// the ecosystem file further); returns the api's and the web's ports.
    fn pm2_example(&self, edit: impl FnOnce(String) -> String) -> (u16, u16) {
        let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pm2");
        for f in ["app.js", "jobs.js", "ecosystem.config.js"] {
            std::fs::copy(Path::new(examples).join(f), self.app().join(f)).unwrap();
        }
        let (api, web) = (free_port(), free_port());
        let eco = self.app().join("ecosystem.config.js");
        let js = std::fs::read_to_string(&eco)
            .unwrap()
            .replace("PORT: 3000", &format!("PORT: {api}"))
            .replace("PORT: 3001", &format!("PORT: {web}"));
        std::fs::write(&eco, edit(js)).unwrap();
        (api, web)
    }

    /// `sh -c LINE` in the app directory: whether it succeeded, and what
    /// it said on stdout and stderr.
    fn run(&self, line: &str) -> (bool, String) {
        let out = self.sh(line);
        (out.status.success(), text(&out))
    }

    /// `sh -c LINE` in the app directory.
    fn sh(&self, line: &str) -> Output {
        self.command(line).output().unwrap()
    }

    fn command(&self, line: &str) -> Command {
        let bin = Path::new(HERD).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new("sh");
        c.args(["-c", line])
            .current_dir(self.app())
            .env("PATH", path)
            .env("XDG_RUNTIME_DIR", self.dir.join("run"))
            .env("TMPDIR", self.dir.join("tmp"))
            .env("XDG_STATE_HOME", self.dir.join("state"))
            .env("PORT", self.port.to_string())
            .stdin(Stdio::null());
        c
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.sh("herd stop all");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The command lines of the README's "Coming from PM2" block.
fn readme_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme
        .split("## Coming from PM2")
        .nth(1)
        .expect("the README has a Coming from PM2 section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```sh block in it");
    block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `herd logs NAME` once it shows `needle`; the test fails after [`T`].
fn log_showing(sb: &Sandbox, name: &str, needle: &str) -> String {
    let cmd = format!("herd logs {name} --nostream --lines 50");
    let mut log = String::new();
    assert!(
        wait_until(T, || {
            log = sb.run(&cmd).1;
            log.contains(needle)
        }),
        "{log}"
    );
    log
}

/// SIGTERM to a foreground herd; its exit status, or `None` (then killed)
/// if it did not exit in time.
fn terminate(fg: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    signal(fg.id(), "TERM");
    let mut status = None;
    wait_until(T, || {
        status = fg.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = fg.kill();
    }
    status
}

fn body(port: u16) -> String {
    let mut got = String::new();
    wait_until(T, || match http_get(port, "/") {
        Ok((200, b)) => {
            got = b;
            true
        }
        _ => false,
    });
    got
}

#[test]
fn the_readme_pm2_commands_work_as_written() {
    let sb = Sandbox::new("readme");
    let (api, web) = sb.pm2_example(|js| js);

    let commands = readme_commands();
    assert!(commands.len() >= 10, "{commands:?}");
    for cmd in &commands {
        let out = sb.sh(cmd);
        let said = text(&out);
        assert!(out.status.success(), "`{cmd}` failed:\n{said}");
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match &words[1..] {
            ["start", "app.js", ..] => {
                assert!(said.contains("app: started"), "{said}");
                assert!(body(sb.port).contains("from worker"), "`{cmd}`");
            }
            ["list"] => {
                // `pm2 ls`'s columns: restarts, CPU and memory too.
                let row = said
                    .lines()
                    .find(|l| l.starts_with("app "))
                    .unwrap_or_default();
                assert!(
                    said.contains("restarts") && row.contains("%") && row.contains("M"),
                    "{said}"
                );
            }
            ["logs", "app", ..] => assert!(said.contains("[0] listening on"), "{said}"),
            ["reload", "app"] => assert!(said.contains("app: reloaded"), "{said}"),
            ["scale", "app", n] => assert!(said.contains(&format!("app: {n} workers")), "{said}"),
            ["pid", "app"] => {
                // One per worker (scaled to 3), for `kill -USR2 $(herd pid app)`.
                let pids: Vec<&str> = said.lines().collect();
                assert!(
                    pids.len() == 3 && pids.iter().all(|p| p.parse::<u32>().is_ok_and(|p| p > 1)),
                    "{said}"
                );
            }
            ["env", "0"] => {
                let port = format!("PORT={}", sb.port);
                assert!(
                    said.lines().any(|l| l == "HERD_WORKER_ID=0")
                        && said.lines().any(|l| l.starts_with("PORT=") && l != port),
                    "{said}"
                );
            }
            ["describe", "app"] => {
                // A row per worker (the third may still be starting).
                let rows = said
                    .lines()
                    .filter(|l| {
                        l.split_whitespace()
                            .next()
                            .is_some_and(|w| w.parse::<u32>().is_ok())
                    })
                    .count();
                assert_eq!(rows, 3, "{said}");
            }
            ["stop", "app"] => {
                assert!(said.contains("app: stopped"), "{said}");
                assert!(http_get(sb.port, "/").is_err(), "still answering");
                let listed = text(&sb.sh("herd list"));
                assert!(
                    listed
                        .lines()
                        .any(|l| l.starts_with("app ") && l.ends_with("stopped")),
                    "{listed}"
                );
            }
            ["start", "app"] => {
                assert!(said.contains("app: started"), "{said}");
                assert!(body(sb.port).contains("from worker"), "`{cmd}`");
            }
            ["delete", "app"] => {
                assert!(said.contains("app: stopped"), "{said}");
                assert!(http_get(sb.port, "/").is_err(), "still answering");
                let listed = text(&sb.sh("herd list"));
                assert!(listed.contains("no herd cluster"), "{listed}");
            }
            ["start", "ecosystem.config.js", ..] => {
                assert!(
                    said.contains("api: started")
                        && said.contains("web: started")
                        && said.contains("jobs: started, master pid")
                        && said.contains("fork mode (no port)"),
                    "{said}"
                );
                assert!(
                    body(api).starts_with("hello from production (production)"),
                    "{}",
                    body(api)
                );
                assert!(body(web).starts_with("web (development)"), "{}", body(web));
            }
            ["logs", "api", "--err", "--timestamps"] => {
                let lines: Vec<&str> = said.lines().collect();
                assert!(!lines.is_empty(), "no stderr lines");
                for l in lines {
                    assert!(
                        l.starts_with("20") && l.contains(":err] started in production mode"),
                        "{l}"
                    );
                }
            }
            ["reload", "all", "--update-env"] => {
                assert!(
                    said.contains("api: reloaded") && said.contains("web: reloaded"),
                    "{said}"
                );
                // The config was read again with the same --env production.
                assert!(
                    body(api).starts_with("hello from production"),
                    "{}",
                    body(api)
                );
            }
            ["save"] => assert!(said.contains("saved 3 clusters (api, jobs, web)"), "{said}"),
            ["stop", "all"] => {
                assert!(
                    said.contains("api: stopped") && said.contains("web: stopped"),
                    "{said}"
                );
                assert!(http_get(api, "/").is_err() && http_get(web, "/").is_err());
            }
            ["resurrect"] => {
                assert!(
                    said.contains("api: started") && said.contains("web: started"),
                    "{said}"
                );
                assert!(
                    body(api).starts_with("hello from production"),
                    "{}",
                    body(api)
                );
            }
            ["startup"] => verify_unit(&said),
            ["flush"] => assert!(
                said.contains("api.log") && said.contains("web.log"),
                "{said}"
            ),
            ["delete", "all"] => assert!(said.contains("stopped"), "{said}"),
            _ => panic!("the test does not know what `{cmd}` should do: add a check"),
        }
    }
    let listed = text(&sb.sh("herd list"));
    assert!(listed.contains("no herd cluster"), "{listed}");
}

/// `pm2 stop api` keeps the app in PM2's list, and `pm2 start api` or
/// `pm2 restart api` start it again as it ran: so do herd's, until
/// `herd delete`.
#[test]
fn a_stopped_cluster_starts_again_by_its_name_as_it_ran() {
    let sb = Sandbox::new("stopped");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pm2");
    std::fs::copy(Path::new(examples).join("app.js"), sb.app().join("app.js")).unwrap();
    let run = |line: &str| sb.run(line);
    let (ok, said) = run("GREETING=first herd start app.js -n api -i 1");
    assert!(ok && said.contains("api: started"), "{said}");
    assert!(body(sb.port).starts_with("first"));
    let (_, said) = run("herd list --json");
    let listed: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
    assert!(
        listed[0]["status"] == "online" && listed[0]["workers"].as_array().map(Vec::len) == Some(1),
        "{said}"
    );
    // `pm2 jlist`'s own shape, for scripts written against it.
    let (_, said) = run("herd jlist");
    let listed: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
    let worker = &listed[0];
    assert!(
        worker["name"] == "api"
            && worker["pm_id"] == 0
            && worker["pid"].as_u64().is_some_and(|p| p > 0)
            && worker["monit"]["memory"].as_u64().is_some_and(|m| m > 0)
            && worker["pm2_env"]["status"] == "online"
            && worker["pm2_env"]["exec_mode"] == "cluster_mode"
            && worker["pm2_env"]["restart_time"] == 0,
        "{said}"
    );
    // `pm2 restart 0`: herd's clusters have names, and the error says so.
    let (ok, said) = run("herd restart 0");
    assert!(
        !ok && said.contains("(running: api); clusters go by name here, not by PM2's numeric id"),
        "{said}"
    );

    let (ok, said) = run("herd stop api && herd list && herd stop api");
    assert!(ok, "{said}");
    assert!(
        said.lines()
            .any(|l| l.starts_with("api ") && l.ends_with("stopped")),
        "{said}"
    );
    assert!(said.contains("api: already stopped"), "{said}");
    // `pm2 jlist` lists stopped apps too.
    let (ok, said) = run("herd jlist");
    let listed: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
    assert!(
        ok && listed[0]["name"] == "api" && listed[0]["pm2_env"]["status"] == "stopped",
        "{said}"
    );
    let (ok, said) = run("herd describe api");
    assert!(
        !ok && said.contains("`herd start api` starts it again"),
        "{said}"
    );

    // From another directory and another environment: as it ran.
    let (ok, said) = run("cd / && GREETING=second herd start api");
    assert!(ok && said.contains("api: started"), "{said}");
    assert!(body(sb.port).starts_with("first"), "{}", body(sb.port));
    let (ok, said) = run("herd start api");
    assert!(!ok && said.contains("api is already running"), "{said}");
    // `pm2 ps` and `pm2 l`, PM2's other names for its list.
    let (ok, said) = run("herd ps && herd l");
    assert!(
        ok && said.lines().filter(|l| l.starts_with("api ")).count() == 2,
        "{said}"
    );
    let listed = run("herd list").1;
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("api ")).count(),
        1,
        "{listed}"
    );

    let (ok, said) = run("herd stop api && herd restart api");
    assert!(ok && said.contains("api: started"), "{said}");
    assert!(body(sb.port).starts_with("first"));
    // `--update-env`: this shell's environment instead of the recorded one.
    let (ok, said) = run("herd stop api && GREETING=third herd reload api --update-env");
    assert!(ok && said.contains("api: started"), "{said}");
    assert!(body(sb.port).starts_with("third"), "{}", body(sb.port));
    // PM2's foreground start (a container's entry point) of a stopped
    // cluster: it runs here as it ran, its lines on this terminal, and
    // stays in the list, stopped, when it ends.
    let (ok, said) = run("herd stop api");
    assert!(ok, "{said}");
    let mut fg = sb
        .command("exec herd start api --no-daemon > fg.out 2>&1")
        .spawn()
        .unwrap();
    assert!(body(sb.port).starts_with("third"), "{}", body(sb.port));
    let out = sb.app().join("fg.out");
    let said = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(said.contains("api: 1 worker, proxy mode"), "{said}");
    let status = terminate(&mut fg);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let listed = run("herd list").1;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("api ") && l.ends_with("stopped")),
        "{listed}"
    );
    // `pm2 start api --update-env`, as deploy scripts have it.
    let (ok, said) = run("GREETING=fourth herd start api --update-env");
    assert!(ok && said.contains("api: started"), "{said}");
    assert!(body(sb.port).starts_with("fourth"), "{}", body(sb.port));

    let (ok, said) = run("herd delete api && herd list");
    assert!(ok && said.contains("api: stopped"), "{said}");
    assert!(said.contains("no herd cluster is running"), "{said}");
    let (ok, said) = run("herd start api");
    assert!(!ok && said.contains("command not found: api"), "{said}");

    // `herd delete` of a stopped cluster forgets it without stopping anything.
    let (ok, said) = run("herd start app.js -n web -i 1 && herd stop web && herd delete web");
    assert!(ok && said.contains("web: deleted"), "{said}");
    assert!(run("herd list").1.contains("no herd cluster"));

    // Ended by themselves: a crash loop is listed as errored (PM2's word),
    // a cluster whose last worker ended under --no-autorestart as stopped;
    // both start again by name.
    let listed = |name: &str, state: &str| {
        let said = run("herd list").1;
        said.lines()
            .any(|l| l.starts_with(&format!("{name} ")) && l.ends_with(state))
    };
    let (ok, said) =
        run("herd start -n bad -i 1 --max-restarts 1 --restart-delay 10ms -- sh -c 'exit 3'");
    assert!(!ok && said.contains("crash loop"), "{said}");
    assert!(listed("bad", "errored"), "{}", run("herd list").1);
    let (ok, said) =
        run("herd start app.js -n job -i 1 --no-autorestart && herd signal SIGKILL job");
    assert!(ok, "{said}");
    assert!(
        wait_until(T, || listed("job", "stopped")),
        "{}",
        run("herd list").1
    );
    let (ok, said) = run("herd start job");
    assert!(ok && said.contains("job: started"), "{said}");
    // A script run once (`pm2 start migrate.js --no-autorestart`) ends
    // before it could be seen ready: that is its success, with its output.
    let (ok, said) = run(
        "echo \"console.log('migrated')\" > once.js && herd start once.js --mode fork --no-autorestart",
    );
    assert!(
        ok && said.contains("once: ran and ended") && said.contains("[0] migrated"),
        "{said}"
    );
    assert!(listed("once", "stopped"), "{}", run("herd list").1);
    let (ok, said) = run("herd delete all && herd list");
    assert!(
        ok && said.contains("job: stopped") && said.contains("bad: deleted"),
        "{said}"
    );
    assert!(said.contains("no herd cluster is running"), "{said}");
}

/// What a cluster changed while it ran (a promoted deploy's command,
/// directory and `--env`, `herd scale`, `reload --update-env`) outlives its
/// master: `reload --update-env` keeps the release, and `herd upgrade`,
/// `herd stop` then `herd start NAME`, and `herd save` then `herd
/// resurrect` bring it back as it ran, as PM2 does, not as it started.
#[test]
fn what_a_cluster_changed_outlives_its_master() {
    let sb = Sandbox::new("changed");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pm2");
    let app = std::fs::read_to_string(Path::new(examples).join("app.js")).unwrap();
    std::fs::write(sb.app().join("app.js"), &app).unwrap();
    std::fs::create_dir_all(sb.app().join("v2")).unwrap();
    let two = app.replace("res.end(`", "res.end(`two ");
    assert_ne!(two, app);
    std::fs::write(sb.app().join("v2/server.js"), two).unwrap();
    let run = |line: &str| sb.run(line);
    let workers = || {
        let said = run("herd status api --json").1;
        let v: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
        v["workers"].as_array().map_or(0, Vec::len)
    };
    let as_it_ran = |when: &str| {
        let b = body(sb.port);
        assert!(b.starts_with("two green (staging)"), "{when}: {b}");
        assert_eq!(workers(), 2, "{when}");
    };

    let (ok, said) = run("GREETING=blue herd start app.js -n api -i 1");
    assert!(ok, "{said}");
    assert!(body(sb.port).starts_with("blue (development)"));
    let (ok, said) = run(
        "herd deploy api --blue-green --cwd v2 --env GREETING=green -- node server.js && herd promote api",
    );
    assert!(ok && said.contains("promoted"), "{said}");
    let (ok, said) = run("herd scale api 2 && NODE_ENV=staging herd reload api --update-env");
    assert!(ok && said.contains("reloaded 2 workers"), "{said}");
    as_it_ran("after the reload with --update-env");

    let (ok, said) = run("herd upgrade api");
    assert!(ok, "{said}");
    as_it_ran("after herd upgrade");
    let (ok, said) = run("herd stop api && cd / && env -u NODE_ENV herd start api");
    assert!(ok && said.contains("api: started"), "{said}");
    as_it_ran("after herd stop and herd start");
    let (ok, said) = run("herd save && herd delete api && herd resurrect");
    assert!(ok && said.contains("api: started"), "{said}");
    as_it_ran("after herd save and herd resurrect");
    // The workers never see how it travels.
    let (ok, said) = run("herd env 0 --name api");
    assert!(ok && !said.contains("HERD_RELAUNCH"), "{said}");
    // `--update-env` on a start takes this shell's environment instead.
    let (ok, said) = run("herd stop api && NODE_ENV=prod herd start api --update-env");
    assert!(ok, "{said}");
    assert!(
        body(sb.port).starts_with("two green (prod)"),
        "{}",
        body(sb.port)
    );
    // SIGTTIN's worker more counts as `herd scale`'s does.
    let said = run("herd status api --json").1;
    let v: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
    let master = v["pid"].as_u64().unwrap_or(0);
    assert!(run(&format!("kill -TTIN {master}")).0, "{said}");
    assert!(
        wait_until(T, || workers() == 3),
        "{}",
        run("herd status api").1
    );
    let (ok, said) = run("herd stop api && herd start api");
    assert!(ok && workers() == 3, "{said}");
}

/// A config file where a name goes, as deploy scripts use PM2's:
/// `pm2 startOrReload ecosystem.config.js --env production`, and `pm2
/// reload|restart|stop|delete ecosystem.config.js`, act on each of its apps.
#[test]
fn a_config_file_names_its_apps_for_reload_restart_stop_and_delete() {
    let sb = Sandbox::new("byfile");
    let (api, web) = sb.pm2_example(|js| js.replace("instances: 'max'", "instances: 1"));
    let run = |line: &str| sb.run(line);
    let both = |said: &str, what: &str| {
        said.contains(&format!("api: {what}")) && said.contains(&format!("web: {what}"))
    };

    let (ok, said) = run("herd startOrReload ecosystem.config.js --env production");
    assert!(ok && both(&said, "started"), "{said}");
    assert!(
        body(api).starts_with("hello from production"),
        "{}",
        body(api)
    );
    let (ok, said) = run("herd reload ecosystem.config.js");
    assert!(ok && both(&said, "reloaded"), "{said}");
    let (ok, said) = run("herd reload api --env production");
    assert!(!ok && said.contains("name the file"), "{said}");
    // Several names, as `pm2 restart api web`.
    let (ok, said) = run("herd restart api web");
    assert!(ok && both(&said, "restarted"), "{said}");

    // The apps not running start; the others restart.
    let (ok, said) =
        run("herd stop web && herd startOrRestart ecosystem.config.js --env production");
    assert!(
        ok && said.contains("api: restarted") && said.contains("web: started"),
        "{said}"
    );
    assert!(body(web).starts_with("web"), "{}", body(web));

    // PM2's `--only`: some of the file's apps (comma-separated).
    let (ok, said) = run("herd reload ecosystem.config.js --only web");
    assert!(
        ok && said.contains("web: reloaded") && !said.contains("api:") && !said.contains("jobs:"),
        "{said}"
    );
    let (ok, said) = run("herd stop ecosystem.config.js --only api,jobs");
    assert!(
        ok && said.contains("api: stopped") && !said.contains("web:"),
        "{said}"
    );
    let (ok, said) = run("herd reload ecosystem.config.js --only nope");
    assert!(
        !ok && said.contains("no app named \"nope\" (it has: api, web, jobs)"),
        "{said}"
    );
    let (ok, said) =
        run("herd stop ecosystem.config.js && herd start ecosystem.config.js --only api,web");
    assert!(
        ok && both(&said, "started") && !said.contains("jobs: started"),
        "{said}"
    );

    let (ok, said) = run("herd stop ecosystem.config.js && herd list");
    assert!(ok && both(&said, "stopped"), "{said}");
    let rows = said
        .lines()
        .filter(|l| (l.starts_with("api ") || l.starts_with("web ")) && l.ends_with(" stopped"));
    assert_eq!(rows.count(), 2, "{said}");
    let (ok, said) = run("herd delete ecosystem.config.js && herd list");
    assert!(ok && both(&said, "deleted"), "{said}");
    assert!(said.contains("no herd cluster is running"), "{said}");
}

/// An ecosystem file's app without a port (`examples/pm2/jobs.js`, a queue
/// consumer) runs in fork mode, as PM2 runs it, beside the clusters;
/// written for PM2, it stops on SIGINT, which herd's Node preload gives it
/// for herd's SIGTERM.
#[test]
fn an_app_without_a_port_runs_in_fork_mode_and_gets_pm2s_stop_signal() {
    let sb = Sandbox::new("fork");
    let (api, _) = sb.pm2_example(|js| js.replace("instances: 'max'", "instances: 1"));
    let run = |line: &str| sb.run(line);
    let (ok, said) = run("herd start ecosystem.config.js");
    assert!(
        ok && said.contains("jobs: started") && said.contains("1 worker, fork mode (no port)"),
        "{said}"
    );
    assert!(body(api).starts_with("hello"), "{}", body(api));
    let (_, said) = run("herd list");
    let row = said.lines().find(|l| l.starts_with("jobs ")).unwrap_or("");
    assert!(row.contains(" fork ") && row.contains(" - "), "{said}");
    let (ok, said) = run("herd reload jobs && herd stop jobs");
    assert!(ok && said.contains("jobs: reloaded 1 worker"), "{said}");
    let log = std::fs::read_to_string(sb.dir.join("state/herd/jobs.log")).unwrap_or_default();
    assert_eq!(
        log.matches("finishing the current job").count(),
        2,
        "once for the reload, once for the stop:\n{log}"
    );
}

/// PM2's YAML app declaration (`pm2-runtime process.yml` in PM2's Docker
/// guide): `herd start process.yml` and `herd run --config process.yml`
/// serve it; a YAML error is one line, naming where.
#[test]
fn a_yaml_process_file_starts_and_runs_as_pm2_runtime_runs_it() {
    let sb = Sandbox::new("yaml");
    sb.pm2_example(|js| js);
    let port = free_port();
    let yml = format!(
        "# PM2's process.yml\napps:\n  - name: api\n    script: app.js\n    instances: 2\n    env:\n      PORT: {port}\n      GREETING: yes\n"
    );
    std::fs::write(sb.app().join("process.yml"), yml).unwrap();
    let (ok, said) = sb.run("herd start process.yml");
    assert!(
        ok && said.contains("api: started") && said.contains("2 workers"),
        "{said}"
    );
    // YAML 1.2 as js-yaml reads it: `yes` is a string, not `true`.
    assert!(
        body(port).starts_with("yes (development)"),
        "{}",
        body(port)
    );
    let (ok, said) = sb.run("herd reload process.yml && herd delete process.yml");
    assert!(
        ok && said.contains("api: reloaded") && said.contains("api: deleted"),
        "{said}"
    );

    // In the foreground, as a container's entry point: herd's way, and
    // the Dockerfiles' `pm2 start process.yml --no-daemon`.
    for line in [
        "exec herd run --config process.yml",
        "exec herd start process.yml --no-daemon",
    ] {
        let mut fg = sb
            .command(line)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(body(port).starts_with("yes"), "{line}: {}", body(port));
        let status = terminate(&mut fg);
        assert!(status.is_some_and(|s| s.success()), "{line}: {status:?}");
        // Nothing was left behind to run on (a daemonized master would be).
        let (_, said) = sb.run("herd list");
        assert!(
            !said.lines().any(|l| l.starts_with("api ")),
            "{line}: {said}"
        );
    }

    std::fs::write(
        sb.app().join("bad.yaml"),
        "apps:\n - name: a\n  script: b\n",
    )
    .unwrap();
    let (ok, said) = sb.run("herd start bad.yaml");
    assert!(
        !ok && said.contains("line 3") && said.trim_end().lines().count() == 1,
        "{said}"
    );

    // PM2's `autostart: false`: left out of `herd start FILE`, started by `--only`.
    let later = free_port();
    let two = format!(
        "apps:\n  - name: api\n    script: app.js\n    env: {{PORT: {port}}}\n  - name: later\n    script: app.js\n    autostart: false\n    env: {{PORT: {later}}}\n"
    );
    std::fs::write(sb.app().join("two.yml"), two).unwrap();
    let (ok, said) = sb.run("herd start two.yml && herd list");
    assert!(
        ok && said.contains("api: started")
            && said.contains("later: not started (autostart: false)")
            && !said.lines().any(|l| l.starts_with("later ")),
        "{said}"
    );
    let (ok, said) = sb.run("herd reload two.yml");
    assert!(
        ok && said.contains("api: reloaded")
            && said.contains("later: not running (autostart: false)"),
        "{said}"
    );
    let (ok, said) = sb.run("herd start two.yml --only later");
    assert!(ok && said.contains("later: started"), "{said}");
    assert!(body(later).contains("from worker"), "{}", body(later));
}

/// PM2's `out_file` / `error_file` (`-o` / `-e`): each stream also goes
/// to its own file, as the workers printed it (with the time first under
/// `time: true`), for a log shipper; `herd logs` still has every line,
/// `herd flush` empties the copies too, and `/dev/null` (or PM2's `NULL`)
/// keeps a stream out of herd's log altogether. A leading `~` is the home
/// directory, as PM2 reads it.
#[test]
fn out_file_and_error_file_get_each_stream_as_pm2_writes_them() {
    let sb = Sandbox::new("outfile");
    std::fs::write(
        sb.app().join("talk.js"),
        "require('http').createServer((q, s) => { console.error('err ' + q.url); \
         console.log('out ' + q.url); s.end('ok'); }).listen(process.env.PORT);\n",
    )
    .unwrap();
    let port = free_port();
    std::fs::write(
        sb.app().join("ecosystem.config.js"),
        format!(
            "module.exports = {{ apps: [{{ name: 'talk', script: 'talk.js', instances: 2, \
             out_file: '~/logs/out.log', error_file: 'logs/err.log', time: true, \
             env: {{ PORT: {port} }} }}] }};\n"
        ),
    )
    .unwrap();
    let home = sb.app().display().to_string();
    let (ok, said) = sb.run(&format!("HOME={home} herd start ecosystem.config.js"));
    assert!(ok && said.contains("talk: started"), "{said}");
    assert_eq!(http_get(port, "/one").map(|r| r.0).ok(), Some(200));
    let read = |f: &str| std::fs::read_to_string(sb.app().join("logs").join(f)).unwrap_or_default();
    assert!(
        wait_until(T, || read("out.log").contains("out /one")
            && read("err.log").contains("err /one")),
        "out.log {:?}, err.log {:?}",
        read("out.log"),
        read("err.log")
    );
    // `2026-12-04T15:42:23.664Z: out /one`, and nothing of the other stream.
    let out = read("out.log");
    assert!(
        out.lines()
            .all(|l| l.starts_with("20") && l.contains("Z: out /")),
        "{out:?}"
    );
    assert!(!read("err.log").contains("out /"), "{}", read("err.log"));
    let (_, said) = sb.run("herd logs talk --nostream --lines 50");
    assert!(
        said.contains("out /one") && said.contains("err /one"),
        "{said}"
    );
    let (_, said) = sb.run("herd describe talk");
    assert!(
        said.contains("output: ") && said.contains("logs/out.log"),
        "{said}"
    );
    let (ok, said) = sb.run("herd flush talk");
    assert!(ok && said.contains("logs/err.log"), "{said}");
    assert_eq!(
        (read("out.log"), read("err.log")),
        (String::new(), String::new())
    );
    let (ok, said) = sb.run("herd delete talk");
    assert!(ok, "{said}");

    // `-e NULL` on the command line: stderr is kept nowhere.
    let (ok, said) = sb.run(&format!(
        "herd start talk.js --name quiet -e NULL --listen {port} \
         -o logs/quiet.json --log-type json --log-date-format 'YYYY [at] HH'"
    ));
    assert!(ok && said.contains("quiet: started"), "{said}");
    for path in ["/two", "/three"] {
        assert_eq!(http_get(port, path).map(|r| r.0).ok(), Some(200));
    }
    let log = log_showing(&sb, "quiet", "out /three");
    assert!(log.contains("out /two") && !log.contains("err /"), "{log}");
    assert!(!sb.app().join("NULL").exists());
    // PM2's `log_type: 'json'`, with `log_date_format` as its timestamp.
    let json = read("quiet.json");
    let first: serde_json::Value =
        serde_json::from_str(json.lines().next().unwrap_or_default()).unwrap_or_default();
    assert_eq!(first["message"], "out /two", "{json}");
    assert_eq!(
        (&first["type"], &first["app_name"]),
        (&"out".into(), &"quiet".into())
    );
    assert!(first["process_id"].is_u64(), "{json}");
    let stamp = first["timestamp"].as_str().unwrap_or_default();
    assert!(
        stamp.len() == 10 && stamp[..4].parse::<u32>().is_ok() && &stamp[4..8] == " at ",
        "{json}"
    );
    // PM2's --disable-logs: both streams to /dev/null, as `-e` above.
    let (ok, said) = sb.run(&format!(
        "herd start talk.js --name mute --disable-logs --listen {}",
        free_port()
    ));
    assert!(ok && said.contains("mute: started"), "{said}");
    let (_, said) = sb.run("herd describe mute");
    assert!(
        said.contains("output: /dev/null") && said.contains("error: /dev/null"),
        "{said}"
    );
}

/// `pm2 reset api` after a worker was killed: its restart count goes back
/// to 0, the worker found by `herd pid`.
#[test]
fn reset_sets_the_restart_counts_back_to_0() {
    let sb = Sandbox::new("reset");
    sb.pm2_example(|js| js);
    let (ok, said) = sb.run("herd start app.js -i 1");
    assert!(ok && said.contains("app: started"), "{said}");
    let restarts = || {
        let (_, said) = sb.run("herd status app --json");
        let v: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
        v["workers"][0]["restarts"].as_u64()
    };
    let (ok, said) = sb.run("kill -9 $(herd pid app)");
    assert!(ok, "{said}");
    assert!(wait_until(T, || restarts() == Some(1)), "{:?}", restarts());
    let (ok, said) = sb.run("herd reset app");
    assert!(
        ok && said.contains("app: restart counts set to 0"),
        "{said}"
    );
    assert_eq!(restarts(), Some(0));
}

/// PM2's `pm2 startup systemd` and `pm2 save --force` (an empty list, so
/// that nothing comes back at boot).
#[test]
fn startup_takes_pm2s_platform_word_and_save_force_saves_nothing() {
    let sb = Sandbox::new("platform");
    let (ok, said) = sb.run("herd startup ubuntu");
    assert!(ok && said.contains("ExecStart="), "{said}");
    let (ok, said) = sb.run("herd startup launchd");
    assert!(
        !ok && said.contains("systemd unit only") && said.lines().count() == 1,
        "{said}"
    );
    let (ok, said) = sb.run("herd save");
    assert!(!ok && said.contains("--force"), "{said}");
    let (ok, said) = sb.run("herd save --force && herd resurrect");
    assert!(
        ok && said.contains("saved an empty list") && said.contains("nothing to start"),
        "{said}"
    );
}

/// `pm2 start app.ts`: TypeScript runs with the first of bun, tsx and
/// ts-node on PATH (here a stand-in `tsx`), named after the script; with
/// none, and for a file no interpreter is known for, the error says what
/// to do rather than "command not found".
#[test]
fn a_typescript_app_runs_with_the_runner_on_path() {
    let sb = Sandbox::new("ts");
    let app = sb.app();
    std::fs::write(
        app.join("app.ts"),
        "import http from 'node:http';\nhttp.createServer((_q, s) => s.end('ts\\n')).listen(Number(process.env.PORT));\n",
    )
    .unwrap();
    std::fs::write(app.join("main.lua"), "print('x')\n").unwrap();
    std::fs::create_dir_all(app.join("bin")).unwrap();
    // A stand-in for tsx that runs the app's JavaScript part with node.
    let tsx = app.join("bin/tsx");
    std::fs::write(
        &tsx,
        "#!/bin/sh\nsed -e 's/import http from .node:http.;/const http = require(\"http\");/' \"$1\" > \"$1.$$.js\"\nexec node \"$1.$$.js\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&tsx, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let herd_dir = Path::new(HERD).parent().unwrap().display().to_string();
    // No runner on PATH (bun may be in /usr/bin: .ci/run installs it).
    let (ok, said) = sb.run(&format!("PATH={herd_dir} herd start app.ts"));
    assert!(
        !ok && said.contains("TypeScript runs with bun, tsx or ts-node"),
        "{said}"
    );
    let (ok, said) = sb.run("herd start main.lua");
    assert!(
        !ok && said.contains("herd knows no interpreter for it")
            && !said.contains("command not found"),
        "{said}"
    );

    // The stand-in, with only what it runs beside it (bun, where
    // installed, would go first).
    std::fs::create_dir_all(app.join("tools")).unwrap();
    for tool in ["sed", "node"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let at = String::from_utf8_lossy(&found.stdout).trim().to_string();
        std::os::unix::fs::symlink(&at, app.join("tools").join(tool)).unwrap();
    }
    let (ok, said) = sb.run(&format!(
        "PATH=$PWD/bin:$PWD/tools:{herd_dir} herd start app.ts -i 2"
    ));
    assert!(
        ok && said.contains("app: started") && said.contains("2 workers"),
        "{said}"
    );
    assert_eq!(body(sb.port), "ts\n");
}

/// The whole answer to one raw request (head and body).
fn raw(port: u16, req: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `pm2 serve DIR PORT --spa` and PM2's `script: 'serve'`: a directory's
/// files, never a file outside it or a dot-file, with what browsers and
/// players ask of a file server (304, one range, HEAD, a directory's
/// index); the rest of the command line is `herd start`'s.
#[test]
fn serve_gives_a_directorys_files_as_pm2_serve_does() {
    let sb = Sandbox::new("serve");
    let site = sb.app().join("site");
    std::fs::create_dir_all(site.join("docs")).unwrap();
    std::fs::write(site.join("index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(site.join("app.css"), "body{}").unwrap();
    std::fs::write(site.join("docs/index.html"), "docs").unwrap();
    std::fs::write(site.join(".env"), "SECRET=1").unwrap();
    std::fs::write(sb.app().join("outside.txt"), "outside").unwrap();
    // A FIFO must not hold a request (or the server) waiting for a writer.
    let fifo = std::process::Command::new("mkfifo")
        .arg(site.join("pipe"))
        .status()
        .unwrap();
    assert!(fifo.success());
    let port = free_port();
    let get = |path: &str, headers: &str| {
        raw(
            port,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"),
        )
    };

    let (ok, said) = sb.run(&format!("unset PORT; herd serve site {port} --spa -i 2"));
    assert!(
        ok && said.contains(&format!("static-page-server-{port}: started"))
            && said.contains("2 workers"),
        "{said}"
    );
    let home = get("/", "");
    assert!(
        home.starts_with("HTTP/1.1 200")
            && home.contains("text/html")
            && home.ends_with("<h1>home</h1>"),
        "{home}"
    );
    // Client-side routes get the homepage; a dot-file is as absent.
    assert!(get("/users/42", "").ends_with("<h1>home</h1>"));
    assert!(!get("/.env", "").contains("SECRET"));
    assert!(get("/pipe", "").starts_with("HTTP/1.1 200")); // --spa: the homepage
    assert!(get("/pipe", "").ends_with("<h1>home</h1>"));
    for escape in [
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/docs/..%2f..%2foutside.txt",
    ] {
        let a = get(escape, "");
        // Refused (by the proxy or the file server), never the file.
        assert!(
            a.starts_with("HTTP/1.1 4") && !a.ends_with("outside"),
            "{escape}: {a}"
        );
    }
    let css = get("/app.css", "");
    assert!(css.contains("text/css") && css.ends_with("body{}"), "{css}");
    // `..` inside the directory is resolved, as nginx does.
    assert!(get("/docs/../app.css", "").ends_with("body{}"));
    let tag = css
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an ETag")
        .to_string();
    assert!(get("/app.css", &format!("If-None-Match: {tag}\r\n")).starts_with("HTTP/1.1 304"));
    let part = get("/app.css", "Range: bytes=0-3\r\n");
    assert!(
        part.starts_with("HTTP/1.1 206") && part.contains("bytes 0-3/6") && part.ends_with("body"),
        "{part}"
    );
    let head = raw(
        port,
        "HEAD /app.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let dir = get("/docs", "");
    assert!(
        dir.starts_with("HTTP/1.1 301") && dir.contains("location: /docs/"),
        "{dir}"
    );
    assert!(get("/docs/", "").ends_with("docs"));
    // Not an open redirect: `//docs` would send a browser to host `docs`.
    let dir = get("//docs", "");
    assert!(dir.contains("location: /docs/\r\n"), "{dir}");
    let (ok, said) = sb.run(&format!("herd reload static-page-server-{port}"));
    assert!(ok && said.contains("reloaded 2 workers"), "{said}");
    assert!(get("/", "").ends_with("<h1>home</h1>"));

    // A typo'd directory is one line, at once.
    let (ok, said) = sb.run("herd serve nosuch 8099");
    assert!(!ok && said.contains("no such directory to serve"), "{said}");

    // PM2's ecosystem form, with basic authentication.
    let port2 = free_port();
    let eco = format!(
        r#"{{"apps": [{{"name": "files", "script": "serve", "env": {{"PM2_SERVE_PATH": "site", "PM2_SERVE_PORT": {port2}, "PM2_SERVE_BASIC_AUTH": "true", "PM2_SERVE_BASIC_AUTH_USERNAME": "u", "PM2_SERVE_BASIC_AUTH_PASSWORD": "p"}}}}]}}"#
    );
    std::fs::write(sb.app().join("files.json"), eco).unwrap();
    let (ok, said) = sb.run("herd start files.json");
    assert!(ok && said.contains("files: started"), "{said}");
    let denied = raw(
        port2,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        denied.starts_with("HTTP/1.1 401") && denied.contains("www-authenticate: Basic"),
        "{denied}"
    );
    // "u:p" in base64.
    let let_in = raw(
        port2,
        "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic dTpw\r\nConnection: close\r\n\r\n",
    );
    assert!(let_in.ends_with("<h1>home</h1>"), "{let_in}");
}

/// `pm2 start npm --name web -- start` and `pm2 start "npm start"`: a
/// program (not only a script) followed by herd's options, then its own
/// after `--`; and a whole command line in one word, run through `sh -c`.
/// (With `node` in npm's place: Debian's nodejs comes without npm.)
#[test]
fn a_program_with_options_after_it_and_a_one_word_command_line_start() {
    let sb = Sandbox::new("program");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pm2");
    std::fs::copy(Path::new(examples).join("app.js"), sb.app().join("app.js")).unwrap();
    // `--check` checks and starts nothing, as with `herd run`.
    let out = sb.sh("herd start --check node --name web -i 1 -- app.js && herd list");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("ok: web: 1 worker, proxy mode") && said.contains("no herd cluster"),
        "{said}"
    );
    let out = sb.sh("herd start node --name web -i 1 -- app.js");
    let said = text(&out);
    assert!(
        out.status.success() && said.contains("web: started, master pid"),
        "{said}"
    );
    assert!(said.contains("1 worker,"), "{said}");
    assert!(body(sb.port).contains("from worker"), "{said}");
    let out = sb.sh("herd stop web");
    assert!(out.status.success(), "{}", text(&out));

    let out = sb.sh("herd start 'node app.js'");
    let said = text(&out);
    assert!(
        out.status.success() && said.contains("app: started"),
        "{said}"
    );
    assert!(body(sb.port).contains("from worker"), "{said}");
    // PM2's spellings of herd's flags, and its interpreter options.
    let out = sb.sh(
        "herd stop all && herd start app.js -n api -i 1 --max-memory-restart 300M \
         --node-args='--max-old-space-size=123 --no-deprecation' --time --merge-logs",
    );
    let said = text(&out);
    assert!(
        out.status.success() && said.contains("api: started"),
        "{said}"
    );
    assert!(body(sb.port).contains("from worker"), "{said}");
    let listed = text(&sb.sh("herd prettylist && herd show api"));
    assert!(listed.contains("\"name\": \"api\""), "{listed}");
    let pid: u32 = listed
        .lines()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix("0 ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no worker row: {listed}"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(
        args[..4],
        [
            "node",
            "--max-old-space-size=123",
            "--no-deprecation",
            "app.js"
        ],
        "{args:?}"
    );
    // A program's own flags stay its own.
    let out = sb.sh("herd stop all && herd start node --no-warnings app.js");
    let said = text(&out);
    assert!(
        out.status.success() && said.contains("app: started"),
        "{said}"
    );
    assert!(body(sb.port).contains("from worker"), "{said}");
}

/// Express's generated layout: `script: './bin/www'`, a file without an
/// extension whose `#!/usr/bin/env node` line PM2 honours, executable or
/// not. It runs with node and herd's preload: its hard-coded
/// `listen(3000)` is served on herd's port, by two workers.
#[test]
fn an_express_bin_www_runs_with_node_and_herds_preload() {
    let sb = Sandbox::new("www");
    std::fs::create_dir_all(sb.app().join("bin")).unwrap();
    std::fs::write(
        sb.app().join("bin/www"),
        "#!/usr/bin/env node\n\
         require('http').createServer((q, r) => r.end('www ' + process.pid + '\\n')).listen(3000);\n",
    )
    .unwrap();
    std::fs::write(
        sb.app().join("ecosystem.config.js"),
        format!(
            "module.exports = {{ apps: [{{ name: 'www', script: './bin/www', instances: 2, \
             exec_mode: 'cluster', env: {{ PORT: {} }} }}] }};\n",
            sb.port
        ),
    )
    .unwrap();
    for mode in [0o644, 0o755] {
        std::fs::set_permissions(
            sb.app().join("bin/www"),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
        let (ok, said) = sb.run("herd start ecosystem.config.js");
        assert!(ok && said.contains("www: started"), "mode {mode:o}: {said}");
        let pids: std::collections::BTreeSet<String> = (0..6).map(|_| body(sb.port)).collect();
        assert_eq!(pids.len(), 2, "mode {mode:o}: two workers answer: {pids:?}");
        assert!(pids.iter().all(|b| b.starts_with("www ")), "{pids:?}");
        let (ok, said) = sb.run("herd delete www");
        assert!(ok, "{said}");
    }
}

/// A Node program named by itself rather than as `node …` (here tsx, the
/// TypeScript runner, whose `#!` line names node and which runs the app in
/// a child): herd's preload reaches the app, so a port written in its code
/// is served on herd's port by two workers, in proxy mode and in shared
/// mode, where tsx forks the app with Node's IPC at fd 3 (it sees a
/// `process.send`) and herd's socket follows it, and messages reach it.
#[test]
fn a_node_program_by_its_own_name_gets_the_preload() {
    Command::new("tsx")
        .arg("--version")
        .output()
        .expect("tsx (.ci/run installs it from npm)");
    let sb = Sandbox::new("tsx");
    std::fs::write(
        sb.app().join("app.ts"),
        "import http from 'node:http';\nconst port: number = 3000;\n\
         http.createServer((_q, r) => r.end('tsx ' + process.pid)).listen(port);\n\
         process.on('message', (m) => process.send?.({ echo: m }));\n",
    )
    .unwrap();
    for mode in ["proxy", "shared"] {
        let line = format!("herd start app.ts --interpreter tsx --mode {mode} -i 2");
        let (ok, said) = sb.run(&line);
        assert!(ok && said.contains(&format!("{mode} mode on")), "{said}");
        let mut answers = std::collections::BTreeSet::new();
        wait_until(T, || {
            answers.insert(body(sb.port));
            answers.len() >= 2
        });
        assert!(
            answers.len() == 2 && answers.iter().all(|b| b.starts_with("tsx ")),
            "{mode}: {answers:?}"
        );
        log_showing(&sb, "app", "the app asks for port 3000 in its code");
        let (ok, said) = sb.run(r#"herd send --name app 1 '{"ping":1}'"#);
        assert!(ok, "{mode}: {said}");
        log_showing(&sb, "app", r#"worker 1 says: {"echo":{"ping":1}}"#);
        let (ok, said) = sb.run("herd delete app");
        assert!(ok, "{mode}: {said}");
    }
}

/// Bun (PM2's runner for TypeScript, and `--interpreter bun`): herd's
/// preload runs in it too (`BUN_OPTIONS=--preload`), so `Bun.serve()`, an
/// entry file's `export default { fetch }` and node:http's `listen()` on a
/// port written in the code are served on herd's port by every worker, as
/// `node app.js` is, a reload fails no request, and messages go both
/// ways (`process.on('message')`, `process.send`); so is an app of Node's
/// `cluster` module, whose workers listen by themselves. Bun cannot take a
/// socket from herd, so the fd modes are refused with a line that says so.
#[test]
fn bun_apps_serve_on_herds_port_in_proxy_mode_and_are_refused_the_fd_modes() {
    Command::new("bun")
        .arg("--version")
        .output()
        .expect("bun (.ci/run installs it from npm)");
    let sb = Sandbox::new("bun");
    let own = free_port();
    std::fs::write(
        sb.app().join("server.ts"),
        format!(
            "export default {{ port: {own}, fetch(): Response {{ return new Response('ts ' + process.pid); }} }};\n"
        ),
    )
    .unwrap();
    std::fs::write(
        sb.app().join("serve.js"),
        "Bun.serve({ port: 3000, fetch() { return new Response('serve ' + process.pid); } });\n",
    )
    .unwrap();
    std::fs::write(
        sb.app().join("www.js"),
        "require('http').createServer((q, r) => r.end('www ' + process.pid)).listen(3000);\n\
         process.on('message', (m) => process.send({ echo: m }));\n",
    )
    .unwrap();
    // No port given: herd serves the app on the one its code names.
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let at = if v6 { "[::]" } else { "0.0.0.0" };
    let answers = served_by_two_at(
        &sb,
        "unset PORT; herd start server.ts -i 2",
        &format!("{at}:{own}"),
        own,
    );
    assert!(answers.iter().all(|b| b.starts_with("ts ")), "{answers:?}");
    let (ok, said) = sb.run("herd reload server");
    assert!(ok && said.contains("reloaded 2 workers"), "{said}");
    let again: std::collections::BTreeSet<String> = (0..6).map(|_| body(own)).collect();
    assert!(
        again.is_disjoint(&answers),
        "new workers answer: {again:?} {answers:?}"
    );
    for (app, want) in [("serve.js", "serve "), ("www.js", "www ")] {
        let name = app.trim_end_matches(".js");
        let line = format!("herd start {app} --interpreter bun -i 2");
        let answers = served_by_two(&sb, &line, sb.port);
        assert!(answers.iter().all(|b| b.starts_with(want)), "{answers:?}");
        log_showing(&sb, name, "the app asks for port 3000 in its code");
        if app == "www.js" {
            // Messages both ways, as under Node.
            let (ok, said) = sb.run(r#"herd send --name www 1 '{"ping":1}'"#);
            assert!(ok, "{said}");
            log_showing(&sb, name, r#"worker 1 says: {"echo":{"ping":1}}"#);
        }
        let (ok, said) = sb.run(&format!("herd delete {name}"));
        assert!(ok, "{said}");
    }
    for mode in ["shared", "reuseport", "dispatch"] {
        let (ok, said) = sb.run(&format!(
            "herd start server.ts --name b{mode} --mode {mode}"
        ));
        assert!(
            !ok && said.contains("Bun serves only the port or socket it binds itself")
                && said.contains(&format!("cannot run in {mode} mode: use --mode proxy")),
            "{mode}: {said}"
        );
    }
    // A node:cluster app: under Bun its workers listen by themselves (on
    // the herd worker's port, shared through SO_REUSEPORT; herd's pooled
    // connections keep to the ones they reached).
    let cluster_js = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/node/cluster.js"
    );
    let (ok, said) = sb.run(&format!(
        "herd start {cluster_js} --name bcluster --interpreter bun -i 2"
    ));
    assert!(ok, "{said}");
    let mut pids = std::collections::BTreeSet::new();
    wait_until(T, || {
        pids.insert(body(sb.port));
        pids.len() >= 2
    });
    assert!(
        pids.len() >= 2
            && pids
                .iter()
                .all(|b| b.starts_with("hello from cluster worker")),
        "{pids:?}"
    );
    // Each of its workers listened (a second one on a Unix socket would
    // have failed with EADDRINUSE).
    let (_, log) = sb.run("herd logs bcluster --nostream --lines 200");
    assert!(!log.contains("already in use"), "{log}");
    let (ok, said) = sb.run("herd delete bcluster");
    assert!(ok, "{said}");
    // Nor can a deploy bring Bun into a mode it cannot serve.
    let (ok, said) = sb.run("herd start www.js --name nshared --mode shared -i 1");
    assert!(ok, "{said}");
    let (ok, said) = sb.run("herd deploy nshared --canary 50 -- bun www.js");
    assert!(!ok && said.contains("cannot run in shared mode"), "{said}");
}

/// Runs `line`, which starts a cluster of two workers on 0.0.0.0:`port`;
/// returns the answers of both to a few requests.
fn served_by_two(sb: &Sandbox, line: &str, port: u16) -> std::collections::BTreeSet<String> {
    served_by_two_at(sb, line, &format!("0.0.0.0:{port}"), port)
}

/// As [`served_by_two`], with herd saying it serves on `at`.
fn served_by_two_at(
    sb: &Sandbox,
    line: &str,
    at: &str,
    port: u16,
) -> std::collections::BTreeSet<String> {
    let (ok, said) = sb.run(line);
    assert!(
        ok && said.contains(&format!("proxy mode on {at};")),
        "{said}"
    );
    // Both, soon: a worker whose program briefly had a child listening on
    // its port (the spawner below) may be found ready before it serves,
    // and the proxy then retries its requests on the other.
    let mut answers = std::collections::BTreeSet::new();
    wait_until(T, || {
        answers.insert(body(port));
        answers.len() >= 2
    });
    assert_eq!(answers.len(), 2, "two workers answer: {answers:?}");
    answers
}

/// `herd start npm --name web -- start`, as `pm2 start npm --name web --
/// start`: npm runs the package's start script (`node app.js`, whose code
/// names its port) as a child of its own, and herd serves the app on that
/// port with two workers, as for `herd start app.js`. A Node launcher that
/// runs the app as its child (stdio shared) hands it herd's socket too, in
/// shared mode. A script that starts something else gets `PORT`.
#[test]
fn npm_start_and_node_launchers_serve_the_apps_own_port() {
    Command::new("npm")
        .arg("--version")
        .output()
        .expect("npm (.ci/run installs it)");
    let sb = Sandbox::new("npmstart");
    let own = free_port();
    std::fs::write(
        sb.app().join("app.js"),
        format!(
            "require('http').createServer((q, r) => r.end('app ' + process.pid + ' ' + process.ppid))\n\
             .listen(process.env.PORT || {own});\n"
        ),
    )
    .unwrap();
    std::fs::write(
        sb.app().join("package.json"),
        r#"{"name": "npmstart", "version": "1.0.0", "scripts": {"start": "NODE_ENV=production node app.js", "py": "python3 py.py"}}"#,
    )
    .unwrap();
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let at = if v6 { "[::]" } else { "0.0.0.0" };
    served_by_two_at(
        &sb,
        "unset PORT; herd start npm --name web -i 2 -- start",
        &format!("{at}:{own}"),
        own,
    );
    let (ok, said) = sb.run("herd delete web");
    assert!(ok, "{said}");
    // The same from an ecosystem file in cluster mode.
    std::fs::write(
        sb.app().join("ecosystem.config.js"),
        "module.exports = { apps: [{ name: 'eco', script: 'npm', args: 'start', instances: 2, \
         exec_mode: 'cluster' }] };\n",
    )
    .unwrap();
    served_by_two_at(
        &sb,
        "unset PORT; herd start ecosystem.config.js",
        &format!("{at}:{own}"),
        own,
    );
    let (ok, said) = sb.run("herd delete eco");
    assert!(ok, "{said}");
    // A launcher: the app is its child, sharing its stdio, in shared mode.
    std::fs::write(
        sb.app().join("launch.js"),
        "require('child_process').spawn(process.execPath, ['app.js'], { stdio: 'inherit' })\n\
         .on('exit', (code) => process.exit(code ?? 1));\n",
    )
    .unwrap();
    let port = free_port();
    let (ok, said) = sb.run(&format!(
        "herd start launch.js --mode shared -i 2 --listen 127.0.0.1:{port}"
    ));
    assert!(ok && said.contains("shared mode on 127.0.0.1:"), "{said}");
    let mut answers = std::collections::BTreeSet::new();
    wait_until(T, || {
        answers.insert(body(port));
        answers.len() >= 2
    });
    assert_eq!(answers.len(), 2, "two workers answer: {answers:?}");
    // Served by the launchers' children, not by processes of their own.
    let (ok, pids) = sb.run("herd pid launch");
    assert!(ok, "{pids}");
    for a in &answers {
        let parent = a.rsplit(' ').next().unwrap_or("");
        assert!(
            pids.lines().any(|p| p.trim() == parent),
            "{a} not a launcher's child: {pids}"
        );
    }
    let (ok, said) = sb.run("herd delete launch");
    assert!(ok, "{said}");
    // Not a Node script: PORT, as for any program.
    std::fs::write(
        sb.app().join("py.py"),
        "import os, http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200); self.end_headers(); self.wfile.write(b'py')\n\
         http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n",
    )
    .unwrap();
    let port = free_port();
    let (ok, said) = sb.run(&format!(
        "herd start npm --name pyweb --listen {port} -- run py"
    ));
    assert!(ok, "{said}");
    assert!(
        wait_until(T, || http_get(port, "/")
            .is_ok_and(|(s, b)| s == 200 && b == "py")),
        "{said}"
    );
    let (ok, said) = sb.run("herd delete pyweb");
    assert!(ok, "{said}");
}

/// npm's bins are symbolic links (`node_modules/.bin/srv` to
/// `../srv/bin/srv.js`), and Node runs them from where the link points, so
/// their relative `require()`s work: with herd's preload too, in a worker
/// (a first version of it left Node at the link's path: yarn failed so).
#[test]
fn a_symlinked_node_bin_finds_its_own_modules() {
    let sb = Sandbox::new("nodebin");
    let pkg = sb.app().join("node_modules/srv");
    std::fs::create_dir_all(pkg.join("bin")).unwrap();
    std::fs::create_dir_all(pkg.join("lib")).unwrap();
    std::fs::create_dir_all(sb.app().join("node_modules/.bin")).unwrap();
    std::fs::write(
        pkg.join("lib/answer.js"),
        "module.exports = 'srv ' + process.pid;\n",
    )
    .unwrap();
    std::fs::write(
        pkg.join("bin/srv.js"),
        "#!/usr/bin/env node\n\
         const answer = require(__dirname + '/../lib/answer');\n\
         require('http').createServer((q, r) => r.end(answer)).listen(process.env.PORT || 3000);\n",
    )
    .unwrap();
    std::fs::set_permissions(
        pkg.join("bin/srv.js"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../srv/bin/srv.js", sb.app().join("node_modules/.bin/srv"))
        .unwrap();
    let port = free_port();
    let answers = served_by_two(
        &sb,
        &format!("herd start node_modules/.bin/srv -i 2 --listen {port}"),
        port,
    );
    assert!(answers.iter().all(|a| a.starts_with("srv ")), "{answers:?}");
}

/// A Node worker that starts a helper server of its own after it listens:
/// the helper, which inherits herd's preload, binds the port it asks for,
/// not the worker's.
#[test]
fn a_node_workers_own_child_server_listens_where_it_asks() {
    let sb = Sandbox::new("nodechild");
    let helper = free_port();
    let script = r#"const http = require('http');
const { spawn } = require('child_process');
http.createServer((q, r) => r.end('main ' + process.pid)).listen(process.env.PORT, () => {
  if (process.env.HERD_WORKER_ID !== '0') return;
  const code = "require('http').createServer((q, r) => r.end('helper')).listen(HELPER)";
  spawn(process.execPath, ['-e', code], { stdio: 'ignore' });
});
"#
    .replace("HELPER", &helper.to_string());
    std::fs::write(sb.app().join("web.js"), script).unwrap();
    let (ok, said) = sb.run("herd start web.js -i 2");
    assert!(ok && said.contains("web: started"), "{said}");
    let mut got = None;
    assert!(
        wait_until(T, || {
            got = http_get(helper, "/").ok();
            got.as_ref()
                .is_some_and(|(s, b)| *s == 200 && b == "helper")
        }),
        "{got:?}"
    );
    assert!(body(sb.port).starts_with("main "), "{}", body(sb.port));
}

/// A Python script whose code names its port (`HTTPServer(("", 5000))`,
/// Flask's `app.run(port=5000)`) is served there by herd's workers when no
/// port is given, as PM2 would run it, through herd's Python preload; a
/// script with a `#!` line runs with its python, executable or not. Unlike
/// a Node app's, the workers keep `PORT`, so `os.environ["PORT"]` works.
#[test]
fn with_no_port_given_a_python_script_is_served_on_the_port_its_code_names() {
    let sb = Sandbox::new("pyport");
    let (own, local, child) = (free_port(), free_port(), free_port());
    let server = sb.app().join("server.py");
    // Worker 0 then starts a Python program that binds a port of its own.
    std::fs::write(
        &server,
        format!(
            "#!/usr/bin/env python3\n\
             import os, subprocess, sys\n\
             from http.server import HTTPServer, BaseHTTPRequestHandler\n\
             class H(BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       b = ('py %d PORT=%s child=%s' % (os.getpid(), os.environ.get('PORT'), bound)).encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(b)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(b)\n\
             server = HTTPServer(('', {own}), H)\n\
             bound = None\n\
             if os.environ['HERD_WORKER_ID'] == '0':\n\
             \x20   child = 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", {child})); print(s.getsockname()[1])'\n\
             \x20   bound = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout.strip()\n\
             server.serve_forever()\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&server, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let answers = served_by_two(&sb, "unset PORT; herd start server.py -i 2", own);
    assert!(
        answers
            .iter()
            .all(|b| b.starts_with("py ") && !b.contains("PORT=None")),
        "{answers:?}"
    );
    // The worker's own child bound the port it asked for, not herd's.
    assert!(
        answers
            .iter()
            .any(|b| b.ends_with(&format!("child={child}"))),
        "{answers:?}"
    );
    // Flask's development server, on the loopback address it names.
    std::fs::write(
        sb.app().join("site.py"),
        format!(
            "from flask import Flask\n\
             app = Flask(__name__)\n\
             @app.get('/')\n\
             def root():\n\
             \x20   return 'flask'\n\
             app.run(port={local})\n"
        ),
    )
    .unwrap();
    // One quoted word, as `pm2 start "python3 site.py"`: plain words, run as such.
    let (ok, said) = sb.run("unset PORT; herd start \"python3 site.py\" -i 2");
    assert!(
        ok && said.contains(&format!("proxy mode on 127.0.0.1:{local};")),
        "{said}"
    );
    assert_eq!(body(local), "flask");
    // uvicorn's reloader binds the socket, and its server process listens.
    let reloaded = free_port();
    std::fs::write(
        sb.app().join("asgi.py"),
        format!(
            "import os, uvicorn\n\
             async def app(scope, receive, send):\n\
             \x20   body = b'asgi %d' % os.getpid()\n\
             \x20   length = [(b'content-length', str(len(body)).encode())]\n\
             \x20   await send({{'type': 'http.response.start', 'status': 200, 'headers': length}})\n\
             \x20   await send({{'type': 'http.response.body', 'body': body}})\n\
             if __name__ == '__main__':\n\
             \x20   uvicorn.run('asgi:app', host='0.0.0.0', port={reloaded}, reload=True)\n"
        ),
    )
    .unwrap();
    served_by_two(&sb, "unset PORT; herd start asgi.py -i 2", reloaded);
    // FastAPI's `uvicorn.run(app, port=…)` on uvloop (what `fastapi[standard]`
    // installs): uvloop binds through Python's socket module, and listens in C.
    let looped = free_port();
    std::fs::write(
        sb.app().join("fast.py"),
        format!(
            "import uvicorn\n\
             from asgi import app\n\
             uvicorn.run(app, host='0.0.0.0', port={looped}, loop='uvloop')\n"
        ),
    )
    .unwrap();
    served_by_two(&sb, "unset PORT; herd start fast.py -i 2", looped);
    // A Python program started without herd's channel (subprocess closes
    // fds) that has other files at its number when it listens: the
    // preload's message must not go into them.
    let spawner = free_port();
    let script = r#"import os, subprocess, sys
from http.server import HTTPServer, BaseHTTPRequestHandler
child = """import os, socket
fds = [os.open(n, os.O_RDWR | os.O_CREAT | os.O_TRUNC) for n in ('f1', 'f2', 'f3')]
s = socket.socket()
s.bind(('127.0.0.1', CHILD))
s.listen()
print(sum(os.fstat(f).st_size for f in fds))
"""
written = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout.strip()
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        b = ('written=%s pid=%d' % (written, os.getpid())).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(b)))
        self.end_headers()
        self.wfile.write(b)
HTTPServer(('', SPAWNER), H).serve_forever()
"#;
    let script = script
        .replace("CHILD", &free_port().to_string())
        .replace("SPAWNER", &spawner.to_string());
    std::fs::write(sb.app().join("spawner.py"), script).unwrap();
    let answers = served_by_two(&sb, "unset PORT; herd start spawner.py -i 2", spawner);
    assert!(
        answers.iter().all(|b| b.starts_with("written=0 ")),
        "{answers:?}"
    );
}

/// PM2's `--uid` / `--user` (`uid`, `gid` in an ecosystem file): the
/// workers run as that user, with its HOME, and still reach herd's Python
/// preload (the app is served on the port its code names) and their
/// sd_notify socket (`--wait-ready`), which live in a directory of that
/// user's, gone with the master.
#[test]
fn workers_run_as_the_user_given() {
    let sb = Sandbox::new("user");
    let port = free_port();
    std::fs::write(
        sb.app().join("who.py"),
        format!(
            "import os, socket\n\
             from http.server import HTTPServer, BaseHTTPRequestHandler\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             s.connect(os.environ['NOTIFY_SOCKET'])\n\
             s.send(b'READY=1')\n\
             class H(BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       b = ('uid=%d home=%s %d' % (os.getuid(), os.environ['HOME'], os.getpid())).encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(b)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(b)\n\
             HTTPServer(('', {port}), H).serve_forever()\n"
        ),
    )
    .unwrap();
    let id = |args: &[&str]| {
        let out = Command::new("id").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let line = "unset PORT; herd start -i 2 --user nobody --wait-ready --name who -- /usr/bin/python3 who.py";
    if id(&["-u"]) != "0" {
        let (ok, said) = sb.run(line);
        assert!(
            !ok && said.contains("only root can run workers as another user"),
            "{said}"
        );
        return;
    }
    let answers = served_by_two(&sb, line, port);
    let nobody = id(&["-u", "nobody"]);
    let home = String::from_utf8_lossy(
        &Command::new("getent")
            .args(["passwd", "nobody"])
            .output()
            .unwrap()
            .stdout,
    )
    .split(':')
    .nth(5)
    .unwrap_or_default()
    .to_string();
    assert!(
        answers
            .iter()
            .all(|b| b.starts_with(&format!("uid={nobody} home={home} "))),
        "{answers:?}"
    );
    let (_, said) = sb.run("herd describe who");
    assert!(said.contains("; user: nobody"), "{said}");
    let (_, said) = sb.run("herd status who --json");
    let status: serde_json::Value = serde_json::from_str(&said).unwrap_or_default();
    let master = status["pid"].as_u64().unwrap_or_default();
    let workers_dir = || {
        std::fs::read_dir(sb.dir.join("tmp"))
            .unwrap()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("herd-0-workers-{master}-"))
            })
    };
    assert!(master > 0 && workers_dir(), "{said}");
    let (ok, said) = sb.run("herd delete who");
    assert!(ok, "{said}");
    assert!(!workers_dir());
    // From an ecosystem file, as PM2 spells it; an unknown user is refused.
    std::fs::write(
        sb.app().join("ecosystem.config.js"),
        "module.exports = { apps: [{ name: 'eco', script: 'who.py', interpreter: '/usr/bin/python3', \
         uid: 'nobody', gid: 'nogroup', instances: 2, exec_mode: 'cluster' }] };\n",
    )
    .unwrap();
    served_by_two(&sb, "unset PORT; herd start ecosystem.config.js", port);
    let (ok, said) = sb.run("herd start who.py --user no-such-user-here");
    assert!(
        !ok && said.contains("--user no-such-user-here: no such user"),
        "{said}"
    );
}

/// A Python worker's `print()` reaches the log as it is called, not in
/// 8 KiB blocks once the pipe's buffer fills: herd sets `PYTHONUNBUFFERED`
/// for a Python program, as PM2 does, unless the environment sets it.
#[test]
fn a_python_workers_prints_reach_the_log_at_once() {
    let sb = Sandbox::new("pyprint");
    std::fs::write(
        sb.app().join("printer.py"),
        "import os, time\n\
         print('printed PYTHONUNBUFFERED=%s' % os.environ.get('PYTHONUNBUFFERED'))\n\
         time.sleep(300)\n",
    )
    .unwrap();
    let (ok, said) = sb.run("herd start printer.py --mode fork");
    assert!(ok, "{said}");
    log_showing(&sb, "printer", "printed PYTHONUNBUFFERED=1");
    // Set (even empty, which Python reads as unset): left as given.
    let (ok, said) = sb.run("PYTHONUNBUFFERED=0 herd start printer.py --mode fork --name kept");
    assert!(ok, "{said}");
    let (ok, said) = sb.run("herd env 0 --name kept");
    assert!(ok && said.contains("PYTHONUNBUFFERED=0"), "{said}");
}

/// PM2's cluster mode serves an app on the port its code names, and so
/// does herd when no port is given (`--listen`, `$PORT`, `env.PORT`): the
/// workers' `PORT` stays unset, so `process.env.PORT || N` reads N, and the
/// host a `listen()` names is kept. A `listen()` that names no host is
/// served on both families, as Node binds it (`[::]`, dual-stack).
#[test]
fn with_no_port_given_a_node_app_is_served_on_the_port_its_code_names() {
    let sb = Sandbox::new("ownport");
    let (own, local) = (free_port(), free_port());
    std::fs::write(
        sb.app().join("web.js"),
        format!(
            "require('http').createServer((q, r) => r.end('web ' + process.pid + \n\
             \x20 ' from=' + q.headers['x-forwarded-for'] + ' PORT=' + process.env.PORT))\n\
             .listen(process.env.PORT || {own});\n"
        ),
    )
    .unwrap();
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let at = if v6 { "[::]" } else { "0.0.0.0" };
    let answers = served_by_two_at(
        &sb,
        "unset PORT; herd start web.js -i 2 --name zweb",
        &format!("{at}:{own}"),
        own,
    );
    // An IPv4 client of the dual-stack socket is named by its plain address.
    assert!(
        answers
            .iter()
            .all(|b| b.ends_with(" from=127.0.0.1 PORT=undefined")),
        "{answers:?}"
    );
    if v6 {
        let mut s = std::net::TcpStream::connect(("::1", own)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: v6\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (status, b) = read_response(s).unwrap();
        assert!(status == 200 && b.contains(" from=::1 "), "{status} {b}");
    }
    // The same app again: its port is taken, and the error says by whom
    // (asking every cluster but itself, `web`, listed before `zweb`).
    let (ok, said) = sb.run("unset PORT; timeout 60 herd start web.js -i 2");
    assert!(
        !ok && said.contains(&format!(
            "cannot listen on {at}:{own}: in use by herd cluster \"zweb\""
        )),
        "{said}"
    );
    // Launched twice by the same name, as PM2 refuses it: what to do instead.
    let (other, third) = (free_port(), free_port());
    let (ok, said) = sb.run(&format!("herd start web.js -i 1 --listen {other}"));
    assert!(ok, "{said}");
    let (ok, said) = sb.run(&format!("herd start web.js -i 1 --listen {third}"));
    assert!(
        !ok && said.contains("\"web\" already runs `node web.js` here: `herd reload web`"),
        "{said}"
    );
    // Ecosystem apps without env.PORT: in cluster mode (PM2's default for a
    // Node app with `instances`), on the host too; a queue consumer, which
    // never listens, keeps running with no port, as PM2 runs it.
    std::fs::write(
        sb.app().join("jobs.js"),
        "setInterval(() => console.log('job done'), 200);\n",
    )
    .unwrap();
    std::fs::write(
        sb.app().join("local.js"),
        format!(
            "require('http').createServer((q, r) => r.end('local'))\n\
             .listen({local}, '127.0.0.1');\n"
        ),
    )
    .unwrap();
    std::fs::write(
        sb.app().join("ecosystem.config.js"),
        "module.exports = { apps: [{ name: 'local', script: 'local.js', instances: 2 }, \
         { name: 'jobs', script: 'jobs.js', instances: 2, exec_mode: 'cluster' }] };\n",
    )
    .unwrap();
    let (ok, said) = sb.run("unset PORT; herd start ecosystem.config.js");
    assert!(
        ok && said.contains(&format!("proxy mode on 127.0.0.1:{local};"))
            && said.contains("jobs: started")
            && said.contains("proxy mode on the app's port (none yet)"),
        "{said}"
    );
    assert_eq!(body(local), "local");
    let (ok, said) = sb.run("herd status local");
    assert!(ok && said.contains(&format!("127.0.0.1:{local}")), "{said}");
    let (ok, said) = sb.run("herd reload jobs && herd status jobs");
    assert!(
        ok && said
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some("ready"))
            .count()
            == 2,
        "{said}"
    );
    // `Number(process.env.PORT)` names no port (NaN, which alone would
    // throw): herd's default, 0.0.0.0:8000, when nothing else holds it.
    if std::net::TcpListener::bind("0.0.0.0:8000").is_ok() {
        std::fs::write(
            sb.app().join("nan.js"),
            "require('http').createServer((q, r) => r.end('nan'))\n\
             .listen(Number(process.env.PORT));\n",
        )
        .unwrap();
        let (ok, said) = sb.run("unset PORT; herd start nan.js -i 2");
        assert!(ok && said.contains("proxy mode on 0.0.0.0:8000;"), "{said}");
        assert_eq!(body(8000), "nan");
        let (ok, said) = sb.run("herd delete nan");
        assert!(ok, "{said}");
    }
}

/// PM2's `shutdown_with_message`: no signal, a `'shutdown'` process
/// message that the app answers by cleaning up and exiting by itself
/// (`--kill-signal none`), on reload and on stop.
#[test]
fn shutdown_with_message_asks_the_app_by_message_alone() {
    let sb = Sandbox::new("swm");
    let journal = sb.app().join("journal");
    std::fs::write(
        sb.app().join("app.js"),
        "const fs = require('fs');\n\
         require('http').createServer((q, r) => r.end('ok')).listen(process.env.PORT);\n\
         process.on('message', (m) => {\n\
           if (m !== 'shutdown') return;\n\
           fs.appendFileSync('journal', 'shutdown ' + process.pid + '\\n');\n\
           setTimeout(() => { fs.appendFileSync('journal', 'cleaned ' + process.pid + '\\n'); process.exit(0); }, 200);\n\
         });\n",
    )
    .unwrap();
    std::fs::write(
        sb.app().join("ecosystem.config.js"),
        format!(
            "module.exports = {{ apps: [{{ name: 'swm', script: 'app.js', instances: 2, \
             exec_mode: 'cluster', shutdown_with_message: true, env: {{ PORT: {} }} }}] }};\n",
            sb.port
        ),
    )
    .unwrap();
    let (ok, said) = sb.run("herd start ecosystem.config.js && herd reload swm && herd stop swm");
    assert!(ok && said.contains("swm: stopped"), "{said}");
    let read = std::fs::read_to_string(&journal).unwrap_or_default();
    let count = |word: &str| read.lines().filter(|l| l.starts_with(word)).count();
    // Two workers replaced by the reload, then two stopped: each cleaned up.
    assert_eq!((count("shutdown "), count("cleaned ")), (4, 4), "{read}");
    let log = sb.run("herd logs swm --lines 100").1;
    assert!(
        log.matches("exited with code 0").count() >= 4 && !log.contains("SIGKILL"),
        "{log}"
    );
}

/// The unit `herd startup` printed resurrects at boot and passes
/// `systemd-analyze verify` where systemd is installed.
fn verify_unit(unit: &str) {
    assert!(
        unit.contains("[Service]") && unit.contains(" resurrect\n"),
        "{unit}"
    );
    assert!(
        unit.contains("ExecStop=") && unit.contains(" stop all"),
        "{unit}"
    );
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if analyze.is_err() {
        eprintln!("systemd-analyze is not installed: the unit is not verified");
        return;
    }
    let path = std::env::temp_dir().join(format!("herd-test-{}.service", std::process::id()));
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let said = text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze verify: {said}\n{unit}"
    );
    assert!(
        !said.contains("herd-test"),
        "systemd-analyze complains: {said}"
    );
}

#[test]
fn several_apps_in_one_herd_toml_start_stop_and_report_each() {
    let sb = Sandbox::new("toml");
    let (a, b) = (free_port(), free_port());
    std::fs::write(
        sb.app().join("herd.toml"),
        format!(
            "instances = 2\n\
             [[app]]\nname = \"one\"\ncommand = [\"{DEMO}\"]\nlisten = {a}\n\
             [[app]]\nname = \"two\"\ncommand = [\"{DEMO}\"]\nlisten = {b}\ninstances = 1\n\
             increment-var = \"SHARD\"\n[app.env]\nSHARD = \"10\"\n"
        ),
    )
    .unwrap();
    let out = sb.sh("herd start");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("one: started") && said.contains("2 workers"),
        "{said}"
    );
    assert!(
        said.contains("two: started") && said.contains("1 worker,"),
        "{said}"
    );
    assert!(body(a).contains("hello from worker"));
    assert!(body(b).contains("hello from worker"));
    let status = text(&sb.sh("herd status all"));
    assert!(
        status.contains("one:") && status.contains("two:"),
        "{status}"
    );
    // `pm2 logs`: every app's lines, each after its name.
    let logs = text(&sb.sh("herd logs --lines 50"));
    for app in ["one", "two"] {
        assert!(
            logs.lines()
                .any(|l| l.starts_with(&format!("{app} | ")) && l.contains("all workers ready")),
            "{logs}"
        );
    }
    assert!(
        logs.lines()
            .all(|l| l.starts_with("one | ") || l.starts_with("two | ")),
        "{logs}"
    );
    // And `-f` follows them all.
    let mut follow = sb
        .command("exec herd logs all -f --lines 1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut each = |what: &str| {
        wait_until(T, || {
            while let Ok(l) = rx.try_recv() {
                seen.push(l);
            }
            ["one | ", "two | "]
                .iter()
                .all(|app| seen.iter().any(|l| l.starts_with(app) && l.contains(what)))
        })
    };
    // Each file's last line, then what the reloads add to both.
    let started = each("");
    let reloaded = started && sb.sh("herd reload all").status.success() && each("reload done");
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(reloaded, "started: {started}; {seen:#?}");
    // One app in the foreground needs its name.
    let out = sb.sh("herd run");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("several apps (one, two)"),
        "{}",
        text(&out)
    );
    // A second start finds both running and says so for each.
    let out = sb.sh("herd start");
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("2 of 2 apps did not start"), "{said}");
    let out = sb.sh("herd stop all");
    assert!(text(&out).contains("one: stopped") && text(&out).contains("two: stopped"));
}

#[test]
fn increment_var_gives_each_worker_its_own_value() {
    let sb = Sandbox::new("incr");
    // The worker prints its SHARD at start: 10 + its id; and its id under
    // the name --instance-var gives, instead of NODE_APP_INSTANCE.
    let out = sb.sh(&format!(
        "herd start --name inc -i 2 --env SHARD=10 --increment-var SHARD --instance-var INSTANCE_ID \
         -- sh -c 'echo shard=$SHARD id=$INSTANCE_ID nai=${{NODE_APP_INSTANCE:-none}}; exec {DEMO}'"
    ));
    assert!(out.status.success(), "{}", text(&out));
    let logs = text(&sb.sh("herd logs inc --out"));
    assert!(
        logs.contains("[0] shard=10 id=0 nai=none") && logs.contains("[1] shard=11 id=1 nai=none"),
        "{logs}"
    );
    assert!(
        !logs.contains("INFO"),
        "--out shows worker lines only: {logs}"
    );
    let flushed = text(&sb.sh("herd flush inc"));
    assert!(flushed.contains("flushed"), "{flushed}");
    let logs = text(&sb.sh("herd logs inc"));
    assert!(!logs.contains("shard="), "flushed: {logs}");
    let e = text(&sb.sh(&format!("herd run --increment-var PORT -- {DEMO}")));
    assert!(e.contains("its own PORT"), "{e}");
}
