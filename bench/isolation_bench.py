"""Does analysis disturb live video? vlmguard vs the seed's in-process design, side by side.

Run by hand (after tests/run.sh has installed ffmpeg, chromium and hls.js):
    .venv/bin/python bench/isolation_bench.py [--seconds 120] [--cameras 4] [--players 8]

Three scenarios, one after the other in one run, each on a fresh data directory:
  idle      `vlmguard run`, N cameras, no analysis (workers = 0);
  vlmguard  the same with 2 analysis processes kept busy by a backlog of archives,
            against the Gemini test server answering after 3 s;
  seed      vlmguard streams the same cameras, but players are served by ONE process
            running vlmguard's HLS app and a 2-thread pool doing the seed's analysis
            (read an archive, Base64 it inline, call Gemini through the SDK).
Cameras: a 1080p H.264 file at ~4 Mbit/s looped in real time, copied (no re-encode).
Measured: playlist/segment fetch latency of P virtual players (bench/hls_load.py), how
long after FFmpeg closed a segment it appeared in a playlist, FFmpeg speed, and stalls of
hls.js in headless Chromium playing camera 1 all along. In the vlmguard scenario also the
resident memory of the whole daemon (every process, FFmpeg included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import browser  # noqa: E402
from daemon import free_port  # noqa: E402
from stream_bench import make_1080p  # noqa: E402

from vlmguard.config import load_config  # noqa: E402
from vlmguard.store.bundle import Store  # noqa: E402

SOURCE = Path(tempfile.gettempdir()) / "vlmguard-bench-1080p-4M.mp4"
PYTHON = sys.executable


def write_config(directory: Path, cameras: int, workers: int, gemini_port: int) -> Path:
    port = free_port()
    camera_tables = "".join(f'[[cameras]]\nid = "cam{n}"\nurl = "file://{SOURCE}"\n'
                            for n in range(1, cameras + 1))
    path = directory / "config.toml"
    path.write_text(f"""
[server]
port = {port}
[storage]
data_dir = "{directory / 'data'}"
[analysis]
workers = {workers}
[gemini]
base_url = "http://127.0.0.1:{gemini_port}"
{camera_tables}""")
    return path


def backlog(directory: Path, count: int, source: Path = SOURCE) -> Path:
    """count hard links to source, as a folder of archives waiting for analysis."""
    folder = directory / "backlog"
    folder.mkdir()
    for n in range(count):
        os.link(source, folder / f"{n:04d}.mp4")
    return folder


def register_backlog(config_path: Path, folder: Path) -> None:
    config = load_config(config_path)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with Store.from_config(config) as store:
        for n, path in enumerate(sorted(folder.glob("*.mp4"))):
            begin = start + timedelta(minutes=n)
            store.queue.register("cam1", path, begin, begin + timedelta(seconds=60), max_retries=0)


def wait_live(url: str, timeout: float = 60) -> None:
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if b"seg-" in urllib.request.urlopen(url, timeout=2).read():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} never went live")


def memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB over pid and all its descendants."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_supervisor import descendants
    rss = pss = 0
    for member in {pid} | descendants(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def run_scenario(name: str, args, gemini_port: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        workers = 2 if name == "vlmguard" else 0
        config_path = write_config(directory, args.cameras, workers, gemini_port)
        config = load_config(config_path)
        folder = backlog(directory, 400) if name != "idle" else None
        if name == "vlmguard":
            Store.from_config(config).close()
            register_backlog(config_path, folder)
        env = {**os.environ, "GEMINI_API_KEY": "test-key-123"}
        daemon = subprocess.Popen([PYTHON, "-m", "vlmguard", "run", "--config", str(config_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        baseline = None
        port = config.server.port
        try:
            wait_live(f"http://127.0.0.1:{port}/live/cam1/index.m3u8")
            if name == "seed":
                port = free_port()
                baseline = subprocess.Popen([PYTHON, str(REPO / "bench" / "seed_baseline.py"),
                                             str(config_path), str(port), "2", str(folder)],
                                            stdout=subprocess.PIPE, text=True)
                assert baseline.stdout.readline().strip() == "ready"
            time.sleep(10)  # archives in the pool, playlists full
            base = f"http://127.0.0.1:{port}"
            load = subprocess.Popen([PYTHON, str(REPO / "bench" / "hls_load.py"), base,
                                     str(config.data_dir), str(args.seconds), str(args.players),
                                     *[c.id for c in config.cameras]], stdout=subprocess.PIPE, text=True)
            mem: list[tuple[float, float]] = []
            if name == "vlmguard":
                # Sampled beside the player, not before it, so hls.js watches the whole run.
                sampler = threading.Timer(min(30, args.seconds / 2),
                                          lambda: mem.append(memory(daemon.pid)))
                sampler.daemon = True
                sampler.start()
            reports = browser.play_with_hlsjs(f"{base}/live/cam1/index.m3u8", directory / "profile",
                                              watch=int(args.seconds - 5))
            result = json.loads(load.communicate(timeout=args.seconds + 60)[0])
            watched = reports[-1] if reports else {}
            result["hlsjs"] = {"event": watched.get("event"), "stalls": watched.get("stalls"),
                               "frames": watched.get("frames"),
                               "dropped": watched.get("dropped")}
            if mem:
                result["memory_mb"] = {"rss": round(mem[0][0]), "pss": round(mem[0][1])}
            if name == "vlmguard":
                with Store.from_config(config) as store:
                    result["jobs_completed"] = sum(c["completed"] for c in store.reports.counts().values())
            return result
        finally:
            if baseline:
                baseline.kill()
                baseline.wait()
            daemon.terminate()
            daemon.wait(120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--players", type=int, default=8)
    parser.add_argument("--only", choices=["idle", "vlmguard", "seed"], nargs="*")
    args = parser.parse_args()
    make_1080p(SOURCE)
    gemini_port = free_port()
    gemini = subprocess.Popen([PYTHON, str(REPO / "tests" / "gemini_server.py"), str(gemini_port), "3"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO / "tests")
    assert gemini.stdout.readline().strip() == "ready"
    results = {}
    try:
        for name in args.only or ["idle", "vlmguard", "seed"]:
            results[name] = run_scenario(name, args, gemini_port)
            print(name, json.dumps(results[name]), flush=True)
    finally:
        gemini.kill()
    print(f"\n{args.cameras} cameras (1080p, ~4 Mbit/s, copied), {args.players} virtual players, "
          f"hls.js on cam1, {args.seconds:.0f} s per scenario\n")
    print("| scenario | playlist p50/p99/max ms | segment p50/p99/max ms | segment in playlist p50/p99 ms "
          "| FFmpeg speed | hls.js stalls |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        pl, sg, ap = r["playlist_ms"], r["segment_ms"], r["appear_ms"]
        print(f"| {name} | {pl['p50']}/{pl['p99']}/{pl['max']} | {sg['p50']}/{sg['p99']}/{sg['max']} | "
              f"{ap['p50']}/{ap['p99']} | {r['ffmpeg_speed']} | {r['hlsjs']['stalls']} |")
    for name, r in results.items():
        if "memory_mb" in r:
            print(f"\n{name}: whole daemon ({args.cameras} cameras, 2 analyzers, every process "
                  f"incl. FFmpeg): RSS {r['memory_mb']['rss']} MB, PSS {r['memory_mb']['pss']} MB; "
                  f"{r.get('jobs_completed')} analyses completed during the run")


if __name__ == "__main__":
    main()
