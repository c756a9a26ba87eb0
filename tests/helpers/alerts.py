"""Incidents and analysed windows for the alert tests, stored as an analyzer stores them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from vlmguard.store.bundle import Store
from vlmguard.store.records import IncidentRecord, Outcome

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
CAMERAS = """
[[cameras]]
id = "dock-2"
url = "lavfi:testsrc2"
[[cameras]]
id = "gate"
url = "lavfi:testsrc2"
"""


def incident(offset: float, category: str = "fall", severity: str = "high") -> IncidentRecord:
    return IncidentRecord(T0 + timedelta(seconds=offset), T0 + timedelta(seconds=offset + 2),
                          category, severity, f"{category} at {offset}", 0.9)


def store_window(store: Store, camera: str, start: datetime,
                 incidents: list[IncidentRecord], score: int = 40) -> int:
    """An analysed window with its incidents, through the public API as an analyzer does."""
    job_id = store.queue.register(camera, f"/a/{camera}/{start:%H%M%S}.mp4", start,
                                  start + timedelta(minutes=10))
    job = store.queue.claim("w")
    assert job.id == job_id
    store.queue.complete(job, Outcome(result={"summary": "a window", "safety_score": score},
                                      safety_score=score, incidents=incidents))
    return job_id
