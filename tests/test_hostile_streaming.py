"""Hostile and unlucky conditions on the streaming side, with real FFmpeg cameras (issue 12):
stray files under the data dir, camera credentials, FFmpeg restarts under a live player,
and a full archive disk."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vlmguard.health import run_dir
from vlmguard.layout import Layout

import browser
from clock import clock_graph
from daemon import Daemon, RunningVlmguard
from helpers import free_port, wait_for
from helpers.media import decoded_frames, ffprobe_duration, start_rtsp_camera

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

SECRET = "sekrit-pw"
TOKEN = "tok-12345"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ffmpeg_pids(data_dir: Path, camera: str) -> list[int]:
    # The archive output names the camera's partial/ folder (its live output may be a pipe).
    out = subprocess.run(["pgrep", "-f", f"ffmpeg.*{data_dir}/partial/{camera}/"],
                         capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def plant_stray_files(data_dir: Path) -> None:
    for camera in ("cam1",):
        (data_dir / "archives" / camera).mkdir(parents=True)
        (data_dir / "archives" / camera / "20261131T000000Z.mp4").write_bytes(b"\0" * 100)
        (Layout(data_dir).live(camera) / "a-directory").mkdir(parents=True)
        (data_dir / "partial" / camera / "20260101T000000Z.ts").mkdir(parents=True)
        (data_dir / "closed" / camera).mkdir(parents=True)
        (data_dir / "closed" / camera / "20261131T250000Z.ts").write_bytes(b"\0" * 100)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """vlmguard run with an RTSP camera behind credentials, a second camera whose path
    is wrong (so FFmpeg prints the URL in its errors), and stray files in the data dir."""
    directory = tmp_path_factory.mktemp("hostile")
    port = free_port()
    camera = start_rtsp_camera(port)
    base = f"rtsp://admin:{SECRET}@127.0.0.1:{port}"
    cameras = (f'[[cameras]]\nid = "cam1"\nurl = "{base}/cam?authtoken={TOKEN}"\n'
               f'[[cameras]]\nid = "cam2"\nurl = "{base}/nope?authtoken={TOKEN}"\n'
               'transcode = "never"\n')
    running = RunningVlmguard(directory, "http://127.0.0.1:9", workers=0, cameras=cameras)
    plant_stray_files(running.data_dir)
    running.start()
    try:
        running.wait_live()
        yield running
    finally:
        running.stop()
        camera.kill()
        camera.wait()


def events(running, text: str) -> list[dict]:
    return [e for e in running.log_events() if text in e.get("event", "")]


def test_stray_files_are_logged_once_and_skipped(hostile):
    streamer = hostile.child_pid("streamer")
    archives = hostile.data_dir / "archives" / "cam1"
    wait_for(lambda: [p for p in archives.glob("*.ts") if not p.name.startswith("2026113")],
             40, "a real archive next to the stray one")
    for path in ("/api/health", "/metrics", "/api/cameras"):
        status, body = get(f"http://127.0.0.1:{hostile.port}{path}")
        assert status in (200, 503) and body, (path, status, body[:300])
    assert hostile.child_pid("streamer") == streamer  # never restarted
    assert len(events(hostile, "unexpected entry in live dir")) == 1
    assert len(events(hostile, "unexpected entry in partial dir")) == 1
    stray = [e["file"] for e in events(hostile, "not an archive, left alone")]
    assert sorted(Path(f).name for f in stray) == ["20261131T000000Z.mp4", "20261131T250000Z.ts"]
    assert (Layout(hostile.data_dir).live("cam1") / "a-directory").is_dir()


def test_credentials_absent_from_logs_cmdline_and_environ(hostile):
    wait_for(lambda: [e for e in events(hostile, "ffmpeg says") if e.get("camera_id") == "cam2"],
             30, "cam2's FFmpeg to report its failure")
    text = hostile.log_text()
    assert SECRET not in text and TOKEN not in text
    assert "rtsp://admin:***@127.0.0.1" in text  # the URL was logged, masked
    pids = wait_for(lambda: ffmpeg_pids(hostile.data_dir, "cam1"), 20, "cam1's FFmpeg")
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert SECRET.encode() not in cmdline and TOKEN.encode() not in cmdline
        assert b"GEMINI_API_KEY" not in environ and b"test-key-123" not in environ
        assert b"TZ=UTC" in environ
    url_file = hostile.data_dir / "run" / "camera-cam1.ffconcat"
    assert url_file.stat().st_mode & 0o777 == 0o600


def poll_playlist(url: str, stop: threading.Event, seen: list) -> None:
    while not stop.is_set():
        status, body = get(url)
        seen.append((status, body.decode(errors="replace")))
        time.sleep(0.2)


def media_sequence(text: str) -> list[int]:
    first = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text).group(1))
    listed = [int(n) for n in re.findall(r"^seg-(\d+)\.(?:ts|m4s)", text, re.M)]
    assert listed == list(range(first, first + len(listed))), text
    return listed


def test_ffmpeg_restarts_keep_one_live_url(hostile):
    """Kill the camera's FFmpeg three times under a playing ffmpeg: the playlist never
    answers 503, its sequence only grows, and the player decodes through."""
    url = hostile.url("cam1")
    player = subprocess.Popen(["ffmpeg", "-v", "error", "-nostdin", "-i", url, "-f", "null",
                               "-progress", "pipe:1", "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    frames: list[int] = []
    reader = threading.Thread(target=lambda: [frames.append(int(line[6:])) for line in player.stdout
                                              if line.startswith("frame=")], daemon=True)
    reader.start()
    stop, seen = threading.Event(), []
    poller = threading.Thread(target=poll_playlist, args=(url, stop, seen), daemon=True)
    poller.start()
    live = Layout(hostile.data_dir).live("cam1")
    try:
        time.sleep(4)
        first_run = set(live.glob("seg-*"))
        for _ in range(3):
            [pid] = wait_for(lambda: ffmpeg_pids(hostile.data_dir, "cam1"), 20, "cam1's FFmpeg")
            os.kill(pid, signal.SIGKILL)
            time.sleep(6)
        frames_after_kills = frames[-1]
        time.sleep(5)
        assert player.poll() is None, player.stderr.read()[-2000:]
        assert frames[-1] > frames_after_kills + 50  # still decoding at 25 fps
    finally:
        stop.set()
        poller.join()
        player.kill()
        player.wait()
    assert {status for status, _ in seen} == {200}, [s for s, _ in seen]
    firsts = [media_sequence(text)[0] for _, text in seen]
    assert firsts == sorted(firsts)
    assert len({re.search(r"#EXT-X-TARGETDURATION:\d+", text).group() for _, text in seen}) == 1
    assert any("#EXT-X-DISCONTINUITY\n" in text for _, text in seen)
    assert any("#EXT-X-DISCONTINUITY-SEQUENCE:" in text for _, text in seen)
    # Nobody runs the first FFmpeg any more: the streamer deletes what it left behind.
    assert first_run
    wait_for(lambda: not any(path.exists() for path in first_run), 40,
             "the first run's segments to be deleted")


def fill(directory: Path) -> Path:
    """Write until the file system says ENOSPC; returns the filler file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: close has nothing to flush
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def small_disk(directory: Path) -> Path | None:
    """A real, small file system: a tmpfs mounted here (we run as root in CI)."""
    directory.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    return directory if proc.returncode == 0 else None


def camera_state(running: RunningVlmguard) -> dict:
    status, body = get(f"http://127.0.0.1:{running.port}/api/cameras")
    assert status == 200
    return json.loads(body)["cameras"][0]


def health_problems(running: RunningVlmguard) -> list[str]:
    return json.loads(get(f"http://127.0.0.1:{running.port}/api/health")[1])["problems"]


def test_full_archive_disk_stops_archiving_visibly_and_recovers(tmp_path):
    disk = small_disk(tmp_path / "disk")
    if disk is None:
        pytest.skip("cannot mount a tmpfs here (not root?): no real ENOSPC source")
    running = RunningVlmguard(tmp_path, "http://127.0.0.1:9", workers=0)
    try:
        # partial/ and closed/ on the small disk (one mount: the hand-over is a rename).
        running.data_dir.mkdir()
        for name in ("partial", "closed"):
            (disk / name).mkdir()
            (running.data_dir / name).symlink_to(disk / name)
        running.start()
        running.wait_live()
        partial = running.data_dir / "partial" / "cam1"
        wait_for(lambda: [p for p in partial.glob("*.ts") if p.stat().st_size > 0], 20,
                 "an archive being written")
        filler = fill(disk)
        state = wait_for(lambda: camera_state(running)["archiving"] != "ok" and
                         camera_state(running), 30, "archiving stopped to show")
        assert state["archiving"] == "archiving stopped: No space left on device"
        assert "camera cam1 archiving stopped: No space left on device" in health_problems(running)
        metrics = get(f"http://127.0.0.1:{running.port}/metrics")[1]
        assert re.search(rb'vlmguard_camera_archiving\{camera="cam1",reason="[^"]+"\} 0', metrics)
        assert get(running.url())[0] == 200  # live video carried on
        filler.unlink()
        cleared = time.time()
        wait_for(lambda: camera_state(running)["archiving"] == "ok", 30, "archiving again")
        assert not [p for p in health_problems(running) if "archiving" in p]
        wait_for(lambda: [p for p in partial.glob("*.ts")
                          if p.stat().st_mtime > cleared and p.stat().st_size > 0],
                 20, "a new archive being written")
        # The archive cut by the full disk is kept and plays.
        archives = running.data_dir / "archives" / "cam1"
        cut = wait_for(lambda: list(archives.glob("*.ts")), 30, "the cut archive")
        assert ffprobe_duration(cut[0]) >= 1
    finally:
        running.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)


# The wall clock burned into every frame (for hls.js's latency), under noise: about
# 5.7 Mbit/s, so FFmpeg's 1 MiB live pipe is full within two seconds of a stall.
NOISY_CLOCK_CAMERA = "lavfi:" + clock_graph().replace("realtime", "noise=alls=20:allf=t,realtime", 1)


def archive_bytes(data_dir: Path) -> int:
    """Bytes of cam1's archive files, wherever they are on their way to archives/."""
    total = 0
    for folder in ("partial", "closed", "archives"):
        for path in (data_dir / folder / "cam1").glob("*.ts"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass  # moved on between the listing and now
    return total


def archive_growth_while_stopped(daemon: Daemon, seconds: int) -> list[int]:
    """SIGSTOP the streaming process for seconds; the archive's bytes after each one."""
    sizes = []
    os.kill(daemon.streamer.pid, signal.SIGSTOP)
    try:
        for _ in range(seconds):
            time.sleep(1)
            sizes.append(archive_bytes(daemon.data_dir))
    finally:
        os.kill(daemon.streamer.pid, signal.SIGCONT)
    return sizes


def test_a_stopped_streaming_process_costs_live_video_never_the_archive(tmp_path):
    """SIGSTOP the streaming process (whose loop reads FFmpeg's live output) for 10 s
    under a playing hls.js: FFmpeg drops live frames rather than wait, the archive grows
    all along and ends whole, FFmpeg is not taken for stalled, hls.js (lowLatencyMode)
    comes back to the live edge and ffmpeg plays the URL again, past a discontinuity."""
    from playwright.sync_api import sync_playwright
    daemon = Daemon(tmp_path, camera_url=NOISY_CLOCK_CAMERA, archive_seconds=60).start()
    try:
        daemon.wait_live()
        live_at = time.time()
        [ffmpeg] = wait_for(daemon.ffmpeg_pids, 10, "ffmpeg")
        with browser.PageServer() as pages, sync_playwright() as playwright:
            chromium = playwright.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
            try:
                page = chromium.new_page()
                page.goto(f"http://127.0.0.1:{pages.port}/clock.html?low=1&rate=1.5"
                          f"&src={daemon.url}")
                page.wait_for_function("() => window.clock.codes > 50", timeout=60000,
                                       polling=500)
                sizes = archive_growth_while_stopped(daemon, 10)
                shown = page.evaluate("() => window.clock.codes")
                # Five seconds of frames since: the last of the backlog, then live again.
                page.wait_for_function(f"() => window.clock.codes > {shown + 125}",
                                       timeout=30000, polling=500)
                latest = page.evaluate("() => window.clock.samples.slice(-25)")
            finally:
                chromium.close()
        # The pipe and FFmpeg's fifo are full after two seconds at most: still growing in
        # the last five means FFmpeg never waited (it wrote nothing more with a blocking pipe).
        assert sizes[-1] - sizes[4] > 1_000_000, sizes
        assert max(latest) < 2.5, latest  # back at the live edge, not 10 s behind

        def past_the_hole() -> bool:
            status, body = get(daemon.url)
            return status == 200 and b"#EXT-X-DISCONTINUITY" in body

        wait_for(past_the_hole, 20, "the live playlist past the hole")

        def hole_scrolled_off() -> bool:  # a player starting now starts after it
            status, body = get(daemon.url)
            return status == 200 and b"#EXT-X-DISCONTINUITY-SEQUENCE:1" in body and \
                b"#EXT-X-DISCONTINUITY\n" not in body

        wait_for(hole_scrolled_off, 20, "the hole to leave the live playlist")
        assert decoded_frames(daemon.url, seconds=4) >= 90
        state = json.loads((run_dir(daemon.data_dir) / "streamer.json").read_text())
        assert "gaps in live video: 1 " in state["cameras"]["cam1"]["live"], state
        assert daemon.ffmpeg_pids() == [ffmpeg]  # not restarted as "stalled"
        time.sleep(2)
    finally:
        stopped_at = time.time()
        daemon.stop()
    archives = sorted((daemon.data_dir / "archives" / "cam1").glob("*.ts"))
    recorded = sum(ffprobe_duration(path) for path in archives)
    assert recorded >= stopped_at - live_at, (archives, recorded)
    frames = sum(decoded_frames(str(path)) for path in archives)
    assert frames >= 25 * (stopped_at - live_at), frames
