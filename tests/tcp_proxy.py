"""A TCP proxy a test owns, in front of a server it must never stop (the machine's
PostgreSQL): it forwards, or plays the server being away.

- up(): forward every connection.
- cut(): drop every connection now and reset each new one (a server that crashed, a
  network that went away and came back refusing).
- refuse(): close the listening socket (connection refused), keeping the port.

Threads, no asyncio, so it runs beside anything. Bounded: at most MAX_CONNECTIONS at once.
"""

from __future__ import annotations

import socket
import struct
import threading

MAX_CONNECTIONS = 256
CHUNK = 65536


class TcpProxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0):
        self.target = target
        self.host = host
        self.port = port
        self.state = "up"
        self.lock = threading.Lock()
        self.pairs: set[tuple[socket.socket, socket.socket]] = set()
        self.listener: socket.socket | None = None
        self.accepted = 0
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.listen()

    # -- the switch -------------------------------------------------------------------------

    def up(self) -> None:
        with self.lock:
            self.state = "up"
        if self.listener is None:
            self.listen()

    def cut(self) -> None:
        with self.lock:
            self.state = "cut"
            pairs = list(self.pairs)
        for pair in pairs:
            for sock in pair:
                reset(sock)

    def refuse(self) -> None:
        self.cut()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        if self.thread is not None:
            self.thread.join(5)

    def close(self) -> None:
        self.stopped.set()
        self.refuse()

    @property
    def url_host(self) -> str:
        return f"{self.host}:{self.port}"

    # -- the plumbing -----------------------------------------------------------------------

    def listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        self.listener = listener
        self.thread = threading.Thread(target=self.accept_loop, args=(listener,), daemon=True,
                                       name="proxy-accept")
        self.thread.start()

    def accept_loop(self, listener: socket.socket) -> None:
        while not self.stopped.is_set() and self.listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            with self.lock:
                refuse = self.state != "up" or len(self.pairs) >= MAX_CONNECTIONS
            if refuse:
                reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                reset(client)
                continue
            pair = (client, server)
            with self.lock:
                self.pairs.add(pair)
            for a, b in (pair, pair[::-1]):
                threading.Thread(target=self.pump, args=(a, b, pair), daemon=True,
                                 name="proxy-pump").start()

    def pump(self, source: socket.socket, sink: socket.socket, pair) -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.pairs.discard(pair)
            for sock in pair:
                reset(sock)


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a dropped route looks."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
