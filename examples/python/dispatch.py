"""A plain-stdlib Python worker for herd's dispatch mode: the master accepts
each connection and passes its fd over the Unix socket at
$HERD_DISPATCH_FD; this takes them with socket.recv_fds and serves each on
a thread.

The protocol (see the README): every connection arrives as one line
{"cmd":"NODE_HANDLE",...} with the fd attached; answer
{"cmd":"NODE_HANDLE_ACK"} once you have it. Say {"herd":"listening"} when
ready. Closing the socket hands anything unanswered back to the master.

    herd run --mode dispatch -- python3 examples/python/dispatch.py
"""
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler

ACK = b'{"cmd":"NODE_HANDLE_ACK"}\n'
stopping = threading.Event()


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # idle keep-alive connections end after this

    def do_GET(self):
        body = f"hello from python worker {os.environ.get('HERD_WORKER_ID')} (pid {os.getpid()})\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if stopping.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve(conn):
    try:
        Hello(conn, conn.getpeername(), None)
    except OSError:
        pass
    finally:
        conn.close()


def main():
    chan = socket.socket(fileno=int(os.environ["HERD_DISPATCH_FD"]))

    def stop(*_):
        # Take no more: the master stopped sending before SIGTERM, and
        # anything unanswered goes back to it when the socket closes.
        stopping.set()
        chan.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    chan.sendall(b'{"herd":"listening"}\n')
    buf, fds = b"", []
    while not stopping.is_set():
        try:
            data, new_fds, _flags, _addr = socket.recv_fds(chan, 4096, 16)
        except OSError:
            break
        if not data and not new_fds:
            break  # the master closed the socket
        fds.extend(new_fds)
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if b"NODE_HANDLE" in line and fds:
                conn = socket.socket(fileno=fds.pop(0))
                chan.sendall(ACK)
                threading.Thread(target=serve, args=(conn,)).start()
    # Non-daemon threads: the process exits once in-flight requests are done.


if __name__ == "__main__":
    main()
