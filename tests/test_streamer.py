"""The streaming process with real FFmpeg, read by real players."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

import browser
from daemon import Daemon, free_port


def ffprobe_duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                          "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    return float(json.loads(out.stdout)["format"]["duration"])


def decoded_frames(path_or_url: str, seconds: float | None = None) -> int:
    args = ["ffmpeg", "-v", "error", "-nostdin", "-i", path_or_url]
    if seconds:
        args += ["-t", str(seconds)]
    out = subprocess.run(args + ["-f", "null", "-progress", "pipe:1", "-"], capture_output=True,
                         text=True, timeout=120)
    frames = re.findall(r"^frame=(\d+)$", out.stdout, re.M)
    return int(frames[-1]) if frames else 0


def job_rows(daemon: Daemon) -> list[tuple]:
    conn = sqlite3.connect(daemon.data_dir / "vlmguard.db")
    rows = conn.execute("SELECT video_path, segment_start, segment_end, status "
                        "FROM analysis_jobs ORDER BY segment_start").fetchall()
    conn.close()
    return rows


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    running = Daemon(tmp_path_factory.mktemp("streamer")).start()
    running.wait_live()
    yield running
    running.stop()


def test_ffmpeg_client_decodes_ten_seconds(daemon):
    frames = decoded_frames(daemon.url, seconds=10)
    assert frames >= 240  # 10 s at 25 fps, give or take the last frame


def test_gstreamer_playbin3_plays(daemon):
    # A live stream never ends by itself: stop gst-launch after 12 s (timeout's exit 124).
    proc = subprocess.run(
        ["timeout", "-k", "3", "12", "gst-launch-1.0", "-v", "playbin3", f"uri={daemon.url}",
         "video-sink=fakesink silent=false sync=true", "audio-sink=fakesink"],
        capture_output=True, text=True)
    assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ERROR" not in proc.stdout + proc.stderr
    buffers = proc.stdout.count("last-message = chain")  # one line per decoded frame
    assert buffers >= 100, proc.stdout[-2000:]


def test_archives_are_full_length_with_one_job_each(daemon):
    archives = daemon.data_dir / "archives" / "cam1"
    wait_for(lambda: len(list(archives.glob("*.ts"))) >= 3, 60, "three archives")
    files = sorted(archives.glob("*.ts"))
    # The first one starts whenever the daemon did; the next are whole clock-aligned files.
    for path in files[1:3]:
        assert abs(ffprobe_duration(path) - 10) <= 1.0, path
        assert re.fullmatch(r"\d{8}T\d{5}0Z\.ts", path.name)
    rows = wait_for(lambda: len(job_rows(daemon)) >= len(files) and job_rows(daemon), 10, "jobs")
    assert [Path(r[0]).name for r in rows][:len(files)] == [f.name for f in files]
    assert {r[3] for r in rows} == {"pending"}


def test_playlist_has_start_and_program_date_time(daemon):
    import urllib.request
    text = urllib.request.urlopen(daemon.url, timeout=5).read().decode()
    assert "#EXT-X-START:TIME-OFFSET=-3" in text
    assert "#EXT-X-PROGRAM-DATE-TIME:" in text
    assert "#EXT-X-TARGETDURATION:1" in text


def test_ffmpeg_killed_mid_archive_is_restarted_and_partial_archive_registered(tmp_path):
    daemon = Daemon(tmp_path, archive_seconds=60).start()
    try:
        daemon.wait_live()
        time.sleep(4)
        [pid] = wait_for(daemon.ffmpeg_pids, 10, "ffmpeg")
        os.kill(pid, signal.SIGKILL)
        archives = daemon.data_dir / "archives" / "cam1"
        [cut] = wait_for(lambda: list(archives.glob("*.ts")), 30, "the cut archive")
        assert ffprobe_duration(cut) >= 3
        assert decoded_frames(str(cut)) >= 75
        wait_for(lambda: [p for p in daemon.ffmpeg_pids() if p != pid], 30, "a new ffmpeg")
        daemon.wait_live()
        rows = wait_for(lambda: job_rows(daemon), 10, "the cut archive's job")
        assert Path(rows[0][0]) == cut
    finally:
        daemon.stop()


def test_ffmpeg_dies_with_a_sigkilled_streamer(tmp_path):
    daemon = Daemon(tmp_path).start()
    try:
        daemon.wait_live()
        pids = wait_for(daemon.ffmpeg_pids, 10, "ffmpeg")
        os.kill(daemon.streamer.pid, signal.SIGKILL)
        daemon.streamer.join()
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                                 open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in pids),
                 10, "ffmpeg to exit")
        # The next streamer hands over what the dead one left in partial/.
        daemon.start_streamer()
        daemon.wait_live()
        archives = daemon.data_dir / "archives" / "cam1"
        assert wait_for(lambda: list(archives.glob("*.ts")), 30, "the orphaned archive")
    finally:
        daemon.stop()


def test_orderly_stop_closes_and_registers_open_archive(tmp_path):
    daemon = Daemon(tmp_path, archive_seconds=60).start()
    daemon.wait_live()
    time.sleep(3)
    daemon.stop()
    assert daemon.streamer.exitcode == 0 and daemon.archiver.exitcode == 0
    assert not daemon.ffmpeg_pids()
    [archive] = list((daemon.data_dir / "archives" / "cam1").glob("*.ts"))
    assert ffprobe_duration(archive) >= 2
    assert [Path(r[0]) for r in job_rows(daemon)] == [archive]
    assert not list((daemon.data_dir / "partial" / "cam1").iterdir())


def test_hlsjs_in_chromium_plays_near_live_edge(daemon, tmp_path):
    reports = browser.play_with_hlsjs(daemon.url, tmp_path / "profile", samples=6)
    events = [r["event"] for r in reports]
    assert events == ["playing", "latency"], reports
    latency = reports[-1]
    assert latency["frames"] > 100
    # hls.js honours EXT-X-START (3 target durations back); well inside the playlist window.
    assert max(latency["latencies"]) < 6 * daemon.config.storage.segment_seconds + 2


def start_rtsp_camera(port: int) -> subprocess.Popen:
    camera = subprocess.Popen(["/usr/bin/python3", str(Path(__file__).parent / "rtsp_camera.py"),
                               str(port)], stdout=subprocess.PIPE, text=True)
    assert camera.stdout.readline().strip() == "ready"
    return camera


def http_status(url: str) -> int:
    import urllib.error
    import urllib.request
    try:
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_rtsp_camera_outage_resumes_without_restart_and_keeps_partial_archive(tmp_path):
    port = free_port()
    camera = start_rtsp_camera(port)
    daemon = Daemon(tmp_path, camera_url=f"rtsp://127.0.0.1:{port}/cam", archive_seconds=60).start()
    try:
        daemon.wait_live(timeout=40)
        assert decoded_frames(daemon.url, seconds=3) >= 50
        camera.kill()
        camera.wait()
        down_at = time.time()
        wait_for(lambda: http_status(daemon.url) == 503, 20, "the camera to show offline")
        archives = daemon.data_dir / "archives" / "cam1"
        # The 60-s archives are clock-aligned: a run that crosses a minute boundary has closed
        # one full archive before the outage, so the cut one is the newest.
        cut = max(wait_for(lambda: list(archives.glob("*.ts")), 30, "the partial archive"))
        assert ffprobe_duration(cut) >= 3 and decoded_frames(str(cut)) >= 50
        wait_for(lambda: cut in [Path(r[0]) for r in job_rows(daemon)], 10, "its job")
        time.sleep(max(0.0, 20 - (time.time() - down_at)))
        camera = start_rtsp_camera(port)
        daemon.wait_live(timeout=60)
        assert decoded_frames(daemon.url, seconds=3) >= 50
        assert daemon.streamer.is_alive()
        # Copied, not re-encoded: the camera's own H.264 comes through.
        assert "Constrained Baseline" in subprocess.run(
            ["ffprobe", "-hide_banner", str(cut)], capture_output=True, text=True).stderr
    finally:
        daemon.stop()
        camera.kill()
