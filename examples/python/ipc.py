"""herd's message channel from Python (stdlib only): prints what it receives,
and acts on {"do": "broadcast", "data": …} and {"do": "send", "to": N, "data": …}."""
import json
import os
import signal
import socket

ch = socket.socket(fileno=int(os.environ["HERD_IPC_FD"])).makefile("rwb", buffering=0)


def send(msg):
    ch.write(json.dumps(msg).encode() + b"\n")


# This worker stops on herd's shutdown notice, which comes before SIGTERM.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
notify = os.environ.get("NOTIFY_SOCKET")
if notify:
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", notify)
print("ready", flush=True)
for line in ch:
    msg = json.loads(line)
    print("got", json.dumps(msg), flush=True)
    if msg["type"] == "shutdown":
        break
    cmd = msg.get("data") if isinstance(msg.get("data"), dict) else {}
    if cmd.get("do") == "broadcast":
        send({"type": "broadcast", "data": cmd["data"]})
    elif cmd.get("do") == "send":
        send({"type": "send", "to": cmd["to"], "data": cmd["data"]})
