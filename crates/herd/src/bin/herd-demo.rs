//! The bundled example worker: a small HTTP server that says which worker
//! answered. It speaks the whole worker contract through `herd-sdk`: takes
//! its socket from fd 3 or `PORT`, sends `READY=1`, and on SIGTERM stops
//! accepting, finishes in-flight requests, lets its keep-alive clients go
//! with `herd_sdk::Drain`, then exits.
//!
//! Routes: `/` (hello), `/slow?ms=N` (answers after N ms), `/crash` (exits 1),
//! `/env` (the worker-contract variables it was given), `/headers` (the
//! request head as received), `/healthz`, `/alloc?mb=N` (keeps N more MiB,
//! to try `--max-memory`). `HERD_DEMO_DELAY_MS` delays every
//! answer (a slow backend, for trying the balancing strategies);
//! `HERD_DEMO_STATUS` sets every answer's status (a broken release, for
//! trying `herd deploy --max-error-rate`); `HERD_DEMO_TAG` is shown by
//! `/env` (a release's mark). With
//! `BENCH_DIR` set (by `bench/run`) it records that it is ready and how
//! many requests it served, as `bench/apps/hello.js` does.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::{Request, Response};

fn main() {
    if let Err(e) = serve() {
        eprintln!("herd-demo: {e}");
        std::process::exit(1);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    // Snapshot the contract first: taking fd 3 clears LISTEN_* from the env.
    let contract = contract_env();
    // Dispatch mode: the master hands over each connection; else fd 3 or PORT.
    let source = herd::builtin::Source::take(3000)?;
    let id = herd_sdk::worker_id().map_or("-".to_string(), |i| i.to_string());
    let delay = std::env::var("HERD_DEMO_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    println!("{}", source.describe());
    // Messages from `herd send`/`broadcast` and other workers, on a thread
    // of their own (the channel is blocking).
    if let Some(mut ch) = herd_sdk::channel()? {
        std::thread::spawn(move || {
            while let Ok(Some(msg)) = ch.recv() {
                match msg {
                    herd_sdk::Incoming::Message { from, data } => {
                        println!("message from {from}: {data}")
                    }
                    herd_sdk::Incoming::Shutdown => println!("shutdown notice"),
                    herd_sdk::Incoming::Undeliverable { error, .. } => {
                        println!("undeliverable: {error}")
                    }
                }
            }
        });
    }
    if let Ok(dir) = std::env::var("BENCH_DIR") {
        bench_stats(std::path::PathBuf::from(dir));
    }

    let handler = move |req| {
        let (id, contract) = (id.clone(), contract.clone());
        async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            match handle(req, id, contract).await {
                Ok(res) => res,
                Err(never) => match never {},
            }
        }
    };
    herd::builtin::serve(source, handler).await?;
    Ok(())
}

fn contract_env() -> std::sync::Arc<str> {
    use herd_sdk::env::*;
    let mut out = format!("pid={}\n", std::process::id());
    for k in [
        WORKER_ID,
        NODE_APP_INSTANCE,
        WORKERS,
        NAME,
        PORT,
        LISTEN_FDS,
        LISTEN_PID,
        LISTEN_FDNAMES,
        NOTIFY_SOCKET,
        MODE,
        DISPATCH_FD,
        "HERD_DEMO_TAG",
    ] {
        out += &format!("{k}={}\n", std::env::var(k).unwrap_or_default());
    }
    out.into()
}

static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `BENCH_DIR/ready/PID` now, and `BENCH_DIR/count/PID` every 100 ms.
fn bench_stats(dir: std::path::PathBuf) {
    let pid = std::process::id().to_string();
    let _ = std::fs::write(dir.join("ready").join(&pid), "");
    tokio::spawn(async move {
        let path = dir.join("count").join(&pid);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = SERVED.load(std::sync::atomic::Ordering::Relaxed);
            let _ = std::fs::write(&path, n.to_string());
        }
    });
}

async fn handle(
    req: Request<Incoming>,
    id: String,
    contract: std::sync::Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let pid = std::process::id();
    SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A body is read (and dropped) before the answer: a server that answers
    // without reading it closes the connection after, and the unread bytes
    // turn that close into a reset, which a proxy counts as the worker's
    // failure (nginx and herd both take it out for a while).
    let (parts, mut body) = req.into_parts();
    if !body.is_end_stream() {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    }
    let req = Request::from_parts(parts, ());
    let body = match req.uri().path() {
        "/slow" => {
            let ms = query_num(req.uri().query(), "ms=").unwrap_or(1000);
            println!("slow request started ({ms} ms)");
            tokio::time::sleep(Duration::from_millis(ms)).await;
            format!("slow done by worker {id} (pid {pid})\n")
        }
        "/env" => contract.to_string(),
        "/healthz" => "ok\n".to_string(),
        "/alloc" => {
            static HELD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
            let mb = query_num(req.uri().query(), "mb=").unwrap_or(10) as usize;
            let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
            held.push(vec![1u8; mb << 20]); // written, so resident
            format!(
                "holding {} MiB\n",
                held.iter().map(Vec::len).sum::<usize>() >> 20
            )
        }
        "/headers" => {
            let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (k, v) in req.headers() {
                out += &format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()));
            }
            out
        }
        "/crash" => {
            eprintln!("crashing on request");
            std::process::exit(1);
        }
        _ => format!("hello from worker {id} (pid {pid})\n"),
    };
    let status = std::env::var("HERD_DEMO_STATUS")
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    Ok(Response::builder()
        .status(status)
        .header("x-herd-worker", id.as_str())
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

fn query_num(q: Option<&str>, key: &str) -> Option<u64> {
    q?.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.parse().ok())
}
