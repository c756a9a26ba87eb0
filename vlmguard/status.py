"""What `vlmguard status` reports, gathered from the job table into plain data.

Gathering and rendering are separate so the CLI's --json, its text view and (later) the
REST API all show the same facts under the same keys.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vlmguard.config import Config
from vlmguard.errors import DatabaseError
from vlmguard.store import STATES, Job, JobStore, redact_url, utcnow


def gather_status(config: Config) -> dict[str, Any]:
    report: dict[str, Any] = {
        "config": str(config.source),
        "database": {"url": redact_url(config.database_url), "ready": False, "error": None},
        "cameras": [{"id": c.id} for c in config.cameras],
        "jobs": dict.fromkeys(STATES, 0) | {"by_camera": {}, "oldest_pending_age_s": None},
        "failures": [],
    }
    try:
        store = JobStore.from_config(config, create=False)
    except DatabaseError as exc:
        report["database"]["error"] = str(exc)
        return report
    with store:
        report["database"]["ready"] = True
        counts = store.counts()
        oldest = store.oldest_pending()
        failures = store.recent_failures(5)
    for camera_id, states in counts.items():
        for state, n in states.items():
            report["jobs"][state] += n
    report["jobs"]["by_camera"] = counts
    report["jobs"]["oldest_pending_age_s"] = age_seconds(oldest)
    report["failures"] = [job_summary(job) for job in failures]
    return report


def age_seconds(when: datetime | None) -> float | None:
    return round((utcnow() - when).total_seconds(), 1) if when else None


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "camera_id": job.camera_id, "status": job.status,
        "segment_start": iso(job.segment_start), "segment_end": iso(job.segment_end),
        "retry_count": job.retry_count, "max_retries": job.max_retries,
        "worker_id": job.worker_id, "safety_score": job.safety_score,
        "incident_count": job.incident_count, "error_message": job.error_message,
        "video_path": job.video_path, "created_at": iso(job.created_at),
        "completed_at": iso(job.completed_at),
    }


def job_detail(job: Job, incident_rows: list[dict[str, Any]]) -> dict[str, Any]:
    return job_summary(job) | {
        "started_at": iso(job.started_at), "run_after": iso(job.run_after),
        "lease_expires_at": iso(job.lease_expires_at),
        "tokens": {"prompt": job.prompt_tokens, "output": job.output_tokens,
                   "total": job.total_tokens},
        "analysis_result": job.analysis_result,
        "incidents": [{k: iso(v) if isinstance(v, datetime) else v for k, v in row.items()}
                      for row in incident_rows],
    }


def iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None


def render_status(report: dict[str, Any]) -> str:
    lines = [f"config    {report['config']}",
             f"database  {report['database']['url']}"]
    if report["database"]["error"]:
        lines.append(f"          {report['database']['error']}")
    jobs = report["jobs"]
    lines.append("jobs      " + "  ".join(f"{s} {jobs[s]}" for s in STATES))
    if jobs["oldest_pending_age_s"] is not None:
        lines.append(f"          oldest pending {format_age(jobs['oldest_pending_age_s'])} ago")
    lines.append("cameras")
    for camera in report["cameras"]:
        states = jobs["by_camera"].get(camera["id"], dict.fromkeys(STATES, 0))
        lines.append(f"  {camera['id']:<20} " + "  ".join(f"{s} {states[s]}" for s in STATES))
    if report["failures"]:
        lines.append("last failures")
        for job in report["failures"]:
            lines.append(f"  job {job['id']} {job['camera_id']} {job['segment_start']}: "
                         f"{job['error_message']}")
    return "\n".join(lines)


def format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
