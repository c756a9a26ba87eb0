"""The notifier process: sends the alerts outbox (alert_deliveries) at least once.

The analyzers write a delivery row per (incident, destination) in the transaction that
stores the incident; this process claims due rows, hands each to its destination's
plug-in (vlmguard.alerts.registry) and records what came of it: delivered; pending again
with a backoff (1 s doubling to 60 s) until alerts.max_age_hours; or failed with the
reason. A claim is a lease: if this process dies mid-delivery its rows come back (at
once when it restarts here), so an alert may arrive twice, always with the same
Idempotency-Key, never not at all. While the database is away it waits for it (the
outbox is there); a delivery whose result cannot be recorded comes back with its lease.

It also tells the operators about vlmguard itself: when the supervisor backs off a role
in a crash loop, and when that role recovers, a "system" message goes to every
destination (MQTT: the retained <prefix>/system topic) through the same outbox, with the
same retries; one per event, however often it is noticed.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import Any

from vlmguard.alerts import registry
from vlmguard.alerts.media import existing_snapshot
from vlmguard.alerts.plan import with_links
from vlmguard.clips import save_snapshot
from vlmguard.config import Config
from vlmguard.errors import first_line
from vlmguard.ffmpeg import ffmpeg_binary
from vlmguard.child import ChildState, every, on_stop
from vlmguard.health import Beat
from vlmguard.layout import Layout
from vlmguard.livestate import cameras_online, exit_text
from vlmguard.logs import configure_logging, get_logger
from vlmguard.outage import Outage
from vlmguard.redact import redact_text
from vlmguard.store.database import Database
from vlmguard.store.engines import is_outage
from vlmguard.store.outbox import Outbox
from vlmguard.store.records import Delivery
from vlmguard.times import iso_epoch

log = get_logger("vlmguard.notifier")

LEASE_SECONDS = 120.0  # longer than any one attempt (webhooks time out at 10 s)
FIRST_RETRY, MAX_RETRY = 1.0, 60.0
MAX_IN_FLIGHT = 32
IDLE_WAIT = 1.0
CAMERA_STATES_EVERY = 2.0
STOP_GRACE_SECONDS = 5.0


def worker_name() -> str:
    """Stable across restarts on this box, so a restart takes back its own claims."""
    return f"{socket.gethostname()}-notifier"


def retry_delay(attempts: int, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """1 s, 2 s, 4 s ... capped at 60 s, +-20% jitter; at least what the receiver asked."""
    rng = rng or random
    delay = min(FIRST_RETRY * 2 ** max(attempts, 0), MAX_RETRY) * rng.uniform(0.8, 1.2)
    return max(delay, retry_after or 0.0)


def main(config: Config, beat: Beat = Beat()) -> None:
    configure_logging("notifier")
    with Database.from_config(config, lazy=True) as db:
        notifier = Notifier(config, Outbox.from_config(db, config), beat,
                            ChildState(config.data_dir, "notifier"))
        on_stop(notifier.stop)
        asyncio.run(notifier.run())
    log.info("notifier stopped")


class Notifier:
    def __init__(self, config: Config, outbox: Outbox, beat: Beat = Beat(),
                 state: ChildState | None = None):
        self.config = config
        self.outbox = outbox
        self.db = outbox.db
        self.beat = beat
        self.published = state or ChildState()
        self.worker_id = worker_name()
        self.destinations = registry.configured(config)
        self.in_flight: set[asyncio.Task] = set()
        self.stopping = False
        self.sent = 0
        self.troubled: set[str] = set()  # destinations whose last attempt failed
        self.max_age_seconds = config.alerts.max_age_hours * 3600
        self.outage = Outage("notifier")
        self.taken_back = False
        # Roles the supervisor backs off, as last told ({name: since}); the messages about
        # changes to it that still wait for the database.
        self.backed_off: dict[str, float] = {}
        self.untold: list[tuple[dict[str, Any], str]] = []

    def stop(self) -> None:
        self.stopping = True

    async def run(self) -> None:
        # Plug-ins block in threads (a PUBACK wait, Apprise, its wait for a snapshot): one
        # per delivery in flight, so a slow kind never queues another behind it.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(MAX_IN_FLIGHT + 4, thread_name_prefix="deliver"))
        for destination in self.destinations.values():
            await destination.start()
        log.info("notifier running", destinations={n: d.describe()
                                                   for n, d in self.destinations.items()})
        camera_states = every(CAMERA_STATES_EVERY, self.publish_camera_states)
        try:
            while not self.stopping:
                self.beat()
                camera_states()
                try:
                    due = self.step()
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    await self.wait_for_database(exc)
                    continue
                self.outage.back()
                if due == 0 and self.dispatch_safely():
                    await asyncio.sleep(0)
                    continue
                await self.idle(due)
        finally:
            await self.finish()

    def step(self) -> float | None:
        """The database part of one turn: take back an earlier run's claims (once), send
        reconnected destinations' retries now, and say when the next delivery is due."""
        self.db.ensure_ready()
        self.tell_operators()
        if not self.taken_back:
            taken_back = self.outbox.release_deliveries(self.worker_id)
            self.taken_back = True
            if taken_back:
                log.info("deliveries taken back from an earlier run", count=taken_back)
        self.retry_after_reconnect()
        # A read first: claiming is a write transaction, taken only when one is due.
        return self.outbox.seconds_until_delivery_due(node=self.config.node_name)

    def notice_roles(self) -> None:
        """Compare the supervisor's roles with last time: a role newly backed off, or one
        back from it, is a message to the operators."""
        from vlmguard.health import read_states

        children = read_states(self.config.data_dir).get("supervisor", {}).get("children", {})
        now_off = {name: child.get("backed_off_since") for name, child in children.items()
                   if child.get("state") == "backed off"}
        for name, since in now_off.items():
            if self.backed_off.get(name) != since:
                self.untold.append(role_message(name, children[name], backed_off=True))
        for name, since in self.backed_off.items():
            if name not in now_off:
                self.untold.append(role_message(name, children.get(name, {}), backed_off=False,
                                                since=since))
        self.backed_off = now_off

    def tell_operators(self) -> None:
        """Write the untold messages to the outbox (they wait here while it is away)."""
        while self.untold:
            payload, key = self.untold[0]
            if self.outbox.enqueue_system(payload, list(self.destinations), key):
                log.info("operators told", about=payload["event"], child=payload["role"])
            self.untold.pop(0)

    def dispatch_safely(self) -> int:
        try:
            return self.dispatch()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.outage.failed(exc)
            return 0

    async def wait_for_database(self, exc: BaseException) -> None:
        """Wait out the outage's backoff without blocking the loop (deliveries in flight
        finish; their results are recorded when the database is back, or their leases
        return them)."""
        deadline = time.monotonic() + self.outage.failed(exc)
        while not self.stopping and time.monotonic() < deadline:
            self.beat()
            self.publish_camera_states()
            await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0)))

    def dispatch(self) -> int:
        room = MAX_IN_FLIGHT - len(self.in_flight)
        if room <= 0:
            return 0
        batch = self.outbox.claim_deliveries(self.worker_id, room, LEASE_SECONDS,
                                             node=self.config.node_name)
        for delivery in batch:
            task = asyncio.create_task(self.deliver(delivery))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        return len(batch)

    async def idle(self, due: float | None) -> None:
        """Until a commit (an analyzer's incident), a retry falls due, or a second passes."""
        wait = IDLE_WAIT if due is None else min(IDLE_WAIT, due)
        if wait <= 0:
            # Due, yet nothing was claimed: another notifier holds those rows (PostgreSQL's
            # SKIP LOCKED) for a moment, or this one is full. Never spin.
            await asyncio.sleep(0.05)
            return
        if self.in_flight:
            # Tasks are running on this loop: wait without blocking it.
            await asyncio.sleep(min(wait, 0.05))
            return
        # Nothing else runs on this loop now, so blocking it is free; and the SQLite
        # watcher's connection belongs to this thread.
        self.db.wait_for_commit(wait)

    def with_media(self, delivery: Delivery) -> Delivery:
        """An incident of this box's cameras with its picture on this disk and its links on
        this box's server. An analyzer on another box could make no picture (the footage
        is here): it is made now, from the recording, once the analyzer's grace is over."""
        payload = delivery.payload
        if delivery.kind != "incident" or not isinstance(payload, dict) \
                or payload.get("type") != "incident":
            return delivery
        camera_id = str(payload.get("camera_id"))
        if self.config.camera(camera_id) is not None \
                and existing_snapshot(self.config.data_dir, payload, delivery.created_at) is None:
            try:
                start, end = (datetime.fromisoformat(str(payload[k]).replace("Z", "+00:00"))
                              for k in ("start", "end"))
                save_snapshot(ffmpeg_binary(), Layout(self.config.data_dir), camera_id,
                              int(payload["id"]), start + (end - start) / 2)
            except (KeyError, ValueError, TypeError, OSError) as exc:
                log.warning("no snapshot for the alert", incident=payload.get("id"),
                            error=str(exc))
        return replace(delivery, payload=with_links(payload, self.config.public_url))

    async def deliver(self, delivery: Delivery) -> None:
        delivery = await asyncio.to_thread(self.with_media, delivery)
        destination = self.destinations.get(delivery.destination)
        if destination is None:
            answer = registry.failed(f"destination {delivery.destination} is no longer "
                                     "in the config")
        else:
            try:
                answer = await destination.send(delivery)
            except OSError as exc:  # the network, which a plug-in should have answered for
                answer = registry.retry(redact_text(f"{type(exc).__name__}: {exc}"))
            except Exception as exc:  # a plug-in's bug must not lose the delivery
                self.published.unexpected(log, "alert plug-in failed unexpectedly: the "
                                          "delivery will be retried",
                                          destination=delivery.destination,
                                          delivery=delivery.id)
                answer = registry.retry(redact_text(f"{type(exc).__name__}: {exc}"))
        self.record(delivery, answer)

    def record(self, delivery: Delivery, answer: registry.Answer) -> None:
        try:
            self.record_answer(delivery, answer)
        except Exception as exc:
            if not is_outage(exc):
                raise
            # The claim's lease sends it again once the database is back (same key).
            log.warning("delivery result not recorded: the database is away",
                        delivery=delivery.id, outcome=answer.outcome,
                        error=first_line(exc))

    def record_answer(self, delivery: Delivery, answer: registry.Answer) -> None:
        fields = dict(delivery=delivery.id, destination=delivery.destination,
                      kind=delivery.kind, incident=delivery.incident_id,
                      attempt=delivery.attempts + 1)
        if answer.delivered:
            self.outbox.delivered(delivery.id)
            self.sent += 1
            log.info("alert delivered", **fields)
            if delivery.destination in self.troubled:
                # It answers again: what waits in backoff for it goes now, not up to a
                # minute later.
                self.troubled.discard(delivery.destination)
                self.outbox.deliveries_due_now(delivery.destination)
            return
        self.troubled.add(delivery.destination)
        delay = (retry_delay(delivery.attempts, answer.retry_after)
                 if answer.outcome == "retry" else None)
        status = self.outbox.delivery_failed(delivery.id, answer.detail, retry_in=delay,
                                             max_age_seconds=self.max_age_seconds)
        if status == "failed":
            log.error("alert delivery failed", error=answer.detail, **fields)
        else:
            log.warning("alert delivery will be retried", error=answer.detail,
                        retry_in_s=round(delay, 1), **fields)

    def retry_after_reconnect(self) -> None:
        """A destination that keeps a connection (came_back: set on reconnect) gets its
        waiting deliveries at once, not after their backoff."""
        for name, destination in self.destinations.items():
            came_back = getattr(destination, "came_back", None)
            if came_back is not None and came_back.is_set():
                came_back.clear()
                self.outbox.deliveries_due_now(name)

    def publish_camera_states(self) -> None:
        self.notice_roles()
        self.published.publish({"sent": self.sent, "in_flight": len(self.in_flight),
                                "database": self.outage.describe()})
        # Destinations that publish camera states (set_camera_states) get them.
        listeners = [d for d in self.destinations.values() if hasattr(d, "set_camera_states")]
        if listeners:
            online = cameras_online(self.config)
            for destination in listeners:
                destination.set_camera_states(online)

    async def finish(self) -> None:
        """Let what is in flight end (briefly); what does not stays claimed and goes
        again at the next start. Then say goodbye to the broker."""
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=STOP_GRACE_SECONDS)
        for task in list(self.in_flight):
            task.cancel()
        for destination in self.destinations.values():
            try:
                await destination.close()
            except OSError as exc:
                log.warning("closing a destination failed", error=str(exc))
            except Exception:  # a plug-in's bug must not stop the others closing
                self.published.unexpected(log, "closing a destination failed unexpectedly",
                                          destination=destination.describe())


def role_message(name: str, child: dict[str, Any], *, backed_off: bool,
                 since: float | None = None) -> tuple[dict[str, Any], str]:
    """The system message about one role, and the key that makes it one per event."""
    host = socket.gethostname()
    since = child.get("backed_off_since") if backed_off else since
    if backed_off:
        title = f"vlmguard on {host}: {name} is crash-looping"
        message = (f"{name} keeps exiting (last: {exit_text(child.get('last_exit'))}); it is "
                   "retried with a growing wait. Live video and recording go on. "
                   "See `vlmguard status` and the service log.")
    else:
        title = f"vlmguard on {host}: {name} recovered"
        message = f"{name} has run for a minute again after its crash loop."
    event = "role_backed_off" if backed_off else "role_recovered"
    payload = {"type": "system", "event": event, "role": name, "host": host,
               "since": iso_epoch(since), "last_exit": child.get("last_exit"),
               "title": title, "message": message, "camera_id": ""}
    return payload, f"{host}|{event}|{name}|{since}"


async def send_tests(config: Config, rule: str | None) -> list[tuple[str, str, Any]]:
    """`vlmguard alerts test`: one test message to every destination (or one rule's), now,
    outside the outbox. Returns (name, label, answer) per destination."""
    import secrets

    destinations = registry.configured(config, rule)
    payload = {"type": "test", "message": "vlmguard test alert: this destination works",
               "camera_id": "test", "public_url": config.public_url}
    results = []
    for name, destination in destinations.items():
        await destination.start()
        try:
            answer = await destination.test(payload, "test-" + secrets.token_hex(8))
        except Exception as exc:
            answer = registry.failed(redact_text(f"{type(exc).__name__}: {exc}"))
        finally:
            await destination.close()
        results.append((name, destination.describe(), answer))
    return results
