"""The HLS file server (aiohttp), run inside the streaming process.

It serves what FFmpeg wrote under live/<camera>/, adjusting the playlist on the way out:
one playlist across FFmpeg restarts (see livelist.py), a constant EXT-X-TARGETDURATION,
an EXT-X-START three target durations from the end, and the token carried on to segment
URLs. It never serves a stale playlist: a camera whose playlist gained no segment for the
stale limit answers 503 with Retry-After, so players retry instead of spinning on old
video (one cause of the seed's "old video after coming back").
"""

from __future__ import annotations

import hmac
import html
import math
import re
import time
from urllib.parse import quote

from aiohttp import web

from vlmguard.api import CONFIG_KEY, add_api_routes
from vlmguard.config import Config
from vlmguard.layout import Layout, playlist_age, stale_after
from vlmguard.livelist import Window, render, served_window

SEGMENT_NAME = re.compile(r"seg-\d{1,20}\.ts")
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Range",
        "Access-Control-Expose-Headers": "Content-Length, Content-Range"}
TARGETS_KEY = web.AppKey("targets", dict)


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[cors_middleware, token_middleware])
    app[CONFIG_KEY] = config
    app[TARGETS_KEY] = {}  # camera -> largest target duration served, so it never shrinks
    app.router.add_get("/", index)
    app.router.add_get("/live/{camera}/index.m3u8", playlist)
    app.router.add_get("/live/{camera}/{segment}", segment)
    add_api_routes(app)
    return app


@web.middleware
async def cors_middleware(request: web.Request, handler):
    if request.method == "OPTIONS":  # a browser's preflight: no route, no token
        return web.Response(status=204, headers=CORS)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(CORS)
        raise
    response.headers.update(CORS)
    return response


@web.middleware
async def token_middleware(request: web.Request, handler):
    expected = request.app[CONFIG_KEY].server.token
    if expected and not token_ok(request, expected):
        raise web.HTTPUnauthorized(text="token required\n",
                                   headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def token_ok(request: web.Request, expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    # Undecodable bytes reach us as surrogates: compare them, never fail on them.
    return hmac.compare_digest(given.encode(errors="surrogateescape"),
                               expected.encode(errors="surrogateescape"))


def token_suffix(request: web.Request) -> str:
    """"?token=..." for links on a page, when the server wants a token: a player that
    followed a link with the token in its query needs it on the next one too."""
    token = request.app[CONFIG_KEY].server.token
    return f"?token={quote(token, safe='')}" if token else ""


async def index(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    layout = Layout(config.data_dir)
    rows = []
    for camera in config.cameras:
        url = f"/live/{camera.id}/index.m3u8{token_suffix(request)}"
        state = "live" if playlist_age(layout.live(camera.id)) < stale_after(config) else "offline"
        rows.append(f'<li><a href="{html.escape(url)}">{html.escape(camera.id)}</a> ({state})</li>')
    body = ("<!doctype html><title>vlmguard</title><h1>vlmguard cameras</h1>"
            f"<ul>{''.join(rows)}</ul>")
    return web.Response(text=body, content_type="text/html")


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
