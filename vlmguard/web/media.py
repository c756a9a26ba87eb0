"""Incident media behind the API's token: an incident's snapshot, its clip, any clip.

GET /api/incidents/{id}/snapshot.jpg   the JPEG the analyzer made of the middle frame
GET /api/incidents/{id}/clip.mp4       the incident with 5 s before and after
GET /api/clip?camera=ID&start=ISO&duration=S   any stretch of recorded video (<= 600 s)

A clip is cut by FFmpeg (clips.py) into a temporary file in RAM (/dev/shm), then served
with Range support so a <video> can seek, and deleted (web/sending.py: one deadline, at
most MAX_CLIP_JOBS at once, a reader that stops reading dropped). Its time 0 is the
wall-clock time in the X-Clip-Start header: the requested start, or later when the
footage begins later. Database reads go through web/database.read (a worker
thread), archive probing through asyncio.to_thread: the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import socket
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from aiohttp import web

from vlmguard.clips import (MAX_CLIP_SECONDS, ClipError, ClipPlan, cut_clip, middle, plan_clip,
                            save_snapshot)
from vlmguard.ffmpeg import ffmpeg_binary
from vlmguard.layout import Layout
from vlmguard.logs import get_logger
from vlmguard.store.schema import MAX_ID
from vlmguard.times import EXAMPLE, iso
from vlmguard.web.database import read
from vlmguard.web.params import BadParameter, checked_int, config_of, since_param
from vlmguard.web.keys import CLIP_SLOTS_KEY
from vlmguard.web.proxy import from_home, home_of
from vlmguard.web.scratch import ram_dir, room_for
from vlmguard.web.sending import MAX_CLIP_JOBS, not_found, send_clip, take_slot

log = get_logger("vlmguard.web.media")

INCIDENT_MARGIN = timedelta(seconds=5)
DURATION = re.compile(r"[0-9]{1,4}(\.[0-9]{1,3})?")
ANALYZER_ID = re.compile(r"(.+)-analyzer-[0-9]+")  # analyzer.worker_name: host-analyzer-N


def analysed_elsewhere(incident: dict) -> bool:
    """Whether another box's analyzer stored the incident (it had no footage for the
    picture); a picture this box's analyzer did not make stays missing, as on one box."""
    match = ANALYZER_ID.fullmatch(str(incident.get("worker_id") or ""))
    return match is not None and match.group(1) != socket.gethostname()


def add_media_routes(app: web.Application) -> None:
    app[CLIP_SLOTS_KEY] = asyncio.Semaphore(MAX_CLIP_JOBS)
    app.router.add_get("/api/incidents/{id}/snapshot.jpg", snapshot)
    app.router.add_get("/api/incidents/{id}/clip.mp4", incident_clip)
    app.router.add_get("/api/clip", clip)




async def incident_of(request: web.Request) -> dict:
    incident_id = checked_int(request.match_info["id"], "id", 0, MAX_ID)
    found = await read(request, lambda config, store: store.incidents.get_incident(incident_id))
    if found is None:
        raise not_found(f"no incident {incident_id}")
    return found


async def snapshot(request: web.Request) -> web.StreamResponse:
    incident = await incident_of(request)
    home = await home_of(request, incident["camera_id"])
    if home is not None:  # another box's camera: its picture is there
        return await from_home(request, home)
    config = config_of(request)
    layout = Layout(config.data_dir)
    path = layout.snapshot(incident["camera_id"], incident["id"])
    if not await asyncio.to_thread(path.is_file) and config.camera(incident["camera_id"]) \
            and analysed_elsewhere(incident):
        # Analysed on another box, which had no footage to make it from: made here, once.
        async with request.app[CLIP_SLOTS_KEY]:
            await asyncio.to_thread(save_snapshot, ffmpeg_binary(), layout,
                                    incident["camera_id"], incident["id"], middle(incident))
    if not await asyncio.to_thread(path.is_file):
        raise not_found(f"no snapshot of incident {incident['id']} (none made, or its "
                        "footage was deleted)")
    # An incident's picture never changes once made.
    return web.FileResponse(path, headers={"Content-Type": "image/jpeg",
                                           "Cache-Control": "private, max-age=86400"})


async def incident_clip(request: web.Request) -> web.StreamResponse:
    incident = await incident_of(request)
    home = await home_of(request, incident["camera_id"])
    if home is not None:  # another box's camera: cut there, from its recording
        return await from_home(request, home)
    start = incident["start_at"] - INCIDENT_MARGIN
    seconds = (incident["end_at"] + INCIDENT_MARGIN - start).total_seconds()
    return await serve_clip(request, incident["camera_id"], start, min(seconds, MAX_CLIP_SECONDS),
                            f"incident-{incident['id']}")


async def clip(request: web.Request) -> web.StreamResponse:
    camera = request.query.get("camera")
    if not camera or config_of(request).camera(camera) is None:
        raise BadParameter("camera", "required: the id of a configured camera")
    start = start_param(request)
    seconds = duration_param(request)
    return await serve_clip(request, camera, start, seconds,
                            f"{camera}-{start:%Y%m%dT%H%M%SZ}")


def start_param(request: web.Request) -> datetime:
    when = since_param(request, "start")
    if when is None:
        raise BadParameter("start", f"required: an ISO 8601 time, e.g. {EXAMPLE}")
    return when


def duration_param(request: web.Request) -> float:
    raw = request.query.get("duration", "60")
    problem = f"must be seconds, more than 0 and at most {MAX_CLIP_SECONDS}"
    if not DURATION.fullmatch(raw):
        raise BadParameter("duration", problem)
    seconds = float(raw)
    if not 0 < seconds <= MAX_CLIP_SECONDS or not math.isfinite(seconds):
        raise BadParameter("duration", problem)
    return seconds


async def serve_clip(request: web.Request, camera_id: str, start: datetime, seconds: float,
                     name: str) -> web.StreamResponse:
    slots = await take_slot(request, CLIP_SLOTS_KEY, "busy cutting other clips, retry shortly")
    workdir = None
    try:
        config = config_of(request)
        binary = ffmpeg_binary()
        plan = await asyncio.to_thread(plan_clip, binary, Layout(config.data_dir), camera_id,
                                       start, seconds)
        if plan is None:
            raise not_found(f"no recorded video of {camera_id} from {iso(start)} "
                            f"for {seconds:g} s")
        if not room_for(plan.expected_bytes):
            raise web.HTTPServiceUnavailable(
                text='{"error": "not enough free memory for this clip now: ask for a '
                     'shorter one or retry later"}',
                content_type="application/json", headers={"Retry-After": "30"})
        workdir = Path(tempfile.mkdtemp(prefix="vlmguard-clip-", dir=ram_dir()))
        try:
            path = await cut_clip(binary, plan, workdir)
        except ClipError as exc:
            log.warning("clip not cut", camera_id=camera_id, error=str(exc))
            raise web.HTTPInternalServerError(
                text='{"error": "the recording could not be cut (see the log)"}',
                content_type="application/json") from None
        return await send_clip(request, path, clip_headers(plan, name))
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        slots.release()










def clip_headers(plan: ClipPlan, name: str) -> dict[str, str]:
    return {"Content-Type": "video/mp4", "Cache-Control": "private, no-store",
            "Content-Disposition": f'inline; filename="{name}.mp4"',
            "X-Clip-Start": iso(plan.start)}


