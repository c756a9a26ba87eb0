"""Shared fixtures: every queue test runs on a SQLite file and on a PostgreSQL schema."""

from __future__ import annotations

import os
import secrets
import textwrap
from pathlib import Path

import pytest
import sqlalchemy

from vlmguard.store.bundle import Store

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_available() -> bool:
    try:
        engine = sqlalchemy.create_engine(PG_ADMIN_URL)
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
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (.ci/run starts it)")
    schema = "t_" + secrets.token_hex(6)
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
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


def write_config(directory: Path, body: str) -> Path:
    path = directory / "config.toml"
    path.write_text(textwrap.dedent(body))
    return path


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
    from gemini_server import FakeGemini  # it imports this module's helpers

    with FakeGemini() as server:
        yield server


@pytest.fixture
def vlmguard(tmp_path, gemini):
    """Start `vlmguard run` processes against the test Gemini; killed at the end."""
    from daemon import RunningVlmguard  # it imports this module's helpers

    started = []

    def start(**kwargs) -> RunningVlmguard:
        daemon = RunningVlmguard(tmp_path, gemini.base_url, **kwargs).start()
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.kill()
