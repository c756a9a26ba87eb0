"""A running daemon's SQLite job table, read directly (a second reader, as WAL allows)."""

from __future__ import annotations

import sqlite3


def db_rows(daemon, query: str) -> list[tuple]:
    conn = sqlite3.connect(daemon.data_dir / "vlmguard.db", timeout=30)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def status_counts(daemon) -> dict[str, int]:
    return dict(db_rows(daemon, "SELECT status, count(*) FROM analysis_jobs GROUP BY status"))
