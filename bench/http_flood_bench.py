"""Can clients stop recording? The streaming process under a connection flood (issue 12).

Run by hand (needs wrk: apt-get install -y wrk):
    .venv/bin/python bench/http_flood_bench.py [--seconds 30] [--idle 2000] [--wrk 200] [--players 4]

One real streaming process (the shipped demo camera: FFmpeg's lavfi test source encoded
with libx264, 2 s segments, 10 s archives so a short run closes some), started at systemd's
default soft limit of 1,024 open files (hard limit left as it is, or --hard), then:
  held      open --idle connections one after another and send nothing; count how many
            the server still holds a second later, and whether a player still gets in;
  no load   --players player-like clients (bench/hls_load.py: playlist every half target
            duration, each new segment) for --seconds;
  load      the same players while --idle idle connections are held (each one reopened as
            soon as the server closes it) and wrk hammers the playlist with --wrk
            keep-alive connections.
Per phase: playlist and segment fetch p50/p99 of the players, player errors, wrk's
requests/s, archives closed, FFmpeg's speed (content seconds per wall second), FFmpeg
restarts, the streamer's peak open files. Prints one JSON object and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from vlmguard.health import run_dir

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STREAMER = ("import sys; from vlmguard import streamer; from vlmguard.config import load_config; "
            "streamer.main(load_config(sys.argv[1]))")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_soft_limit(hard: int | None) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (1024, hard or resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return limit


def start_streamer(directory: Path, hard: int | None) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    data_dir = directory / "data"
    config = directory / "config.toml"
    config.write_text(f"""
[server]
port = {port}
[storage]
data_dir = "{data_dir}"
archive_seconds = 10
[[cameras]]
id = "demo"
url = "lavfi:testsrc2=size=640x360:rate=25"
""")
    log = open(directory / "streamer.log", "w")
    proc = subprocess.Popen([PYTHON, "-c", STREAMER, str(config)], stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=default_soft_limit(hard), cwd=REPO)
    return proc, port, data_dir


def wait_live(port: int, timeout: float = 60) -> None:
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/live/demo/index.m3u8",
                                        timeout=2) as response:
                if b"seg-" in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the camera never went live")


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


def held_connections(port: int, count: int) -> dict:
    """Open count idle connections; how many does the server still hold a second later?"""
    default_soft_limit_raised()
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    time.sleep(1.0)
    held = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            closed = sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        held += not closed
    import urllib.request
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/live/demo/index.m3u8", timeout=10) as r:
        player_status = r.status
    player_ms = (time.perf_counter() - started) * 1000
    for sock in socks:
        sock.close()
    return {"opened": len(socks), "held": held, "player_status": player_status,
            "player_ms": round(player_ms, 1)}


def default_soft_limit_raised() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def idle_flood(port: int, count: int, seconds: float, stats: dict) -> None:
    """count connections that send nothing; each is reopened once the server closes it."""
    deadline = time.monotonic() + seconds

    async def one():
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.1)
                continue
            stats["connects"] += 1
            try:
                await asyncio.wait_for(reader.read(), deadline - time.monotonic())
                stats["closed_by_server"] += 1
            except (asyncio.TimeoutError, OSError):
                pass
            writer.close()
    await asyncio.gather(*(one() for _ in range(count)))


def run_idle_flood(port: int, count: int, seconds: float, stats: dict) -> threading.Thread:
    default_soft_limit_raised()
    thread = threading.Thread(target=lambda: asyncio.run(idle_flood(port, count, seconds, stats)))
    thread.start()
    return thread


def run_players(port: int, data_dir: Path, seconds: float, players: int) -> dict:
    out = subprocess.run([PYTHON, str(REPO / "bench" / "hls_load.py"), f"http://127.0.0.1:{port}",
                          str(data_dir), str(seconds), str(players), "demo"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"hls_load.py failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def run_wrk(port: int, connections: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s",
                             f"http://127.0.0.1:{port}/live/demo/index.m3u8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wrk_figures(text: str) -> dict:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    return {"requests_per_s": float(rps.group(1)) if rps else None,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else None}


def archives(data_dir: Path) -> int:
    return len(list((data_dir / "closed").glob("*/*.ts"))) + len(list((data_dir / "closed").glob("*.ts")))


def ffmpeg_restarts(data_dir: Path) -> int:
    try:
        state = json.loads((run_dir(data_dir) / "streamer.json").read_text())
        return state["cameras"]["demo"]["restarts"]
    except (OSError, ValueError, KeyError):
        return -1


def listen_overflows() -> int:
    """The host's count of connections dropped because a listen queue was full (SYN retried
    a second later by the client)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split()))["ListenOverflows"])
    return -1


def phase(name: str, proc, port: int, data_dir: Path, args, loaded: bool) -> dict:
    before = archives(data_dir)
    overflows = listen_overflows()
    peak = {"fds": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.5) and proc.poll() is None:
            peak["fds"] = max(peak["fds"], open_files(proc.pid))
    sampler = threading.Thread(target=sample)
    sampler.start()
    flood_stats = {"connects": 0, "closed_by_server": 0, "connect_errors": 0}
    flood = wrk = None
    if loaded:
        flood = run_idle_flood(port, args.idle, args.seconds + 4, flood_stats)
        time.sleep(2)  # the idle connections are in place before the players start
        wrk = run_wrk(port, args.wrk, args.seconds)
    players = run_players(port, data_dir, args.seconds, args.players)
    result = {"phase": name, "players": players}
    if loaded:
        result["wrk"] = wrk_figures(wrk.communicate()[0])
        flood.join()
        result["idle_flood"] = flood_stats
    done.set()
    sampler.join()
    result.update(archives_closed=archives(data_dir) - before, ffmpeg_restarts=ffmpeg_restarts(data_dir),
                  listen_overflows=listen_overflows() - overflows,
                  streamer_alive=proc.poll() is None, streamer_peak_open_files=peak["fds"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--wrk", type=int, default=200)
    parser.add_argument("--players", type=int, default=4)
    parser.add_argument("--hard", type=int, help="hard open-file limit for the streamer "
                        "(default: as it is); 1024 leaves it no room to raise its soft one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, data_dir = start_streamer(Path(tmp), args.hard)
        try:
            wait_live(port)
            report = {"streamer_soft_open_files": soft_limit(proc.pid),
                      "held": held_connections(port, args.idle)}
            time.sleep(2)
            report["no_load"] = phase("no load", proc, port, data_dir, args, loaded=False)
            report["load"] = phase("load", proc, port, data_dir, args, loaded=True)
            log = (Path(tmp) / "streamer.log").read_text()
            report["log_emfile"] = log.count("Too many open files")
            report["log_tracebacks"] = log.count("Traceback")
        finally:
            if proc.poll() is not None:
                print((Path(tmp) / "streamer.log").read_text()[-3000:], file=sys.stderr)
            proc.terminate()
            proc.wait(30)
    print(json.dumps(report))
    print(table(report, args))


def table(report: dict, args) -> str:
    rows = ["| phase | playlist p50 / p99 ms | segment p50 / p99 ms | player errors | wrk req/s "
            "| archives closed | FFmpeg speed | FFmpeg restarts | peak open files | listen overflows |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("no_load", "load"):
        r = report[key]
        p = r["players"]
        wrk = r.get("wrk", {}).get("requests_per_s", "-")
        rows.append(f"| {r['phase']} | {p['playlist_ms']['p50']} / {p['playlist_ms']['p99']} "
                    f"| {p['segment_ms']['p50']} / {p['segment_ms']['p99']} | {p['errors']} | {wrk} "
                    f"| {r['archives_closed']} | {p['ffmpeg_speed']} | {r['ffmpeg_restarts']} "
                    f"| {r['streamer_peak_open_files']} | {r['listen_overflows']} |")
    held = report["held"]
    rows.append(f"\nheld: {held['held']} of {held['opened']} idle connections "
                f"(soft open-file limit after start: {report['streamer_soft_open_files']}); "
                f"a player meanwhile: HTTP {held['player_status']} in {held['player_ms']} ms")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
