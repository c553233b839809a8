"""herd side by side with Node cluster, PM2, nginx and HAProxy.

`bench/run` measures throughput, latency, the balancing process's CPU and
fairness; `bench/chaos` measures failed requests across reloads and kills.
Both write their raw results under bench/results/ and regenerate
docs/BENCHMARKS.md and its charts from whatever results exist.
Only loopback is used; every peer is installed from the package registries.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
TOOLS = BENCH / ".tools"
HERD = ROOT / "target/release/herd"
DEMO = ROOT / "target/release/herd-demo"
PLOT = BENCH / "plot/target/release/herd-bench-plot"
RELAY = BENCH / "relay/target/release/herd-uring-relay"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
HELLO_JS = BENCH / "apps/hello.js"
SIZES_JS = BENCH / "apps/sizes.js"
CLUSTER_JS = BENCH / "apps/node-cluster.js"
WRK_LUA = BENCH / "apps/report.lua"
WORKERS = 2
HZ = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


# ---------------------------------------------------------------- set-up

def ensure_tools():
    """Installs what is missing: Debian's wrk, nginx, haproxy, Node and a
    font for the charts, and PM2 from the npm registry (into bench/.tools)."""
    need = []
    for cmd, pkg in [("wrk", "wrk"), ("nginx", "nginx"), ("haproxy", "haproxy"), ("node", "nodejs"), ("npm", "npm")]:
        if not shutil.which(cmd) and not Path("/usr/sbin", cmd).exists():
            need.append(pkg)
    if not FONT.exists():
        need.append("fonts-dejavu-core")
    if need:
        log("installing:", *need)
        run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
        run(["apt-get", "install", "-y", "-qq", *need], stdout=subprocess.DEVNULL,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    os.environ["PATH"] += ":/usr/sbin"
    if not pm2_bin().exists():
        log("installing pm2 from the npm registry")
        TOOLS.mkdir(parents=True, exist_ok=True)
        run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(TOOLS), "pm2@7"],
            stdout=subprocess.DEVNULL)
    log("building herd and the chart drawer")
    run(["cargo", "build", "--release", "-q", "-p", "herd"], cwd=ROOT)
    run(["cargo", "build", "--release", "-q", "--manifest-path", str(BENCH / "plot/Cargo.toml")], cwd=ROOT)


def apt_install(pkg):
    """One of Debian's packages, after reading the package lists (a fresh
    machine has none)."""
    log("installing:", pkg)
    run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-qq", pkg], stdout=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


@contextlib.contextmanager
def no_autogroup():
    """The scheduler's autogroup shares CPU between sessions rather than
    threads. Every process a setup starts has a session of its own, so a
    setup that is one process tree (herd, Node cluster, PM2) would share one
    slice against wrk's, while nginx and each of its backends got one each:
    herd's proxy measured 25% slower that way. Off for the run, then
    restored. Yields the state the run had ("off", or "on" if it could not
    be changed)."""
    try:
        before = AUTOGROUP.read_text().strip()
    except OSError:
        yield "off"  # a kernel without autogroup
        return
    if before == "0":
        yield "off"
        return
    try:
        AUTOGROUP.write_text("0")
    except OSError:
        log("warning: cannot turn the scheduler's autogroup off (needs root): setups of several "
            "process trees (nginx, HAProxy and their backends) get more CPU than one tree (herd)")
        yield "on"
        return
    try:
        yield "off"
    finally:
        AUTOGROUP.write_text(before)


def pm2_bin():
    return TOOLS / "node_modules/.bin/pm2"


def pm2_version():
    """From its package.json: `pm2 --version` starts a PM2 daemon under the
    default PM2_HOME and leaves it running."""
    try:
        return json.loads((TOOLS / "node_modules/pm2/package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "?"


def version(cmd):
    """The first version number a command prints about itself."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        m = re.search(r"\d+\.\d+(\.\d+)?", out.stdout + out.stderr)
        return m.group(0) if m else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def ticks(pids):
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime + stime, children excluded
        except (OSError, IndexError, ValueError):
            pass
    return total


def alive(pid):
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return st != "Z"
    except OSError:
        return False


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]
    except OSError:
        return []


# ---------------------------------------------------------------- setups

def nginx_conf(d, port, ports, tls=None):
    """nginx in front of PORTS (upstream keepalive); with TLS=(cert, key) it terminates TLS and HTTP/2."""
    up = "".join(f"server 127.0.0.1:{bp}; " for bp in ports)
    # keepalive_requests is 1,000 by default: each keep-alive (and HTTP/2)
    # client would reconnect (with TLS, with a full handshake) every 1,000
    # requests, which HAProxy and herd never ask of it.
    # `deferred` (TCP_DEFER_ACCEPT), as herd's HTTP listener has by default.
    listen = f"listen 127.0.0.1:{port} deferred backlog=4096;\n    keepalive_requests 1000000;"
    if tls:
        listen = (f"listen 127.0.0.1:{port} ssl http2 deferred backlog=4096;\n    ssl_certificate {tls[0]};\n"
                  f"    ssl_certificate_key {tls[1]};\n    ssl_protocols TLSv1.2 TLSv1.3;\n"
                  "    ssl_session_cache shared:SSL:10m;\n    keepalive_requests 1000000;")
    conf = d / "nginx.conf"
    conf.write_text(f"""worker_processes {os.cpu_count()};
pid {d}/nginx.pid;
error_log {d}/nginx.err warn;
daemon off;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  upstream backends {{ {up} keepalive 128; }}
  server {{
    {listen}
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      # The forwarding headers herd's proxy adds, so every balancer sends
      # the apps the same requests to parse.
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\\"$http_host\\"";
    }}
  }}
}}
""")
    return conf


def haproxy_cfg(d, port, ports, tls_pem=None):
    """HAProxy in front of PORTS (http-reuse always); with TLS_PEM it terminates TLS (ALPN h2, http/1.1)."""
    servers = "".join(f"  server s{i} 127.0.0.1:{bp}\n" for i, bp in enumerate(ports))
    # defer-accept (TCP_DEFER_ACCEPT), as herd's HTTP listener has by default.
    bind = f"127.0.0.1:{port} defer-accept" + (f" ssl crt {tls_pem} alpn h2,http/1.1" if tls_pem else "")
    cfg = d / "haproxy.cfg"
    cfg.write_text(f"""global
  nbthread {os.cpu_count()}
  maxconn 9900
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind {bind}
  default_backend be
backend be
  balance roundrobin
  http-reuse always
  # The forwarding headers herd's proxy adds (see nginx_conf).
  option forwardfor
  http-request set-header X-Forwarded-Proto {"https" if tls_pem else "http"}
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header Forwarded "for=%[src];proto={"https" if tls_pem else "http"};host=\\"%[req.hdr(host)]\\""
{servers}""")
    return cfg


class Setup:
    """One way of running WORKERS copies of an app behind one port."""

    def __init__(self, name, app, kind, herd=False):
        self.name, self.app, self.kind, self.herd = name, app, kind, herd
        self.procs, self.port, self.dir = [], None, None

    def app_cmd(self):
        if self.app == "sizes":
            return ["node", str(SIZES_JS)]
        return ["node", str(HELLO_JS)] if self.app == "node" else [str(DEMO)]

    def spawn(self, cmd, env=None, **kw):
        p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL),
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def start(self, workdir):
        self.dir = Path(tempfile.mkdtemp(dir=workdir))
        (self.dir / "ready").mkdir()
        (self.dir / "count").mkdir()
        self.port = free_port()
        env = {"BENCH_DIR": str(self.dir)}
        n = WORKERS
        k = self.kind
        if k == "direct":
            n = 1
            self.spawn(self.app_cmd(), {**env, "PORT": str(self.port)})
            self.balancer = lambda: []
        elif k in ("nginx", "haproxy"):
            ports = [free_port() for _ in range(WORKERS)]
            for bp in ports:
                self.spawn(self.app_cmd(), {**env, "PORT": str(bp)})
            if k == "nginx":
                conf = nginx_conf(self.dir, self.port, ports)
                master = self.spawn(["nginx", "-c", str(conf), "-p", str(self.dir)])
                self.balancer = lambda: [master.pid, *children(master.pid)]
            else:
                cfg = haproxy_cfg(self.dir, self.port, ports)
                hp = self.spawn(["haproxy", "-f", str(cfg)])
                self.balancer = lambda: [hp.pid]
        elif k.startswith("herd-"):
            mode = k[len("herd-"):]
            args = [str(HERD), "run", "--listen", f"127.0.0.1:{self.port}", "-i", str(WORKERS),
                    "--name", f"bench-{os.getpid()}-{self.app}-{mode}", "--health-interval", "0"]
            if mode == "tcp":
                args += ["--mode", "proxy", "--protocol", "tcp"]
            else:
                args += ["--mode", mode]
            master = self.spawn([*args, "--", *self.app_cmd()], env)
            self.balancer = lambda: [master.pid]
            self.master = master
        elif k.startswith("relay-"):
            # bench/relay on one driver (issue 11's io_uring experiment),
            # in front of herd-demo backends on Unix sockets, as herd's are.
            socks = [self.dir / f"w{i}.sock" for i in range(WORKERS)]
            for sock in socks:
                self.spawn([str(DEMO)], {**env, "HERD_SOCKET": str(sock)})
            relay = self.spawn([str(RELAY), k[len("relay-"):], f"127.0.0.1:{self.port}",
                                str(len(os.sched_getaffinity(0))), *map(str, socks)])
            self.balancer = lambda: [relay.pid]
        elif k.startswith("node-cluster-"):
            policy = k[len("node-cluster-"):]
            primary = self.spawn(["node", str(CLUSTER_JS)],
                                 {**env, "PORT": str(self.port), "WORKERS": str(WORKERS),
                                  "NODE_CLUSTER_SCHED_POLICY": policy})
            self.balancer = lambda: [primary.pid]
            self.master = primary
        elif k == "pm2":
            self.pm2_home = self.dir / "pm2"
            self.pm2_env = {**os.environ, **env, "PM2_HOME": str(self.pm2_home), "PORT": str(self.port)}
            run([str(pm2_bin()), "start", str(HELLO_JS), "-i", str(WORKERS), "--name", "bench"],
                env=self.pm2_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            god = lambda: int((self.pm2_home / "pm2.pid").read_text().strip())
            self.balancer = lambda: [god()]
            self.master_pid = god
        wait_for(lambda: len(self.ready_pids()) >= n, 30, f"{self.name} workers")
        wait_for(lambda: accepts(self.port), 30, f"{self.name} port")

    def ready_pids(self):
        return [int(p.name) for p in (self.dir / "ready").iterdir() if alive(int(p.name))]

    def counts(self):
        out = {}
        for p in (self.dir / "count").iterdir():
            try:
                out[p.name] = int(p.read_text() or 0)
            except (OSError, ValueError):
                pass
        return out

    def stop(self):
        if self.kind == "pm2":
            subprocess.run([str(pm2_bin()), "kill"], env=self.pm2_env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # Workers that outlived their parent (there should be none).
        for pid in self.ready_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs = []


def setups():
    out = []
    for app in ("node", "rust"):
        out.append(Setup(f"{app} direct (1 process)", app, "direct"))
        if app == "node":
            out += [Setup("node cluster rr", app, "node-cluster-rr"),
                    Setup("node cluster none", app, "node-cluster-none"),
                    Setup("pm2 -i 2", app, "pm2")]
        out += [Setup("nginx", app, "nginx"), Setup("haproxy", app, "haproxy")]
        for m in ("proxy", "tcp", "shared", "reuseport", "dispatch"):
            out.append(Setup(f"herd {m}", app, f"herd-{m}", herd=True))
    return out


# The herd setup each peer is compared with: the one built the same way.
REFERENCE = {
    "direct": "herd-dispatch", "node-cluster-rr": "herd-dispatch", "pm2": "herd-dispatch",
    "node-cluster-none": "herd-shared", "nginx": "herd-proxy", "haproxy": "herd-proxy",
}

LOADS = [("keep-alive", 16), ("keep-alive", 128), ("new connection", 16), ("new connection", 128)]


def wrk(port, load, conns, secs, url=None, post_kib=None):
    """wrk through report.lua; POST_KIB makes every request a POST of that many KiB."""
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "-s", str(WRK_LUA), url or f"http://127.0.0.1:{port}/"]
    if load == "new connection":
        cmd[1:1] = ["-H", "Connection: close"]
    env = {**os.environ, "BENCH_POST_KIB": str(post_kib)} if post_kib else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60, env=env).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = re.search(r"LAT (\d+) (\d+) (\d+) (\d+)", out)
    err = re.search(r"ERR (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    return {"rps": rps, "p50": int(lat.group(1)), "p99": int(lat.group(2)), "p999": int(lat.group(3)),
            "requests": int(lat.group(4)), "errors": sum(int(x) for x in err.groups())}


def bench(args):
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="herd-bench-"))
    rows = []
    all_setups = [s for s in setups() if not args.only or any(o in s.kind or o in s.app for o in args.only)]
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        autogroup = stack.enter_context(no_autogroup())
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        for r in range(args.rounds):
            for s in all_setups:
                log(f"round {r + 1}/{args.rounds}: {s.app} / {s.name}")
                s.start(work)
                try:
                    # Unmeasured, the same for every setup: JIT-compiled
                    # runtimes (Node) and connection pools settle first,
                    # under each load (one second of new connections alone
                    # left the Node app's p99 in the first keep-alive loads
                    # up to 1.5x what the same load gave later).
                    if args.warmup > 0:
                        for load, conns in LOADS:
                            wrk(s.port, load, conns, args.warmup)
                    for load, conns in LOADS:
                        before_c, before_t = s.counts(), ticks(s.balancer())
                        res = wrk(s.port, load, conns, args.secs)
                        after_t = ticks(s.balancer())
                        time.sleep(0.15)  # the apps write their counts every 100 ms
                        after_c = s.counts()
                        served = [after_c[k] - before_c.get(k, 0) for k in after_c]
                        served = [x for x in served if x > 0] or [0]
                        fair = (max(served) / min(served)) if len(served) > 1 and min(served) > 0 else None
                        cpu = None if s.kind == "direct" else (after_t - before_t) / HZ / max(res["requests"], 1) * 1e5
                        rows.append({"app": s.app, "setup": s.name, "kind": s.kind, "herd": s.herd,
                                     "load": load, "conns": conns, "round": r, **res,
                                     "cpu_s_per_100k": cpu, "fairness": fair})
                finally:
                    s.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = machine(args, time.monotonic() - t0, autogroup)
    old = RESULTS / "bench.json"
    if args.only and old.exists():
        # A partial re-run replaces only its own setups' rows.
        prev = json.loads(old.read_text())
        ran = {(s.app, s.kind) for s in all_setups}
        rows = [r for r in prev["rows"] if (r["app"], r["kind"]) not in ran] + rows
        meta["rerun"] = {"only": args.only, "date": meta["date"], "command": meta["command"]}
        meta = {**prev["meta"], "rerun": meta["rerun"]}
    (RESULTS / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    report()


def rss_kib(pids):
    """Resident memory of the processes, in KiB (VmRSS)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def hold_idle(port, n):
    """Opens n keep-alive connections, each making one request and reading its
    answer, then leaves them open and idle. Returns the sockets."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 4096)), hard))
    socks = []
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(req)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed before its answer")
            got += chunk
        socks.append(s)
    return socks


# HAProxy wants two fds per connection of its maxconn and will not start
# with fewer; the hard limit here is 20,000 and may not be raised (no
# CAP_SYS_RESOURCE), so its maxconn is 9,900 (haproxy_cfg). Beside wrk's 64
# connections it can hold this many idle ones; nginx and herd hold --conns.
HAPROXY_IDLE = 9800


def idle(args):
    """RSS per idle keep-alive client connection of each HTTP balancer, then
    throughput with those connections still open."""
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="herd-idle-"))
    rows = []
    kinds = [("nginx", "nginx"), ("haproxy", "haproxy"), ("herd proxy", "herd-proxy")]
    with contextlib.ExitStack() as stack:
        autogroup = stack.enter_context(no_autogroup())
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        for r in range(args.rounds):
            for name, kind in kinds:
                s = Setup(name, "rust", kind, herd=kind.startswith("herd"))
                n = min(args.conns, HAPROXY_IDLE) if kind == "haproxy" else args.conns
                log(f"round {r + 1}/{args.rounds}: {name}, {n} idle connections")
                s.start(work)
                try:
                    wrk(s.port, "keep-alive", 16, 1)  # pools and buffers settle first
                    time.sleep(0.5)
                    before = rss_kib(s.balancer())
                    socks = hold_idle(s.port, n)
                    time.sleep(1.0)
                    after = rss_kib(s.balancer())
                    load = wrk(s.port, "keep-alive", 64, args.secs)
                    still = 0
                    for sock in socks:
                        try:
                            sock.setblocking(False)
                            still += sock.recv(1) != b""
                        except BlockingIOError:
                            still += 1
                        except OSError:
                            pass
                        sock.close()
                    rows.append({"setup": name, "kind": kind, "round": r, "conns": n,
                                 "rss_before_kib": before, "rss_after_kib": after,
                                 "bytes_per_conn": (after - before) * 1024 / n,
                                 "rps_with_idle": load["rps"], "p99_with_idle": load["p99"],
                                 "idle_still_open": still})
                finally:
                    s.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "conns": args.conns, "rounds": args.rounds, "secs": args.secs, "autogroup_off": autogroup,
            "versions": {"nginx": version(["nginx", "-v"]), "haproxy": version(["haproxy", "-v"])}}
    (RESULTS / "idle.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    report()


def strace_count(pids, work):
    """Starts `strace -c -f` on each pid; returns a function that stops them
    and gives the total number of syscalls they counted."""
    procs = []
    for i, pid in enumerate(pids):
        out = work / f"strace-{pid}-{i}.txt"
        procs.append((subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(out), "-p", str(pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
    time.sleep(1.0)  # attached to every thread

    def stop():
        total = 0
        by_name = {}
        for p, out in procs:
            p.send_signal(signal.SIGINT)
            p.wait(timeout=30)
            for line in out.read_text().splitlines():
                parts = line.split()
                # "% time seconds usecs/call calls [errors] syscall"
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    calls = int(parts[3])
                    by_name[parts[-1]] = by_name.get(parts[-1], 0) + calls
                    total += calls
        return total, by_name
    return stop


def strace_load(pids, port, load, secs, work):
    """Syscalls of PIDS while `wrk -c16` runs LOAD for SECS: the counts per
    request, and the six most frequent calls per request."""
    stop = strace_count(pids, work)
    res = wrk(port, load, 16, secs)
    total, by_name = stop()
    n = max(res["requests"], 1)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
    return {"requests": res["requests"], "syscalls": total, "per_request": total / n,
            "top": {k: round(v / n, 2) for k, v in top}}


def tcp_out_segs():
    """TCP segments the machine has sent (`OutSegs` of /proc/net/snmp): on
    loopback, every packet of the load generator, the balancer and the apps."""
    lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines() if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutSegs")])


def syscalls(args):
    """Syscalls per request of each HTTP balancer, counted by strace under
    the same wrk load (strace slows them; only the counts matter)."""
    ensure_tools()
    if not shutil.which("strace"):
        apt_install("strace")
    work = Path(tempfile.mkdtemp(prefix="herd-strace-"))
    rows = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        for name, kind in [("nginx", "nginx"), ("haproxy", "haproxy"), ("herd proxy", "herd-proxy")]:
            s = Setup(name, "rust", kind, herd=kind.startswith("herd"))
            s.start(work)
            try:
                for load in ("keep-alive", "new connection"):
                    wrk(s.port, load, 16, 1)
                    # Packets, without strace (whose delays could add ACKs).
                    before = tcp_out_segs()
                    plain = wrk(s.port, load, 16, 2)
                    segs = (tcp_out_segs() - before) / max(plain["requests"], 1)
                    pids = s.balancer()
                    if kind == "nginx":  # the workers do the work; the master waits
                        pids = [p for p in pids if p != pids[0]]
                    rows.append({"setup": name, "kind": kind, "load": load, "segments": segs,
                                 **strace_load(pids, s.port, load, args.secs, work)})
                    log(f"{name}, {load}: {rows[-1]['per_request']:.2f} syscalls/request {rows[-1]['top']}")
            finally:
                s.stop()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "secs": args.secs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "syscalls.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    report()


def http_client(port, n, load, conns=4):
    """Makes N requests as wrk would (`Host` only), over CONNS keep-alive
    connections in turn, or one new connection per request; reads each
    answer whole (Content-Length) before the next round."""
    req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    if load == "new connection":
        req += b"Connection: close\r\n"
    req += b"\r\n"

    def answer(s, buf):
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buf[:end])
                if not m:
                    raise RuntimeError(f"an answer without Content-Length: {buf[:end]!r}")
                whole = end + 4 + int(m.group(1))
                if len(buf) >= whole:
                    return buf[whole:]
            got = s.recv(65536)
            if not got:
                raise RuntimeError("the balancer closed the connection")
            buf += got

    if load == "new connection":
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(req)
                answer(s, b"")
        return
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    bufs = [b""] * conns
    try:
        for _ in range(n // conns):
            for s in socks:
                s.sendall(req)
            for k, s in enumerate(socks):
                bufs[k] = answer(s, bufs[k])
    finally:
        for s in socks:
            s.close()


def callgrind_total(out, skip_main):
    """Instructions counted in the dump files of one run (`--separate-threads`:
    one file per thread); SKIP_MAIN leaves out thread 1."""
    total = 0
    for f in out.parent.glob(out.name + "*"):
        text = f.read_text(errors="replace")
        thread = re.search(r"^thread: (\d+)", text, re.M)
        summary = re.search(r"^summary: (\d+)", text, re.M)
        if summary and not (skip_main and thread and thread.group(1) == "1"):
            total += int(summary.group(1))
    return total


def instructions(args):
    """User-space instructions per request of each HTTP balancer, counted by
    valgrind's callgrind: the work of the balancer's own code (and its
    libraries), apart from the kernel's, and repeatable from run to run
    whatever else the machine does, unlike CPU seconds. Each balancer runs
    twice, for N and 5N requests; the difference over 4N requests leaves out
    starting and stopping."""
    ensure_tools()
    if not shutil.which("valgrind"):
        apt_install("valgrind")
    work = Path(tempfile.mkdtemp(prefix="herd-callgrind-"))
    n1, n2 = args.requests, 5 * args.requests
    rows = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        backends = []
        stack.callback(lambda: [(p.terminate(), p.wait()) for p in backends])
        ports = [free_port() for _ in range(WORKERS)]
        for bp in ports:
            backends.append(subprocess.Popen([str(DEMO)], env={**os.environ, "PORT": str(bp)},
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for bp in ports:
            wait_for(lambda: accepts(bp), 10, "herd-demo")

        def setup(kind, port, d):
            """The balancer's command line: one process, one thread, except
            herd, whose proxy threads (one per CPU) are all counted."""
            if kind == "nginx":
                conf = nginx_conf(d, port, ports)
                conf.write_text(conf.read_text().replace(
                    f"worker_processes {os.cpu_count()};", "worker_processes 1;\nmaster_process off;"))
                return ["nginx", "-c", str(conf), "-p", str(d)], {}
            if kind == "haproxy":
                cfg = haproxy_cfg(d, port, ports)
                cfg.write_text(cfg.read_text().replace(f"nbthread {os.cpu_count()}", "nbthread 1"))
                return ["haproxy", "-f", str(cfg)], {}
            ups = [a for bp in ports for a in ("--upstream", f"127.0.0.1:{bp}")]
            return ([str(HERD), "run", "--listen", f"127.0.0.1:{port}", "--name", f"bench-cg-{os.getpid()}",
                     "--health-interval", "0", *ups], {"XDG_RUNTIME_DIR": str(d), "XDG_STATE_HOME": str(d)})

        for name, kind in [("nginx", "nginx"), ("haproxy", "haproxy"), ("herd proxy", "herd-proxy")]:
            for load in ("keep-alive", "new connection"):
                totals = []
                for n in (n1, n2):
                    d = Path(tempfile.mkdtemp(dir=work))
                    port = free_port()
                    cmd, env = setup(kind, port, d)
                    out = d / "callgrind.out"
                    p = subprocess.Popen(["valgrind", "--tool=callgrind", "--separate-threads=yes",
                                          f"--callgrind-out-file={out}", *cmd], env={**os.environ, **env},
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
                    try:
                        wait_for(lambda: accepts(port), 60, f"{name} under valgrind")
                        http_client(port, n, load)
                    finally:
                        os.killpg(p.pid, signal.SIGTERM)
                        p.wait(timeout=120)
                    # herd's main thread, the supervisor, serves no request.
                    # Under valgrind /proc/self/exe is valgrind, so the
                    # guardian it starts from there dies and is started
                    # again on every tick: counting it would count that.
                    totals.append(callgrind_total(out, skip_main=kind.startswith("herd")))
                per = (totals[1] - totals[0]) / (n2 - n1)
                rows.append({"setup": name, "kind": kind, "load": load, "per_request": per})
                log(f"{name}, {load}: {per:,.0f} instructions/request")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "requests": [n1, n2], "valgrind": version(["valgrind", "--version"])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instructions.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    report()


def results(name):
    """The meta and rows of bench/results/NAME.json, or None before its first run."""
    f = RESULTS / f"{name}.json"
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    return data["meta"], data["rows"]


def syscall_lines():
    if not (got := results("syscalls")):
        return []
    m, rows = got
    out = ["## Syscalls per request", "",
           f"Run {m['date']} with `bench/syscalls`: `strace -c -f` attached to each balancer (nginx's workers, "
           f"HAProxy's process, herd's master) while `wrk -c16` runs for {m['secs']} s against the Rust app; "
           "calls counted over requests served. strace slows everything down, so only the counts mean anything. "
           "**TCP segments** per request are counted without strace, in 2 s of the same load just before: every "
           "packet on loopback (client, balancer and apps; `OutSegs` of `/proc/net/snmp`), each of which costs the "
           "kernel a trip through both sides' TCP stacks.", "",
           "| setup | load | syscalls/request | vs herd | TCP segments/request | most frequent (per request) |",
           "|---|---|---|---|---|---|"]
    herd = {r["load"]: r["per_request"] for r in rows if r["kind"] == "herd-proxy"}
    for r in rows:
        h = herd.get(r["load"])
        vs = f"{r['per_request'] / h:.2f}×" if h and r["kind"] != "herd-proxy" else "–"
        top = ", ".join(f"{k} {v}" for k, v in r["top"].items())
        name = f"**{r['setup']}**" if r["kind"] == "herd-proxy" else r["setup"]
        segs = f"{r['segments']:.1f}" if "segments" in r else "–"
        out.append(f"| {name} | {r['load']} | {r['per_request']:.2f} | {vs} | {segs} | {top} |")
    return out + [""]


def instruction_lines():
    if not (got := results("instructions")):
        return []
    m, rows = got
    n1, n2 = m["requests"]
    out = ["## Instructions per request", "",
           f"Run {m['date']} with `bench/instructions` (valgrind {m['valgrind']}): each balancer, in front of the same two "
           "`herd-demo` backends, runs under valgrind's callgrind, which counts the instructions its own code and "
           "its libraries execute, not the kernel's. It runs twice, for "
           f"{n1:,} and {n2:,} requests, and the difference is divided by the {n2 - n1:,} requests between, so "
           "starting and stopping drop out. The requests are wrk's (`Host` only), over 4 keep-alive "
           "connections, or one new connection each (`Connection: close`). nginx runs as one process "
           "(`master_process off`, one worker) and HAProxy with one thread; herd's proxy threads are all "
           "counted, not its main thread (the supervisor, which serves no request). Unlike CPU seconds, "
           "these counts hardly move from run to run, whatever else the machine does (by at most 1.3% between "
           "two runs on 2026-12-04); they leave out the kernel, where most of a proxy's time goes on loopback "
           "(see Syscalls per request).", "",
           "| setup | load | instructions/request | vs herd |", "|---|---|---|---|"]
    herd = {r["load"]: r["per_request"] for r in rows if r["kind"] == "herd-proxy"}
    for r in rows:
        h = herd.get(r["load"])
        vs = f"{r['per_request'] / h:.2f}×" if h and r["kind"] != "herd-proxy" else "–"
        name = f"**{r['setup']}**" if r["kind"] == "herd-proxy" else r["setup"]
        out.append(f"| {name} | {r['load']} | {r['per_request']:,.0f} | {vs} |")
    return out + [""]


def idle_lines():
    if not (got := results("idle")):
        return []
    m, rows = got
    out = ["## Memory per idle client connection", "",
           f"Run {m['date']}, {m['rounds']} rounds. Each balancer (in front of the same two `herd-demo` "
           f"backends) gets {m['conns']:,} keep-alive client connections (**conns**: HAProxy at most "
           f"{HAPROXY_IDLE:,}, as its `maxconn` must leave room for the load that follows and may not exceed "
           "half this machine's 20,000-descriptor limit) that each make one request, read the "
           "answer and then sit idle. **Bytes/conn** is the growth of the balancing processes' RSS (all of "
           "nginx's, HAProxy's process, herd's master) divided by the connection count (median of rounds). "
           f"Then `wrk -c64` runs for {m['secs']} s with the idle connections still open.", "",
           "| setup | conns | bytes/conn | vs herd | RSS before → after (MiB) | req/s with idle conns open | p99 ms | idle conns still open |",
           "|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault(r["setup"], []).append(r)
    herd = by.get("herd proxy")
    herd_b = med([r["bytes_per_conn"] for r in herd]) if herd else None
    for name, rs in by.items():
        b = med([r["bytes_per_conn"] for r in rs])
        vs = f"{b / herd_b:.2f}×" if herd_b and name != "herd proxy" else "–"
        out.append(f"| {'**' + name + '**' if name == 'herd proxy' else name} | {rs[0]['conns']:,} | {b:,.0f} | {vs} | "
                   f"{med([r['rss_before_kib'] for r in rs]) / 1024:.1f} → {med([r['rss_after_kib'] for r in rs]) / 1024:.1f} | "
                   f"{med([r['rps_with_idle'] for r in rs]):,.0f} | {med([r['p99_with_idle'] for r in rs]) / 1000:.2f} | "
                   f"{min(r['idle_still_open'] for r in rs):,} |")
    return out + [""]



# ---------------------------------------------------------------- edge: TLS and HTTP/2

EDGE_LOADS = [("https keep-alive", 64), ("https new connection", 16), ("h2 over TLS", 16)]


def tunnel_lines():
    if not (got := results("tunnels")):
        return []
    m, rows = got
    out = ["## Memory per idle tunnel", "",
           f"Run {m['date']} with `bench/tunnels` ({m['conns']:,} connections, one run). A Python asyncio backend "
           "answers every request with `101 Switching Protocols` and then echoes. Each client upgrades through "
           "the balancer (herd's HTTP proxy, plain and behind its TLS listener; nginx with `proxy_set_header "
           "Upgrade`; HAProxy), echoes 5 bytes once and sits idle; `herd --protocol tcp` relays the same "
           "connections as plain TCP. **Bytes** is the balancing process's RSS growth divided by the connection "
           "count, after 100 unmeasured tunnels.", "",
           "| setup | idle tunnels | bytes per idle tunnel | RSS before → after (MiB) |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['setup']} | {r['conns']:,} | {(r['after_kib'] - r['before_kib']) * 1024 / r['conns']:,.0f} | "
                   f"{r['before_kib'] / 1024:.1f} → {r['after_kib'] / 1024:.1f} |")
    return out + ["", "Before `proxy::tunnel` (tokio's `copy_bidirectional`, two 8 KiB buffers per tunnel for its "
                  "whole life) the same clients cost herd 21,837 bytes per upgraded connection, 19,513 per TCP "
                  "connection and 27,073 per TLS upgraded connection (3,000 of them, measured by hand on "
                  "2026-12-02 with the binaries before and after). The allocator's layout moves these figures by "
                  "a few hundred bytes from build to build.", ""]


def make_cert(d):
    """A self-signed EC certificate for localhost: cert.pem, key.pem, both.pem (HAProxy)."""
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-days", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (d / "both.pem").write_text((d / "cert.pem").read_text() + (d / "key.pem").read_text())


class EdgeSetup(Setup):
    """TLS terminated by herd, nginx or HAProxy in front of two herd-demo backends."""

    def start(self, workdir):
        self.dir = Path(tempfile.mkdtemp(dir=workdir))
        (self.dir / "ready").mkdir()
        (self.dir / "count").mkdir()
        make_cert(self.dir)
        self.port = free_port()
        env = {"BENCH_DIR": str(self.dir)}
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        if self.kind == "herd-proxy":
            master = self.spawn([str(HERD), "run", "--listen", f"127.0.0.1:{self.port}", "-i", str(WORKERS),
                                 "--name", f"bench-edge-{os.getpid()}", "--health-interval", "0",
                                 "--tls-cert", str(cert), "--tls-key", str(key), "--", str(DEMO)], env)
            self.balancer = lambda: [master.pid]
        else:
            ports = [free_port() for _ in range(WORKERS)]
            for bp in ports:
                self.spawn([str(DEMO)], {**env, "PORT": str(bp)})
            if self.kind == "nginx":
                conf = nginx_conf(self.dir, self.port, ports, tls=(cert, key))
                master = self.spawn(["nginx", "-c", str(conf), "-p", str(self.dir)])
                self.balancer = lambda: [master.pid, *children(master.pid)]
            else:
                cfg = haproxy_cfg(self.dir, self.port, ports, tls_pem=self.dir / "both.pem")
                hp = self.spawn(["haproxy", "-f", str(cfg)])
                self.balancer = lambda: [hp.pid]
        wait_for(lambda: len(self.ready_pids()) >= WORKERS, 30, f"{self.name} workers")
        wait_for(lambda: accepts(self.port), 30, f"{self.name} port")


def h2load(port, conns, secs):
    """h2load over TLS (ALPN h2), 10 streams per connection, for SECS seconds."""
    out = subprocess.run(["h2load", "-c", str(conns), "-m", "10", "-t", "2", "-D", str(secs),
                          f"https://localhost:{port}/"], capture_output=True, text=True, timeout=secs + 60).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not (done and rps):
        raise RuntimeError(f"h2load said: {out[-500:]}")
    return {"rps": float(rps.group(1)), "requests": int(done.group(2)),
            "errors": int(done.group(3)) + int(done.group(4)), "p50": None, "p99": None, "p999": None}


def interleaved(args, setups, what, measure, name, warm=None, rotate=False):
    """Starts each setup fresh in every round (setups interleaved), lets
    MEASURE(setup, round) return its rows, then writes them and the run's
    facts to bench/results/NAME.json and regenerates the report. With
    WARM(setup), every setup starts once instead, WARM runs on each, and the
    rounds measure them warm, interleaved: for apps whose cost per request
    settles only after a while under the load itself (V8's heap sizing).
    With ROTATE, each round starts one setup further down the list, so no
    setup always follows the same one."""
    work = Path(tempfile.mkdtemp(prefix=f"herd-{name}-"))
    rows = []
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        autogroup = stack.enter_context(no_autogroup())
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if warm:
            for s in setups:
                log(f"warming: {s.name} ({what})")
                s.start(work)
                stack.callback(s.stop)
                warm(s)
        for r in range(args.rounds):
            k = r % len(setups) if rotate else 0
            for s in setups[k:] + setups[:k]:
                log(f"round {r + 1}/{args.rounds}: {s.name} ({what})")
                if warm:
                    rows += measure(s, r)
                    continue
                s.start(work)
                try:
                    rows += measure(s, r)
                finally:
                    s.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {**machine(args, time.monotonic() - t0, autogroup), "rounds": args.rounds, "secs": args.secs}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    report()


def by_setup(rows, same):
    """The rows for which SAME holds, by setup; herd's rows and their
    median req/s and CPU (None when herd has none)."""
    by = {}
    for r in rows:
        if same(r):
            by.setdefault(r["setup"], []).append(r)
    h = by.get("herd proxy")
    if not h:
        return by, None
    return by, (med([r["rps"] for r in h]), med([r["cpu_s_per_100k"] for r in h]))


def edge(args):
    ensure_tools()
    for tool, pkg in (("h2load", "nghttp2-client"), ("openssl", "openssl")):
        if not shutil.which(tool):
            run(["apt-get", "install", "-y", "-qq", pkg], stdout=subprocess.DEVNULL)
    setups = [EdgeSetup("herd proxy", "rust", "herd-proxy", herd=True), EdgeSetup("nginx", "rust", "nginx"),
              EdgeSetup("haproxy", "rust", "haproxy")]

    def measure(s, r):
        h2load(s.port, 4, 1)  # warm-up, unmeasured
        rows = []
        for load, conns in EDGE_LOADS:
            before = ticks(s.balancer())
            if load.startswith("h2"):
                res = h2load(s.port, conns, args.secs)
            else:
                res = wrk_tls(s.port, load, conns, args.secs)
            cpu = (ticks(s.balancer()) - before) / HZ / max(res["requests"], 1) * 1e5
            rows.append({"setup": s.name, "kind": s.kind, "load": load, "conns": conns, "round": r,
                         **res, "cpu_s_per_100k": cpu})
        return rows

    interleaved(args, setups, "TLS", measure, "edge")


def wrk_tls(port, load, conns, secs):
    return wrk(port, load.removeprefix("https "), conns, secs, url=f"https://localhost:{port}/")


def edge_lines():
    if not (got := results("edge")):
        return []
    m, rows = got
    out = ["## TLS and HTTP/2 at the edge", "",
           f"Run {m['date']} with `bench/edge` ({m['rounds']} rounds of {m['secs']} s, interleaved): herd, nginx and "
           "HAProxy each terminate TLS (a P-256 ECDSA certificate, TLS 1.3, ALPN h2 and http/1.1) in front of two "
           "`herd-demo` backends spoken to over HTTP/1.1. Loads: `wrk -t2` over HTTPS with keep-alive (64 "
           "connections) and with a new connection, so a full handshake, per request (16), and `h2load` over TLS "
           "(16 connections, 10 streams each). Medians; **CPU** as above, the balancing processes' CPU seconds per "
           "100k requests; **vs herd** divides the peer's figure by herd's.", "",
           "| load | setup | req/s | vs herd | p99 ms | CPU s/100k | vs herd | errors |", "|---|---|---|---|---|---|---|---|"]
    for load, _ in EDGE_LOADS:
        by, h = by_setup(rows, lambda r: r["load"] == load)
        if not h:
            continue
        h_rps, h_cpu = h
        for name, rs in by.items():
            rps, cpu = med([r["rps"] for r in rs]), med([r["cpu_s_per_100k"] for r in rs])
            p99 = [r["p99"] for r in rs if r["p99"] is not None]
            herd = name == "herd proxy"
            out.append(f"| {load} | {'**' + name + '**' if herd else name} | {rps:,.0f} | "
                       f"{'–' if herd else f'{rps / h_rps:.2f}×'} | {f'{med(p99) / 1000:.2f}' if p99 else '–'} | {cpu:.2f} | "
                       f"{'–' if herd else f'{cpu / h_cpu:.2f}×'} | {sum(r['errors'] for r in rs)} |")
    return out + [""]


# ---------------------------------------------------------------- io_uring

def uring(args):
    """Issue 11's io_uring experiment: the same small relay (bench/relay)
    on monoio's epoll driver and on its io_uring driver (as it comes, and
    with the ring's setup flags for one thread), herd's proxy beside them,
    in front of the same kind of backends; req/s, CPU, p99 in interleaved
    rounds, then syscalls per request under strace."""
    ensure_tools()
    if not shutil.which("strace"):
        apt_install("strace")
    run(["cargo", "build", "--release", "-q", "--manifest-path", str(BENCH / "relay/Cargo.toml")], cwd=ROOT)
    setups = [Setup("herd proxy", "rust", "herd-proxy", herd=True), Setup("relay on epoll", "rust", "relay-epoll"),
              Setup("relay on io_uring", "rust", "relay-uring"),
              Setup("relay on io_uring, tuned", "rust", "relay-uring-tuned")]

    def measure(s, r):
        rows = []
        for load, conns in LOADS:
            wrk(s.port, load, conns, 1)  # warm-up, unmeasured
        for load, conns in LOADS:
            before = ticks(s.balancer())
            res = wrk(s.port, load, conns, args.secs)
            cpu = (ticks(s.balancer()) - before) / HZ / max(res["requests"], 1) * 1e5
            rows.append({"setup": s.name, "kind": s.kind, "load": load, "conns": conns, "round": r,
                         **res, "cpu_s_per_100k": cpu})
        if r == 0:
            for load in ("keep-alive", "new connection"):
                rows.append({"setup": s.name, "kind": s.kind, "load": load, "strace": True,
                             **strace_load(s.balancer(), s.port, load, 2, s.dir)})
        return rows

    interleaved(args, setups, "io_uring", measure, "uring", rotate=True)


def uring_lines():
    if not (got := results("uring")):
        return []
    m, rows = got
    out = ["## io_uring", "",
           f"Run {m['date']} with `bench/uring` ({m['rounds']} round{'s' * (m['rounds'] != 1)} of {m['secs']} s, "
           "interleaved, each round starting one setup further down the list): whether "
           "io_uring pays for a proxy on this machine. `bench/relay` is one small HTTP/1.1 relay (deferred "
           "accept, one `SO_REUSEPORT` listener and one runtime per CPU, pooled keep-alive connections to two "
           "`herd-demo` backends on Unix sockets) written on monoio, a thread-per-core runtime with an io_uring "
           "driver and an epoll driver behind one API: the same code, run on each driver, so its rows differ "
           "only in how the relay waits and does its I/O. io_uring runs twice: as monoio sets it up (a ring of "
           "1,024 entries, no setup flags), and **tuned**, with the flags the kernel offers a ring that one "
           "thread alone submits to and reaps (`COOP_TASKRUN`, `SINGLE_ISSUER`, `DEFER_TASKRUN`). herd's proxy, "
           "in front of the same backends, is the yardstick. Medians; **CPU** is the relay's or herd's CPU seconds per 100k requests; **vs "
           "epoll** divides by the epoll relay's figure; **rounds below epoll's CPU** counts the rounds in which "
           "the setup needed less CPU per request than the epoll relay in the same round (this machine's "
           "spread between rounds is larger than most of these margins). **Syscalls/request** under `strace -f` (2 s, "
           "16 connections; only the counts mean anything), an io_uring submission counting as one.", "",
           "| load | setup | req/s (min–max) | vs epoll | p99 ms | CPU s/100k | vs epoll | rounds below epoll's CPU "
           "| errors |", "|---|---|---|---|---|---|---|---|---|"]
    timed = [r for r in rows if not r.get("strace")]
    for load, conns in LOADS:
        by = {}
        for r in timed:
            if r["load"] == load and r["conns"] == conns:
                by.setdefault(r["setup"], []).append(r)
        base = by.get("relay on epoll")
        if not base:
            continue
        b_rps, b_cpu = med([r["rps"] for r in base]), med([r["cpu_s_per_100k"] for r in base])
        b_round = {r["round"]: r["cpu_s_per_100k"] for r in base}
        for name, rs in by.items():
            rps, cpu = med([r["rps"] for r in rs]), med([r["cpu_s_per_100k"] for r in rs])
            p99 = med([r["p99"] for r in rs]) / 1000
            paired = [r for r in rs if r["round"] in b_round]
            below = "–" if rs is base else \
                f"{sum(r['cpu_s_per_100k'] < b_round[r['round']] for r in paired)} of {len(paired)}"
            lo, hi = min(r["rps"] for r in rs), max(r["rps"] for r in rs)
            out.append(f"| {load}, {conns} | {name} | {rps:,.0f} ({lo:,.0f}–{hi:,.0f}) | {rps / b_rps:.2f}× | "
                       f"{p99:.2f} | {cpu:.2f} | {cpu / b_cpu:.2f}× | {below} | {sum(r['errors'] for r in rs)} |")
    out += ["", "| setup | load | syscalls/request | most frequent (per request) |", "|---|---|---|---|"]
    for r in rows:
        if r.get("strace"):
            top = ", ".join(f"{k} {v}" for k, v in r["top"].items())
            out.append(f"| {r['setup']} | {r['load']} | {r['per_request']:.2f} | {top} |")
    return out + [""]


# ---------------------------------------------------------------- bodies

# (method, KiB, the answer's framing): answers of 16 KiB to 1 MiB (chunked,
# and two with a Content-Length), uploads of 64 KiB and 1 MiB (nginx's
# default client_max_body_size), keep-alive, 16 connections.
BODY_LOADS = [("GET", 16, "chunked"), ("GET", 64, "chunked"), ("GET", 256, "chunked"), ("GET", 1024, "chunked"),
              ("GET", 64, "length"), ("GET", 1024, "length"), ("POST", 64, None), ("POST", 1024, None)]
BODY_CONNS = 16
BODY_WARM = 8  # seconds of each load on each setup before the rounds
TEMP_FILE = re.compile(r"(upstream response|client request body) is buffered to a temporary file")


def temp_files(setup):
    """How many answers and uploads nginx has spooled to disk so far (its warnings)."""
    f = setup.dir / "nginx.err"
    if setup.kind != "nginx" or not f.exists():
        return 0
    return len(TEMP_FILE.findall(f.read_text(errors="replace")))


def bodies(args):
    ensure_tools()
    setups = [Setup("herd proxy", "sizes", "herd-proxy", herd=True), Setup("nginx", "sizes", "nginx"),
              Setup("haproxy", "sizes", "haproxy")]

    def url(s, method, kib, framing):
        path = "1" if method == "POST" else f"{kib}{'?length' if framing == 'length' else ''}"
        return f"http://127.0.0.1:{s.port}/{path}"

    def warm(s):
        # Node's cost per request under a load settles only after many
        # seconds of it (V8 sizes its young generation by what survives):
        # measured cold, one upload load moved by up to 1.7x between two
        # runs of 4 s.
        for method, kib, framing in BODY_LOADS:
            wrk(s.port, "keep-alive", BODY_CONNS, BODY_WARM, url=url(s, method, kib, framing),
                post_kib=kib if method == "POST" else None)

    def measure(s, r):
        rows = []
        for method, kib, framing in BODY_LOADS:
            before, spooled = ticks(s.balancer()), temp_files(s)
            post = kib if method == "POST" else None
            res = wrk(s.port, "keep-alive", BODY_CONNS, args.secs, url=url(s, method, kib, framing), post_kib=post)
            cpu = (ticks(s.balancer()) - before) / HZ / max(res["requests"], 1) * 1e5
            rows.append({"setup": s.name, "kind": s.kind, "method": method, "kib": kib, "framing": framing, "round": r,
                         **res, "cpu_s_per_100k": cpu, "temp_files": temp_files(s) - spooled})
        return rows

    interleaved(args, setups, "bodies", measure, "bodies", warm)


def size(kib):
    return f"{kib // 1024} MiB" if kib >= 1024 else f"{kib} KiB"


def bodies_lines():
    if not (got := results("bodies")):
        return []
    m, rows = got
    out = ["## Answers and uploads of real sizes", "",
           f"Run {m['date']} with `bench/bodies` ({m['rounds']} rounds of {m['secs']} s, interleaved): herd's "
           "proxy, nginx and HAProxy, configured as in the first section, in front of two Node workers of "
           "`bench/apps/sizes.js`, which answer `GET /N` with N KiB (chunked, as Node frames a body written "
           "after `writeHead`; `GET /N?length` with a `Content-Length`, as Express's `res.send` does) and read a "
           f"request's whole body before answering. Load: `wrk -t2`, keep-alive, {BODY_CONNS} connections. Each setup starts "
           f"once and gets {BODY_WARM} s of every load, unmeasured, before the rounds: Node's cost per request under "
           "a load settles only after many seconds of it (V8 sizes its young generation by what survives), and "
           "measured cold, one upload load moved by up to 1.7× between two runs of 4 s. **MB/s** counts the answers' "
           "bodies (GET) or the uploads (POST). nginx runs with its defaults for bodies: it buffers answers "
           "(`proxy_buffering`) and uploads (`proxy_request_buffering`) and writes what does not fit its buffers "
           "to temporary files; **spooled** counts the answers and uploads it wrote to disk, from its own "
           "warnings. herd reads an upload of up to `--request-buffer` (64 KiB) whole in memory before it picks a "
           "backend, and streams the rest and every answer with bounded buffers; HAProxy streams both ways. Medians; **CPU** as above, the "
           "balancing processes' CPU seconds per 100k requests; **vs herd** divides the peer's figure by herd's.", "",
           "| load | setup | req/s | MB/s | vs herd | p99 ms | CPU s/100k | vs herd | spooled | errors |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for method, kib, framing in BODY_LOADS:
        by, h = by_setup(rows, lambda r: (r["method"], r["kib"], r.get("framing")) == (method, kib, framing))
        if not h:
            continue
        h_rps, h_cpu = h
        load = f"{method} {size(kib)}{', Content-Length' if framing == 'length' else ''}"
        for name, rs in by.items():
            rps, cpu = med([r["rps"] for r in rs]), med([r["cpu_s_per_100k"] for r in rs])
            herd = name == "herd proxy"
            spooled = sum(r["temp_files"] for r in rs) if rs[0]["kind"] == "nginx" else None
            out.append(f"| {load} | {'**' + name + '**' if herd else name} | {rps:,.0f} | "
                       f"{rps * kib * 1024 / 1e6:,.0f} | {'–' if herd else f'{rps / h_rps:.2f}×'} | "
                       f"{med([r['p99'] for r in rs]) / 1000:.2f} | {cpu:.2f} | "
                       f"{'–' if herd else f'{cpu / h_cpu:.2f}×'} | {'–' if spooled is None else f'{spooled:,}'} | "
                       f"{sum(r['errors'] for r in rs)} |")
    return out + [""]


def machine(args, took, autogroup):
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "command": "bench/" + args.cmd + " " + " ".join(sys.argv[2:]), "seconds": round(took),
        "autogroup": autogroup,
        "versions": {
            "herd": version([str(HERD), "--version"]), "node": version(["node", "--version"]),
            "pm2": pm2_version(),
            "nginx": version(["nginx", "-v"]), "haproxy": version(["haproxy", "-v"]),
            "wrk": version(["wrk", "--version"]),
        },
    }


# ---------------------------------------------------------------- chaos

def load_gen(port, conns=8):
    """A wrk run in the background with a new connection per request;
    stopped by SIGINT, it still prints its summary."""
    cmd = ["wrk", "-t2", f"-c{conns}", "-d600s", "-H", "Connection: close", "-s", str(WRK_LUA),
           f"http://127.0.0.1:{port}/"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def load_result(p):
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=30)[0]
    lat = re.search(r"LAT (\d+) (\d+) (\d+) (\d+)", out)
    err = re.search(r"ERR (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not lat:
        return {"requests": 0, "errors": None}
    return {"requests": int(lat.group(4)), "errors": sum(int(x) for x in err.groups())}


def event_row(test, s, n, res, seconds):
    """A chaos result: n events under one load run, and how long each took."""
    return {"test": test, "setup": s.name, "herd": s.herd, "times": n, **res,
            "per_event": None if res["errors"] is None else res["errors"] / n,
            "seconds": statistics.median(seconds)}


def reload_cmd(s):
    if s.kind == "pm2":
        return [str(pm2_bin()), "reload", "bench"], s.pm2_env
    name = f"bench-{os.getpid()}-{s.app}-{s.kind[len('herd-'):]}"
    return [str(HERD), "reload", "--name", name], None


def chaos(args):
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="herd-chaos-"))
    rows = []
    t0 = time.monotonic()
    n = args.times
    with contextlib.ExitStack() as stack:
        autogroup = stack.enter_context(no_autogroup())
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        # Rolling reloads under load.
        for kind in ["herd-proxy", "herd-shared", "herd-reuseport", "herd-dispatch", "pm2"]:
            s = Setup(kind.replace("-", " "), "node", kind, herd=kind.startswith("herd"))
            log(f"chaos: {n} reloads, {s.name}")
            s.start(work)
            try:
                wrk(s.port, "keep-alive", 16, 1)
                lg = load_gen(s.port)
                time.sleep(0.5)
                took = []
                for _ in range(n):
                    cmd, env = reload_cmd(s)
                    t = time.monotonic()
                    run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    took.append(time.monotonic() - t)
                time.sleep(0.5)
                rows.append(event_row("reload", s, n, load_result(lg), took))
            finally:
                s.stop()
        # kill -9 of one worker under load.
        for kind in ["herd-proxy", "herd-shared", "herd-reuseport", "herd-dispatch", "node-cluster-rr", "pm2"]:
            s = Setup(kind.replace("-", " "), "node", kind, herd=kind.startswith("herd"))
            log(f"chaos: {n} worker kills, {s.name}")
            s.start(work)
            try:
                lg = load_gen(s.port)
                time.sleep(0.5)
                back = []
                for _ in range(n):
                    before = set(s.ready_pids())
                    victim = sorted(before)[0]
                    t = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    # Serving again: a new worker has said it is listening.
                    wait_for(lambda: set(s.ready_pids()) - before, 30, "a replacement")
                    back.append(time.monotonic() - t)
                    (s.dir / "ready" / str(victim)).unlink(missing_ok=True)
                    # Let the newcomer pass the supervisors' minimum uptime (1 s
                    # in herd and PM2), or the next kill is a crash loop step.
                    time.sleep(1.2)
                rows.append(event_row("kill-worker", s, n, load_result(lg), back))
            finally:
                s.stop()
        # kill -9 of the master.
        for kind in ["herd-proxy", "herd-shared", "herd-reuseport", "herd-dispatch", "node-cluster-rr", "pm2"]:
            s = Setup(kind.replace("-", " "), "node", kind, herd=kind.startswith("herd"))
            log(f"chaos: kill -9 of the master, {s.name}")
            s.start(work)
            try:
                workers = s.ready_pids()
                master = s.master_pid() if kind == "pm2" else s.master.pid
                os.kill(master, signal.SIGKILL)
                time.sleep(2)
                left = [p for p in workers if alive(p)]
                rows.append({"test": "kill-master", "setup": s.name, "herd": s.herd,
                             "workers": len(workers), "surviving": len(left)})
            finally:
                s.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = machine(args, time.monotonic() - t0, autogroup)
    (RESULTS / "chaos.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    report()


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(v, unit=""):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}{unit}"
    if abs(v) >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.2f}{unit}"


def summarize(rows):
    """(app, setup, load, conns) -> medians and spread over rounds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["app"], r["setup"], r["load"], r["conns"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        out[k] = {
            "kind": rs[0]["kind"], "herd": rs[0]["herd"], "n": len(rs),
            "rps": med(r["rps"] for r in rs), "lo": min(r["rps"] for r in rs), "hi": max(r["rps"] for r in rs),
            "p50": med(r["p50"] for r in rs), "p99": med(r["p99"] for r in rs), "p999": med(r["p999"] for r in rs),
            "cpu": med(r["cpu_s_per_100k"] for r in rs), "fair": med(r["fairness"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
        }
    return out


def reference(summary, app, kind, load, conns):
    if kind.startswith("herd-"):
        return None
    ref = REFERENCE.get(kind)
    for (a, _s, l, c), v in summary.items():
        if a == app and l == load and c == conns and v["kind"] == ref:
            return v, ref.replace("-", " ")
    return None


# The proxy engine's targets (issue 11): herd's proxy against nginx and
# HAProxy, per load. (label, how herd's figure compares, goal, met when)
TARGETS = [("req/s ÷ nginx", "rps", "nginx", 1.2, "≥"), ("req/s ÷ HAProxy", "rps", "haproxy", 1.1, "≥"),
           ("CPU ÷ cheaper peer", "cpu", "cheaper", 0.8, "≤"), ("p99 ÷ better peer", "p99", "better", 1.0, "≤")]


def target_lines(summary):
    """Per load, herd's proxy against the targets, and by how much it misses."""
    by = {}
    for (app, _s, load, conns), v in summary.items():
        if v["kind"] in ("herd-proxy", "nginx", "haproxy"):
            by.setdefault((app, load, conns), {})[v["kind"]] = v
    out = ["## The proxy engine's targets", "",
           "herd's proxy against the targets of its engine: req/s ≥ 1.2× nginx's and ≥ 1.1× HAProxy's, balancer "
           "CPU per request ≤ 0.8× the cheaper peer's, p99 ≤ the better peer's. Each cell is herd's ratio, then "
           "**met** or how far it is from the target.", "",
           "| app | load | conns | " + " | ".join(f"{t[0]} (target {t[4]} {t[3]:.1f})" for t in TARGETS) + " |",
           "|---|---|---|" + "---|" * len(TARGETS)]
    met = [0] * len(TARGETS)
    rows = [k for k in sorted(by) if len(by[k]) == 3]
    for app, load, conns in rows:
        v = by[(app, load, conns)]
        cells = []
        for i, (_label, key, peer, goal, sense) in enumerate(TARGETS):
            peers = [v["nginx"][key], v["haproxy"][key]]
            other = {"nginx": peers[0], "haproxy": peers[1]}.get(peer) or min(p for p in peers if p)
            r = v["herd-proxy"][key] / other if other else None
            if r is None:
                cells.append("–")
                continue
            ok = r >= goal if sense == "≥" else r <= goal
            met[i] += ok
            cells.append(f"{r:.2f} **met**" if ok else f"{r:.2f} ({r - goal:+.2f})")
        out.append(f"| {app} | {load} | {conns} | " + " | ".join(cells) + " |")
    out += ["", "Met in " + ", ".join(f"{n} of {len(rows)} ({t[0]})" for n, t in zip(met, TARGETS)) + ".", ""]
    return out


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b not in (None, 0) else "–"


def report():
    bench_f, chaos_f = RESULTS / "bench.json", RESULTS / "chaos.json"
    doc = ["# Benchmarks", "",
           "Generated by the scripts in `bench/` (see Reproduce; do not edit by hand). Every peer runs the same",
           f"apps with the same worker count ({WORKERS}) on the same machine, on loopback, in one run.", ""]
    charts = []
    headline = []
    readme = []
    if bench_f.exists():
        data = json.loads(bench_f.read_text())
        m, rows = data["meta"], data["rows"]
        summary = summarize(rows)
        doc += machine_lines(m)
        doc += ["## Throughput, latency, balancer CPU, fairness", "",
                "Apps: `bench/apps/hello.js` (the hello-world server from Node's docs, port from `$PORT`) and "
                "`herd-demo` (a small hyper server). nginx keeps upstream connections (`keepalive 128`) and client "
                "ones (`keepalive_requests 1000000`), HAProxy has `http-reuse always`, and both add the forwarding "
                "headers herd's proxy adds (`X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded`), so every balancer "
                "sends the apps the same requests; both also defer accepting a connection until its first bytes "
                "arrive (nginx's `deferred`, HAProxy's `defer-accept`), as herd's HTTP listener does by default. "
                "nginx and HAProxy reach the apps on their loopback ports, as they would reach any unmodified app; "
                "herd's proxy reaches its workers on the Unix sockets they listen on by default (`--worker-socket auto`: "
                "herd's Node preload and herd-sdk listen there), which skips TCP between the balancer and the app. "
                "Load: `wrk -t2`, keep-alive or `Connection: close` (a new "
                "connection per request), 16 and 128 connections, after one unmeasured second of load per start; setups "
                "interleaved, each run repeated per round; "
                "figures are medians, req/s with the min–max spread. **CPU** is the balancing process's own CPU "
                "seconds (utime+stime from `/proc/PID/stat`, children excluded) per 100k requests: herd's master, "
                "Node's primary, PM2's daemon, nginx's and HAProxy's processes; in `shared` and `reuseport` herd's "
                "master does not touch connections. **Fair** is the busiest worker's request count over the least "
                "busy one's (1.00 is perfect). **vs herd** divides the peer's figure by that of the herd mode built "
                "the same way (named in the column), and the other figures of a peer carry the same ratio in "
                "brackets: below 1.00× the peer is slower (req/s), quicker (latency), cheaper (CPU) or fairer.", ""]
        for app, title in (("node", "Node hello"), ("rust", "Rust hello (herd-demo)")):
            panels = []
            for load, conns in LOADS:
                keys = [k for k in summary if k[0] == app and k[2] == load and k[3] == conns]
                if not keys:
                    continue
                doc += [f"### {title}: {load}, {conns} connections", "",
                        "| setup | req/s | spread | vs herd | p50 ms | p99 ms | p99.9 ms | CPU s/100k | fair | errors |",
                        "|---|---|---|---|---|---|---|---|---|---|"]
                bars = []
                for k in sorted(keys, key=lambda k: -summary[k]["rps"]):
                    v = summary[k]
                    ref = reference(summary, app, v["kind"], load, conns)
                    r = ref[0] if ref else None

                    def vs(key, scale=1.0):
                        # A figure, then (×the reference herd mode's) for peers.
                        val = f(None if v[key] is None else v[key] / scale)
                        return f"{val} ({ratio(v[key], r[key])}×)" if r and ratio(v[key], r[key]) != "–" else val
                    vs_rps = f"{ratio(v['rps'], r['rps'])}× ({ref[1]})" if r else "–"
                    name = f"**{k[1]}**" if v["herd"] else k[1]
                    doc.append(f"| {name} | {f(v['rps'])} | {f(v['lo'])}–{f(v['hi'])} | {vs_rps} | "
                               f"{vs('p50', 1000)} | {vs('p99', 1000)} | {vs('p999', 1000)} | "
                               f"{vs('cpu')} | {vs('fair')} | {v['errors']} |")
                    bars.append({"label": k[1], "value": v["rps"], "lo": v["lo"], "hi": v["hi"], "herd": v["herd"]})
                doc.append("")
                panels.append({"title": f"{load}, {conns} connections", "bars": bars[::-1]})
            if panels:
                out = f"docs/bench-{app}.png"
                charts.append({"out": str(ROOT / out), "title": f"{title}: requests/s ({WORKERS} workers)",
                               "unit": "requests/s", "panels": panels})
                doc += [f"![{title}](bench-{app}.png)", ""]
        # Balancer CPU chart, new connection per request at 128 (the master's heaviest case).
        cpu_panels = []
        for app in ("node", "rust"):
            bars = [{"label": k[1], "value": v["cpu"], "lo": v["cpu"], "hi": v["cpu"], "herd": v["herd"]}
                    for k, v in summary.items()
                    if k[0] == app and k[2] == "new connection" and k[3] == 128 and v["cpu"] is not None]
            if bars:
                cpu_panels.append({"title": f"{app} app, new connection per request, 128",
                                   "bars": sorted(bars, key=lambda b: b["value"])})
        if cpu_panels:
            charts.append({"out": str(ROOT / "docs/bench-cpu.png"),
                           "title": "Balancing process CPU seconds per 100k requests (lower is better)",
                           "unit": "CPU s / 100k requests", "panels": cpu_panels})
            doc += ["![balancer CPU](bench-cpu.png)", ""]
        headline = headlines(summary)
        readme += readme_table(summary, data["meta"])
        doc += target_lines(summary)
        doc += ["## Where herd wins and loses", ""] + [f"- {h}" for h in headline] + [""]
    if chaos_f.exists():
        data = json.loads(chaos_f.read_text())
        m, rows = data["meta"], data["rows"]
        readme += readme_chaos(rows, m)
        doc += ["## Chaos", ""] + machine_lines(m)
        doc += ["Node hello app, 2 workers, under a constant `wrk -t2 -c8` load with a new connection per "
                "request. Failed = connection errors, resets, timeouts and non-2xx answers, as wrk counts them.", ""]
        rl = [r for r in rows if r["test"] == "reload"]
        if rl:
            doc += [f"**Rolling reload**, {rl[0]['times']} times in a row:", "",
                    "| setup | requests | failed | failed per reload | failed per 100k requests | median reload time s |",
                    "|---|---|---|---|---|---|"]
            doc += [f"| {('**' + r['setup'] + '**') if r['herd'] else r['setup']} | {r['requests']:,} | "
                    f"{r['errors']} | {f(r['per_event'])} | {f(per_100k(r))} | {f(r['seconds'])} |" for r in rl]
            doc.append("")
        kw = [r for r in rows if r["test"] == "kill-worker"]
        if kw:
            doc += [f"**`kill -9` of one worker**, {kw[0]['times']} times (time until a replacement listens):", "",
                    "| setup | requests | failed | failed per kill | failed per 100k requests | median time to serve again s |",
                    "|---|---|---|---|---|---|"]
            doc += [f"| {('**' + r['setup'] + '**') if r['herd'] else r['setup']} | {r['requests']:,} | "
                    f"{r['errors']} | {f(r['per_event'])} | {f(per_100k(r))} | {f(r['seconds'])} |" for r in kw]
            doc += ["", "A worker killed with `kill -9` takes the connections it was serving with it, in every "
                    "setup; herd's proxy mode alone retries those requests on another worker. The faster a setup "
                    "serves, the more connections a worker holds at the moment it dies, so the failures are also "
                    "given per 100k requests served during the run."]
            doc.append("")
        km = [r for r in rows if r["test"] == "kill-master"]
        if km:
            doc += ["**`kill -9` of the master** (herd's master, Node's primary, PM2's daemon): worker processes "
                    "still alive 2 s later (target 0):", "", "| setup | workers | surviving |", "|---|---|---|"]
            doc += [f"| {('**' + r['setup'] + '**') if r['herd'] else r['setup']} | {r['workers']} | {r['surviving']} |"
                    for r in km]
            doc.append("")
        doc += ["Compared with the peers, plainly:", ""] + [f"- {c}" for c in chaos_lines(rows)] + [""]
        panels = []
        for test, title in (("reload", "failed requests per reload"), ("kill-worker", "failed requests per worker kill")):
            bars = [{"label": r["setup"], "value": r["per_event"] or 0.0, "lo": r["per_event"] or 0.0,
                     "hi": r["per_event"] or 0.0, "herd": r["herd"]} for r in rows if r["test"] == test]
            if bars:
                panels.append({"title": title, "bars": bars})
        if panels:
            charts.append({"out": str(ROOT / "docs/bench-chaos.png"), "title": "Chaos: failed requests (lower is better)",
                           "unit": "failed requests", "panels": panels})
            doc += ["![chaos](bench-chaos.png)", ""]
    doc += idle_lines()
    doc += tunnel_lines()
    doc += syscall_lines()
    doc += instruction_lines()
    doc += edge_lines()
    doc += bodies_lines()
    doc += uring_lines()
    doc += ["## Reproduce", "", "```sh", "bench/run      # throughput, latency, CPU, fairness (about 21 minutes, plus the first build)",
            "bench/idle     # memory per idle client connection (about 3 minutes)",
            "bench/tunnels  # memory per idle WebSocket (plain and TLS) and TCP tunnel (about a minute)",
            "bench/syscalls # syscalls and TCP segments per request (about 2 minutes)",
            "bench/instructions # user-space instructions per request, by callgrind (about 4 minutes)",
            "bench/edge     # TLS and HTTP/2 (about 2 minutes)",
            "bench/bodies   # answers and uploads of 16 KiB to 1 MiB (about 8 minutes)",
            "bench/uring    # io_uring against epoll: one small relay on each (about 7 minutes)",
            "bench/chaos    # reloads and kills under load (about 5 minutes)", "```", "",
            "They install what they need (Debian's `wrk`, `nginx`, `haproxy`, `nodejs`; `pm2` from the npm "
            "registry into `bench/.tools`) and build herd in release mode. Each start of a setup gets two "
            "unmeasured seconds of every load first (`--warmup`). `bench/run` runs 3 rounds of 5 s per load; "
            "`--rounds 5` measures longer (the last run), `--secs 2` is quicker (about 17 minutes)."]
    (ROOT / "docs/BENCHMARKS.md").write_text("\n".join(doc) + "\n")
    update_readme(readme)
    if charts and not PLOT.exists():
        log(f"charts not redrawn: {PLOT} is not built (any bench/run, bench/edge… builds it)")
    elif charts:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
            spec.write(json.dumps(charts))
            spec.flush()
            run([str(PLOT), spec.name, str(FONT)])
    log("wrote docs/BENCHMARKS.md")
    for h in headline:
        log(" ", h)


PAIRS = [("node", "herd-dispatch", "node-cluster-rr", "Node cluster (round-robin)"),
         ("node", "herd-dispatch", "pm2", "PM2 cluster mode"),
         ("node", "herd-shared", "node-cluster-none", "Node cluster (SCHED_NONE)"),
         ("node", "herd-proxy", "nginx", "nginx"), ("node", "herd-proxy", "haproxy", "HAProxy"),
         ("rust", "herd-proxy", "nginx", "nginx"), ("rust", "herd-proxy", "haproxy", "HAProxy")]


def readme_table(summary, meta):
    """The README's summary: 128 connections, both loads, herd against each peer."""
    def get(app, kind, load):
        for k, v in summary.items():
            if k[0] == app and v["kind"] == kind and k[2] == load and k[3] == 128:
                return v
        return None
    again = (f"; the setups matching `{' '.join(meta['rerun']['only'])}` re-measured on {meta['rerun']['date']}"
             if meta.get("rerun") else "")
    out = [f"From `bench/run` on {meta['date']}{again} ({meta['cpus']} CPUs, {WORKERS} workers, 128 connections; "
           "medians of the interleaved rounds; full tables in [docs/BENCHMARKS.md](docs/BENCHMARKS.md)):", "",
           "| app | load | herd mode | peer | herd req/s | peer req/s | herd ÷ peer | balancer CPU, herd ÷ peer |",
           "|---|---|---|---|---|---|---|---|"]
    for app, hk, pk, pname in PAIRS:
        for load in ("keep-alive", "new connection"):
            h, p = get(app, hk, load), get(app, pk, load)
            if not h or not p:
                continue
            cpu = f"{h['cpu'] / p['cpu']:.2f}" if h["cpu"] is not None and p["cpu"] else "–"
            out.append(f"| {app} | {load} | {hk[5:]} | {pname} | {f(h['rps'])} | {f(p['rps'])} | "
                       f"**{h['rps'] / p['rps']:.2f}** | {cpu} |")
    return out + [""]


def per_100k(r):
    return None if r.get("errors") is None or not r.get("requests") else r["errors"] / r["requests"] * 1e5


def readme_chaos(rows, meta):
    out = [f"From `bench/chaos` on {meta['date']} (Node app, 2 workers, new connection per request, 20 of each):", "",
           "| setup | failed per reload | failed per worker `kill -9` | … per 100k requests | time to serve again s | workers left 2 s after `kill -9` of the master |",
           "|---|---|---|---|---|---|"]
    names = []
    for r in rows:
        if r["setup"] not in names:
            names.append(r["setup"])
    for n in names:
        def row(test):
            return next((r for r in rows if r["setup"] == n and r["test"] == test), {})
        left = row("kill-master").get("surviving")
        kill = row("kill-worker")
        out.append(f"| {n} | {f(row('reload').get('per_event'))} | {f(kill.get('per_event'))} | "
                   f"{f(per_100k(kill) if kill else None)} | {f(kill.get('seconds'))} | {'–' if left is None else left} |")
    return out + [""]


def update_readme(lines):
    """Replaces the block between the bench markers in README.md."""
    path = ROOT / "README.md"
    text = path.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in text or end not in text or not lines:
        return
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + begin + "\n" + "\n".join(lines) + end + tail)


def chaos_lines(rows):
    """Each herd setup against the best peer on each chaos figure."""
    out = []
    for test, what, key in (("reload", "failed requests per reload", "per_event"),
                            ("kill-worker", "failed requests per worker kill", "per_event"),
                            ("kill-worker", "time until a killed worker's slot serves again", "seconds")):
        rs = [r for r in rows if r["test"] == test and r.get(key) is not None]
        peers = [r for r in rs if not r["herd"]]
        if not peers:
            continue
        best = min(peers, key=lambda r: r[key])
        show = (lambda x: f"{x * 1000:.0f} ms") if key == "seconds" else f
        for r in (r for r in rs if r["herd"]):
            verdict = "loses" if show(r[key]) != show(best[key]) and r[key] > best[key] else "is at least as good"
            out.append(f"herd {r['setup'][5:]} {verdict} on {what}: {show(r[key])} against "
                       f"{best['setup']}'s {show(best[key])}.")
    for r in rows:
        if r["test"] == "kill-master" and r["surviving"]:
            out.append(f"{r['setup']}: {r['surviving']} of {r['workers']} workers outlived a `kill -9` of the master.")
    return out


def machine_lines(m):
    v = m["versions"]
    return [f"Run {m['date']} with `{m['command'].strip()}` ({m['seconds']} s): {m['cpus']} CPUs ({m['cpu']}), "
            f"Linux {m['kernel']}; herd {v['herd']}, Node {v['node']}, PM2 {v['pm2']}, nginx {v['nginx']}, "
            f"HAProxy {v['haproxy']}, wrk {v['wrk']}; the scheduler's autogroup "
            f"{m.get('autogroup', 'on')}{AUTOGROUP_NOTE.get(m.get('autogroup', 'on'), '')}. The load generator "
            "shares the CPUs with what it measures, so compare ratios within this run, not across runs."] + (
        [f"The setups matching `{' '.join(m['rerun']['only'])}` were measured again on {m['rerun']['date']} with "
         f"`{m['rerun']['command'].strip()}`, side by side in that run; their rows replace the earlier ones."]
        if "rerun" in m else []) + [""]


AUTOGROUP_NOTE = {
    "off": " (every process competes on its own)",
    "on": " (it could not be turned off: setups of several process trees, such as nginx and its backends, "
          "got more CPU against wrk than one tree, such as herd and its workers)",
}


def headlines(summary):
    """The comparisons a user asks about first, as plain sentences."""
    out = []

    def get(app, kind, load, conns):
        for k, v in summary.items():
            if k[0] == app and v["kind"] == kind and k[2] == load and k[3] == conns:
                return v
        return None

    for app, hk, pk, pname in PAIRS:
        for load, conns in LOADS:
            h, p = get(app, hk, load, conns), get(app, pk, load, conns)
            if not h or not p:
                continue
            r = h["rps"] / p["rps"]
            word = "wins" if r >= 1.0 else "loses"
            cpu = ""
            if h["cpu"] is not None and h["cpu"] < 0.005:
                cpu = "; herd's master used no measurable CPU"
            elif h["cpu"] is not None and p["cpu"] not in (None, 0):
                cpu = f"; its balancer CPU per request is {h['cpu'] / p['cpu']:.2f}× {pname}'s"
            out.append(f"{app} app, {load}, {conns} conns: herd {hk[5:]} {word} against {pname}: "
                       f"{r:.2f}× its requests/s{cpu}.")
    return out


def raise_nofile():
    """Every setup inherits the highest open-file limit allowed (bench/idle)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))


def main():
    raise_nofile()
    ap = argparse.ArgumentParser(prog="bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("run")
    b.add_argument("--rounds", type=int, default=3)
    # Rounds of 1 s left a spread between rounds larger than the margins.
    b.add_argument("--secs", type=int, default=5)
    b.add_argument("--warmup", type=int, default=2, help="unmeasured seconds of each load after each start")
    b.add_argument("--only", nargs="*", help="setup kinds or apps to run (e.g. dispatch node-cluster)")
    c = sub.add_parser("chaos")
    c.add_argument("--times", type=int, default=20)
    i = sub.add_parser("idle")
    # HAProxy gets at most HAPROXY_IDLE of them (see there).
    i.add_argument("--conns", type=int, default=10000)
    i.add_argument("--rounds", type=int, default=3)
    i.add_argument("--secs", type=int, default=3)
    y = sub.add_parser("syscalls")
    y.add_argument("--secs", type=int, default=3)
    n = sub.add_parser("instructions")
    n.add_argument("--requests", type=int, default=2000, help="requests of the first run (the second makes 5 times as many)")
    e = sub.add_parser("edge")
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--secs", type=int, default=3)
    o = sub.add_parser("bodies")
    o.add_argument("--rounds", type=int, default=3)
    o.add_argument("--secs", type=int, default=3)
    u = sub.add_parser("uring")
    u.add_argument("--rounds", type=int, default=3)
    u.add_argument("--secs", type=int, default=5)
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd == "run":
        bench(args)
    elif args.cmd == "chaos":
        chaos(args)
    elif args.cmd == "idle":
        idle(args)
    elif args.cmd == "syscalls":
        syscalls(args)
    elif args.cmd == "instructions":
        instructions(args)
    elif args.cmd == "edge":
        edge(args)
    elif args.cmd == "bodies":
        bodies(args)
    elif args.cmd == "uring":
        uring(args)
    else:
        report()


if __name__ == "__main__":
    main()
