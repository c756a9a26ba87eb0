"""Hostile clients against the HTTP side of the streaming process (issue 12).

Floods of idle connections, slowloris, malformed requests, numbers and times out of range,
token links, cache headers, and a hypothesis corpus over paths, query parameters and
headers. The server runs as the streaming process runs it (vlmguard.httpguard.start_server)
on a real port; the flood runs against a real streaming process with a real FFmpeg camera.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from datetime import datetime, timedelta, timezone
from urllib.parse import quote
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vlmguard.httpguard import connection_cap
from vlmguard.layout import Layout
from vlmguard.store.bundle import Store
from vlmguard.store.records import Outcome

from helpers import free_port, write_config
from helpers import make_config as base_config
from helpers.http import serving
from helpers.media import decoded_frames

TOKEN = "s3cr&t"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
PLAYLIST = "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:100\n" \
           "#EXTINF:2.000000,\nseg-100.ts\n#EXTINF:2.000000,\nseg-101.ts\n"


def make_config(tmp_path, token=TOKEN, server=""):
    return base_config(tmp_path, token=token, server=server, serve=True)


def fill(config):
    """A live camera on disk and a job table with one finished job."""
    live = Layout(config.data_dir).live("cam1")
    live.mkdir(parents=True, exist_ok=True)
    (live / "index.m3u8").write_text(PLAYLIST)
    for n in (100, 101):
        (live / f"seg-{n}.ts").write_bytes(bytes(range(256)) * 40)
    with Store.from_config(config) as store:
        start = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
        store.queue.register("cam1", "/cam1/a.mp4", start, start + timedelta(minutes=10))
        store.queue.complete(store.queue.claim("w"), Outcome(result={}, safety_score=90, prompt_tokens=1,
                                                             output_tokens=1, total_tokens=2, incidents=[]))


def exchange(port, request: bytes, timeout: float = 20) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the server closes; returns (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ")[1]), headers, body


def get(port, target: str, headers: str = AUTH) -> tuple[int, dict, bytes]:
    return exchange(port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
                          f"Connection: close\r\n\r\n".encode("latin-1"))


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True once the server has closed sock (EOF, after any 503 it wrote), within wait s."""
    sock.settimeout(wait)
    try:
        while sock.recv(4096):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except OSError:
        return True  # reset


class ErrorRecords(logging.Handler):
    """Every log record at ERROR or above, or carrying a traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@contextmanager
def error_records():
    handler = ErrorRecords()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# --- connection limits, in process ------------------------------------------------------

def test_idle_connections_over_the_cap_make_room_for_requests(tmp_path):
    config = make_config(tmp_path, server="max_connections = 8\nheader_timeout_seconds = 60")
    fill(config)
    with serving(config) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        try:
            # A real request still gets in: it takes the place of the oldest idle connection.
            assert get(port, "/live/cam1/index.m3u8")[0] == 200
            still_open = [s for s in idle if not closed_by_server(s, 0.5)]
            assert len(still_open) <= 8
            assert still_open == idle[-len(still_open):]  # the newest ones are the ones kept
        finally:
            for s in idle:
                s.close()


def test_busy_server_answers_503_at_once_over_the_cap(tmp_path):
    config = make_config(tmp_path, server="max_connections = 8")
    fill(config)
    with serving(config) as port:
        busy = []
        for _ in range(8):  # keep-alive connections that have sent a request: not shed
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET /live/cam1/index.m3u8 HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            busy.append(sock)
        try:
            status, headers, body = get(port, "/live/cam1/index.m3u8")
            assert status == 503 and headers["Retry-After"] == "1" and body == b"server busy\n"
        finally:
            for s in busy:
                s.close()
        for _ in range(50):  # room again once the server has seen those closes
            if get(port, "/live/cam1/index.m3u8")[0] == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no room after the busy connections closed")


@pytest.mark.e2e
def test_clients_that_stop_reading_make_room_after_the_idle_timeout(tmp_path):
    config = make_config(tmp_path, server="max_connections = 8\nidle_timeout_seconds = 1")
    fill(config)
    big = Layout(config.data_dir).live("cam1") / "seg-102.ts"
    with open(big, "wb") as out:
        out.truncate(64 << 20)  # far more than the socket buffers hold
    with error_records() as errors, serving(config) as port:
        stuck = []
        for _ in range(8):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(f"GET /live/cam1/seg-102.ts HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode())
            stuck.append(sock)  # and never read
        try:
            time.sleep(0.5)
            assert get(port, "/live/cam1/index.m3u8")[0] == 503  # all 8 busy, none stalled yet
            time.sleep(1.5)
            assert get(port, "/live/cam1/index.m3u8")[0] == 200  # a stalled one made room
        finally:
            for s in stuck:
                s.close()
    assert errors == [], [r.getMessage() for r in errors]  # and its send ended cleanly


def test_slowloris_and_idle_connections_are_closed(tmp_path):
    config = make_config(tmp_path, server="header_timeout_seconds = 1\nidle_timeout_seconds = 2")
    fill(config)
    with serving(config) as port:
        silent = socket.create_connection(("127.0.0.1", port))
        dribbler = socket.create_connection(("127.0.0.1", port))
        dribbler.sendall(b"GET /live/cam1/index.m3u8 HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for n in range(40):  # one header line every 0.25 s, never the blank line
            try:
                dribbler.sendall(f"X-Slow-{n}: y\r\n".encode())
            except OSError:
                closed = True
                break
            if closed_by_server(dribbler, 0.25):
                closed = True
                break
        assert closed, "a request head dribbled over 10 s was never cut off"
        assert closed_by_server(silent, 5)
        keepalive = socket.create_connection(("127.0.0.1", port), timeout=10)
        keepalive.sendall(f"GET /live/cam1/index.m3u8 HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode())
        assert keepalive.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_by_server(keepalive, 10)  # idle after its answer
        for s in (silent, dribbler, keepalive):
            s.close()


def test_connection_cap_fits_the_open_file_limit(tmp_path):
    server = make_config(tmp_path, server="max_connections = 100000").server
    assert connection_cap(server, 1024, cameras=4) < 1024 // 4
    assert connection_cap(server, 8192, cameras=4) > 1024
    default = make_config(tmp_path).server
    assert connection_cap(default, 8192, cameras=1) == 256  # the unit's LimitNOFILE
    assert connection_cap(default, 1024, cameras=1) < 256


def test_unit_open_file_limit_carries_the_default_cap(tmp_path):
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "vlmguard.service").read_text()
    limit = int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1))
    default = make_config(tmp_path).server
    assert connection_cap(default, limit, cameras=16) == default.max_connections


@pytest.mark.e2e
def test_streaming_process_raises_its_soft_open_file_limit():
    code = ("import resource; from vlmguard.httpguard import raise_open_file_limit; "
            "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096)))
    assert out.stdout.split() == ["4096", "4096"]


# --- malformed requests, bad parameters, token links, cache headers --------------------

@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBROKEN / HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\r\n\r\n",
])
def test_malformed_request_is_400_without_a_traceback(tmp_path, request_bytes):
    config = make_config(tmp_path)
    with error_records() as errors, serving(config) as port:
        try:
            status = exchange(port, request_bytes)[0]
        except (ConnectionResetError, IndexError, ValueError):
            status = 400  # closed without a readable answer: refused, not crashed
    assert status in (400, 401, 413, 431, 505)
    assert errors == [], [r.getMessage() for r in errors]


@pytest.mark.parametrize("path,parameter,status", [
    ("/api/jobs/2147483648", "id", 400),
    ("/api/jobs/99999999999999999999999999", "id", 400),
    ("/api/jobs/" + "9" * 5000, "id", 400),
    ("/api/jobs/%C2%B2", "id", 400),  # a Unicode digit
    ("/api/jobs/-1", "id", 400),
    ("/api/jobs/2147483647", "id", 404),
    ("/api/incidents?since=9999-12-31T23:59:59-23:59", "since", 400),
    ("/api/incidents?since=0001-01-01T00:00:00%2B23:59", "since", 400),
    ("/api/incidents?limit=" + "1" * 5000, "limit", 400),
    ("/api/jobs?offset=1000000000000000000000", "offset", 400),
    ("/api/jobs?limit=1_0", "limit", 400),
    ("/api/jobs?limit=%D9%A3", "limit", 400),
])
def test_out_of_range_parameters_are_4xx_naming_them(tmp_path, path, parameter, status):
    config = make_config(tmp_path)
    fill(config)
    with error_records() as errors, serving(config) as port:
        got, headers, body = get(port, path)
    assert got == status and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["parameter"] == parameter
    assert errors == []


def test_console_shell_loads_without_token_its_data_does_not(tmp_path):
    """The console's page and scripts hold no data (they must load to show the sign-in
    form); everything with data still needs the token."""
    config = make_config(tmp_path)
    fill(config)
    with serving(config) as port:
        for path in ("/", "/static/console.js", "/static/hls.light.min.js"):
            assert get(port, path, headers="")[0] == 200, path
        for path in ("/api/cameras", "/api/events", "/live/cam1/index.m3u8", "/static/../api/status"):
            assert get(port, path, headers="")[0] in (401, 404), path
        assert get(port, f"/live/cam1/index.m3u8?token={quote(TOKEN)}", headers="")[0] == 200


def test_segment_cache_control_is_private_behind_a_token(tmp_path):
    for token, scope in ((TOKEN, "private"), ("", "public")):
        (tmp_path / scope).mkdir()
        config = make_config(tmp_path / scope, token=token)
        fill(config)
        with serving(config) as port:
            status, headers, _ = get(port, "/live/cam1/seg-100.ts")
        assert status == 200 and headers["Cache-Control"] == f"{scope}, max-age=60"


def test_undecodable_token_is_401_not_500(tmp_path):
    config = make_config(tmp_path)
    with error_records() as errors, serving(config) as port:
        assert get(port, "/api/cameras", headers="Authorization: Bearer \xff\xfe\r\n")[0] == 401
        assert get(port, "/api/cameras?token=%ff%fe", headers="")[0] == 401
    assert errors == []


# --- a fuzz corpus over paths, query parameters and headers -----------------------------

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    config = make_config(tmp_path)
    fill(config)
    with error_records() as errors, serving(config) as port:
        yield port, errors


PIECES = ["", ".", "..", "live", "cam1", "nope", "index.m3u8", "seg-100.ts", "seg-1.ts",
          "seg-99999999999999999999.ts", "api", "jobs", "incidents", "health", "cameras",
          "metrics", "%2e%2e", "%2f", "%00", "%ff", "%", "%zz", "%u002e", "~", "\\", "//", "?"]
piece = st.one_of(st.sampled_from(PIECES),
                  st.text(max_size=12).map(lambda t: quote(t, safe="")),
                  st.binary(max_size=8).map(lambda b: quote(b, safe="")),
                  st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8))
paths = st.lists(piece, max_size=6).map(lambda parts: "/" + "/".join(parts))

NUMBERS = ["0", "-1", "1", "500", "501", "9223372036854775807", "9223372036854775808",
           "1e3", "0x10", " 5", "+5", "1_0", "nan", "inf", "%D9%A3", "", "1" * 30]
TIMES = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "0001-01-01",
         "9999-12-31", "2026-11-26T08:00:00Z", "2026-02-30T00:00:00", "2026-11-26T25:00:00",
         "20261126T080000Z", "2026-W48-4", "+002026-11-26", "2026-11-26T08:00:00+24:00"]
value = st.one_of(st.sampled_from(NUMBERS + TIMES + ["failed", "pending,failed", "high",
                                                     "cam1", "nope", ",,,", TOKEN]),
                  st.integers().map(str),
                  st.datetimes(timezones=st.timezones()).map(lambda d: quote(d.isoformat())),
                  st.text(max_size=20).map(lambda t: quote(t, safe="")),
                  st.binary(max_size=10).map(lambda b: quote(b, safe="")))
param = st.tuples(st.sampled_from(["limit", "offset", "state", "camera", "since", "severity",
                                   "token", "start", "duration", "x"]), value)
ENDPOINTS = ["/api/jobs", "/api/incidents", "/api/health", "/api/cameras", "/metrics", "/",
             "/live/cam1/index.m3u8", "/live/cam1/seg-100.ts", "/api/jobs/1", "/api/clip",
             "/api/incidents/1/clip.mp4", "/api/incidents/1/snapshot.jpg"]
endpoint = st.one_of(st.sampled_from(ENDPOINTS),
                     st.tuples(st.one_of(st.sampled_from(NUMBERS), st.integers().map(str),
                                         st.text(max_size=8).map(lambda t: quote(t, safe=""))),
                               st.sampled_from(["/api/jobs/{}", "/api/incidents/{}/clip.mp4",
                                                "/api/incidents/{}/snapshot.jpg"]))
                     .map(lambda pair: pair[1].format(pair[0])))
header_value = st.one_of(
    st.sampled_from(["bytes=0-", "bytes=-1", "bytes=5-1", "bytes=99999999999999999999-",
                     "bytes=0-0,0-0,0-0", "bytes=--", "Bearer", "Bearer ", f"Bearer {TOKEN}",
                     "Sun, 06 Nov 1994 08:49:37 GMT", "Mon, 99 Foo 0000", "*", ""]),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")))
header = st.tuples(st.sampled_from(["Range", "Authorization", "If-Modified-Since", "If-Range",
                                    "If-None-Match", "If-Unmodified-Since", "Accept-Encoding",
                                    "Origin", "Cookie", "Content-Length"]), header_value)

def one_line(text: str) -> str:
    return re.sub(r"[\r\n]", "", text)


FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def assert_answered_well(port, errors, target: str, headers: str):
    seen = len(errors)
    status, _, _ = exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}"
                                  f"Connection: close\r\n\r\n".encode("latin-1"))
    # 503 is the answer of a degraded /api/health and of an offline camera, never a crash.
    assert status < 500 or (status == 503 and target.startswith(("/api/health", "/live/"))), \
        (target, status)
    assert errors[seen:] == [], [r.getMessage() for r in errors[seen:]]


@FUZZ
@given(path=paths, authorized=st.booleans())
def test_fuzz_paths(fuzz_server, path, authorized):
    port, errors = fuzz_server
    assert_answered_well(port, errors, path, AUTH if authorized else "")


@FUZZ
@given(target=endpoint, params=st.lists(param, max_size=5), authorized=st.booleans())
def test_fuzz_api_parameters(fuzz_server, target, params, authorized):
    port, errors = fuzz_server
    query = "&".join(f"{name}={v}" for name, v in params)
    assert_answered_well(port, errors, f"{target}?{query}" if query else target,
                         AUTH if authorized else "")


@FUZZ
@given(target=st.sampled_from(ENDPOINTS), headers=st.lists(header, max_size=4))
def test_fuzz_headers(fuzz_server, target, headers):
    port, errors = fuzz_server
    lines = "".join(f"{name}: {one_line(v)}\r\n" for name, v in headers)
    assert_answered_well(port, errors, target, AUTH + lines)


# --- a connection flood against a real streaming process --------------------------------

STREAMER = ("import sys; from vlmguard import streamer; from vlmguard.config import load_config; "
            "streamer.main(load_config(sys.argv[1]))")


def at_default_open_file_limit():
    """systemd's default soft limit, with no hard room to raise it: the worst case."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def archives_handed_over(data_dir) -> int:
    return len(list((data_dir / "closed").rglob("*.ts")))


@pytest.mark.e2e
def test_connection_flood_never_stops_recording(tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    config_path = write_config(tmp_path, f"""
        [server]
        port = {port}
        header_timeout_seconds = 3
        [storage]
        data_dir = "{data_dir}"
        segment_seconds = 1
        archive_seconds = 10
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2=size=320x240:rate=25"
    """)
    url = f"http://127.0.0.1:{port}/live/cam1/index.m3u8"
    log_path = tmp_path / "streamer.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", STREAMER, str(config_path)], stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=at_default_open_file_limit)
    try:
        wait_until_live(url, proc, log_path)
        ffmpeg_before = ffmpeg_pid(data_dir)
        handed_before = archives_handed_over(data_dir)
        for wave in range(3):
            flood = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(1100)]
            try:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert len(list((Path("/proc") / str(proc.pid) / "fd").iterdir())) < 1024
                with urllib.request.urlopen(url, timeout=10) as response:  # a player gets in
                    assert response.status == 200 and b"seg-" in response.read()
                # Every flood connection is closed by the server: shed, or after the header timeout.
                assert all(closed_by_server(s, 10) for s in flood)
            finally:
                for s in flood:
                    s.close()
        assert proc.poll() is None, log_path.read_text()[-3000:]
        deadline = time.time() + 30
        while archives_handed_over(data_dir) <= handed_before and time.time() < deadline:
            time.sleep(0.5)
        assert archives_handed_over(data_dir) > handed_before, "recording stopped under the flood"
        assert ffmpeg_pid(data_dir) == ffmpeg_before  # the camera's FFmpeg never restarted
        assert decoded_frames(url, 3) >= 50
        text = log_path.read_text()
        assert "Too many open files" not in text and "Traceback" not in text, text[-3000:]
        assert '"http clients shed"' in text or "http clients shed" in text
    finally:
        proc.terminate()
        proc.wait(30)


def wait_until_live(url, proc, log_path, timeout: float = 40):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if b"seg-" in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never went live")


def ffmpeg_pid(data_dir) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ffmpeg.*{data_dir}/"], capture_output=True, text=True)
    return sorted(int(pid) for pid in out.stdout.split())
