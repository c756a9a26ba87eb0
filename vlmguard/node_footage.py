"""A job's footage from the box that recorded it, for an analyzer on another box.

Footage stays where it was recorded; a job recorded on another node is fetched from that
node's server (GET /api/jobs/ID/footage.mp4, the window's video stream-copied into one
MP4: nothing decoded on the recording box) with the token the boxes share, into the
job's RAM folder here, and analysed like local footage; the folder is removed after the
job. The copy is bounded in size (storage.ram_max_mb) and time.

A recording node that is down, unreachable or busy is no fault of the job: FootageAway
puts it back uncharged, to be tried again later. Footage its node no longer has (404)
fails the job like a missing archive does on one box.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vlmguard.vlm import AnalysisError

CONNECT_TIMEOUT = 10.0
# The whole transfer: a base plus a second per FETCH_RATE bytes received so far.
FETCH_BASE_SECONDS = 60.0
FETCH_RATE = 1 << 20
CHUNK = 256 * 1024
# How long a job whose node is unreachable or busy waits before it is tried again; one
# whose node is down (no heartbeat) waits longer: a down box's backlog is put back once per
# DOWN_RETRY_SECONDS, not churned through by every analyzer.
AWAY_RETRY_SECONDS = 15.0
DOWN_RETRY_SECONDS = 30.0


class FootageAway(Exception):
    """The recording node cannot hand the footage over now: the job waits, uncharged."""

    def __init__(self, message: str, retry_in: float = AWAY_RETRY_SECONDS):
        super().__init__(message)
        self.retry_in = retry_in


def footage_url(public_url: str, job_id: int) -> str:
    return f"{public_url.rstrip('/')}/api/jobs/{job_id}/footage.mp4"


def fetch_footage(node: dict[str, Any] | None, job: Any, token: str, target: Path,
                  max_bytes: int, keep_alive=lambda: None) -> tuple[Path, int]:
    """The job's footage from its recording node into target; (target, bytes)."""
    if node is None:
        raise FootageAway(f"node {job.node} (where job {job.id} was recorded) has never "
                          "joined this database", retry_in=DOWN_RETRY_SECONDS)
    if not node["alive"]:
        raise FootageAway(f"node {job.node} is down (last seen {node['last_seen_s']:.0f} s "
                          "ago): the job waits for it", retry_in=DOWN_RETRY_SECONDS)
    url = footage_url(node["public_url"], job.id)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT) as response:
            size = int(response.headers.get("Content-Length") or 0)
            if size > max_bytes:
                raise AnalysisError(f"footage of job {job.id} on node {job.node} is {size} "
                                    f"bytes, more than storage.ram_max_mb allows here",
                                    retryable=False)
            return target, copy_body(response, target, max_bytes, keep_alive, job)
    except urllib.error.HTTPError as exc:
        raise problem(exc, job) from None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
        raise FootageAway(f"node {job.node} at {node['public_url']} unreachable: "
                          f"{getattr(exc, 'reason', None) or exc}") from None


def copy_body(response, target: Path, max_bytes: int, keep_alive, job: Any) -> int:
    received = 0
    started = time.monotonic()
    with open(target, "wb") as out:
        while chunk := response.read(CHUNK):
            received += len(chunk)
            if received > max_bytes:
                raise AnalysisError(f"footage of job {job.id} on node {job.node} is more "
                                    "than storage.ram_max_mb allows here", retryable=False)
            if time.monotonic() - started > FETCH_BASE_SECONDS + received / FETCH_RATE:
                raise FootageAway(f"node {job.node} sends the footage too slowly")
            out.write(chunk)
            keep_alive()
    if received == 0:
        raise FootageAway(f"node {job.node} sent no footage")
    return received


def problem(exc: urllib.error.HTTPError, job: Any) -> Exception:
    try:
        detail = json.loads(exc.read(4096) or b"{}").get("error", "")
    except (ValueError, OSError, AttributeError):
        detail = ""
    detail = f"{exc.code} {detail or exc.reason}"
    if exc.code in (404, 410):
        return AnalysisError(f"footage gone on node {job.node}: {detail}", retryable=False)
    if exc.code in (401, 403):
        # Not the job's fault: the boxes' server.token differ. It waits for the fix.
        return FootageAway(f"node {job.node} refused this box's token ({detail}): give "
                           "every box the same server.token", retry_in=60.0)
    return FootageAway(f"node {job.node} cannot serve the footage now: {detail}")
