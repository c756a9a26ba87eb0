"""The video never stops for anything else: `vlmguard run` through faults of the database
and of its own roles, on both engines.

Each scenario shares one running daemon and watches it all along (tests/fault_watch.py):
the streamer keeps its pid, the live playlist answers 200 every second, archives keep
being written, nothing recorded is lost (every archive on disk ends up with a job) and no
job fails for a fault that is not the job's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fault_watch import LiveWatch
from tcp_proxy import TcpProxy
from helpers import pg_address, through_proxy, wait_for
from helpers.db import db_rows
from vlmguard.health import run_dir

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

CUT_SECONDS = 30  # a minute in bench/faults_bench.py; half of it shows the same here
LOCK_SECONDS = 40  # longer than SQLite's busy timeout (30 s): writers do give up


def archives(daemon) -> list[Path]:
    return sorted((daemon.data_dir / "archives" / "cam1").glob("*.ts"))


def get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def api(daemon, path: str) -> tuple[int, dict, object]:
    status, headers, body = get(f"http://127.0.0.1:{daemon.port}{path}")
    return status, headers, json.loads(body) if body else None


def exits(daemon) -> list[dict]:
    return [e for e in daemon.log_events() if e["event"] == "child exited"]


def status_json(daemon) -> dict:
    proc = subprocess.run([sys.executable, "-m", "vlmguard", "status", "--json", "--config",
                           str(daemon.config_path)], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout)


def test_postgres_down_at_start_and_cut_mid_run(vlmguard, pg_url):
    """PostgreSQL behind a proxy the test owns: refused at start, then cut for
    CUT_SECONDS mid-run. `run` starts and records all along; the footage filed meanwhile
    is registered by the catch-up scan; no process exits, no job fails."""
    proxy = TcpProxy(pg_address())
    url = through_proxy(pg_url, proxy)
    proxy.refuse()
    try:
        daemon = vlmguard(workers=1, extra=f'[database]\nurl = "{url}"\n')
        daemon.wait_live()
        streamer = daemon.child_pid("streamer")
        with LiveWatch(daemon.url(), daemon.proc.pid) as watch:
            wait_for(lambda: len(archives(daemon)) >= 1, 40, "an archive filed without a database")
            health = api(daemon, "/api/health")
            assert health[0] == 503 and not health[2]["database"]["ready"]
            assert health[2]["database"]["error"].startswith("database unreachable")
            assert api(daemon, "/api/incidents")[0] == 503
            proxy.up()
            registered = jobs_on(url, "video_path")
            wait_for(lambda: {str(p) for p in archives(daemon)} <= registered(), 60,
                     "the catch-up scan to register what was filed meanwhile")
            wait_for(lambda: completed(url) >= 1, 60, "a job completed")
            before_cut = len(archives(daemon))
            proxy.cut()
            time.sleep(CUT_SECONDS / 2)
            status, headers, body = api(daemon, "/api/jobs")
            assert status == 503 and int(headers["Retry-After"]) >= 1, body
            time.sleep(CUT_SECONDS / 2)
            assert len(archives(daemon)) >= before_cut + 2  # recording went on
            proxy.up()
            done_before = completed(url)
            wait_for(lambda: {str(p) for p in archives(daemon)} <= registered(), 90,
                     "every archive filed during the cut to get its job")
            wait_for(lambda: completed(url) > done_before, 90, "analysis to resume")
        assert daemon.child_pid("streamer") == streamer
        assert watch.not_ok() == [] and watch.seconds_lost() == 0, watch.samples
        assert exits(daemon) == []
        assert failed(url) == 0
        assert daemon.stop() == 0
    finally:
        proxy.close()
    waits = [e for e in daemon.log_events() if e["event"].startswith("database unreachable")]
    backs = [e for e in daemon.log_events() if e["event"] == "database reachable again"]
    assert waits and backs
    assert "Traceback" not in daemon.log_text()


def jobs_on(url: str, column: str):
    from vlmguard.store.bundle import Store

    def read() -> set[str]:
        try:
            with Store(url, create=False) as store:
                return {str(getattr(j, column)) for j in store.reports.list_jobs(limit=10_000)}
        except Exception:
            return set()
    return read


def completed(url: str) -> int:
    return count(url, ("completed",))


def failed(url: str) -> int:
    return count(url, ("failed",))


def count(url: str, states) -> int:
    from vlmguard.store.bundle import Store

    try:
        with Store(url, create=False) as store:
            return store.reports.count_jobs(states=states)
    except Exception:
        return -1


def sqlite_registered(daemon) -> set[str]:
    return {path for (path,) in db_rows(daemon, "SELECT video_path FROM analysis_jobs")}


def test_sqlite_locked_bad_rows_and_a_role_in_a_crash_loop(vlmguard, tmp_path):
    """On SQLite: another program holds the write lock longer than the busy timeout (a
    backup or an operator's sqlite3 shell left in a transaction: what locks a SQLite file
    on an edge box); unreadable rows appear (invalid JSON, a garbage time); an analyzer
    crash-loops. The video runs on through all of it."""
    from alert_receiver import Receiver

    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.5)
    messages: list[str] = []
    done = threading.Event()

    def receive():
        while not done.is_set():
            try:
                messages.append(listener.recv(4096).decode())
            except socket.timeout:
                continue
    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    with Receiver() as receiver:
        daemon = vlmguard(workers=1, env={"NOTIFY_SOCKET": str(notify)},
                          daemon="max_restarts = 2\nrestart_window_seconds = 60\n"
                                 "max_backoff_seconds = 8",
                          extra=f'[[alerts.rules]]\nname = "ops"\nmin_severity = "critical"\n'
                                f'webhooks = ["{receiver.url}/hook"]\n')
        daemon.wait_live()
        streamer = daemon.child_pid("streamer")
        with LiveWatch(daemon.url(), daemon.proc.pid) as watch:
            wait_for(lambda: db_rows(daemon, "SELECT count(*) FROM incidents")[0][0] >= 1, 60,
                     "an incident")
            # 1. Rows that cannot be read.
            conn = sqlite3.connect(daemon.data_dir / "vlmguard.db", timeout=60)
            conn.execute("INSERT INTO analysis_jobs (camera_id, video_path, segment_start, "
                         "segment_end, status, created_at, run_after, retry_count, max_retries, "
                         "kind, priority, windows, sources) VALUES ('cam1', '/nowhere.ts', "
                         "'2020-01-01 00:00:00', '2020-01-01 00:10:00', 'pending', "
                         "'2020-01-01 00:00:00', '2020-01-01 00:00:00', 0, 3, 'catchup', 1, 1, "
                         "'{not json')")
            conn.execute("UPDATE incidents SET start_at = 'garbage' WHERE id = "
                         "(SELECT min(id) FROM incidents)")
            conn.commit()
            conn.close()
            wait_for(lambda: api(daemon, "/api/incidents?limit=500")[0] == 200, 30,
                     "the incident list despite the bad rows")
            assert api(daemon, "/api/jobs?limit=500")[0] == 200
            events = read_events(daemon, until="incident", timeout=40)
            assert "event: incident" in events  # the live-update stream goes on for everyone
            report = status_json(daemon)
            assert report["database"]["quarantined"]["total"] == 2
            assert any("quarantined" in p for p in report["problems"])
            # 2. The write lock held past the busy timeout.
            holder = sqlite3.connect(daemon.data_dir / "vlmguard.db", isolation_level=None,
                                     timeout=60)
            holder.execute("BEGIN IMMEDIATE")
            during = len(archives(daemon))
            time.sleep(LOCK_SECONDS)
            holder.execute("ROLLBACK")
            holder.close()
            wait_for(lambda: len(archives(daemon)) >= during + 3
                     and {str(p) for p in archives(daemon)} <= sqlite_registered(daemon), 90,
                     "the archives filed under the lock to be registered")
            # 3. An analyzer that keeps dying: backed off alone.
            killed = kill_repeatedly(daemon, "analyzer-0", times=3)
            wait_for(lambda: "analyzer-0" in api(daemon, "/api/health")[2]["backed_off"], 30,
                     "analyzer-0 backed off")
            metrics = get(f"http://127.0.0.1:{daemon.port}/metrics")[2].decode()
            assert 'vlmguard_child_backed_off{child="analyzer-0"} 1' in metrics
            assert 'vlmguard_child_backed_off{child="archiver"} 0' in metrics
            wait_for(lambda: any("backed off (crash loop): analyzer-0" in m for m in messages),
                     20, "the STATUS line")
            receiver.wait_for(lambda: [r for r in receiver.delivered("/hook")
                                       if r.json.get("event") == "role_backed_off"], 60)
            wait_for(lambda: (pid := daemon.child_pid("analyzer-0")) not in killed and pid, 60,
                     "analyzer-0 tried again")
            archived = len(archives(daemon))
            wait_for(lambda: len(archives(daemon)) > archived, 30, "recording going on")
        assert daemon.child_pid("streamer") == streamer
        assert watch.not_ok() == [] and watch.seconds_lost() == 0, watch.samples
        assert {e["child"] for e in exits(daemon)} == {"analyzer-0"}
        assert db_rows(daemon, "SELECT count(*) FROM analysis_jobs WHERE status = 'failed'") == [(0,)]
        assert daemon.stop() == 0
    done.set()
    reader.join()
    listener.close()
    alert = [r for r in receiver.delivered("/hook") if r.json.get("event") == "role_backed_off"][0]
    assert alert.json["role"] == "analyzer-0" and alert.json["type"] == "system"
    quarantined = [e for e in daemon.log_events()
                   if e["event"].startswith("unreadable row quarantined")]
    assert len(quarantined) == 2  # logged once each
    assert "Traceback" not in daemon.log_text()


def read_events(daemon, until: str, timeout: float) -> str:
    """The event stream's text until an event of this kind arrives."""
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.port}/api/events")
    text = ""
    deadline = time.time() + timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:
        while time.time() < deadline and f"event: {until}" not in text:
            line = response.readline().decode()
            if not line:
                break
            text += line
    return text


def kill_repeatedly(daemon, name: str, times: int) -> set[int]:
    """SIGKILL the child each time it comes back (while it is idle, so that no job is
    charged for it), as a role that crashes at every start."""
    killed: set[int] = set()
    while len(killed) < times:
        pid = wait_for(lambda: (p := daemon.child_pid(name)) not in killed and p, 60,
                       f"{name} restarted")
        state = json.loads((run_dir(daemon.data_dir) / f"{name}.json").read_text())["state"]
        if state.startswith("job"):
            time.sleep(0.2)
            continue
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    return killed
