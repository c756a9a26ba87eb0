"""Incident media benchmark: snapshot bytes and CPU per incident; clip time to first byte.

Run by hand (needs ffmpeg):
    .venv/bin/python bench/media_bench.py [--snapshots 40] [--clips 40] [--gop 2 4]

Footage: a 60-s 1080p 15-fps H.264 file (testsrc2, x264 veryfast, ~4 Mbit/s, a keyframe
every GOP seconds) made once, stream-copied ten times into each of two 10-minute archives
named for 08:00 and 08:10, as the archiver leaves them.

snapshots: clips.save_snapshot (what the analyzer runs per stored incident) at random
times; CPU is the FFmpeg child's user+system time (RUSAGE_CHILDREN), bytes the JPEG's.

clips: GET /api/clip for 60 s (the incident clip is 10 s + the incident) through the real
app on 127.0.0.1, one request at a time, from a random start inside one archive and across
the two; time to first byte = request sent -> first body byte received. The server and the
client share this process's event loop (the FFmpeg cut runs as a child either way).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import write_config  # noqa: E402

from vlmguard.clips import save_snapshot  # noqa: E402
from vlmguard.config import load_config  # noqa: E402
from vlmguard.ffmpeg import ffmpeg_binary  # noqa: E402
from vlmguard.layout import Layout  # noqa: E402
from vlmguard.web import create_app  # noqa: E402

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)


def make_footage(data: Path, gop: int) -> None:
    archives = Layout(data).archives("cam1")
    archives.mkdir(parents=True)
    base = data / "base.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=1920x1080:rate=15", "-t", "60", "-c:v", "libx264",
                    "-preset", "veryfast", "-b:v", "4M", "-g", str(15 * gop), "-pix_fmt",
                    "yuv420p", str(base)], check=True)
    for minute in (0, 10):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", "9", "-i", str(base),
                        "-c", "copy", "-movflags", "+faststart",
                        str(archives / f"20261126T08{minute:02d}00Z.mp4")], check=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_snapshots(data: Path, n: int) -> dict:
    layout = Layout(data)
    binary = ffmpeg_binary()
    rng = random.Random(1)
    sizes, cpu, wall = [], [], []
    for incident_id in range(1, n + 1):
        when = T0 + timedelta(seconds=rng.uniform(0, 1199))
        before, started = children_cpu(), time.perf_counter()
        path = save_snapshot(binary, layout, "cam1", incident_id, when)
        wall.append(time.perf_counter() - started)
        cpu.append(children_cpu() - before)
        sizes.append(path.stat().st_size)
    return {"bytes": sizes, "cpu_s": cpu, "wall_s": wall}


async def bench_clips(config, n: int, spanning: bool) -> dict:
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    rng = random.Random(2)
    ttfb, total, sizes, cpu = [], [], [], []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                offset = rng.uniform(570, 599) if spanning else rng.uniform(0, 530)
                start = T0 + timedelta(seconds=offset)
                url = (f"http://127.0.0.1:{port}/api/clip?camera=cam1&duration=60"
                       f"&start={start:%Y-%m-%dT%H:%M:%S.%f}Z")
                before, sent = children_cpu(), time.perf_counter()
                async with session.get(url, headers={"Authorization": "Bearer tok"}) as resp:
                    assert resp.status == 200, await resp.text()
                    first = await resp.content.readany()
                    ttfb.append(time.perf_counter() - sent)
                    size = len(first) + len(await resp.read())
                total.append(time.perf_counter() - sent)
                cpu.append(children_cpu() - before)
                sizes.append(size)
    finally:
        await runner.cleanup()
    return {"ttfb_s": ttfb, "total_s": total, "bytes": sizes, "ffmpeg_cpu_s": cpu}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def show(name: str, values: list[float], unit: str, scale: float = 1.0) -> None:
    print(f"  {name:14} p50 {statistics.median(values) * scale:9.1f} {unit}"
          f"   p95 {pct(values, 0.95) * scale:9.1f} {unit}   max {max(values) * scale:9.1f} {unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=40)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--gop", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    for gop in args.gop:
        with tempfile.TemporaryDirectory(prefix="media-bench-") as tmp:
            data = Path(tmp) / "data"
            make_footage(data, gop)
            config = load_config(write_config(Path(tmp), f"""
                [server]
                token = "tok"
                [storage]
                data_dir = "{data}"
                archive_seconds = 600
                [[cameras]]
                id = "cam1"
                url = "lavfi:testsrc2"
            """))
            print(f"1080p 15 fps ~4 Mbit/s, keyframe every {gop} s")
            snaps = bench_snapshots(data, args.snapshots)
            print(f" snapshot per incident (n={args.snapshots}):")
            show("JPEG bytes", snaps["bytes"], "kB", 1 / 1000)
            show("FFmpeg CPU", snaps["cpu_s"], "ms", 1000)
            show("wall", snaps["wall_s"], "ms", 1000)
            for spanning in (False, True):
                clips = asyncio.run(bench_clips(config, args.clips, spanning))
                where = "across two archives" if spanning else "inside one archive"
                print(f" 60-s clip {where} (n={args.clips}):")
                show("first byte", clips["ttfb_s"], "ms", 1000)
                show("whole clip", clips["total_s"], "ms", 1000)
                show("FFmpeg CPU", clips["ffmpeg_cpu_s"], "ms", 1000)
                show("MP4 bytes", clips["bytes"], "MB", 1e-6)


if __name__ == "__main__":
    main()
