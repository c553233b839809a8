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
# In the fd modes (shared, reuseport) that first bind() takes herd's socket
# (fd 3) instead, as the Node preload's listen() does, unless the app took
# fd 3 itself; the other socket of a dual-stack server is as above. There
# this holds for any Python program herd started (`python -m http.server`,
# hypercorn, `flask run`, through pyenv's shims or not), not only scripts.
#
# In the fd modes, where clients reach the worker itself, it makes uvicorn,
# hypercorn, aiohttp, Tornado and the standard library's HTTP servers (Flask's
# and Django's development servers) stop as herd's Node preload makes Node
# stop, and in every mode hypercorn's spawned process stop on SIGTERM (see
# _herd_stop). A worker that is not a Python script gets it
# only for that and the fd modes' bind() (HERD_PYTHON_PRELOAD=stop).
#
# Then it imports the sitecustomize this one hides (Debian ships one).
import os
import sys


def _herd_preload():
    env = os.environ
    mode = env.get('HERD_MODE')
    if env.get('HERD_WORKER_ID') is None:
        return
    fd_mode = mode in ('shared', 'reuseport') and env.get('LISTEN_FDS') == '1'
    if env.get('HERD_PYTHON_PRELOAD') == 'stop':
        # Not a Python script: here for how it stops, and in the fd modes
        # for the process herd started, which became Python by exec (a
        # module, a console script, pyenv's shim), not for a Python helper
        # another program starts.
        if not (fd_mode and env.get('LISTEN_PID') == str(os.getpid())):
            return
    if env.get('HERD_PORT_TAKEN'):
        return  # a child of the process that serves the worker's port
    import socket
    import stat
    import weakref

    # Proxy mode: the worker's private port. The fd modes: herd's socket,
    # a copy of fd 3 taken now (the app may close or reuse fd 3 later).
    private, listener = None, None
    if mode == 'proxy':
        try:
            private = int(env.get('HERD_PORT', ''))
        except ValueError:
            return
    elif fd_mode:
        listener = _herd_listener(socket)
        if listener is None:
            return
    else:
        return

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
    orig_init = socket.socket.__init__

    if listener is not None:
        # An app that takes fd 3 itself (`socket.socket(fileno=3)`,
        # `socket.fromfd(3, ...)`) serves its port there: its own bind()s
        # are then of other servers, and bind what they ask. Looked at until
        # the port is claimed either way, then no more.
        herd_ino = os.fstat(listener.fileno()).st_ino

        def init(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            fileno = kwargs.get('fileno', args[3] if len(args) > 3 else None)
            if fileno is None or claimed['port'] is not None:
                return
            try:
                own = os.fstat(self.fileno()).st_ino == herd_ino
            except OSError:
                own = False
            if own:
                claimed['port'] = 0
                socket.socket.__init__ = orig_init
                listener.close()

        socket.socket.__init__ = init

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
                    if listener is None:
                        result = orig_bind(self, loopback(self, private))
                    else:
                        result = take_listener(self)
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

    def take_listener(sock):
        """The fd modes: `sock` becomes herd's socket (the same fd number, for
        an app that noted it), already bound and listening."""
        os.dup2(listener.fileno(), sock.fileno(), inheritable=False)
        listener.close()
        socket.socket.__init__ = orig_init
        # herd's socket blocks, as a new one does; a timeout the app set
        # before bind() is made true of it.
        if sock.gettimeout() is not None:
            sock.settimeout(sock.gettimeout())
        # A program the app starts does not own herd's socket.
        for k in ('LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES'):
            env.pop(k, None)

    def listen(self, *args):
        result = orig_listen(self, *args)
        if self is claimed['sock']() and not claimed['said']:
            claimed['said'] = True
            say('listening', claimed['port'], claimed['host'])
        return result

    def say(kind, port, host):
        if channel is None or (kind == 'port' and listener is not None):
            return  # (`port` is for proxy mode, where herd binds it)
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


def _herd_listener(socket):
    """A copy of fd 3 when it is a listening TCP socket (herd's), else None
    (a process that did not inherit it)."""
    try:
        fd = os.dup(3)
    except OSError:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket: another file took the number
        os.close(fd)
        return None
    try:
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if tcp and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _herd_stop():
    """How Python servers stop, patched when their modules are imported (a
    server not as expected stays as it is). In every mode hypercorn's
    spawned process stops on SIGTERM as its parent would make it stop (see
    hypercorn_worker). In the fd modes, where clients reach the worker
    itself: on its stop uvicorn, hypercorn's asyncio workers and aiohttp close each
    idle keep-alive connection at once, so a client whose next request is
    already on its way gets a reset (HAProxy and herd's Node preload avoid
    it). Here an idle connection's next answer says `Connection: close`, and
    one still idle after a second is closed then; connections with a request
    in flight keep the server's own handling. Tornado and the standard
    library's servers, which died of SIGTERM there, drain (tornado_stop,
    socketserver_stop)."""
    env = os.environ
    if env.get('HERD_WORKER_ID') is None:
        return
    fd_modes = env.get('HERD_MODE') in ('shared', 'reuseport')
    import importlib.abc

    grace = 1.0

    def uvicorn_protocol(name, begun):
        """uvicorn's protocol class `name`; `begun`: the method after which a
        new request's cycle exists and has not started."""

        def idle(proto):
            cycle = proto.cycle
            return cycle is None or cycle.response_complete

        def patch(module):
            cls = getattr(module, name, None)
            if cls is None or not hasattr(cls, 'shutdown') or not hasattr(cls, begun):
                return
            shutdown, begin = cls.shutdown, getattr(cls, begun)

            def close_if_idle(self):
                transport = self.transport
                # (A connection upgraded meanwhile belongs to its WebSocket.)
                if idle(self) and not transport.is_closing() and transport.get_protocol() is self:
                    shutdown(self)

            def herd_shutdown(self):
                if idle(self) and not getattr(self, '_herd_draining', False):
                    self._herd_draining = True
                    self.loop.call_later(grace, close_if_idle, self)
                    return
                shutdown(self)

            def herd_begin(self, *args, **kwargs):
                result = begin(self, *args, **kwargs)
                if getattr(self, '_herd_draining', False) and not idle(self):
                    # httptools' cycle then says `Connection: close`; h11
                    # says it once its connection state has keep-alive
                    # disabled.
                    self.cycle.keep_alive = False
                    state = getattr(getattr(self, 'conn', None), '_cstate', None)
                    if state is not None and hasattr(state, 'process_keep_alive_disabled'):
                        state.process_keep_alive_disabled()
                return result

            cls.shutdown = herd_shutdown
            setattr(cls, begun, herd_begin)

        return patch

    def hypercorn_worker(module):
        """hypercorn runs its app in processes it spawns (one by default),
        which leave SIGTERM to kill them at once, the app's lifespan
        shutdown unrun: herd signals the worker's whole process group, as
        systemd and PM2 do. A spawned one now stops on it as the parent
        would make it stop."""
        import asyncio
        import signal

        run = getattr(module, '_run', None)
        if run is None:
            return

        def herd_run(main, *args, shutdown_trigger=None, **kwargs):
            if shutdown_trigger is not None:
                parent = shutdown_trigger

                async def shutdown_trigger():
                    term = asyncio.Event()
                    try:
                        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, term.set)
                    except (NotImplementedError, RuntimeError, ValueError):
                        return await parent()  # as hypercorn has it
                    waits = [asyncio.ensure_future(parent()), asyncio.ensure_future(term.wait())]
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()

            return run(main, *args, shutdown_trigger=shutdown_trigger, **kwargs)

        module._run = herd_run

    def hypercorn_idle(module):
        """hypercorn's connection closes once idle past its keep-alive
        time-out, or at once when the worker is terminated: a second later
        then, unless a request comes (which cancels the wait)."""
        import asyncio

        cls = getattr(module, 'TCPServer', None)
        if cls is None or not hasattr(cls, '_idle_timeout') or not hasattr(cls, '_initiate_server_close'):
            return
        own = cls._idle_timeout

        async def herd_idle_timeout(self):
            terminated = getattr(getattr(self, 'context', None), 'terminated', None)
            timeout = getattr(getattr(self, 'config', None), 'keep_alive_timeout', None)
            if terminated is None or timeout is None:
                return await own(self)
            # Not wait_for: Python 3.11's swallows a cancel that comes as
            # the event is set, and a request then waited out the grace.
            waiter = asyncio.ensure_future(terminated.wait())
            try:
                done, _ = await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()
            if done:
                await asyncio.sleep(grace)
            await asyncio.shield(self._initiate_server_close())

        cls._idle_timeout = herd_idle_timeout

    def hypercorn_answer(module):
        """hypercorn's HTTP/1.1 protocol closes a connection after each
        answer once the worker is terminated, without saying so. Now an
        answer begun then says `Connection: close`, and one begun before
        leaves its connection idle (to be closed as above), for its client
        may already be sending the next request."""
        import dataclasses

        cls, response = getattr(module, 'H11Protocol', None), getattr(module, 'Response', None)
        h11 = getattr(module, 'h11', None)
        needed = ('stream_send', '_maybe_recycle')
        if cls is None or response is None or h11 is None or not all(hasattr(cls, n) for n in needed):
            return
        if not dataclasses.is_dataclass(response):
            return
        send, recycle = cls.stream_send, cls._maybe_recycle

        def terminated(self):
            event = getattr(getattr(self, 'context', None), 'terminated', None)
            return event is not None and event.is_set()

        class NotYet:
            def is_set(self):
                return False

        class Running:
            """The worker's context, seen as not yet terminated."""

            terminated = NotYet()

            def __init__(self, context):
                self._context = context

            def __getattr__(self, name):
                return getattr(self._context, name)

        async def herd_stream_send(self, event):
            if isinstance(event, response) and event.status_code >= 200 and terminated(self):
                headers = list(event.headers) + [(b'connection', b'close')]
                event = dataclasses.replace(event, headers=headers)
            return await send(self, event)

        async def herd_maybe_recycle(self):
            conn = self.connection
            done = getattr(conn, 'our_state', None) is h11.DONE and getattr(conn, 'their_state', None) is h11.DONE
            if not (done and terminated(self)):
                return await recycle(self)
            # (hypercorn's own reads the context only to decide this.)
            context = self.context
            self.context = Running(context)
            try:
                return await recycle(self)
            finally:
                self.context = context

        cls.stream_send = herd_stream_send
        cls._maybe_recycle = herd_maybe_recycle

    def aiohttp_closing(message):
        """The request head `message`, read as asking to close."""
        try:
            return message._replace(should_close=True)
        except (AttributeError, TypeError, ValueError):
            return message  # (not a request head: an error's)

    # The connections drained, by id (aiohttp's have __slots__), held until
    # the process ends, which is soon.
    aiohttp_draining = {}

    def aiohttp_drain(conn):
        """Every answer on `conn` not yet begun says `Connection: close`."""
        if id(conn) in aiohttp_draining:
            return
        aiohttp_draining[id(conn)] = conn
        request = getattr(conn, '_current_request', None)
        if request is not None and hasattr(request, '_message'):
            request._message = aiohttp_closing(request._message)
        factory = getattr(conn, '_request_factory', None)
        if factory is not None:
            conn._request_factory = lambda message, *args: factory(aiohttp_closing(message), *args)

    def aiohttp_busy(conn):
        # (Unknown: busy, which keeps aiohttp's own handling.)
        return getattr(conn, '_request_in_progress', True)

    def aiohttp_protocol(module):
        """aiohttp's stop (`web.run_app` on SIGTERM) closes each idle
        keep-alive connection at once. Here an idle one is closed after the
        grace, and a request that comes meanwhile is answered with
        `Connection: close` (see aiohttp_server for the first close)."""
        import asyncio

        cls = getattr(module, 'RequestHandler', None)
        if cls is None or not hasattr(cls, 'shutdown'):
            return
        shutdown = cls.shutdown

        async def herd_shutdown(self, *args, **kwargs):
            aiohttp_drain(self)
            if not aiohttp_busy(self):
                await asyncio.sleep(grace)
            return await shutdown(self, *args, **kwargs)

        cls.shutdown = herd_shutdown

    def aiohttp_server(module):
        """Recent aiohttp closes every connection before its shutdown
        (`Server.pre_shutdown`): now only the busy ones, each after its
        answer, which says `Connection: close` unless it has begun."""
        cls = getattr(module, 'Server', None)
        if cls is None or not hasattr(cls, 'pre_shutdown'):
            return
        pre_shutdown = cls.pre_shutdown

        def herd_pre_shutdown(self):
            conns = getattr(self, '_connections', None)
            if conns is None:
                return pre_shutdown(self)
            for conn in list(conns):
                aiohttp_drain(conn)
                if aiohttp_busy(conn):
                    conn.close()

        cls.pre_shutdown = herd_pre_shutdown

    def herds(sock):
        """Whether `sock` is herd's socket (fd 3, which the fd modes' bind()
        put at the socket's own number)."""
        try:
            mine, herd = os.fstat(sock.fileno()), os.fstat(3)
        except (AttributeError, OSError, ValueError):
            return False
        return (mine.st_dev, mine.st_ino) == (herd.st_dev, herd.st_ino)

    def draining(server):
        """Whether socketserver_stop drains `server`, a SIGTERM having begun
        it (for its handlers' patches)."""
        drain = getattr(server, '__dict__', {}).get('_herd_drain')
        return drain is not None and drain['signalled'].is_set()

    def socketserver_stop(module):
        """socketserver's servers (`http.server`, `wsgiref`, Flask's and
        Django's development servers) die of SIGTERM, the requests in flight
        with them (a threaded server's threads end with the process). One
        with an HTTP handler that serves herd's socket from the main thread,
        threaded or not, when the app left SIGTERM as it is, now stops taking
        connections at SIGTERM as after shutdown(), lets what is in flight
        finish (its answers say `Connection: close`: http_server_drain,
        wsgiref_drain), closes keep-alive connections still idle after the
        grace, and returns from serve_forever() once every connection it took
        is closed. A second SIGTERM kills it as before. Not a forking one
        (its children would lose the grace's thread)."""
        import signal
        import socket
        import threading
        import time
        import weakref

        cls = getattr(module, 'BaseServer', None)
        serve = getattr(cls, 'serve_forever', None)
        verify = getattr(cls, 'verify_request', None)
        if serve is None or verify is None:
            return

        def stoppable(server):
            forking = getattr(module, 'ForkingMixIn', None)
            if forking is not None and isinstance(server, forking):
                return False
            # An HTTP handler: http.server's, or that of `python -m
            # http.server`, whose module runs as __main__ (not imported,
            # so patched here).
            for c in getattr(getattr(server, 'RequestHandlerClass', None), '__mro__', ()):
                if c.__name__ == 'BaseHTTPRequestHandler' and c.__module__ in ('http.server', '__main__'):
                    return c.__dict__.get('_herd_drained') or http_handler_drain(c)
            return False

        def close_idle(drain):
            """After the grace, ends each handler's wait for a next request
            (its read sees the end), so its connection closes; a handler
            with a request in flight ends after its answer."""
            try:  # SIGTERM is for the main thread, which serves
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            except (AttributeError, OSError, ValueError):
                pass
            drain['signalled'].wait()
            until = time.monotonic() + grace
            while True:
                time.sleep(0.05)
                if time.monotonic() < until:
                    continue
                for h in list(drain['handlers']):
                    if not h.__dict__.get('_herd_busy') and not h.__dict__.get('_herd_shut'):
                        h._herd_shut = True
                        try:
                            h.connection.shutdown(socket.SHUT_RD)
                        except (AttributeError, OSError):
                            pass

        def open_left(taken):
            try:
                return any(r.fileno() != -1 for r in list(taken))
            except RuntimeError:  # a handler thread dropped one meanwhile
                return True

        def herd_verify_request(self, request, client_address):
            drain = self.__dict__.get('_herd_drain')
            if drain is not None:
                drain['taken'].add(request)
            return verify(self, request, client_address)

        def herd_serve_forever(self, *args, **kwargs):
            drain = None
            if (
                threading.current_thread() is threading.main_thread()
                and hasattr(self, '_BaseServer__shutdown_request')
                and herds(getattr(self, 'socket', None))
                and stoppable(self)
            ):
                try:
                    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                        # Connections taken (sockets, until closed) and
                        # their handlers (http_server_drain registers them).
                        drain = {'taken': weakref.WeakSet(), 'handlers': set(), 'signalled': threading.Event()}

                        def stop(signum, frame):
                            signal.signal(signal.SIGTERM, signal.SIG_DFL)
                            drain['signalled'].set()
                            self._BaseServer__shutdown_request = True

                        # Started now: a thread started from the signal
                        # handler could wait for a lock the main thread holds.
                        threading.Thread(target=close_idle, args=(drain,), name='herd-drain', daemon=True).start()
                        self._herd_drain = drain
                        signal.signal(signal.SIGTERM, stop)
                        # select() wakes every process on a shared socket
                        # and one takes the connection: the others would
                        # wait in accept() for the next one (after SIGTERM
                        # too, as it resumes a call a signal interrupts).
                        # Non-blocking, their accept() fails and
                        # serve_forever() goes on (as Node makes the socket).
                        os.set_blocking(self.socket.fileno(), False)
                except (ValueError, OSError, RuntimeError):
                    pass
            served = serve(self, *args, **kwargs)
            if drain is not None and drain['signalled'].is_set():
                while open_left(drain['taken']):
                    time.sleep(0.05)
            return served

        cls.serve_forever = herd_serve_forever
        cls.verify_request = herd_verify_request

    def http_server_drain(module):
        http_handler_drain(getattr(module, 'BaseHTTPRequestHandler', None))

    def http_handler_drain(cls):
        """Tells socketserver_stop which of a drained server's connections
        wait for a next request (idle) and which have one in flight, and
        makes the answers it sends while it drains say `Connection: close`
        (so a keep-alive client sends no more on it). True once patched."""
        names = ('setup', 'finish', 'parse_request', 'end_headers')
        setup, finish, parse, end = (getattr(cls, n, None) for n in names)
        if None in (setup, finish, parse, end):
            return False

        def drain_of(handler):
            return getattr(getattr(handler, 'server', None), '__dict__', {}).get('_herd_drain')

        def herd_setup(self):
            setup(self)
            drain = drain_of(self)
            if drain is None:
                return
            self._herd_busy = False
            # On the instance, so a subclass's own handle_one_request
            # (Django's) is wrapped too; a request is in flight from its
            # parse to the method's return.
            one = self.handle_one_request

            def handle_one_request():
                try:
                    return one()
                finally:
                    self._herd_busy = False

            self.handle_one_request = handle_one_request
            drain['handlers'].add(self)

        def herd_finish(self):
            try:
                finish(self)
            finally:
                drain = drain_of(self)
                if drain is not None:
                    drain['handlers'].discard(self)
                    self.__dict__.pop('handle_one_request', None)

        def herd_parse_request(self):
            if '_herd_busy' in self.__dict__:
                self._herd_busy = True
            return parse(self)

        def herd_end_headers(self):
            buf = getattr(self, '_headers_buffer', None)
            if buf and isinstance(buf[0], bytes) and draining(getattr(self, 'server', None)):
                status = buf[0].split(b' ', 2)
                if status[0].startswith(b'HTTP/') and len(status) > 1 and not status[1].startswith(b'1'):
                    buf[1:] = [h for h in buf[1:] if h[:11].lower() != b'connection:']
                    buf.append(b'Connection: close\r\n')
                    self.close_connection = True
            return end(self)

        cls.setup = herd_setup
        cls.finish = herd_finish
        cls.parse_request = herd_parse_request
        cls.end_headers = herd_end_headers
        cls._herd_drained = True
        return True

    def wsgiref_drain(module):
        """wsgiref's handler writes its answer's head itself: while its
        server drains, that head says `Connection: close`, which Django's
        development server (HTTP/1.1) also takes as its cue to close."""
        cls = getattr(module, 'BaseHandler', None)
        cleanup = getattr(cls, 'cleanup_headers', None)
        if cleanup is None:
            return

        def herd_cleanup_headers(self):
            cleanup(self)
            if draining(getattr(getattr(self, 'request_handler', None), 'server', None)):
                self.headers['Connection'] = 'close'

        cls.cleanup_headers = herd_cleanup_headers

    def waitress_stop(module):
        """waitress sets no SIGTERM handler: the process died of it with its
        requests in flight, and its keep-alive clients were reset. When the
        app left SIGTERM as it is and one server serves herd's socket from the
        main thread (`waitress-serve --port=N`, `waitress.serve(app)`), a
        SIGTERM now stops it taking connections, answers in flight and
        requests that come within the grace get `Connection: close`
        (waitress_task), connections still idle after it close as at
        waitress' own idle time-out, and run() returns as at Ctrl-C once none
        is left. A second SIGTERM kills it as before."""
        import signal
        import threading
        import time

        cls = getattr(module, 'BaseWSGIServer', None)
        run = getattr(cls, 'run', None)
        readable = getattr(cls, 'readable', None)
        if run is None or readable is None:
            return

        def herd_readable(self):
            # Asked on every turn of the server's loop.
            until = self.__dict__.get('_herd_until')
            if until is None:
                return readable(self)
            channels = list(self.active_channels.values())
            if not channels:
                raise SystemExit(0)  # run() ends as at Ctrl-C
            if time.monotonic() >= until:
                for c in channels:
                    if not c.requests and not c.total_outbufs_len:
                        c.will_close = True
            return False  # no more accepting

        def herd_run(self):
            try:
                if (
                    threading.current_thread() is threading.main_thread()
                    and herds(getattr(self, 'socket', None))
                    and isinstance(getattr(self, 'active_channels', None), dict)
                    and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                ):

                    def stop(signum, frame):
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        self._herd_until = time.monotonic() + grace
                        try:
                            self.pull_trigger()  # a write to a pipe: ends the wait
                        except Exception:
                            pass

                    signal.signal(signal.SIGTERM, stop)
            except (ValueError, OSError):
                pass
            return run(self)

        cls.readable = herd_readable
        cls.run = herd_run

    def waitress_task(module):
        """While waitress_stop drains its server, each answer says
        `Connection: close`: the request is taken as having asked for it,
        so waitress' own rules write the header and close after the answer
        (HTTP/1.0 and 1.1 alike)."""
        cls = getattr(module, 'Task', None)
        build = getattr(cls, 'build_response_header', None)
        if build is None:
            return

        def herd_build_response_header(self):
            server = getattr(getattr(self, 'channel', None), 'server', None)
            if getattr(server, '__dict__', {}).get('_herd_until') is not None:
                headers = getattr(getattr(self, 'request', None), 'headers', None)
                if isinstance(headers, dict):
                    headers['CONNECTION'] = 'close'
            return build(self)

        cls.build_response_header = herd_build_response_header

    def tornado_stop(module):
        """Tornado sets no SIGTERM handler: the process died of it with its
        requests in flight, and its keep-alive clients were reset. When the
        app left SIGTERM as it is, a Tornado server (any `TCPServer`, as
        `app.listen()` makes) now stops taking connections on it, answers
        what is in flight with `Connection: close`, says the same to a
        request that comes on an idle connection within the grace, closes
        the connections still idle after it, and the process exits with 0
        (`SystemExit` out of the event loop) once none is left. A second
        SIGTERM kills it as before; a Tornado not as expected exits at once,
        as the SIGTERM would have ended it."""
        import signal
        import threading
        import time

        cls = getattr(module, 'TCPServer', None)
        add_sockets = getattr(cls, 'add_sockets', None)
        if add_sockets is None:
            return
        servers = []

        def conns():
            # HTTPServer's connections; each stream knows its request's
            # connection (herd_http1 below).
            return [c for s in servers for c in list(getattr(s, '_connections', ()))]

        def idle(conn):
            c = getattr(getattr(conn, 'stream', None), '_herd_http1', None)
            return (
                c is None
                or getattr(c, '_request_start_line', None) is None
                or c._finish_future.done()
            )

        def drain(loop):
            loop.remove_signal_handler(signal.SIGTERM)
            try:
                for s in servers:
                    s.stop()
                    params = getattr(s, 'conn_params', None)
                    if params is not None:
                        params.no_keep_alive = True
                for conn in conns():
                    c = getattr(conn.stream, '_herd_http1', None)
                    if not idle(conn) and getattr(c, '_response_start_line', None) is None:
                        c._disconnect_on_finish = True
            except Exception:
                raise SystemExit(0) from None
            until = time.monotonic() + grace

            def look():
                try:
                    left = conns()
                    if left and time.monotonic() >= until:
                        for conn in left:
                            if idle(conn):
                                conn.stream.close()
                except Exception:
                    left = None
                if not left:
                    raise SystemExit(0)
                loop.call_later(0.05, look)

            look()

        def herd_add_sockets(self, sockets):
            add_sockets(self, sockets)
            servers.append(self)
            if len(servers) > 1 or threading.current_thread() is not threading.main_thread():
                return
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    from tornado.ioloop import IOLoop

                    loop = IOLoop.current().asyncio_loop
                    loop.add_signal_handler(signal.SIGTERM, drain, loop)
            except Exception:  # not as expected: Tornado's own behaviour
                pass

        cls.add_sockets = herd_add_sockets

    def tornado_http1(module):
        """Each server-side HTTP/1 connection, on its stream, for
        tornado_stop to tell the idle ones from the busy."""
        cls = getattr(module, 'HTTP1Connection', None)
        init = getattr(cls, '__init__', None)
        if init is None:
            return

        def herd_init(self, stream, is_client, *args, **kwargs):
            init(self, stream, is_client, *args, **kwargs)
            if not is_client:
                try:
                    stream._herd_http1 = self
                except AttributeError:
                    pass

        cls.__init__ = herd_init

    patches = {'hypercorn.asyncio.run': hypercorn_worker}
    if fd_modes:
        patches.update(
            {
                'uvicorn.protocols.http.h11_impl': uvicorn_protocol('H11Protocol', 'handle_events'),
                'uvicorn.protocols.http.httptools_impl': uvicorn_protocol(
                    'HttpToolsProtocol', 'on_headers_complete'
                ),
                'hypercorn.asyncio.tcp_server': hypercorn_idle,
                'hypercorn.protocol.h11': hypercorn_answer,
                'aiohttp.web_protocol': aiohttp_protocol,
                'aiohttp.web_server': aiohttp_server,
                'socketserver': socketserver_stop,
                'http.server': http_server_drain,
                'wsgiref.handlers': wsgiref_drain,
                'tornado.tcpserver': tornado_stop,
                'waitress.server': waitress_stop,
                'waitress.task': waitress_task,
                'tornado.http1connection': tornado_http1,
            }
        )

    class Loader(importlib.abc.Loader):
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):  # get_source, is_package, ...
            return getattr(self.inner, name)

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            try:
                patches[module.__name__](module)
            except Exception:  # the server changed: keep its own behaviour
                pass

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in patches:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, 'find_spec'):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                        spec.loader = Loader(spec.loader)
                    return spec
            return None

    sys.meta_path.insert(0, Finder())


def _next_sitecustomize():
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or '.') != here]
    spec = importlib.machinery.PathFinder.find_spec('sitecustomize', rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


for _herd_part in (_herd_preload, _herd_stop):
    try:
        _herd_part()
    except Exception:  # never stop the app from starting
        pass
_next_sitecustomize()
