"""A gRPC server for herd's HTTP/2 backends (grpcio, no generated code: raw
bytes in and out). herd.Test/Unary answers "worker N"; "fail" ends with
NOT_FOUND, "sleepS" sleeps S seconds first. herd.Test/Stream sends N
messages 50 ms apart and says when its caller went away.

    herd run --backend-protocol h2 -i 2 -- python3 examples/grpc/server.py
    python3 examples/grpc/client.py 127.0.0.1:8000
"""
import os
import time
from concurrent import futures

import grpc

WORKER = os.environ.get("HERD_WORKER_ID", "0")


def unary(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request.startswith(b"sleep"):
        time.sleep(float(request[5:]))
    return f"worker {WORKER}".encode()


def stream(request, context):
    sent, finished = [0], [False]

    # grpcio may stop pulling from this generator once the caller went away,
    # so a check inside the loop alone could miss it: the callback runs when
    # the call ends, however it ends.
    def ended():
        if not finished[0]:
            print(f"stream cancelled after {sent[0]} messages", flush=True)

    context.add_callback(ended)
    for i in range(int(request)):
        if not context.is_active():
            return
        yield f"worker {WORKER} message {i}".encode()
        sent[0] = i + 1
        time.sleep(0.05)
    finished[0] = True


handler = grpc.method_handlers_generic_handler(
    "herd.Test",
    {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    },
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"127.0.0.1:{os.environ.get('PORT', '50051')}")
server.start()
print("serving", flush=True)
server.wait_for_termination()
