"""Near-live analysis end to end: `vlmguard run` with a camera that burns solid red frames
in at known wall-clock times, and the Gemini stand-in that really looks at the frames it
is sent (it reports an incident for each run of red frames, offsets from their
timestamps). Window logic without FFmpeg is in test_archiver.py."""

from __future__ import annotations

import math
import signal
import time
from datetime import datetime, timezone

import pytest

from vlmguard.health import run_dir
from vlmguard.store.bundle import Store

from helpers import wait_for

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

PERIOD = 30
# Red, in seconds of each 30-s period: 13-16 inside a window, 28-32 across the window
# edge at 30 (0 of the next period).
INSIDE = (13, 16)
ACROSS = (28, 32)
RED = ("gte(mod(time(0),30),28)+lt(mod(time(0),30),2)+between(mod(time(0),30),13,15.999)")
CAMERA = f"""[[cameras]]
id = "cam1"
url = "lavfi:testsrc2=size=320x240:rate=10,drawbox=x=0:y=0:w=iw:h=ih:color=red:t=fill:enable='{RED}'"
"""
FPS = 1.0  # frames the model sees a second: one frame interval is 1 s
WINDOW = 10


def events_between(start: float, end: float, at: tuple[int, int]) -> list[float]:
    """The wall-clock starts (epoch) of the events at `at` of each period within [start, end]."""
    first = math.floor(start / PERIOD) * PERIOD
    return [t for t in (first + n * PERIOD + at[0] for n in range(int((end - first) / PERIOD) + 2))
            if start <= t and t + (at[1] - at[0]) <= end]


def incidents(store) -> list[dict]:
    return sorted(store.incidents.find_incidents(limit=1000), key=lambda i: i["start_at"])


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def test_events_become_incidents_near_live_and_one_across_a_window_edge(vlmguard, gemini):
    gemini.looks = True
    daemon = vlmguard(cameras=CAMERA, workers=1, window_seconds=WINDOW, analysis=f"fps = {FPS}")
    daemon.wait_live()
    live_since = time.time()
    store = Store(f"sqlite:///{daemon.data_dir / 'vlmguard.db'}")
    try:
        # The first whole event inside a window and the first across a window edge.
        inside = events_between(live_since + 2, live_since + 3 * PERIOD, INSIDE)[0]
        across = events_between(live_since + 2, live_since + 3 * PERIOD, ACROSS)[0]

        last_window = at(max(inside, across + 4) // WINDOW * WINDOW)

        def analysed():
            return any(j.segment_start == last_window and j.status == "completed"
                       for j in store.reports.list_jobs(limit=1000))
        wait_for(analysed, max(inside, across) + 5 + WINDOW + 40 - time.time(),
                 "the windows of both events analysed", daemon)
        found = incidents(store)
        tolerance = 1 / FPS + 1.0  # one frame interval plus a second
        [whole] = [i for i in found if abs((i["start_at"] - at(inside)).total_seconds()) < 5]
        assert abs((whole["start_at"] - at(inside)).total_seconds()) <= tolerance, whole
        assert abs((whole["end_at"] - at(inside + 2.9)).total_seconds()) <= tolerance, whole
        edge = [i for i in found if abs((i["start_at"] - at(across)).total_seconds()) < 5
                or abs((i["end_at"] - at(across + 3.9)).total_seconds()) < 5]
        assert len(edge) == 1, found  # one incident, not one per window
        [edge] = edge
        assert abs((edge["start_at"] - at(across)).total_seconds()) <= tolerance, edge
        assert abs((edge["end_at"] - at(across + 3.9)).total_seconds()) <= tolerance, edge
        # Two windows saw it: the incident was extended by the second, its id kept.
        jobs = {j.id: j for j in store.reports.list_jobs(limit=1000)}
        assert jobs[edge["job_id"]].segment_end == at(across - ACROSS[0] + PERIOD)
        # Every window is one job of the window's length, with its archive and offset.
        windows = [j for j in jobs.values() if j.kind == "window"]
        assert windows and all(j.duration_seconds == WINDOW for j in windows)
        assert all(j.segment_start.timestamp() % WINDOW == 0 for j in windows)
        done = [j for j in windows if j.status == "completed"]
        assert done and all(j.sources and j.sources[0]["path"].endswith(".ts") for j in done)
        # A window's clip starts at its first segment (1 s long here); the first window of
        # the run starts when the camera did.
        later = sorted(done, key=lambda j: j.segment_start)[1:]
        assert later and all(0 <= (j.first_frame_at - j.segment_start).total_seconds() < 1.5
                             for j in later)
        # The model was told where the window sits in the stream.
        prompts = [p["text"] for r in gemini.generate_requests
                   for p in r["contents"][0]["parts"] if "text" in p]
        assert any("window of a continuous recording" in p for p in prompts)
    finally:
        store.close()
        assert daemon.stop() == 0


def analyzer_state(daemon) -> str:
    import json
    try:
        return json.loads((run_dir(daemon.data_dir) / "analyzer-0.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return ""


def test_stop_and_killed_analyzer_windows_are_analysed_once(vlmguard, gemini):
    """A SIGKILLed analyzer's window goes back when its lease ends; an orderly stop
    registers the window in progress, analysed after the next start; nothing twice."""
    import os
    daemon = vlmguard(workers=1, window_seconds=WINDOW)
    daemon.wait_live()
    store = Store(f"sqlite:///{daemon.data_dir / 'vlmguard.db'}")
    try:
        gemini.generate_delay = 30
        wait_for(lambda: analyzer_state(daemon).startswith("job"), 60, "a window in analysis",
                 daemon)
        killed_job = int(analyzer_state(daemon)[4:])
        os.kill(daemon.child_pid("analyzer-0"), signal.SIGKILL)
        gemini.generate_delay = 0
        wait_for(lambda: store.reports.get(killed_job).status == "completed", 60,
                 "the killed analyzer's window analysed again", daemon)
        # Stop in the middle of a window: it is registered on the way out.
        wait_for(lambda: 3 < time.time() % WINDOW < 7, 15, "mid-window", daemon)
        stopped_in = at(time.time() // WINDOW * WINDOW)
        assert daemon.stop() == 0
        assert any(j.segment_start == stopped_in for j in store.reports.list_jobs(limit=1000))
        daemon.start()
        daemon.wait_live()
        wait_for(lambda: store.reports.get(next(j.id for j in store.reports.list_jobs(limit=1000)
                                                        if j.segment_start == stopped_in)).status == "completed",
                 60, "the stop's window analysed after the restart", daemon)
        jobs = store.reports.list_jobs(limit=1000)
        starts = [j.segment_start for j in jobs]
        assert len(starts) == len(set(starts))
        killed = store.reports.get(killed_job)
        assert killed.retry_count == 1 and killed.status == "completed"
        # One set of incidents per analysed window (the stand-in reports one each).
        for job in jobs:
            if job.status == "completed":
                assert len(store.incidents.list_incidents(job.id)) == job.incident_count
    finally:
        store.close()
        daemon.stop()


def test_footage_recorded_while_analysis_was_down_is_caught_up(vlmguard, gemini, tmp_path):
    """Archives on disk that no job covers (fabricated: 15 minutes ago, while analysis was
    down) become archive-sized catch-up jobs at start, and are analysed."""
    import subprocess
    from vlmguard.layout import ARCHIVE_TIME
    archives = tmp_path / "data" / "archives" / "cam1"
    archives.mkdir(parents=True)
    now = time.time() // 10 * 10
    made = []
    for minutes in (15, 10, 5):
        path = archives / f"{at(now - 60 * minutes).strftime(ARCHIVE_TIME)}.ts"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=160x120:rate=10", "-t", "10", "-c:v", "libx264",
                        "-preset", "ultrafast", "-g", "10", "-f", "mpegts", str(path)],
                       check=True, timeout=60)
        made.append(path)
    daemon = vlmguard(workers=1, window_seconds=WINDOW)
    store = Store(f"sqlite:///{daemon.data_dir / 'vlmguard.db'}")
    try:
        def caught_up():
            jobs = [j for j in store.reports.list_jobs(limit=1000) if j.kind == "catchup"]
            return len(jobs) == 3 and all(j.status == "completed" for j in jobs) and jobs
        jobs = sorted(wait_for(caught_up, 90, "three catch-up jobs analysed", daemon),
                      key=lambda j: j.segment_start)
        assert [j.video_path for j in jobs] == [str(p) for p in made]
        assert all(9 <= j.duration_seconds <= 11 and j.priority == 1 for j in jobs)
        assert all(j.incident_count == 1 for j in jobs)
    finally:
        store.close()
        daemon.stop()


def test_a_lagging_camera_has_its_windows_merged_and_says_so(vlmguard):
    """No analyzer (workers = 0): the lag grows past max_lag_seconds, the waiting windows
    are merged (logged, counted), and health names the lag."""
    import json
    import urllib.error
    import urllib.request
    daemon = vlmguard(workers=0, window_seconds=WINDOW, analysis="max_lag_seconds = 30")
    daemon.wait_live()

    def health():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/api/health") as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
    body = wait_for(lambda: (b := health()) and any("analysis lags" in p for p in b["problems"])
                    and b, 90, "the lag in health", daemon)
    assert body["analysis_lag_s"]["cam1"] > 30
    wait_for(lambda: any(e["event"] == "analysis lagging: windows merged into one job"
                         for e in daemon.log_events()), 30, "a merge", daemon)
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics") as response:
        metrics = response.read().decode()
    merged = [line for line in metrics.splitlines()
              if line.startswith('vlmguard_analysis_windows_merged_total{camera="cam1"}')]
    assert merged and float(merged[0].split()[-1]) >= 1
    store = Store(f"sqlite:///{daemon.data_dir / 'vlmguard.db'}")
    try:
        jobs = sorted(store.reports.list_jobs(limit=1000), key=lambda j: j.segment_start)
        # No footage skipped: the jobs still cover back to back what was recorded.
        assert any(j.kind == "merged" and j.windows >= 2 for j in jobs)
        assert all(a.segment_end <= b.segment_start for a, b in zip(jobs, jobs[1:]))
    finally:
        store.close()
        assert daemon.stop() == 0
