"""How a process that needs the database lives through its outages.

Recording never needs the database. The processes that do (archiver, analyzers,
notifier, the streaming process's API) wait for it instead of exiting: they try again
after 1 s, doubling to 30 s, keep beating their heartbeat meanwhile (a wait is not a
hang), and log the outage's start and end once each. Between tries a process skips its
database work at once (check), so a database that answers slowly or not at all (a
PostgreSQL server cut off, a SQLite file another program holds locked) costs one wait
per try, not one per loop.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Callable

from vlmguard.errors import DatabaseUnreachable, first_line
from vlmguard.logs import get_logger

log = get_logger("vlmguard.outage")

FIRST_WAIT, MAX_WAIT = 1.0, 30.0


class Outage:
    """One process's view of the database: up, or away since when and why."""

    def __init__(self, who: str):
        self.who = who
        self.since: float | None = None
        self.error: str | None = None
        self.wait = FIRST_WAIT
        self.retry_at = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def due(self) -> bool:
        """Time to try the database again (always, while it is up)."""
        return time.monotonic() >= self.retry_at

    def retry_at_in(self) -> float:
        """Seconds until the next try (0 while the database is up)."""
        return max(self.retry_at - time.monotonic(), 0.0) if self.down else 0.0

    def check(self) -> None:
        """Raise DatabaseUnreachable at once while waiting between tries."""
        if self.down and not self.due():
            raise DatabaseUnreachable(f"waiting for the database: {self.error}")

    def failed(self, exc: BaseException) -> float:
        """Count a failed try; returns how long to wait before the next."""
        self.error = first_line(getattr(exc, "orig", None) or exc)
        if self.since is None:
            self.since = time.time()
            log.warning("database unreachable: waiting for it (recording goes on)",
                        process=self.who, error=self.error)
        wait = self.wait
        self.retry_at = time.monotonic() + wait
        self.wait = min(wait * 2, MAX_WAIT)
        return wait

    def back(self) -> bool:
        """A try succeeded; True when that ends an outage."""
        if self.since is None:
            return False
        log.info("database reachable again", process=self.who,
                 down_s=round(time.time() - self.since, 1))
        self.since = self.error = None
        self.wait, self.retry_at = FIRST_WAIT, 0.0
        return True

    def describe(self) -> str | None:
        """For a state file: "database unreachable since 08:00:31 UTC: <why>", or None."""
        if self.since is None:
            return None
        clock = datetime.fromtimestamp(self.since, timezone.utc).strftime("%H:%M:%S")
        return f"database unreachable since {clock} UTC: {self.error}"

    def sleep(self, exc: BaseException, stopping: threading.Event,
              beat: Callable[[], None]) -> None:
        """Count the failed try and wait for the next, beating; a stop cuts it short."""
        deadline = time.monotonic() + self.failed(exc)
        while not stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            beat()
            stopping.wait(min(left, 1.0))
