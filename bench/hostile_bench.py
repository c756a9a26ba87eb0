"""Hardening benchmark (issue 12): recovery from a full archive disk, and the live URL
across FFmpeg restarts.

Run by hand as root (mounts a tmpfs; needs ffmpeg, gst-launch-1.0, chromium and
tests/web/node_modules, which tests/run.sh installs):
    .venv/bin/python bench/hostile_bench.py diskfull [--full-seconds 20]
    .venv/bin/python bench/hostile_bench.py restarts [--restarts 20] [--seconds 300]

diskfull: `vlmguard run` with a lavfi camera (1-s segments, 10-s archives) whose partial/
and closed/ dirs are on a 24 MB tmpfs. The tmpfs is filled for --full-seconds, then the
filler is deleted. Reported: seconds from the delete to the first byte of the next archive
and to its registration, and the footage lost: the gap between the end of the last archive
written before the disk filled and the start of the next one, next to the time the disk
was full.

restarts: `vlmguard run` with the GStreamer RTSP test camera. The camera's FFmpeg is
SIGKILLed --restarts times, evenly over --seconds, while a poller reads the playlist 5
times a second (share of 503s, media sequence always growing) and ffmpeg, GStreamer
playbin3 and hls.js (headless Chromium) play it. A player "plays through" if it is still
running at the end and decoded video in the last 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import browser  # noqa: E402
from daemon import RunningVlmguard, free_port  # noqa: E402
from vlmguard.health import run_dir  # noqa: E402
from test_hostile_streaming import ffmpeg_pids, fill, small_disk  # noqa: E402
from test_streamer import ffprobe_duration, start_rtsp_camera, wait_for  # noqa: E402


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError as exc:
        return 0, str(exc)


def archive_time(path: Path) -> float:
    stamp = datetime.strptime(path.name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def diskfull(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        disk = small_disk(tmp / "disk")
        if disk is None:
            sys.exit("cannot mount a tmpfs (run as root)")
        running = RunningVlmguard(tmp, "http://127.0.0.1:9", workers=0)
        try:
            running.data_dir.mkdir()
            for name in ("partial", "closed"):
                (disk / name).mkdir()
                (running.data_dir / name).symlink_to(disk / name)
            running.start()
            running.wait_live()
            partial = running.data_dir / "partial" / "cam1"
            archives = running.data_dir / "archives" / "cam1"
            time.sleep(12)  # one whole archive first
            filled = time.time()
            filler = fill(disk)
            time.sleep(args.full_seconds)
            filler.unlink()
            cleared = time.time()
            [fresh] = wait_for(lambda: [p for p in partial.glob("*.ts")
                                        if archive_time(p) >= int(filled) and p.stat().st_size > 0
                                        and p.stat().st_mtime > cleared], 60, "the next archive")
            first_byte = time.time() - cleared
            fresh_start = archive_time(fresh)
            mp4 = archives / f"{fresh.stem}.mp4"
            wait_for(lambda: mp4.exists(), 60, "the next archive registered")
            registered = time.time() - cleared
            before = [p for p in archives.glob("*.mp4") if archive_time(p) < fresh_start]
            cut = max(before, key=archive_time)
            written_until = archive_time(cut) + ffprobe_duration(cut)
            print(json.dumps({
                "disk_full_s": round(cleared - filled, 1),
                "cleared_to_next_archive_first_byte_s": round(first_byte, 1),
                "cleared_to_next_archive_registered_s": round(registered, 1),
                "footage_lost_s": round(fresh_start - written_until, 1),
                "last_footage_before_full_s": round(written_until - filled, 1),
                "next_archive_starts_after_clear_s": round(fresh_start - cleared, 1),
            }, indent=1))
        finally:
            running.stop()
            subprocess.run(["umount", "-l", str(disk)], check=False)


class Poller(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.sequences: list[int] = []
        self.discontinuities = 0

    def run(self) -> None:
        while not self.stop.is_set():
            status, text = get(self.url)
            self.statuses.append(status)
            found = re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text)
            if found:
                self.sequences.append(int(found.group(1)))
            self.discontinuities = max(self.discontinuities, text.count("#EXT-X-DISCONTINUITY\n"))
            time.sleep(0.2)


class ProgressPlayer(threading.Thread):
    """A player process; `last_progress` is when it last printed a line of progress."""

    def __init__(self, command: list[str], progress: str):
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.progress = progress
        self.started = time.time()
        self.seconds: set[int] = set()  # seconds since start with progress in them
        self.tail: list[str] = []

    def run(self) -> None:
        for line in self.proc.stdout:
            if self.progress in line:
                self.seconds.add(int(time.time() - self.started))
            else:
                self.tail = (self.tail + [line.strip()])[-5:]

    def verdict(self) -> dict:
        alive = self.proc.poll() is None
        now = int(time.time() - self.started)
        self.proc.kill()
        self.proc.wait()
        return {"running_at_end": alive,
                "decoding_in_last_10s": any(s >= now - 10 for s in self.seconds),
                "first_decode_s": min(self.seconds, default=None),
                "last_decode_s": max(self.seconds, default=None), "ran_s": now,
                "seconds_with_frames": len(self.seconds),
                "last_output": self.tail if not alive else []}


def restarts(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        camera = start_rtsp_camera(port)
        cameras = f'[[cameras]]\nid = "cam1"\nurl = "rtsp://127.0.0.1:{port}/cam"\n'
        running = RunningVlmguard(Path(tmp), "http://127.0.0.1:9", workers=0, cameras=cameras)
        running.start()
        try:
            running.wait_live()
            time.sleep(3)  # hlsdemux2 sometimes loses sync on a playlist only seconds old
            url = running.url()
            poller = Poller(url)
            poller.start()
            ffmpeg = ProgressPlayer(["ffmpeg", "-v", "error", "-nostdin", "-i", url, "-f", "null",
                                     "-progress", "pipe:1", "-stats_period", "1", "-"], "frame=")
            gst = ProgressPlayer(["gst-launch-1.0", "-v", "playbin3", f"uri={url}",
                                  "video-sink=fakesink silent=false sync=true",
                                  "audio-sink=fakesink"], "last-message = chain")
            for player in (ffmpeg, gst):
                player.start()
            hlsjs: list = []
            watcher = threading.Thread(target=lambda: hlsjs.extend(browser.play_with_hlsjs(
                url, Path(tmp) / "chromium", watch=args.seconds + 5, timeout=60)), daemon=True)
            watcher.start()
            time.sleep(5)
            interval = args.seconds / args.restarts
            killed = 0
            for _ in range(args.restarts):
                time.sleep(interval)
                pids = ffmpeg_pids(running.data_dir, "cam1")
                if pids:
                    os_kill(pids[0])
                    killed += 1
            time.sleep(5)
            poller.stop.set()
            poller.join()
            results = {"ffmpeg": ffmpeg.verdict(), "gstreamer_playbin3": gst.verdict()}
            watcher.join(30)
            hlsjs_end = hlsjs[-1] if hlsjs else {"event": "no report"}
            results["hls.js"] = {"last_report": hlsjs_end.get("event"),
                                 "stalls": hlsjs_end.get("stalls"),
                                 "frames": hlsjs_end.get("frames"),
                                 "details": hlsjs_end.get("details")}
            statuses = poller.statuses
            print(json.dumps({
                "restarts": killed, "seconds": args.seconds,
                "playlist_requests": len(statuses),
                "share_503": round(statuses.count(503) / max(len(statuses), 1), 4),
                "non_200": sorted(set(s for s in statuses if s != 200)),
                "media_sequence_only_grows": poller.sequences == sorted(poller.sequences),
                "discontinuities_seen_in_one_playlist_max": poller.discontinuities,
                "ffmpeg_restarts_reported": json.loads(
                    (run_dir(running.data_dir) / "streamer.json").read_text())["cameras"]["cam1"]
                ["restarts"],
                "players": results,
            }, indent=1))
        finally:
            running.stop()
            camera.kill()
            camera.wait()


def os_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    full = sub.add_parser("diskfull")
    full.add_argument("--full-seconds", type=float, default=20)
    restart = sub.add_parser("restarts")
    restart.add_argument("--restarts", type=int, default=20)
    restart.add_argument("--seconds", type=float, default=300)
    args = parser.parse_args()
    {"diskfull": diskfull, "restarts": restarts}[args.what](args)


if __name__ == "__main__":
    main()
