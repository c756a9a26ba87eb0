"""What many test modules share: waiting on a real outcome, config files, free ports and
the PostgreSQL server the tests use. Test modules import from here (and the topic modules
beside it), never from each other.

- `helpers.processes`: processes' liveness and families (/proc);
- `helpers.media`: FFmpeg probes, decoded frames, the RTSP test camera, fabricated archives;
- `helpers.db`: a running daemon's SQLite job table read directly;
- `helpers.config_fuzz`: hypothesis values for config keys and the one-line-error check;
- `helpers.alerts`: incidents and analysed windows for the alert tests;
- `helpers.http`: the web app served on its own loop, as the streaming process serves it.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

# The PostgreSQL the tests use (each test gets a schema of its own); tests/run.sh starts one
# at this default address. Without a reachable server the PostgreSQL tests skip, unless
# VLMGUARD_TEST_PG_REQUIRED=1 (CI) makes that a failure.
PG_URL = os.environ.get("VLMGUARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_address() -> tuple[str, int]:
    """Host and port of PG_URL, for a TCP proxy in front of the server."""
    from sqlalchemy.engine import make_url
    url = make_url(PG_URL)
    return url.host or "127.0.0.1", url.port or 5432


def through_proxy(url: str, proxy) -> str:
    """`url` with the host and port of a TcpProxy in front of the server."""
    from sqlalchemy.engine import make_url
    return make_url(url).set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)


def pg_url_with_database(database: str) -> str:
    from sqlalchemy.engine import make_url
    return make_url(PG_URL).set(database=database).render_as_string(hide_password=False)


def wait_for(condition, timeout: float = 60.0, what: str = "the condition", daemon=None,
             every: float = 0.2):
    """Call `condition` until it returns something true, and return that. With a
    RunningVlmguard as `daemon` (or a tuple of them), fail at once if one exits, with its
    log's tail."""
    deadline = time.monotonic() + timeout
    daemons = daemon if isinstance(daemon, tuple) else (() if daemon is None else (daemon,))
    while not (value := condition()):
        for one in daemons:
            assert one.proc.poll() is None, \
                f"the daemon exited while waiting for {what}:\n{one.log_text()[-3000:]}"
        if time.monotonic() > deadline:
            tail = "".join(f":\n{one.log_text()[-4000:]}" for one in daemons)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tail}")
        time.sleep(every)
    return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path, body: str) -> Path:
    path = directory / "config.toml"
    path.write_text(textwrap.dedent(body))
    return path


def make_config(directory: Path, *, token: str = "", server: str = "", storage: str = "",
                cameras: tuple[str, ...] = ("cam1",), data_dir: Path | None = None,
                serve: bool = False, with_store: bool = False):
    """A loaded config for a test that runs the web app or a process body in-process:
    data under `directory`, lavfi cameras named `cameras`, extra `server` and `storage`
    lines. `serve`: a free port, for a test that listens on it; `with_store`: the job
    table exists (as `vlmguard run` leaves it)."""
    from vlmguard.config import load_config
    from vlmguard.store.bundle import Store

    port = f"port = {free_port()}" if serve else ""
    camera_tables = "".join(f'[[cameras]]\nid = "{camera}"\nurl = "lavfi:testsrc2"\n'
                            for camera in cameras)
    body = (f'[server]\ntoken = "{token}"\n{port}\n{textwrap.dedent(server)}\n'
            f'[storage]\ndata_dir = "{data_dir or directory / "data"}"\n{textwrap.dedent(storage)}\n'
            + camera_tables)
    config = load_config(write_config(directory, body))
    if with_store:
        Store.from_config(config).close()
    return config
