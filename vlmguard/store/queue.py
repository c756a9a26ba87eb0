"""The job queue: what the archiver registers and the analyzers claim, keep, complete,
fail or hand back; windows merged when analysis lags; the lag itself.

A claim never hands one job to two workers (UPDATE ... WHERE id = (SELECT ... FOR UPDATE
SKIP LOCKED) on PostgreSQL; SQLite's single writer serialises claims). A job is changed
only by the holder of its lease (lease_token); the lease runs out when its worker stops
heartbeating, and the job is then rescued by whoever looks next.
"""

from __future__ import annotations

import random
import secrets
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection

from vlmguard.errors import LeaseLost
from vlmguard.store.database import Database
from vlmguard.store.quarantine import quarantining
from vlmguard.store.records import (IncidentRecord, Job, Outcome, bounded_outcome, checked_time,
                                    utcnow)
from vlmguard.store.schema import (CATCH_UP_PRIORITY, INCIDENT_OK, JOB_OK, LIVE_PRIORITY,
                                   incidents, jobs)

MAX_BACKOFF_SECONDS = 3600.0
# Called inside complete()'s transaction with (conn, job, stored outcome): the outbox's
# enqueue_deliveries, so that alerts are written with the incidents or not at all.
AlongsideComplete = Callable[[Connection, Job, Outcome], None]

# The hot statements are built once: constructing Core statements per call cost more than
# the SQLite commit itself. Their SET columns come from the parameters passed at execute.
CLAIM = (update(jobs)
         .where(jobs.c.id == select(jobs.c.id)
                .where(jobs.c.status == "pending", jobs.c.run_after <= bindparam("b_now"),
                       JOB_OK)
                .order_by(jobs.c.priority, jobs.c.run_after, jobs.c.id).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery(),
                jobs.c.status == "pending")
         .returning(*jobs.c))
OWNED_UPDATE = update(jobs).where(jobs.c.id == bindparam("b_id"), jobs.c.status == "processing",
                                  jobs.c.lease_token == bindparam("b_token"))


def backoff_seconds(retry_count: int, base: float, rng: random.Random | None = None) -> float:
    """Delay before attempt retry_count+1: base * 2^(retry_count-1), capped, +-20% jitter."""
    rng = rng or random
    delay = min(base * 2 ** max(retry_count - 1, 0), MAX_BACKOFF_SECONDS)
    return delay * rng.uniform(0.8, 1.2)


class JobQueue:
    """The analysis job queue on one Database."""

    def __init__(self, db: Database, *, lease_seconds: float = 60,
                 retry_backoff: float = 10.0, poll_seconds: float = 5.0,
                 alongside_complete: AlongsideComplete | None = None,
                 node: str | None = None):
        self.db = db
        # The box this queue's jobs are registered on (their footage is on its disk).
        self.node = node
        self.lease_seconds = lease_seconds
        self.retry_backoff = retry_backoff
        self.poll_seconds = poll_seconds
        self.alongside_complete = alongside_complete
        self._register = (db.insert(jobs)
                          .on_conflict_do_nothing(index_elements=["camera_id", "segment_start"])
                          .returning(jobs.c.id))

    @classmethod
    def from_config(cls, db: Database, config, **kwargs) -> "JobQueue":
        return cls(db, lease_seconds=config.analysis.lease_seconds,
                   retry_backoff=config.analysis.retry_backoff_seconds,
                   poll_seconds=config.analysis.poll_seconds, node=config.node_name, **kwargs)

    # -- producing -----------------------------------------------------------------------

    def register(self, camera_id: str, video_path: str | Path, segment_start: datetime,
                 segment_end: datetime, *, max_retries: int = 3, kind: str = "archive",
                 clip_start: datetime | None = None, sources: list | None = None) -> int | None:
        """Add a job for a finished archive or window; None when already registered."""
        now = utcnow()
        values = dict(camera_id=camera_id, video_path=str(video_path), segment_start=segment_start,
                      segment_end=segment_end, status="pending", created_at=now, run_after=now,
                      retry_count=0, max_retries=max_retries, kind=kind, clip_start=clip_start,
                      sources=sources, windows=1, node=self.node,
                      priority=CATCH_UP_PRIORITY if kind == "catchup" else LIVE_PRIORITY)
        with self.db.write() as conn:
            job_id = conn.execute(self._register, values).scalar()
            if job_id is not None:
                self.db.notify(conn)
        return job_id

    # -- consuming -----------------------------------------------------------------------

    @quarantining
    def claim(self, worker_id: str) -> Job | None:
        """Take the next due job for this worker, or None. Never hands one job to two."""
        now = utcnow()
        values = dict(b_now=now, status="processing", worker_id=worker_id, started_at=now,
                      lease_token=secrets.token_hex(16),
                      lease_expires_at=now + timedelta(seconds=self.lease_seconds))
        with self.db.write() as conn:
            row = conn.execute(CLAIM, values).first()
        return Job.from_row(row) if row else None

    def heartbeat(self, job: Job) -> None:
        """Extend the lease; raises LeaseLost when the job is no longer this worker's."""
        expires = utcnow() + timedelta(seconds=self.lease_seconds)
        with self.db.write() as conn:
            self._owned_update(conn, job, lease_expires_at=expires)

    def complete(self, job: Job, outcome: Outcome) -> list[int | None]:
        """Store the result and its incidents in one transaction, only as the lease holder.
        Text is stored sanitised and bounded (bounded_outcome), whatever the caller hands in.
        Returns, for each incident stored (at most MAX_INCIDENTS, in the outcome's order),
        its new row's id, or None where it extended an earlier incident instead."""
        now = utcnow()
        outcome = bounded_outcome(outcome)
        with self.db.write() as conn:
            self._owned_update(
                conn, job, status="completed", completed_at=now,
                analysis_seconds=(now - job.started_at).total_seconds() if job.started_at else None,
                analysis_result=outcome.result, safety_score=outcome.safety_score,
                incident_count=len(outcome.incidents), error_message=None,
                prompt_tokens=outcome.prompt_tokens, output_tokens=outcome.output_tokens,
                total_tokens=outcome.total_tokens, thoughts_tokens=outcome.thoughts_tokens,
                model_version=outcome.model_version, provider=outcome.provider,
                model=outcome.model, lease_token=None, lease_expires_at=None)
            extended = [self._extend_incident(conn, job, i, outcome.merge_within_s)
                        for i in outcome.incidents]
            fresh = [i for i, merged in zip(outcome.incidents, extended) if not merged]
            ids = iter(self._insert_incidents(conn, job, fresh))
            if self.alongside_complete is not None:
                self.alongside_complete(conn, job, outcome)
        return [None if merged else next(ids) for merged in extended]

    @staticmethod
    def _insert_incidents(conn: Connection, job: Job,
                          fresh: Sequence[IncidentRecord]) -> list[int]:
        """The new incident rows' ids, in the order given."""
        if not fresh:
            return []
        return list(conn.execute(
            incidents.insert().returning(incidents.c.id, sort_by_parameter_order=True), [
                {"job_id": job.id, "camera_id": job.camera_id, "start_at": i.start_at,
                 "end_at": i.end_at, "category": i.category, "severity": i.severity,
                 "description": i.description, "confidence": i.confidence}
                for i in fresh]).scalars())

    def _extend_incident(self, conn: Connection, job: Job, incident: IncidentRecord,
                         within: float | None) -> bool:
        """An event cut by a window edge is one incident: extend the stored incident of
        this camera and category (another job's) whose times touch this one's, keeping its
        id; True when one was extended."""
        if within is None:
            return False
        slack = timedelta(seconds=within)
        row = conn.execute(
            select(incidents.c.id, incidents.c.start_at, incidents.c.end_at)
            .where(incidents.c.camera_id == job.camera_id, INCIDENT_OK,
                   incidents.c.category == incident.category,
                   incidents.c.job_id != job.id,
                   incidents.c.end_at >= incident.start_at - slack,
                   incidents.c.start_at <= incident.end_at + slack)
            .order_by(incidents.c.end_at.desc()).limit(1).with_for_update()).first()
        if row is None:
            return False
        conn.execute(update(incidents).where(incidents.c.id == row.id).values(
            start_at=min(row.start_at, incident.start_at),
            end_at=max(row.end_at, incident.end_at)))
        return True

    def fail(self, job: Job, error: str, *, permanent: bool = False,
             retry_after: float | None = None) -> str:
        """Record a failed attempt; returns the job's new status (pending or failed)."""
        now = utcnow()
        retries = job.retry_count + 1
        if permanent or job.retry_count >= job.max_retries:
            changes = dict(status="failed", completed_at=now)
        else:
            delay = max(backoff_seconds(retries, self.retry_backoff), retry_after or 0)
            changes = dict(status="pending", run_after=now + timedelta(seconds=delay))
        with self.db.write() as conn:
            self._owned_update(conn, job, retry_count=retries, error_message=error[:2000],
                               lease_token=None, lease_expires_at=None, **changes)
            if changes["status"] == "pending":
                self.db.notify(conn)
        return changes["status"]

    def release(self, job: Job) -> None:
        """Hand a job back untouched (an orderly stop): pending again, no attempt counted."""
        with self.db.write() as conn:
            self._owned_update(conn, job, status="pending", run_after=utcnow(),
                               started_at=None, lease_token=None, lease_expires_at=None)
            self.db.notify(conn)

    def defer(self, job: Job, until: datetime | None = None) -> None:
        """Put a job back unharmed because the account, not the job, is in trouble:
        pending again (from until), no attempt counted."""
        with self.db.write() as conn:
            self._owned_update(conn, job, status="pending", run_after=until or utcnow(),
                               started_at=None, lease_token=None, lease_expires_at=None)

    def _owned_update(self, conn: Connection, job: Job, **values: Any) -> None:
        params = {"b_id": job.id, "b_token": job.lease_token, **values}
        if conn.execute(OWNED_UPDATE, params).rowcount != 1:
            raise LeaseLost(f"job {job.id}: lease {job.lease_token} is no longer held")

    def rescue_expired(self) -> int:
        """Put jobs whose lease ran out back to pending (or failed), counting the attempt."""
        now = utcnow()
        expired = (jobs.c.status == "processing", jobs.c.lease_expires_at < now, JOB_OK)
        with self.db.read() as conn:
            if conn.execute(select(jobs.c.id).where(*expired).limit(1)).first() is None:
                return 0
        message = func.coalesce("lease expired: worker " + jobs.c.worker_id
                                + " stopped heartbeating", "lease expired")
        cleared = dict(retry_count=jobs.c.retry_count + 1, error_message=message,
                       lease_token=None, lease_expires_at=None)
        with self.db.write() as conn:
            retried = conn.execute(update(jobs).where(*expired, jobs.c.retry_count < jobs.c.max_retries)
                                   .values(status="pending", run_after=now, **cleared)).rowcount
            given_up = conn.execute(update(jobs).where(*expired)
                                    .values(status="failed", completed_at=now, **cleared)).rowcount
            if retried:
                self.db.notify(conn)
        return retried + given_up

    def next_job(self, worker_id: str, timeout: float) -> Job | None:
        """Claim a job, waiting up to timeout for one; idle waiting never writes."""
        deadline = time.monotonic() + timeout
        while True:
            self.rescue_expired()
            wait = self.seconds_until_due()
            if wait == 0:
                job = self.claim(worker_id)
                if job is not None:
                    return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.db.wait_for_commit(min(remaining, self.poll_seconds, wait or self.poll_seconds))

    @quarantining
    def seconds_until_due(self) -> float | None:
        """0 when a pending job is due now, seconds until the next one is, None if none."""
        with self.db.read() as conn:
            due = checked_time(conn.execute(select(func.min(jobs.c.run_after))
                                            .where(jobs.c.status == "pending", JOB_OK)).scalar())
        if due is None:
            return None
        return max((due - utcnow()).total_seconds(), 0.0)

    # -- windows, lag and catch-up -----------------------------------------------------------

    @quarantining
    def job_spans(self, camera_id: str, *, in_flight: bool = False,
                  since: datetime | None = None) -> list[tuple[datetime, datetime]]:
        """(segment_start, segment_end) of the camera's jobs (in_flight: pending or
        processing only), oldest first: what footage is or will be analysed."""
        query = (select(jobs.c.segment_start, jobs.c.segment_end)
                 .where(jobs.c.camera_id == camera_id, JOB_OK).order_by(jobs.c.segment_start))
        if in_flight:
            query = query.where(jobs.c.status.in_(("pending", "processing")))
        if since is not None:
            query = query.where(jobs.c.segment_end > since)
        with self.db.read() as conn:
            spans = [(a, b) for a, b in conn.execute(query)]
        for a, b in spans:
            checked_time(a), checked_time(b)
        return spans

    @quarantining
    def lag_seconds(self, now: datetime | None = None) -> dict[str, float]:
        """{camera_id: now minus the end of its oldest unanalysed footage} for every camera
        with pending or processing jobs."""
        now = now or utcnow()
        query = (select(jobs.c.camera_id, func.min(jobs.c.segment_end))
                 .where(jobs.c.status.in_(("pending", "processing")), JOB_OK)
                 .group_by(jobs.c.camera_id))
        with self.db.read() as conn:
            return {camera: max((now - checked_time(end)).total_seconds(), 0.0)
                    for camera, end in conn.execute(query)}

    @quarantining
    def pending_windows(self, camera_id: str) -> list[Job]:
        """The camera's live windows (and merged ones) not yet claimed, oldest first."""
        query = (select(jobs).where(jobs.c.camera_id == camera_id, jobs.c.status == "pending",
                                    jobs.c.kind.in_(("window", "merged")), JOB_OK)
                 .order_by(jobs.c.segment_start))
        with self.db.read() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]

    def merge_jobs(self, keep: Job, absorbed: Sequence[Job], video_path: str,
                   sources: list | None) -> bool:
        """Fold pending jobs into keep, which then covers them all (one request for the
        same frames); False, with nothing changed, when any of them was claimed meanwhile."""
        ids = [keep.id, *(j.id for j in absorbed)]
        end = max(j.segment_end for j in (keep, *absorbed))
        windows = keep.windows + sum(j.windows for j in absorbed)
        with self.db.write() as conn:
            still = conn.execute(select(func.count()).select_from(
                select(jobs.c.id).where(jobs.c.id.in_(ids), jobs.c.status == "pending")
                .with_for_update().subquery())).scalar_one()
            if still != len(ids):
                return False
            conn.execute(jobs.delete().where(jobs.c.id.in_(ids[1:])))
            conn.execute(update(jobs).where(jobs.c.id == keep.id).values(
                segment_end=end, video_path=video_path, sources=sources, kind="merged",
                windows=windows))
        return True

    # -- by hand ----------------------------------------------------------------------------

    def retry(self, job_id: int) -> bool:
        """Send a failed job round again with a fresh retry budget; False if it isn't failed."""
        with self.db.write() as conn:
            changed = conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.status == "failed", JOB_OK)
                .values(status="pending", retry_count=0, run_after=utcnow(), completed_at=None,
                        worker_id=None)).rowcount
            if changed:
                self.db.notify(conn)
        return bool(changed)

    @quarantining
    def last_model_request(self, camera_id: str) -> datetime | None:
        """The start of the camera's newest clip that was sent to a model."""
        with self.db.read() as conn:
            return checked_time(conn.execute(select(func.max(jobs.c.segment_start))
                                .where(jobs.c.camera_id == camera_id, JOB_OK,
                                       jobs.c.status == "completed",
                                       jobs.c.provider.is_not(None))).scalar())
