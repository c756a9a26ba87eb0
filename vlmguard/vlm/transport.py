"""HTTP for the model SDKs: one total deadline per request, and a bound on what is read.

Both SDKs (openai, google-genai) take an httpx2 client, and httpx2's timeouts are per
read: a server that sends a byte every half second is never timed out. Here every read
and write of a connection is given what is left of the deadline of the request under
way, and the bytes read are counted against a limit, at the socket, so a dripping or
endless answer ends at the deadline or the limit whatever stage it is in (headers,
body, a chunk of an upload). The request's bounds are set with `bounded(...)` around the
SDK call, in the thread that makes it (the SDKs' sync clients do their I/O there).
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import httpcore2
import httpx2


@dataclass
class Bounds:
    deadline: float  # time.monotonic()
    seconds: float
    bytes_left: int
    max_bytes: int


CURRENT: contextvars.ContextVar[Bounds | None] = contextvars.ContextVar("request_bounds",
                                                                        default=None)


@contextmanager
def bounded(seconds: float, max_bytes: int) -> Iterator[Bounds]:
    """Everything the SDK reads and writes inside the block: at most `seconds` from now,
    at most `max_bytes` read."""
    bounds = Bounds(time.monotonic() + seconds, seconds, max_bytes, max_bytes)
    token = CURRENT.set(bounds)
    try:
        yield bounds
    finally:
        CURRENT.reset(token)


def time_left(timeout: float | None, on_expiry: type[Exception]) -> float | None:
    """The timeout for one socket operation: the smaller of its own and what is left of
    the request's deadline; raises on_expiry once the deadline has passed."""
    bounds = CURRENT.get()
    if bounds is None:
        return timeout
    left = bounds.deadline - time.monotonic()
    if left <= 0:
        raise expired(bounds, on_expiry)
    return left if timeout is None else min(timeout, left)


def expired(bounds: Bounds, kind: type[Exception]) -> Exception:
    return kind(f"no answer within {bounds.seconds:g} s (the request's total deadline)")


@contextmanager
def saying_why(kind: type[Exception]) -> Iterator[None]:
    """A socket timeout that is the request's deadline says so."""
    try:
        yield
    except kind:
        bounds = CURRENT.get()
        if bounds is not None and time.monotonic() >= bounds.deadline:
            raise expired(bounds, kind) from None
        raise


class BoundedStream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream):
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with saying_why(httpcore2.ReadTimeout):
            data = self.inner.read(max_bytes, time_left(timeout, httpcore2.ReadTimeout))
        bounds = CURRENT.get()
        if bounds is not None:
            bounds.bytes_left -= len(data)
            if bounds.bytes_left < 0:
                raise httpcore2.ReadError(f"answer larger than {bounds.max_bytes:,} bytes, "
                                          "not read further")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with saying_why(httpcore2.WriteTimeout):
            self.inner.write(buffer, time_left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> "BoundedStream":
        return BoundedStream(self.inner.start_tls(ssl_context, server_hostname,
                                                  time_left(timeout, httpcore2.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class BoundedBackend(httpcore2.NetworkBackend):
    def __init__(self, inner: httpcore2.NetworkBackend):
        self.inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options=None) -> BoundedStream:
        return BoundedStream(self.inner.connect_tcp(
            host, port, time_left(timeout, httpcore2.ConnectTimeout), local_address,
            socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options=None) -> BoundedStream:
        return BoundedStream(self.inner.connect_unix_socket(
            path, time_left(timeout, httpcore2.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def bounded_client(**kwargs: Any) -> httpx2.Client:
    """An httpx2 client whose connections obey `bounded(...)`."""
    transport = httpx2.HTTPTransport()
    pool = transport._pool
    # httpx2 builds its connection pool without a way to pass a network backend; the
    # pool keeps it in one attribute, read when a connection is made.
    if not isinstance(getattr(pool, "_network_backend", None), httpcore2.NetworkBackend):
        raise RuntimeError("httpcore2's connection pool changed: no _network_backend")
    pool._network_backend = BoundedBackend(pool._network_backend)
    return httpx2.Client(transport=transport, **kwargs)
