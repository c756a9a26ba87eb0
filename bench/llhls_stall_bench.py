"""A stalled streaming process against the archive: what recording loses while the
process that packages LL-HLS does not read FFmpeg's live output, and what the fifo that
prevents it costs the live video.

Run by hand (needs ffmpeg and ffprobe):
    .venv/bin/python bench/llhls_stall_bench.py stall [--seconds 10]
    .venv/bin/python bench/llhls_stall_bench.py delay [--seconds 20]
    .venv/bin/python bench/llhls_stall_bench.py player [--seconds 10]

stall: the streaming and archiver processes (tests/daemon.py) with one low-latency camera,
a 320x240 25-fps lavfi pattern with noise (about 5.7 Mbit/s, so FFmpeg's 1 MiB live pipe
holds under two seconds), encoded as the streamer encodes lavfi sources, 60-s archives.
Once live, the archive's growth rate is measured for 3 s, then the streaming process is
SIGSTOPped for --seconds and the archive's bytes read every second; then SIGCONT, and the
time until the live playlist lists a segment newer than before the stop (and whether
FFmpeg was restarted). Last, the daemon is stopped and the archive's seconds (ffprobe)
compared with the wall-clock seconds FFmpeg ran. It measures whichever vlmguard is
imported: run it twice at once, side by side, once with the old code first on the path
(cd /tmp && PYTHONPATH=/old/checkout python /new/checkout/bench/llhls_stall_bench.py stall).

delay: one FFmpeg whose tee writes the same fMP4 (the streamer's movflags) twice, to one
pipe directly (the old command line) and to another through the fifo the streamer now
uses; two threads read the pipes and note when each fragment (by its decode time)
arrives. The fifo's cost is the per-frame difference of the arrival times: median, p95.

player: hls.js in Chromium (lowLatencyMode, as the console plays) on a camera burning the
wall clock into its frames (tests/clock.py) under the same noise; the streaming process
is SIGSTOPped for --seconds once it plays, and the latency of the frame shown is read
every second after SIGCONT (tests/web/clock.html).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon  # noqa: E402

import vlmguard  # noqa: E402
from vlmguard import ffmpeg as vff  # noqa: E402
from vlmguard.fmp4 import fragment_timing, parse_init  # noqa: E402

NOISY_CAMERA = "lavfi:testsrc2=size=320x240:rate=25,noise=alls=20:allf=t"
NOISE = "noise=alls=20:allf=t"


def archive_bytes(data_dir: Path) -> int:
    total = 0
    for folder in ("partial", "closed", "archives"):
        for path in (data_dir / folder / "cam1").glob("*.ts"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
    return total


def last_segment(url: str) -> int | None:
    try:
        text = urllib.request.urlopen(url, timeout=1).read().decode()
    except OSError:
        return None
    numbers = [int(line[4:].split(".")[0]) for line in text.splitlines()
               if line.startswith("seg-")]
    return max(numbers, default=None)


def ffprobe_seconds(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True)
    try:
        return float(out.stdout.strip())
    except ValueError:
        return 0.0


def stall(seconds: int) -> None:
    code = "fifo" if hasattr(vff, "LIVE_FIFO_OPTIONS") else "direct pipe (old)"
    print(f"vlmguard from {Path(vlmguard.__file__).parent}: live output {code}")
    with tempfile.TemporaryDirectory() as directory:
        daemon = Daemon(Path(directory), camera_url=NOISY_CAMERA, archive_seconds=60).start()
        try:
            daemon.wait_live(timeout=60)
            started = time.time()  # FFmpeg ran a little before the playlist was live
            ffmpeg = daemon.ffmpeg_pids()
            before = archive_bytes(daemon.data_dir)
            time.sleep(3)
            rate = (archive_bytes(daemon.data_dir) - before) / 3
            newest = last_segment(daemon.url)
            stopped_at = archive_bytes(daemon.data_dir)
            os.kill(daemon.streamer.pid, signal.SIGSTOP)
            sizes = []
            try:
                for _ in range(seconds):
                    time.sleep(1)
                    sizes.append(archive_bytes(daemon.data_dir) - stopped_at)
            finally:
                os.kill(daemon.streamer.pid, signal.SIGCONT)
            resumed = time.time()
            back = None
            while time.time() - resumed < 30:
                last = last_segment(daemon.url)
                if last is not None and newest is not None and last > newest + 1:
                    back = time.time() - resumed
                    break
                time.sleep(0.1)
            time.sleep(max(0.0, 20 - (time.time() - resumed)))
            restarted = daemon.ffmpeg_pids() != ffmpeg
        finally:
            ended = time.time()
            daemon.stop()
        archives = sorted((daemon.data_dir / "archives" / "cam1").glob("*.ts"))
        recorded = sum(ffprobe_seconds(path) for path in archives)
    print(f"archive rate before the stop: {rate / 1e6:.2f} MB/s")
    print(f"archive bytes written during the {seconds}-s stop: {sizes[-1]} "
          f"(expected at that rate: {int(rate * seconds)})")
    print("  after each second: " + " ".join(f"{s / 1e6:.2f}" for s in sizes) + " MB")
    print(f"live playlist gained a new segment {back:.1f} s after SIGCONT" if back is not None
          else "live playlist gained no new segment within 30 s of SIGCONT")
    print(f"ffmpeg restarted within 20 s of SIGCONT: {restarted}")
    print(f"archive seconds (ffprobe, {len(archives)} files): {recorded:.1f} for "
          f"{ended - started:.1f} s of wall clock from live to stop")


def read_arrivals(fd: int, arrivals: dict[int, float]) -> None:
    """Note when each fragment (by its decode time) arrives on the pipe."""
    stream = os.fdopen(fd, "rb", buffering=0)
    buffer = b""
    track = None
    while chunk := stream.read(1 << 16):
        now = time.monotonic()
        buffer += chunk
        while len(buffer) >= 8:
            size, kind = struct.unpack(">I4s", buffer[:8])
            if len(buffer) < size:
                break
            box, buffer = buffer[:size], buffer[size:]
            if kind == b"moov":
                track = parse_init(box)
            elif kind == b"moof" and track is not None:
                arrivals[fragment_timing(box, track).decode_time] = now


def delay(seconds: int) -> None:
    mp4 = ":".join(["f=mp4", f"movflags={vff.LIVE_MOVFLAGS}", "flush_packets=1"])
    fifo = f"{mp4}:use_fifo=1:fifo_options={vff.LIVE_FIFO_OPTIONS}"
    direct_read, direct_write = os.pipe()
    fifo_read, fifo_write = os.pipe()
    command = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "warning", "-re", "-f", "lavfi",
               "-i", NOISY_CAMERA[len("lavfi:"):], "-t", str(seconds), "-map", "0:v:0",
               *vff.video_args(True, 2), "-f", "tee",
               f"[{mp4}]pipe:{direct_write}|[{fifo}]pipe:{fifo_write}"]
    proc = subprocess.Popen(command, pass_fds=(direct_write, fifo_write))
    os.close(direct_write)
    os.close(fifo_write)
    direct: dict[int, float] = {}
    through_fifo: dict[int, float] = {}
    readers = [threading.Thread(target=read_arrivals, args=(direct_read, direct)),
               threading.Thread(target=read_arrivals, args=(fifo_read, through_fifo))]
    for reader in readers:
        reader.start()
    proc.wait()
    for reader in readers:
        reader.join()
    common = sorted(set(direct) & set(through_fifo))
    differences = sorted((through_fifo[t] - direct[t]) * 1000 for t in common)
    print(f"{len(common)} frames seen on both pipes ({len(direct)} direct, "
          f"{len(through_fifo)} through the fifo)")
    print(f"fifo minus direct arrival, ms: median {statistics.median(differences):.2f}, "
          f"p95 {differences[int(len(differences) * 0.95)]:.2f}, "
          f"max {differences[-1]:.2f}")


def player(seconds: int) -> None:
    import browser
    from clock import clock_graph
    from playwright.sync_api import sync_playwright

    graph = clock_graph().replace("realtime", f"{NOISE},realtime", 1)
    with tempfile.TemporaryDirectory() as directory:
        daemon = Daemon(Path(directory), camera_url="lavfi:" + graph, archive_seconds=60).start()
        try:
            daemon.wait_live(timeout=60)
            with browser.PageServer() as pages, sync_playwright() as playwright:
                chromium = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
                try:
                    page = chromium.new_page()
                    page.goto(f"http://127.0.0.1:{pages.port}/clock.html?low=1&rate=1.5"
                              f"&src={daemon.url}")
                    page.wait_for_function("() => window.clock.codes > 250", timeout=60000,
                                           polling=500)
                    before = page.evaluate("() => window.clock.samples.slice(150)")
                    os.kill(daemon.streamer.pid, signal.SIGSTOP)
                    time.sleep(seconds)
                    os.kill(daemon.streamer.pid, signal.SIGCONT)
                    resumed = time.time()
                    marks = []
                    while time.time() - resumed < 15:
                        time.sleep(1)
                        marks.append((time.time() - resumed, page.evaluate(
                            "() => window.clock.samples.slice(-1)[0]")))
                    tail = page.evaluate("() => window.clock.samples.slice(-100)")
                finally:
                    chromium.close()
        finally:
            daemon.stop()
    print(f"hls.js lowLatencyMode before the stop: median latency "
          f"{statistics.median(before):.2f} s over {len(before)} frames")
    print(f"latency of the frame shown, each second after SIGCONT of a {seconds}-s stop:")
    print("  " + " ".join(f"{late:.2f}" for _at, late in marks))
    print(f"last 100 frames: median {statistics.median(tail):.2f} s, max {max(tail):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("stall", "delay", "player"))
    parser.add_argument("--seconds", type=int, default=None)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.mode == "stall":
        stall(args.seconds or 10)
    elif args.mode == "player":
        player(args.seconds or 10)
    else:
        delay(args.seconds or 20)


if __name__ == "__main__":
    main()
