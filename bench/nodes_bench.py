"""Several boxes on one PostgreSQL: what analysing on another box costs.

Run by hand, as root or not (PostgreSQL at 127.0.0.1:5432, database test; FFmpeg):
    .venv/bin/python bench/nodes_bench.py [--seconds 150] [--jobs 3000]

1. Latency and bytes, side by side in one run (each setup its own PostgreSQL schema, so
   its own queue): setup "local", one box recording one camera with one analyzer; setup
   "remote", a box recording the same kind of camera with no analyzer plus an
   analysis-only box with one analyzer, which fetches each window over HTTP. Both are
   real `vlmguard run` processes with the project's Gemini-protocol server as the model.
   Latency: a window job's completed_at - segment_end (the window's end), median per
   setup over the windows after the first; bytes: what the analysis-only box fetched
   per window (its log).
2. Database growth: the remote setup's tables (pg_total_relation_size of every table in
   its schema) divided by its window jobs, times the windows of one camera-day at the
   default window_seconds (60).
3. Queue: 3 nodes x 4 analyzers (12 processes, in-process workers as each analyzer claims
   and completes) draining N window jobs registered by 3 recording nodes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from vlmguard.store.bundle import Store  # noqa: E402
from vlmguard.store.records import Outcome  # noqa: E402

from daemon import free_port  # noqa: E402
from gemini_server import FakeGemini  # noqa: E402

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CAMERA = "lavfi:testsrc2=size=1280x720:rate=25"
WINDOW_SECONDS = 10
CTX = multiprocessing.get_context("spawn")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def schema_url(schema: str) -> str:
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def fresh_schema(schema: str) -> str:
    engine = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    engine.dispose()
    return schema_url(schema)


def start_box(folder: Path, name: str, url: str, gemini: str, *, camera: bool,
              workers: int) -> tuple[subprocess.Popen, Path]:
    folder.mkdir(parents=True)
    cameras = f'[[cameras]]\nid = "cam-{name}"\nurl = "{CAMERA}"\n' if camera else ""
    config = folder / "config.toml"
    config.write_text(f"""
[server]
port = {free_port()}
[storage]
data_dir = "{folder / 'data'}"
segment_seconds = 1
[database]
url = "{url}"
[analysis]
workers = {workers}
window_seconds = {WINDOW_SECONDS}
static_check_minutes = 0
poll_seconds = 0.5
[gemini]
base_url = "{gemini}"
[daemon]
node = "{name}"
{cameras}
""")
    log = folder / "vlmguard.log"
    proc = subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config", str(config)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "GEMINI_API_KEY": "test-key-123",
                                 "PYTHONPATH": str(REPO)})
    return proc, log


def window_latencies(url: str) -> list[float]:
    with Store(url, create=False) as store:
        done = store.reports.list_jobs(states=["completed"], results=False, limit=10000)
    windows = sorted((j for j in done if j.kind == "window"), key=lambda j: j.segment_end)
    return [(j.completed_at - j.segment_end).total_seconds() for j in windows[1:]]


def fetched(log: Path) -> list[tuple[int, float]]:
    """(bytes, seconds) of each footage fetch the analysis-only box logged."""
    found = []
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "footage fetched from its node":
            found.append((int(event["bytes"]), float(event["seconds"])))
    return found


def table_figures(schema: str, table: str) -> tuple[int, int, float]:
    """(bytes of the table with its indexes and TOAST, rows, mean row bytes)."""
    engine = sqlalchemy.create_engine(PG_URL)
    with engine.connect() as conn:
        size = conn.execute(sqlalchemy.text("SELECT pg_total_relation_size(:t)"),
                            {"t": f"{schema}.{table}"}).scalar()
        rows, mean = conn.execute(sqlalchemy.text(
            f"SELECT count(*), coalesce(avg(pg_column_size(t.*)), 0) FROM {schema}.{table} t")
            ).one()
    engine.dispose()
    return int(size), int(rows), float(mean)


def latency_and_bytes(seconds: float) -> dict:
    local_url, remote_url = fresh_schema("nodes_local"), fresh_schema("nodes_remote")
    with FakeGemini() as gemini, tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        boxes = [start_box(base / "solo", "solo", local_url, gemini.base_url, camera=True,
                           workers=1),
                 start_box(base / "rec", "rec", remote_url, gemini.base_url, camera=True,
                           workers=0),
                 start_box(base / "ana", "ana", remote_url, gemini.base_url, camera=False,
                           workers=1)]
        try:
            time.sleep(seconds)
        finally:
            for proc, _log in boxes:
                proc.terminate()
            for proc, _log in boxes:
                proc.wait(120)
        local, remote = window_latencies(local_url), window_latencies(remote_url)
        moved = fetched(boxes[2][1])
    return {"local": local, "remote": remote, "bytes": moved,
            "jobs": table_figures("nodes_remote", "analysis_jobs"),
            "incidents": table_figures("nodes_remote", "incidents")}


def drain(url: str, worker_id: str, start, out) -> None:
    done = 0
    with Store(url, node=worker_id.split("/")[0]) as store:
        start.wait()
        while True:
            job = store.queue.claim(worker_id)
            if job is None:
                break
            store.queue.complete(job, Outcome(result={"safety_score": 100, "summary": "ok",
                                                "incidents": []}, safety_score=100))
            done += 1
    out.put((done, time.perf_counter()))


def queue_rate(jobs: int, nodes: int = 3, analyzers: int = 4) -> float:
    url = fresh_schema("nodes_queue")
    for n in range(nodes):
        with Store(url, node=f"node-{n}") as store:
            for i in range(n, jobs, nodes):
                start = T0 + timedelta(seconds=WINDOW_SECONDS * i)
                store.queue.register(f"cam-{n}", f"/w{i}.ffconcat", start,
                               start + timedelta(seconds=WINDOW_SECONDS), kind="window")
    start, out = CTX.Event(), CTX.Queue()
    workers = [CTX.Process(target=drain, args=(url, f"node-{n}/analyzer-{a}", start, out))
               for n in range(nodes) for a in range(analyzers)]
    for worker in workers:
        worker.start()
    time.sleep(3.0)  # every child imported and connected
    began = time.perf_counter()
    start.set()
    results = [out.get() for _ in workers]
    for worker in workers:
        worker.join()
    assert sum(r[0] for r in results) == jobs
    return jobs / (max(r[1] for r in results) - began)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    with sqlalchemy.create_engine(PG_URL).connect() as conn:
        version = conn.execute(sqlalchemy.text("SHOW server_version")).scalar()
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, PostgreSQL {version}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--jobs", type=int, default=3000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    found = latency_and_bytes(args.seconds)
    local, remote = statistics.median(found["local"]), statistics.median(found["remote"])
    print(f"\n| window end -> result (median, {WINDOW_SECONDS}-s windows, {CAMERA}) | windows | s |")
    print("|---|---|---|")
    print(f"| analysed on the recording box | {len(found['local'])} | {local:.2f} |")
    print(f"| analysed on another box (footage fetched over HTTP) | {len(found['remote'])} "
          f"| {remote:.2f} |")
    print(f"| ratio another / recording box | | {remote / local:.2f} |")
    moved = found["bytes"]
    per_window = statistics.median(b for b, _ in moved)
    print(f"\nbytes moved per {WINDOW_SECONDS}-s window: median {per_window / 1e6:.2f} MB over "
          f"{len(moved)} windows ({per_window * 8 / WINDOW_SECONDS / 1e6:.2f} Mbit/s per camera "
          f"while analysed elsewhere); the fetch (stream copy + HTTP) took median "
          f"{statistics.median(s for _, s in moved):.2f} s")
    shared = queue_rate(args.jobs)
    # A job's bytes in the table: the queue run's (thousands of rows, so its indexes and
    # pages are to scale) with its small rows swapped for the real windows' mean row.
    size, rows, mean = table_figures("nodes_queue", "analysis_jobs")
    real_row = found["jobs"][2]
    per_job = size / rows - mean + real_row
    incident_row = found["incidents"][2]
    day = 86400 / 60
    print(f"\ndatabase: a window job {per_job:,.0f} bytes (row {real_row:,.0f} with its result, "
          f"the rest indexes and page space), so {per_job * day / 1e6:.2f} MB per camera-day "
          f"at window_seconds = 60; an incident row {incident_row:,.0f} bytes on top. Rows are "
          "kept (no clean-up of analysed jobs yet): growth, not a steady size.")
    alone = queue_rate(args.jobs, nodes=1)
    print(f"\n| PostgreSQL queue, {args.jobs} window jobs | claim+complete/s |")
    print("|---|---|")
    print(f"| 3 nodes x 4 analyzers (12 processes) | {shared:,.0f} |")
    print(f"| 1 node x 4 analyzers, same run | {alone:,.0f} |")
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
