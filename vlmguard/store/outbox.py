"""The alerts outbox: one row per (incident or analysed window, destination), written in
the transaction that stores the incident (JobQueue.complete calls enqueue_deliveries), so
that the notifier sends each at least once (the transactional outbox); and the notifier's
claims, results and retries. This is the only part of the store that knows the alert plan.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import func, or_, select, update
from sqlalchemy.engine import Connection

from vlmguard.alerts.plan import AlertPlan
from vlmguard.store.database import Database
from vlmguard.store.quarantine import quarantining
from vlmguard.store.records import Delivery, Job, Outcome, checked_time, utcnow
from vlmguard.store.schema import DELIVERY_OK, INCIDENT_OK, deliveries, incidents


def alert_plan(config) -> AlertPlan:
    """Which deliveries a stored incident or window gets, from the config."""
    return AlertPlan(config)


class Outbox:
    """The alert_deliveries table."""

    def __init__(self, db: Database, plan: AlertPlan | None = None):
        self.db = db
        # Which deliveries enqueue_deliveries writes with a job's incidents. None: none.
        self.plan = plan

    @classmethod
    def from_config(cls, db: Database, config) -> "Outbox":
        return cls(db, alert_plan(config))

    def enqueue_deliveries(self, conn: Connection, job: Job, outcome: Outcome) -> None:
        """Inside JobQueue.complete()'s transaction: a delivery per (new incident, destination) and
        per (window, score destination). An incident that already has deliveries (one
        extended by a later window keeps its id) gets none again."""
        plan = self.plan
        if plan is None or not plan.enabled:
            return
        now = utcnow()
        summary = (outcome.result or {}).get("summary") if isinstance(outcome.result, dict) else None
        rows = [self._delivery_values(now, kind="safety_score", destination=d, rule=None,
                                      camera_id=job.camera_id, job_id=job.id, status="pending",
                                      payload=plan.score_payload(job, outcome.safety_score, summary))
                for d in plan.score_destinations(job.camera_id)]
        made = len(rows)
        if rows:
            conn.execute(deliveries.insert(), rows)
        alerted = select(deliveries.c.id).where(deliveries.c.incident_id == incidents.c.id)
        fresh = conn.execute(select(incidents).where(incidents.c.job_id == job.id, INCIDENT_OK,
                                                     ~alerted.exists())
                             .order_by(incidents.c.id)).all()
        for found in fresh:
            incident = dict(found._mapping)
            payload = plan.incident_payload(incident, job, outcome.safety_score, summary)
            for route in plan.incident_routes(job.camera_id, incident["category"],
                                              incident["severity"]):
                cooling = self._cooling(conn, route, job.camera_id, incident)
                # One row at a time: the next incident's cooldown check must see this one.
                conn.execute(deliveries.insert(), self._delivery_values(
                    now, kind="incident", destination=route.destination, rule=route.rule,
                    camera_id=job.camera_id, job_id=job.id, incident_id=incident["id"],
                    category=incident["category"], incident_at=incident["start_at"],
                    status="suppressed" if cooling else "pending", payload=payload,
                    last_error=f"cooldown: {cooling}" if cooling else None, node=job.node))
                made += 1
        if made:
            self.db.notify(conn)

    def enqueue_system(self, payload: dict[str, Any], destinations: Sequence[str],
                       event_key: str) -> int:
        """An operators' message about vlmguard itself (a role crash-looping, recovered)
        to every destination, once per event_key whoever enqueues it and however often:
        its rows' keys derive from it. Returns how many rows were new."""
        now = utcnow()
        insert = self.db.insert(deliveries).on_conflict_do_nothing(
            index_elements=["key"])
        made = 0
        with self.db.write() as conn:
            for destination in destinations:
                key = hashlib.sha256(f"{event_key}|{destination}".encode()).hexdigest()[:32]
                made += conn.execute(insert, self._delivery_values(
                    now, kind="system", destination=destination, rule=None, camera_id="",
                    status="pending", payload=payload) | {"key": key}).rowcount
            if made:
                self.db.notify(conn)
        return made

    @staticmethod
    def _delivery_values(now: datetime, **values: Any) -> dict[str, Any]:
        return dict(key=secrets.token_hex(16), attempts=0, created_at=now, next_attempt_at=now,
                    **values)

    def _cooling(self, conn: Connection, route: Any, camera_id: str,
                 incident: dict[str, Any]) -> str | None:
        """Why this route is in its cooldown (the earlier incident that was sent), or None."""
        if not route.cooldown_seconds or route.rule is None:
            return None
        window = timedelta(seconds=route.cooldown_seconds)
        start = incident["start_at"]
        earlier = conn.execute(
            select(deliveries.c.incident_id, deliveries.c.incident_at)
            .where(deliveries.c.rule == route.rule, deliveries.c.destination == route.destination,
                   deliveries.c.camera_id == camera_id,
                   deliveries.c.category == incident["category"],
                   deliveries.c.status != "suppressed", DELIVERY_OK,
                   deliveries.c.incident_at > start - window,
                   deliveries.c.incident_at < start + window)
            .order_by(deliveries.c.incident_at.desc()).limit(1)).first()
        if earlier is None:
            return None
        return (f"incident {earlier.incident_id} of the same rule, camera and category "
                f"within {route.cooldown_seconds:g} s")

    @quarantining
    def claim_deliveries(self, worker_id: str, limit: int, lease_seconds: float,
                         destinations: Sequence[str] | None = None,
                         node: str | None = None) -> list[Delivery]:
        """Take due pending deliveries for lease_seconds (another notifier skips them;
        one that dies leaves them due again when the lease runs out). With node, only
        those any box may send and that box's own (their snapshot is on its disk)."""
        now = utcnow()
        due = (select(deliveries.c.id)
               .where(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now,
                      DELIVERY_OK)
               .order_by(deliveries.c.id).limit(limit).with_for_update(skip_locked=True))
        if destinations is not None:
            due = due.where(deliveries.c.destination.in_(destinations))
        if node is not None:
            due = due.where(or_(deliveries.c.node.is_(None), deliveries.c.node == node))
        with self.db.write() as conn:
            ids = list(conn.execute(due).scalars())
            if not ids:
                return []
            conn.execute(update(deliveries).where(deliveries.c.id.in_(ids))
                         .values(claimed_by=worker_id,
                                 next_attempt_at=now + timedelta(seconds=lease_seconds)))
            rows = conn.execute(select(deliveries).where(deliveries.c.id.in_(ids))
                                .order_by(deliveries.c.id)).all()
        return [Delivery.from_row(row) for row in rows]

    def release_deliveries(self, worker_id: str) -> int:
        """A restarted notifier takes back what its previous life had claimed, at once."""
        with self.db.write() as conn:
            return conn.execute(update(deliveries)
                                .where(deliveries.c.status == "pending",
                                       deliveries.c.claimed_by == worker_id)
                                .values(claimed_by=None, next_attempt_at=utcnow())).rowcount

    def deliveries_due_now(self, destination: str) -> int:
        """A destination is back (the broker reconnected): its waiting retries go now."""
        with self.db.write() as conn:
            return conn.execute(update(deliveries)
                                .where(deliveries.c.status == "pending",
                                       deliveries.c.destination == destination,
                                       deliveries.c.claimed_by.is_(None))
                                .values(next_attempt_at=utcnow())).rowcount

    def delivered(self, delivery_id: int) -> None:
        with self.db.write() as conn:
            conn.execute(update(deliveries).where(deliveries.c.id == delivery_id)
                         .values(status="delivered", delivered_at=utcnow(), claimed_by=None,
                                 attempts=deliveries.c.attempts + 1))

    def delivery_failed(self, delivery_id: int, error: str, *, retry_in: float | None,
                        max_age_seconds: float) -> str:
        """Record a failed attempt: pending again after retry_in seconds, or failed for
        good (retry_in None, or the delivery is older than max_age_seconds). Returns the
        new status."""
        now = utcnow()
        with self.db.write() as conn:
            created = conn.execute(select(deliveries.c.created_at)
                                   .where(deliveries.c.id == delivery_id)).scalar()
            if created is None:
                return "failed"
            too_old = (now - created).total_seconds() >= max_age_seconds
            if retry_in is None or too_old:
                status, values = "failed", dict(next_attempt_at=now)
                if too_old and retry_in is not None:
                    error = f"gave up after {max_age_seconds / 3600:g} h: {error}"
            else:
                status, values = "pending", dict(next_attempt_at=now + timedelta(seconds=retry_in))
            conn.execute(update(deliveries).where(deliveries.c.id == delivery_id)
                         .values(status=status, claimed_by=None, last_error=error[:2000],
                                 last_error_at=now, attempts=deliveries.c.attempts + 1,
                                 **values))
        return status

    @quarantining
    def seconds_until_delivery_due(self, node: str | None = None) -> float | None:
        query = select(func.min(deliveries.c.next_attempt_at)).where(
            deliveries.c.status == "pending", DELIVERY_OK)
        if node is not None:  # another box's deliveries are its notifier's
            query = query.where(or_(deliveries.c.node.is_(None), deliveries.c.node == node))
        with self.db.read() as conn:
            due = checked_time(conn.execute(query).scalar())
        if due is None:
            return None
        return max((due - utcnow()).total_seconds(), 0.0)
