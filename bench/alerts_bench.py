"""Alerts benchmark: commit-to-received latency, and what a receiver outage costs.

Run by hand (the shared Mosquitto on 127.0.0.1:1883 for `latency`; `outage` starts its
own on a free port):
    .venv/bin/python bench/alerts_bench.py latency [--incidents 200] [--every 0.1] [--database URL]
    .venv/bin/python bench/alerts_bench.py outage [--minutes 10] [--outage-minutes 10] [--every 5]

Both run the real notifier process (vlmguard.notifier.main) against a SQLite job table in
a temporary folder; incidents are stored the way an analyzer stores them (register,
claim, complete: one incident per window), and their commit time is the moment
complete() returned. latency: the same instant to the webhook receiver's request
(aiohttp, signed) and to the MQTT message on <prefix>/incidents at a paho subscriber;
p50/p95/p99/max. outage: an incident every --every seconds; in the middle the webhook
receiver answers 500 and the own Mosquitto is stopped for --outage-minutes; then both come
back and the script waits until nothing is pending. Counts per destination: delivered,
lost (never received), duplicates (received more than once; with the same key?).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from alert_receiver import Receiver, Subscriber  # noqa: E402
from daemon import free_port  # noqa: E402

from vlmguard import notifier  # noqa: E402
from vlmguard.config import load_config  # noqa: E402
from vlmguard.store.bundle import Store  # noqa: E402
from vlmguard.store.records import IncidentRecord, Outcome  # noqa: E402

CTX = multiprocessing.get_context("spawn")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SECRET = "bench-secret"


def make_config(folder: Path, receiver: Receiver, broker_port: int, database: str = ""):
    prefix = "bench" + secrets.token_hex(4)
    path = folder / "config.toml"
    path.write_text(f"""
[database]
url = "{database}"
[storage]
data_dir = "{folder / 'data'}"
[mqtt]
host = "127.0.0.1"
port = {broker_port}
topic_prefix = "{prefix}"
discovery_prefix = ""
keepalive_seconds = 5
[[alerts.rules]]
name = "bench"
min_severity = "low"
cooldown_seconds = 0
webhooks = ["{receiver.url}/hook"]
webhook_secret = "{SECRET}"
[[cameras]]
id = "cam"
url = "lavfi:testsrc2"
""")
    return load_config(path)


def store_incident(store: Store, n: int) -> tuple[int, float]:
    start = T0 + timedelta(minutes=10 * n)
    store.queue.register("cam", f"/a/{n}.mp4", start, start + timedelta(minutes=10))
    job = store.queue.claim("bench")
    incident = IncidentRecord(start + timedelta(seconds=3), start + timedelta(seconds=5), "fall",
                              "high", f"bench incident {n}", 0.9)
    store.queue.complete(job, Outcome(result={"summary": "bench"}, safety_score=50,
                                      incidents=[incident]))
    committed = time.time()
    [row] = store.incidents.list_incidents(job.id)
    return row["id"], committed


@contextmanager
def own_schema(url: str):
    """A schema of the bench's own in the given PostgreSQL database, dropped at the end."""
    import sqlalchemy

    if not url:
        yield ""
        return
    schema = "alerts_bench_" + secrets.token_hex(4)
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return (f"n={len(ordered)} p50={q[49] * 1000:.0f} ms p95={q[94] * 1000:.0f} ms "
            f"p99={q[98] * 1000:.0f} ms max={ordered[-1] * 1000:.0f} ms")


def wait_drained(store: Store, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and store.reports.list_deliveries(statuses=("pending",)):
        time.sleep(0.2)


def latency(args) -> None:
    with tempfile.TemporaryDirectory() as tmp, Receiver(secret=SECRET) as receiver, \
            own_schema(args.database) as database:
        config = make_config(Path(tmp), receiver, 1883, database)
        topic = f"{config.mqtt.topic_prefix}/incidents"
        watcher = Subscriber(1883, topic)
        with Store.from_config(config) as store:
            proc = CTX.Process(target=notifier.main, args=(config,))
            proc.start()
            time.sleep(2)  # connected and idle
            committed = {}
            for n in range(args.incidents):
                incident_id, at = store_incident(store, n)
                committed[incident_id] = at
                time.sleep(args.every)
            wait_drained(store, 60)
            proc.terminate()
            proc.join(10)
        time.sleep(0.5)
        watcher.close()
    hook = {r.json["id"]: r.at for r in reversed(receiver.delivered("/hook"))}
    mqtt = {}
    for _t, payload, _retained, at in reversed(watcher.messages):
        mqtt[json.loads(payload)["id"]] = at
    print(f"incidents {len(committed)}, one every {args.every * 1000:.0f} ms")
    print("commit -> webhook received: " + percentiles([hook[i] - c for i, c in committed.items() if i in hook]))
    print("commit -> MQTT received:    " + percentiles([mqtt[i] - c for i, c in committed.items() if i in mqtt]))
    print(f"missing: webhook {len(set(committed) - set(hook))}, mqtt {len(set(committed) - set(mqtt))}")


class OwnBroker:
    def __init__(self, folder: Path):
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.proc = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def outage(args) -> None:
    with tempfile.TemporaryDirectory() as tmp, Receiver(secret=SECRET) as receiver:
        broker = OwnBroker(Path(tmp))
        broker.start()
        config = make_config(Path(tmp), receiver, broker.port)
        topic = f"{config.mqtt.topic_prefix}/incidents"
        watcher = Subscriber(broker.port, topic)
        total = args.minutes * 60
        down_from = (total - args.outage_minutes * 60) / 2
        down_to = down_from + args.outage_minutes * 60
        with Store.from_config(config) as store:
            proc = CTX.Process(target=notifier.main, args=(config,))
            proc.start()
            time.sleep(2)
            began = time.time()
            committed, n, down, back_at = {}, 0, False, None
            while time.time() - began < total:
                elapsed = time.time() - began
                if not down and down_from <= elapsed < down_to:
                    receiver.fail_until = began + down_to
                    broker.stop()
                    down = True
                    print(f"{elapsed:6.1f} s: webhook answers 500, broker stopped")
                if down and elapsed >= down_to:
                    broker.start()
                    back_at = time.time()
                    down = False
                    print(f"{elapsed:6.1f} s: both back")
                incident_id, at = store_incident(store, n)
                committed[incident_id] = at
                n += 1
                time.sleep(max(0.0, began + n * args.every - time.time()))
            if down:
                broker.start()
                back_at = time.time()
            recovered = time.time()
            wait_drained(store, 300)
            drained = time.time() - recovered
            counts = store.reports.delivery_counts()
            proc.terminate()
            proc.join(10)
        time.sleep(1)
        watcher.close()
        broker.stop()
    hooks = defaultdict(set)
    hook_count = Counter()
    for r in receiver.delivered("/hook"):
        hook_count[r.json["id"]] += 1
        hooks[r.json["id"]].add(r.headers["Idempotency-Key"])
    mqtt_count = Counter(json.loads(p)["id"] for _t, p, _r, _a in watcher.messages)
    print(f"{len(committed)} incidents over {total / 60:g} min, outage {args.outage_minutes:g} min; "
          f"drained {drained:.1f} s after the end")
    print(f"outbox: {json.dumps({d: {k: v for k, v in c.items() if k in ('delivered', 'failed', 'pending')} for d, c in counts.items()})}")
    for name, count in (("webhook", hook_count), ("mqtt", mqtt_count)):
        lost = len(set(committed) - set(count))
        dups = sum(c - 1 for c in count.values() if c > 1)
        print(f"{name}: delivered {len(set(count) & set(committed))}, lost {lost}, duplicates {dups}")
    print(f"webhook duplicates with a different Idempotency-Key: "
          f"{sum(1 for keys in hooks.values() if len(keys) > 1)}")
    # The receiver answers 200 again from began + down_to; the broker restarts at the
    # first incident after that.
    receiver_back = receiver.fail_until
    hook_first = {}
    for r in receiver.delivered("/hook"):
        hook_first.setdefault(r.json["id"], r.at)
    mqtt_first = {}
    for _t, p, _r, at in watcher.messages:
        mqtt_first.setdefault(json.loads(p)["id"], at)
    for name, first, back in (("webhook", hook_first, receiver_back),
                              ("mqtt", mqtt_first, back_at)):
        late = [first[i] - back for i, at in committed.items()
                if at < back and i in first and first[i] >= back]
        if late:
            print(f"{name}: backlog of {len(late)} delivered {min(late):.1f}-{max(late):.1f} s after recovery")
    print(f"webhook attempts answered 500: {sum(1 for r in receiver.requests if r.answered == 500)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("latency")
    one.add_argument("--incidents", type=int, default=200)
    one.add_argument("--every", type=float, default=0.1)
    one.add_argument("--database", default="", help="a PostgreSQL URL (default: SQLite in a temporary folder)")
    two = sub.add_parser("outage")
    two.add_argument("--minutes", type=float, default=20)
    two.add_argument("--outage-minutes", type=float, default=10)
    two.add_argument("--every", type=float, default=5)
    args = parser.parse_args()
    (latency if args.mode == "latency" else outage)(args)


if __name__ == "__main__":
    main()
