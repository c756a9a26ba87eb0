"""The HLS server (aiohttp), run inside the streaming process.

One live URL per camera, /live/<camera>/index.m3u8. A low-latency camera's playlist comes
from its LiveStream (llhls.py): LL-HLS with parts, a preload hint and blocking playlist
reload (_HLS_msn, _HLS_part; _HLS_skip for a delta update when the playlist is long
enough), fMP4 segments every HLS player can play. Otherwise it serves what FFmpeg wrote
under live/<camera>/, adjusting the playlist on the way out: one playlist across FFmpeg
restarts (see livelist.py), a constant EXT-X-TARGETDURATION, an EXT-X-START three target
durations from the end. Either way the token is carried on to every URI, and a stale
playlist is never served: a camera whose playlist gained no segment for the stale limit
answers 503 with Retry-After, so players retry instead of spinning on old video, and
come back to new video, not old, when the camera does.

Another box's camera (site-wide, from the nodes table) is passed through to that box
(proxy.live_from_home): same URL, same token, 503 while that box is down.

A blocking request waits on its camera's one shared future (no thread, no file): it holds
its connection like any client, within server.max_connections.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from urllib.parse import quote

from aiohttp import web

from vlmguard.fmp4 import init_size
from vlmguard.layout import Layout, stale_after
from vlmguard.livelist import Window, render, served_window
from vlmguard.llhls import LiveStream
from vlmguard.web.keys import CONFIG_KEY, LIVE_KEY, TARGETS_KEY
from vlmguard.web.proxy import add_live_proxy, live_from_home

SEGMENT_NAME = re.compile(r"seg-\d{1,20}\.(ts|mp4)")
FRAGMENTS_NAME = re.compile(r"(seg-\d{1,20})\.m4s")  # an fMP4 segment without its init section
INIT_NAME = re.compile(r"init-\d{1,20}\.mp4")
PART_NAME = re.compile(r"part-(\d{1,20})-(\d{1,9})\.m4s")
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
MEDIA_TYPES = {".ts": "video/mp2t", ".mp4": "video/mp4", ".m4s": "video/mp4"}
# A blocking request is answered within this many target durations, or gets 503.
BLOCK_TARGETS = 3
NUMBER = re.compile(r"\d{1,20}")


def add_hls_routes(app: web.Application) -> None:
    app[TARGETS_KEY] = {}  # camera -> largest target duration served, so it never shrinks
    app[LIVE_KEY] = {}  # camera -> LiveStream, filled by the streaming process
    add_live_proxy(app)
    app.router.add_get("/live/{camera}/index.m3u8", playlist)
    app.router.add_get("/live/{camera}/{segment}", segment)


def elsewhere(request: web.Request) -> str | None:
    """The camera asked for when it is not this box's (another box's, perhaps)."""
    camera_id = request.match_info["camera"]
    return camera_id if request.app[CONFIG_KEY].camera(camera_id) is None else None


def live_stream(request: web.Request, camera_id: str) -> LiveStream | None:
    stream = request.app[LIVE_KEY].get(camera_id)
    return stream if stream is not None and stream.serving else None


def token_query(request: web.Request) -> str:
    token = request.query.get("token", "")
    return f"?token={quote(token, safe='')}" if token else ""


def offline(config, camera_id: str) -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(text=f"camera {camera_id} is offline\n",
                                      headers={"Retry-After": str(config.storage.segment_seconds)})


def playlist_response(body: str) -> web.Response:
    return web.Response(text=body, content_type=PLAYLIST_TYPE,
                        headers={"Cache-Control": "no-cache"})


async def playlist(request: web.Request) -> web.Response:
    if (other := elsewhere(request)) is not None:
        return await live_from_home(request, other)
    config = request.app[CONFIG_KEY]
    camera_id = request.match_info["camera"]
    stream = live_stream(request, camera_id)
    if stream is not None:
        return await low_latency_playlist(request, stream, camera_id)
    window = served_window(Layout(config.data_dir), camera_id, config.storage.live_segments)
    if not window.segments or time.time() - window.fresh_at > stale_after(config):
        raise offline(config, camera_id)
    targets = request.app[TARGETS_KEY]
    target = max(targets.get(camera_id, 0), config.storage.segment_seconds,
                 longest_segment(window))
    targets[camera_id] = target
    return playlist_response(render(window, target, token_query(request)))


def blocking_query(query) -> tuple[int | None, int | None, bool]:
    """(_HLS_msn, _HLS_part, whether a delta update was asked for); ValueError names a bad one."""
    msn, part = query.get("_HLS_msn"), query.get("_HLS_part")
    if part is not None and msn is None:
        raise ValueError("_HLS_part needs _HLS_msn")
    for name, value in (("_HLS_msn", msn), ("_HLS_part", part)):
        if value is not None and not NUMBER.fullmatch(value):
            raise ValueError(f"{name} must be a whole number, got {value[:20]!r}")
    return (int(msn) if msn is not None else None, int(part) if part is not None else None,
            query.get("_HLS_skip") in ("YES", "v2"))


async def low_latency_playlist(request: web.Request, stream: LiveStream,
                               camera_id: str) -> web.Response:
    config = request.app[CONFIG_KEY]
    try:
        msn, part, skip = blocking_query(request.query)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    if msn is not None:
        await wait_for_part(stream, msn, part, camera_id, config)
    if time.time() - stream.fresh_at > stale_after(config):
        raise offline(config, camera_id)
    body = stream.playlist(skip, token_query(request))
    if body is None:
        raise offline(config, camera_id)
    return playlist_response(body)


async def wait_for_part(stream: LiveStream, msn: int, part: int | None, camera_id: str,
                        config) -> None:
    """Hold a blocking playlist request until the playlist holds segment msn (part: its
    part), answering at once the moment it does. Too far ahead: 400, as the spec says."""
    if stream.has(msn, part):
        return
    if stream.too_far(msn, part):
        raise web.HTTPBadRequest(text=f"_HLS_msn={msn} _HLS_part={part} is further ahead "
                                      "than the playlist will be soon\n")
    if not await stream.wait_for(msn, part, BLOCK_TARGETS * stream.target):
        raise web.HTTPServiceUnavailable(
            text=f"camera {camera_id}: no part {msn}.{part} within "
                 f"{BLOCK_TARGETS} target durations\n", headers={"Retry-After": "1"})


def longest_segment(window: Window) -> int:
    return math.ceil(max((s.duration for s in window.segments), default=0) - 0.01)


def media_headers(config, suffix: str) -> dict[str, str]:
    # Media names carry ever-growing numbers: a name is never reused. Behind a token, no
    # shared cache may keep a copy for clients that have none.
    scope = "private" if config.server.token else "public"
    return {"Content-Type": MEDIA_TYPES[suffix], "Cache-Control": f"{scope}, max-age=60"}


async def segment(request: web.Request) -> web.StreamResponse:
    if (other := elsewhere(request)) is not None:
        return await live_from_home(request, other)
    config = request.app[CONFIG_KEY]
    camera_id = request.match_info["camera"]
    name = request.match_info["segment"]
    part = PART_NAME.fullmatch(name)
    if part is not None:
        return await part_response(request, camera_id, int(part.group(1)), int(part.group(2)))
    fragments = FRAGMENTS_NAME.fullmatch(name)
    file_name = fragments.group(1) + ".mp4" if fragments else name
    if not (SEGMENT_NAME.fullmatch(file_name) or INIT_NAME.fullmatch(file_name)):
        raise web.HTTPNotFound(text="not found\n")
    live_dir = Layout(config.data_dir).live(camera_id).resolve()
    path = (live_dir / file_name).resolve()
    if path.parent != live_dir or not path.is_file():
        raise web.HTTPNotFound(text="not found\n")
    if fragments is None:
        return web.FileResponse(path, headers=media_headers(config, path.suffix))
    # seg-N.mp4 is a whole file (init section, then fragments); players that had the init
    # section from EXT-X-MAP get the fragments alone. tmpfs: one read, no disk.
    try:
        with open(path, "rb") as handle:
            handle.seek(init_size(path))
            body = handle.read()
    except OSError:
        raise web.HTTPNotFound(text="not found\n") from None
    return web.Response(body=body, headers=media_headers(config, ".m4s"))


async def part_response(request: web.Request, camera_id: str, run: int,
                        number: int) -> web.Response:
    """A part, from memory or its segment's file. The part the preload hint names is
    answered the moment it is complete; one that is gone (or never was) is 404."""
    config = request.app[CONFIG_KEY]
    stream = request.app[LIVE_KEY].get(camera_id)
    if stream is None:
        raise web.HTTPNotFound(text="not found\n")
    data = stream.part_data(run, number)
    if data is None and stream.is_coming(run, number):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BLOCK_TARGETS * stream.target
        while data is None and stream.is_coming(run, number):
            remaining = deadline - loop.time()
            if remaining <= 0 or not await stream.next_change(remaining):
                break
            data = stream.part_data(run, number)
    if data is None:
        raise web.HTTPNotFound(text="not found\n")
    return web.Response(body=data, headers=media_headers(config, ".m4s"))
