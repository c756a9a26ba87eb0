"""Resident memory of the whole daemon, process by process.

Run by hand (after tests/run.sh has installed ffmpeg):
    .venv/bin/python bench/memory_bench.py [--cameras 4] [--workers 2] [--samples 5]

Starts `vlmguard run` with N copied 1080p ~4 Mbit/s cameras (a file looped in real time)
and W analysis processes against the Gemini test server (answering after 3 s). Samples
PSS (shared pages split between the processes sharing them, so the sum is the real
footprint) and RSS of every process under the supervisor: first at steady state with an
empty queue, then with a backlog of 10-minute archives keeping every analyzer busy
(preparing its copy with FFmpeg, uploading, waiting). Prints the median of the samples
per role, and the median and the largest total.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
from analysis_bench import ARCHIVE, make_archive  # noqa: E402
from daemon import free_port  # noqa: E402
from isolation_bench import SOURCE, backlog, register_backlog, wait_live, write_config  # noqa: E402
from stream_bench import make_1080p  # noqa: E402
from test_supervisor import descendants  # noqa: E402

from vlmguard.config import load_config  # noqa: E402
from vlmguard.health import read_states  # noqa: E402

PYTHON = sys.executable


def smaps(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def role_of(pid: int, supervisor: int, roles: dict[int, str]) -> str:
    if pid == supervisor:
        return "supervisor"
    if pid in roles:
        return roles[pid]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    if "ffmpeg" in cmdline.split(" ", 1)[0] or "setpriv" in cmdline:
        return "ffmpeg (analysis copy)" if "-skip_frame" in cmdline else "ffmpeg (camera)"
    for marker in ("forkserver", "resource_tracker"):
        if marker in cmdline:
            return marker.replace("_", " ")
    return "other"


def sample(supervisor: int, data_dir: Path) -> dict[str, list[int]]:
    """{role: [pss kB, rss kB, process count]} for one moment."""
    children = read_states(data_dir).get("supervisor", {}).get("children", {})
    roles = {c["pid"]: name.split("-")[0] for name, c in children.items() if c.get("pid")}
    totals: dict[str, list[int]] = {}
    for pid in {supervisor} | descendants(supervisor):
        try:
            rss, pss = smaps(pid)
            role = role_of(pid, supervisor, roles)
        except OSError:
            continue
        entry = totals.setdefault(role, [0, 0, 0])
        entry[0] += pss
        entry[1] += rss
        entry[2] += 1
    return totals


def measure(supervisor: int, data_dir: Path, samples: int, every: float) -> dict[str, dict]:
    taken = []
    for _ in range(samples):
        taken.append(sample(supervisor, data_dir))
        time.sleep(every)
    roles = sorted({role for s in taken for role in s})
    result = {}
    for role in roles:
        rows = [s.get(role, [0, 0, 0]) for s in taken]
        result[role] = {"pss_mb": round(statistics.median(r[0] for r in rows) / 1024, 1),
                        "rss_mb": round(statistics.median(r[1] for r in rows) / 1024, 1),
                        "processes": max(r[2] for r in rows)}
    totals = [[sum(r[i] for r in s.values()) for s in taken] for i in range(3)]
    result["total"] = {"pss_mb": round(statistics.median(totals[0]) / 1024, 1),
                       "rss_mb": round(statistics.median(totals[1]) / 1024, 1),
                       "processes": max(totals[2])}
    result["largest total"] = {"pss_mb": round(max(totals[0]) / 1024, 1),
                               "rss_mb": round(max(totals[1]) / 1024, 1),
                               "processes": max(totals[2])}
    return result


def print_table(title: str, result: dict[str, dict]) -> None:
    print(f"\n{title}\n\n| process | count | PSS MB | RSS MB |\n|---|---|---|---|")
    for role, row in result.items():
        name = f"**{role}**" if "total" in role else role
        print(f"| {name} | {row['processes']} | {row['pss_mb']} | {row['rss_mb']} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--settle", type=float, default=40, help="seconds before sampling")
    args = parser.parse_args()
    make_1080p(SOURCE)
    make_archive()
    gemini_port = free_port()
    gemini = subprocess.Popen([PYTHON, str(REPO / "tests" / "gemini_server.py"), str(gemini_port), "3"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO / "tests")
    assert gemini.stdout.readline().strip() == "ready"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config_path = write_config(directory, args.cameras, args.workers, gemini_port)
        config = load_config(config_path)
        env = {**os.environ, "GEMINI_API_KEY": "test-key-123"}
        daemon = subprocess.Popen([PYTHON, "-m", "vlmguard", "run", "--config", str(config_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_live(f"http://127.0.0.1:{config.server.port}/live/cam1/index.m3u8")
            time.sleep(args.settle)
            steady = measure(daemon.pid, config.data_dir, args.samples, 1)
            register_backlog(config_path, backlog(directory, 50, ARCHIVE))
            time.sleep(5)  # every analyzer has claimed a job
            busy = measure(daemon.pid, config.data_dir, args.samples, 1)
        finally:
            daemon.terminate()
            daemon.wait(120)
            gemini.kill()
    print(json.dumps({"steady": steady, "analysing": busy}))
    what = f"{args.cameras} cameras (1080p ~4 Mbit/s, copied), {args.workers} analyzers"
    print_table(f"Steady state, {what}, median of {args.samples} samples:", steady)
    print_table(f"Analysing (every analyzer busy), {what}, median of {args.samples} samples:", busy)


if __name__ == "__main__":
    main()
