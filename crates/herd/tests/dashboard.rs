//! The web dashboard in a real browser: headless Chromium (Debian's
//! `chromium`) driven over the DevTools protocol loads the page against a
//! running cluster, reads the worker rows, sees a chart move under load,
//! and clicks the buttons (answering their confirmation dialogs).
//!
//! `HERD_CHROMIUM` names another browser binary; `HERD_SCREENSHOT=FILE`
//! saves what the page looked like (the README's picture comes from it).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;

use common::*;

const T: Duration = Duration::from_secs(30);

/// A headless Chromium with its own profile directory, killed on drop.
struct Browser {
    child: Child,
    dir: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One page's DevTools connection.
struct Page {
    ws: tungstenite::WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
    /// How to answer `confirm()`.
    accept: bool,
    /// Messages of the dialogs the page opened.
    dialogs: Vec<String>,
}

fn chromium() -> String {
    if let Ok(b) = std::env::var("HERD_CHROMIUM") {
        return b;
    }
    for b in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return b.to_string();
        }
    }
    panic!("these tests need Chromium: apt-get install chromium (or set HERD_CHROMIUM)");
}

/// Starts the browser on `url` and connects to its page.
fn open(url: &str) -> (Browser, Page) {
    // One profile per browser: a second Chromium on the same profile would
    // hand its URL to the first and exit.
    let dir = std::env::temp_dir().join(format!(
        "herd-chromium-{}-{}",
        std::process::id(),
        free_port()
    ));
    let child = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox", // CI runs as root
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,960",
            "--remote-debugging-port=0",
            &format!("--user-data-dir={}", dir.display()),
            url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let browser = Browser { child, dir };
    // Chromium writes the port it took to DevToolsActivePort.
    let mut port = 0u16;
    assert!(
        wait_until(T, || {
            port = std::fs::read_to_string(browser.dir.join("DevToolsActivePort"))
                .ok()
                .and_then(|s| s.lines().next()?.parse().ok())
                .unwrap_or(0);
            port != 0
        }),
        "chromium did not open its DevTools port"
    );
    let mut ws_url = String::new();
    assert!(
        wait_until(T, || {
            ws_url = page_ws(port, url).unwrap_or_default();
            !ws_url.is_empty()
        }),
        "no page for {url} in chromium"
    );
    let (ws, _) = tungstenite::connect(ws_url.as_str()).expect("DevTools websocket");
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(T)).unwrap();
    }
    let mut page = Page {
        ws,
        next: 1,
        accept: true,
        dialogs: Vec::new(),
    };
    page.call("Page.enable", json!({}));
    page.call("Runtime.enable", json!({}));
    (browser, page)
}

/// The DevTools websocket URL of the page showing `url`.
fn page_ws(port: u16, url: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // DevTools keeps the connection open: read the head, then its length.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let list: Vec<Value> = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len: usize = head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")?
                .trim()
                .parse()
                .ok()
        })?;
        if body.len() >= len {
            break serde_json::from_str(&body[..len]).ok()?;
        }
    };
    list.iter()
        .find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url)))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
}

impl Page {
    /// Calls a DevTools method and waits for its result, answering any
    /// dialog the page opens meanwhile.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 2; // odd ids are ours, even ones the dialog answers'
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .expect("DevTools send");
        loop {
            let m = self.ws.read().expect("DevTools answer");
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["method"] == "Page.javascriptDialogOpening" {
                self.dialogs
                    .push(v["params"]["message"].as_str().unwrap_or("").to_string());
                let answer = json!({
                    "id": id + 1,
                    "method": "Page.handleJavaScriptDialog",
                    "params": {"accept": self.accept},
                });
                self.ws
                    .send(tungstenite::Message::text(answer.to_string()))
                    .expect("DevTools send");
            }
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    /// The pids in the worker table, by row.
    fn pids(&mut self) -> Vec<u64> {
        let v = self
            .eval("[...document.querySelectorAll('#workers tbody tr')].map(r => +r.dataset.pid)");
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    }

    fn ready_rows(&mut self) -> usize {
        self.eval("document.querySelectorAll('#workers tbody tr[data-state=ready]').length")
            .as_u64()
            .unwrap_or(0) as usize
    }

    fn screenshot(&mut self) {
        let Ok(path) = std::env::var("HERD_SCREENSHOT") else {
            return;
        };
        // A picture worth showing has a few dozen seconds of chart.
        wait_until(Duration::from_secs(60), || {
            self.eval("document.querySelector('#rps-chart polyline').getAttribute('points').split(' ').length")
                .as_u64()
                .unwrap_or(0)
                >= 40
        });
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or(""))
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

#[test]
fn the_dashboard_shows_workers_moves_its_charts_and_its_buttons_work() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(&["-i", "2", "--admin", &addr], &[DEMO]);
    h.wait_ready(2);
    let herd_pids: Vec<u64> = h.worker_pids(2).into_iter().map(u64::from).collect();

    let (_browser, mut page) = open(&format!("http://{addr}/"));
    assert!(
        wait_until(T, || page.ready_rows() == 2),
        "the page shows no worker rows"
    );
    let mut shown = page.pids();
    shown.sort();
    let mut expected = herd_pids.clone();
    expected.sort();
    assert_eq!(shown, expected, "the rows are the cluster's workers");
    assert_eq!(
        page.eval("document.getElementById('conn').textContent"),
        "live"
    );

    // Under load the requests chart draws non-zero rates, a point a second.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(h.port, true, stop.clone(), done.clone());
    let points = |page: &mut Page| {
        page.eval("document.querySelector('#rps-chart polyline')?.getAttribute('points') || ''")
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let before = points(&mut page);
    assert!(
        wait_until(T, || {
            let rate = page.eval("parseFloat(document.getElementById('rps-now').textContent) || 0");
            rate.as_f64().unwrap_or(0.0) > 0.0 && points(&mut page) != before
        }),
        "the requests chart did not move under load"
    );
    let first = points(&mut page);
    assert!(
        wait_until(T, || points(&mut page) != first),
        "the chart stopped after one update"
    );
    assert!(
        wait_until(T, || page.eval(
            "document.getElementById('log').textContent.includes('all workers ready')"
        ) == true),
        "the log tail does not show herd's lines"
    );
    page.screenshot();

    // Reload: asks first, then every pid changes and the load sees no error.
    page.eval("document.getElementById('reload').click()");
    assert!(
        page.dialogs.last().is_some_and(|d| d.contains("Reload")),
        "{:?}",
        page.dialogs
    );
    assert!(
        wait_until(T, || {
            let now = page.pids();
            page.ready_rows() == 2 && now.len() == 2 && now.iter().all(|p| !herd_pids.contains(p))
        }),
        "the pids did not change after Reload: {:?} (were {herd_pids:?})\n{}",
        page.pids(),
        h.log()
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (_, bad) = c.join().unwrap();
        assert!(bad.is_empty(), "requests failed during the reload: {bad:?}");
    }

    // A dismissed confirmation does nothing; an accepted one scales.
    page.accept = false;
    page.eval("document.getElementById('msg').textContent = ''; document.getElementById('scale-up').click()");
    assert!(page.dialogs.last().is_some_and(|d| d.contains("one more")));
    assert_eq!(page.eval("document.getElementById('msg').textContent"), "");
    page.accept = true;
    page.eval("document.getElementById('scale-up').click()");
    assert!(
        wait_until(T, || page.ready_rows() == 3),
        "Scale +1 did not add a row"
    );

    // Restart one worker: only its pid changes.
    let row_pid = |page: &mut Page, id: usize| {
        page.eval(&format!(
            "+(document.querySelector('#workers tbody tr[data-id=\"{id}\"][data-state=ready]')?.dataset.pid || 0)"
        ))
        .as_u64()
        .unwrap_or(0)
    };
    let (one, other) = (row_pid(&mut page, 1), row_pid(&mut page, 0));
    page.eval("document.querySelector('button.restart[data-id=\"1\"]').click()");
    assert!(
        page.dialogs
            .last()
            .is_some_and(|d| d.contains("Restart worker 1"))
    );
    assert!(
        wait_until(T, || {
            let now = row_pid(&mut page, 1);
            now != 0 && now != one && page.ready_rows() == 3
        }),
        "worker 1 was not replaced"
    );
    assert_eq!(row_pid(&mut page, 0), other, "worker 0 was left alone");
}

#[test]
fn with_a_token_the_page_asks_for_it_and_then_shows_the_cluster() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(
        &["-i", "1", "--admin", &addr, "--admin-token", "s3cret"],
        &[DEMO],
    );
    h.wait_ready(1);
    let (_browser, mut page) = open(&format!("http://{addr}/"));
    assert!(
        wait_until(T, || page
            .eval("getComputedStyle(document.getElementById('login')).display")
            == "flex"),
        "the page did not ask for the token"
    );
    assert_eq!(page.ready_rows(), 0, "nothing is shown without the token");
    page.eval("document.getElementById('token').value = 'wrong'; document.getElementById('login-form').requestSubmit()");
    assert!(
        wait_until(T, || page
            .eval("getComputedStyle(document.getElementById('login')).display")
            == "flex"),
        "a wrong token was taken"
    );
    page.eval("document.getElementById('token').value = 's3cret'; document.getElementById('login-form').requestSubmit()");
    assert!(
        wait_until(T, || page.ready_rows() == 1),
        "the right token did not open the dashboard"
    );
    // The buttons carry the token too.
    page.eval("document.getElementById('scale-up').click()");
    assert!(
        wait_until(T, || page.ready_rows() == 2),
        "Scale +1 with the token did not add a row"
    );
}
