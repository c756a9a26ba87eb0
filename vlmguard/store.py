"""The job table: every SQL statement vlmguard runs lives in this module.

One class, JobStore, speaks to SQLite (WAL, the embedded default) and PostgreSQL through
the same SQLAlchemy Core statements. The two engines differ only in how a transaction
starts (SQLite: BEGIN IMMEDIATE, so a read-then-write never fails busy), in how an idle
worker hears about new work (SQLite: PRAGMA data_version; PostgreSQL: LISTEN/NOTIFY), and
in locking (FOR UPDATE SKIP LOCKED on PostgreSQL, dropped by SQLAlchemy on SQLite where
the single writer already serialises claims).

Create a JobStore in the process that uses it, never before a fork.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from sqlalchemy import (JSON, CheckConstraint, Column, DateTime, Float, ForeignKey, Index,
                        Integer, MetaData, String, Table, Text, UniqueConstraint, bindparam,
                        case, cast, create_engine, event, func, inspect, null, or_, select,
                        text, update)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.types import TypeDecorator

from vlmguard.errors import DatabaseError, DatabaseUnreachable, LeaseLost, UnusableDatabase
from vlmguard.logs import get_logger
from vlmguard.redact import mask_url

log = get_logger("vlmguard.store")

SCHEMA_VERSION = 8
STATES = ("pending", "processing", "completed", "failed")
# What a job covers: a whole archive file (window_seconds = 0), one live window, windows
# merged because analysis lagged, or footage found unanalysed (catch-up, after live work).
KINDS = ("archive", "window", "merged", "catchup")
LIVE_PRIORITY, CATCH_UP_PRIORITY = 0, 1
NOTIFY_CHANNEL = "vlmguard_jobs"
MAX_BACKOFF_SECONDS = 3600.0
SQLITE_BUSY_MS = 30_000
SQLITE_WATCH_INTERVAL = 0.02
# PostgreSQL: how long a connection attempt may take, and how soon a peer that stopped
# answering mid-query is given up on (TCP keepalives), so that no process hangs on a
# network cut; libpq's own defaults wait for ever, or for the kernel's two hours.
PG_CONNECT_ARGS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10,
                   "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 20_000}

# What is read back is range-checked where it is read: a row outside these bounds (written
# by hand, by a broken peer on a shared queue, or by an older bug) is quarantined, never
# handed on. Times: an edge box without a real-time clock may start at the epoch; past
# year 9000 leaves room for any arithmetic on them. Ids: what a JSON reader (the console)
# holds exactly.
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc)
MAX_ROW_ID = 2**53 - 1
MAX_COUNT = 10**9
MAX_OFFSET_SECONDS = 10**7
SCAN_BATCH = 256
# Bounds on what is stored (whatever the analyzers hand over) and on what one read may
# bring back: a description is stored up to MAX_DESCRIPTION characters, read for a page or
# an event up to MAX_TEXT_READ; a job's result is served up to MAX_RESULT_READ characters.
MAX_DESCRIPTION = 4000
MAX_SUMMARY = 4000
MAX_INCIDENTS = 100
MAX_TEXT_READ = 8000
MAX_RESULT_READ = 262_144
TRUNCATED = " [truncated]"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in the database, identical on both engines."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None else None


metadata = MetaData()
MAX_ID = 2**31 - 1  # every id column is Integer: 32-bit on PostgreSQL, so no row has a larger id

jobs = Table(
    "analysis_jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("camera_id", String(50), nullable=False),
    Column("video_path", String(1000), nullable=False),
    Column("segment_start", UTCDateTime, nullable=False),
    Column("segment_end", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False, default="pending"),
    Column("analysis_result", JSON),
    Column("safety_score", Integer),
    Column("incident_count", Integer),
    Column("error_message", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("completed_at", UTCDateTime),
    Column("retry_count", Integer, nullable=False, default=0),
    Column("max_retries", Integer, nullable=False, default=3),
    Column("worker_id", String(100)),
    Column("run_after", UTCDateTime, nullable=False),
    Column("lease_token", String(32)),
    Column("lease_expires_at", UTCDateTime),
    Column("prompt_tokens", Integer),
    Column("output_tokens", Integer),
    Column("total_tokens", Integer),
    Column("analysis_seconds", Float),
    Column("model_version", String(100)),
    Column("thoughts_tokens", Integer),
    # Which provider and configured model answered; both NULL when no request was made
    # (a static clip stored as "no activity").
    Column("provider", String(50)),
    Column("model", String(100)),
    # Near-live analysis (schema 5). clip_start: the wall-clock time of the clip's first
    # frame (NULL: segment_start); sources: the archive files and offsets the job covers,
    # [{"path", "offset_s", "duration_s"}], so an incident maps to a file and a position;
    # windows: how many windows a merged job took in. Lower priority is claimed first.
    Column("kind", String(16), nullable=False, default="archive", server_default="archive"),
    Column("clip_start", UTCDateTime),
    Column("sources", JSON),
    Column("priority", Integer, nullable=False, default=0, server_default="0"),
    Column("windows", Integer, nullable=False, default=1, server_default="1"),
    # Set while a person keeps the archive: retention leaves it alone until released.
    Column("kept_at", UTCDateTime),
    # Why the row cannot be read (NULL: it can): a quarantined row is skipped everywhere.
    Column("quarantine", Text),
    UniqueConstraint("camera_id", "segment_start", name="uq_jobs_camera_segment"),
    CheckConstraint("status IN ('pending', 'processing', 'completed', 'failed')",
                    name="ck_jobs_status"),
    Index("ix_jobs_status_run_after", "status", "run_after"),
    # The claim's order: live windows before catch-up, then the oldest due.
    Index("ix_jobs_status_priority_run_after", "status", "priority", "run_after"),
    Index("ix_jobs_camera_status", "camera_id", "status"),
    Index("ix_jobs_segment_start", "segment_start"),
)

incidents = Table(
    "incidents", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("analysis_jobs.id", ondelete="CASCADE"), nullable=False),
    Column("camera_id", String(50), nullable=False),
    Column("start_at", UTCDateTime, nullable=False),
    Column("end_at", UTCDateTime, nullable=False),
    Column("category", String(100), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("description", Text, nullable=False),
    Column("confidence", Float),
    Column("acknowledged_at", UTCDateTime),
    Column("ack_note", Text),
    Column("quarantine", Text),
    Index("ix_incidents_camera_start", "camera_id", "start_at"),
    Index("ix_incidents_start", "start_at"),
    Index("ix_incidents_job", "job_id"),
)

# One row per model provider: an account-wide pause (bad key, daily quota, retired model)
# and a shared rate-limit wait, seen by every analyzer on every box; and its failed
# requests (down, timed out, 5xx), which a fallback to the next provider leaves nowhere
# else.
pauses = Table(
    "provider_pauses", metadata,
    Column("provider", String(50), primary_key=True),
    Column("reason", String(50)),
    Column("detail", Text),
    Column("paused_at", UTCDateTime),
    Column("probe_at", UTCDateTime),
    Column("not_before", UTCDateTime),
    Column("failures", Integer, nullable=False, default=0, server_default="0"),
    Column("last_error", Text),
    Column("last_error_at", UTCDateTime),
)

# -- alerts outbox (issue 14, schema step 6) ---------------------------------------------
# One row per (incident or analysed window, destination), written in the transaction that
# stores the incident: the notifier sends each at least once (the transactional outbox).
DELIVERY_STATES = ("pending", "delivered", "failed", "suppressed")
deliveries = Table(
    "alert_deliveries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # The Idempotency-Key: random, so two databases (or a reset one) never reuse one.
    Column("key", String(32), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # incident, safety_score
    Column("destination", String(120), nullable=False),
    Column("rule", String(50)),
    Column("camera_id", String(50), nullable=False),
    Column("category", String(100)),
    Column("incident_id", Integer, ForeignKey("incidents.id", ondelete="CASCADE")),
    Column("job_id", Integer, ForeignKey("analysis_jobs.id", ondelete="CASCADE")),
    Column("incident_at", UTCDateTime),
    Column("status", String(16), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("claimed_by", String(100)),
    Column("delivered_at", UTCDateTime),
    Column("last_error", Text),
    Column("last_error_at", UTCDateTime),
    Column("quarantine", Text),
    CheckConstraint("status IN ('pending', 'delivered', 'failed', 'suppressed')",
                    name="ck_deliveries_status"),
    Index("ix_deliveries_status_due", "status", "next_attempt_at"),
    Index("ix_deliveries_incident", "incident_id"),
    Index("ix_deliveries_cooldown", "rule", "camera_id", "category", "incident_at"),
)

meta_table = Table(
    "vlmguard_meta", metadata,
    Column("key", String(50), primary_key=True),
    Column("value", String(200), nullable=False),
)

# Statements that bring a database stamped with version N-1 up to N.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE analysis_jobs ADD COLUMN analysis_seconds FLOAT",),
    # provider_pauses is new in 3: create_all makes it before the migration runs.
    3: ("ALTER TABLE analysis_jobs ADD COLUMN model_version VARCHAR(100)",
        "ALTER TABLE analysis_jobs ADD COLUMN thoughts_tokens INTEGER"),
    4: ("ALTER TABLE analysis_jobs ADD COLUMN provider VARCHAR(50)",
        "ALTER TABLE analysis_jobs ADD COLUMN model VARCHAR(100)",
        "ALTER TABLE provider_pauses ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE provider_pauses ADD COLUMN last_error TEXT",
        "ALTER TABLE provider_pauses ADD COLUMN last_error_at TIMESTAMP"),
    5: ("ALTER TABLE analysis_jobs ADD COLUMN kind VARCHAR(16) NOT NULL DEFAULT 'archive'",
        "ALTER TABLE analysis_jobs ADD COLUMN clip_start TIMESTAMP",
        "ALTER TABLE analysis_jobs ADD COLUMN sources JSON",
        "ALTER TABLE analysis_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE analysis_jobs ADD COLUMN windows INTEGER NOT NULL DEFAULT 1",
        "CREATE INDEX IF NOT EXISTS ix_jobs_status_priority_run_after "
        "ON analysis_jobs (status, priority, run_after)"),
    # 6: alert_deliveries is new; create_all makes it.
    6: (),
    7: ("ALTER TABLE incidents ADD COLUMN acknowledged_at TIMESTAMP",
        "ALTER TABLE incidents ADD COLUMN ack_note TEXT",
        "ALTER TABLE analysis_jobs ADD COLUMN kept_at TIMESTAMP"),
    8: ("ALTER TABLE analysis_jobs ADD COLUMN quarantine TEXT",
        "ALTER TABLE incidents ADD COLUMN quarantine TEXT",
        "ALTER TABLE alert_deliveries ADD COLUMN quarantine TEXT"),
}
ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)")
DURATION_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1800)

# Every read skips quarantined rows.
JOB_OK = jobs.c.quarantine.is_(None)
INCIDENT_OK = incidents.c.quarantine.is_(None)
DELIVERY_OK = deliveries.c.quarantine.is_(None)
# Jobs are read without their results, which are read apart and bounded (one may be
# megabytes: bounded_results); an incident's description is read up to MAX_TEXT_READ
# characters, saying when it was cut.
JOB_LISTED = [*(c for c in jobs.c if c.name != "analysis_result"),
              null().label("analysis_result")]
INCIDENT_READ = [*(c for c in incidents.c if c.name != "description"),
                 func.substr(incidents.c.description, 1, MAX_TEXT_READ).label("description"),
                 (func.length(incidents.c.description) > MAX_TEXT_READ)
                 .label("description_truncated")]

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


@dataclass(frozen=True)
class Job:
    id: int
    camera_id: str
    video_path: str
    segment_start: datetime
    segment_end: datetime
    status: str
    analysis_result: Any
    safety_score: int | None
    incident_count: int | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    retry_count: int
    max_retries: int
    worker_id: str | None
    run_after: datetime
    lease_token: str | None
    lease_expires_at: datetime | None
    prompt_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    analysis_seconds: float | None
    model_version: str | None
    thoughts_tokens: int | None
    provider: str | None
    model: str | None
    kind: str = "archive"
    clip_start: datetime | None = None
    sources: Any = None
    priority: int = 0
    windows: int = 1
    kept_at: datetime | None = None
    quarantine: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> "Job":
        mapping = row._mapping
        problem = job_problem(mapping)
        if problem:
            raise UnreadableRow(f"job {mapping['id']}: {problem}")
        return cls(**{f.name: mapping[f.name] for f in fields(cls)})

    @property
    def duration_seconds(self) -> float:
        return (self.segment_end - self.segment_start).total_seconds()

    @property
    def first_frame_at(self) -> datetime:
        """The wall-clock time of the clip's offset 0."""
        return self.clip_start or self.segment_start


@dataclass(frozen=True)
class IncidentRecord:
    start_at: datetime
    end_at: datetime
    category: str
    severity: str
    description: str
    confidence: float | None = None


@dataclass(frozen=True)
class Outcome:
    """What an analyzer hands to complete(): the parsed answer and the tokens it cost."""

    result: dict[str, Any]
    safety_score: int
    incidents: Sequence[IncidentRecord] = ()
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    thoughts_tokens: int | None = None
    model_version: str | None = None
    provider: str | None = None
    model: str | None = None
    # Incidents of the same camera and category that touch one stored earlier (within this
    # many seconds: one frame interval) extend it instead of adding one; None: never.
    merge_within_s: float | None = None


@dataclass(frozen=True)
class Delivery:
    """One outbox row as the notifier sees it."""

    id: int
    key: str
    kind: str
    destination: str
    rule: str | None
    camera_id: str
    incident_id: int | None
    job_id: int | None
    payload: dict[str, Any]
    attempts: int
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> "Delivery":
        mapping = row._mapping
        problem = delivery_problem(mapping)
        if problem:
            raise UnreadableRow(f"delivery {mapping['id']}: {problem}")
        return cls(**{f.name: mapping[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Pause:
    """A provider's shared state: paused (reason set) and/or rate-limited until not_before."""

    provider: str
    reason: str | None
    detail: str | None
    paused_at: datetime | None
    probe_at: datetime | None
    not_before: datetime | None
    failures: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None

    @property
    def paused(self) -> bool:
        return self.reason is not None


class UnreadableRow(ValueError):
    """A row whose values are out of range or of the wrong shape (it is quarantined)."""


def time_problem(name: str, value: Any, required: bool) -> str | None:
    if value is None:
        return f"{name} missing" if required else None
    if not isinstance(value, datetime) or not EARLIEST <= value < LATEST:
        return f"{name} out of range ({str(value)[:40]})"
    return None


def id_problem(name: str, value: Any, required: bool = True) -> str | None:
    if value is None:
        return f"{name} missing" if required else None
    if type(value) is not int or not 0 < value <= MAX_ROW_ID:
        return f"{name} out of range ({str(value)[:40]})"
    return None


def count_problem(name: str, value: Any, low: int = 0) -> str | None:
    if value is None or (type(value) is int and low <= value <= MAX_COUNT):
        return None
    return f"{name} out of range ({str(value)[:40]})"


def number_problem(name: str, value: Any, high: float = MAX_OFFSET_SECONDS) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value <= high:
        return f"{name} out of range ({str(value)[:40]})"
    return None


def sources_problem(sources: Any) -> str | None:
    """A job's sources: [{"path": str, "offset_s": number?, "duration_s": number?}]."""
    if sources is None:
        return None
    if not isinstance(sources, list):
        return "sources is not a list"
    for source in sources:
        if not isinstance(source, dict) or not isinstance(source.get("path"), str):
            return "sources: an entry without a path"
        problem = (number_problem("sources offset_s", source.get("offset_s"))
                   or number_problem("sources duration_s", source.get("duration_s")))
        if problem:
            return problem
    return None


def first_problem(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def job_problem(row: Any) -> str | None:
    """Why a job row cannot be handed on (None: it can). Checks what the row holds of
    the columns it was read with."""
    get = row.get
    return first_problem(
        id_problem("id", get("id")),
        *(time_problem(name, get(name), required=True)
          for name in ("segment_start", "segment_end", "created_at", "run_after") if name in row),
        *(time_problem(name, get(name), required=False)
          for name in ("started_at", "completed_at", "lease_expires_at", "clip_start", "kept_at")),
        *(count_problem(name, get(name)) for name in ("retry_count", "max_retries", "windows",
                                                      "safety_score", "incident_count")),
        count_problem("priority", get("priority"), low=-MAX_COUNT),
        number_problem("analysis_seconds", get("analysis_seconds"), high=1e9),
        sources_problem(get("sources")),
        None if isinstance(get("analysis_result"), (dict, type(None))) else "analysis_result is not an object")


def incident_problem(row: Any) -> str | None:
    get = row.get
    return first_problem(
        id_problem("id", get("id")), id_problem("job_id", get("job_id")),
        time_problem("start_at", get("start_at"), required=True),
        time_problem("end_at", get("end_at"), required=True),
        time_problem("acknowledged_at", get("acknowledged_at"), required=False),
        number_problem("confidence", get("confidence"), high=1e9),
        None if isinstance(get("description", ""), str) else "description is not text")


def delivery_problem(row: Any) -> str | None:
    get = row.get
    return first_problem(
        id_problem("id", get("id")), id_problem("incident_id", get("incident_id"), False),
        id_problem("job_id", get("job_id"), False),
        time_problem("created_at", get("created_at"), required=True),
        time_problem("incident_at", get("incident_at"), required=False),
        count_problem("attempts", get("attempts")),
        None if isinstance(get("payload"), dict) or "payload" not in row
        else "payload is not an object")


def incident_dict(row: Any) -> dict[str, Any]:
    """An incident row as a dict, range-checked (UnreadableRow when it cannot be)."""
    mapping = dict(row._mapping)
    problem = incident_problem(mapping)
    if problem:
        raise UnreadableRow(f"incident {mapping.get('id')}: {problem}")
    return mapping


def checked_time(value: datetime | None) -> datetime | None:
    """A time read back (an aggregate, a column) that must lie in EARLIEST..LATEST."""
    problem = time_problem("time", value, required=False)
    if problem:
        raise UnreadableRow(problem)
    return value


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def clean_text(value: Any, most: int) -> Any:
    """Text as stored: control characters (but newline and tab) removed, invalid
    surrogates replaced, at most `most` characters with the cut marked."""
    if not isinstance(value, str):
        return value
    value = CONTROL.sub("", value.encode("utf-8", "replace").decode("utf-8"))
    if len(value) > most:
        value = value[:most - len(TRUNCATED)] + TRUNCATED
    return value


def bounded_outcome(outcome: "Outcome") -> "Outcome":
    """What complete() stores, whoever made it: text sanitised and bounded, at most
    MAX_INCIDENTS incidents (the rest counted in the result), in the rows and in the
    result alike."""
    kept = list(outcome.incidents)[:MAX_INCIDENTS]
    incidents_ = [replace(i, category=clean_text(i.category, 100),
                          severity=clean_text(i.severity, 16),
                          description=clean_text(i.description, MAX_DESCRIPTION))
                  for i in kept]
    result = outcome.result
    if isinstance(result, dict):
        result = dict(result)
        if "summary" in result:
            result["summary"] = clean_text(result["summary"], MAX_SUMMARY)
        listed = result.get("incidents")
        if isinstance(listed, list):
            result["incidents"] = [
                {k: clean_text(v, MAX_DESCRIPTION) for k, v in item.items()}
                if isinstance(item, dict) else item for item in listed[:MAX_INCIDENTS]]
            if len(listed) > MAX_INCIDENTS:
                result["incidents_dropped"] = len(listed) - MAX_INCIDENTS
    return replace(outcome, incidents=incidents_, result=result,
                   model_version=clean_text(outcome.model_version, 100))


# What a read of a row raises when a value cannot be decoded or is out of range.
ROW_ERRORS = (ValueError, TypeError, OverflowError, sa_exc.DataError)


def quarantining(method):
    """A read that meets an unreadable row quarantines it (and any other) and is tried
    once more (another process may have marked the row meanwhile); what still fails then
    was not a row's fault and is raised."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ROW_ERRORS as exc:
            self.quarantine_unreadable(first_line(exc))
        return method(self, *args, **kwargs)
    return wrapper


def backoff_seconds(retry_count: int, base: float, rng: random.Random | None = None) -> float:
    """Delay before attempt retry_count+1: base * 2^(retry_count-1), capped, +-20% jitter."""
    rng = rng or random
    delay = min(base * 2 ** max(retry_count - 1, 0), MAX_BACKOFF_SECONDS)
    return delay * rng.uniform(0.8, 1.2)


def redact_url(url: str) -> str:
    return mask_url(url)  # the one redaction: a ?password= query is masked too


class JobStore:
    """The analysis job queue and its results, on SQLite or PostgreSQL."""

    def __init__(self, url: str, *, lease_seconds: float = 60, retry_backoff: float = 10.0,
                 poll_seconds: float = 5.0, create: bool = True, synchronous: str = "normal",
                 alerts: Any = None, lazy: bool = False):
        self.url = url
        # The alerts routing (vlmguard.alerts.plan.AlertPlan): which deliveries complete()
        # writes with a job's incidents. None: none.
        self.alerts = alerts
        self.lease_seconds = lease_seconds
        self.retry_backoff = retry_backoff
        self.poll_seconds = poll_seconds
        try:
            self.engine = make_engine(url, create=create, synchronous=synchronous)
        except OSError as exc:  # the SQLite file's folder cannot be made
            raise UnusableDatabase(f"cannot open database {redact_url(url)}: "
                                   f"{exc.strerror or exc}") from None
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._register = (dialect_insert(self.engine)(jobs)
                          .on_conflict_do_nothing(index_elements=["camera_id", "segment_start"])
                          .returning(jobs.c.id))
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

    def ensure_ready(self) -> None:
        """Create or upgrade the schema at the first contact with the database, once. A
        lazy store (lazy=True) is made without reaching the database, so a process can
        start, and record, while it is away; it calls this before its first use."""
        if self.ready:
            return
        try:
            self.prepare_schema(create=self.create)
        except (sa_exc.DBAPIError, sqlite3.Error) as exc:
            raise open_problem(self.url, self.is_sqlite, exc) from None
        self.ready = True

    @classmethod
    def from_config(cls, config, **kwargs) -> "JobStore":
        from vlmguard.alerts.plan import AlertPlan

        return cls(config.database_url, lease_seconds=config.analysis.lease_seconds,
                   retry_backoff=config.analysis.retry_backoff_seconds,
                   poll_seconds=config.analysis.poll_seconds,
                   synchronous=config.database.sqlite_synchronous,
                   alerts=AlertPlan(config), **kwargs)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.engine.dispose()

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------

    def prepare_schema(self, *, create: bool) -> None:
        if self.schema_is_current():
            return  # no write lock taken to open: another program may hold it for long
        with self.write() as conn:
            if not self.is_sqlite:
                # Concurrent CREATE TABLE IF NOT EXISTS races on PostgreSQL's catalog.
                conn.execute(text("SELECT pg_advisory_xact_lock(7162534)"))
            if not create and not self.engine.dialect.has_table(conn, meta_table.name):
                raise DatabaseError(f"no vlmguard database at {redact_url(self.url)} "
                                    "(run `vlmguard run` once to create it)")
            metadata.create_all(conn)
            version = conn.execute(select(meta_table.c.value)
                                   .where(meta_table.c.key == "schema_version")).scalar()
            if version is None:
                conn.execute(meta_table.insert().values(key="schema_version",
                                                        value=str(SCHEMA_VERSION)))
                return
            self.migrate(conn, int(version))

    def schema_is_current(self) -> bool:
        """The schema is this vlmguard's (a read; False when it must be made or upgraded)."""
        with self.read() as conn:
            if not self.engine.dialect.has_table(conn, meta_table.name):
                return False
            version = conn.execute(select(meta_table.c.value)
                                   .where(meta_table.c.key == "schema_version")).scalar()
        if version is not None and int(version) > SCHEMA_VERSION:
            raise newer_schema(int(version))
        return version is not None and int(version) == SCHEMA_VERSION

    def migrate(self, conn: Connection, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise newer_schema(version)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS.get(step, ()):
                if not already_added(conn, statement):
                    conn.execute(text(statement))
        if version < SCHEMA_VERSION:
            conn.execute(update(meta_table).where(meta_table.c.key == "schema_version")
                         .values(value=str(SCHEMA_VERSION)))

    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(select(meta_table.c.value)
                                    .where(meta_table.c.key == "schema_version")).scalar_one())

    # -- quarantine ----------------------------------------------------------------------

    def quarantine_unreadable(self, hint: str = "") -> int:
        """Mark every row that cannot be read (a value that does not decode, or out of
        range) so that every read skips it from now on; log each once. Returns how many
        were marked. Runs when a read fails on a row, so it costs nothing until then."""
        marked = 0
        for table, check, documents in self.scanned_tables():
            bad = self.find_unreadable(table, check, documents)
            for row_id, reason in bad.items():
                with self.write() as conn:
                    done = conn.execute(update(table).where(table.c.id == row_id,
                                                            table.c.quarantine.is_(None))
                                        .values(quarantine=reason[:500])).rowcount
                if done:
                    marked += 1
                    log.error("unreadable row quarantined: skipped from now on",
                              table=table.name, row_id=row_id, reason=reason, cause=hint[:200])
        return marked

    @staticmethod
    def scanned_tables():
        """(table, check, JSON columns that may be large) for each table rows are read from."""
        return ((jobs, job_problem, ("analysis_result",)),
                (incidents, incident_problem, ()),
                (deliveries, delivery_problem, ("payload",)))

    def find_unreadable(self, table: Table, check, documents: Sequence[str]) -> dict[int, str]:
        with self.read() as conn:
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
            with self.read() as conn:
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
        if self.is_sqlite:
            return case((column.is_(None), "null"),
                        (func.json_valid(column) == 1, func.json_type(column)),
                        else_="invalid")
        return func.json_typeof(column)

    def quarantined(self, limit: int = 5) -> dict[str, Any]:
        """{table: count} of quarantined rows, and the latest few with why."""
        counts: dict[str, int] = {}
        latest: list[dict[str, Any]] = []
        with self.read() as conn:
            for table, _check, _documents in self.scanned_tables():
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

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(vlmguard_read=True) as conn:
            with conn.begin():
                yield conn

    def notify(self, conn: Connection) -> None:
        """Wake idle workers; on SQLite the commit itself does (data_version changes)."""
        if not self.is_sqlite:
            conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    # -- producing -----------------------------------------------------------------------

    def register(self, camera_id: str, video_path: str | Path, segment_start: datetime,
                 segment_end: datetime, *, max_retries: int = 3, kind: str = "archive",
                 clip_start: datetime | None = None, sources: list | None = None) -> int | None:
        """Add a job for a finished archive or window; None when already registered."""
        now = utcnow()
        values = dict(camera_id=camera_id, video_path=str(video_path), segment_start=segment_start,
                      segment_end=segment_end, status="pending", created_at=now, run_after=now,
                      retry_count=0, max_retries=max_retries, kind=kind, clip_start=clip_start,
                      sources=sources, windows=1,
                      priority=CATCH_UP_PRIORITY if kind == "catchup" else LIVE_PRIORITY)
        with self.write() as conn:
            job_id = conn.execute(self._register, values).scalar()
            if job_id is not None:
                self.notify(conn)
        return job_id

    # -- consuming -----------------------------------------------------------------------

    @quarantining
    def claim(self, worker_id: str) -> Job | None:
        """Take the next due job for this worker, or None. Never hands one job to two."""
        now = utcnow()
        values = dict(b_now=now, status="processing", worker_id=worker_id, started_at=now,
                      lease_token=secrets.token_hex(16),
                      lease_expires_at=now + timedelta(seconds=self.lease_seconds))
        with self.write() as conn:
            row = conn.execute(CLAIM, values).first()
        return Job.from_row(row) if row else None

    def heartbeat(self, job: Job) -> None:
        """Extend the lease; raises LeaseLost when the job is no longer this worker's."""
        expires = utcnow() + timedelta(seconds=self.lease_seconds)
        with self.write() as conn:
            self._owned_update(conn, job, lease_expires_at=expires)

    def complete(self, job: Job, outcome: Outcome) -> None:
        """Store the result and its incidents in one transaction, only as the lease holder.
        Text is stored sanitised and bounded (bounded_outcome), whatever the caller hands in."""
        now = utcnow()
        outcome = bounded_outcome(outcome)
        with self.write() as conn:
            self._owned_update(
                conn, job, status="completed", completed_at=now,
                analysis_seconds=(now - job.started_at).total_seconds() if job.started_at else None,
                analysis_result=outcome.result, safety_score=outcome.safety_score,
                incident_count=len(outcome.incidents), error_message=None,
                prompt_tokens=outcome.prompt_tokens, output_tokens=outcome.output_tokens,
                total_tokens=outcome.total_tokens, thoughts_tokens=outcome.thoughts_tokens,
                model_version=outcome.model_version, provider=outcome.provider,
                model=outcome.model, lease_token=None, lease_expires_at=None)
            fresh = [i for i in outcome.incidents
                     if not self._extend_incident(conn, job, i, outcome.merge_within_s)]
            if fresh:
                conn.execute(incidents.insert(), [
                    {"job_id": job.id, "camera_id": job.camera_id, "start_at": i.start_at,
                     "end_at": i.end_at, "category": i.category, "severity": i.severity,
                     "description": i.description, "confidence": i.confidence}
                    for i in fresh])
            self._enqueue_deliveries(conn, job, outcome)

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
        with self.write() as conn:
            self._owned_update(conn, job, retry_count=retries, error_message=error[:2000],
                               lease_token=None, lease_expires_at=None, **changes)
            if changes["status"] == "pending":
                self.notify(conn)
        return changes["status"]

    def release(self, job: Job) -> None:
        """Hand a job back untouched (an orderly stop): pending again, no attempt counted."""
        with self.write() as conn:
            self._owned_update(conn, job, status="pending", run_after=utcnow(),
                               started_at=None, lease_token=None, lease_expires_at=None)
            self.notify(conn)

    def defer(self, job: Job, until: datetime | None = None) -> None:
        """Put a job back unharmed because the account, not the job, is in trouble:
        pending again (from until), no attempt counted."""
        with self.write() as conn:
            self._owned_update(conn, job, status="pending", run_after=until or utcnow(),
                               started_at=None, lease_token=None, lease_expires_at=None)

    # -- provider pauses (account-wide conditions) -----------------------------------------

    def pause(self, provider: str, reason: str, detail: str, probe_in: float) -> None:
        """Stop every analyzer of this provider until a probe at now + probe_in succeeds."""
        now = utcnow()
        with self.write() as conn:
            self._provider_row(conn, provider)
            conn.execute(update(pauses).where(pauses.c.provider == provider)
                         .values(reason=reason, detail=detail[:2000], paused_at=now,
                                 probe_at=now + timedelta(seconds=probe_in)))

    def hold_off(self, provider: str, seconds: float) -> None:
        """A shared rate-limit wait: no analyzer of this provider calls before now + seconds."""
        until = utcnow() + timedelta(seconds=seconds)
        with self.write() as conn:
            self._provider_row(conn, provider)
            conn.execute(update(pauses).where(pauses.c.provider == provider,
                                              (pauses.c.not_before.is_(None))
                                              | (pauses.c.not_before < until))
                         .values(not_before=until))

    def _provider_row(self, conn: Connection, provider: str) -> None:
        """Make sure the provider has its row; two boxes may race to insert it."""
        conn.execute(dialect_insert(self.engine)(pauses).values(provider=provider)
                     .on_conflict_do_nothing(index_elements=["provider"]))

    def provider_state(self, provider: str) -> Pause | None:
        with self.read() as conn:
            row = conn.execute(select(pauses).where(pauses.c.provider == provider)).first()
        return Pause(**row._mapping) if row else None

    def take_probe(self, provider: str, next_probe_in: float) -> bool:
        """True for the one analyzer that gets to probe a due pause; the next probe is
        pushed on in the same statement, so two workers never probe at once."""
        now = utcnow()
        with self.write() as conn:
            return bool(conn.execute(
                update(pauses).where(pauses.c.provider == provider, pauses.c.reason.is_not(None),
                                     pauses.c.probe_at <= now)
                .values(probe_at=now + timedelta(seconds=next_probe_in))).rowcount)

    def probe_now(self, provider: str | None = None) -> int:
        """Make paused providers' next probe due at once (the supervisor's SIGHUP)."""
        query = update(pauses).where(pauses.c.reason.is_not(None))
        if provider:
            query = query.where(pauses.c.provider == provider)
        with self.write() as conn:
            changed = conn.execute(query.values(probe_at=utcnow())).rowcount
            if changed:
                self.notify(conn)
        return changed

    def resume(self, provider: str) -> bool:
        """Clear the pause (a probe succeeded); True when there was one."""
        with self.write() as conn:
            changed = conn.execute(update(pauses).where(pauses.c.provider == provider,
                                                        pauses.c.reason.is_not(None))
                                   .values(reason=None, detail=None, paused_at=None,
                                           probe_at=None)).rowcount
            if changed:
                self.notify(conn)
        return bool(changed)

    def note_failure(self, provider: str, error: str) -> None:
        """Count a failed request to a provider (the job may still be answered by the next)."""
        with self.write() as conn:
            self._provider_row(conn, provider)
            conn.execute(update(pauses).where(pauses.c.provider == provider)
                         .values(failures=pauses.c.failures + 1, last_error=error[:2000],
                                 last_error_at=utcnow()))

    def provider_states(self) -> list[Pause]:
        with self.read() as conn:
            return [Pause(**row._mapping)
                    for row in conn.execute(select(pauses).order_by(pauses.c.provider))]

    def answers_by_provider(self) -> dict[str, dict[str, Any]]:
        """{provider: {answered, tokens, models}} over completed jobs that made a request."""
        query = (select(jobs.c.provider, jobs.c.model, func.count(),
                        func.coalesce(func.sum(jobs.c.total_tokens), 0))
                 .where(jobs.c.status == "completed", jobs.c.provider.is_not(None), JOB_OK)
                 .group_by(jobs.c.provider, jobs.c.model))
        out: dict[str, dict[str, Any]] = {}
        with self.read() as conn:
            for provider, model, n, tokens in conn.execute(query):
                entry = out.setdefault(provider, {"answered": 0, "tokens": 0, "models": []})
                entry["answered"] += int(n)
                entry["tokens"] += int(tokens)
                entry["models"].append(model)
        return out

    @quarantining
    def last_model_request(self, camera_id: str) -> datetime | None:
        """The start of the camera's newest clip that was sent to a model."""
        with self.read() as conn:
            return checked_time(conn.execute(select(func.max(jobs.c.segment_start))
                                .where(jobs.c.camera_id == camera_id, JOB_OK,
                                       jobs.c.status == "completed",
                                       jobs.c.provider.is_not(None))).scalar())

    def paused_providers(self) -> list[Pause]:
        with self.read() as conn:
            rows = conn.execute(select(pauses).where(pauses.c.reason.is_not(None))
                                .order_by(pauses.c.provider))
            return [Pause(**row._mapping) for row in rows]

    # -- alerts outbox (issue 14) ---------------------------------------------------------

    def _enqueue_deliveries(self, conn: Connection, job: Job, outcome: Outcome) -> None:
        """Inside complete()'s transaction: a delivery per (new incident, destination) and
        per (window, score destination). An incident that already has deliveries (one
        extended by a later window keeps its id) gets none again."""
        plan = self.alerts
        if plan is None or not plan.enabled:
            return
        now = utcnow()
        summary = (outcome.result or {}).get("summary") if isinstance(outcome.result, dict) else None
        rows = [self._delivery_values(now, kind="safety_score", destination=d, rule=None,
                                      camera_id=job.camera_id, job_id=job.id, status="pending",
                                      payload=plan.score_payload(job, outcome.safety_score, summary))
                for d in plan.score_destinations(job.camera_id)]
        made = len(rows)
        if rows:
            conn.execute(deliveries.insert(), rows)
        alerted = select(deliveries.c.id).where(deliveries.c.incident_id == incidents.c.id)
        fresh = conn.execute(select(incidents).where(incidents.c.job_id == job.id, INCIDENT_OK,
                                                     ~alerted.exists())
                             .order_by(incidents.c.id)).all()
        for found in fresh:
            incident = dict(found._mapping)
            payload = plan.incident_payload(incident, job, outcome.safety_score, summary)
            for route in plan.incident_routes(job.camera_id, incident["category"],
                                              incident["severity"]):
                cooling = self._cooling(conn, route, job.camera_id, incident)
                # One row at a time: the next incident's cooldown check must see this one.
                conn.execute(deliveries.insert(), self._delivery_values(
                    now, kind="incident", destination=route.destination, rule=route.rule,
                    camera_id=job.camera_id, job_id=job.id, incident_id=incident["id"],
                    category=incident["category"], incident_at=incident["start_at"],
                    status="suppressed" if cooling else "pending", payload=payload,
                    last_error=f"cooldown: {cooling}" if cooling else None))
                made += 1
        if made:
            self.notify(conn)

    def enqueue_system(self, payload: dict[str, Any], destinations: Sequence[str],
                       event_key: str) -> int:
        """An operators' message about vlmguard itself (a role crash-looping, recovered)
        to every destination, once per event_key whoever enqueues it and however often:
        its rows' keys derive from it. Returns how many rows were new."""
        now = utcnow()
        insert = dialect_insert(self.engine)(deliveries).on_conflict_do_nothing(
            index_elements=["key"])
        made = 0
        with self.write() as conn:
            for destination in destinations:
                key = hashlib.sha256(f"{event_key}|{destination}".encode()).hexdigest()[:32]
                made += conn.execute(insert, self._delivery_values(
                    now, kind="system", destination=destination, rule=None, camera_id="",
                    status="pending", payload=payload) | {"key": key}).rowcount
            if made:
                self.notify(conn)
        return made

    @staticmethod
    def _delivery_values(now: datetime, **values: Any) -> dict[str, Any]:
        return dict(key=secrets.token_hex(16), attempts=0, created_at=now, next_attempt_at=now,
                    **values)

    def _cooling(self, conn: Connection, route: Any, camera_id: str,
                 incident: dict[str, Any]) -> str | None:
        """Why this route is in its cooldown (the earlier incident that was sent), or None."""
        if not route.cooldown_seconds or route.rule is None:
            return None
        window = timedelta(seconds=route.cooldown_seconds)
        start = incident["start_at"]
        earlier = conn.execute(
            select(deliveries.c.incident_id, deliveries.c.incident_at)
            .where(deliveries.c.rule == route.rule, deliveries.c.destination == route.destination,
                   deliveries.c.camera_id == camera_id,
                   deliveries.c.category == incident["category"],
                   deliveries.c.status != "suppressed", DELIVERY_OK,
                   deliveries.c.incident_at > start - window,
                   deliveries.c.incident_at < start + window)
            .order_by(deliveries.c.incident_at.desc()).limit(1)).first()
        if earlier is None:
            return None
        return (f"incident {earlier.incident_id} of the same rule, camera and category "
                f"within {route.cooldown_seconds:g} s")

    @quarantining
    def claim_deliveries(self, worker_id: str, limit: int, lease_seconds: float,
                         destinations: Sequence[str] | None = None) -> list[Delivery]:
        """Take due pending deliveries for lease_seconds (another notifier skips them;
        one that dies leaves them due again when the lease runs out)."""
        now = utcnow()
        due = (select(deliveries.c.id)
               .where(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now,
                      DELIVERY_OK)
               .order_by(deliveries.c.id).limit(limit).with_for_update(skip_locked=True))
        if destinations is not None:
            due = due.where(deliveries.c.destination.in_(destinations))
        with self.write() as conn:
            ids = list(conn.execute(due).scalars())
            if not ids:
                return []
            conn.execute(update(deliveries).where(deliveries.c.id.in_(ids))
                         .values(claimed_by=worker_id,
                                 next_attempt_at=now + timedelta(seconds=lease_seconds)))
            rows = conn.execute(select(deliveries).where(deliveries.c.id.in_(ids))
                                .order_by(deliveries.c.id)).all()
        return [Delivery.from_row(row) for row in rows]

    def release_deliveries(self, worker_id: str) -> int:
        """A restarted notifier takes back what its previous life had claimed, at once."""
        with self.write() as conn:
            return conn.execute(update(deliveries)
                                .where(deliveries.c.status == "pending",
                                       deliveries.c.claimed_by == worker_id)
                                .values(claimed_by=None, next_attempt_at=utcnow())).rowcount

    def deliveries_due_now(self, destination: str) -> int:
        """A destination is back (the broker reconnected): its waiting retries go now."""
        with self.write() as conn:
            return conn.execute(update(deliveries)
                                .where(deliveries.c.status == "pending",
                                       deliveries.c.destination == destination,
                                       deliveries.c.claimed_by.is_(None))
                                .values(next_attempt_at=utcnow())).rowcount

    def delivered(self, delivery_id: int) -> None:
        with self.write() as conn:
            conn.execute(update(deliveries).where(deliveries.c.id == delivery_id)
                         .values(status="delivered", delivered_at=utcnow(), claimed_by=None,
                                 attempts=deliveries.c.attempts + 1))

    def delivery_failed(self, delivery_id: int, error: str, *, retry_in: float | None,
                        max_age_seconds: float) -> str:
        """Record a failed attempt: pending again after retry_in seconds, or failed for
        good (retry_in None, or the delivery is older than max_age_seconds). Returns the
        new status."""
        now = utcnow()
        with self.write() as conn:
            created = conn.execute(select(deliveries.c.created_at)
                                   .where(deliveries.c.id == delivery_id)).scalar()
            if created is None:
                return "failed"
            too_old = (now - created).total_seconds() >= max_age_seconds
            if retry_in is None or too_old:
                status, values = "failed", dict(next_attempt_at=now)
                if too_old and retry_in is not None:
                    error = f"gave up after {max_age_seconds / 3600:g} h: {error}"
            else:
                status, values = "pending", dict(next_attempt_at=now + timedelta(seconds=retry_in))
            conn.execute(update(deliveries).where(deliveries.c.id == delivery_id)
                         .values(status=status, claimed_by=None, last_error=error[:2000],
                                 last_error_at=now, attempts=deliveries.c.attempts + 1,
                                 **values))
        return status

    @quarantining
    def seconds_until_delivery_due(self) -> float | None:
        with self.read() as conn:
            due = checked_time(conn.execute(select(func.min(deliveries.c.next_attempt_at))
                                            .where(deliveries.c.status == "pending",
                                                   DELIVERY_OK)).scalar())
        if due is None:
            return None
        return max((due - utcnow()).total_seconds(), 0.0)

    @quarantining
    def delivery_counts(self) -> dict[str, dict[str, Any]]:
        """{destination: {pending, delivered, failed, suppressed, last_error, last_error_at}}."""
        out: dict[str, dict[str, Any]] = {}
        query = (select(deliveries.c.destination, deliveries.c.status, func.count())
                 .where(DELIVERY_OK).group_by(deliveries.c.destination, deliveries.c.status))
        with self.read() as conn:
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
        with self.read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # -- (end of the alerts outbox) ------------------------------------------------------

    def _owned_update(self, conn: Connection, job: Job, **values: Any) -> None:
        params = {"b_id": job.id, "b_token": job.lease_token, **values}
        if conn.execute(OWNED_UPDATE, params).rowcount != 1:
            raise LeaseLost(f"job {job.id}: lease {job.lease_token} is no longer held")

    def rescue_expired(self) -> int:
        """Put jobs whose lease ran out back to pending (or failed), counting the attempt."""
        now = utcnow()
        expired = (jobs.c.status == "processing", jobs.c.lease_expires_at < now, JOB_OK)
        with self.read() as conn:
            if conn.execute(select(jobs.c.id).where(*expired).limit(1)).first() is None:
                return 0
        message = func.coalesce("lease expired: worker " + jobs.c.worker_id
                                + " stopped heartbeating", "lease expired")
        cleared = dict(retry_count=jobs.c.retry_count + 1, error_message=message,
                       lease_token=None, lease_expires_at=None)
        with self.write() as conn:
            retried = conn.execute(update(jobs).where(*expired, jobs.c.retry_count < jobs.c.max_retries)
                                   .values(status="pending", run_after=now, **cleared)).rowcount
            given_up = conn.execute(update(jobs).where(*expired)
                                    .values(status="failed", completed_at=now, **cleared)).rowcount
            if retried:
                self.notify(conn)
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
            self.watcher().wait(min(remaining, self.poll_seconds, wait if wait else self.poll_seconds))

    @quarantining
    def seconds_until_due(self) -> float | None:
        """0 when a pending job is due now, seconds until the next one is, None if none."""
        with self.read() as conn:
            due = checked_time(conn.execute(select(func.min(jobs.c.run_after))
                                            .where(jobs.c.status == "pending", JOB_OK)).scalar())
        if due is None:
            return None
        return max((due - utcnow()).total_seconds(), 0.0)

    def watcher(self) -> "SqliteWatcher | PostgresListener":
        if self._watcher is None:
            self._watcher = (SqliteWatcher(self.engine.url.database) if self.is_sqlite
                             else PostgresListener(self.engine.url))
        return self._watcher

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
        with self.read() as conn:
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
        with self.read() as conn:
            return {camera: max((now - checked_time(end)).total_seconds(), 0.0)
                    for camera, end in conn.execute(query)}

    @quarantining
    def pending_windows(self, camera_id: str) -> list[Job]:
        """The camera's live windows (and merged ones) not yet claimed, oldest first."""
        query = (select(jobs).where(jobs.c.camera_id == camera_id, jobs.c.status == "pending",
                                    jobs.c.kind.in_(("window", "merged")), JOB_OK)
                 .order_by(jobs.c.segment_start))
        with self.read() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]

    def merge_jobs(self, keep: Job, absorbed: Sequence[Job], video_path: str,
                   sources: list | None) -> bool:
        """Fold pending jobs into keep, which then covers them all (one request for the
        same frames); False, with nothing changed, when any of them was claimed meanwhile."""
        ids = [keep.id, *(j.id for j in absorbed)]
        end = max(j.segment_end for j in (keep, *absorbed))
        windows = keep.windows + sum(j.windows for j in absorbed)
        with self.write() as conn:
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

    def merge_counts(self) -> dict[str, int]:
        """{camera_id: windows folded into merged jobs because analysis lagged}."""
        query = (select(jobs.c.camera_id, func.sum(jobs.c.windows - 1))
                 .where(jobs.c.kind == "merged", JOB_OK).group_by(jobs.c.camera_id))
        with self.read() as conn:
            return {camera: int(n or 0) for camera, n in conn.execute(query)}

    # -- by hand ----------------------------------------------------------------------------

    def retry(self, job_id: int) -> bool:
        """Send a failed job round again with a fresh retry budget; False if it isn't failed."""
        with self.write() as conn:
            changed = conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.status == "failed", JOB_OK)
                .values(status="pending", retry_count=0, run_after=utcnow(), completed_at=None,
                        worker_id=None)).rowcount
            if changed:
                self.notify(conn)
        return bool(changed)

    # -- reading ---------------------------------------------------------------------------

    @quarantining
    def get(self, job_id: int) -> Job | None:
        """One job, its result read bounded (see bounded_results)."""
        with self.read() as conn:
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
        with self.read() as conn:
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

    @quarantining
    def list_incidents(self, job_id: int) -> list[dict[str, Any]]:
        """A job's incidents, descriptions read up to MAX_TEXT_READ characters."""
        query = (select(*INCIDENT_READ).where(incidents.c.job_id == job_id, INCIDENT_OK)
                 .order_by(incidents.c.start_at))
        with self.read() as conn:
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
        with self.read() as conn:
            return [incident_dict(row) for row in conn.execute(query)]

    def count_incidents(self, *, camera_id: str | None = None, since: datetime | None = None,
                        until: datetime | None = None, severities: Sequence[str] = (),
                        categories: Sequence[str] = ()) -> int:
        inner = incident_query(camera_id, since, until, severities, categories).subquery()
        with self.read() as conn:
            return conn.execute(select(func.count()).select_from(inner)).scalar_one()

    def incident_categories(self) -> list[str]:
        with self.read() as conn:
            return list(conn.execute(select(incidents.c.category).where(INCIDENT_OK).distinct()
                                     .order_by(incidents.c.category)).scalars())

    @quarantining
    def get_incident(self, incident_id: int) -> dict[str, Any] | None:
        """One incident with its archive (video_path, segment_start/end, kept_at)."""
        query = (select(*INCIDENT_READ, jobs.c.kept_at, jobs.c.video_path, jobs.c.segment_start,
                        jobs.c.segment_end)
                 .join(jobs, jobs.c.id == incidents.c.job_id)
                 .where(incidents.c.id == incident_id, INCIDENT_OK, JOB_OK))
        with self.read() as conn:
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
        with self.write() as conn:
            changed = conn.execute(update(incidents).where(incidents.c.id == incident_id,
                                                           INCIDENT_OK)
                                   .values(acknowledged_at=now, ack_note=note or None)).rowcount
        return now if changed else None

    def keep_archive(self, job_id: int, keep: bool) -> bool:
        """Keep a job's archive out of retention's reach, or release it; False if no job."""
        with self.write() as conn:
            changed = conn.execute(update(jobs).where(jobs.c.id == job_id, JOB_OK)
                                   .values(kept_at=utcnow() if keep else None)).rowcount
        return bool(changed)

    @quarantining
    def kept_paths(self) -> set[str]:
        """Archives a person keeps: retention never deletes them. A window's job keeps the
        archive file(s) its footage lies in (its sources), not only its RAM copy."""
        with self.read() as conn:
            rows = conn.execute(select(jobs.c.video_path, jobs.c.sources)
                                .where(jobs.c.kept_at.is_not(None), JOB_OK)).all()
        kept = set()
        for video_path, sources in rows:
            kept.add(video_path)
            kept.update(str(s["path"]) for s in sources or ()
                        if isinstance(s, dict) and s.get("path"))
        return kept

    @quarantining
    def event_cursor(self) -> tuple[int, datetime | None, datetime | None]:
        """Where the event feed starts: the newest incident id, acknowledgement and failure."""
        with self.read() as conn:
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
        with self.read() as conn:
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

    def incidents_ended_before(self, camera_id: str, before: datetime,
                               ids: Sequence[int]) -> list[int]:
        """Which of these incidents of the camera ended before `before` (their footage is
        gone when that is the camera's oldest recording)."""
        if not ids:
            return []
        query = select(incidents.c.id).where(incidents.c.camera_id == camera_id,
                                             incidents.c.end_at <= before, INCIDENT_OK,
                                             incidents.c.id.in_(list(ids)))
        with self.read() as conn:
            return list(conn.execute(query).scalars())

    def counts(self) -> dict[str, dict[str, int]]:
        """{camera_id: {state: n}} with every state present."""
        query = select(jobs.c.camera_id, jobs.c.status, func.count()).where(JOB_OK).group_by(
            jobs.c.camera_id, jobs.c.status)
        out: dict[str, dict[str, int]] = {}
        with self.read() as conn:
            for camera_id, status, n in conn.execute(query):
                out.setdefault(camera_id, dict.fromkeys(STATES, 0))[status] = n
        return out

    def count_jobs(self, *, states: Sequence[str] = (), camera_id: str | None = None) -> int:
        query = select(func.count()).select_from(jobs).where(JOB_OK)
        if states:
            query = query.where(jobs.c.status.in_(states))
        if camera_id:
            query = query.where(jobs.c.camera_id == camera_id)
        with self.read() as conn:
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
        with self.read() as conn:
            return {camera: {"prompt": int(p), "output": int(o), "thoughts": int(th),
                             "total": int(t)}
                    for camera, p, o, th, t in conn.execute(query)}

    def duration_histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """Cumulative (le, count) buckets, count and sum of completed analyses' seconds."""
        seconds = jobs.c.analysis_seconds
        columns = [func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0)
                   for bound in DURATION_BUCKETS]
        query = select(*columns, func.count(seconds), func.coalesce(func.sum(seconds), 0.0))
        with self.read() as conn:
            row = conn.execute(query.where(seconds.is_not(None), JOB_OK)).one()
        buckets = [(float(b), int(n)) for b, n in zip(DURATION_BUCKETS, row)]
        return buckets, int(row[-2]), float(row[-1])

    def registered_paths(self) -> set[str]:
        """Every archive the table already knows (the archiver's catch-up skips them)."""
        with self.read() as conn:
            return set(conn.execute(select(jobs.c.video_path)).scalars())

    @quarantining
    def in_flight_paths(self) -> set[str]:
        """Archives whose analysis is still to come (retention must keep them): a job's
        video and the archives its sources name."""
        query = (select(jobs.c.video_path, jobs.c.sources)
                 .where(jobs.c.status.in_(("pending", "processing")), JOB_OK))
        paths = set()
        with self.read() as conn:
            for video, sources in conn.execute(query):
                paths.add(video)
                paths.update(s.get("path") for s in sources or () if isinstance(s, dict))
        return paths

    @quarantining
    def oldest_pending(self) -> datetime | None:
        with self.read() as conn:
            return checked_time(conn.execute(select(func.min(jobs.c.created_at))
                                .where(jobs.c.status == "pending", JOB_OK)).scalar())

    @quarantining
    def recent_failures(self, limit: int = 5) -> list[Job]:
        query = (select(*JOB_LISTED).where(jobs.c.status == "failed", JOB_OK)
                 .order_by(jobs.c.completed_at.desc(), jobs.c.id.desc()).limit(limit))
        with self.read() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]


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


def already_added(conn: Connection, statement: str) -> bool:
    """A table newer than the database's version was made whole by create_all just before
    the migration; its ADD COLUMN steps must then be skipped."""
    found = ADD_COLUMN.match(statement)
    if not found:
        return False
    table, column = found.groups()
    return column in {c["name"] for c in inspect(conn).get_columns(table)}


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
    """LISTEN on its own autocommit connection; register() NOTIFYs in its transaction."""

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


def newer_schema(version: int) -> DatabaseError:
    return DatabaseError(f"database schema version {version} is newer than this "
                         f"vlmguard understands ({SCHEMA_VERSION}); upgrade vlmguard")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
