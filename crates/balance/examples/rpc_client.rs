//! Client-side balancing of outgoing calls across remote nodes — the
//! "RPC load balancing" case — with herd's balancing core.
//!
//! Starts three small TCP services on loopback (one of them slow), then
//! makes calls through a `Balancer` using `ewma`: the slow node is soon
//! avoided. Then one node is stopped: its connect failure marks it down
//! (passive health, like nginx's `max_fails`) and calls go to the others.
//!
//! `cargo run -p herd-balance --example rpc_client`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use herd_balance::{Backend, BackendConfig, Balancer, Ctx, StrategyKind};

/// A toy "RPC" server: answers each 4-byte request with 4 bytes after `delay`.
fn node(delay: Duration, stop: Arc<AtomicBool>) -> std::io::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if stop.load(Ordering::Relaxed) {
                return; // Dropping the listener: later connects are refused.
            }
            let Ok(mut c) = conn else { continue };
            let mut req = [0u8; 4];
            if c.read_exact(&mut req).is_ok() {
                std::thread::sleep(delay);
                let _ = c.write_all(&req);
            }
        }
    });
    Ok(addr)
}

fn call(addr: &str) -> std::io::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.write_all(b"ping")?;
    let mut resp = [0u8; 4];
    c.read_exact(&mut resp)
}

fn main() -> std::io::Result<()> {
    let stops: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let delays = [2, 2, 40].map(Duration::from_millis);
    let mut backends = Vec::new();
    for (d, stop) in delays.iter().zip(&stops) {
        let addr = node(*d, stop.clone())?;
        let cfg = BackendConfig {
            max_fails: 1,
            fail_timeout: 5_000_000_000,
            ..Default::default()
        };
        backends.push(Arc::new(Backend::new(addr, cfg)));
    }
    // The caller owns the clock and the randomness; the balancer only decides.
    let clock = Instant::now();
    let now = || clock.elapsed().as_nanos() as u64;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let balancer = Balancer::new(StrategyKind::Ewma, backends.clone());

    let mut run = |label: &str, calls: usize| {
        let mut served: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..calls {
            let ctx = Ctx {
                now: now(),
                rand: rand(),
                key: None,
            };
            let Ok(lease) = balancer.pick(&ctx) else {
                println!("no node available");
                continue;
            };
            let addr = lease.backend().name().to_string();
            match call(&addr) {
                Ok(()) => {
                    lease.success(now());
                    *served.entry(addr).or_default() += 1;
                }
                Err(_) => {
                    if lease.failure(now()) {
                        println!("{addr} failed: marked down for fail_timeout");
                    }
                }
            }
        }
        println!("{label}:");
        for (i, b) in backends.iter().enumerate() {
            let n = served.get(b.name()).copied().unwrap_or(0);
            let down = if b.is_failed() { "  (marked down)" } else { "" };
            println!(
                "  node {i} {} ({:>2} ms): {n:>3} calls{down}",
                b.name(),
                delays[i].as_millis()
            );
        }
    };
    run("ewma steers calls away from the slow node", 60);
    stops[0].store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(backends[0].name()); // wake its accept loop so it stops
    run("after node 0 stopped", 60);
    Ok(())
}
