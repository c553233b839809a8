"""Calls examples/grpc/server.py through herd on ADDR over one channel (one
HTTP/2 connection) and prints what it saw as JSON: which worker answered
each unary call and each stream, an error's code and details, a deadline,
and a cancelled stream."""
import json
import sys
import time
from collections import Counter

import grpc

channel = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=10)
unary = channel.unary_unary("/herd.Test/Unary")
stream = channel.unary_stream("/herd.Test/Stream")
out = {}

if sys.argv[2:3] == ["long"]:
    # `client.py ADDR long N`: one stream of N messages; says "started" once
    # the first message came (the stream is in flight), then how many came.
    try:
        call = stream(sys.argv[3].encode(), timeout=60)
        next(call)
        print("started", flush=True)
        print(1 + sum(1 for _ in call), flush=True)
    except grpc.RpcError as e:
        print(e.code().name, e.details(), flush=True)
    sys.exit(0)

out["unary"] = Counter(unary(b"hi", timeout=10).decode() for _ in range(20))
streams = [list(stream(b"5", timeout=10)) for _ in range(6)]
out["stream_lengths"] = [len(s) for s in streams]
out["stream_workers"] = Counter(s[0].decode().rsplit(" message", 1)[0] for s in streams)
out["stream_mixed"] = any(len({m.decode().rsplit(" message", 1)[0] for m in s}) > 1 for s in streams)

try:
    unary(b"fail", timeout=10)
except grpc.RpcError as e:
    out["error"] = [e.code().name, e.details()]

start = time.monotonic()
try:
    unary(b"sleep3", timeout=0.5)
except grpc.RpcError as e:
    out["deadline"] = [e.code().name, round(time.monotonic() - start, 2)]

call = stream(b"200", timeout=30)
got = [next(call), next(call)]
call.cancel()
out["cancelled_after"] = len(got)
print(json.dumps(out), flush=True)
