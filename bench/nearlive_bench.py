"""Near-live analysis benchmark (issue 13). Run by hand; figures go to docs/benchmarks.md.

    .venv/bin/python bench/nearlive_bench.py disk [--seconds 180] [--code DIR]
    .venv/bin/python bench/nearlive_bench.py incidents [--minutes 21]
    .venv/bin/python bench/nearlive_bench.py prepare

disk: `vlmguard run` (one camera: a 1080p H.264 file at ~4 Mbit/s looped in real time,
copied, 60-s archives, one analyzer against the Gemini stand-in answering in 1 s) for
--seconds. Every 0.25 s the bench reads write_bytes and cancelled_write_bytes from
/proc/PID/io of every process under `vlmguard run` (the highest value seen per pid counts;
a process that lived less than 0.25 s is missed - the analyzers' FFmpeg runs, which write
to the RAM scratch folder, not to a block device). Result: bytes written to block devices
over archive bytes on disk at the end, and the RAM folder's size (live segments plus
windows) sampled from the archiver's state. --code DIR runs another checkout's vlmguard
(for the before figure: `git archive <commit> | tar -x -C DIR`).

incidents: two daemons side by side, analysis.window_seconds = 60 and = 0 (10-min
archives), each with a lavfi camera whose picture turns solid red for 3 s every 37 s
(epoch seconds = 13 mod 37, from FFmpeg's wall clock: every position in a minute), and
the looking
stand-in answering in 1 s. Time to incident = the completed_at of the job that first
stored the incident minus the event's wall-clock start; tokens per camera-hour = total
tokens of completed jobs over the footage seconds they cover. Defaults otherwise
(analysis.fps 0.5, static gating on).

prepare: CPU (user+sys of FFmpeg, via RUSAGE_CHILDREN) to prepare 10 minutes of
footage for the model, as ten 60-s windows (ffconcat lists of 2-s live segments) against
one 10-minute archive, with the same analyzer code (prepare_clip, gating on).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from daemon import free_port  # noqa: E402
from vlmguard.health import run_dir  # noqa: E402

# Every 37 s (epoch-based), so that events fall at every position within a minute.
PERIOD = 37
RED = f"between(mod(time(0),{PERIOD}),13,15.999)"
RED_CAMERA = ("lavfi:testsrc2=size=640x360:rate=25,drawbox=x=0:y=0:w=iw:h=ih:color=red:"
              f"t=fill:enable='{RED}'")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def io_of(pid: int) -> tuple[int, int] | None:
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(fields["write_bytes"]), int(fields["cancelled_write_bytes"])
    except (OSError, ValueError, KeyError):
        return None


def start_stand_in(delay: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gemini_server.py"), str(port),
                             str(delay), "looks"], stdout=subprocess.PIPE, text=True,
                            cwd=REPO / "tests")
    assert proc.stdout.readline().strip() == "ready"
    return proc, port


def write_config(folder: Path, gemini_port: int, camera: str, analysis: str,
                 archive_seconds: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(f"""
[server]
port = {free_port()}
[storage]
data_dir = "{folder / 'data'}"
segment_seconds = 2
archive_seconds = {archive_seconds}
min_free_gb = 0
[analysis]
workers = 1
{analysis}
[gemini]
base_url = "http://127.0.0.1:{gemini_port}"
timeout_seconds = 60
[[cameras]]
id = "cam1"
url = "{camera}"
""")
    return path


def start_daemon(config: Path, code: Path = REPO) -> subprocess.Popen:
    env = {**os.environ, "GEMINI_API_KEY": "test-key-123", "PYTHONPATH": str(code)}
    log = open(config.parent / "vlmguard.log", "a")
    return subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=code)


def ram_bytes(data_dir: Path) -> int | None:
    # A tree from before the state files moved to the RAM folder keeps them on disk.
    for folder in (run_dir(data_dir), data_dir / "run"):
        try:
            return json.loads((folder / "archiver.json").read_text()).get("ram_bytes")
        except (OSError, ValueError):
            continue
    return None


def disk(args) -> None:
    from stream_bench import make_1080p

    work = Path(tempfile.mkdtemp(prefix="nearlive-disk-"))
    source = work / "1080p.mp4"
    make_1080p(source, 60)
    stand_in, port = start_stand_in(1.0)
    code = Path(args.code).resolve() if args.code else REPO
    # An older checkout knows no window_seconds (and refuses unknown keys).
    config = write_config(work / "run", port, f"file://{source}",
                          "" if args.code else "window_seconds = 60", 60)
    daemon = start_daemon(config, code)
    written: dict[int, tuple[int, int]] = {}
    rams = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.seconds:
            for pid in descendants(daemon.pid):
                io = io_of(pid)
                if io is not None:
                    old = written.get(pid, (0, 0))
                    written[pid] = (max(old[0], io[0]), max(old[1], io[1]))
            ram = ram_bytes(work / "run" / "data")
            if ram is not None:
                rams.append(ram)
            time.sleep(0.25)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        stand_in.kill()
    data = work / "run" / "data"
    archives = sum(p.stat().st_size for p in (data / "archives").rglob("*") if p.is_file())
    partial = sum(p.stat().st_size for p in (data / "partial").rglob("*") if p.is_file())
    total = sum(w for w, _ in written.values())
    cancelled = sum(c for _, c in written.values())
    print(f"code: {code}  seconds: {args.seconds}  processes seen: {len(written)}")
    print(f"archive bytes: {archives}  (+ partial {partial})")
    print(f"write_bytes: {total}  cancelled_write_bytes: {cancelled}")
    print(f"write_bytes / archive bytes: {total / max(archives + partial, 1):.3f}")
    print(f"(write_bytes - cancelled) / archive bytes: "
          f"{(total - cancelled) / max(archives + partial, 1):.3f}")
    if rams:
        print(f"RAM folder (live + windows): median {statistics.median(rams) / 1e6:.1f} MB, "
              f"max {max(rams) / 1e6:.1f} MB")
    remove_work(work)


def remove_work(work: Path) -> None:
    """The bench's folder and the RAM folders of the data directories in it."""
    from vlmguard.layout import Layout
    for data in work.glob("*/data"):
        shutil.rmtree(Layout(data).ram, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def incidents(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="nearlive-incidents-"))
    stand_in, port = start_stand_in(1.0)
    runs = {}
    for window in (60, 0):
        config = write_config(work / f"w{window}", port, RED_CAMERA,
                              f"window_seconds = {window}", 600)
        runs[window] = (config, start_daemon(config))
    began = time.time()
    try:
        time.sleep(args.minutes * 60)
    finally:
        for _config, proc in runs.values():
            proc.send_signal(signal.SIGTERM)
        for _config, proc in runs.values():
            proc.wait(120)
        stand_in.kill()
    ended = time.time()
    for window, (config, _proc) in runs.items():
        db = sqlite3.connect(config.parent / "data" / "vlmguard.db")
        rows = db.execute("SELECT i.start_at, j.completed_at FROM incidents i JOIN analysis_jobs j "
                          "ON j.id = i.job_id").fetchall()
        jobs = db.execute("SELECT sum(total_tokens), sum((julianday(segment_end) - "
                          "julianday(segment_start)) * 86400), count(*) FROM analysis_jobs "
                          "WHERE status = 'completed'").fetchone()
        db.close()
        found = []
        for start_at, completed_at in rows:
            start = datetime.fromisoformat(start_at).replace(tzinfo=timezone.utc).timestamp()
            done = datetime.fromisoformat(completed_at).replace(tzinfo=timezone.utc).timestamp()
            event = round((start - 13) / PERIOD) * PERIOD + 13  # the event it is of
            if abs(start - event) < 5 and event > began + 10:
                found.append(done - event)
        events = len([t for t in range(int(began) + 11, int(ended)) if t % PERIOD == 13])
        tokens, seconds, count = jobs
        print(f"window_seconds = {window}: events {events}, incidents stored {len(found)}")
        if found:
            print(f"  time to incident: p50 {percentile(found, 50):.1f} s, p95 "
                  f"{percentile(found, 95):.1f} s, min {min(found):.1f} s, "
                  f"max {max(found):.1f} s")
        if seconds:
            print(f"  completed jobs {count}, tokens per camera-hour "
                  f"{(tokens or 0) / seconds * 3600:.0f} over {seconds:.0f} s of footage")
    remove_work(work)


def prepare(args) -> None:
    from vlmguard.analyzer import prepare_clip
    from vlmguard.config import AnalysisConfig
    from vlmguard.ffmpeg import concat_text

    work = Path(tempfile.mkdtemp(prefix="nearlive-prepare-"))
    seconds = 600
    archive = work / "20261126T080000Z.ts"
    live = work / "live"
    live.mkdir()
    # Ten minutes of a 1080p camera at ~4 Mbit/s, 2-s GOP: the archive and the same
    # stream cut as HLS segments (what a window is made of).
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                    f"testsrc2=size=1920x1080:rate=25:duration={seconds}", "-map", "0:v",
                    "-c:v", "libx264",
                    "-preset", "ultrafast", "-b:v", "4M", "-g", "50", "-pix_fmt", "yuv420p",
                    "-f", "tee", f"[f=mpegts]{archive}|[f=hls:hls_time=2:hls_list_size=0:"
                    f"hls_segment_filename={live}/seg-%d.ts]{live}/index.m3u8"], check=True)
    segments = sorted(live.glob("seg-*.ts"), key=lambda p: int(p.stem[4:]))
    analysis = AnalysisConfig()

    def cpu_of(make) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        make()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def windows():
        for n in range(seconds // 60):
            part = segments[n * 30:(n + 1) * 30]
            listing = live / f"w{n}.ffconcat"
            listing.write_text(concat_text([(p.name, 2.0, None, None) for p in part]))
            out = work / f"w{n}"
            out.mkdir()
            prepare_clip("ffmpeg", analysis, listing, out, frames=True)

    def whole():
        out = work / "whole"
        out.mkdir()
        prepare_clip("ffmpeg", analysis, archive, out, frames=True)

    runs = {"ten 60-s windows": [], "one 600-s archive": []}
    for _ in range(args.runs):
        runs["ten 60-s windows"].append(cpu_of(windows))
        runs["one 600-s archive"].append(cpu_of(whole))
        for path in work.iterdir():
            if path.is_dir() and path.name != "live":
                shutil.rmtree(path)
    for name, values in runs.items():
        print(f"{name}: CPU {statistics.median(values):.2f} s per 10 min of footage "
              f"(median of {len(values)}; {', '.join(f'{v:.2f}' for v in values)})")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("disk")
    d.add_argument("--seconds", type=int, default=180)
    d.add_argument("--code", default="")
    i = sub.add_parser("incidents")
    i.add_argument("--minutes", type=float, default=21)
    p = sub.add_parser("prepare")
    p.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    {"disk": disk, "incidents": incidents, "prepare": prepare}[args.mode](args)


if __name__ == "__main__":
    main()
