"""Incidents as people see them: found, counted, one with its archive, acknowledged;
and the event feed's cursor over new incidents, acknowledgements and failed jobs.
Incidents are stored by JobQueue.complete, in the transaction that stores the result.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import func, select, update

from vlmguard.store.database import Database
from vlmguard.store.quarantine import quarantining
from vlmguard.store.records import (Job, UnreadableRow, checked_time, first_problem, id_problem,
                                    incident_dict, time_problem, utcnow)
from vlmguard.store.schema import INCIDENT_OK, INCIDENT_READ, JOB_LISTED, JOB_OK, incidents, jobs


class Incidents:
    """The incidents table, read and acknowledged."""

    def __init__(self, db: Database):
        self.db = db

    @quarantining
    def list_incidents(self, job_id: int) -> list[dict[str, Any]]:
        """A job's incidents, descriptions read up to MAX_TEXT_READ characters."""
        query = (select(*INCIDENT_READ).where(incidents.c.job_id == job_id, INCIDENT_OK)
                 .order_by(incidents.c.start_at))
        with self.db.read() as conn:
            return [incident_dict(row) for row in conn.execute(query)]

    @quarantining
    def find_incidents(self, *, camera_id: str | None = None, since: datetime | None = None,
                       until: datetime | None = None, severities: Sequence[str] = (),
                       categories: Sequence[str] = (), limit: int = 50,
                       offset: int = 0) -> list[dict[str, Any]]:
        """Incidents newest first, optionally of one camera, in a time range, of some
        severities or categories; each with its archive's kept_at."""
        query = (incident_query(camera_id, since, until, severities, categories)
                 .order_by(incidents.c.start_at.desc(), incidents.c.id.desc())
                 .limit(limit).offset(offset))
        with self.db.read() as conn:
            return [incident_dict(row) for row in conn.execute(query)]

    def count_incidents(self, *, camera_id: str | None = None, since: datetime | None = None,
                        until: datetime | None = None, severities: Sequence[str] = (),
                        categories: Sequence[str] = ()) -> int:
        inner = incident_query(camera_id, since, until, severities, categories).subquery()
        with self.db.read() as conn:
            return conn.execute(select(func.count()).select_from(inner)).scalar_one()

    def incident_categories(self) -> list[str]:
        with self.db.read() as conn:
            return list(conn.execute(select(incidents.c.category).where(INCIDENT_OK).distinct()
                                     .order_by(incidents.c.category)).scalars())

    @quarantining
    def get_incident(self, incident_id: int) -> dict[str, Any] | None:
        """One incident with its archive (video_path, segment_start/end, kept_at)."""
        query = (select(*INCIDENT_READ, jobs.c.kept_at, jobs.c.video_path, jobs.c.segment_start,
                        jobs.c.segment_end, jobs.c.worker_id)
                 .join(jobs, jobs.c.id == incidents.c.job_id)
                 .where(incidents.c.id == incident_id, INCIDENT_OK, JOB_OK))
        with self.db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        found = incident_dict(row)
        problem = first_problem(time_problem("segment_start", found["segment_start"], True),
                                time_problem("segment_end", found["segment_end"], True))
        if problem:
            raise UnreadableRow(f"job {found['job_id']}: {problem}")
        return found

    def acknowledge(self, incident_id: int, note: str | None) -> datetime | None:
        """Mark an incident seen (again: the note is replaced); its time, None if no such."""
        now = utcnow()
        with self.db.write() as conn:
            changed = conn.execute(update(incidents).where(incidents.c.id == incident_id,
                                                           INCIDENT_OK)
                                   .values(acknowledged_at=now, ack_note=note or None)).rowcount
        return now if changed else None

    @quarantining
    def event_cursor(self) -> tuple[int, datetime | None, datetime | None]:
        """Where the event feed starts: the newest incident id, acknowledgement and failure."""
        with self.db.read() as conn:
            last_id = conn.execute(select(func.max(incidents.c.id)).where(INCIDENT_OK)).scalar() or 0
            acked = conn.execute(select(func.max(incidents.c.acknowledged_at))
                                 .where(INCIDENT_OK)).scalar()
            failed = conn.execute(select(func.max(jobs.c.completed_at))
                                  .where(jobs.c.status == "failed", JOB_OK)).scalar()
        if id_problem("id", last_id, required=False) and last_id != 0:
            raise UnreadableRow(f"incident id out of range ({last_id})")
        return last_id, checked_time(acked), checked_time(failed)

    @quarantining
    def changes_since(self, last_id: int, acked: datetime | None, failed: datetime | None,
                      limit: int = 100) -> dict[str, list]:
        """Incidents stored and acknowledged, and jobs failed, after the cursor's marks."""
        with self.db.read() as conn:
            stored = conn.execute(select(*INCIDENT_READ).where(incidents.c.id > last_id, INCIDENT_OK)
                                  .order_by(incidents.c.id).limit(limit)).all()
            ack_query = select(*INCIDENT_READ).where(incidents.c.acknowledged_at.is_not(None),
                                                     INCIDENT_OK)
            if acked is not None:
                ack_query = ack_query.where(incidents.c.acknowledged_at > acked)
            acknowledged = conn.execute(ack_query.order_by(incidents.c.acknowledged_at)
                                        .limit(limit)).all()
            fail_query = select(*JOB_LISTED).where(jobs.c.status == "failed", JOB_OK)
            if failed is not None:
                fail_query = fail_query.where(jobs.c.completed_at > failed)
            failures = conn.execute(fail_query.order_by(jobs.c.completed_at).limit(limit)).all()
        return {"stored": [incident_dict(r) for r in stored],
                "acknowledged": [incident_dict(r) for r in acknowledged],
                "failed": [Job.from_row(r) for r in failures]}


def incident_query(camera_id: str | None, since: datetime | None, until: datetime | None,
                   severities: Sequence[str], categories: Sequence[str]):
    query = (select(*INCIDENT_READ, jobs.c.kept_at).join(jobs, jobs.c.id == incidents.c.job_id)
             .where(INCIDENT_OK))
    if camera_id:
        query = query.where(incidents.c.camera_id == camera_id)
    if since:
        query = query.where(incidents.c.start_at >= since)
    if until:
        query = query.where(incidents.c.start_at < until)
    if severities:
        query = query.where(incidents.c.severity.in_(severities))
    if categories:
        query = query.where(incidents.c.category.in_(categories))
    return query
