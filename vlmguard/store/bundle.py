"""Every part of the store over one Database, for callers that use many of them: the
CLI, the status report, the supervisor's status line, tests and benches.

A process that needs only a few parts (an analyzer: queue and pauses; the notifier: the
outbox; the archiver: queue and recordings index) builds those on a Database itself.
"""

from __future__ import annotations

from typing import Any

from vlmguard.store.database import Database
from vlmguard.store.incidents import Incidents
from vlmguard.store.nodes import Nodes
from vlmguard.store.outbox import Outbox, alert_plan
from vlmguard.store.pauses import Pauses
from vlmguard.store.quarantine import Quarantine
from vlmguard.store.queue import JobQueue
from vlmguard.store.recordings import RecordingsIndex
from vlmguard.store.reports import Reports


class Store:
    """db plus one attribute per part: queue, pauses, outbox, incidents, reports,
    recordings, quarantine, nodes. It forwards nothing: callers name the part they use."""

    def __init__(self, url: str, *, lease_seconds: float = 60, retry_backoff: float = 10.0,
                 poll_seconds: float = 5.0, create: bool = True, synchronous: str = "normal",
                 alerts: Any = None, lazy: bool = False, node: str | None = None):
        self.db = Database(url, create=create, synchronous=synchronous, lazy=lazy)
        # alerts: the alert plan (vlmguard.alerts.plan.AlertPlan) whose deliveries
        # complete() writes with a job's incidents; None: none.
        self.outbox = Outbox(self.db, alerts)
        self.queue = JobQueue(self.db, lease_seconds=lease_seconds,
                              retry_backoff=retry_backoff, poll_seconds=poll_seconds,
                              alongside_complete=self.outbox.enqueue_deliveries, node=node)
        self.pauses = Pauses(self.db)
        self.incidents = Incidents(self.db)
        self.reports = Reports(self.db)
        self.recordings = RecordingsIndex(self.db)
        self.quarantine = Quarantine(self.db)
        self.nodes = Nodes(self.db)

    @classmethod
    def from_config(cls, config, **kwargs) -> "Store":
        return cls(config.database_url, lease_seconds=config.analysis.lease_seconds,
                   retry_backoff=config.analysis.retry_backoff_seconds,
                   poll_seconds=config.analysis.poll_seconds,
                   synchronous=config.database.sqlite_synchronous,
                   alerts=alert_plan(config), node=config.node_name, **kwargs)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
