"""Process bodies for the queue tests (importable, so spawned children can run them)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

from vlmguard.store.bundle import Store

from vlmguard.store.records import Outcome


def drain(url: str, worker_id: str, out, start) -> None:
    """Claim and complete until the queue is empty; report the ids and any error."""
    claimed, error = [], None
    try:
        with Store(url, lease_seconds=60) as store:
            start.wait()
            while (job := store.queue.claim(worker_id)) is not None:
                store.queue.complete(job, Outcome(result={"w": worker_id}, safety_score=100))
                claimed.append(job.id)
    except Exception as exc:  # the test asserts that nothing escaped
        error = f"{type(exc).__name__}: {exc}"
    out.put((worker_id, claimed, error))


def claim_and_hang(url: str, lease_seconds: float, out) -> None:
    """Claim one job, say which, then hang without heartbeating until killed."""
    with Store(url, lease_seconds=lease_seconds) as store:
        job = store.queue.claim("doomed")
        out.put(job.id if job else None)
        time.sleep(3600)


def register_forever(url: str, camera_id: str, out) -> None:
    """Register jobs as fast as possible, reporting each id only once it is committed."""
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with Store(url) as store:
        n = 0
        while True:
            start = base + timedelta(minutes=n)
            job_id = store.queue.register(camera_id, f"/a/{camera_id}/{n}.mp4", start,
                                          start + timedelta(minutes=10))
            out.put(job_id)
            n += 1


def wait_and_claim(url: str, poll_seconds: float, out) -> None:
    """Block in next_job; report how long after the registration stamp the claim came."""
    with Store(url, poll_seconds=poll_seconds) as store:
        out.put(("ready", os.getpid()))
        job = store.queue.next_job("waiter", timeout=60)
        out.put(("claimed", job.id if job else None, time.time()))
