//! Canary and blue-green releases, the driver's side: the plan, the share
//! of traffic it publishes, and the automatic analysis that promotes or
//! rolls back (as Argo Rollouts and Flagger do, for one host). The worker
//! side (new slots, promote's rolling reload, rollback) is the machine's.
//!
//! The analysis compares the two versions over a sliding window of the
//! proxy's counts: the new one is rolled back when its 5xx rate or p99 is
//! above the limit *and* above the running version's (a backend that fails
//! for everyone is not the release's fault), and promoted once it has been
//! healthy for `--promote-after`.
//!
//! Over 500 lines with its tests, which are a third of it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use herd_balance::KeySource;
use tokio::sync::mpsc::UnboundedSender;

use super::Supervisor;
use super::machine::{Group, Input};
use super::process::Spec;
use crate::config::Mode;
use crate::console::count;
use crate::control::{DeployPlan, DeployStatus, Done, Line, VersionRow};
use crate::upstream::Sample;

/// The default analysis window.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Requests the new version must have answered in the window before the
/// analysis judges it.
pub const MIN_REQUESTS: u64 = 20;

/// A deploy in progress, as the driver follows it.
pub(super) struct Rollout {
    pub plan: DeployPlan,
    pub version: u32,
    pub by: KeySource,
    window: Duration,
    started: Instant,
    samples: VecDeque<(Instant, [Sample; 2])>,
    healthy_since: Option<Instant>,
    /// Promotion was asked for (by the analysis): not again.
    pub promoting: bool,
    /// What the analysis saw last, for `herd status`.
    pub summary: Option<String>,
}

#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    Wait,
    Promote,
    Rollback(String),
}

impl Rollout {
    pub fn new(plan: DeployPlan, version: u32, by: KeySource, now: Instant) -> Rollout {
        let window = plan
            .window_ms
            .map_or(WINDOW, Duration::from_millis)
            .max(Duration::from_secs(1));
        Rollout {
            plan,
            version,
            by,
            window,
            started: now,
            samples: VecDeque::new(),
            healthy_since: None,
            promoting: false,
            summary: None,
        }
    }

    pub fn kind(&self) -> &'static str {
        if self.plan.blue_green {
            "blue-green"
        } else {
            "canary"
        }
    }

    /// The new version's share: a canary's percent; blue-green's all once
    /// every new worker serves, none before.
    pub fn percent(&self, new_all_serving: bool) -> u8 {
        match (self.plan.blue_green, self.plan.canary) {
            (true, _) => {
                if new_all_serving {
                    100
                } else {
                    0
                }
            }
            (false, p) => p.unwrap_or(0).min(100),
        }
    }

    fn analysed(&self) -> bool {
        self.plan.max_error_rate.is_some() || self.plan.max_p99_ms.is_some()
    }

    /// Adds a sample of both versions' counts (stable, new) and forgets
    /// those older than the window.
    pub fn sample(&mut self, now: Instant, counts: [Sample; 2]) {
        self.samples.push_back((now, counts));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Both versions' figures from the window's start (or the deploy's) to
    /// `now_counts`, for `herd status`.
    pub fn window_to(&self, now_counts: &[Sample; 2]) -> [Sample; 2] {
        let zero = [Sample::default(), Sample::default()];
        let first = self.samples.front().map_or(&zero, |(_, c)| c);
        [
            now_counts[0].since(&first[0]),
            now_counts[1].since(&first[1]),
        ]
    }

    /// Both versions' figures over the window (stable, new).
    pub fn window(&self) -> Option<[Sample; 2]> {
        let (_, first) = self.samples.front()?;
        let (_, last) = self.samples.back()?;
        Some([last[0].since(&first[0]), last[1].since(&first[1])])
    }

    /// What to do now.
    pub fn verdict(&mut self, now: Instant) -> Verdict {
        if self.analysed() {
            let Some([stable, new]) = self.window() else {
                return Verdict::Wait;
            };
            if new.requests < MIN_REQUESTS {
                self.summary = Some(format!(
                    "waiting for traffic: {} of {MIN_REQUESTS} requests in the window",
                    new.requests
                ));
                return Verdict::Wait;
            }
            if let Err(why) = judge(&self.plan, &stable, &new, self.window) {
                return Verdict::Rollback(why);
            }
            let since = *self.healthy_since.get_or_insert(now);
            self.summary = Some(format!(
                "healthy for {:.0?} (5xx {:.1}%, p99 {})",
                now.saturating_duration_since(since),
                new.error_rate(),
                shown_p99(&new)
            ));
        } else {
            self.healthy_since.get_or_insert(self.started);
        }
        match (self.plan.promote_after_ms, self.healthy_since) {
            (Some(ms), Some(since))
                if !self.promoting
                    && now.saturating_duration_since(since) >= Duration::from_millis(ms) =>
            {
                Verdict::Promote
            }
            _ => Verdict::Wait,
        }
    }
}

/// Whether the new version is worse than the limits and than the running
/// one over the window; `Err` says how.
pub(super) fn judge(
    plan: &DeployPlan,
    stable: &Sample,
    new: &Sample,
    window: Duration,
) -> Result<(), String> {
    if let Some(max) = plan.max_error_rate {
        let (n, s) = (new.error_rate(), stable.error_rate());
        if n > max && n > s {
            return Err(format!(
                "the new version's 5xx rate is {n:.1}% over the last {window:.0?}, above --max-error-rate {max}% (running version: {s:.1}%)"
            ));
        }
    }
    if let (Some(max_ms), Some(n)) = (plan.max_p99_ms, new.p99()) {
        let max = Duration::from_millis(max_ms);
        let worse = stable.p99().is_none_or(|s| n > s);
        if n > max && worse {
            return Err(format!(
                "the new version's p99 is {} over the last {window:.0?}, above --max-p99 {max:?} (running version: {})",
                shown_p99(new),
                shown_p99(stable)
            ));
        }
    }
    Ok(())
}

fn shown_p99(s: &Sample) -> String {
    s.p99().map_or("-".to_string(), |d| {
        format!("{:.1}ms", d.as_secs_f64() * 1e3)
    })
}

/// `--by` as the plan gives it.
pub(super) fn split_by(by: Option<&str>) -> Result<KeySource, String> {
    match by {
        None | Some("random") => Ok(KeySource::None),
        Some("ip") => Ok(KeySource::ClientIp),
        Some(b) => match b.split_once(':') {
            Some(("header", n)) if !n.is_empty() => Ok(KeySource::Header(n.to_ascii_lowercase())),
            Some(("cookie", n)) if !n.is_empty() => Ok(KeySource::Cookie(n.to_string())),
            _ => Err(format!("--by {b:?}: use ip, header:NAME or cookie:NAME")),
        },
    }
}

pub(super) fn shown_by(by: &KeySource) -> String {
    match by {
        KeySource::None => "random".into(),
        KeySource::ClientIp => "ip".into(),
        KeySource::Header(n) => format!("header:{n}"),
        KeySource::Cookie(n) => format!("cookie:{n}"),
        KeySource::Sni => "sni".into(),
    }
}

impl Supervisor {
    /// `herd deploy`: the new release, its workers, its share of traffic.
    pub(super) fn deploy(&mut self, plan: DeployPlan, reply: UnboundedSender<Line>) {
        match self.plan_release(&plan) {
            Ok((spec, by, workers)) => {
                let version = self.specs.keys().max().map_or(1, |v| v + 1);
                self.specs.insert(version, std::sync::Arc::new(spec));
                let now = Instant::now();
                let shown = shown_by(&by);
                let rollout = Rollout::new(plan, version, by, now);
                tracing::info!(
                    "deploy: version {version}, {}, {} new, split {shown}",
                    rollout.kind(),
                    count(workers, "worker")
                );
                let previous = self.rollout.replace(rollout);
                self.apply(Input::Deploy { version, workers }, Some(reply));
                if self.m.deploying().is_none_or(|d| d.new != version) {
                    // Refused (a reload or another deploy is running): the
                    // running deploy, if any, goes on as it was.
                    self.rollout = previous;
                    self.specs.remove(&version);
                }
            }
            Err(e) => {
                let _ = reply.send(Done::failed(e).into());
            }
        }
    }

    /// A deploy was promoted: what it changed (its command, directory and
    /// `--env`s) is the cluster's now, for `reload --update-env` and for a
    /// master that takes the cluster over.
    pub(super) fn promoted(&mut self, r: &Rollout) {
        let Some(spec) = self.specs.get(&r.version) else {
            return;
        };
        let release = &spec.release;
        let relaunch = &mut self.s.relaunch;
        if !r.plan.command.is_empty() {
            let words = release.command.iter();
            relaunch.command = Some(words.map(|w| w.to_string_lossy().into_owned()).collect());
            // Else the next master would take a name from the new command.
            relaunch.name = Some(self.s.name.clone());
        }
        if r.plan.cwd.is_some() {
            relaunch.cwd.clone_from(&release.cwd);
        }
        let pairs = r.plan.env.iter().filter_map(|kv| kv.split_once('='));
        relaunch
            .env
            .extend(pairs.map(|(k, v)| (k.to_string(), v.to_string())));
    }

    /// Checks a deploy against this cluster's mode; resolves what it runs.
    fn plan_release(&self, plan: &DeployPlan) -> Result<(Spec, KeySource, usize), String> {
        if self.s.command.is_empty() {
            return Err("this cluster has no workers (upstreams only)".into());
        }
        match (plan.canary, plan.blue_green) {
            (Some(_), true) | (None, false) => {
                return Err("give one of --canary PERCENT and --blue-green".into());
            }
            (Some(p), _) if p > 100 => return Err(format!("--canary {p}: at most 100")),
            _ => {}
        }
        if let Some(r) = plan.max_error_rate
            && !(0.0..=100.0).contains(&r)
        {
            return Err(format!("--max-error-rate {r}: a percent from 0 to 100"));
        }
        let by = split_by(plan.by.as_deref())?;
        let analysed = plan.max_error_rate.is_some() || plan.max_p99_ms.is_some();
        match self.s.mode {
            Mode::Proxy => {}
            Mode::Fork => {
                return Err(
                    "fork mode has no traffic to split: move to a new version with herd reload (--update-env for a new environment)"
                        .into(),
                );
            }
            _ if analysed => {
                return Err(
                    "--max-error-rate and --max-p99 need proxy mode (herd sees no HTTP answer in the fd modes)"
                        .into(),
                );
            }
            Mode::Dispatch if matches!(by, KeySource::Header(_) | KeySource::Cookie(_)) => {
                return Err(
                    "dispatch mode splits connections at random or --by ip (no header is read)"
                        .into(),
                );
            }
            Mode::Shared | Mode::Reuseport if plan.by.is_some() || plan.blue_green => {
                return Err(format!(
                    "in {} mode the kernel spreads connections over all workers: the split is by worker count (--canary with -i), so no --by or --blue-green",
                    self.s.mode.as_str()
                ));
            }
            _ => {}
        }
        let stable = &self.specs[&0];
        let running = self.specs.get(&self.m.stable_version()).unwrap_or(stable);
        let mut env = running.release.env.clone();
        for kv in &plan.env {
            let (k, v) = kv
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("--env {kv:?}: use KEY=VAL"))?;
            env.push((k.to_string(), v.to_string()));
        }
        let command = if plan.command.is_empty() {
            running.release.command.clone()
        } else {
            plan.command.iter().map(Into::into).collect()
        };
        let cwd = plan
            .cwd
            .as_ref()
            .map(std::path::PathBuf::from)
            .or_else(|| running.release.cwd.clone());
        let mut release =
            crate::config::Release::resolve(command, cwd, env).map_err(|e| e.to_string())?;
        release.base_env = running.release.base_env.clone();
        if release.runs_bun()
            && matches!(self.s.mode, Mode::Shared | Mode::Reuseport | Mode::Dispatch)
        {
            return Err(
                crate::config::ConfigError::BunNeedsProxy(self.s.mode.as_str()).to_string(),
            );
        }
        let node = release.is_node() && (self.s.node_shim || !stable.release.is_node());
        let python = release.is_python()
            && crate::python::runs_script(&release.command)
            && (self.s.python_shim || !stable.release.is_python());
        // No deploy runs (else the machine refuses): every slot is stable.
        let stable_slots = self.m.instances();
        let workers = match (plan.workers, plan.canary) {
            (Some(n), _) => n,
            (None, Some(p)) => (stable_slots * usize::from(p)).div_ceil(100).max(1),
            (None, None) => stable_slots,
        };
        // As `herd scale`'s: a typo (`-i 99999`) must not fork until the
        // machine gives out.
        let most = crate::config::MAX_WORKERS;
        if workers == 0 || stable_slots + workers > most {
            // Named as the deploy asked for them: a count, or the canary's share.
            let asked = match (plan.workers, plan.canary) {
                (Some(_), _) => format!("-i {workers}"),
                (None, Some(p)) => format!("--canary {p} ({workers} new workers)"),
                (None, None) => format!("{workers} new workers, one per running one"),
            };
            return Err(format!(
                "{asked}: from 1 to {} new workers ({stable_slots} running, at most {most} in all)",
                most.saturating_sub(stable_slots)
            ));
        }
        Ok((
            Spec::new(
                release,
                self.preloads.as_ref(),
                node,
                python,
                self.s.python_stop,
                self.s.perl_stop,
                Default::default(),
            ),
            by,
            workers,
        ))
    }

    /// The deploy's analysis, once a second: rolls back or promotes.
    pub(super) fn analyse(&mut self) {
        let Some(r) = &mut self.rollout else {
            return;
        };
        if self.m.deploying().is_some_and(|d| d.promoting) {
            return;
        }
        let now = Instant::now();
        if let Some([a, b]) = self.up.version_stats() {
            r.sample(now, [a.snapshot(), b.snapshot()]);
        }
        match r.verdict(now) {
            Verdict::Wait => {}
            Verdict::Rollback(why) => {
                tracing::warn!("deploy: rolling back version {}: {why}", r.version);
                self.apply(Input::Rollback, None);
            }
            Verdict::Promote => {
                r.promoting = true;
                tracing::info!(
                    "deploy: version {} healthy for --promote-after; promoting",
                    r.version
                );
                self.apply(Input::Promote, None);
            }
        }
    }

    pub(super) fn deploy_status(&self) -> Option<DeployStatus> {
        let r = self.rollout.as_ref()?;
        let d = self.m.deploying()?;
        let window = self
            .up
            .version_stats()
            .map(|[a, b]| r.window_to(&[a.snapshot(), b.snapshot()]));
        let row = |role: &str, group: Group, version: u32, i: usize| {
            let w = window.as_ref().map(|w| &w[i]);
            VersionRow {
                version,
                role: role.to_string(),
                command: self.specs.get(&version).map_or(String::new(), |s| {
                    crate::console::command_line(&s.release.command)
                }),
                workers: self.m.workers().filter(|w| w.group == group).count(),
                requests: w.map(|w| w.requests),
                error_rate: w.map(|w| (w.error_rate() * 10.0).round() / 10.0),
                p99_ms: w
                    .and_then(|w| w.p99())
                    .map(|d| (d.as_secs_f64() * 1e4).round() / 10.0),
            }
        };
        Some(DeployStatus {
            kind: r.kind().to_string(),
            percent: r.percent(self.m.group_serving(Group::New)),
            by: shown_by(&r.by),
            versions: vec![
                row("stable", Group::Stable, d.old, 0),
                row("new", Group::New, d.new, 1),
            ],
            analysis: r.summary.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn counts(requests: u64, errors: u64, slow: u64) -> Sample {
        let s = crate::upstream::AnswerStats::default();
        for i in 0..requests {
            let status = if i < errors { 500 } else { 200 };
            let us = if i < slow { 900_000 } else { 2_000 };
            s.record(status, us);
        }
        s.snapshot()
    }

    fn plan() -> DeployPlan {
        DeployPlan {
            canary: Some(10),
            max_error_rate: Some(5.0),
            max_p99_ms: Some(500),
            promote_after_ms: Some(10_000),
            window_ms: Some(10_000),
            ..DeployPlan::default()
        }
    }

    #[test]
    fn a_new_version_worse_than_the_limit_and_the_old_one_is_rolled_back() {
        let t0 = Instant::now();
        let mut r = Rollout::new(plan(), 1, KeySource::None, t0);
        r.sample(t0, [Sample::default(), Sample::default()]);
        r.sample(t0 + S, [counts(100, 0, 0), counts(40, 10, 0)]);
        match r.verdict(t0 + S) {
            Verdict::Rollback(why) => assert!(why.contains("5xx rate is 25.0%"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn errors_the_old_version_has_too_are_not_the_releases_fault() {
        let t0 = Instant::now();
        let mut r = Rollout::new(plan(), 1, KeySource::None, t0);
        r.sample(t0, [Sample::default(), Sample::default()]);
        r.sample(t0 + S, [counts(100, 30, 0), counts(40, 10, 0)]);
        assert_eq!(r.verdict(t0 + S), Verdict::Wait);
    }

    #[test]
    fn a_slow_new_version_is_rolled_back_on_its_p99() {
        let t0 = Instant::now();
        let mut r = Rollout::new(plan(), 1, KeySource::None, t0);
        r.sample(t0, [Sample::default(), Sample::default()]);
        r.sample(t0 + S, [counts(100, 0, 0), counts(50, 0, 5)]);
        assert!(matches!(r.verdict(t0 + S), Verdict::Rollback(w) if w.contains("p99")));
    }

    #[test]
    fn too_little_traffic_is_no_verdict_and_health_leads_to_promotion() {
        let t0 = Instant::now();
        let mut r = Rollout::new(plan(), 1, KeySource::None, t0);
        r.sample(t0, [Sample::default(), Sample::default()]);
        r.sample(t0 + S, [counts(100, 0, 0), counts(5, 5, 0)]);
        assert_eq!(
            r.verdict(t0 + S),
            Verdict::Wait,
            "5 requests decide nothing"
        );
        assert!(
            r.summary
                .as_deref()
                .unwrap()
                .contains("waiting for traffic")
        );
        r.sample(t0 + 2 * S, [counts(200, 0, 0), counts(100, 5, 0)]);
        assert_eq!(r.verdict(t0 + 2 * S), Verdict::Wait, "healthy from now");
        r.sample(t0 + 12 * S, [counts(300, 0, 0), counts(200, 5, 0)]);
        assert_eq!(r.verdict(t0 + 12 * S), Verdict::Promote);
    }

    #[test]
    fn the_window_slides() {
        let t0 = Instant::now();
        let mut r = Rollout::new(plan(), 1, KeySource::None, t0);
        for i in 0..30u64 {
            r.sample(t0 + S * i as u32, [counts(i, 0, 0), counts(i, 0, 0)]);
        }
        let [_, new] = r.window().unwrap();
        assert_eq!(new.requests, 10, "ten seconds' worth");
    }

    #[test]
    fn without_limits_promote_after_is_a_timer_and_blue_green_switches_when_ready() {
        let t0 = Instant::now();
        let p = DeployPlan {
            blue_green: true,
            promote_after_ms: Some(5_000),
            ..DeployPlan::default()
        };
        let mut r = Rollout::new(p, 1, KeySource::None, t0);
        assert_eq!((r.percent(false), r.percent(true)), (0, 100));
        assert_eq!(r.verdict(t0 + 4 * S), Verdict::Wait);
        assert_eq!(r.verdict(t0 + 5 * S), Verdict::Promote);
    }

    #[test]
    fn split_keys() {
        assert_eq!(split_by(None), Ok(KeySource::None));
        assert_eq!(split_by(Some("ip")), Ok(KeySource::ClientIp));
        assert_eq!(
            split_by(Some("header:X-User")),
            Ok(KeySource::Header("x-user".into()))
        );
        assert_eq!(
            split_by(Some("cookie:sid")),
            Ok(KeySource::Cookie("sid".into()))
        );
        assert!(split_by(Some("header:")).is_err());
        assert!(split_by(Some("moon")).is_err());
    }
}
