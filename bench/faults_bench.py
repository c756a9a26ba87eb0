"""Faults against a running `vlmguard run`: what each costs the video, the archives and
the jobs.

Run by hand (after tests/run.sh has set things up; PostgreSQL at 127.0.0.1:5432):
    .venv/bin/python bench/faults_bench.py                      # every fault
    .venv/bin/python bench/faults_bench.py --faults pg_cut,bad_row --seconds 60

For each fault, one after the other, a fresh daemon: one camera (FFmpeg's testsrc2,
320x240 at 25 fps), 1-s segments, 10-s archives, one analyzer against the project's
Gemini test server, the job table on SQLite or on PostgreSQL through a TCP proxy the bench
owns (tests/tcp_proxy.py; the machine's server is never touched). After a warm-up the
fault is injected for --seconds and undone; then the bench waits for every archive on
disk to have its job (or --settle seconds). All along, tests/fault_watch.py samples the
live playlist every second and the resident memory of every process of the daemon.

Figures per fault: seconds of live video lost (a sample without a 200, or with a playlist
that did not move on for 4 s), archives missing (gaps in the archive timeline, and
archives left without a job at the end), jobs failed, the streamer's pids (1: it was never
restarted), and peak RSS per process.

Adding a fault is one function: decorate it with @fault("name", engine=...) and give it
the Run; it injects the fault, holds it for run.seconds, and undoes it. Run has the
daemon (tests/daemon.py RunningVlmguard), the Gemini server (its answers can be made
absurd, oversized or slow), the proxy (PostgreSQL only) and helpers (run.api,
run.sqlite). A fault that needs the daemon configured differently gives config=
(extra TOML tables), daemon= (keys of its [daemon] table) or before_start= (a function
run before `vlmguard run`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from daemon import RunningVlmguard  # noqa: E402
from fault_watch import LiveWatch  # noqa: E402
from gemini_server import FakeGemini  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

import sqlalchemy  # noqa: E402

from vlmguard.health import run_dir  # noqa: E402
from vlmguard.layout import archive_start  # noqa: E402
from vlmguard.store.bundle import Store  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ARCHIVE_SECONDS = 10


@dataclass
class Fault:
    name: str
    inject: Callable[["Run"], None]
    engine: str  # sqlite or postgres
    config: str = ""  # TOML tables added to the daemon's config
    daemon: str = ""  # keys added to its [daemon] table
    before_start: Callable[["Run"], None] | None = None


FAULTS: dict[str, Fault] = {}


def fault(name: str, engine: str = "sqlite", config: str = "", daemon: str = "",
          before_start: Callable[["Run"], None] | None = None):
    def register(function: Callable[["Run"], None]):
        FAULTS[name] = Fault(name, function, engine, config, daemon, before_start)
        return function
    return register


@dataclass
class Run:
    fault: Fault
    seconds: float
    directory: Path
    gemini: FakeGemini
    db_url: str
    proxy: TcpProxy | None = None
    daemon: RunningVlmguard | None = None
    notes: dict = field(default_factory=dict)

    def api(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.daemon.port}{path}",
                                        timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def sqlite(self) -> sqlite3.Connection:
        return sqlite3.connect(self.daemon.data_dir / "vlmguard.db", timeout=60,
                               isolation_level=None)

    def archives(self) -> list[Path]:
        return sorted((self.daemon.data_dir / "archives" / "cam1").glob("*.ts"))


# -- the faults -----------------------------------------------------------------------------

@fault("pg_cut", engine="postgres")
def pg_cut(run: Run) -> None:
    """PostgreSQL cut off mid-run: every connection dropped, new ones reset."""
    run.proxy.cut()
    time.sleep(run.seconds)
    run.proxy.up()


def refuse_at_start(run: Run) -> None:
    run.proxy.refuse()


@fault("pg_down_at_start", engine="postgres", before_start=refuse_at_start)
def pg_down_at_start(run: Run) -> None:
    """PostgreSQL refusing connections when `vlmguard run` starts, and for a while after."""
    time.sleep(run.seconds)
    run.proxy.up()


@fault("sqlite_locked")
def sqlite_locked(run: Run) -> None:
    """Another program holds the SQLite write lock (a backup, an operator's sqlite3 shell
    left in a transaction) longer than the busy timeout."""
    holder = run.sqlite()
    holder.execute("BEGIN IMMEDIATE")
    time.sleep(run.seconds)
    holder.execute("ROLLBACK")
    holder.close()


@fault("bad_row")
def bad_row(run: Run) -> None:
    """A pending job with invalid JSON in sources and an incident with a garbage time; the
    API and the event stream are read all along."""
    conn = run.sqlite()
    conn.execute("INSERT INTO analysis_jobs (camera_id, video_path, segment_start, segment_end, "
                 "status, created_at, run_after, retry_count, max_retries, kind, priority, "
                 "windows, sources) VALUES ('cam1', '/nowhere.ts', '2020-01-01 00:00:00', "
                 "'2020-01-01 00:10:00', 'pending', '2020-01-01 00:00:00', "
                 "'2020-01-01 00:00:00', 0, 3, 'catchup', 1, 1, '{not json')")
    conn.execute("UPDATE incidents SET start_at = 'garbage' WHERE id = "
                 "(SELECT max(id) FROM incidents)")
    conn.close()
    deadline, answers = time.time() + run.seconds, []
    while time.time() < deadline:
        answers += [run.api("/api/incidents?limit=500")[0], run.api("/api/jobs?limit=500")[0]]
        time.sleep(1)
    run.notes["api_not_200"] = sum(1 for a in answers if a != 200)
    run.notes["api_requests"] = len(answers)


@fault("analyzer_crash_loop", daemon="max_restarts = 3\nmax_backoff_seconds = 30")
def analyzer_crash_loop(run: Run) -> None:
    """analyzer-0 dies each time it comes back (SIGKILL while idle), for run.seconds."""
    deadline, killed = time.time() + run.seconds, set()
    while time.time() < deadline:
        pid = run.daemon.child_pid("analyzer-0")
        try:
            state = json.loads((run_dir(run.daemon.data_dir) / "analyzer-0.json").read_text())
        except (OSError, ValueError):
            state = {}
        if pid and pid not in killed and not str(state.get("state", "")).startswith("job"):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    status, body = run.api("/api/health")
    run.notes["kills"] = len(killed)
    run.notes["backed_off"] = json.loads(body).get("backed_off") if body else None


# -- the harness ----------------------------------------------------------------------------

def database_for(engine: str, directory: Path) -> tuple[str, Callable[[], None]]:
    if engine == "sqlite":
        return "", lambda: None
    schema = "b_" + secrets.token_hex(6)
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
    return f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}", drop


def run_fault(chosen: Fault, seconds: float, warmup: float, settle: float) -> dict:
    directory = Path(tempfile.mkdtemp(prefix=f"vlmguard-fault-{chosen.name}-"))
    url, drop = database_for(chosen.engine, directory)
    proxy = TcpProxy(("127.0.0.1", 5432)) if url else None
    database = (f'[database]\nurl = "{url.replace("127.0.0.1:5432", proxy.url_host)}"\n'
                if url else "")
    with FakeGemini() as gemini:
        run = Run(chosen, seconds, directory, gemini, url, proxy)
        if chosen.before_start:
            chosen.before_start(run)
        run.daemon = RunningVlmguard(directory, gemini.base_url, workers=1, daemon=chosen.daemon,
                                     extra=database + chosen.config).start()
        started = time.time()
        try:
            run.daemon.wait_live(timeout=60)
            with LiveWatch(run.daemon.url(), run.daemon.proc.pid) as watch:
                time.sleep(warmup)
                injected = time.time()
                chosen.inject(run)
                undone = time.time()
                settled, resumed = wait_settled(run, settle)
            # An orderly stop registers what is still open: what is left unregistered
            # after it was lost.
            exit_code = run.daemon.stop()
            figures = measure(run, watch, started, injected, undone, settled)
            figures["analysis_resumed_after_undo_s"] = round(resumed - undone, 1)
            figures["exit_code"] = exit_code
        finally:
            run.daemon.kill()
            if proxy:
                proxy.close()
            drop()
    return figures


def registered_paths(run: Run) -> set[str] | None:
    url = run.db_url or f"sqlite:///{run.daemon.data_dir / 'vlmguard.db'}"
    try:
        with Store(url, create=False) as store:
            return store.recordings.registered_paths()
    except Exception:
        return None


def completed(run: Run) -> int | None:
    url = run.db_url or f"sqlite:///{run.daemon.data_dir / 'vlmguard.db'}"
    try:
        with Store(url, create=False) as store:
            return store.reports.count_jobs(states=("completed",))
    except Exception:
        return None


def wait_settled(run: Run, settle: float) -> tuple[float, float]:
    """Until every archive on disk has its job and a job has completed since the fault
    was undone (or settle seconds): when each happened (nan: not within settle)."""
    deadline = time.time() + settle
    before = completed(run) or 0
    registered = resumed = float("nan")
    while time.time() < deadline and (registered != registered or resumed != resumed):
        known = registered_paths(run)
        if registered != registered and known is not None \
                and {str(p) for p in run.archives()} <= known:
            registered = time.time()
        if resumed != resumed and (completed(run) or 0) > before:
            resumed = time.time()
        time.sleep(1)
    return registered, resumed


def measure(run: Run, watch: LiveWatch, started: float, injected: float, undone: float,
            settled: float) -> dict:
    starts = sorted(archive_start(p).timestamp() for p in run.archives())
    gaps = sum(max(0, round((b - a) / ARCHIVE_SECONDS) - 1) for a, b in zip(starts, starts[1:]))
    known = registered_paths(run) or set()
    unregistered = sum(1 for p in run.archives() if str(p) not in known)
    url = run.db_url or f"sqlite:///{run.daemon.data_dir / 'vlmguard.db'}"
    with Store(url, create=False) as store:
        counts = {s: store.reports.count_jobs(states=(s,)) for s in ("pending", "processing",
                                                                      "completed", "failed")}
        quarantined = store.quarantine.quarantined()["total"]
    return {
        "fault": run.fault.name, "engine": run.fault.engine, "seconds": run.seconds,
        "live_samples": len(watch.samples), "live_seconds_lost": watch.seconds_lost(),
        "live_not_200": len(watch.not_ok()),
        "archives": len(starts), "archive_gaps": gaps, "archives_unregistered": unregistered,
        "jobs": counts, "jobs_failed": counts["failed"], "quarantined": quarantined,
        "streamer_pids": len(watch.pids.get("streamer", ())),
        "child_exits": sum(1 for e in run.daemon.log_events() if e["event"] == "child exited"),
        "settled_after_undo_s": round(settled - undone, 1),
        "peak_rss_mb": {name: round(kb / 1024, 1) for name, kb in sorted(watch.peak_rss_kb.items())},
        "notes": run.notes,
    }


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_1m_at_start": os.getloadavg()[0]}


def table(results: list[dict]) -> str:
    names = sorted({n for r in results for n in r["peak_rss_mb"]})
    head = ("| fault | engine | live s lost | archives missing | jobs failed | streamer pids | "
            "registered / analysing again after | "
            + " | ".join(f"{n} MB" for n in names) + " |")
    lines = [head, "|" + " --- |" * (7 + len(names))]
    for r in results:
        missing = r["archive_gaps"] + r["archives_unregistered"]
        lines.append(f"| {r['fault']} | {r['engine']} | {r['live_seconds_lost']} of "
                     f"{r['live_samples']} | {missing} | {r['jobs_failed']} | "
                     f"{r['streamer_pids']} | {r['settled_after_undo_s']} s / "
                     f"{r['analysis_resumed_after_undo_s']} s | "
                     + " | ".join(str(r["peak_rss_mb"].get(n, "-")) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated, of: {', '.join(FAULTS)}")
    parser.add_argument("--seconds", type=float, default=60, help="how long each fault lasts")
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--settle", type=float, default=120)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    about = machine()
    results = []
    for name in args.faults.split(","):
        print(f"fault {name} ({args.seconds:g} s) ...", file=sys.stderr, flush=True)
        results.append(run_fault(FAULTS[name], args.seconds, args.warmup, args.settle))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    about["load_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(about))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": about, "results": results}, indent=1))


if __name__ == "__main__":
    main()
