"""The REST API and the /metrics route, served by the streaming process's aiohttp app.

Every database read runs in a worker thread of the API's own (Database): the event loop
that serves the video never waits on SQL, and a database that is slow or away never takes
the threads it lends to file reads. While the database is away, what needs it answers
503 at once with Retry-After; /api/health and /metrics answer from the files. Bad query
parameters get 400 with a JSON body naming the parameter. A page is bounded in rows
(limit) and in bytes (MAX_PAGE_BYTES): a page cut short says so and where the next starts
(next_offset).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Callable

import structlog
from aiohttp import web

from vlmguard.config import Config
from vlmguard.outage import Outage
from vlmguard.status import gather_status, incident_row, job_detail, job_summary, live_cameras
from vlmguard.store import MAX_ID, STATES, JobStore, is_outage
from vlmguard.times import parse_time
from vlmguard.vlm import SEVERITIES
from vlmguard.web.keys import CONFIG_KEY, DATABASE_KEY
from vlmguard.web.metrics import render_metrics
from vlmguard.web.session import session_metrics

MAX_PAGE = 500
MAX_OFFSET = 10**9
INTEGER = re.compile(r"[+-]?[0-9]{1,19}")
# One page of incidents at most this many bytes of JSON (rows are read with their
# descriptions bounded, so a page costs at most limit x a row's bound to read).
MAX_PAGE_BYTES = 1_000_000
DATABASE_THREADS = 4


class Database:
    """The streaming process's way to the job table: one JobStore, made on first use
    without reaching the database, and threads of its own."""

    def __init__(self, config: Config):
        self.config = config
        self.store: JobStore | None = None
        # Its threads log as the process does (role, pid): threads start with no context.
        self.executor = ThreadPoolExecutor(
            DATABASE_THREADS, thread_name_prefix="database",
            initializer=functools.partial(structlog.contextvars.bind_contextvars,
                                          **structlog.contextvars.get_contextvars()))
        self.outage = Outage("api")
        self.lock = threading.Lock()

    def run(self, work: Callable[[Config, JobStore], Any],
            fallback: Callable[[Config, BaseException], Any] | None) -> Any:
        """work(config, store) in this thread; while the database is away, fallback(config,
        why) when there is one, else the outage is raised."""
        try:
            with self.lock:
                self.outage.check()
                if self.store is None:
                    self.store = JobStore.from_config(self.config, create=False, lazy=True)
            self.store.ensure_ready()
            result = work(self.config, self.store)
        except Exception as exc:
            if not is_outage(exc):
                raise
            with self.lock:
                if not self.outage.down or self.outage.due():
                    self.outage.failed(exc)
            if fallback is None:
                raise
            return fallback(self.config, exc)
        with self.lock:
            self.outage.back()
        return result

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()


def add_api_routes(app: web.Application) -> None:
    app[DATABASE_KEY] = Database(app[CONFIG_KEY])
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/cameras", cameras)
    app.router.add_get("/api/jobs", jobs)
    app.router.add_get("/api/jobs/{id}", job)
    app.router.add_get("/api/incidents", incidents)
    app.router.add_get("/metrics", metrics)
    app.on_cleanup.append(close_store)


def config_of(request: web.Request) -> Config:
    return request.app[CONFIG_KEY]


async def read(request: web.Request, work: Callable[[Config, JobStore], Any],
               fallback: Callable[[Config, BaseException], Any] | None = None) -> Any:
    """Run a database read (or a write) off the event loop, with this process's JobStore;
    while the database is away: fallback's answer, or 503 with Retry-After."""
    try:
        return await with_store(request.app, work, fallback)
    except Exception as exc:
        if not is_outage(exc):
            raise
        retry = max(1, round(request.app[DATABASE_KEY].outage.retry_at_in()))
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": f"database unreachable: {str(exc).splitlines()[0][:300]}",
                             "retry_after_s": retry}),
            content_type="application/json", headers={"Retry-After": str(retry)}) from None


async def with_store(app: web.Application, work: Callable[[Config, JobStore], Any],
                     fallback: Callable[[Config, BaseException], Any] | None = None) -> Any:
    database: Database = app[DATABASE_KEY]
    return await asyncio.get_running_loop().run_in_executor(
        database.executor, database.run, work, fallback)


async def close_store(app: web.Application) -> None:
    app[DATABASE_KEY].close()


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
        return parse_time(raw)
    except ValueError as exc:
        raise BadParameter(name, str(exc)) from None


def category_params(request: web.Request) -> list[str]:
    values = [v for raw in request.query.getall("category", []) for v in raw.split(",") if v]
    for value in values:
        if len(value) > 100:
            raise BadParameter("category", "at most 100 characters")
    return values


def status_without_database(config: Config, why: BaseException) -> dict[str, Any]:
    """The report from the files alone, saying why the database is not in it."""
    return gather_status(config, unreachable=f"database unreachable: "
                                             f"{str(why).splitlines()[0][:300]}")


async def health(request: web.Request) -> web.Response:
    report = await read(request, lambda config, store: gather_status(config, store),
                        status_without_database)
    database = report["database"]
    body = {"healthy": report["healthy"], "problems": report["problems"],
            "daemon": report["daemon"], "jobs": {s: report["jobs"][s] for s in STATES},
            "analysis_lag_s": {c["id"]: c["analysis_lag_s"] for c in report["cameras"]},
            "database": {"ready": database["ready"], "error": database["error"],
                         "waiting": database["waiting"],
                         "quarantined": database["quarantined"]["total"]},
            "backed_off": sorted(name for name, child in report["daemon"]["children"].items()
                                 if child.get("state") == "backed off")}
    return web.json_response(body, status=200 if report["healthy"] else 503)


async def cameras(request: web.Request) -> web.Response:
    return web.json_response({"cameras": await asyncio.to_thread(live_cameras, config_of(request))})


async def jobs(request: web.Request) -> web.Response:
    states = choice_params(request, "state", STATES)
    camera = camera_param(request)
    limit = int_param(request, "limit", 50, 1, MAX_PAGE)
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET)

    def work(config, store):
        found = store.list_jobs(states=states, camera_id=camera, limit=limit, offset=offset,
                                results=False)
        return [job_summary(j) for j in found], store.count_jobs(states=states, camera_id=camera)
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
    page = bounded_page([incident_row(r) for r in rows])
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
        return render_metrics(gather_status(config, store), store.duration_histogram(),
                              store.token_usage())

    def from_files(config, why):
        return render_metrics(status_without_database(config, why), ([], 0, 0.0), {})
    text = await read(request, work, from_files) + session_metrics(request.app)
    return web.Response(body=text.encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
