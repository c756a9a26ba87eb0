"""Sending a video file from the RAM folder to one client, for the routes that cut one
(incident clips, any clip, a job's footage for another box): Range support, one deadline
for the whole answer, a reader that stops reading dropped, and the shared limit on how
many are cut or sent at once.

At most MAX_CLIP_JOBS clips are cut or sent at once; a request that waits longer than
QUEUE_SECONDS for its turn gets 503. Sending has one deadline, SEND_BASE_SECONDS plus a
second per SEND_RATE bytes, and a client that takes nothing for STALL_SECONDS is dropped:
a reader that stops reading frees its slot and its file instead of holding them.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from aiohttp import web

from vlmguard.logs import get_logger

log = get_logger("vlmguard.web.media")

MAX_CLIP_JOBS = 2
QUEUE_SECONDS = 10.0
SEND_BASE_SECONDS = 30.0
SEND_RATE = 1 << 20  # bytes a second a client must take on average: 300 MB in 5.5 min
STALL_SECONDS = 10.0
CHUNK_BYTES = 256 * 1024
RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")


async def send_clip(request: web.Request, path: Path, headers: dict[str, str]) -> web.StreamResponse:
    """The file, or the byte range asked for, under one deadline; a client that stops
    reading is cut off and its connection aborted (the caller frees the slot)."""
    size = path.stat().st_size
    first, last = byte_range(request, size)
    response = web.StreamResponse(status=206 if (first, last) != (0, size - 1) else 200,
                                  headers={**headers, "Accept-Ranges": "bytes"})
    if response.status == 206:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    response.content_length = last - first + 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SEND_BASE_SECONDS + response.content_length / SEND_RATE
    try:
        async with asyncio.timeout_at(deadline):
            await response.prepare(request)
            if request.method != "HEAD":
                await send_bytes(response, path, first, last - first + 1)
            await response.write_eof()
    except ConnectionError:
        pass  # the client went away
    except TimeoutError:
        log.info("clip reader too slow: dropped", client=request.remote,
                 bytes=response.content_length)
        if request.transport is not None:  # free its buffers now
            request.transport.abort()
    return response


async def send_bytes(response: web.StreamResponse, path: Path, offset: int, count: int) -> None:
    # A read from the RAM folder is a copy from memory: it does not block the loop.
    with open(path, "rb") as clip:
        clip.seek(offset)
        while count > 0:
            chunk = clip.read(min(CHUNK_BYTES, count))
            if not chunk:
                raise ConnectionError("clip shorter than its size")
            async with asyncio.timeout(STALL_SECONDS):
                await response.write(chunk)
            count -= len(chunk)


def byte_range(request: web.Request, size: int) -> tuple[int, int]:
    """(first, last) byte to send: one Range (bytes=a-b, a-, -n) is honoured; several, or
    one that does not parse, get the whole file; one past the end is 416."""
    match = RANGE.fullmatch(request.headers.get("Range", "").strip())
    whole = (0, size - 1)
    if match is None or request.headers.get("If-Range") or match.groups() == ("", ""):
        return whole
    start, end = match.groups()
    if not start:  # the last n bytes
        return (max(0, size - int(end)), size - 1) if int(end) > 0 else unsatisfiable(size)
    first, last = int(start), min(int(end), size - 1) if end else size - 1
    if end and int(end) < first:
        return whole  # not a valid range: ignored, as RFC 9110 says
    if first >= size:
        unsatisfiable(size)
    return first, last


def unsatisfiable(size: int):
    raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})


async def take_slot(request: web.Request, key: web.AppKey, busy: str) -> asyncio.Semaphore:
    """One of the app's slots under `key`, waited for at most QUEUE_SECONDS, then 503 with
    Retry-After: requests beyond the slots cannot pile up without end. The caller releases."""
    slots = request.app[key]
    try:
        async with asyncio.timeout(QUEUE_SECONDS):
            await slots.acquire()
    except TimeoutError:
        raise web.HTTPServiceUnavailable(text=json.dumps({"error": busy}),
                                         content_type="application/json",
                                         headers={"Retry-After": "5"}) from None
    return slots
