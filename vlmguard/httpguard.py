"""The HLS/REST server's front door: clients can never use up what recording needs.

An idle TCP connection costs the streaming process a file descriptor and nothing else, so
about a thousand of them (no request ever sent, so no token helps) once exhausted the
default limit of 1,024 open files, and the camera feeds died with EMFILE while handing
archives over. Here the process raises its soft open-file limit to the hard one, holds at
most a cap of connections sized well inside that limit, and closes connections that do
not send a request head in time (slowloris) or sit idle. Over the cap, a new connection
takes the place of the oldest one that has not sent a request yet, or of one that has sent
nothing for longer than the idle timeout (it stopped reading its answer); when every
connection is busy with a request, it is answered 503 and closed at once, unparsed.
Shed connections and malformed requests are summed up in one log line at most every
SUMMARY_SECONDS, never a line (or a traceback) per client.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import weakref
from typing import Any, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vlmguard.config import Config, ServerConfig
from vlmguard.logs import get_logger
from vlmguard.web.keys import GUARD_KEY

log = get_logger("vlmguard.http")

OPEN_FILES_CEILING = 65536
# Descriptors kept for everything but clients: FFmpeg's pipes, the archive hand-over, the
# run-state files, SQLite for the API's worker threads, the logs.
FDS_RESERVED = 128
FDS_PER_CAMERA = 8
# A client reading a segment slowly holds its socket and the segment file.
FDS_PER_CONNECTION = 2
SUMMARY_SECONDS = 10.0
LINGER_SECONDS = 1.0
MAX_LINGERING = 32
MAX_BACKLOG = 1024
HEAD_END = b"\r\n\r\n"
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 12\r\nConnection: close\r\n\r\nserver busy\n")


def raise_open_file_limit(ceiling: int = OPEN_FILES_CEILING) -> int:
    """Lift the soft RLIMIT_NOFILE toward the hard one (never lower it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit", soft=soft, hard=hard, error=str(exc))
    return OPEN_FILES_CEILING if soft == resource.RLIM_INFINITY else soft


def accept_backlog(open_files: int) -> int:
    """The listen queue: long, so a flood's connections wait in the kernel rather than a
    player's SYN being dropped (a 1-s retry), but asyncio accepts up to this many sockets a
    loop turn, so it has to fit the open-file limit too."""
    return max(16, min(MAX_BACKLOG, open_files // 8))


def fds_in_flight(open_files: int) -> int:
    """Sockets accepted but not yet shed: one batch being accepted, one waiting for the
    protocol factory (a loop turn later), one shed and closing (a turn after that)."""
    return 3 * accept_backlog(open_files) + MAX_LINGERING


def connection_cap(server: ServerConfig, open_files: int, cameras: int) -> int:
    """max_connections, lowered to what the open-file limit carries beside the cameras."""
    spare = open_files - FDS_RESERVED - fds_in_flight(open_files) - FDS_PER_CAMERA * cameras
    room = spare // FDS_PER_CONNECTION
    return max(1, min(server.max_connections, room))


class ConnectionGuard:
    """Counts the server's connections, sheds the excess, and reports what it shed."""

    def __init__(self, cap: int, header_timeout: float, idle_timeout: float):
        self.cap = cap
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        # A protocol whose transport never got made is dropped by the loop: weak refs let
        # it leave the count on its own.
        self.live: weakref.WeakSet[GuardedConnection] = weakref.WeakSet()
        self.waiting: dict[GuardedConnection, None] = {}  # no request head yet, oldest first
        self.heard: dict[GuardedConnection, float] = {}  # last byte received, oldest first
        self.lingering: set[Refusal] = set()
        self.shed = {"refused": 0, "evicted": 0, "stalled": 0, "header_timeout": 0,
                     "malformed": 0}
        self.summary: asyncio.TimerHandle | None = None

    @property
    def open(self) -> int:
        return len(self.live)

    def factory(self, make_handler: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if len(self.live) >= self.cap and not self.make_room():
                self.count("refused")
                return Refusal(self)
            connection = GuardedConnection(self, make_handler())
            self.live.add(connection)
            # Waiting from now: a batch of accepts all happens before any connection_made.
            connection.await_head()
            return connection
        return make

    def make_room(self) -> bool:
        """Close the oldest connection without a request yet, else the one silent longest
        if it has been silent past the idle timeout: a client that stopped reading its
        answer (keep-alive would have closed a merely idle one by then)."""
        if self.waiting:
            self.count("evicted")
            next(iter(self.waiting)).close()
            return True
        if self.heard:
            quietest, since = next(iter(self.heard.items()))
            if asyncio.get_running_loop().time() - since > self.idle_timeout:
                self.count("stalled")
                quietest.close()
                return True
        return False

    def hold_open(self, transport: asyncio.BaseTransport) -> None:
        """A long answer (the console's event stream) hears nothing from its client by
        design: never shed it as stalled. Its own route caps how many there are."""
        for connection in self.live:
            if connection.transport is transport:
                connection.streaming = True
                self.heard.pop(connection, None)

    def let_go(self, transport: asyncio.BaseTransport) -> None:
        for connection in self.live:
            if connection.transport is transport:
                connection.streaming = False
                connection.note_activity()

    def count(self, what: str) -> None:
        self.shed[what] += 1
        if self.summary is None:
            self.summary = asyncio.get_running_loop().call_later(SUMMARY_SECONDS, self.report)

    def report(self) -> None:
        self.summary = None
        shed, self.shed = self.shed, dict.fromkeys(self.shed, 0)
        level = logging.WARNING if shed["refused"] or shed["evicted"] or shed["stalled"] \
            else logging.INFO
        log.log(level, "http clients shed", window_s=SUMMARY_SECONDS, open=self.open,
                max_connections=self.cap, **shed)

    def close(self) -> None:
        if self.summary is not None:
            self.summary.cancel()
            self.report()


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a request-head deadline.

    A head (up to the blank line) must arrive within header_timeout of the connection
    opening, or of its first byte when it follows an earlier request. Waiting between
    requests is aiohttp's keep-alive timeout (idle_timeout_seconds).
    """

    def __init__(self, guard: ConnectionGuard, handler: Any):
        self.guard = guard
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.tail = b""
        self.shed = False
        self.started = False  # aiohttp's handler has the connection
        self.streaming = False  # answering with a stream: exempt from idle eviction

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.shed:  # evicted between accept and now: aiohttp never sees it
            self.transport.close()
            return
        self.started = True
        self.note_activity()
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.started:
            return
        self.note_activity()
        seen = self.tail + data
        end = seen.rfind(HEAD_END)
        if end < 0:
            if self.deadline is None:
                self.await_head()  # the first byte of a new request
        elif end + len(HEAD_END) < len(seen):
            self.await_head()  # pipelined: another request has begun
        else:
            self.head_arrived()
        self.tail = seen[-(len(HEAD_END) - 1):]
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.started else None

    def pause_writing(self) -> None:
        if self.started:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.started:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_arrived()
        self.guard.live.discard(self)
        self.guard.heard.pop(self, None)
        if self.started:
            self.handler.connection_lost(exc)

    def note_activity(self) -> None:
        self.guard.heard.pop(self, None)
        if self.streaming:
            return
        self.guard.heard[self] = asyncio.get_running_loop().time()

    def await_head(self) -> None:
        self.head_arrived()
        loop = asyncio.get_running_loop()
        self.deadline = loop.call_later(self.guard.header_timeout, self.head_timed_out)
        self.guard.waiting[self] = None

    def head_arrived(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.guard.waiting.pop(self, None)

    def head_timed_out(self) -> None:
        self.deadline = None
        self.guard.count("header_timeout")
        self.close()

    def close(self) -> None:
        """Shed this connection; its descriptor is freed within a loop turn or two."""
        self.shed = True
        self.head_arrived()
        self.guard.live.discard(self)
        self.guard.heard.pop(self, None)
        if self.transport is None:
            return  # connection_made closes it
        if not self.started:
            self.transport.close()
            return
        # An answer may be inside loop.sendfile, which a transport closed under it leaves
        # waiting forever with the file open (CPython 3.11): shut the socket down instead,
        # so the send fails or the read ends, and aiohttp closes the transport itself.
        try:
            self.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            self.transport.close()


class Refusal(asyncio.Protocol):
    """Over the cap with every connection busy: 503 and close, nothing parsed.

    Closing a socket with the client's request unread would reset it and lose the 503, so
    a refused connection lingers until its request has been read (at most LINGER_SECONDS),
    unless too many already linger: then it is cut at once.
    """

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(BUSY)
        if len(self.guard.lingering) >= MAX_LINGERING:
            self.transport.abort()
            return
        self.guard.lingering.add(self)
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        self.transport.close()  # read, so the close is a clean FIN after the 503

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.guard.lingering.discard(self)


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, with a malformed request counted and logged as one short
    debug line (its class and status, none of the client's bytes), never a traceback."""

    def __init__(self, guard: ConnectionGuard):
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.guard = guard

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, tuple):
            exc = exc[1]
        if isinstance(exc, HttpProcessingError):
            self.guard.count("malformed")
            self.logger.debug("malformed request: %s (%s)", type(exc).__name__, exc.code)
            return
        super().log(level, msg, *args, **kwargs)


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a ConnectionGuard."""

    def __init__(self, runner: web.BaseRunner, guard: ConnectionGuard, host: str, port: int,
                 backlog: int):
        super().__init__(runner, backlog=backlog)
        self.guard = guard
        self.host = host
        self.port = port

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.factory(self._runner.server), self.host, self.port,
            reuse_address=True, backlog=self._backlog)

    async def stop(self) -> None:
        self.guard.close()
        await super().stop()


async def start_server(app: web.Application, config: Config) -> web.AppRunner:
    """Serve app on [server] host:port behind the guard; returns the runner to clean up."""
    server = config.server
    open_files = raise_open_file_limit()
    cap = connection_cap(server, open_files, len(config.cameras))
    if cap < server.max_connections:
        log.warning("max_connections lowered to fit the open-file limit",
                    max_connections=server.max_connections, open_files=open_files, cap=cap)
    guard = ConnectionGuard(cap, server.header_timeout_seconds, server.idle_timeout_seconds)
    holder = app.get(GUARD_KEY)
    if holder is not None:
        holder.append(guard)  # routes that stream mark their connections through it
    runner = web.AppRunner(app, access_log=None, logger=ServerLog(guard),
                           keepalive_timeout=server.idle_timeout_seconds)
    await runner.setup()
    await GuardedSite(runner, guard, server.host, server.port, accept_backlog(open_files)).start()
    log.info("http limits", max_connections=cap, open_files=open_files,
             backlog=accept_backlog(open_files),
             header_timeout_s=server.header_timeout_seconds,
             idle_timeout_s=server.idle_timeout_seconds)
    return runner
