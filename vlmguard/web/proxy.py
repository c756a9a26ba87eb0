"""Another box's incident media through this box's server, so a console signed in here
plays it: the request goes on to the box that recorded the camera (its nodes row's
public_url) with the token the boxes share, and its answer streams back (Range, status
and the clip headers kept). A box that is down or does not answer is 503, never a hang.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from vlmguard.logs import get_logger
from vlmguard.status import camera_homes
from vlmguard.web.database import read
from vlmguard.web.params import config_of

log = get_logger("vlmguard.web.proxy")

CONNECT_SECONDS = 10.0
TOTAL_SECONDS = 330.0  # a 600-s clip's cutting and sending (media.py's deadlines)
PASSED_ON = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges",
             "Content-Disposition", "Cache-Control", "X-Clip-Start")
CHUNK = 256 * 1024


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
