"""Recordings behind the API's auth: what is on disk, played by time, exported, previewed.

GET /api/recordings?camera=ID&start=ISO&end=ISO          spans and gaps (JSON)
GET /api/recordings/{camera}/index.m3u8?start=ISO&end=ISO   HLS VOD over the archives
    (or &duration=S); without end or duration: an EVENT playlist growing into live
GET /api/recordings/{camera}/files/{name}                 an archive's bytes, Range honoured
GET /api/recordings/{camera}/files/{name}/segment.ts?t=&frames=   MP4 archive -> MPEG-TS
GET /api/recordings/{camera}/thumbnail.jpg?at=ISO         the minute's thumbnail
GET /api/recordings/{camera}/export.mp4?start=ISO&end=ISO   one MP4 (<= 1 h), streamed

Segments are byte ranges of the archives, read from a file descriptor opened once per
request: retention may delete the file meanwhile, the response still completes (no half
segment); a file already gone is a 404 naming it, never a 500. Nothing is written to disk
to serve any of this: indexes missing a sidecar live in memory (recordings.Catalog), MP4
segments and on-request thumbnails are FFmpeg's stdout, exports stream through a pipe.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from vlmguard.ffmpeg import child_env, ffmpeg_binary, last_line, run_awaited
from vlmguard.layout import ARCHIVE_NAME, Layout, archive_start
from vlmguard.logs import get_logger
from vlmguard.recordings import (MAX_EXPORT_SECONDS, MAX_LIST_SECONDS, MAX_PLAYLIST_SECONDS,
                                 Catalog, export_command, export_list, find_file, hold,
                                 open_export, live_edge, mp4_segment_command, plan_export,
                                 plan_playlist, render_playlist, span_report, stored_thumbnail,
                                 make_thumbnail)
from vlmguard.times import iso
from vlmguard.web.params import BadParameter, config_of, since_param
from vlmguard.web.scratch import ram_dir
from vlmguard.web.sending import take_slot

log = get_logger("vlmguard.web.recordings")

CATALOG_KEY = web.AppKey("recordings_catalog", list)  # the Catalog, made on first use
FFMPEG_SLOTS_KEY = web.AppKey("recordings_ffmpeg_slots", asyncio.Semaphore)
EXPORT_SLOTS_KEY = web.AppKey("recordings_export_slots", asyncio.Semaphore)
FFMPEG_JOBS = 2  # MP4 segments and on-request thumbnails cut at once
EXPORT_JOBS = 2
CHUNK = 256 * 1024
SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
FFMPEG_TIMEOUT = 60.0
EARLIEST, LATEST = 1970, 9000  # a day either side stays a valid datetime


def add_recording_routes(app: web.Application) -> None:
    app[CATALOG_KEY] = []
    app[FFMPEG_SLOTS_KEY] = asyncio.Semaphore(FFMPEG_JOBS)
    app[EXPORT_SLOTS_KEY] = asyncio.Semaphore(EXPORT_JOBS)
    app.router.add_get("/api/recordings", spans)
    app.router.add_get("/api/recordings/{camera}/index.m3u8", playlist)
    app.router.add_get("/api/recordings/{camera}/files/{name}", archive_bytes)
    app.router.add_get("/api/recordings/{camera}/files/{name}/segment.ts", mp4_segment)
    app.router.add_get("/api/recordings/{camera}/thumbnail.jpg", thumbnail)
    app.router.add_get("/api/recordings/{camera}/export.mp4", export)


def catalog_of(request: web.Request) -> Catalog:
    """One catalog per app, made on first use (the config's data dir and FFmpeg)."""
    holder = request.app[CATALOG_KEY]
    if not holder:
        holder.append(Catalog(Layout(config_of(request).data_dir), ffmpeg_binary()))
    return holder[0]


def json_error(kind: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": message}), content_type="application/json",
                headers=headers or None)


def camera_of(request: web.Request, name: str | None = None) -> str:
    camera = request.match_info.get("camera") if name is None else request.query.get(name)
    if not camera or config_of(request).camera(camera) is None:
        if name is None:
            raise json_error(web.HTTPNotFound, f"no camera {camera!r}")
        raise BadParameter(name, "required: the id of a configured camera")
    return camera


def now() -> datetime:
    return datetime.now(timezone.utc)


def time_param(request: web.Request, name: str) -> datetime | None:
    """An ISO 8601 time (since_param), within years the arithmetic around it can hold."""
    when = since_param(request, name)
    if when is not None and not EARLIEST <= when.year <= LATEST:
        raise BadParameter(name, f"out of range: years {EARLIEST}-{LATEST}")
    return when


def seconds_param(request: web.Request, name: str, longest: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    problem = f"must be seconds, more than 0 and at most {longest:g}"
    if not SECONDS.fullmatch(raw) or not 0 < float(raw) <= longest:
        raise BadParameter(name, problem)
    return float(raw)


def time_range(request: web.Request, longest: float, *, open_end: bool = False,
               default_start: datetime | None = None) -> tuple[datetime, datetime | None]:
    """start (required unless defaulted) and end, from end= or duration=. open_end: neither
    given is allowed (None: up to the live edge)."""
    start = time_param(request, "start") or default_start
    if start is None:
        raise BadParameter("start", "required: an ISO 8601 time, e.g. 2026-11-26T08:00:00Z")
    end = time_param(request, "end")
    duration = seconds_param(request, "duration", longest)
    if end is not None and duration is not None:
        raise BadParameter("duration", "give end or duration, not both")
    if duration is not None:
        end = start + timedelta(seconds=duration)
    if end is None and not open_end:
        if default_start is None:
            raise BadParameter("end", "required: an ISO 8601 time (or duration=seconds)")
        end = now()
    if end is not None:
        if end <= start:
            raise BadParameter("end", "must be after start")
        if (end - start).total_seconds() > longest:
            raise BadParameter("end", f"at most {longest:g} seconds after start")
    return start, end


def token_query(request: web.Request) -> str:
    token = request.query.get("token", "")
    return f"?token={quote(token, safe='')}" if token else ""


async def spans(request: web.Request) -> web.Response:
    camera = camera_of(request, "camera")
    start, end = time_range(request, MAX_LIST_SECONDS, default_start=now() - timedelta(days=1))
    config = config_of(request)
    catalog = catalog_of(request)

    def work() -> dict:
        edge = live_edge(catalog.layout, camera, config.storage.live_segments)
        report = span_report(catalog, camera, start, end, edge)
        for span in report["spans"]:
            span["playlist"] = (f"/api/recordings/{camera}/index.m3u8?start="
                                f"{quote(span['start'])}&end={quote(span['end'])}")
        return report
    return web.json_response(await asyncio.to_thread(work), headers={"Cache-Control": "no-cache"})


async def playlist(request: web.Request) -> web.Response:
    camera = camera_of(request)
    start, end = time_range(request, MAX_PLAYLIST_SECONDS, open_end=True)
    moment = now()
    growing = end is None or end > moment
    if end is None:
        start = max(start, moment - timedelta(seconds=MAX_PLAYLIST_SECONDS))
    until = end or moment + timedelta(days=1)
    catalog = catalog_of(request)
    segments = await asyncio.to_thread(plan_playlist, catalog, camera, start, until)
    if not segments:
        raise json_error(web.HTTPNotFound, f"no recorded video of {camera} from {iso(start)}"
                         + (f" to {iso(end)}" if end else ""))
    body = render_playlist(segments, ended=not growing, token_query=token_query(request))
    return web.Response(text=body, content_type=PLAYLIST_TYPE,
                        headers={"Cache-Control": "no-cache"})


def archive_path(request: web.Request, camera: str) -> Path:
    name = request.match_info["name"]
    if not ARCHIVE_NAME.fullmatch(name):
        raise json_error(web.HTTPNotFound, "not a recording's name")
    found = find_file(Layout(config_of(request).data_dir), camera, name)
    if found is None:
        raise gone(camera, name)
    return found.path


def gone(camera: str, name: str) -> web.HTTPException:
    return json_error(web.HTTPNotFound, f"recording {name} of {camera} is not on disk (deleted "
                      "by retention, or never recorded)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[first, last + 1) from a single-range Range header; None: the whole file."""
    if not header:
        return None
    match = RANGE.fullmatch(header.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if first:
        low, high = int(first), (int(last) + 1 if last else size)
    else:
        low, high = max(0, size - int(last)), size
    high = min(high, size)
    if low >= high:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return low, high


async def archive_bytes(request: web.Request) -> web.StreamResponse:
    camera = camera_of(request)
    path = archive_path(request, camera)
    try:
        descriptor = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    except FileNotFoundError:
        raise gone(camera, path.name) from None
    try:
        size = os.fstat(descriptor).st_size
        wanted = byte_range(request.headers.get("Range"), size)
        low, high = wanted or (0, size)
        kind = "video/mp2t" if path.suffix == ".ts" else "video/mp4"
        scope = "private" if config_of(request).server.token else "public"
        response = web.StreamResponse(status=206 if wanted else 200, headers={
            "Content-Type": kind, "Accept-Ranges": "bytes",
            # Bytes once written never change (a name is never reused).
            "Cache-Control": f"{scope}, max-age=3600"})
        if wanted:
            response.headers["Content-Range"] = f"bytes {low}-{high - 1}/{size}"
        response.content_length = high - low
        await response.prepare(request)
        try:
            if request.method != "HEAD":
                await send_bytes(response, descriptor, low, high)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the player went away (a seek aborts the segment it was loading)
        return response
    finally:
        os.close(descriptor)


async def send_bytes(response: web.StreamResponse, descriptor: int, low: int, high: int) -> None:
    """From the open file: a file deleted meanwhile still reads to the end."""
    at = low
    while at < high:
        chunk = await asyncio.to_thread(os.pread, descriptor, min(CHUNK, high - at), at)
        if not chunk:
            raise ConnectionResetError("recording shorter than its listed size")
        await response.write(chunk)
        at += len(chunk)






async def mp4_segment(request: web.Request) -> web.Response:
    camera = camera_of(request)
    path = archive_path(request, camera)
    if path.suffix == ".ts":
        raise json_error(web.HTTPNotFound, "an MPEG-TS archive is played by byte range")
    raw_time, raw_frames = request.query.get("t", ""), request.query.get("frames", "")
    if not SECONDS.fullmatch(raw_time):
        raise BadParameter("t", "must be seconds into the file")
    if not raw_frames.isascii() or not raw_frames.isdigit() or not 0 < int(raw_frames) <= 100_000:
        raise BadParameter("frames", "must be an integer 1-100000")
    catalog = catalog_of(request)
    recorded = next((f for f in await asyncio.to_thread(
        catalog.files, camera, *around(path)) if f.path.name == path.name), None)
    if recorded is None:
        raise gone(camera, path.name)
    index = await asyncio.to_thread(catalog.index, camera, recorded)
    origin = index.first if index is not None and index.first is not None else 0.0
    slots = await take_slot(request, FFMPEG_SLOTS_KEY, "busy with other recordings, retry shortly")
    try:
        # -ss counts from the file's start as FFmpeg demuxes it: the index's first time.
        code, out, err = await run_awaited(mp4_segment_command(
            catalog.binary, path, float(raw_time) - origin, int(raw_frames)), FFMPEG_TIMEOUT)
    finally:
        slots.release()
    if code != 0 or not out:
        if not path.exists():
            raise gone(camera, path.name)
        log.warning("mp4 segment not cut", camera_id=camera, file=path.name,
                    error=last_line(err))
        raise json_error(web.HTTPBadGateway, "the recording could not be cut (see the log)")
    return web.Response(body=out, content_type="video/mp2t",
                        headers={"Cache-Control": "private, max-age=3600"})


def around(path: Path) -> tuple[datetime, datetime]:
    start = archive_start(path)
    return start, start + timedelta(seconds=1)


async def thumbnail(request: web.Request) -> web.StreamResponse:
    camera = camera_of(request)
    at = time_param(request, "at")
    if at is None:
        raise BadParameter("at", "required: an ISO 8601 time")
    minute = at.replace(second=0, microsecond=0)
    catalog = catalog_of(request)
    found = await asyncio.to_thread(catalog.files, camera, minute, minute + timedelta(minutes=1))
    if not found:
        raise json_error(web.HTTPNotFound, f"no recorded video of {camera} at {iso(minute)}")
    recorded = found[0]
    stored = await asyncio.to_thread(stored_thumbnail, catalog.layout, camera, recorded, minute)
    if stored is not None:
        return web.FileResponse(stored, headers={"Content-Type": "image/jpeg",
                                                 "Cache-Control": "private, max-age=86400"})
    slots = await take_slot(request, FFMPEG_SLOTS_KEY, "busy with other recordings, retry shortly")
    try:
        picture = await asyncio.to_thread(picture_now, catalog, camera, recorded,
                                          max(minute, recorded.start))
    finally:
        slots.release()
    if picture is None:
        raise json_error(web.HTTPNotFound, f"no picture of {camera} at {iso(minute)}")
    # Made on request (footage not yet filed, or older than the sidecars): kept in memory
    # only, so a viewer costs the disk nothing; the archiver stores it when it files.
    return web.Response(body=picture, content_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=120"})


def picture_now(catalog: Catalog, camera: str, recorded, when: datetime) -> bytes | None:
    return make_thumbnail(catalog.binary, catalog.index(camera, recorded), recorded, when)


async def export(request: web.Request) -> web.StreamResponse:
    camera = camera_of(request)
    start, end = time_range(request, MAX_EXPORT_SECONDS)
    catalog = catalog_of(request)
    plan = await asyncio.to_thread(plan_export, catalog, camera, start, end)
    if plan is None:
        raise json_error(web.HTTPNotFound, f"no recorded video of {camera} from {iso(start)} "
                         f"to {iso(end)}")
    slots = await take_slot(request, EXPORT_SLOTS_KEY, "busy with other recordings, retry shortly")
    try:
        with hold(catalog.layout, camera, plan.names):
            try:
                descriptors = await asyncio.to_thread(open_export, plan)
            except FileNotFoundError:
                raise json_error(web.HTTPNotFound, f"recorded video of {camera} from "
                                 f"{iso(start)} was deleted meanwhile") from None
            try:
                return await stream_export(request, catalog, plan, descriptors)
            finally:
                for descriptor in descriptors:
                    os.close(descriptor)
    finally:
        slots.release()


async def stream_export(request: web.Request, catalog: Catalog, plan,
                        descriptors: list[int]) -> web.StreamResponse:
    """FFmpeg writes a fragmented MP4 to a pipe; each chunk goes to the client as it comes,
    so memory holds a GOP or so, whatever the export's length."""
    handle, list_name = tempfile.mkstemp(prefix="vlmguard-export-", suffix=".ffconcat",
                                         dir=ram_dir())
    with os.fdopen(handle, "w") as listing:
        listing.write(export_list(plan, descriptors))
    proc = await asyncio.create_subprocess_exec(
        *export_command(catalog.binary, Path(list_name), "pipe:1", streamed=True),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env(), pass_fds=descriptors)
    stderr = asyncio.create_task(proc.stderr.read())
    response = web.StreamResponse(headers={
        "Content-Type": "video/mp4", "Cache-Control": "private, no-store",
        "Content-Disposition": f'attachment; filename="{plan.filename()}"',
        "X-Export-Start": iso(plan.start), "X-Export-End": iso(plan.end)})
    try:
        first = await proc.stdout.read(CHUNK)
        if not first:
            await proc.wait()
            log.warning("export not made", camera_id=plan.camera_id, error=last_line(await stderr))
            raise json_error(web.HTTPBadGateway, "the recording could not be exported (see the log)")
        await response.prepare(request)
        chunk = first
        try:
            while chunk:
                await response.write(chunk)
                chunk = await proc.stdout.read(CHUNK)
        except ConnectionResetError:
            log.info("export abandoned by the client", camera_id=plan.camera_id)
            return response
        await proc.wait()
        if proc.returncode != 0:
            log.warning("export ended early", camera_id=plan.camera_id,
                        error=last_line(await stderr))
        await response.write_eof()
        log.info("export sent", camera_id=plan.camera_id, start=iso(plan.start),
                 seconds=round(plan.seconds, 1), files=len(plan.files))
        return response
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr.cancel()
        Path(list_name).unlink(missing_ok=True)
