"""The tables, their migrations and the schema version: what a vlmguard database is.

Every other part of the store builds its statements on these tables; only this module
creates or upgrades them (at a process's first contact with the database, Database.ensure_ready).
"""

from __future__ import annotations

import re
from datetime import timezone
from typing import TYPE_CHECKING

from sqlalchemy import (JSON, CheckConstraint, Column, DateTime, Float, ForeignKey, Index,
                        Integer, MetaData, String, Table, Text, UniqueConstraint, func, inspect,
                        null, select, text, update)
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator

from vlmguard.errors import DatabaseError
from vlmguard.store.records import MAX_TEXT_READ

if TYPE_CHECKING:
    from vlmguard.store.database import Database

SCHEMA_VERSION = 9
STATES = ("pending", "processing", "completed", "failed")
# What a job covers: a whole archive file (window_seconds = 0), one live window, windows
# merged because analysis lagged, or footage found unanalysed (catch-up, after live work).
KINDS = ("archive", "window", "merged", "catchup")
LIVE_PRIORITY, CATCH_UP_PRIORITY = 0, 1
# An alert delivery's states (alert_deliveries.status).
DELIVERY_STATES = ("pending", "delivered", "failed", "suppressed")


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
    # The box that recorded the footage (schema 9; NULL: written before nodes existed).
    Column("node", String(64)),
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

# One row per (incident or analysed window, destination), written in the transaction that
# stores the incident: the notifier sends each at least once (the transactional outbox).
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
    # The box whose notifier sends it (its snapshot is on that box); NULL: any notifier.
    Column("node", String(64)),
    CheckConstraint("status IN ('pending', 'delivered', 'failed', 'suppressed')",
                    name="ck_deliveries_status"),
    Index("ix_deliveries_status_due", "status", "next_attempt_at"),
    Index("ix_deliveries_incident", "incident_id"),
    Index("ix_deliveries_cooldown", "rule", "camera_id", "category", "incident_at"),
)

# One row per box sharing the database (schema 9): store/nodes.py reads and writes it.
nodes = Table(
    "nodes", metadata,
    Column("name", String(64), primary_key=True),
    Column("instance", String(32), nullable=False),
    # The data directory's own id: a start on the same data directory is this box again
    # (the data-dir lock says the earlier start is gone), not another box.
    Column("box", String(32)),
    Column("public_url", String(500), nullable=False),
    Column("version", String(50), nullable=False),
    Column("role", String(16), nullable=False),
    # [{"id", "prompt"}], so any box can list (and link to) every box's cameras.
    Column("cameras", JSON),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    # Set by an orderly stop: the node is down at once, not ALIVE_SECONDS later.
    Column("stopped_at", UTCDateTime),
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
    # 9: the nodes table is new (create_all makes it).
    9: ("ALTER TABLE analysis_jobs ADD COLUMN node VARCHAR(64)",
        "ALTER TABLE alert_deliveries ADD COLUMN node VARCHAR(64)"),
}
ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)")

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


def prepare(db: "Database", *, create: bool) -> None:
    """Create the tables or bring them up to SCHEMA_VERSION; create=False refuses a
    database that vlmguard never made (the CLI must not make one where a path is wrong)."""
    if is_current(db):
        return  # no write lock taken to open: another program may hold it for long
    with db.write() as conn:
        if not db.is_sqlite:
            # Concurrent CREATE TABLE IF NOT EXISTS races on PostgreSQL's catalog.
            conn.execute(text("SELECT pg_advisory_xact_lock(7162534)"))
        if not create and not db.engine.dialect.has_table(conn, meta_table.name):
            raise DatabaseError(f"no vlmguard database at {db.shown_url} "
                                "(run `vlmguard run` once to create it)")
        metadata.create_all(conn)
        version = stamped_version(conn)
        if version is None:
            conn.execute(meta_table.insert().values(key="schema_version",
                                                    value=str(SCHEMA_VERSION)))
            return
        migrate(conn, int(version))


def is_current(db: "Database") -> bool:
    """The schema is this vlmguard's (a read; False when it must be made or upgraded)."""
    with db.read() as conn:
        if not db.engine.dialect.has_table(conn, meta_table.name):
            return False
        version = stamped_version(conn)
    if version is not None and int(version) > SCHEMA_VERSION:
        raise newer_schema(int(version))
    return version is not None and int(version) == SCHEMA_VERSION


def stamped_version(conn: Connection) -> str | None:
    return conn.execute(select(meta_table.c.value)
                        .where(meta_table.c.key == "schema_version")).scalar()


def migrate(conn: Connection, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise newer_schema(version)
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS.get(step, ()):
            if not already_added(conn, statement):
                conn.execute(text(statement))
    if version < SCHEMA_VERSION:
        conn.execute(update(meta_table).where(meta_table.c.key == "schema_version")
                     .values(value=str(SCHEMA_VERSION)))


def schema_version(db: "Database") -> int:
    """The version the database is stamped with."""
    with db.read() as conn:
        return int(conn.execute(select(meta_table.c.value)
                                .where(meta_table.c.key == "schema_version")).scalar_one())


def already_added(conn: Connection, statement: str) -> bool:
    """A table newer than the database's version was made whole by create_all just before
    the migration; its ADD COLUMN steps must then be skipped."""
    found = ADD_COLUMN.match(statement)
    if not found:
        return False
    table, column = found.groups()
    return column in {c["name"] for c in inspect(conn).get_columns(table)}


def newer_schema(version: int) -> DatabaseError:
    return DatabaseError(f"database schema version {version} is newer than this "
                         f"vlmguard understands ({SCHEMA_VERSION}); upgrade vlmguard")
