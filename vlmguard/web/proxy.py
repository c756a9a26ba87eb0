"""Another box's incident media and live video through this box's server, so a console
signed in here plays them: the request goes on to the box that recorded the camera (its
nodes row's public_url) with the token the boxes share, and its answer comes back (Range,
status and the clip headers kept). A box that is down or does not answer is 503, never a
hang.

Live video (GET /live/<camera>/... of another box's camera) is a pass-through of that
box's playlist, segments and parts: the LL-HLS blocking parameters and the client's token
go on (the playlist's URIs are relative, so they come back here), each answer bounded in
time (LIVE_SECONDS, over a blocking reload's three target durations) and bytes, over one
kept-alive client per app. Which box records a camera is read from the nodes table at
most every HOMES_SECONDS, not per part.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from vlmguard.errors import DatabaseError
from vlmguard.logs import get_logger
from vlmguard.status import camera_homes
from vlmguard.web.database import read
from vlmguard.web.params import config_of
from vlmguard.web.keys import LIVE_PROXY_KEY

log = get_logger("vlmguard.web.proxy")

CONNECT_SECONDS = 10.0
TOTAL_SECONDS = 330.0  # a 600-s clip's cutting and sending (media.py's deadlines)
PASSED_ON = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges",
             "Content-Disposition", "Cache-Control", "X-Clip-Start")
CHUNK = 256 * 1024
LIVE_CONNECT_SECONDS = 3.0
LIVE_SECONDS = 20.0
MAX_PLAYLIST_BYTES = 1 << 20
MAX_LIVE_MEDIA_BYTES = 32 << 20  # a segment of a 20 Mbit/s camera 10 s long fits
LIVE_QUERY = ("token", "_HLS_msn", "_HLS_part", "_HLS_skip")
LIVE_PASSED_ON = ("Content-Type", "Cache-Control", "Retry-After")
HOMES_SECONDS = 5.0


async def home_of(request: web.Request, camera_id: str) -> dict | None:
    """The node that records this camera when it is another box's, else None."""
    if config_of(request).camera(camera_id) is not None:
        return None
    homes = await read(request, lambda config, store: camera_homes(config, store.nodes.all()))
    return homes.get(camera_id)


def unavailable(message: str) -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(text=json.dumps({"error": message}),
                                      content_type="application/json",
                                      headers={"Retry-After": "15"})


async def from_home(request: web.Request, home: dict) -> web.StreamResponse:
    """The same path asked of the recording box, its answer streamed back."""
    if not home["alive"]:
        raise unavailable(f"node {home['name']}, which recorded this, is down")
    headers = {"Range": request.headers["Range"]} if "Range" in request.headers else {}
    token = config_of(request).server.token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{home['public_url']}{request.path}"
    timeout = aiohttp.ClientTimeout(total=TOTAL_SECONDS, sock_connect=CONNECT_SECONDS)
    response = None
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, headers=headers, allow_redirects=False) as answer:
                response = web.StreamResponse(status=answer.status, headers={
                    k: answer.headers[k] for k in PASSED_ON if k in answer.headers})
                await response.prepare(request)
                async for chunk in answer.content.iter_chunked(CHUNK):
                    await response.write(chunk)
                await response.write_eof()
                return response
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("node did not answer for its media", node=home["name"],
                    error=str(exc)[:300] or type(exc).__name__)
        if response is not None and response.prepared:  # cut off mid-answer: end it too
            if request.transport is not None:
                request.transport.abort()
            return response
        raise unavailable(f"node {home['name']}, which recorded this, does not answer") \
            from None


class LiveProxy:
    """One app's way to other boxes' live video: a kept-alive HTTP client (an LL-HLS
    player asks for a part every fraction of a second) and the camera homes, read from
    the database at most every HOMES_SECONDS (the last known while it is away)."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.homes: dict[str, dict[str, Any]] | None = None
        self.read_at = 0.0

    def client(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=LIVE_SECONDS, sock_connect=LIVE_CONNECT_SECONDS))
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def add_live_proxy(app: web.Application) -> None:
    app[LIVE_PROXY_KEY] = LiveProxy()

    async def close(app: web.Application) -> None:
        await app[LIVE_PROXY_KEY].close()
    app.on_cleanup.append(close)


async def live_home(request: web.Request, camera_id: str) -> dict | None:
    proxy: LiveProxy = request.app[LIVE_PROXY_KEY]
    if proxy.homes is None or time.monotonic() - proxy.read_at > HOMES_SECONDS:
        try:
            proxy.homes = await read(
                request, lambda config, store: camera_homes(config, store.nodes.all()))
            proxy.read_at = time.monotonic()
        except web.HTTPServiceUnavailable:
            if proxy.homes is None:  # away, and no box known yet: ask again shortly
                raise
        except DatabaseError:  # no job table yet (never started): no other box known
            return None
    return proxy.homes.get(camera_id)


async def live_from_home(request: web.Request, camera_id: str) -> web.Response:
    """GET /live/<camera>/<name> of another box's camera, asked of that box; 404 for a
    camera no box records."""
    home = await live_home(request, camera_id)
    if home is None:
        raise web.HTTPNotFound(text="not found\n")
    if not home["alive"]:
        raise unavailable(f"node {home['name']}, which records camera {camera_id}, is down")
    headers = {}
    token = config_of(request).server.token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    params = {k: request.query[k] for k in LIVE_QUERY if k in request.query}
    most = MAX_PLAYLIST_BYTES if request.path.endswith(".m3u8") else MAX_LIVE_MEDIA_BYTES
    url = f"{home['public_url']}{request.rel_url.raw_path}"
    try:
        async with request.app[LIVE_PROXY_KEY].client().get(
                url, params=params, headers=headers, allow_redirects=False) as answer:
            if (answer.content_length or 0) > most:
                raise too_big(home, most)
            body = await read_at_most(answer.content, most, home)
            status = answer.status
            passed = {k: answer.headers[k] for k in LIVE_PASSED_ON if k in answer.headers}
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("node did not answer for its live video", node=home["name"],
                    camera_id=camera_id, error=str(exc)[:300] or type(exc).__name__)
        raise unavailable(f"node {home['name']}, which records camera {camera_id}, "
                          "does not answer") from None
    if status in (401, 403):  # its token is not this box's: not the client's to fix
        raise web.HTTPBadGateway(text=json.dumps(
            {"error": f"node {home['name']} refused this box's server.token: give every "
                      "box the same token"}), content_type="application/json")
    return web.Response(status=status, body=body, headers=passed)


async def read_at_most(content: aiohttp.StreamReader, most: int, home: dict) -> bytes:
    chunks, size = [], 0
    async for chunk in content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > most:
            raise too_big(home, most)
        chunks.append(chunk)
    return b"".join(chunks)


def too_big(home: dict, most: int) -> web.HTTPBadGateway:
    return web.HTTPBadGateway(text=json.dumps(
        {"error": f"node {home['name']} answered more than {most} bytes"}),
        content_type="application/json")
