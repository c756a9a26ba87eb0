"""The rows vlmguard reads and writes, as frozen values, and the checks that decide
whether a row read back may be handed on. No SQL here: every part of the store and every
process shares these types, so they must not pull an engine or a table in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

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


def checked_row(cls: type, row: Any, kind: str, problem_of: Callable[[Any], str | None]) -> Any:
    """A frozen record from a row whose values were range-checked first: a row that fails
    is UnreadableRow (the caller quarantines it) rather than a record that breaks later."""
    mapping = row._mapping
    problem = problem_of(mapping)
    if problem:
        raise UnreadableRow(f"{kind} {mapping['id']}: {problem}")
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})


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
    node: str | None = None  # the box that recorded it

    @classmethod
    def from_row(cls, row: Any) -> "Job":
        return checked_row(cls, row, "job", job_problem)

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
    node: str | None = None  # the box whose notifier sends it

    @classmethod
    def from_row(cls, row: Any) -> "Delivery":
        return checked_row(cls, row, "delivery", delivery_problem)


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
