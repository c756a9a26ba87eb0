"""One connection to the job table's database, shared by every part of the store.

A Database owns the engine, hands out read and write transactions, wakes idle workers
when a writer commits (notify) and lets an idle process wait for that (wait_for_commit),
hiding that SQLite and PostgreSQL do this differently. The parts (queue, pauses, outbox,
incidents, reports, recordings index, quarantine) each take a Database and hold no
connection of their own.

Create a Database in the process that uses it, never before a fork.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection

from vlmguard.errors import DatabaseError, UnusableDatabase
from vlmguard.store import schema
from vlmguard.store.engines import dialect_insert, make_engine, open_problem, redact_url
from vlmguard.store.watchers import NOTIFY_CHANNEL, PostgresListener, SqliteWatcher


class Database:
    """The engine, read and write transactions, and the wake-up between processes."""

    def __init__(self, url: str, *, create: bool = True, synchronous: str = "normal",
                 lazy: bool = False):
        self.url = url
        try:
            self.engine = make_engine(url, create=create, synchronous=synchronous)
        except OSError as exc:  # the SQLite file's folder cannot be made
            raise UnusableDatabase(f"cannot open database {redact_url(url)}: "
                                   f"{exc.strerror or exc}") from None
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.insert = dialect_insert(self.engine)
        self._watcher: SqliteWatcher | PostgresListener | None = None
        self.create = create
        self.ready = False
        if lazy:
            return  # the schema is seen to at the first contact (ensure_ready)
        try:
            self.ensure_ready()
        except DatabaseError:
            self.engine.dispose()
            raise

    @classmethod
    def from_config(cls, config, **kwargs) -> "Database":
        return cls(config.database_url, synchronous=config.database.sqlite_synchronous,
                   **kwargs)

    @property
    def shown_url(self) -> str:
        """The URL as it may be logged or shown: no password."""
        return redact_url(self.url)

    def ensure_ready(self) -> None:
        """Create or upgrade the schema at the first contact with the database, once. A
        lazy database (lazy=True) is made without reaching the server, so a process can
        start, and record, while it is away; it calls this before its first use."""
        if self.ready:
            return
        try:
            schema.prepare(self, create=self.create)
        except (sa_exc.DBAPIError, sqlite3.Error) as exc:
            raise open_problem(self.url, self.is_sqlite, exc) from None
        self.ready = True

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        # vlmguard_read: the SQLite begin hook starts a plain BEGIN, not BEGIN IMMEDIATE.
        with self.engine.connect().execution_options(vlmguard_read=True) as conn:
            with conn.begin():
                yield conn

    def notify(self, conn: Connection) -> None:
        """Wake idle workers; on SQLite the commit itself does (data_version changes)."""
        if not self.is_sqlite:
            conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    def wait_for_commit(self, timeout: float) -> bool:
        """Wait up to timeout for another connection's commit (True) without writing.
        The watcher's connection is made on first use, in the thread that waits."""
        if self._watcher is None:
            self._watcher = (SqliteWatcher(self.engine.url.database) if self.is_sqlite
                             else PostgresListener(self.engine.url))
        return self._watcher.wait(timeout)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.engine.dispose()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
