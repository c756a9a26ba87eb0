"""The web console: its static files (inside the package, no build step, no CDN) and the
routes only it needs: the status report, one incident, and the POSTs that change state
(acknowledge an incident, keep or release an archive, retry a failed job).

Static files are read and gzipped once, at the first request for each, then served from
memory with an ETag: the streaming process spends no disk reads or compression on them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from importlib import resources

from aiohttp import web

from vlmguard.status import camera_homes, gather_status, incident_row, with_home
from vlmguard.store.records import utcnow
from vlmguard.store.schema import MAX_ID
from vlmguard.times import iso
from vlmguard.vlm.pricing import cost_report
from vlmguard.web.database import read
from vlmguard.web.keys import STATIC_KEY
from vlmguard.web.params import BadParameter, checked_int

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".txt": "text/plain; charset=utf-8"}
MAX_BODY_BYTES = 4096
MAX_NOTE_CHARS = 1000


def add_console_routes(app: web.Application) -> None:
    app[STATIC_KEY] = {}
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/incident-categories", categories)
    app.router.add_get(r"/api/incidents/{id:\d+}", incident)
    app.router.add_post(r"/api/incidents/{id:\d+}/acknowledge", acknowledge)
    app.router.add_post(r"/api/jobs/{id:\d+}/keep", keep)
    app.router.add_post(r"/api/jobs/{id:\d+}/retry", retry)


def static_names() -> dict[str, object]:
    folder = resources.files("vlmguard.web") / "static"
    return {entry.name: entry for entry in folder.iterdir()
            if entry.is_file() and any(entry.name.endswith(s) for s in STATIC_TYPES)}


def load_static(app: web.Application, name: str) -> tuple[bytes, bytes, str, str] | None:
    cache = app[STATIC_KEY]
    if name not in cache:
        entry = static_names().get(name)
        if entry is None:
            return None
        raw = entry.read_bytes()
        kind = next(t for s, t in STATIC_TYPES.items() if name.endswith(s))
        cache[name] = (raw, gzip.compress(raw, 9, mtime=0), kind,
                       '"' + hashlib.sha256(raw).hexdigest()[:20] + '"')
    return cache[name]


def serve_static(request: web.Request, name: str) -> web.Response:
    found = load_static(request.app, name)
    if found is None:
        raise web.HTTPNotFound(text="not found\n")
    raw, packed, kind, etag = found
    headers = {"Content-Type": kind, "ETag": etag, "Cache-Control": "no-cache",
               "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff"}
    if name.endswith(".html"):
        headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                              "media-src 'self' blob:; worker-src 'self' blob:; "
                                              "frame-ancestors 'none'")
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=packed, headers=headers)
    return web.Response(body=raw, headers=headers)


async def index(request: web.Request) -> web.Response:
    return serve_static(request, "index.html")


async def static(request: web.Request) -> web.Response:
    return serve_static(request, request.match_info["name"])


async def status(request: web.Request) -> web.Response:
    def work(config, store):
        report = gather_status(config, store)
        report["price_per_million_tokens"] = config.analysis.price_per_million_tokens
        midnight = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
        report["cost_today"] = cost_report(config.providers,
                                           store.reports.token_usage(midnight, by="provider"),
                                           config.analysis.price_per_million_tokens)
        report["segment_seconds"] = config.storage.segment_seconds
        return report
    return web.json_response(await read(request, work), dumps=lambda o: json.dumps(o, default=str))


async def categories(request: web.Request) -> web.Response:
    found = await read(request, lambda config, store: store.incidents.incident_categories())
    return web.json_response({"categories": found})


def id_of(request: web.Request) -> int:
    return checked_int(request.match_info["id"], "id", 0, MAX_ID)


def not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": f"no {what}", "parameter": "id"}),
                            content_type="application/json")


async def incident(request: web.Request) -> web.Response:
    incident_id = id_of(request)
    def work(config, store):
        found = store.incidents.get_incident(incident_id)
        return found and with_home(incident_row(found), camera_homes(config, store.nodes.all()))
    row = await read(request, work)
    if row is None:
        raise not_found(f"incident {incident_id}")
    return web.json_response(row)


async def json_body(request: web.Request) -> dict:
    body = await request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(body))
    if not body.strip():
        return {}
    try:
        found = json.loads(body)
    except ValueError:
        raise BadParameter("body", "must be a JSON object") from None
    if not isinstance(found, dict):
        raise BadParameter("body", "must be a JSON object")
    return found


async def acknowledge(request: web.Request) -> web.Response:
    incident_id = id_of(request)
    note = (await json_body(request)).get("note") or None
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        raise BadParameter("note", f"must be text of at most {MAX_NOTE_CHARS} characters")
    when = await read(request, lambda config, store: store.incidents.acknowledge(incident_id, note))
    if when is None:
        raise not_found(f"incident {incident_id}")
    return web.json_response({"id": incident_id, "acknowledged_at": iso(when), "ack_note": note})


async def keep(request: web.Request) -> web.Response:
    """{"keep": true} keeps the job's archive out of retention; false releases it."""
    job_id = id_of(request)
    wanted = (await json_body(request)).get("keep", True)
    if not isinstance(wanted, bool):
        raise BadParameter("keep", "must be true or false")
    if not await read(request, lambda config, store: store.recordings.keep_archive(job_id, wanted)):
        raise not_found(f"job {job_id}")
    return web.json_response({"id": job_id, "kept": wanted})


async def retry(request: web.Request) -> web.Response:
    job_id = id_of(request)
    if not await read(request, lambda config, store: store.queue.retry(job_id)):
        raise web.HTTPConflict(text=json.dumps({"error": f"job {job_id} is not failed"}),
                               content_type="application/json")
    return web.json_response({"id": job_id, "status": "pending"})
