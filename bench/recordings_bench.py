"""Recordings benchmark: playlist and segment time to first byte over a week of archives,
listing a day, disk bytes written and RAM per viewer while serving an hour, exporting one.

Run by hand (needs ffmpeg):
    .venv/bin/python bench/recordings_bench.py [--runs 15] [--viewers 8] [--keep DIR]

Footage: one camera, 7 days of 10-minute MPEG-TS archives (1008 files) as the segment
muxer writes them: 1080p 15 fps H.264 at ~4 Mbit/s, a keyframe every 2 s (~300 MB a
file). To fit a shared disk, the 1008 names are hard links to 6 distinct files (a 1-h
range holds 6-7 files, each distinct); every file has the archiver's sidecar (keyframe
index), written by the real SidecarWriter code (write_sidecar).

"cold" = the archives' and sidecars' pages dropped from the page cache first
(posix_fadvise DONTNEED on each file: this process's files only, no system-wide drop), as
for footage from days ago; "warm" = read just before. The server is the real app in a
child process (spawned), the client this process; time to first byte = request sent ->
first body byte. "scan" = the same requests with the sidecars moved away (footage older
than the feature: the keyframe index is read from the archive itself, then kept in memory).

Bytes written: the server process's write_bytes (/proc/PID/io: what reached the block
layer on its behalf) across ffmpeg reading one hour through the VOD playlist. RAM per
viewer: the server's RSS (sampled every 20 ms) with N ffmpeg clients reading the same hour
at once as fast as they can, minus its RSS before, over N. Export: GET export.mp4 of one
hour (seconds to the last byte; FFmpeg's CPU from the server's waited-for children in
/proc/PID/stat; peak RSS sampled), and `vlmguard export` of one hour (getrusage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import write_config  # noqa: E402
from daemon import free_port  # noqa: E402

from vlmguard.config import load_config  # noqa: E402
from vlmguard.ffmpeg import ffmpeg_binary  # noqa: E402
from vlmguard.layout import Layout  # noqa: E402
from vlmguard.recordings import index_root, sidecar_dir, write_sidecar  # noqa: E402

DAYS = 7
FILES_PER_DAY = 144
DISTINCT = 6
TOKEN = "tok"
SPAWN = multiprocessing.get_context("spawn")


def make_archives(data: Path, first_day: datetime) -> list[Path]:
    base = data / "base.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=1920x1080:rate=15", "-t", "60", "-c:v", "libx264",
                    "-preset", "ultrafast", "-b:v", "4M", "-maxrate", "4M", "-bufsize", "8M",
                    "-g", "30", "-sc_threshold", "0", "-pix_fmt", "yuv420p", "-f", "mpegts",
                    str(base)], check=True)
    distinct = []
    for n in range(DISTINCT):
        target = data / f"distinct-{n}.ts"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", "9", "-i", str(base),
                        "-c", "copy", "-f", "segment", "-segment_time", "9999",
                        "-reset_timestamps", "1", "-segment_format", "mpegts",
                        str(data / f"distinct-{n}-%d.ts")], check=True)
        (data / f"distinct-{n}-0.ts").rename(target)
        distinct.append(target)
    base.unlink()
    archives = Layout(data).archives("cam1")
    archives.mkdir(parents=True)
    names = []
    for n in range(DAYS * FILES_PER_DAY):
        when = first_day + timedelta(minutes=10 * n)
        path = archives / f"{when:%Y%m%dT%H%M%SZ}.ts"
        os.link(distinct[n % DISTINCT], path)
        names.append(path)
    return names


def write_sidecars(data: Path, archives: list[Path]) -> dict:
    """Index and thumbnails as the archiver writes them: the cost per archive, measured on
    the distinct files, then the index copied for every name (same bytes)."""
    layout = Layout(data)
    costs = []
    for path in archives[:DISTINCT]:
        start = datetime.strptime(path.stem, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        before_self, before_children = cpu_self(), cpu_children()
        wall = time.perf_counter()
        folder = write_sidecar(layout, ffmpeg_binary(), "cam1", path, start)
        costs.append({"wall_s": time.perf_counter() - wall,
                      "index_cpu_s": cpu_self() - before_self,
                      "thumbnail_cpu_s": cpu_children() - before_children,
                      "bytes": sum(p.stat().st_size for p in folder.iterdir())})
    for n, path in enumerate(archives[DISTINCT:], DISTINCT):
        source = sidecar_dir(layout, "cam1", archives[n % DISTINCT].name) / "keyframes.json"
        folder = sidecar_dir(layout, "cam1", path.name)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / "keyframes.json")
    return {"per_archive": costs}


def cpu_self() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def drop_cache(root: Path) -> None:
    """Evict this tree's files from the page cache (clean pages only: synced first)."""
    for path in root.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def serve(config_path: str, port: int) -> None:
    from aiohttp import web

    from vlmguard.web import create_app
    config = load_config(config_path)
    web.run_app(create_app(config), host="127.0.0.1", port=port, access_log=None,
                print=None, handle_signals=True)


class Server:
    def __init__(self, config_path: Path):
        self.port = free_port()
        self.proc = SPAWN.Process(target=serve, args=(str(config_path), self.port))
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        self.proc.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                import urllib.request
                urllib.request.urlopen(self.base + "/api/session", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join(10)

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def written(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def children_cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime

    def child_pids(self) -> list[int]:
        found = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                found += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return found


class Sampler:
    """Peak RSS of the server (and, summed, its FFmpeg children) while a block runs."""

    def __init__(self, server: Server):
        self.server = server
        self.peak = self.peak_children = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.server.status("VmRSS"))
            total = 0
            for pid in self.server.child_pids():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    continue
            self.peak_children = max(self.peak_children, total)
            self.stop.wait(0.02)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


async def first_byte(session: aiohttp.ClientSession, url: str, **headers) -> tuple[float, bytes]:
    sent = time.perf_counter()
    async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}", **headers}) as resp:
        assert resp.status in (200, 206), (url, resp.status, await resp.text())
        chunk = await resp.content.readany()
        elapsed = time.perf_counter() - sent
        return elapsed, chunk + await resp.read()


async def playlist_and_segment(server: Server, data: Path, hours: list[datetime],
                               cold: bool) -> dict:
    """TTFB of the 1-h playlist, then of its first segment (a byte range)."""
    playlist, segment = [], []
    async with aiohttp.ClientSession() as session:
        for start in hours:
            if cold:
                drop_cache(data / "archives")
                drop_cache(data / "index")
            url = (f"{server.base}/api/recordings/cam1/index.m3u8?start={stamp(start)}"
                   f"&end={stamp(start + timedelta(hours=1))}")
            took, body = await first_byte(session, url)
            playlist.append(took)
            lines = body.decode().splitlines()
            at = next(n for n, line in enumerate(lines) if line.startswith("#EXT-X-BYTERANGE"))
            length, offset = (int(v) for v in lines[at][17:].split("@"))
            took, _ = await first_byte(session, f"{server.base}/api/recordings/cam1/{lines[at + 1]}",
                                       Range=f"bytes={offset}-{offset + length - 1}")
            segment.append(took)
    return {"playlist_s": playlist, "segment_s": segment}


async def list_days(server: Server, data: Path, days: list[datetime], cold: bool) -> list[float]:
    took = []
    async with aiohttp.ClientSession() as session:
        for day in days:
            if cold:
                drop_cache(data / "archives")
            url = (f"{server.base}/api/recordings?camera=cam1&start={stamp(day)}"
                   f"&end={stamp(day + timedelta(days=1))}")
            elapsed, body = await first_byte(session, url)
            assert len(json.loads(body)["spans"]) == 1
            took.append(elapsed)
    return took


def play_hour(server: Server, start: datetime, viewers: int) -> dict:
    url = (f"{server.base}/api/recordings/cam1/index.m3u8?start={stamp(start)}"
           f"&end={stamp(start + timedelta(hours=1))}&token={TOKEN}")
    time.sleep(0.5)
    rss_before = server.status("VmRSS")
    written_before = server.written()
    began = time.perf_counter()
    with Sampler(server) as sampler:
        clients = [subprocess.Popen(["ffmpeg", "-v", "error", "-i", url, "-map", "0:v:0",
                                     "-c", "copy", "-f", "null", "-"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for _ in range(viewers)]
        for client in clients:
            _, err = client.communicate(timeout=3600)
            assert client.returncode == 0, err[-500:]
    return {"viewers": viewers, "seconds": time.perf_counter() - began,
            "written_bytes": server.written() - written_before,
            "rss_before": rss_before, "rss_peak": sampler.peak,
            "rss_per_viewer": (sampler.peak - rss_before) / viewers}


async def export_http(server: Server, start: datetime) -> dict:
    url = (f"{server.base}/api/recordings/cam1/export.mp4?start={stamp(start)}"
           f"&end={stamp(start + timedelta(hours=1))}")
    cpu_before = server.children_cpu()
    rss_before = server.status("VmRSS")
    size = 0
    with Sampler(server) as sampler:
        sent = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200, await resp.text()
                async for chunk in resp.content.iter_chunked(1 << 20):
                    size += len(chunk)
        seconds = time.perf_counter() - sent
    time.sleep(0.3)
    return {"seconds": seconds, "bytes": size, "ffmpeg_cpu_s": server.children_cpu() - cpu_before,
            "server_rss_growth": sampler.peak - rss_before, "ffmpeg_rss_peak": sampler.peak_children}


def export_cli(config_path: Path, start: datetime, out: Path) -> dict:
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmguard", "export", "--config", str(config_path),
                    "--camera", "cam1", "--start", stamp(start), "--duration", "3600",
                    "-o", str(out)], check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": time.perf_counter() - began,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "peak_rss": after.ru_maxrss * 1024, "bytes": out.stat().st_size}


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--viewers", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="make or reuse the footage here")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="recordings-bench-"))
    data = root / "data"
    first_day = (datetime.now(timezone.utc) - timedelta(days=DAYS)).replace(
        hour=0, minute=0, second=0, microsecond=0)
    made = data.exists()
    if not made:
        data.mkdir(parents=True)
        t = time.perf_counter()
        archives = make_archives(data, first_day)
        print(f"footage made in {time.perf_counter() - t:.0f} s")
        sidecars = write_sidecars(data, archives)
        (root / "sidecars.json").write_text(json.dumps(sidecars))
    else:
        archives = sorted(Layout(data).archives("cam1").glob("*.ts"))
        first_day = datetime.strptime(archives[0].stem, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        sidecars = json.loads((root / "sidecars.json").read_text())
    config_path = write_config(root, f"""
        [server]
        token = "{TOKEN}"
        [storage]
        data_dir = "{data}"
        retention_days = 30
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """)
    rng = random.Random(7)
    result: dict = {"sidecar_per_archive": sidecars["per_archive"]}

    def hours(n: int) -> list[datetime]:
        return [first_day + timedelta(hours=rng.randrange(0, DAYS * 24 - 1),
                                      minutes=rng.choice([0, 17, 33])) for _ in range(n)]
    days = [first_day + timedelta(days=d) for d in range(DAYS)]
    with Server(config_path) as server:
        result["cold"] = asyncio.run(playlist_and_segment(server, data, hours(args.runs), True))
        result["warm"] = asyncio.run(playlist_and_segment(server, data, hours(args.runs), False))
        result["list_day_cold_s"] = asyncio.run(list_days(server, data, days, True))
        result["list_day_warm_s"] = asyncio.run(list_days(server, data, days, False))
        result["play_one"] = play_hour(server, first_day + timedelta(days=3, hours=5), 1)
        result["play_many"] = play_hour(server, first_day + timedelta(days=4, hours=5),
                                        args.viewers)
        result["export_http"] = asyncio.run(export_http(server, first_day + timedelta(days=2)))
    result["export_cli"] = export_cli(config_path, first_day + timedelta(days=5, hours=3),
                                      root / "export.mp4")
    (root / "export.mp4").unlink()
    # Without the sidecars: the keyframes are read from the archives themselves.
    moved = root / "index-away"
    index_root(Layout(data), "cam1").rename(moved)
    try:
        with Server(config_path) as server:
            result["cold_scan"] = asyncio.run(playlist_and_segment(server, data, hours(max(5, args.runs // 3)), True))
    finally:
        moved.rename(index_root(Layout(data), "cam1"))
    print(f"load average at end: {os.getloadavg()}")
    report(result)
    if not args.keep:
        shutil.rmtree(root)


def report(r: dict) -> None:
    ms = lambda values: f"{median(values) * 1000:7.1f} ms (max {max(values) * 1000:.1f})"  # noqa: E731
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    side = r["sidecar_per_archive"]
    print("\nsidecar per 10-min archive (index + 10 thumbnails), median of", len(side))
    print(f"  wall {median([s['wall_s'] for s in side]):.2f} s, index CPU "
          f"{median([s['index_cpu_s'] for s in side]):.2f} s, thumbnails CPU "
          f"{median([s['thumbnail_cpu_s'] for s in side]):.2f} s, "
          f"{median([s['bytes'] for s in side]) / 1000:.0f} kB written")
    for key in ("cold", "warm", "cold_scan"):
        print(f"1-h VOD over 7 days, {key:9}: playlist TTFB {ms(r[key]['playlist_s'])}, "
              f"first segment TTFB {ms(r[key]['segment_s'])}")
    print(f"list a day of spans: cold {ms(r['list_day_cold_s'])}, warm {ms(r['list_day_warm_s'])}")
    for key in ("play_one", "play_many"):
        p = r[key]
        print(f"serve 1 h to {p['viewers']} viewer(s) (ffmpeg, as fast as it reads): "
              f"{p['seconds']:.1f} s, disk bytes written by the server {p['written_bytes']}, "
              f"RSS {mb(p['rss_before'])} -> peak {mb(p['rss_peak'])}, "
              f"{p['rss_per_viewer'] / 1e6:.2f} MB per viewer")
    e = r["export_http"]
    print(f"export 1 h over HTTP: {e['seconds']:.1f} s, {mb(e['bytes'])}, FFmpeg CPU "
          f"{e['ffmpeg_cpu_s']:.1f} s, FFmpeg peak RSS {mb(e['ffmpeg_rss_peak'])}, server RSS "
          f"growth {mb(e['server_rss_growth'])}")
    c = r["export_cli"]
    print(f"vlmguard export 1 h: {c['seconds']:.1f} s, CPU {c['cpu_s']:.1f} s, peak RSS "
          f"{mb(c['peak_rss'])}, {mb(c['bytes'])}")


if __name__ == "__main__":
    main()
