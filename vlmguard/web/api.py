"""The REST API and the /metrics route, served by the streaming process's aiohttp app.

Every database read runs in a worker thread (asyncio.to_thread): the event loop that serves
the video never waits on SQL. Bad query parameters get 400 with a JSON body naming the
parameter.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

from vlmguard.config import Config
from vlmguard.status import gather_status, incident_row, job_detail, job_summary, live_cameras
from vlmguard.store import STATES, JobStore
from vlmguard.vlm import SEVERITIES
from vlmguard.web.keys import CONFIG_KEY, STORE_KEY
from vlmguard.web.metrics import render_metrics
from vlmguard.web.session import session_metrics

MAX_PAGE = 500
MAX_OFFSET = 10**9
MAX_JOB_ID = 2**63 - 1  # the largest id SQLite and PostgreSQL's BIGINT hold
INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


def add_api_routes(app: web.Application) -> None:
    app[STORE_KEY] = []  # the JobStore, opened on first use in a worker thread
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/cameras", cameras)
    app.router.add_get("/api/jobs", jobs)
    app.router.add_get("/api/jobs/{id}", job)
    app.router.add_get("/api/incidents", incidents)
    app.router.add_get("/metrics", metrics)
    app.on_cleanup.append(close_store)


def config_of(request: web.Request) -> Config:
    return request.app[CONFIG_KEY]


async def read(request: web.Request, work: Callable[[Config, JobStore], Any]) -> Any:
    """Run a database read (or a write) off the event loop, with this process's JobStore."""
    return await with_store(request.app, work)


async def with_store(app: web.Application, work: Callable[[Config, JobStore], Any]) -> Any:
    config = app[CONFIG_KEY]

    def run() -> Any:
        holder = app[STORE_KEY]
        if not holder:
            holder.append(JobStore.from_config(config, create=False))
        return work(config, holder[0])
    return await asyncio.to_thread(run)


async def close_store(app: web.Application) -> None:
    for store in app[STORE_KEY]:
        store.close()


class BadParameter(web.HTTPBadRequest):
    def __init__(self, name: str, problem: str):
        super().__init__(text=f'{{"error": "{name}: {problem}", "parameter": "{name}"}}',
                         content_type="application/json")


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    return checked_int(raw, name, lo, hi)


def checked_int(raw: str, name: str, lo: int, hi: int) -> int:
    """ASCII digits only, so int() never sees a huge or exotic number; then the range."""
    if not INTEGER.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise BadParameter(name, f"must be an integer {lo}-{hi}")
    return int(raw)


def choice_params(request: web.Request, name: str, choices: tuple[str, ...]) -> list[str]:
    values = [v for raw in request.query.getall(name, []) for v in raw.split(",") if v]
    for value in values:
        if value not in choices:
            raise BadParameter(name, f"must be one of {', '.join(choices)}")
    return values


def camera_param(request: web.Request) -> str | None:
    camera = request.query.get("camera")
    if camera is not None and config_of(request).camera(camera) is None:
        raise BadParameter("camera", "unknown camera")
    return camera


def since_param(request: web.Request, name: str = "since") -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadParameter(name, "must be an ISO 8601 time, e.g. 2026-11-26T08:00:00Z") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    try:  # 9999-12-31T23:59:59-23:59 is a valid time that UTC cannot hold
        return when.astimezone(timezone.utc)
    except OverflowError:
        raise BadParameter(name, "out of range: years 1-9999 in UTC") from None


def category_params(request: web.Request) -> list[str]:
    values = [v for raw in request.query.getall("category", []) for v in raw.split(",") if v]
    for value in values:
        if len(value) > 100:
            raise BadParameter("category", "at most 100 characters")
    return values


async def health(request: web.Request) -> web.Response:
    report = await read(request, lambda config, store: gather_status(config, store))
    body = {"healthy": report["healthy"], "problems": report["problems"],
            "daemon": report["daemon"], "jobs": {s: report["jobs"][s] for s in STATES},
            "analysis_lag_s": {c["id"]: c["analysis_lag_s"] for c in report["cameras"]}}
    return web.json_response(body, status=200 if report["healthy"] else 503)


async def cameras(request: web.Request) -> web.Response:
    return web.json_response({"cameras": await asyncio.to_thread(live_cameras, config_of(request))})


async def jobs(request: web.Request) -> web.Response:
    states = choice_params(request, "state", STATES)
    camera = camera_param(request)
    limit = int_param(request, "limit", 50, 1, MAX_PAGE)
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET)

    def work(config, store):
        found = store.list_jobs(states=states, camera_id=camera, limit=limit, offset=offset)
        return [job_summary(j) for j in found], store.count_jobs(states=states, camera_id=camera)
    rows, total = await read(request, work)
    return web.json_response({"jobs": rows, "total": total, "limit": limit, "offset": offset})


async def job(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    job_id = checked_int(raw, "id", 0, MAX_JOB_ID)

    def work(config, store):
        found = store.get(job_id)
        return job_detail(found, store.list_incidents(found.id)) if found else None
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
        return (store.find_incidents(**where, limit=limit, offset=offset),
                store.count_incidents(**where))
    rows, total = await read(request, work)
    return web.json_response({"incidents": [incident_row(r) for r in rows], "limit": limit,
                              "offset": offset, "total": total})


async def metrics(request: web.Request) -> web.Response:
    def work(config, store):
        return render_metrics(gather_status(config, store), store.duration_histogram(),
                              store.token_usage())
    text = await read(request, work) + session_metrics(request.app)
    return web.Response(body=text.encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
