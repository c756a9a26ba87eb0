"""GET /api/events over real sockets, served as the streaming process serves it (behind the
connection guard), with a real SQLite job table written by this test."""

from __future__ import annotations

import dataclasses
import socket
import time
from datetime import datetime, timedelta, timezone

from vlmguard.store.bundle import Store
from vlmguard.store.records import IncidentRecord, Outcome

from helpers import make_config as base_config
from helpers.http import serving

TOKEN = "ev-token"
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
REQUEST = (f"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
           "Accept: text/event-stream\r\n\r\n").encode()


def make_config(tmp_path, server=""):
    return base_config(tmp_path, token=TOKEN, serve=True, with_store=True,
                       server="idle_timeout_seconds = 1\n" + server)


def store_incident(config, n: int = 0) -> int:
    start = T0 + timedelta(minutes=10 * n)
    with Store.from_config(config) as store:
        store.queue.register("cam1", f"/cam1/{n}.mp4", start, start + timedelta(minutes=10))
        job = store.queue.claim("w")
        store.queue.complete(job, Outcome(result={}, safety_score=50, incidents=[
            IncidentRecord(start, start + timedelta(seconds=4), "fall", "high", "a fall", 0.9)]))
        return store.incidents.list_incidents(job.id)[0]["id"]


def open_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(REQUEST)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        assert time.monotonic() < deadline, data
        chunk = sock.recv(65536)
        assert chunk, f"stream closed before {marker!r}: {data!r}"
        data += chunk
    return data


def read_event(sock: socket.socket, name: str, timeout: float = 10) -> bytes:
    """Read up to the end of the next event called name; returns its text."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    marker = f"event: {name}\n".encode()
    while marker not in data or b"\n\n" not in data.split(marker, 1)[1]:
        assert time.monotonic() < deadline, data
        chunk = sock.recv(65536)
        assert chunk, f"stream closed before {name}: {data!r}"
        data += chunk
    return data.split(marker, 1)[1].split(b"\n\n", 1)[0]


def test_stream_outlives_the_idle_timeout_and_carries_incidents_and_acks(tmp_path):
    config = make_config(tmp_path)
    with serving(config) as port, open_stream(port) as sock:
        head = read_until(sock, b"event: hello")
        assert b"200 OK" in head and b"text/event-stream" in head
        time.sleep(2.5)  # over twice idle_timeout_seconds: the stream is not idle
        incident_id = store_incident(config)
        assert f'"id":{incident_id},'.encode() in read_event(sock, "incident")
        with Store.from_config(config) as store:
            store.incidents.acknowledge(incident_id, "seen")
        assert b'"ack_note":"seen"' in read_event(sock, "acknowledged")


def test_streams_are_capped_and_the_cap_frees_up(tmp_path):
    config = make_config(tmp_path, "max_event_streams = 1")
    with serving(config) as port:
        with open_stream(port) as first:
            read_until(first, b"event: hello")
            with open_stream(port) as second:
                refused = read_until(second, b"\r\n\r\n")
                assert refused.startswith(b"HTTP/1.1 503")
        deadline = time.monotonic() + 5
        while True:  # the first stream's end is noticed at its next write
            with open_stream(port) as third:
                answer = read_until(third, b"\r\n\r\n")
            if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answer.startswith(b"HTTP/1.1 200")


def test_silent_streams_are_not_shed_as_stalled_at_max_connections(tmp_path):
    """At the connection cap a newcomer may close a connection silent past the idle
    timeout; an event stream is silent by design and must stay."""
    config = make_config(tmp_path, "max_connections = 8")
    # More streams than the config accepts (half the connections): the worst case.
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    max_event_streams=8))
    with serving(config) as port:
        streams = [open_stream(port) for _ in range(8)]
        try:
            for sock in streams:
                read_until(sock, b"event: hello")
            time.sleep(1.5)  # all eight are now silent past idle_timeout_seconds
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                extra.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_until(extra, b"\r\n\r\n").startswith(b"HTTP/1.1 503")
            incident_id = store_incident(config)
            for sock in streams:
                assert f'"id":{incident_id},'.encode() in read_event(sock, "incident")
        finally:
            for sock in streams:
                sock.close()
