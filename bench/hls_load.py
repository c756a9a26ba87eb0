"""P virtual HLS players against one server, for the isolation benchmark (run by it).

python bench/hls_load.py BASE_URL DATA_DIR SECONDS PLAYERS CAMERA [CAMERA ...]
Each player reloads its camera's playlist every target duration and fetches each new
segment, as a live player does. Prints one JSON object: fetch latencies, how long after
FFmpeg closed a segment it first appeared in a playlist, and FFmpeg's speed.
"""

import asyncio
import json
import os
import re
import sys
import time

import aiohttp


async def player(session, base, camera, deadline, out, _seen):
    while time.time() < deadline:
        try:
            await play(session, base, camera, deadline, out)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            out["errors"] += 1  # refused or cut off: a real player retries too
            await asyncio.sleep(1)


async def play(session, base, camera, deadline, out):
    fetched = set()
    while time.time() < deadline:
        started = time.perf_counter()
        async with session.get(f"{base}/live/{camera}/index.m3u8") as response:
            text = await response.text()
        out["playlist"].append(time.perf_counter() - started)
        if response.status != 200:
            out["errors"] += 1
            await asyncio.sleep(1)
            continue
        target = int(re.search(r"#EXT-X-TARGETDURATION:(\d+)", text).group(1))
        names = [line for line in text.splitlines() if line.startswith("seg-")]
        for name in names[-2:]:
            if name in fetched:
                continue
            started = time.perf_counter()
            async with session.get(f"{base}/live/{camera}/{name}") as response:
                await response.read()
            out["segment"].append(time.perf_counter() - started)
            fetched.add(name)
        await asyncio.sleep(target / 2)


async def watcher(session, base, camera, deadline, seen, initial):
    """Polls one camera's playlist every 100 ms to see when each segment first appears."""
    first = True
    while time.time() < deadline:
        try:
            async with session.get(f"{base}/live/{camera}/index.m3u8") as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)  # cut off under load: poll again
            continue
        now = time.time()
        if response.status == 200:
            durations = [float(d) for d in re.findall(r"#EXTINF:([\d.]+),", text)]
            names = [line for line in text.splitlines() if line.startswith("seg-")]
            for name, duration in zip(names, durations):
                if first:
                    initial.setdefault(camera, now)
                    seen.setdefault((camera, name), (None, duration))
                else:
                    seen.setdefault((camera, name), (now, duration))
            first = False
        await asyncio.sleep(0.1)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else None


async def main():
    base, data_dir, seconds, players = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    cameras = sys.argv[5:]
    out = {"playlist": [], "segment": [], "errors": 0}
    seen, initial = {}, {}
    deadline = time.time() + seconds
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(player(session, base, cameras[i % len(cameras)], deadline, out, seen)
                               for i in range(players)),
                             *(watcher(session, base, camera, deadline, seen, initial)
                               for camera in cameras))
    appear, speeds = [], []
    for camera in cameras:
        # Segments that appeared during the run (not the window already there at the start).
        rows = sorted((first, duration, name) for (cam, name), (first, duration) in seen.items()
                      if cam == camera and first is not None)
        for first, _, name in rows:
            try:
                # An fMP4 segment (seg-N.m4s) is served from its file seg-N.mp4.
                file_name = name.replace(".m4s", ".mp4")
                appear.append(first - os.stat(f"{data_dir}/live/{camera}/{file_name}").st_mtime)
            except FileNotFoundError:
                pass
        if len(rows) > 2:
            # Content produced per wall-clock second between the first and last new segment.
            speeds.append(sum(d for _, d, _ in rows[1:]) / (rows[-1][0] - rows[0][0]))
    ms = lambda v: None if v is None else round(v * 1000, 1)
    print(json.dumps({
        "playlist_ms": {"p50": ms(percentile(out["playlist"], 0.5)), "p99": ms(percentile(out["playlist"], 0.99)),
                        "max": ms(max(out["playlist"], default=None)), "n": len(out["playlist"])},
        "segment_ms": {"p50": ms(percentile(out["segment"], 0.5)), "p99": ms(percentile(out["segment"], 0.99)),
                       "max": ms(max(out["segment"], default=None)), "n": len(out["segment"])},
        "appear_ms": {"p50": ms(percentile(appear, 0.5)), "p99": ms(percentile(appear, 0.99))},
        "ffmpeg_speed": round(min(speeds), 3) if speeds else None,
        "errors": out["errors"]}))


asyncio.run(main())
