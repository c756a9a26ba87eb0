"""The site's boxes through this box's server: the node list, and a job's footage for an
analyzer on another box.

GET /api/nodes                    every box sharing the database: alive or last seen, its
                                  role, server and cameras
GET /api/jobs/{id}/footage.mp4    the video of a job recorded here, stream-copied into one
                                  MP4 (nothing decoded), behind the server's token

The footage is what this box's own analyzer would have read (the window in RAM, else the
archive stretch its sources name); it is copied into the RAM folder, sent, and deleted.
It shares the clip cutter's slots (MAX_CLIP_JOBS), its queue wait and its sending
deadline: another box fetching footage never takes more from the recording than a
person cutting clips does.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from aiohttp import web

from vlmguard.ffmpeg import ffmpeg_binary, last_line, parent_death_prefix, run_awaited
from vlmguard.jobvideo import job_video, mp4_copy_command
from vlmguard.layout import Layout
from vlmguard.logs import get_logger
from vlmguard.times import iso
from vlmguard.vlm import AnalysisError
from vlmguard.store.schema import MAX_ID
from vlmguard.web.database import read
from vlmguard.web.keys import CLIP_SLOTS_KEY
from vlmguard.web.params import checked_int, config_of
from vlmguard.web.scratch import ram_dir
from vlmguard.web.sending import not_found, send_clip, take_slot

log = get_logger("vlmguard.web.nodes")

COPY_TIMEOUT_SECONDS = 120.0


def add_node_routes(app: web.Application) -> None:
    app.router.add_get("/api/nodes", list_nodes)
    app.router.add_get("/api/jobs/{id}/footage.mp4", job_footage)


async def list_nodes(request: web.Request) -> web.Response:
    found = await read(request, lambda config, store: store.nodes.all())
    return web.json_response({
        "node": config_of(request).node_name,
        "nodes": [dict(n, started_at=iso(n["started_at"]), heartbeat_at=iso(n["heartbeat_at"]),
                       live=[{"camera": c, "hls_url": f"{n['public_url']}/live/{c}/index.m3u8"}
                             for c in n["cameras"]])
                  for n in found]})


async def job_footage(request: web.Request) -> web.StreamResponse:
    job_id = checked_int(request.match_info["id"], "id", 0, MAX_ID)
    config = config_of(request)
    job = await read(request, lambda config, store: store.reports.get(job_id))
    if job is None:
        raise not_found(f"no job {job_id}")
    here = config.node_name
    if (job.node or here) != here:
        raise not_found(f"job {job_id} was recorded on node {job.node}, not on {here}")
    slots = await take_slot(request, CLIP_SLOTS_KEY, "busy cutting other clips, retry shortly")
    workdir = Path(tempfile.mkdtemp(prefix="vlmguard-footage-", dir=ram_dir()))
    try:
        try:
            source = await asyncio.to_thread(job_video, Layout(config.data_dir), job, workdir)
        except AnalysisError as exc:
            raise not_found(str(exc)) from None
        if not await asyncio.to_thread(source.exists):
            raise not_found(f"footage of job {job_id} is gone: {source.name}")
        path = await copy_footage(ffmpeg_binary(), source, workdir / "footage.mp4")
        return await send_clip(request, path, {
            "Content-Type": "video/mp4", "Cache-Control": "private, no-store",
            "Content-Disposition": f'inline; filename="job-{job_id}.mp4"',
            "X-Clip-Start": iso(job.first_frame_at)})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        slots.release()


async def copy_footage(binary: str, source: Path, target: Path) -> Path:
    """The stream copy, awaited (the loop serves on); cancelling it kills FFmpeg."""
    code, _, stderr = await run_awaited([*parent_death_prefix(),
                                         *mp4_copy_command(binary, source, target)],
                                        COPY_TIMEOUT_SECONDS)
    if code != 0 or not target.exists() or target.stat().st_size == 0:
        log.warning("footage not copied", error=last_line(stderr))
        raise web.HTTPInternalServerError(
            text='{"error": "the footage could not be copied (see the log)"}',
            content_type="application/json")
    return target
