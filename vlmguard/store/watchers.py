"""How an idle process hears that another one committed, without writing: SQLite by
polling PRAGMA data_version (a read), PostgreSQL by LISTEN on its own connection (writers
NOTIFY in their transaction, Database.notify). Only Database.wait_for_commit uses these.
"""

from __future__ import annotations

import sqlite3
import time

from vlmguard.store.engines import SQLITE_BUSY_MS, pg_connect_args

NOTIFY_CHANNEL = "vlmguard_jobs"
SQLITE_WATCH_INTERVAL = 0.02


class SqliteWatcher:
    """Wakes when any other connection commits, by polling PRAGMA data_version (a read)."""

    def __init__(self, path: str):
        self.conn = sqlite3.connect(path, timeout=SQLITE_BUSY_MS / 1000, isolation_level=None)
        self.version = self.data_version()

    def data_version(self) -> int:
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            version = self.data_version()
            if version != self.version:
                self.version = version
                return True
            time.sleep(min(SQLITE_WATCH_INTERVAL, max(deadline - time.monotonic(), 0)))
        return False

    def close(self) -> None:
        self.conn.close()


class PostgresListener:
    """LISTEN on its own autocommit connection; writers NOTIFY in their transaction."""

    def __init__(self, url):
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.connect_args = pg_connect_args(url)
        self.conn = None
        self.reconnect()

    def wait(self, timeout: float) -> bool:
        import psycopg

        if self.conn is None:
            time.sleep(timeout)  # the server is away: the caller's slow poll carries on
            self.reconnect()
            return False
        try:
            for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                return True
        except (psycopg.OperationalError, psycopg.InterfaceError):
            # The server went away; the caller's fallback poll carries on until it is back.
            time.sleep(timeout)
            self.reconnect()
        return False

    def reconnect(self) -> None:
        import psycopg

        self.close()
        try:
            self.conn = psycopg.connect(self.conninfo, autocommit=True, **self.connect_args)
            self.conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
