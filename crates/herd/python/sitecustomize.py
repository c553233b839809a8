# herd's Python preload: a directory holding this file goes first on the
# workers' PYTHONPATH, and Python imports it at start-up (`site` imports
# `sitecustomize`), as herd's Node preload is loaded with NODE_OPTIONS.
#
# It lets an unmodified app whose code names its port (Flask's
# `app.run(port=5000)`, `python -m http.server`, `uvicorn.run(app,
# port=8000)` on asyncio's loop or uvloop's) take part in herd's proxy mode: the first
# bind() of a TCP socket to a port (not 0) is the app's public server, and
# binds 127.0.0.1:$HERD_PORT instead, where herd relays to it. herd hears
# on its message channel (fd $HERD_IPC_FD) which port the app asked for, at
# that bind() and again when the socket listens (which also says the
# worker is ready): with no port given to herd, herd serves the app there,
# as PM2 would run it. A later bind() to the same port (the other address
# family of a dual-stack server) gets a loopback port of no consequence, and
# a Python program the app starts after that binds what it asks for.
# uvloop binds through Python's socket module too (and listens in C, so
# readiness then comes from herd's own probe); a socket C code binds on its
# own is not seen.
#
# Then it imports the sitecustomize this one hides (Debian ships one).
import os
import sys


def _herd_preload():
    env = os.environ
    if env.get('HERD_MODE') != 'proxy' or env.get('HERD_WORKER_ID') is None:
        return
    if env.get('HERD_PORT_TAKEN'):
        return  # a child of the process that serves the worker's port
    try:
        private = int(env.get('HERD_PORT', ''))
    except ValueError:
        return
    import socket
    import stat
    import weakref

    # herd's channel, taken now, before the app opens anything: a Python
    # program started without it (close_fds) may have another file at that
    # number by the time it listens, which a message must not go into.
    try:
        fd = int(env.get('HERD_IPC_FD', ''))
        channel = os.dup(fd) if stat.S_ISSOCK(os.fstat(fd).st_mode) else None
    except (ValueError, OSError):
        channel = None

    orig_bind = socket.socket.bind
    orig_listen = socket.socket.listen
    # The port the app asked for, and (weakly) the socket that now serves it.
    claimed = {'port': None, 'sock': lambda: None, 'host': None, 'said': False}

    def tcp(sock):
        return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM

    def loopback(sock, port):
        if sock.family == socket.AF_INET:
            return ('127.0.0.1', port)
        # herd connects to 127.0.0.1: take it on the IPv6 socket too.
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            pass
        return ('::ffff:127.0.0.1', port)

    def bind(self, address):
        if tcp(self) and isinstance(address, tuple) and len(address) >= 2:
            host, port = address[0], address[1]
            if isinstance(port, int) and port:
                if claimed['port'] is None:
                    result = orig_bind(self, loopback(self, private))
                    # Every address, named by its family: '::' (dual-stack
                    # on Linux) or '0.0.0.0'.
                    if host in ('', '::', '0.0.0.0'):
                        host = '::' if self.family == socket.AF_INET6 else '0.0.0.0'
                    claimed.update(port=port, sock=weakref.ref(self), host=host)
                    # A Python program this one starts binds as it asks.
                    env['HERD_PORT_TAKEN'] = str(os.getpid())
                    # Said now: another process may be the one that listens
                    # (uvicorn's reloader binds, its server process listens).
                    say('port', port, host)
                    return result
                if port == claimed['port']:
                    return orig_bind(self, loopback(self, 0))
        return orig_bind(self, address)

    def listen(self, *args):
        result = orig_listen(self, *args)
        if self is claimed['sock']() and not claimed['said']:
            claimed['said'] = True
            say('listening', claimed['port'], claimed['host'])
        return result

    def say(kind, port, host):
        if channel is None:
            return
        import json
        msg = {'type': kind}
        if port != private:
            msg['port'] = port
            if isinstance(host, str) and host:
                msg['host'] = host
        try:
            os.write(channel, (json.dumps(msg) + '\n').encode())
        except OSError:
            pass  # no channel: herd finds the port by probing it

    socket.socket.bind = bind
    socket.socket.listen = listen


def _next_sitecustomize():
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or '.') != here]
    spec = importlib.machinery.PathFinder.find_spec('sitecustomize', rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


try:
    _herd_preload()
except Exception:  # never stop the app from starting
    pass
_next_sitecustomize()
