"""Rows that cannot be read (a value that does not decode, or out of range) are marked
once and skipped by every read from then on, so one bad row, written by hand, by a broken
peer on a shared queue or by an older bug, never stops a process.

The scan costs nothing until a read fails on a row: the `quarantining` decorator runs it
then and tries the read once more.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from sqlalchemy import Table, Text, case, func, select, update
from sqlalchemy import exc as sa_exc

from vlmguard.errors import first_line
from vlmguard.logs import get_logger
from vlmguard.store.database import Database
from vlmguard.store.records import delivery_problem, incident_problem, job_problem
from vlmguard.store.schema import deliveries, incidents, jobs

log = get_logger("vlmguard.store")

SCAN_BATCH = 256
# What a read of a row raises when a value cannot be decoded or is out of range.
ROW_ERRORS = (ValueError, TypeError, OverflowError, sa_exc.DataError)


def quarantining(method):
    """A read that meets an unreadable row quarantines it (and any other) and is tried
    once more (another process may have marked the row meanwhile); what still fails then
    was not a row's fault and is raised. For methods of a part holding `self.db`."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ROW_ERRORS as exc:
            Quarantine(self.db).quarantine_unreadable(first_line(exc))
        return method(self, *args, **kwargs)
    return wrapper


def scanned_tables():
    """(table, check, JSON columns that may be large) for each table rows are read from."""
    return ((jobs, job_problem, ("analysis_result",)),
            (incidents, incident_problem, ()),
            (deliveries, delivery_problem, ("payload",)))


class Quarantine:
    """Marking unreadable rows, and what has been marked."""

    def __init__(self, db: Database):
        self.db = db

    def quarantine_unreadable(self, hint: str = "") -> int:
        """Mark every row that cannot be read so that every read skips it from now on;
        log each once. Returns how many were marked."""
        marked = 0
        for table, check, documents in scanned_tables():
            bad = self.find_unreadable(table, check, documents)
            for row_id, reason in bad.items():
                with self.db.write() as conn:
                    done = conn.execute(update(table).where(table.c.id == row_id,
                                                            table.c.quarantine.is_(None))
                                        .values(quarantine=reason[:500])).rowcount
                if done:
                    marked += 1
                    log.error("unreadable row quarantined: skipped from now on",
                              table=table.name, row_id=row_id, reason=reason, cause=hint[:200])
        return marked

    def find_unreadable(self, table: Table, check, documents: Sequence[str]) -> dict[int, str]:
        with self.db.read() as conn:
            ids = list(conn.execute(select(table.c.id).where(table.c.quarantine.is_(None))
                                    .order_by(table.c.id)).scalars())
        bad: dict[int, str] = {}
        for start in range(0, len(ids), SCAN_BATCH):
            self.check_rows(table, check, documents, ids[start:start + SCAN_BATCH], bad)
        return bad

    def check_rows(self, table: Table, check, documents: Sequence[str], ids: list[int],
                   bad: dict[int, str]) -> None:
        """Read these rows as every reader does (the same column types) but for their
        large texts; a batch that fails to decode is halved until the row is found."""
        small = [c for c in table.c if c.name not in documents
                 and not isinstance(c.type, Text)]
        kinds = [self.json_kind(table.c[name]).label(f"kind_{name}") for name in documents]
        try:
            with self.db.read() as conn:
                rows = conn.execute(select(*small, *kinds).where(table.c.id.in_(ids))).all()
        except ROW_ERRORS as exc:
            if len(ids) == 1:
                bad[ids[0]] = f"unreadable: {first_line(exc)}"
                return
            half = len(ids) // 2
            self.check_rows(table, check, documents, ids[:half], bad)
            self.check_rows(table, check, documents, ids[half:], bad)
            return
        for row in rows:
            mapping = row._mapping
            problem = check(mapping) or next(
                (f"{name} is not a JSON object" for name in documents
                 if mapping[f"kind_{name}"] not in ("object", "null", None)), None)
            if problem:
                bad[row.id] = problem

    def json_kind(self, column):
        """The JSON type of a column's value in SQL ('object', 'null', ...; 'invalid' when
        SQLite holds text that is not JSON), so large documents are checked unread."""
        if self.db.is_sqlite:
            return case((column.is_(None), "null"),
                        (func.json_valid(column) == 1, func.json_type(column)),
                        else_="invalid")
        return func.json_typeof(column)

    def quarantined(self, limit: int = 5) -> dict[str, Any]:
        """{table: count} of quarantined rows, and the latest few with why."""
        counts: dict[str, int] = {}
        latest: list[dict[str, Any]] = []
        with self.db.read() as conn:
            for table, _check, _documents in scanned_tables():
                counts[table.name] = conn.execute(
                    select(func.count()).select_from(table)
                    .where(table.c.quarantine.is_not(None))).scalar_one()
                if counts[table.name]:
                    latest += [{"table": table.name, "id": row_id, "reason": reason}
                               for row_id, reason in conn.execute(
                                   select(table.c.id, table.c.quarantine)
                                   .where(table.c.quarantine.is_not(None))
                                   .order_by(table.c.id.desc()).limit(limit))]
        return {"rows": counts, "total": sum(counts.values()), "latest": latest[:limit]}
