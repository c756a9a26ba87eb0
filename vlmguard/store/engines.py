"""Engines for the two databases, and what their errors mean.

SQLite (WAL, the embedded default) and PostgreSQL speak the same SQLAlchemy Core
statements. They differ in how a transaction starts (SQLite: BEGIN IMMEDIATE, so a
read-then-write never fails busy), in connection settings (timeouts and keepalives on
PostgreSQL, so no process hangs on a network cut), and in what "the database is away for
now" looks like: is_outage tells that from a bad database, statement or row.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from vlmguard.errors import DatabaseError, DatabaseUnreachable, UnusableDatabase, first_line
from vlmguard.redact import mask_url
from vlmguard.store.schema import meta_table

SQLITE_BUSY_MS = 30_000
# PostgreSQL: how long a connection attempt may take, and how soon a peer that stopped
# answering mid-query is given up on (TCP keepalives), so that no process hangs on a
# network cut; libpq's own defaults wait for ever, or for the kernel's two hours.
PG_CONNECT_ARGS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10,
                   "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 20_000}


def redact_url(url: str) -> str:
    return mask_url(url)  # the one redaction: a ?password= query is masked too


def dialect_insert(engine: Engine):
    if engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert


def make_engine(url: str, *, create: bool = True, synchronous: str = "normal") -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return sqlite_engine(parsed, create=create, synchronous=synchronous)
    if parsed.get_backend_name() == "postgresql":
        try:
            return create_engine(parsed, pool_pre_ping=True, isolation_level="READ COMMITTED",
                                 connect_args=pg_connect_args(parsed))
        except ModuleNotFoundError:
            raise DatabaseError("PostgreSQL needs the postgres extra: "
                                "pip install 'vlmguard[postgres]'") from None
    raise DatabaseError(f"unsupported database URL {redact_url(url)}")


def pg_connect_args(url) -> dict[str, Any]:
    """PG_CONNECT_ARGS, less what the URL sets itself."""
    return {key: value for key, value in PG_CONNECT_ARGS.items() if key not in url.query}


def sqlite_engine(url, *, create: bool, synchronous: str) -> Engine:
    if not url.database or url.database == ":memory:":
        raise DatabaseError("SQLite needs a file path: several processes share the job table")
    if not create and not Path(url.database).exists():
        raise DatabaseError(f"no vlmguard database at {url.database} "
                            "(vlmguard run creates it on first start)")
    refuse_foreign_file(Path(url.database))
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread off: an analyzer heartbeats its lease from a side thread, and the
    # pool hands each thread a connection of its own at a time.
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000,
                                              "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record):
        # Hand transaction control to SQLAlchemy's begin event (the documented recipe).
        dbapi_conn.isolation_level = None
        for pragma in (f"busy_timeout={SQLITE_BUSY_MS}", "journal_mode=WAL",
                       f"synchronous={synchronous}", "foreign_keys=ON"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        # BEGIN IMMEDIATE takes the write lock up front, so the busy timeout applies to it;
        # a deferred read-then-write can fail busy without waiting.
        read_only = conn.get_execution_options().get("vlmguard_read")
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def refuse_foreign_file(path: Path) -> None:
    """Look at an existing file read-only before the engine's first connection switches it
    to WAL: a file that is not SQLite, or another program's SQLite file (tables, none of
    them ours), is refused untouched rather than converted or added to."""
    try:
        if path.stat().st_size == 0:
            return
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except (OSError, sqlite3.Error):
        return  # missing or unreadable: the engine's own open says why
    try:
        names = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError:
        return  # locked, or no -shm can be made here: the engine's own open says why
    except sqlite3.DatabaseError as exc:
        raise UnusableDatabase(f"cannot open database {path}: {first_line(exc)}") from None
    finally:
        conn.close()
    if names and meta_table.name not in names:
        raise UnusableDatabase(f"{path} is not a vlmguard database (it holds other tables: "
                               f"{', '.join(sorted(names)[:3])}); move it away or set database.url")


def open_problem(url: str, is_sqlite: bool, exc: BaseException) -> DatabaseError:
    """Opening failed. A database that is busy or a server that is down or cut off may
    come back (DatabaseUnreachable: wait for it); a SQLite file that is not a database or
    cannot be written, or a PostgreSQL refusal (password, no such database), will not
    (UnusableDatabase)."""
    reason = first_line(getattr(exc, "orig", None) or exc)
    message = f"cannot open database {redact_url(url)}: {reason}"
    transient = (("locked" in reason or "busy" in reason) if is_sqlite else is_outage(exc))
    return DatabaseUnreachable(message) if transient else UnusableDatabase(message)


# PostgreSQL SQLSTATE classes that mean "not now" rather than "not ever": 08 connection
# exception, 40 transaction rollback, 53 insufficient resources (too many connections),
# 57 operator intervention (the server is starting, stopping or restarting).
TRANSIENT_SQLSTATE = ("08", "40", "53", "57")
TRANSIENT_FATAL = ("starting up", "shutting down", "recovery mode", "too many clients",
                   "connection slots", "administrator command", "not yet accepting")


def is_outage(exc: BaseException) -> bool:
    """The database is away or busy for now, so the caller waits and tries again; as
    opposed to a bad database, a bad statement or a bad row."""
    if isinstance(exc, DatabaseUnreachable):
        return True
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig
    if isinstance(exc, sqlite3.OperationalError):
        # Locked or busy past the timeout, an I/O error, a folder or file it may not
        # write for now: nothing a retry later cannot cure, and nothing to stop for.
        return True
    if type(exc).__module__.startswith("psycopg"):
        import psycopg

        if isinstance(exc, psycopg.InterfaceError):
            return True
        if isinstance(exc, psycopg.OperationalError):
            state = getattr(exc, "sqlstate", None)
            if state is not None:
                return state[:2] in TRANSIENT_SQLSTATE
            # A failed connection carries no SQLSTATE: a server that answered FATAL said
            # no (a password, a database that does not exist) unless it said "not now".
            message = str(exc)
            return "FATAL:" not in message or any(p in message for p in TRANSIENT_FATAL)
    return False
