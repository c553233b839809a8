"""A plain-stdlib Python server that speaks herd's whole worker contract:
the inherited socket (fd 3) or $PORT, READY=1 over sd_notify, and a
graceful stop on SIGTERM that loses no keep-alive client: once stopping,
every answer says `Connection: close`, connections still idle after a
grace are closed, and requests in flight finish."""
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

stopping = threading.Event()
# herd's proxy stops sending to a worker before it stops it; clients of
# the fd modes may be sending on an idle connection right now.
IDLE_GRACE = 0 if os.environ.get("HERD_MODE") == "proxy" else 1.0
lock = threading.Lock()
count = {"open": 0, "busy": 0}


def add(key, n):
    with lock:
        count[key] += n


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        add("open", 1)

    def finish(self):
        try:
            super().finish()
        finally:
            add("open", -1)

    def handle_one_request(self):
        self.busy = False
        try:
            super().handle_one_request()
        finally:
            if self.busy:
                add("busy", -1)

    def parse_request(self):
        # A request line arrived: this connection is busy until answered.
        self.busy = True
        add("busy", 1)
        return super().parse_request()

    def end_headers(self):
        if stopping.is_set():
            self.send_header("Connection", "close")  # also ends this handler's loop
        super().end_headers()

    def do_GET(self):
        body = f"hello from python worker {os.environ.get('HERD_WORKER_ID')} (pid {os.getpid()})\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def sd_notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


if os.environ.get("LISTEN_FDS"):
    server = ThreadingHTTPServer(("", 0), Hello, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=3)  # shared / reuseport mode
else:
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Hello)


def stop(*_):
    stopping.set()
    threading.Thread(target=server.shutdown).start()


signal.signal(signal.SIGTERM, stop)
print("listening", flush=True)
sd_notify("READY=1")
server.serve_forever()
server.socket.close()
# Keep-alive clients close after their next answer; give idle ones the
# grace, then let requests in flight finish; exiting closes the rest.
deadline = time.monotonic() + IDLE_GRACE
while count["open"] > 0 and time.monotonic() < deadline:
    time.sleep(0.02)
while count["busy"] > 0:
    time.sleep(0.02)
