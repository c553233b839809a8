//! `herd monit`: a terminal dashboard like `pm2 monit`, drawn with
//! `ratatui` from the control socket's status answer once a second, so it
//! needs no admin listener. Keys: ↑/↓ pick a worker, `r` rolling reload,
//! `+`/`-` scale, `R` replace the picked worker (its successor first),
//! `q` quit.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Sparkline, Table, TableState};
use ratatui::{DefaultTerminal, Frame};

use crate::control::{self, ControlError, Done, Request, Status, WorkerState};

/// Points of history each sparkline keeps (one a second).
const HISTORY: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum MonitError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot use the terminal: {0}")]
    Terminal(std::io::Error),
}

/// What the dashboard shows; drawing is a function of it alone.
#[derive(Default)]
pub struct App {
    pub name: String,
    pub status: Option<Status>,
    /// Per worker id: CPU percent and requests per second, oldest first.
    cpu: HashMap<usize, VecDeque<u64>>,
    rps: HashMap<usize, VecDeque<u64>>,
    pub selected: usize,
    /// The outcome of the last key's action.
    pub message: String,
    /// The picked worker's last log lines (from the cluster's log file).
    pub log: Vec<String>,
}

impl App {
    /// Takes a new status answer and extends the histories.
    pub fn update(&mut self, s: Status) {
        for w in s
            .workers
            .iter()
            .filter(|w| w.state != WorkerState::Stopping)
        {
            let push = |m: &mut HashMap<usize, VecDeque<u64>>, v: f64| {
                let q = m.entry(w.id).or_default();
                q.push_back(v.round().max(0.0) as u64);
                if q.len() > HISTORY {
                    q.pop_front();
                }
            };
            push(&mut self.cpu, w.cpu);
            push(&mut self.rps, w.rps.unwrap_or(0.0));
        }
        let n = s.workers.len();
        self.selected = self.selected.min(n.saturating_sub(1));
        self.status = Some(s);
    }

    fn picked_id(&self) -> Option<usize> {
        Some(self.status.as_ref()?.workers.get(self.selected)?.id)
    }

    pub fn draw(&self, f: &mut Frame) {
        let [top, table, charts, log, help] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(4),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(1),
        ])
        .areas(f.area());
        let Some(s) = &self.status else {
            f.render_widget(Paragraph::new(format!("{}: connecting…", self.name)), top);
            return;
        };
        // (Folded from 0.0: an empty f64 sum is -0.0, shown as "-0".)
        let total: f64 = s
            .workers
            .iter()
            .filter_map(|w| w.rps)
            .fold(0.0, |a, b| a + b);
        f.render_widget(
            Paragraph::new(format!(
                "{}: {} · master pid {} · up {} · {} workers · {:.0} req/s{}",
                s.name,
                crate::console::served(&s.mode, &s.listen),
                s.pid,
                human_secs(s.uptime),
                s.workers.iter().filter(|w| w.state.has_process()).count(),
                total,
                if s.stopping {
                    " · stopping"
                } else if s.reloading {
                    " · reloading"
                } else {
                    ""
                }
            ))
            .style(Style::new().add_modifier(Modifier::BOLD)),
            top,
        );
        let rows = s.workers.iter().map(|w| {
            let state = w.shown_state().to_string();
            Row::new(vec![
                w.id.to_string(),
                w.pid.to_string(),
                state,
                bar(w.cpu, 10),
                format!("{:.1}M", w.memory as f64 / 1048576.0),
                w.rps.map_or("-".into(), |r| format!("{r:.1}")),
                w.p99_ms.map_or("-".into(), |p| format!("{p:.1}")),
                w.restarts.to_string(),
                human_secs(w.uptime),
            ])
        });
        let header = Row::new([
            "id", "pid", "state", "cpu", "memory", "req/s", "p99 ms", "restarts", "uptime",
        ])
        .style(Style::new().add_modifier(Modifier::UNDERLINED));
        let widths = [
            Constraint::Length(4),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(18),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(8),
        ];
        let mut state = TableState::default().with_selected(Some(self.selected));
        f.render_stateful_widget(
            Table::new(rows, widths)
                .header(header)
                .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
                .block(Block::new().borders(Borders::TOP).title(" workers ")),
            table,
            &mut state,
        );
        let id = self.picked_id().unwrap_or(0);
        let [cpu, rps] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(charts);
        let series = |m: &HashMap<usize, VecDeque<u64>>| -> Vec<u64> {
            m.get(&id)
                .map(|q| q.iter().copied().collect())
                .unwrap_or_default()
        };
        f.render_widget(
            Sparkline::default()
                .block(Block::bordered().title(format!(" worker {id}: cpu % ")))
                .data(series(&self.cpu)),
            cpu,
        );
        f.render_widget(
            Sparkline::default()
                .block(Block::bordered().title(format!(" worker {id}: req/s ")))
                .data(series(&self.rps)),
            rps,
        );
        let lines: Vec<Line> = self.log.iter().map(|l| Line::raw(l.as_str())).collect();
        f.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(format!(" worker {id}: log "))),
            log,
        );
        f.render_widget(
            Paragraph::new(format!(
                "↑↓ pick  r reload  + - scale  R replace worker  q quit   {}",
                self.message
            )),
            help,
        );
    }
}

/// `herd monit [NAME]`: runs until `q`; returns the exit code.
pub fn run(name: Option<&str>) -> Result<i32, MonitError> {
    let (name, path) = control::find(name)?;
    let mut term = ratatui::try_init().map_err(MonitError::Terminal)?;
    let res = watch(&mut term, &name, &path);
    let _ = ratatui::try_restore();
    res
}

fn watch(term: &mut DefaultTerminal, name: &str, path: &Path) -> Result<i32, MonitError> {
    let mut app = App {
        name: name.to_string(),
        ..App::default()
    };
    // Actions run on threads (a reload takes a while); their outcome comes back here.
    let (done_tx, done_rx) = mpsc::channel::<String>();
    let mut next_poll = Instant::now();
    loop {
        if Instant::now() >= next_poll {
            let s: Status = control::call(name, path, &Request::Status, |_| {})?;
            app.log = log_tail(s.log_file.as_deref(), app.picked_id(), 6);
            app.update(s);
            next_poll = Instant::now() + Duration::from_secs(1);
        }
        while let Ok(m) = done_rx.try_recv() {
            app.message = m;
        }
        term.draw(|f| app.draw(f)).map_err(MonitError::Terminal)?;
        if !event::poll(Duration::from_millis(200)).map_err(MonitError::Terminal)? {
            continue;
        }
        let Event::Key(k) = event::read().map_err(MonitError::Terminal)? else {
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        let n = app.status.as_ref().map_or(0, |s| s.workers.len());
        let req = match k.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(0),
            KeyCode::Up => {
                app.selected = app.selected.saturating_sub(1);
                next_poll = Instant::now();
                None
            }
            KeyCode::Down => {
                app.selected = (app.selected + 1).min(n.saturating_sub(1));
                next_poll = Instant::now();
                None
            }
            KeyCode::Char('r') => Some((Request::Reload { update_env: None }, "reloading…")),
            KeyCode::Char('+') => Some((Request::Scale { n: "+1".into() }, "scaling up…")),
            KeyCode::Char('-') => Some((Request::Scale { n: "-1".into() }, "scaling down…")),
            KeyCode::Char('R') => app
                .picked_id()
                .map(|id| (Request::Replace { id }, "replacing the worker…")),
            _ => None,
        };
        if let Some((req, doing)) = req {
            app.message = doing.to_string();
            let (name, path, tx): (String, PathBuf, _) =
                (name.to_string(), path.to_path_buf(), done_tx.clone());
            std::thread::spawn(move || {
                let msg = match control::call::<Done>(&name, &path, &req, |_| {}) {
                    Ok(d) if d.ok => "done".to_string(),
                    Ok(d) => d.error.unwrap_or_else(|| "failed".into()),
                    Err(e) => e.to_string(),
                };
                let _ = tx.send(msg);
            });
            next_poll = Instant::now() + Duration::from_millis(300);
        }
    }
}

/// The last `n` lines of worker `id` in the log file, if there is one.
fn log_tail(file: Option<&str>, id: Option<usize>, n: usize) -> Vec<String> {
    let (Some(file), Some(id)) = (file, id) else {
        return vec!["(no log file: start the cluster with `herd start` or --log-file)".into()];
    };
    let Ok(text) = std::fs::read(file) else {
        return Vec::new();
    };
    // The end of the file is enough.
    let from = text.len().saturating_sub(256 * 1024);
    let text = String::from_utf8_lossy(&text[from..]);
    let mut lines: Vec<String> = text
        .lines()
        .rev()
        .filter_map(|l| {
            let w = crate::output::worker_line(l.as_bytes())?;
            (w.slot == id).then(|| l[w.tag_at..].to_string())
        })
        .take(n)
        .collect();
    lines.reverse();
    lines
}

/// `████░░░░ 42%`
fn bar(pct: f64, width: usize) -> String {
    let full = ((pct / 100.0).clamp(0.0, 1.0) * width as f64).round() as usize;
    format!("{}{} {pct:.0}%", "█".repeat(full), "░".repeat(width - full))
}

fn human_secs(s: f64) -> String {
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Reloads, WorkerRow};

    #[test]
    fn the_log_pane_shows_the_picked_workers_lines_without_their_time() {
        let path = std::env::temp_dir().join(format!("herd-monit-tail-{}.log", std::process::id()));
        std::fs::write(
            &path,
            "2026-12-02T03:28:11.640000Z  INFO worker 0 ready (pid 1)\n\
             2026-12-02T03:28:11.643Z [0] up\n\
             2026-12-02T03:28:11.644Z [1] other\n\
             2026-12-02T03:28:11.645Z [0:err] warned\n",
        )
        .unwrap();
        let lines = log_tail(path.to_str(), Some(0), 6);
        let _ = std::fs::remove_file(&path);
        assert_eq!(lines, ["[0] up", "[0:err] warned"]);
    }
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn status(rps: f64) -> Status {
        let w = |id: usize, pid: u32| WorkerRow {
            id,
            version: 0,
            pid,
            state: WorkerState::Ready,
            uptime: 75.0,
            restarts: 1,
            cpu: 42.0,
            cpu_seconds: 3.0,
            memory: 50 << 20,
            connections: Some(2),
            requests: Some(1000),
            rps: Some(rps),
            p50_ms: Some(1.0),
            p99_ms: Some(7.5),
            last_exit: None,
            down: false,
            taken_out: id == 1,
        };
        Status {
            ok: true,
            name: "api".into(),
            pid: 4242,
            mode: "proxy".into(),
            listen: "0.0.0.0:8000".into(),
            uptime: 3700.0,
            command: None,
            cwd: None,
            reloading: false,
            stopping: false,
            log_file: None,
            out_file: None,
            error_file: None,
            user: None,
            worker_max_conns: 0,
            workers: vec![w(0, 5001), w(1, 5002)],
            upstreams: Vec::new(),
            deploy: None,
            reloads: Reloads::default(),
            restarts: Default::default(),
            host: None,
            hosts: Vec::new(),
        }
    }

    #[test]
    fn the_dashboard_shows_every_worker_and_the_picked_ones_history() {
        let mut app = App {
            name: "api".into(),
            ..App::default()
        };
        for r in [10.0, 20.0, 30.0] {
            app.update(status(r));
        }
        app.selected = 1;
        let mut t = Terminal::new(TestBackend::new(110, 30)).unwrap();
        t.draw(|f| app.draw(f)).unwrap();
        let screen: String = t
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        for s in [
            "api: proxy mode on 0.0.0.0:8000",
            "60 req/s",
            "5001",
            "5002",
            "42%",
            "7.5",
            "1h1m",
            "worker 1: req/s",
            "5001     ready",
            "5002     out ",
        ] {
            assert!(screen.contains(s), "{s:?} missing in:\n{screen}");
        }
        assert_eq!(
            app.rps[&1].iter().copied().collect::<Vec<_>>(),
            [10, 20, 30]
        );
    }

    #[test]
    fn bars_and_times() {
        assert_eq!(bar(50.0, 4), "██░░ 50%");
        assert_eq!(bar(250.0, 2), "██ 250%");
        assert_eq!(
            (human_secs(59.0), human_secs(61.0), human_secs(7300.0)),
            ("59s".into(), "1m1s".into(), "2h1m".into())
        );
    }
}
