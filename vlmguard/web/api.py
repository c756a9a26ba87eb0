"""The REST API (health, cameras, jobs, incidents) and the /metrics route, served by the
streaming process's aiohttp app.

Database reads run through web.database, off the event loop: while the database is away,
what needs it answers 503 at once with Retry-After; /api/health and /metrics answer from
the files. Bad query parameters get 400 naming the parameter (web.params). A page is
bounded in rows (limit) and in bytes (MAX_PAGE_BYTES): a page cut short says so and where
the next starts (next_offset).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from vlmguard.config import Config
from vlmguard.errors import DatabaseError, first_line
from vlmguard.status import (camera_homes, gather_status, incident_row, job_detail, job_summary,
                             live_cameras, other_cameras, with_home)
from vlmguard.store.bundle import Store
from vlmguard.store.schema import MAX_ID, STATES
from vlmguard.vlm import SEVERITIES
from vlmguard.web.database import read
from vlmguard.web.keys import LIMITER_KEY
from vlmguard.web.metrics import render_metrics, signin_metrics
from vlmguard.web.params import (BadParameter, camera_param, category_params, checked_int,
                                 choice_params, config_of, int_param, since_param)

MAX_PAGE = 500
MAX_OFFSET = 10**9
# One page of incidents at most this many bytes of JSON (rows are read with their
# descriptions bounded, so a page costs at most limit x a row's bound to read).
MAX_PAGE_BYTES = 1_000_000


def add_api_routes(app: web.Application) -> None:
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/cameras", cameras)
    app.router.add_get("/api/jobs", jobs)
    app.router.add_get("/api/jobs/{id}", job)
    app.router.add_get("/api/incidents", incidents)
    app.router.add_get("/metrics", metrics)


def status_without_database(config: Config, why: BaseException) -> dict[str, Any]:
    """The report from the files alone, saying why the database is not in it."""
    return gather_status(config, unreachable=f"database unreachable: {first_line(why)}")


async def health(request: web.Request) -> web.Response:
    report = await read(request, lambda config, store: gather_status(config, store),
                        status_without_database)
    database = report["database"]
    body = {"healthy": report["healthy"], "problems": report["problems"],
            "daemon": report["daemon"], "jobs": {s: report["jobs"][s] for s in STATES},
            "node": report["node"], "nodes": report["nodes"],
            "analysis_lag_s": {c["id"]: c["analysis_lag_s"] for c in report["cameras"]},
            "database": {"ready": database["ready"], "error": database["error"],
                         "waiting": database["waiting"],
                         "quarantined": database["quarantined"]["total"]},
            "backed_off": sorted(name for name, child in report["daemon"]["children"].items()
                                 if child.get("state") == "backed off")}
    return web.json_response(body, status=200 if report["healthy"] else 503)


def site_camera(config: Config, store: Store, camera: str | None) -> None:
    """BadParameter unless the camera is this box's or another node's."""
    if camera is None or config.camera(camera) is not None:
        return
    if not any(camera in node["cameras"] for node in store.nodes.all()):
        raise BadParameter("camera", "unknown camera")


async def cameras(request: web.Request) -> web.Response:
    """This box's cameras (node null), then the other boxes' (marked with their node);
    while the database is away, this box's alone."""
    own = await asyncio.to_thread(live_cameras, config_of(request))
    try:
        others = await read(request,
                            lambda config, store: other_cameras(config, store.nodes.all()),
                            lambda config, why: [])
    except DatabaseError:  # no job table yet (never started): no other box known
        others = []
    return web.json_response({"cameras": [dict(c, node=None) for c in own] + others})


async def jobs(request: web.Request) -> web.Response:
    states = choice_params(request, "state", STATES)
    camera = camera_param(request)
    limit = int_param(request, "limit", 50, 1, MAX_PAGE)
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET)

    def work(config, store):
        site_camera(config, store, camera)
        found = store.reports.list_jobs(states=states, camera_id=camera, limit=limit,
                                        offset=offset, results=False)
        total = store.reports.count_jobs(states=states, camera_id=camera)
        return [job_summary(j) for j in found], total
    rows, total = await read(request, work)
    page = bounded_page(rows)
    following = offset + len(page)
    return web.json_response({"jobs": page, "total": total, "limit": limit, "offset": offset,
                              "truncated": len(page) < len(rows),
                              "next_offset": following if following < total else None})


async def job(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    job_id = checked_int(raw, "id", 0, MAX_ID)

    def work(config, store):
        found = store.reports.get(job_id)
        return job_detail(found, store.incidents.list_incidents(found.id)) if found else None
    detail = await read(request, work)
    if detail is None:
        raise web.HTTPNotFound(text=f'{{"error": "no job {job_id}", "parameter": "id"}}',
                               content_type="application/json")
    return web.json_response(detail)


async def incidents(request: web.Request) -> web.Response:
    """Newest first. severity=X means X or worse; until is exclusive; total counts every
    match, for paging."""
    where = dict(camera_id=camera_param(request), since=since_param(request),
                 until=since_param(request, "until"), categories=category_params(request))
    severity = choice_params(request, "severity", SEVERITIES)
    where["severities"] = SEVERITIES[min(SEVERITIES.index(s) for s in severity):] if severity else ()
    limit = int_param(request, "limit", 50, 1, MAX_PAGE)
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET)

    def work(config, store):
        site_camera(config, store, where["camera_id"])
        return (store.incidents.find_incidents(**where, limit=limit, offset=offset),
                store.incidents.count_incidents(**where), camera_homes(config, store.nodes.all()))
    rows, total, homes = await read(request, work)
    page = bounded_page([with_home(incident_row(r), homes) for r in rows])
    following = offset + len(page)
    return web.json_response({"incidents": page, "limit": limit, "offset": offset,
                              "total": total, "truncated": len(page) < len(rows),
                              "next_offset": following if following < total else None})


def bounded_page(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that fit in MAX_PAGE_BYTES of JSON (always the first): the rest is the
    next page's."""
    most = MAX_PAGE_BYTES
    page, size = [], 0
    for row in rows:
        size += len(json.dumps(row, separators=(",", ":")))
        if page and size > most:
            break
        page.append(row)
    return page


async def metrics(request: web.Request) -> web.Response:
    def work(config, store):
        return render_metrics(gather_status(config, store), store.reports.duration_histogram(),
                              store.reports.token_usage())

    def from_files(config, why):
        return render_metrics(status_without_database(config, why), ([], 0, 0.0), {})
    text = await read(request, work, from_files) + signin_metrics(request.app[LIMITER_KEY])
    return web.Response(body=text.encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
