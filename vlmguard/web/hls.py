"""The HLS file server (aiohttp), run inside the streaming process.

It serves what FFmpeg wrote under live/<camera>/, adjusting the playlist on the way out:
one playlist across FFmpeg restarts (see livelist.py), a constant EXT-X-TARGETDURATION,
an EXT-X-START three target durations from the end, and the token carried on to segment
URLs. It never serves a stale playlist: a camera whose playlist gained no segment for the
stale limit answers 503 with Retry-After, so players retry instead of spinning on old
video (one cause of the seed's "old video after coming back").
"""

from __future__ import annotations

import math
import re
import time
from urllib.parse import quote

from aiohttp import web

from vlmguard.layout import Layout, stale_after
from vlmguard.livelist import Window, render, served_window
from vlmguard.web.keys import CONFIG_KEY, TARGETS_KEY

SEGMENT_NAME = re.compile(r"seg-\d{1,20}\.ts")
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"


def add_hls_routes(app: web.Application) -> None:
    app[TARGETS_KEY] = {}  # camera -> largest target duration served, so it never shrinks
    app.router.add_get("/live/{camera}/index.m3u8", playlist)
    app.router.add_get("/live/{camera}/{segment}", segment)


def known_camera(request: web.Request) -> str:
    camera_id = request.match_info["camera"]
    if request.app[CONFIG_KEY].camera(camera_id) is None:
        raise web.HTTPNotFound(text="not found\n")
    return camera_id


async def playlist(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    camera_id = known_camera(request)
    window = served_window(Layout(config.data_dir), camera_id, config.storage.live_segments)
    if not window.segments or time.time() - window.fresh_at > stale_after(config):
        retry = str(config.storage.segment_seconds)
        raise web.HTTPServiceUnavailable(text=f"camera {camera_id} is offline\n",
                                         headers={"Retry-After": retry})
    targets = request.app[TARGETS_KEY]
    target = max(targets.get(camera_id, 0), config.storage.segment_seconds,
                 longest_segment(window))
    targets[camera_id] = target
    token = request.query.get("token", "")
    body = render(window, target, f"?token={quote(token, safe='')}" if token else "")
    return web.Response(text=body, content_type=PLAYLIST_TYPE,
                        headers={"Cache-Control": "no-cache"})


def longest_segment(window: Window) -> int:
    return math.ceil(max((s.duration for s in window.segments), default=0) - 0.01)


async def segment(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    camera_id = known_camera(request)
    name = request.match_info["segment"]
    if not SEGMENT_NAME.fullmatch(name):
        raise web.HTTPNotFound(text="not found\n")
    live_dir = Layout(config.data_dir).live(camera_id).resolve()
    path = (live_dir / name).resolve()
    if path.parent != live_dir or not path.is_file():
        raise web.HTTPNotFound(text="not found\n")
    # Segment names carry an ever-growing sequence number: a name is never reused. Behind
    # a token, no shared cache may keep a copy for clients that have none.
    scope = "private" if config.server.token else "public"
    return web.FileResponse(path, headers={"Content-Type": "video/mp2t",
                                           "Cache-Control": f"{scope}, max-age=60"})
