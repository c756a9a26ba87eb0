"""Streaming benchmark: live latency per player, and CPU per copied 1080p camera.

Run by hand (needs ffmpeg, gst-launch-1.0, chromium and tests/web/node_modules, which
tests/run.sh installs):
    .venv/bin/python bench/stream_bench.py latency [--runs 3]
    .venv/bin/python bench/stream_bench.py cpu [--cameras 1 4] [--seconds 60]

latency: a lavfi camera encoded with a 1-s GOP and 1-s segments. Every player reads the
stream through a logging proxy; its distance behind capture when it starts is the time of
its first segment request minus that segment's EXT-X-PROGRAM-DATE-TIME (a 1x player keeps
that distance). hls.js also reports now - hls.playingDate while it plays, a second view.

cpu: a 1080p H.264 file at ~4 Mbit/s (made once by FFmpeg) looped in real time per camera,
copied (no re-encode) into HLS and archives; CPU time of FFmpeg, the streamer and the
archiver read from /proc over the window, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import browser  # noqa: E402
from daemon import Daemon, free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


class LoggingProxy:
    """Forwards to the HLS server, noting when each segment is first asked for, and PDTs."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.port = free_port()
        self.pdt: dict[str, float] = {}
        self.requests: list[tuple[float, str]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()
        self.ready.wait(10)

    def serve(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/{path:.*}", self.forward)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    async def forward(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        if path.endswith(".ts"):
            self.requests.append((time.time(), Path(path).name))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.upstream}/{path}") as upstream:
                body = await upstream.read()
                if path.endswith(".m3u8"):
                    self.note_pdt(body.decode())
                return web.Response(body=body, status=upstream.status,
                                    headers={"Content-Type": upstream.headers.get("Content-Type", ""),
                                             "Access-Control-Allow-Origin": "*"})

    def note_pdt(self, text: str) -> None:
        stamp = None
        for line in text.splitlines():
            if line.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
                stamp = datetime.strptime(line.split(":", 1)[1], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
            elif line and not line.startswith("#") and stamp:
                self.pdt[line] = stamp

    def start_latency(self, since: float) -> float | None:
        for at, name in self.requests:
            if at >= since and name in self.pdt:
                return at - self.pdt[name]
        return None


def run_ffmpeg(url: str, seconds: int) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-re", "-i", url, "-t", str(seconds),
                    "-f", "null", "-"], timeout=seconds + 30)


def run_gstreamer(url: str, seconds: int) -> None:
    subprocess.run(["timeout", "-k", "2", str(seconds), "gst-launch-1.0", "playbin3", f"uri={url}",
                    "video-sink=fakesink sync=true", "audio-sink=fakesink"], capture_output=True)


def latency(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Ordinary HLS (MPEG-TS segments): the proxy times segment requests. LL-HLS:
        # bench/llhls_bench.py.
        daemon = Daemon(Path(tmp), archive_seconds=600, extra="low_latency = false").start()
        try:
            daemon.wait_live()
            time.sleep(8)  # a full playlist window
            proxy = LoggingProxy(f"http://127.0.0.1:{daemon.port}")
            url = f"http://127.0.0.1:{proxy.port}/live/cam1/index.m3u8"
            results: dict[str, list[float]] = {"ffmpeg (libavformat 5.1)": [],
                                               "GStreamer playbin3 (1.22)": [],
                                               "hls.js 1.7.4 in Chromium": []}
            hlsjs_playing: list[float] = []
            for _ in range(args.runs):
                for name in results:
                    since = time.time()
                    if name.startswith("ffmpeg"):
                        run_ffmpeg(url, 8)
                    elif name.startswith("GStreamer"):
                        run_gstreamer(url, 8)
                    else:
                        reports = browser.play_with_hlsjs(url, Path(tmp) / f"p{since}", samples=5)
                        hlsjs_playing += reports[-1].get("latencies", [])
                    value = proxy.start_latency(since)
                    if value is not None:
                        results[name].append(value)
                    time.sleep(1)
        finally:
            daemon.stop()
    print("| player | start latency behind capture, median s | runs |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} | {len(values)} |")
    if hlsjs_playing:
        print(f"\nhls.js now - playingDate while playing: median {statistics.median(hlsjs_playing):.2f} s "
              f"({len(hlsjs_playing)} samples)")


def make_1080p(path: Path, seconds: int = 60) -> None:
    if path.exists():
        return
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                    f"testsrc2=size=1920x1080:rate=25,noise=alls=12:allf=t", "-t", str(seconds),
                    "-c:v", "libx264", "-preset", "veryfast", "-b:v", "4M", "-maxrate", "4M",
                    "-bufsize", "8M", "-g", "50", "-pix_fmt", "yuv420p", str(path)], check=True)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except FileNotFoundError:
            pass
    return total / TICKS


def cpu(args) -> None:
    source = Path(tempfile.gettempdir()) / "vlmguard-bench-1080p-4M.mp4"
    make_1080p(source)
    bitrate = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=bit_rate",
                              "-of", "csv=p=0", str(source)], capture_output=True, text=True).stdout
    print(f"source: 1920x1080 25 fps H.264, {int(bitrate) / 1e6:.1f} Mbit/s, looped in real time\n")
    print("| cameras | FFmpeg % of a core per camera | streamer + archiver % | total % of one core |")
    print("|---|---|---|---|")
    for count in args.cameras:
        with tempfile.TemporaryDirectory() as tmp:
            extra = "".join(f'\n[[cameras]]\nid = "cam{n}"\nurl = "file://{source}"\n'
                            for n in range(2, count + 1))
            daemon = Daemon(Path(tmp), camera_url=f"file://{source}", archive_seconds=600,
                            extra=extra).start()
            try:
                daemon.wait_live(timeout=60)
                time.sleep(10)
                ffmpegs = daemon.ffmpeg_pids()
                ours = [daemon.streamer.pid, daemon.archiver.pid]
                f0, o0, t0 = cpu_seconds(ffmpegs), cpu_seconds(ours), time.monotonic()
                time.sleep(args.seconds)
                f1, o1, t1 = cpu_seconds(ffmpegs), cpu_seconds(ours), time.monotonic()
            finally:
                daemon.stop()
        span = t1 - t0
        per_camera = (f1 - f0) / span / len(ffmpegs) * 100
        ours_pct = (o1 - o0) / span * 100
        print(f"| {count} | {per_camera:.2f} | {ours_pct:.2f} | {per_camera * count + ours_pct:.2f} |",
              flush=True)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--runs", type=int, default=3)
    cp = sub.add_parser("cpu")
    cp.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    cp.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    latency(args) if args.what == "latency" else cpu(args)


if __name__ == "__main__":
    main()
