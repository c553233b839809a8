//! The `herd` binary: parses the command line, reports errors as one line.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::error::ErrorKind;
use herd::cli::Command;
use herd::config::Settings;

fn main() -> ExitCode {
    // Before anything could replace the binary on disk (`herd upgrade`).
    herd::os::sys::remember_exe();
    let each = match herd::cli::parse_each() {
        Ok(each) => each,
        Err(e) => return usage_error(e),
    };
    // Several names (`herd stop api web`): each in turn; the last failure's code.
    let mut code = ExitCode::SUCCESS;
    let mut command = true;
    for cli in each {
        // A master's or a helper's exit code says how its cluster ended.
        command &= !matches!(&cli.command, Command::Run(a) if !a.check)
            && !matches!(cli.command, Command::Guard | Command::StaticFiles);
        let c = execute(cli);
        if c != ExitCode::SUCCESS {
            code = c;
        }
    }
    if command {
        let _ = herd::console::flush_out();
        if let Some(e) = herd::console::lost_output() {
            herd::errln!("herd: error: cannot write the output: {e}");
            return ExitCode::from(1);
        }
    }
    code
}

fn execute(cli: herd::cli::Cli) -> ExitCode {
    match cli.command {
        Command::Guard => ExitCode::from(herd::os::guardian::run() as u8),
        Command::StaticFiles => match herd::builtin::files::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                herd::errln!("herd static-files: {e}");
                ExitCode::from(1)
            }
        },
        // Rewritten to `herd start` by the parser; reached only through --help.
        Command::Serve { .. } => ExitCode::SUCCESS,
        Command::Monit { target } => match herd::monit::run(target.name()) {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                herd::errln!("herd: error: {e}");
                ExitCode::from(1)
            }
        },
        cmd @ (Command::Status { .. }
        | Command::Reload { .. }
        | Command::Restart { .. }
        | Command::Scale { .. }
        | Command::Stop { .. }
        | Command::Delete { .. }
        | Command::Send { .. }
        | Command::Broadcast { .. }
        | Command::Signal { .. }
        | Command::Deploy(_)
        | Command::Promote { .. }
        | Command::Upgrade { .. }
        | Command::Rollback { .. }
        | Command::Pid { .. }
        | Command::Env { .. }
        | Command::Reset { .. }
        | Command::List { .. }) => match herd::control::client::run(cmd) {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                herd::errln!("herd: error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Start(args) => match herd::start::start(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                herd::errln!("herd: error: {}", herd::console::chain(e.as_ref()));
                ExitCode::from(1)
            }
        },
        Command::Logs {
            target,
            follow,
            lines,
            timestamps,
            timestamp,
            err,
            out,
            json,
            format,
            ..
        } => {
            let only = match (err, out) {
                (true, _) => Some(herd::output::Stream::Err),
                (_, true) => Some(herd::output::Stream::Out),
                _ => None,
            };
            let show = herd::start::Shown {
                timestamps: timestamps || timestamp.is_some(),
                time_format: timestamp.map(|f| herd::config::moment::to_strftime(&f)),
                only,
                // The same fields, written as `key=value`.
                json: json || format,
                format,
            };
            finish(herd::start::logs(target.name(), lines, follow, show))
        }
        Command::Systemd(args) => finish(systemd(*args)),
        Command::Flush { target } => finish(herd::start::flush(target.name())),
        Command::Save { force } => finish(
            herd::boot::save(force)
                .map_err(anyhow::Error::from)
                .map(|(names, path)| {
                    if names.is_empty() {
                        herd::outln!(
                            "saved an empty list to {}; `herd resurrect` starts nothing",
                            path.display()
                        );
                        return;
                    }
                    herd::outln!(
                        "saved {} ({}) to {}; `herd resurrect` starts them again",
                        herd::console::count(names.len(), "cluster"),
                        names.join(", "),
                        path.display()
                    );
                }),
        ),
        Command::Resurrect => finish(
            herd::boot::resurrect(|line| herd::outln!("{line}"))
                .map_err(anyhow::Error::from)
                .map(|_| ()),
        ),
        Command::Startup {
            platform,
            install,
            unit_dir,
        } => {
            // PM2 names the init system; herd writes systemd's unit only.
            const SYSTEMD: &[&str] = &[
                "systemd", "ubuntu", "debian", "centos", "redhat", "rhel", "fedora", "arch",
                "amazon", "oracle", "rocky", "alma",
            ];
            if let Some(p) = platform.filter(|p| !SYSTEMD.contains(&p.as_str())) {
                herd::errln!(
                    "herd: error: herd startup writes a systemd unit only, not one for {p}; under another init system, run `herd resurrect` as this user at boot"
                );
                return ExitCode::from(2);
            }
            let (user, uid) = herd::boot::whoami();
            if !install {
                return finish(
                    herd::boot::unit(&user, uid)
                        .map_err(anyhow::Error::from)
                        .map(|text| {
                            herd::outln!("{}", text.trim_end());
                        }),
                );
            }
            finish(
                herd::boot::install(&unit_dir, &user, uid)
                    .map_err(anyhow::Error::from)
                    .map(|(path, enabled)| {
                        if enabled {
                            herd::outln!(
                                "wrote and enabled {}: at boot it runs `herd resurrect` as {user}",
                                path.display()
                            );
                        } else {
                            herd::outln!(
                                "wrote {}; enable it with: systemctl daemon-reload && systemctl enable {}",
                                path.display(),
                                path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                            );
                        }
                    }),
            )
        }
        Command::Run(args) => {
            let check = args.check;
            // Settings first: the log file may come from herd.toml.
            let settings = match args.resolve() {
                Ok(s) => s,
                // `herd start api --no-daemon` (PM2's foreground start) of a
                // stopped cluster: it runs here, as it ran. With other
                // words, `api` was taken for a command: say what it is.
                Err(herd::config::ConfigError::NotFound(c))
                    if herd::boot::stopped().iter().any(|s| s.name == c) =>
                {
                    if let Some(why) = herd::start::stopped_in_foreground(&c) {
                        herd::errln!("herd: error: {why}");
                        return ExitCode::from(1);
                    }
                    herd::errln!(
                        "herd: error: command not found: {c} ({c} is a stopped cluster: `herd start {c}` starts it again, in the background; `herd start {c} --no-daemon`, here)"
                    );
                    return ExitCode::from(1);
                }
                Err(e) => {
                    herd::errln!("herd: error: {e}");
                    return ExitCode::from(1);
                }
            };
            if check {
                if let Err(e) = herd::proxy::check_tls(&settings) {
                    herd::errln!("herd: error: {e}");
                    return ExitCode::from(1);
                }
                herd::outln!("{}", herd::start::checked(&settings));
                return ExitCode::SUCCESS;
            }
            if let Some(path) = &settings.log_file
                && let Err(e) =
                    herd::logfile::install(path, settings.log_max_size, settings.log_keep)
            {
                herd::errln!("herd: error: cannot open log file {}: {e}", path.display());
                return ExitCode::from(1);
            }
            init_logging();
            let ran = run(settings);
            herd::output::farewell();
            match ran {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    // Each error already names its cause: print the top one only.
                    herd::errln!("herd: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `herd systemd NAME [RUN OPTIONS] -- COMMAND`: checks the options as
/// `herd run` would, then prints (or writes) the two units.
fn systemd(args: herd::cli::SystemdArgs) -> anyhow::Result<()> {
    let name = args.unit.clone();
    // The words after NAME, but for this command's own options: they are
    // `herd run`'s, and the cluster is named NAME.
    let argv: Vec<String> = std::env::args().collect();
    let after = argv
        .iter()
        .position(|a| *a == name)
        .map_or(argv.len(), |i| i + 1);
    let mut words = Vec::new();
    let mut it = argv[after..].iter();
    let mut past_dashes = false;
    while let Some(w) = it.next() {
        if !past_dashes && (w == "--dir" || w == "--watchdog-sec") {
            it.next();
            continue;
        }
        if !past_dashes && (w.starts_with("--dir=") || w.starts_with("--watchdog-sec=")) {
            continue;
        }
        past_dashes |= w == "--";
        words.push(w.clone());
    }
    let mut run = args.run;
    if run.opts.name.is_none() {
        run.opts.name = Some(name.clone());
        words.splice(0..0, ["--name".to_string(), name.clone()]);
    }
    let settings = run.resolve()?;
    let (socket, service) =
        herd::boot::service_units(&name, &words, &settings, args.watchdog_sec.0)?;
    match args.dir {
        None => {
            herd::outln!(
                "# {name}.socket\n{socket}\n# {name}.service\n{}",
                service.trim_end()
            );
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            for (file, text) in [
                (format!("{name}.socket"), &socket),
                (format!("{name}.service"), &service),
            ] {
                let path = dir.join(file);
                std::fs::write(&path, text)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                herd::outln!("wrote {}", path.display());
            }
            herd::outln!(
                "then: systemctl daemon-reload && systemctl enable --now {name}.socket {name}.service"
            );
        }
    }
    Ok(())
}

/// Exit 0, or print the error on one line and exit 1.
fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            herd::errln!("herd: error: {}", herd::console::chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn run(settings: Settings) -> anyhow::Result<i32> {
    // The supervisor's work is light; the proxy runs its own per-CPU
    // runtimes (see `supervise::start_proxy`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // `block_on` keeps the supervisor on the main thread (see `supervise::run`).
    Ok(rt.block_on(herd::supervise::run(settings))?)
}

/// clap's errors span several lines; users get its first one and a pointer to --help.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            if let Err(w) = e.print()
                && w.kind() != std::io::ErrorKind::BrokenPipe
            {
                herd::errln!("herd: error: cannot write the output: {w}");
                return ExitCode::from(1);
            }
            ExitCode::from(e.exit_code() as u8)
        }
        _ => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid usage");
            let mut first = first.strip_prefix("error: ").unwrap_or(first).to_string();
            // clap lists the missing arguments on the lines that follow.
            if e.kind() == ErrorKind::MissingRequiredArgument
                && let Some(clap::error::ContextValue::Strings(missing)) =
                    e.get(clap::error::ContextKind::InvalidArg)
            {
                first = format!(
                    "the following required arguments were not provided: {}",
                    missing.join(", ")
                );
            }
            herd::errln!("herd: error: {first}{} (see `herd --help`)", hints(&e));
            ExitCode::from(2)
        }
    }
}

/// What clap knows that would fix the mistake, for the same line: the
/// valid values (`--mode cluster`), the nearest command or flag (`stauts`).
fn hints(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let mut out = String::new();
    if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg)
        && let Some(hint) = pm2_hint(arg)
    {
        return format!("; {hint}");
    }
    // `pm2 deploy ecosystem.config.js production [setup|update|revert]`.
    if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg)
        && !arg.starts_with('-')
        && std::env::args_os().nth(1).is_some_and(|c| c == "deploy")
    {
        return "; herd deploy starts a new version beside the running one (--canary PERCENT or --blue-green, the command after --); PM2's deploy (a git pull and a reload over SSH) is left to your CI or script, which ends with `herd reload NAME` on each host".to_string();
    }
    if let Some(ContextValue::String(cmd)) = e.get(ContextKind::InvalidSubcommand)
        && let Some(hint) = pm2_command_hint(cmd)
    {
        return format!("; {hint}");
    }
    if let Some(ContextValue::Strings(v)) = e.get(ContextKind::ValidValue)
        && !v.is_empty()
    {
        out.push_str(&format!("; valid: {}", v.join(", ")));
    }
    if let (Some(ContextValue::String(arg)), Some(ContextValue::String(v))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) && arg.starts_with("--mode")
        && v.starts_with("cluster")
    {
        out.push_str("; PM2's cluster mode is herd's default, proxy: leave --mode out");
    }
    for kind in [
        ContextKind::SuggestedSubcommand,
        ContextKind::SuggestedArg,
        ContextKind::SuggestedValue,
    ] {
        match e.get(kind) {
            Some(ContextValue::String(s)) => out.push_str(&format!("; did you mean `{s}`?")),
            Some(ContextValue::Strings(v)) if !v.is_empty() => {
                out.push_str(&format!("; did you mean `{}`?", v.join("` or `")))
            }
            _ => {}
        }
    }
    out
}

/// What herd does instead of a PM2 flag it does not take.
fn pm2_hint(arg: &str) -> Option<&'static str> {
    let flag = arg.split(['=', ' ']).next().unwrap_or(arg);
    Some(match flag {
        "-w" | "--workers" => "the worker count is -i N (--instances), as PM2's",
        "--exp-backoff-restart-delay" => {
            "herd always backs off: --restart-delay DUR is the first delay (100ms), doubled after each quick exit up to --max-restart-delay (10s)"
        }
        "-c" => "PM2's -c is --cron-restart (or --cron) here",
        "--namespace" => {
            "herd has no namespaces: name each cluster (--name), and `all` in herd's commands means every cluster"
        }
        "-f" | "--force" => {
            "a second cluster of the same program needs a name (--name) and a port (--listen) of its own"
        }
        "--attach" => {
            "`herd run` stays in the foreground with the log; `herd logs NAME -f` follows a started one"
        }
        "-x" | "--execute-command" => "herd runs any command as it is: herd start -- ./my-script",
        "--no-vizion" | "--no-pmx" | "--no-automation" | "--disable-trace" | "--trace" => {
            "herd has no PM2 agent, tracing or version-control probe to turn on or off: drop the flag"
        }
        "--source-map-support" => {
            "Node's own --enable-source-maps does that: --node-args=--enable-source-maps"
        }
        _ => return None,
    })
}

/// What herd does instead of a PM2 command it does not have.
fn pm2_command_hint(cmd: &str) -> Option<&'static str> {
    Some(match cmd {
        "kill" => {
            "herd has no daemon that outlives its clusters: `herd stop all` ends every one (`herd delete all` forgets them too)"
        }
        "update" => {
            "`herd upgrade all` re-executes each cluster's master with the herd binary on disk"
        }
        "unstartup" => "`systemctl disable herd-USER` undoes `herd startup --install`",
        "ping" => "`herd list` shows which clusters are running",
        "sendSignal" => {
            "`herd signal SIGNAL NAME` (or `herd signal SIGNAL ID --name NAME` for one worker)"
        }
        "dump" => "`herd save` records the running clusters",
        "web" => {
            "--admin ADDR (on herd run/start) serves a web dashboard, /status as JSON and Prometheus /metrics"
        }
        "reloadLogs" | "logrotate" => {
            "herd rotates its log files itself (--log-max-size, --log-keep), reopens one that logrotate moved within a second, and at once on SIGUSR1"
        }
        "init" | "ecosystem" => {
            "herd reads PM2's ecosystem files as they are (`herd start ecosystem.config.js`), and a herd.toml is a few lines (see the README)"
        }
        "install" | "uninstall" | "module:generate" => {
            "herd has no modules: what pm2-logrotate does is built in (--log-max-size, --log-keep; SIGUSR1 reopens the log files), and --admin ADDR serves /metrics and a web dashboard"
        }
        "set" | "get" | "conf" | "config" => {
            "herd's settings are its options, on the command line or in herd.toml (pm2-logrotate's max_size and retain are --log-max-size and --log-keep)"
        }
        "link" | "unlink" | "plus" | "open" => {
            "herd has no hosted dashboard: --admin ADDR serves a web dashboard and Prometheus /metrics, and `herd monit` runs in the terminal"
        }
        "report" => {
            "`herd status all --json` and `herd logs NAME` show what a report would (`herd --version` for the version)"
        }
        "trigger" => {
            "`herd send ID MESSAGE --name NAME` delivers MESSAGE to worker ID, which gets it as process.on('message')"
        }
        _ => return None,
    })
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // rustls warns about what clients send (an IP address as SNI, as wrk
    // and some health checkers do) once per connection: a line per
    // handshake would flood the log under load.
    let filter =
        EnvFilter::try_from_env("HERD_LOG").unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    // tracing reports a failed write with `eprintln!`, which panics when
    // stderr itself is the closed pipe: a lost log line must stay lost.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .log_internal_errors(false);
    if herd::logfile::installed() {
        fmt.with_ansi(false)
            .with_writer(|| herd::logfile::Writer)
            .init();
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(|| herd::tail::Stderr)
            .init();
    }
}
