"""Job-table benchmark: claim+complete throughput and pickup latency, SQLite vs PostgreSQL.

Run by hand (PostgreSQL at 127.0.0.1:5432, database test):
    .venv/bin/python bench/queue_bench.py [--jobs 4000] [--samples 200]

Throughput: N jobs preloaded, P processes claim+complete until the table is drained;
jobs per second over the wall time from a shared start signal to the last finish.
Pickup: one idle worker blocked in next_job(); a producer registers a job every 100 ms;
latency = claim time in the worker - the moment register() returned (after commit).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy

from vlmguard.store.bundle import Store

from vlmguard.store.records import Outcome

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CTX = multiprocessing.get_context("spawn")


def drain(url, sync, worker_id, start, out):
    errors = done = 0
    with Store(url, synchronous=sync) as store:
        start.wait()
        while True:
            try:
                job = store.queue.claim(worker_id)
                if job is None:
                    break
                store.queue.complete(job, Outcome(result={"ok": True}, safety_score=100))
                done += 1
            except sqlalchemy.exc.OperationalError:
                errors += 1
    out.put((done, errors, time.perf_counter()))


def preload(url, n):
    with Store(url) as store:
        with store.db.write() as conn:
            conn.execute(sqlalchemy.text("DELETE FROM incidents"))
            conn.execute(sqlalchemy.text("DELETE FROM analysis_jobs"))
        for i in range(n):
            start = T0 + timedelta(minutes=i)
            store.queue.register("bench", f"/{i}.mp4", start, start + timedelta(minutes=10))


def throughput(url, sync, procs, n):
    preload(url, n)
    start, out = CTX.Event(), CTX.Queue()
    workers = [CTX.Process(target=drain, args=(url, sync, f"w{i}", start, out))
               for i in range(procs)]
    for w in workers:
        w.start()
    time.sleep(2.0)  # let every child import and open its engine
    began = time.perf_counter()
    start.set()
    results = [out.get() for _ in workers]
    for w in workers:
        w.join()
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results) - began
    assert done == n, f"{done} of {n} jobs completed"
    return done / elapsed, errors


def waiter(url, ready, out, n):
    with Store(url) as store:
        ready.set()
        for _ in range(n):
            job = store.queue.next_job("waiter", timeout=30)
            out.put((job.video_path, time.time()))
            store.queue.complete(job, Outcome(result={}, safety_score=100))


def pickup(url, samples):
    preload(url, 0)
    ready, out = CTX.Event(), CTX.Queue()
    proc = CTX.Process(target=waiter, args=(url, ready, out, samples))
    proc.start()
    ready.wait()
    time.sleep(1.0)
    committed = {}
    latencies = []
    with Store(url) as store:
        for i in range(samples):
            start = T0 + timedelta(minutes=i)
            store.queue.register("bench", f"/p{i}.mp4", start, start + timedelta(minutes=10))
            committed[f"/p{i}.mp4"] = time.time()
            path, claimed = out.get(timeout=30)
            latencies.append((claimed - committed[path]) * 1000)
            time.sleep(0.1)
    proc.join()
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1], latencies[-1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        backends = {"SQLite WAL, synchronous=NORMAL": (sqlite_url, "normal"),
                    "SQLite WAL, synchronous=FULL": (sqlite_url, "full")}
        if not args.skip_postgres:
            backends["PostgreSQL"] = (PG_URL + "?options=-csearch_path%3Dbench", "normal")
            engine = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql("DROP SCHEMA IF EXISTS bench CASCADE")
                conn.exec_driver_sql("CREATE SCHEMA bench")
        print(f"| backend | procs | claim+complete/s | lock errors |")
        print(f"|---|---|---|---|")
        for name, (url, sync) in backends.items():
            for procs in (1, 4, 8):
                rate, errors = throughput(url, sync, procs, args.jobs)
                print(f"| {name} | {procs} | {rate:,.0f} | {errors} |", flush=True)
        print()
        print(f"| backend | pickup p50 ms | p99 ms | max ms |")
        print(f"|---|---|---|---|")
        for name, (url, _sync) in backends.items():
            p50, p99, worst = pickup(url, args.samples)
            print(f"| {name} | {p50:.1f} | {p99:.1f} | {worst:.1f} |", flush=True)
        if not args.skip_postgres:
            with engine.connect() as conn:
                conn.exec_driver_sql("DROP SCHEMA bench CASCADE")


if __name__ == "__main__":
    main()
