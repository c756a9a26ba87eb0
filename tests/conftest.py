"""Shared fixtures: every queue test runs on a SQLite file and on a PostgreSQL schema.

Tiers: a test is end to end (marker `e2e`) when its module, class or function is marked
so; every other test is in the fast tier (marker `fast`, added here): it runs in this
process and starts no process, which the `fast_tier_starts_no_process` guard checks."""

from __future__ import annotations

import os
import secrets
import subprocess
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from vlmguard.store.bundle import Store

from helpers import PG_URL, write_config


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.fast)
        params = getattr(item, "callspec", None)
        if "pg_url" in item.fixturenames or (params and "postgres" in params.params.values()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def fast_tier_starts_no_process(request, monkeypatch):
    """A fast test that starts a process (FFmpeg, a daemon, a browser) belongs to the e2e
    tier: say so at once rather than let the fast tier grow slow."""
    if request.node.get_closest_marker("e2e") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process but is in the fast tier: "
                             "mark it @pytest.mark.e2e (or its module: pytestmark = pytest.mark.e2e)")
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(BaseProcess, "start", refuse)


def postgres_available() -> bool:
    try:
        engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 5})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session", autouse=True)
def ram_folders(tmp_path_factory):
    """Live segments and windows go to /dev/shm folders named for each data directory:
    remove the ones this session's data directories made (their data_dir.txt says whose)."""
    import shutil
    import time
    started = time.time()
    yield
    base = str(tmp_path_factory.getbasetemp())
    for folder in Path("/dev/shm").glob(f"vlmguard-{os.getuid()}-*"):
        try:
            owner = (folder / "data_dir.txt").read_text()
        except FileNotFoundError:
            # Made by a test that filled a folder by hand (no daemon): one of this
            # session's if it is younger than the session.
            owner = base if folder.stat().st_ctime >= started else ""
        except OSError:
            continue
        if owner == base or owner.startswith(base + "/"):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_up() -> bool:
    return postgres_available()


@pytest.fixture
def pg_url(pg_up):
    """A PostgreSQL URL whose search_path is a schema made for this test alone."""
    if not pg_up:
        reason = (f"PostgreSQL is not reachable at {make_url(PG_URL)} (tests/run.sh starts one; "
                  "VLMGUARD_TEST_PG_URL names another)")
        if os.environ.get("VLMGUARD_TEST_PG_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    schema = "t_" + secrets.token_hex(6)
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    with Store(db_url, lease_seconds=30, retry_backoff=10) as s:
        yield s


@pytest.fixture
def config_file(tmp_path):
    """A minimal valid config with data under tmp_path."""
    return write_config(tmp_path, f"""
        [storage]
        data_dir = "{tmp_path / 'data'}"
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2=size=320x240:rate=10"
        [[cameras]]
        id = "cam2"
        url = "rtsp://user:secret@127.0.0.1:8554/cam2"
    """)


@pytest.fixture
def gemini():
    """The project's Gemini-protocol server on 127.0.0.1, for the real google-genai SDK."""
    from gemini_server import FakeGemini  # imported when used: aiohttp, google-genai

    with FakeGemini() as server:
        yield server


@pytest.fixture
def vlmguard(tmp_path, gemini):
    """Start `vlmguard run` processes against the test Gemini; killed at the end."""
    from daemon import RunningVlmguard

    started = []

    def start(**kwargs) -> RunningVlmguard:
        daemon = RunningVlmguard(tmp_path, gemini.base_url, **kwargs).start()
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.kill()
