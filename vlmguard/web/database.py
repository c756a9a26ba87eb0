"""The web side's way to the job table: one Store for the streaming process's app,
made on first use without reaching the database, with worker threads of its own, so the
event loop that serves the video never waits on SQL and a database that is slow or away
never takes the threads the app lends to file reads. While the database is away, a read
answers 503 at once with Retry-After (or the caller's fallback)."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import structlog
from aiohttp import web

from vlmguard.config import Config
from vlmguard.errors import first_line
from vlmguard.outage import Outage
from vlmguard.store.bundle import Store
from vlmguard.store.engines import is_outage
from vlmguard.web.keys import CONFIG_KEY, DATABASE_KEY

DATABASE_THREADS = 4


def add_database(app: web.Application) -> None:
    app[DATABASE_KEY] = Database(app[CONFIG_KEY])
    app.on_cleanup.append(close_store)


class Database:
    """The streaming process's way to the job table: one Store, made on first use
    without reaching the database, and threads of its own."""

    def __init__(self, config: Config):
        self.config = config
        self.store: Store | None = None
        # Its threads log as the process does (role, pid): threads start with no context.
        self.executor = ThreadPoolExecutor(
            DATABASE_THREADS, thread_name_prefix="database",
            initializer=functools.partial(structlog.contextvars.bind_contextvars,
                                          **structlog.contextvars.get_contextvars()))
        self.outage = Outage("api")
        self.lock = threading.Lock()

    def run(self, work: Callable[[Config, Store], Any],
            fallback: Callable[[Config, BaseException], Any] | None) -> Any:
        """work(config, store) in this thread; while the database is away, fallback(config,
        why) when there is one, else the outage is raised."""
        try:
            with self.lock:
                self.outage.check()
                if self.store is None:
                    self.store = Store.from_config(self.config, create=False, lazy=True)
            self.store.db.ensure_ready()
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


async def read(request: web.Request, work: Callable[[Config, Store], Any],
               fallback: Callable[[Config, BaseException], Any] | None = None) -> Any:
    """Run a database read (or a write) off the event loop, with this process's Store;
    while the database is away: fallback's answer, or 503 with Retry-After."""
    try:
        return await with_store(request.app, work, fallback)
    except Exception as exc:
        if not is_outage(exc):
            raise
        retry = max(1, round(request.app[DATABASE_KEY].outage.retry_at_in()))
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": f"database unreachable: {first_line(exc)}",
                             "retry_after_s": retry}),
            content_type="application/json", headers={"Retry-After": str(retry)}) from None


async def with_store(app: web.Application, work: Callable[[Config, Store], Any],
                     fallback: Callable[[Config, BaseException], Any] | None = None) -> Any:
    database: Database = app[DATABASE_KEY]
    return await asyncio.get_running_loop().run_in_executor(
        database.executor, database.run, work, fallback)


async def close_store(app: web.Application) -> None:
    app[DATABASE_KEY].close()
