"""The app of the README's "Several hosts" example (stdlib only): answers
`HOST WORKER PID` on $PORT, prints every message its worker receives, and
`GET /broadcast/TEXT` broadcasts TEXT to every worker of every host."""
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = os.environ.get("HERD_HOST") or socket.gethostname()
WORKER = os.environ.get("HERD_WORKER_ID", "0")
channel = socket.socket(fileno=int(os.environ["HERD_IPC_FD"])).makefile("rwb", buffering=0)
lock = threading.Lock()


def send(msg):
    with lock:
        channel.write(json.dumps(msg).encode() + b"\n")


def listen():
    for line in channel:
        print("got", line.decode().strip(), flush=True)


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        if self.path.startswith("/broadcast/"):
            send({"type": "broadcast", "data": self.path[len("/broadcast/"):]})
        body = f"{HOST} {WORKER} {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


threading.Thread(target=listen, daemon=True).start()
# Proxy mode: herd gives the worker a private loopback port.
ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), App).serve_forever()
