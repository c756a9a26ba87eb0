"""Read-only questions about the job table for the status report, the API, the console,
the CLI and /metrics: jobs and their results (bounded), counts, tokens, durations,
answers per provider, merges and the alerts outbox's state per destination.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Text, case, cast, func, select
from sqlalchemy.engine import Connection

from vlmguard.store.database import Database
from vlmguard.store.quarantine import quarantining
from vlmguard.store.records import (MAX_RESULT_READ, Job, UnreadableRow, checked_time)
from vlmguard.store.schema import DELIVERY_OK, DELIVERY_STATES, JOB_LISTED, JOB_OK, STATES, \
    deliveries, jobs

DURATION_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1800)


class Reports:
    """Read-only queries; none of them writes."""

    def __init__(self, db: Database):
        self.db = db

    @quarantining
    def get(self, job_id: int) -> Job | None:
        """One job, its result read bounded (see bounded_results)."""
        with self.db.read() as conn:
            row = conn.execute(select(*JOB_LISTED).where(jobs.c.id == job_id, JOB_OK)).first()
            found = self.bounded_results(conn, [Job.from_row(row)]) if row else []
        return found[0] if found else None

    @quarantining
    def list_jobs(self, *, states: Sequence[str] = (), camera_id: str | None = None,
                  limit: int = 50, offset: int = 0, results: bool = True) -> list[Job]:
        """Newest first; with their results read bounded, or (results=False, what a page
        of the API asks) none at all (analysis_result None)."""
        query = (select(*JOB_LISTED).where(JOB_OK).order_by(jobs.c.id.desc())
                 .limit(limit).offset(offset))
        if states:
            query = query.where(jobs.c.status.in_(states))
        if camera_id:
            query = query.where(jobs.c.camera_id == camera_id)
        with self.db.read() as conn:
            found = [Job.from_row(row) for row in conn.execute(query)]
            return self.bounded_results(conn, found) if results else found

    @staticmethod
    def bounded_results(conn: Connection, found: list[Job]) -> list[Job]:
        """The jobs with their results, each read only when it is at most MAX_RESULT_READ
        characters of JSON ({"truncated": true, "chars": N} stands in for a longer one)."""
        if not found:
            return found
        size = func.length(cast(jobs.c.analysis_result, Text))
        ids = [job.id for job in found]
        sizes = dict(conn.execute(select(jobs.c.id, size).where(jobs.c.id.in_(ids))).all())
        small = [i for i in ids if (sizes.get(i) or 0) <= MAX_RESULT_READ]
        results = dict(conn.execute(select(jobs.c.id, jobs.c.analysis_result)
                                    .where(jobs.c.id.in_(small))).all()) if small else {}
        out = []
        for job in found:
            result = (results.get(job.id) if job.id in results
                      else {"truncated": True, "chars": sizes.get(job.id)})
            if not isinstance(result, (dict, type(None))):
                raise UnreadableRow(f"job {job.id}: analysis_result is not an object")
            out.append(replace(job, analysis_result=result))
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """{camera_id: {state: n}} with every state present."""
        query = select(jobs.c.camera_id, jobs.c.status, func.count()).where(JOB_OK).group_by(
            jobs.c.camera_id, jobs.c.status)
        out: dict[str, dict[str, int]] = {}
        with self.db.read() as conn:
            for camera_id, status, n in conn.execute(query):
                out.setdefault(camera_id, dict.fromkeys(STATES, 0))[status] = n
        return out

    def count_jobs(self, *, states: Sequence[str] = (), camera_id: str | None = None) -> int:
        query = select(func.count()).select_from(jobs).where(JOB_OK)
        if states:
            query = query.where(jobs.c.status.in_(states))
        if camera_id:
            query = query.where(jobs.c.camera_id == camera_id)
        with self.db.read() as conn:
            return conn.execute(query).scalar_one()

    def token_usage(self, since: datetime | None = None,
                    by: str = "camera_id") -> dict[str, dict[str, int]]:
        """{camera_id (or provider, by="provider"): {prompt, output, thoughts, total}} over
        jobs completed since (or ever)."""
        key = jobs.c[by]
        query = select(key, func.coalesce(func.sum(jobs.c.prompt_tokens), 0),
                       func.coalesce(func.sum(jobs.c.output_tokens), 0),
                       func.coalesce(func.sum(jobs.c.thoughts_tokens), 0),
                       func.coalesce(func.sum(jobs.c.total_tokens), 0)).group_by(key)
        query = query.where(jobs.c.status == "completed", JOB_OK, key.is_not(None))
        if since:
            query = query.where(jobs.c.completed_at >= since)
        with self.db.read() as conn:
            return {camera: {"prompt": int(p), "output": int(o), "thoughts": int(th),
                             "total": int(t)}
                    for camera, p, o, th, t in conn.execute(query)}

    def duration_histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """Cumulative (le, count) buckets, count and sum of completed analyses' seconds."""
        seconds = jobs.c.analysis_seconds
        columns = [func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0)
                   for bound in DURATION_BUCKETS]
        query = select(*columns, func.count(seconds), func.coalesce(func.sum(seconds), 0.0))
        with self.db.read() as conn:
            row = conn.execute(query.where(seconds.is_not(None), JOB_OK)).one()
        buckets = [(float(b), int(n)) for b, n in zip(DURATION_BUCKETS, row)]
        return buckets, int(row[-2]), float(row[-1])

    @quarantining
    def oldest_pending(self) -> datetime | None:
        with self.db.read() as conn:
            return checked_time(conn.execute(select(func.min(jobs.c.created_at))
                                .where(jobs.c.status == "pending", JOB_OK)).scalar())

    @quarantining
    def recent_failures(self, limit: int = 5) -> list[Job]:
        query = (select(*JOB_LISTED).where(jobs.c.status == "failed", JOB_OK)
                 .order_by(jobs.c.completed_at.desc(), jobs.c.id.desc()).limit(limit))
        with self.db.read() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]


    def answers_by_provider(self) -> dict[str, dict[str, Any]]:
        """{provider: {answered, tokens, models}} over completed jobs that made a request."""
        query = (select(jobs.c.provider, jobs.c.model, func.count(),
                        func.coalesce(func.sum(jobs.c.total_tokens), 0))
                 .where(jobs.c.status == "completed", jobs.c.provider.is_not(None), JOB_OK)
                 .group_by(jobs.c.provider, jobs.c.model))
        out: dict[str, dict[str, Any]] = {}
        with self.db.read() as conn:
            for provider, model, n, tokens in conn.execute(query):
                entry = out.setdefault(provider, {"answered": 0, "tokens": 0, "models": []})
                entry["answered"] += int(n)
                entry["tokens"] += int(tokens)
                entry["models"].append(model)
        return out

    def merge_counts(self) -> dict[str, int]:
        """{camera_id: windows folded into merged jobs because analysis lagged}."""
        query = (select(jobs.c.camera_id, func.sum(jobs.c.windows - 1))
                 .where(jobs.c.kind == "merged", JOB_OK).group_by(jobs.c.camera_id))
        with self.db.read() as conn:
            return {camera: int(n or 0) for camera, n in conn.execute(query)}

    @quarantining
    def delivery_counts(self) -> dict[str, dict[str, Any]]:
        """{destination: {pending, delivered, failed, suppressed, last_error, last_error_at}}."""
        out: dict[str, dict[str, Any]] = {}
        query = (select(deliveries.c.destination, deliveries.c.status, func.count())
                 .where(DELIVERY_OK).group_by(deliveries.c.destination, deliveries.c.status))
        with self.db.read() as conn:
            for destination, status, n in conn.execute(query):
                entry = out.setdefault(destination, dict.fromkeys(DELIVERY_STATES, 0)
                                       | {"last_error": None, "last_error_at": None})
                entry[status] = int(n)
            latest = (select(deliveries.c.destination, func.max(deliveries.c.last_error_at)
                             .label("at"))
                      .where(deliveries.c.last_error_at.is_not(None), DELIVERY_OK,
                             deliveries.c.status != "suppressed")
                      .group_by(deliveries.c.destination).subquery())
            errors = conn.execute(
                select(deliveries.c.destination, deliveries.c.last_error,
                       deliveries.c.last_error_at)
                .join(latest, (latest.c.destination == deliveries.c.destination)
                      & (latest.c.at == deliveries.c.last_error_at)).where(DELIVERY_OK))
            for destination, error, at in errors:
                if destination in out:
                    out[destination].update(last_error=error, last_error_at=at)
        return out

    def list_deliveries(self, *, incident_id: int | None = None,
                        statuses: Sequence[str] = ()) -> list[dict[str, Any]]:
        query = select(deliveries).where(DELIVERY_OK).order_by(deliveries.c.id)
        if incident_id is not None:
            query = query.where(deliveries.c.incident_id == incident_id)
        if statuses:
            query = query.where(deliveries.c.status.in_(statuses))
        with self.db.read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]
