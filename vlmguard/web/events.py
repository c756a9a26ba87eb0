"""GET /api/events: one Server-Sent Events stream of what the console shows live.

Events: "incident" (stored by an analyzer), "acknowledged", "camera" (online/offline) and
"job_failed". One poller per process, not per client, reads the job table and the live
files in a worker thread (never SQL on the event loop) while anyone listens, and hands
each event to every listener's bounded queue. A listener that falls behind (queue full)
or stops reading (a write that does not finish) is cut off; its browser reconnects by
itself and the page reloads what it shows. Streams are capped (server.max_event_streams)
and held apart from the connection guard's idle eviction: a stream is silent from the
client's side by design, and keeps itself alive with a comment line every HEARTBEAT_SECONDS.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from vlmguard.errors import DatabaseError
from vlmguard.logs import Noticed, get_logger
from vlmguard.status import incident_row, live_cameras
from vlmguard.store.engines import is_outage
from vlmguard.times import iso
from vlmguard.web.database import with_store
from vlmguard.web.keys import CHILD_STATE_KEY, CONFIG_KEY, GUARD_KEY, HUB_KEY

log = get_logger("vlmguard.web.events")

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0
CHECK_SECONDS = 1.0  # how soon a closed stream's place is freed
WRITE_TIMEOUT_SECONDS = 10.0
QUEUE_EVENTS = 64
ERROR_PAUSE_SECONDS = 5.0
RETRY_MS = 2000


def add_event_routes(app: web.Application) -> None:
    app[HUB_KEY] = EventHub(app)
    app.router.add_get("/api/events", events)
    app.on_cleanup.append(stop_hub)


class Listener:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_EVENTS)

    def offer(self, message: str) -> bool:
        """Queue a message; False (and an end marker in its place) when it is full."""
        try:
            self.queue.put_nowait(message)
            return True
        except asyncio.QueueFull:
            self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False


class EventHub:
    def __init__(self, app: web.Application):
        self.app = app
        self.cap = app[CONFIG_KEY].server.max_event_streams
        self.listeners: set[Listener] = set()
        self.task: asyncio.Task | None = None
        self.noticed = Noticed()  # one log line per kind of failure, until a poll works

    def subscribe(self) -> Listener | None:
        if len(self.listeners) >= self.cap:
            return None
        listener = Listener()
        self.listeners.add(listener)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.poll())
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        message = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        for listener in list(self.listeners):
            if not listener.offer(message):
                self.listeners.discard(listener)

    async def poll(self) -> None:
        """Runs while anyone listens: compares the table and the cameras with last time.
        Camera events need no database; while it is away, the table's events wait (from
        the cursor they had, or from the newest rows once it is back)."""
        cursor = None
        online = await asyncio.to_thread(online_by_camera, self.app[CONFIG_KEY])
        while self.listeners:
            await asyncio.sleep(POLL_SECONDS)
            now_online = await asyncio.to_thread(online_by_camera, self.app[CONFIG_KEY])
            for camera, is_online in now_online.items():
                if online.get(camera) != is_online:
                    self.publish("camera", {"id": camera, "online": is_online})
            online = now_online
            try:
                if cursor is None:
                    cursor = await with_store(self.app,
                                              lambda config, store: store.incidents.event_cursor())
                    continue
                changes = await with_store(self.app,
                                           lambda config, store, at=cursor:
                                           store.incidents.changes_since(*at))
            except Exception as exc:  # the streams wait, they do not end
                if is_outage(exc) or isinstance(exc, DatabaseError):  # a database hiccup
                    if self.noticed.first(type(exc).__name__):
                        log.warning("event poll failed, retrying",
                                    error=str(exc).splitlines()[0][:300])
                else:
                    self.app[CHILD_STATE_KEY].unexpected(
                        log, "event poll failed unexpectedly, retrying")
                await asyncio.sleep(ERROR_PAUSE_SECONDS)
                continue
            self.noticed.seen.clear()
            cursor = self.publish_changes(changes, cursor)

    def publish_changes(self, changes: dict[str, list], cursor: tuple) -> tuple:
        last_id, acked, failed = cursor
        for row in changes["stored"]:
            self.publish("incident", incident_row(row))
            last_id = max(last_id, row["id"])
        for row in changes["acknowledged"]:
            self.publish("acknowledged", {"id": row["id"], "camera_id": row["camera_id"],
                                          "acknowledged_at": iso(row["acknowledged_at"]),
                                          "ack_note": row["ack_note"]})
            acked = max(acked, row["acknowledged_at"]) if acked else row["acknowledged_at"]
        for job in changes["failed"]:
            self.publish("job_failed", {"id": job.id, "camera_id": job.camera_id,
                                        "error_message": job.error_message,
                                        "completed_at": iso(job.completed_at)})
            failed = max(failed, job.completed_at) if failed else job.completed_at
        return last_id, acked, failed


def online_by_camera(config) -> dict[str, bool]:
    return {camera["id"]: camera["online"] for camera in live_cameras(config)}


async def stop_hub(app: web.Application) -> None:
    hub = app[HUB_KEY]
    hub.listeners.clear()
    if hub.task is not None:
        hub.task.cancel()


async def events(request: web.Request) -> web.StreamResponse:
    hub: EventHub = request.app[HUB_KEY]
    listener = hub.subscribe()
    if listener is None:
        raise web.HTTPServiceUnavailable(text="too many event streams\n",
                                         headers={"Retry-After": "10"})
    guard = request.app[GUARD_KEY]
    if guard and request.transport is not None:
        guard[0].hold_open(request.transport)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    response.force_close()  # a stream ends with its connection, never back to keep-alive
    try:
        await response.prepare(request)
        await send(response, f"retry: {RETRY_MS}\nevent: hello\ndata: {{}}\n\n")
        quiet_since = time.monotonic()
        while not gone(request):
            try:
                message = await asyncio.wait_for(listener.queue.get(), CHECK_SECONDS)
            except asyncio.TimeoutError:
                if time.monotonic() - quiet_since < HEARTBEAT_SECONDS:
                    continue
                message = ": keep-alive\n\n"
            if message is None:
                break
            await send(response, message)
            quiet_since = time.monotonic()
    except ConnectionError:
        pass  # the browser went away; it reconnects by itself if it is still there
    except asyncio.TimeoutError:
        if request.transport is not None:  # it stopped reading: free its buffers now
            request.transport.abort()
    finally:
        hub.unsubscribe(listener)
        if guard and request.transport is not None:
            guard[0].let_go(request.transport)
    return response


def gone(request: web.Request) -> bool:
    """The browser closed the connection: free its place now, not at the next write."""
    return request.transport is None or request.transport.is_closing()


async def send(response: web.StreamResponse, message: str) -> None:
    await asyncio.wait_for(response.write(message.encode()), WRITE_TIMEOUT_SECONDS)
