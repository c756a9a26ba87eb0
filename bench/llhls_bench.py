"""Low-Latency HLS benchmark: glass-to-glass latency in Chromium, LL-HLS against ordinary
HLS side by side; CPU and RAM of the streaming process per camera and per 100 clients
doing blocking playlist reloads.

Run by hand (needs what tests/run.sh installs: ffmpeg, chromium, tests/web/node_modules):
    .venv/bin/python bench/llhls_bench.py latency [--seconds 60]
    .venv/bin/python bench/llhls_bench.py cost [--cameras 4] [--seconds 30] [--clients 100 300]
                                               [--parked 1000]

latency: one daemon, two cameras with the same source, a 640x360 25-fps lavfi pattern
that burns the wall clock into every frame (tests/clock.py), encoded with a keyframe per
2-s segment (the shipped segment_seconds). Camera "ll" is served as LL-HLS, camera
"plain" with low_latency = false (FFmpeg's MPEG-TS segments, as before LL-HLS). One
Chromium plays, at the same time, in four tabs: ll with hls.js lowLatencyMode as the
console runs it; ll with hls.js's defaults (a player that knows no LL-HLS, same URL);
plain with hls.js's defaults; plain with the console's former liveSyncDuration of 3 s.
For every frame shown, tests/web/clock.html reads the burned-in time back from a canvas:
latency = when Chromium presented the frame - the time in it. Medians and p95 over the
run, after a settling period.

cost: per mode (LL-HLS, MPEG-TS), a daemon with 1 camera and one with N cameras, all
four running at once, each camera an H.264 file (640x360, 25 fps, ~1 Mbit/s, 2-s GOP)
looped in real time and copied. CPU of the streaming process (Python: packaging and
serving) and of the FFmpegs over the window, from /proc; the streaming process's RSS
and the camera's RAM folder (live segments) at the end; per camera = the N-camera
daemon's figure / N, RSS per camera = (RSS(N) - RSS(1)) / (N - 1). Then K clients on
the 1-camera LL daemon, each doing what hls.js lowLatencyMode does: a blocking reload
for the next part, again as soon as it is answered; streaming-process CPU and RSS
against the same daemon idle, per 100 clients. "Parked" clients each wait for the
segment after next instead (answered once a segment, woken at every part to check).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import browser  # noqa: E402
from clock import clock_graph  # noqa: E402
from daemon import Daemon  # noqa: E402
from isolation_bench import wait_live  # noqa: E402

from vlmguard.config import load_config  # noqa: E402
from vlmguard.layout import Layout  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
SEGMENT_SECONDS = 2
SETTLE_SECONDS = 15


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "?")
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores ({model}), load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f} at the start")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


# -- latency ---------------------------------------------------------------------------------

TABS = [("LL-HLS, hls.js lowLatencyMode (the console's settings)", "ll", "low=1&rate=1.5"),
        ("same LL-HLS URL, hls.js without lowLatencyMode", "ll", "low=0"),
        ("ordinary HLS (MPEG-TS), hls.js defaults", "plain", "low=0"),
        ("ordinary HLS (MPEG-TS), liveSyncDuration 3 (the console before LL-HLS)", "plain",
         "low=0&sync=3")]


def latency(args) -> None:
    from playwright.sync_api import sync_playwright
    print(f"machine: {machine()}")
    graph = clock_graph(size="640x360", rate=25)
    plain = f'low_latency = true\n[[cameras]]\nid = "plain"\nurl = "lavfi:{graph}"\nlow_latency = false\n'
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), camera_url=f"lavfi:{graph}", archive_seconds=600, extra=plain,
                        segment_seconds=SEGMENT_SECONDS)
        daemon.config_path.write_text(daemon.config_path.read_text().replace('id = "cam1"', 'id = "ll"'))
        daemon.config = load_config(daemon.config_path)
        daemon.start()
        base = f"http://127.0.0.1:{daemon.port}/live"
        try:
            wait_live(f"{base}/ll/index.m3u8")
            wait_live(f"{base}/plain/index.m3u8")
            time.sleep(2 * SEGMENT_SECONDS)
            with browser.PageServer() as pages, sync_playwright() as playwright:
                chromium = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
                tabs = []
                for label, camera, query in TABS:
                    page = chromium.new_page()
                    page.goto(f"http://127.0.0.1:{pages.port}/clock.html?{query}"
                              f"&src={base}/{camera}/index.m3u8")
                    tabs.append((label, page))
                time.sleep(SETTLE_SECONDS)
                marks = [page.evaluate("() => window.clock.samples.length") for _, page in tabs]
                time.sleep(args.seconds)
                rows = []
                for (label, page), mark in zip(tabs, marks):
                    clock = page.evaluate("() => window.clock")
                    samples = clock["samples"][mark:]
                    rows.append((label, samples, clock["stalls"]))
                chromium.close()
        finally:
            daemon.stop()
    print(f"\nglass to glass (burned-in wall clock to the frame Chromium shows), "
          f"{args.seconds} s after {SETTLE_SECONDS} s settling, {SEGMENT_SECONDS}-s segments, "
          f"all four at once:\n")
    print("| player | frames | median s | p95 s | stalls |")
    print("|---|---|---|---|---|")
    for label, samples, stalls in rows:
        if samples:
            print(f"| {label} | {len(samples)} | {statistics.median(samples):.2f} | "
                  f"{percentile(samples, 0.95):.2f} | {stalls} |")
        else:
            print(f"| {label} | 0 | - | - | {stalls} |")


# -- cost ------------------------------------------------------------------------------------

def make_source(path: Path) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=640x360:rate=25", "-t", "20", "-c:v", "libx264",
                    "-preset", "veryfast", "-b:v", "1M", "-g", "50", "-keyint_min", "50",
                    "-sc_threshold", "0", "-pix_fmt", "yuv420p", str(path)], check=True)


def camera_daemon(directory: Path, source: Path, count: int, low_latency: bool) -> Daemon:
    flag = f"low_latency = {'true' if low_latency else 'false'}"
    extra = flag + "".join(f'\n[[cameras]]\nid = "cam{n}"\nurl = "file://{source}"\n{flag}\n'
                           for n in range(2, count + 1))
    directory.mkdir()
    return Daemon(directory, camera_url=f"file://{source}", archive_seconds=600, extra=extra,
                  segment_seconds=SEGMENT_SECONDS, server="max_connections = 4000")


def cost(args) -> None:
    print(f"machine: {machine()}")
    count = args.cameras
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.mp4"
        make_source(source)
        daemons = {(mode, n): camera_daemon(Path(tmp) / f"{mode}-{n}", source, n, mode == "ll")
                   for mode in ("ll", "ts") for n in (1, count)}
        for daemon in daemons.values():
            daemon.start()
        try:
            for daemon in daemons.values():
                daemon.wait_live(timeout=90)
            time.sleep(10)
            pids = {key: (d.streamer.pid, d.ffmpeg_pids()) for key, d in daemons.items()}
            before = {key: (cpu_seconds([p]), cpu_seconds(f)) for key, (p, f) in pids.items()}
            started = time.monotonic()
            time.sleep(args.seconds)
            elapsed = time.monotonic() - started
            after = {key: (cpu_seconds([p]), cpu_seconds(f)) for key, (p, f) in pids.items()}
            print(f"\nper camera, {args.seconds} s, {count} cameras (and 1, for RSS) per mode, "
                  f"all daemons at once; % of one core:\n")
            print("| live output | streaming process % per camera | FFmpeg % per camera | "
                  "streaming process RSS MB per camera | live segments in RAM MB per camera |")
            print("|---|---|---|---|---|")
            for mode, label in (("ll", "LL-HLS (fMP4, parts)"), ("ts", "MPEG-TS (FFmpeg's HLS muxer)")):
                key = (mode, count)
                streamer = (after[key][0] - before[key][0]) / elapsed * 100 / count
                ffmpeg = (after[key][1] - before[key][1]) / elapsed * 100 / count
                rss = (rss_mb(pids[key][0]) - rss_mb(pids[(mode, 1)][0])) / (count - 1)
                live = Layout(daemons[key].config.data_dir).live("cam1")
                print(f"| {label} | {streamer:.2f} | {ffmpeg:.2f} | {rss:.1f} | "
                      f"{folder_mb(live):.1f} |")
            print(f"\nstreaming process RSS: LL 1 camera {rss_mb(pids[('ll', 1)][0]):.1f} MB, "
                  f"{count} cameras {rss_mb(pids[('ll', count)][0]):.1f} MB; MPEG-TS 1 camera "
                  f"{rss_mb(pids[('ts', 1)][0]):.1f} MB, {count} cameras "
                  f"{rss_mb(pids[('ts', count)][0]):.1f} MB")
            for daemon in list(daemons.values()):
                if daemon is not daemons[("ll", 1)]:
                    daemon.stop()
            blocking_clients(daemons[("ll", 1)], args)
        finally:
            for daemon in daemons.values():
                daemon.stop()


def blocking_clients(daemon: Daemon, args) -> None:
    pid = daemon.streamer.pid
    url = daemon.url
    print(f"\n{args.seconds} s each, the 1-camera LL daemon; clients run in this process, "
          "each a blocking reload for the next part, again at once when answered:\n")
    print("| clients | answers/s | streaming process % of a core | per 100 clients | "
          "RSS MB | per 100 clients |")
    print("|---|---|---|---|---|---|")
    time.sleep(2)
    idle0, rss0, t0 = cpu_seconds([pid]), rss_mb(pid), time.monotonic()
    time.sleep(args.seconds)
    idle = (cpu_seconds([pid]) - idle0) / (time.monotonic() - t0) * 100
    print(f"| 0 | - | {idle:.2f} | - | {rss0:.1f} | - |")
    for clients in args.clients:
        answers, busy, rss = asyncio.run(load(url, pid, clients, args.seconds))
        extra = busy - idle
        print(f"| {clients} | {answers:.0f} | {busy:.2f} | {extra / clients * 100:.2f} | "
              f"{rss:.1f} | {(rss - rss0) / clients * 100:.2f} |")
    for clients in args.parked:
        answers, busy, rss = asyncio.run(load(url, pid, clients, args.seconds, parked=True))
        extra = busy - idle
        print(f"| {clients} parked | {answers:.0f} | {busy:.2f} | {extra / clients * 100:.2f} | "
              f"{rss:.1f} | {(rss - rss0) / clients * 100:.2f} |")


async def load(url: str, pid: int, clients: int, seconds: float,
               parked: bool = False) -> tuple[float, float, float]:
    """(answers a second, streaming-process CPU %, its RSS MB) with `clients` clients;
    parked: each waits for the segment after next (answered every segment, woken at
    every part) instead of the next part."""
    import aiohttp
    answered = 0
    stop = asyncio.Event()

    async def client(session):
        nonlocal answered
        while not stop.is_set():
            try:
                async with session.get(url) as response:
                    text = await response.text()
                msn = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text).group(1))
                segments = len(re.findall(r"^seg-", text, re.M))
                # The part after the last listed one, as hls.js asks for it.
                tail = text[text.rfind(".m4s\n") + 5:] if segments else text
                index = len(re.findall(r"#EXT-X-PART:", tail))
                query = f"?_HLS_msn={msn + segments}&_HLS_part={index}"
                while not stop.is_set():
                    async with session.get(url + query) as response:
                        text = await response.text()
                    answered += 1
                    segments_now = re.findall(r"^seg-(\d+)", text, re.M)
                    last = int(segments_now[-1])
                    tail = text[text.rfind(".m4s\n") + 5:]
                    query = (f"?_HLS_msn={last + 2}" if parked else
                             f"?_HLS_msn={last + 1}&_HLS_part={len(re.findall('#EXT-X-PART:', tail))}")
            except (aiohttp.ClientError, ValueError, AttributeError, IndexError):
                await asyncio.sleep(0.5)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await asyncio.sleep(3)
        count0, cpu0, t0 = answered, cpu_seconds([pid]), time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        result = ((answered - count0) / elapsed, (cpu_seconds([pid]) - cpu0) / elapsed * 100,
                  rss_mb(pid))
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--seconds", type=int, default=60)
    lat.set_defaults(run=latency)
    cst = sub.add_parser("cost")
    cst.add_argument("--cameras", type=int, default=4)
    cst.add_argument("--seconds", type=int, default=30)
    cst.add_argument("--clients", type=int, nargs="+", default=[100, 300])
    cst.add_argument("--parked", type=int, nargs="*", default=[1000])
    cst.set_defaults(run=cost)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
