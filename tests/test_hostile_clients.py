"""Hostile clients, local users and unlucky configs against sign-in, the web's origins,
files, clips and webhooks (issue 20): each case asserts what really happened.

The slow clip reader, the token brute force and the huge webhook answer run against one
shared `vlmguard run` (a noisy lavfi camera, so a clip is bigger than the socket buffers,
and the Gemini stand-in, whose every answer has an incident that goes to the webhook);
after each, the streaming process has kept its pid, the live playlist answers 200 and
archives are still being written.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import CookieJar, web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from vlmguard.alerts import webhook
from vlmguard.cli import main
from vlmguard.config import load_config
from vlmguard.health import run_dir
from vlmguard.layout import Layout
from vlmguard.web import create_app
from vlmguard.web import session as session_module
from vlmguard.web.session import COOKIE, SignInLimiter, backoff

from daemon import RunningVlmguard
from helpers import free_port, write_config
from helpers import make_config as base_config

TOKEN = "hostile-clients-token-0123"
NOISY_CAMERA = ('[[cameras]]\nid = "cam1"\n'
                'url = "lavfi:testsrc2=size=320x240:rate=25,noise=alls=20:allf=t"\n')


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmguard: "), result.stderr
    return lines[0]


def config_text(tmp_path, server: str = "", extra: str = "") -> str:
    return f"""
        [server]
        port = {free_port()}
        {server}
        [storage]
        data_dir = "{tmp_path / 'data'}"
        {extra}
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """


def request(port: int, method: str, path: str, *, source: str = "127.0.0.1",
            headers: dict | None = None, body: bytes | None = None,
            timeout: float = 10) -> tuple[int, dict, bytes]:
    """One HTTP request from a chosen loopback address (every 127.x address is this host)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def run_app(config, script):
    async def go():
        jar = CookieJar(unsafe=True)
        async with TestClient(TestServer(create_app(config)), cookie_jar=jar) as client:
            return await script(client)
    return asyncio.run(go())


# -- sign-in: the limiter's rules, with its own clock ---------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_is_free_then_doubles_to_its_cap():
    waits = [backoff(n) for n in range(1, 14)]
    assert waits[:4] == [0, 0, 0, 0]
    assert waits[4:10] == [1, 2, 4, 8, 16, 32]
    assert waits[10:] == [60, 60, 60]


def test_limiter_waits_per_address_and_forgets():
    clock = Clock()
    limiter = SignInLimiter(clock)
    for _ in range(5):
        assert limiter.wait("10.0.0.1") == 0
        limiter.failed("10.0.0.1", "form")
    assert limiter.wait("10.0.0.1") == 1 and limiter.wait("10.0.0.2") == 0
    assert limiter.refuse("10.0.0.1").status == 429 and limiter.refused_total == 1
    clock.now += 1
    assert limiter.refuse("10.0.0.1") is None
    limiter.failed("10.0.0.1", "form")
    assert limiter.wait("10.0.0.1") == 2
    clock.now += session_module.FORGET_SECONDS + 1
    limiter.failed("10.0.0.2", "form")  # pruning happens as failures come in
    assert "10.0.0.1" not in limiter.table


def test_limiter_table_is_bounded():
    limiter = SignInLimiter(Clock())
    for n in range(session_module.MAX_TRACKED + 500):
        limiter.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", "bearer")
    assert len(limiter.table) == session_module.MAX_TRACKED
    assert "10.0.0.0" not in limiter.table  # the least recent went first


def test_ipv6_neighbours_count_as_one_address():
    class Peer:
        def __init__(self, remote):
            self.remote = remote
    key = session_module.client_address
    assert key(Peer("2001:db8::1")) == key(Peer("2001:db8::ffff:1")) == "2001:db8::/64"
    assert key(Peer("::ffff:192.0.2.7")) == "192.0.2.7"


# -- sign-in: through the app ---------------------------------------------------------------

def make_config(tmp_path, token=TOKEN, server="", data_dir=None):
    return base_config(tmp_path, token=token, server=server, data_dir=data_dir)


def test_wrong_tokens_by_any_route_lead_to_429_even_for_the_right_one(tmp_path):
    async def script(client):
        statuses = []
        for n in range(5):  # the form, a Bearer header and ?token= all count
            if n % 3 == 0:
                answer = await client.post("/api/session", json={"token": f"guess-{n}"})
            elif n % 3 == 1:
                answer = await client.get("/api/cameras", headers={"Authorization": f"Bearer g{n}"})
            else:
                answer = await client.get(f"/live/cam1/index.m3u8?token=g{n}")
            statuses.append(answer.status)
        refused = await client.post("/api/session", json={"token": TOKEN})
        right_header = await client.get("/api/cameras", headers={"Authorization": f"Bearer {TOKEN}"})
        return statuses, refused.status, refused.headers.get("Retry-After"), \
            await refused.json(), right_header.status
    statuses, status, retry_after, body, right = run_app(make_config(tmp_path), script)
    assert statuses == [401] * 5
    assert status == 429 and retry_after == "1" and "try again in 1 s" in body["error"]
    assert right == 429  # while the address waits, no token from it is looked at


def test_failures_are_logged_and_counted_in_metrics(tmp_path, capsys):
    config = make_config(tmp_path)

    async def script(client):
        for _ in range(6):
            await client.post("/api/session", json={"token": "nope"})
        await asyncio.sleep(1.1)  # the address may try again
        metrics = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        return metrics.status, await metrics.text()
    from vlmguard.store.bundle import Store
    Store.from_config(config).close()
    status, text = run_app(config, script)
    assert status == 200
    assert re.search(r"^vlmguard_signin_failures_total 5$", text, re.M), text[-600:]
    assert re.search(r"^vlmguard_signin_refused_total 1$", text, re.M)
    logged = capsys.readouterr().out
    assert logged.count("sign-in failed: wrong token") == 5


def test_sign_out_kills_every_copy_of_the_cookie(tmp_path):
    config = make_config(tmp_path)

    async def sign_in_and_out(client):
        await client.post("/api/session", json={"token": TOKEN})
        cookie = next(c.value for c in client.session.cookie_jar if c.key == COOKIE)
        csrf = (await (await client.get("/api/session")).json())["csrf"]
        assert (await client.get("/api/cameras")).status == 200
        ended = await client.post("/api/session/end", headers={"X-CSRF-Token": csrf})
        assert ended.status == 200
        return cookie
    cookie = run_app(config, sign_in_and_out)

    async def replay(client):
        client.session.cookie_jar.update_cookies({COOKIE: cookie})
        return (await client.get("/api/cameras")).status
    assert run_app(config, replay) == 401
    sessions = config.data_dir / "sessions.json"
    assert stat.S_IMODE(sessions.stat().st_mode) == 0o600
    assert json.loads(sessions.read_text()) == {}


def test_sign_out_needs_csrf(tmp_path):
    """Another site cannot sign the operator out (or prove a cookie) with a forged POST."""
    async def script(client):
        await client.post("/api/session", json={"token": TOKEN})
        forged = await client.post("/api/session/end")
        still = await client.get("/api/cameras")
        return forged.status, still.status
    assert run_app(make_config(tmp_path), script) == (403, 200)


def test_garbage_session_list_signs_everyone_out_without_failing(tmp_path):
    config = make_config(tmp_path)
    config.data_dir.mkdir(parents=True)
    (config.data_dir / "sessions.json").write_text('{"a": "b", "c": true, "d": 1e999} [')

    async def script(client):
        signed = await client.post("/api/session", json={"token": TOKEN})
        return signed.status, (await client.get("/api/cameras")).status
    assert run_app(config, script) == (200, 200)


# -- tokens, and configs that lock players out ----------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("token", ["", "short", "x" * 15])
def test_network_server_refuses_a_short_token_in_check_config_and_run(tmp_path, token):
    path = write_config(tmp_path, config_text(tmp_path, f'host = "0.0.0.0"\ntoken = "{token}"'))
    line = one_line_error(cli("check-config", "--config", path))
    assert "server.token" in line and ("at least 16" in line or "required" in line)
    proc = subprocess.run([sys.executable, "-m", "vlmguard", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr


def test_sixteen_characters_are_enough_and_loopback_needs_none(tmp_path):
    path = write_config(tmp_path, config_text(tmp_path, 'host = "0.0.0.0"\ntoken = "' + "k" * 16 + '"'))
    assert cli("check-config", "--config", path).exit_code == 0
    path = write_config(tmp_path, config_text(tmp_path, 'token = "k"'))
    assert cli("check-config", "--config", path).exit_code == 0


@pytest.mark.parametrize("server,message", [
    ("max_connections = 100\nmax_event_streams = 100", "server.max_event_streams: must be at most half"),
    ("max_connections = 100\nmax_event_streams = 51", "server.max_event_streams: must be at most half"),
    ('token = "tab\\there-and-more-chars"', "server.token: must not contain control characters"),
    ('token = "line\\nbreak-and-more-chars"', "server.token: must not contain control characters"),
    ('public_url = "guard.example.com"', "server.public_url: must be an http:// or https:// URL"),
    ('allowed_hosts = ["http://guard.local"]', "server.allowed_hosts[0]: must be a host name"),
    ('allowed_hosts = ["guard.local:8080"]', "server.allowed_hosts[0]: must be a host name"),
    ('cors_origins = ["*"]', "server.cors_origins[0]: must be an origin"),
    ('cors_origins = ["https://a.example/path"]', "server.cors_origins[0]: must be an origin"),
])
def test_config_combinations_that_lock_out_players_are_refused(tmp_path, server, message):
    path = write_config(tmp_path, config_text(tmp_path, server))
    assert message in one_line_error(cli("check-config", "--config", path))


def test_event_streams_default_to_half_of_a_small_connection_cap(tmp_path):
    config = load_config(write_config(tmp_path, config_text(tmp_path, "max_connections = 10")))
    assert config.server.max_event_streams == 5
    config = load_config(write_config(tmp_path, config_text(tmp_path, "")))
    assert config.server.max_event_streams == 16


# -- open mode: CORS and the Host header ----------------------------------------------------

def open_config(tmp_path, server=""):
    return make_config(tmp_path, token="", server=server)


def fetch(config, path, headers):
    async def script(client):
        answer = await client.get(path, headers=headers)
        return answer.status, answer.headers
    return run_app(config, script)


def test_open_mode_lets_no_other_site_read(tmp_path):
    config = open_config(tmp_path, 'cors_origins = ["https://dash.example:8443"]')
    status, headers = fetch(config, "/api/cameras", {"Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    assert "Origin" in headers["Vary"]
    for origin in ("https://dash.example:8443", "http://127.0.0.1:9000", "http://localhost:3000"):
        status, headers = fetch(config, "/api/cameras", {"Origin": origin})
        assert headers["Access-Control-Allow-Origin"] == origin, origin

    async def preflight(client):
        answer = await client.options("/api/cameras", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        return answer.status, answer.headers
    status, headers = run_app(config, preflight)
    assert status == 204 and "Access-Control-Allow-Origin" not in headers


def test_token_mode_keeps_wildcard_cors(tmp_path):
    status, headers = fetch(make_config(tmp_path), "/api/cameras",
                            {"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("host,status", [
    ("evil.example", 403), ("evil.example:8080", 403), ("127.0.0.1.nip.io", 403),
    ("127.0.0.1:8080", 200), ("localhost", 200), ("LOCALHOST.:8080", 200), ("[::1]:8080", 200),
    ("127.0.0.2", 200), ("cams.localhost", 200), ("guard.local", 200), ("guard.example.com", 200),
])
def test_open_mode_checks_the_host_header(tmp_path, host, status):
    config = open_config(tmp_path, 'allowed_hosts = ["guard.local"]\n'
                                   'public_url = "https://guard.example.com/vlm"')
    got, headers = fetch(config, "/api/cameras", {"Host": host})
    assert got == status, host


def test_host_check_is_open_mode_only(tmp_path):
    status, _ = fetch(make_config(tmp_path), "/api/cameras",
                      {"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"})
    assert status == 200


# -- the RAM folder --------------------------------------------------------------------------

@pytest.fixture
def ram_config(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    path = write_config(tmp_path, config_text(tmp_path))
    folder = Layout(load_config(path).data_dir).ram
    assert folder.parent == Path("/dev/shm")
    yield path, folder
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def run_briefly(path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "vlmguard", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.e2e
def test_ram_folder_made_first_by_another_user_is_refused(ram_config):
    path, folder = ram_config
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    os.chown(folder, 65534, 65534)  # nobody's: a local user got there first
    (folder / "live").mkdir()  # and planted their own segments
    proc = run_briefly(path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"vlmguard: RAM folder {folder}: belongs to uid 65534, not to this "
                        f"user (uid {os.geteuid()}): someone else made it first; remove it, or "
                        "set RUNTIME_DIRECTORY to a private folder (systemd's RuntimeDirectory "
                        "does)")
    assert one_line_error(cli("check-config", "--config", path)) == lines[0]
    assert not (path.parent / "data" / "vlmguard.pid").exists()  # nothing started


def test_ram_folder_that_is_a_symlink_or_open_to_others_is_refused(ram_config, tmp_path):
    path, folder = ram_config
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder.symlink_to(elsewhere)
    assert "is not a directory" in one_line_error(cli("check-config", "--config", path))
    folder.unlink()
    folder.mkdir()
    os.chmod(folder, 0o777)  # ours, but anyone could have written into it
    assert "others may write into it (mode 0777)" in one_line_error(
        cli("check-config", "--config", path))


def test_ram_folder_is_made_private_and_an_old_one_of_ours_closed(ram_config):
    path, folder = ram_config
    layout = Layout(load_config(path).data_dir)
    old = os.umask(0)  # whatever the umask: 0700 all the same
    try:
        layout.make_dirs("cam1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    os.chmod(folder, 0o755)  # what an earlier vlmguard left
    layout.make_dirs("cam1")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# -- the database password ---------------------------------------------------------------------

@pytest.mark.e2e
def test_database_password_in_the_url_is_masked_in_run_status_and_jobs(tmp_path):
    secret = "Hunter2-in-the-url"
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?password={secret}"
    path = write_config(tmp_path, config_text(tmp_path, extra=f'[database]\nurl = "{url}"'))
    outputs = []
    for command in (["status"], ["status", "--json"], ["jobs"], ["check-config"]):
        result = cli(*command, "--config", path)
        outputs.append(result.output + result.stderr)
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        outputs.append(proc.communicate(timeout=8)[0])
    except subprocess.TimeoutExpired:  # it records without its database: stop it
        proc.terminate()
        outputs.append(proc.communicate(timeout=60)[0])
    for output in outputs:
        assert secret not in output, output
    assert any("postgresql+psycopg://***@127.0.0.1" in output for output in outputs[:3])


# -- clips: byte ranges ------------------------------------------------------------------------

@pytest.mark.parametrize("header,expected", [
    ("bytes=0-99", (0, 99)), ("bytes=100-", (100, 999)), ("bytes=-10", (990, 999)),
    ("bytes=900-5000", (900, 999)), ("bytes=5-1", (0, 999)), ("bytes=0-1,5-6", (0, 999)),
    ("bytes=-", (0, 999)), ("items=0-1", (0, 999)), ("bytes=" + "9" * 30 + "-", (0, 999)),
])
def test_clip_byte_ranges(header, expected):
    from vlmguard.web.sending import byte_range

    class Asked:
        headers = {"Range": header}
    assert byte_range(Asked(), 1000) == expected


def test_clip_range_past_the_end_is_416():
    from vlmguard.web.sending import byte_range

    class Asked:
        headers = {"Range": "bytes=1000-"}
    with pytest.raises(web.HTTPRequestRangeNotSatisfiable) as refused:
        byte_range(Asked(), 1000)
    assert refused.value.headers["Content-Range"] == "bytes */1000"


# -- webhooks: huge and dripping answers ----------------------------------------------------------

class HostileReceiver:
    """A webhook receiver on 127.0.0.1 that answers `status` with a body of `answer_bytes`
    (streamed, never held) or drips one byte every `drip_seconds`."""

    def __init__(self, status: int = 200, answer_bytes: int = 0, drip_seconds: float = 0.0):
        self.status = status
        self.answer_bytes = answer_bytes
        self.drip_seconds = drip_seconds
        self.port = free_port()
        self.posts = 0
        self.bytes_sent: list[int] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.posts += 1
        response = web.StreamResponse(status=self.status)
        response.content_length = self.answer_bytes or 1000
        await response.prepare(request)
        sent = 0
        chunk = b"x" * (1 << 20)
        try:
            if self.drip_seconds:
                while sent < 1000:
                    await response.write(b"x")
                    sent += 1
                    await asyncio.sleep(self.drip_seconds)
            else:
                while sent < self.answer_bytes:
                    piece = chunk[:self.answer_bytes - sent]
                    await response.write(piece)
                    sent += len(piece)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.bytes_sent.append(sent)
        return response

    def __enter__(self) -> "HostileReceiver":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def deliver(url: str) -> tuple[object, float]:
    async def go():
        hook = webhook.Webhook(url, "", "")
        try:
            started = time.monotonic()
            answer = await hook.post({"id": 1}, "key-1")
            return answer, time.monotonic() - started
        finally:
            await hook.close()
    return asyncio.run(go())


@pytest.mark.parametrize("status,outcome", [(200, "delivered"), (503, "retry")])
def test_huge_webhook_answer_is_not_read(status, outcome):
    with HostileReceiver(status=status, answer_bytes=400 << 20) as receiver:
        answer, seconds = deliver(receiver.url)
        deadline = time.time() + 10
        while not receiver.bytes_sent and time.time() < deadline:
            time.sleep(0.05)
    assert answer.outcome == outcome and seconds < 5
    assert receiver.bytes_sent[0] < 64 << 20  # cut off near the start, not read to the end
    if status == 503:
        assert answer.detail.startswith("HTTP 503: xxx") and len(answer.detail) < 240


def test_dripping_webhook_answer_meets_one_deadline(monkeypatch):
    monkeypatch.setattr(webhook, "TIMEOUT_SECONDS", 1.5)
    with HostileReceiver(drip_seconds=0.2) as receiver:
        answer, seconds = deliver(receiver.url)
    assert answer.outcome == "retry" and answer.detail == "no answer within 1.5 s"
    assert 1.4 < seconds < 3  # not 200 s of 0.2-s reads


# -- against a running daemon ----------------------------------------------------------------------

def status_of(pid: int, field: str) -> int:
    """A number (kB) from /proc/<pid>/status: VmRSS, or VmHWM, the peak RSS."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def archives_written(data_dir: Path) -> int:
    return sum(len(list((data_dir / stage / "cam1").glob("*.ts")))
               for stage in ("closed", "archives"))


class Hostile:
    def __init__(self, running: RunningVlmguard, receiver: HostileReceiver, started: datetime):
        self.running = running
        self.receiver = receiver
        self.started = started
        self.streamer_pid = wait_for_pid(running, "streamer")

    @property
    def port(self) -> int:
        return self.running.port

    def playlist_status(self, source: str = "127.0.0.1") -> int:
        try:
            return request(self.port, "GET", f"/live/cam1/index.m3u8?token={quote(TOKEN)}",
                           source=source)[0]
        except OSError:
            return 0

    @contextmanager
    def recording_throughout(self):
        """The streamer keeps its pid, the playlist answers 200 every second, and a new
        archive is written while the block runs (or within 15 s after it)."""
        archives = archives_written(self.running.data_dir)
        answers: list[int] = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                answers.append(self.playlist_status())
                stop.wait(1.0)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join(15)
        assert answers and set(answers) == {200}, answers
        deadline = time.time() + 15
        while archives_written(self.running.data_dir) <= archives and time.time() < deadline:
            time.sleep(0.5)
        assert archives_written(self.running.data_dir) > archives, "archives stopped"
        assert self.running.child_pid("streamer") == self.streamer_pid
        assert self.running.proc.poll() is None


def wait_for_pid(running: RunningVlmguard, name: str, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = running.child_pid(name)
        if pid is not None:
            return pid
        time.sleep(0.3)
    raise AssertionError(f"no {name} pid")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from gemini_server import FakeGemini

    directory = tmp_path_factory.mktemp("hostile-clients")
    with FakeGemini() as gemini, HostileReceiver(answer_bytes=400 << 20) as receiver:
        running = RunningVlmguard(
            directory, gemini.base_url, workers=1, cameras=NOISY_CAMERA,
            env={"RUNTIME_DIRECTORY": ""}, server=f'token = "{TOKEN}"',
            extra=f'[[alerts.rules]]\nname = "site"\nmin_severity = "high"\n'
                  f'cooldown_seconds = 0\nwebhooks = ["{receiver.url}"]\n')
        started = datetime.now(timezone.utc)
        running.start()
        try:
            hostile = Hostile(running, receiver, started)
            deadline = time.time() + 40
            while hostile.playlist_status() != 200:
                assert time.time() < deadline and running.proc.poll() is None, \
                    running.log_text()[-3000:]
                time.sleep(0.3)
            yield hostile
        finally:
            running.stop()


def stalled_reader(port: int, path: str) -> socket.socket:
    """A client that asks for a clip and then reads nothing (its window stays tiny)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


@pytest.mark.e2e
def test_clip_readers_that_stop_reading_free_their_slots(hostile):
    time.sleep(max(0.0, 25 - (datetime.now(timezone.utc) - hostile.started).total_seconds()))
    start = hostile.started.strftime("%Y-%m-%dT%H:%M:%SZ")
    path = f"/api/clip?camera=cam1&start={start}&duration=600&token={quote(TOKEN)}"
    status, headers, body = request(hostile.port, "GET", path, timeout=60)
    assert status == 200 and len(body) > 8 << 20, len(body)  # more than socket buffers hold
    with hostile.recording_throughout():
        stalled = [stalled_reader(hostile.port, path) for _ in range(2)]
        try:
            time.sleep(3)  # both cut and sending: every clip slot taken
            began = time.monotonic()
            answers = []
            while time.monotonic() - began < 40:
                status, _, body = request(hostile.port, "GET", path, timeout=60)
                answers.append(status)
                if status == 200:
                    break
            assert answers[-1] == 200 and set(answers) <= {200, 503}, answers
            waited = time.monotonic() - began
            for sock in stalled:  # dropped by the server, not left hanging
                sock.settimeout(5)
                with pytest.raises((ConnectionResetError, socket.timeout, TimeoutError, OSError)):
                    while sock.recv(1 << 20):
                        pass
                    raise ConnectionResetError  # EOF: closed by the server
        finally:
            for sock in stalled:
                sock.close()
    assert waited < 25, waited  # stall cut-off (10 s) plus a turn in the queue
    assert "clip reader too slow: dropped" in hostile.running.log_text()


def guess_tokens(port: int, source: str, seconds: float, connections: int = 4) -> list[int]:
    """Wrong tokens POSTed to /api/session over keep-alive connections from source, for
    seconds; the status of every answer (0: the connection failed)."""
    results: list[int] = []
    stop = time.monotonic() + seconds

    def attack(n: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                                source_address=(source, 0))
        guess = 0
        while time.monotonic() < stop:
            guess += 1
            try:
                connection.request("POST", "/api/session",
                                   body=json.dumps({"token": f"guess-{n}-{guess}"}),
                                   headers={"Content-Type": "application/json"})
                answer = connection.getresponse()
                answer.read()
                results.append(answer.status)
            except (OSError, http.client.HTTPException):
                connection.close()
                results.append(0)
        connection.close()
    threads = [threading.Thread(target=attack, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return results


@pytest.mark.e2e
def test_token_brute_force_is_slowed_and_players_play_on(hostile):
    attacker = "127.0.0.3"
    with hostile.recording_throughout():
        results = guess_tokens(hostile.port, attacker, 6)
        right = request(hostile.port, "GET", f"/api/cameras?token={quote(TOKEN)}",
                        source=attacker)
    checked = results.count(401)
    assert 5 <= checked <= 9, checked  # 5 free, then after 1 s, 2 s (and 4 s)
    assert results.count(429) > 100 and set(results) == {401, 429}
    assert right[0] == 429 and "Retry-After" in right[1]
    text = request(hostile.port, "GET", "/metrics",
                   headers={"Authorization": f"Bearer {TOKEN}"})[2].decode()
    assert f"vlmguard_signin_failures_total {checked}\n" in text
    assert re.search(r"^vlmguard_signin_refused_total (\d+)$", text, re.M).group(1) == \
        str(results.count(429) + 1)
    logged = [e for e in hostile.running.log_events() if e.get("event", "").startswith("sign-in failed")]
    assert len(logged) == checked and {e["client"] for e in logged} == {attacker}


@pytest.mark.e2e
def test_huge_webhook_answers_cost_the_notifier_nothing(hostile):
    receiver = hostile.receiver
    with hostile.recording_throughout():
        deadline = time.time() + 120
        while len(receiver.bytes_sent) < 2 and time.time() < deadline:
            time.sleep(0.5)
    assert len(receiver.bytes_sent) >= 2, "no alert reached the receiver"
    assert max(receiver.bytes_sent) < 64 << 20  # each 400 MB answer cut off near its start
    peak_kb = status_of(wait_for_pid(hostile.running, "notifier"), "VmHWM")
    assert peak_kb < 300 * 1024, peak_kb
    deliveries = [e for e in hostile.running.log_events() if "delivered" in e.get("event", "")
                  and e.get("role") == "notifier"]
    assert deliveries, "the notifier logged no delivery"


@pytest.mark.e2e
def test_daemon_files_are_private_outside_systemd(hostile):
    data_dir = hostile.running.data_dir
    ram = Layout(data_dir).ram
    assert stat.S_IMODE(ram.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ram).st_mode) == 0o700 and os.stat(ram).st_uid == os.geteuid()
    found = [data_dir / "vlmguard.db", data_dir / "vlmguard.pid",
             *run_dir(data_dir).glob("*.json"), *(data_dir / "archives" / "cam1").glob("*.ts"),
             *(data_dir / "closed" / "cam1").glob("*.ts"), *data_dir.glob("snapshots/cam1/*.jpg"),
             *(ram / "live" / "cam1").glob("*.ts")]
    kinds = {path.suffix for path in found}
    assert {".db", ".json", ".ts", ".pid"} <= kinds, kinds
    for path in found + [data_dir / "archives" / "cam1", ram / "live" / "cam1"]:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue  # a live segment FFmpeg deleted meanwhile
        assert mode & 0o077 == 0, f"{path}: {mode:04o}"
