"""Hostile clients against a running daemon (issue 20): what each fault costs the video.

    .venv/bin/python bench/hostile_clients_bench.py [--base DIR] [--fault-seconds 30]

Faults, each against `vlmguard run` with a noisy 320x240 lavfi camera (about 4 Mbit/s,
1-s segments, 10-s archives) and a token:
  slow-clip    two clients ask for the whole recording as a clip and then read nothing,
               while a third asks for the same clip again and again (4 s between tries);
  brute-force  four connections from 127.0.0.3 POST wrong tokens to /api/session;
  huge-webhook the stand-in Gemini finds an incident in every 10-s archive, and the
               alert rule's webhook answers each delivery with a 400 MB body.
For each: seconds of live video lost (0.5-s playlist samples from 127.0.0.1 that failed,
or whose newest segment was older than 3 s), archives missing (10-s clock slots inside
the fault window with no file), the peak RSS (VmHWM) of the streaming process and of the
notifier, and the fault's own figures (time until the third client's clip, wrong tokens
checked a second, bytes of each 400 MB answer the receiver got out).

--base DIR runs the same faults first against another source tree (e.g. `git archive
<commit> vlmguard | tar -x -C DIR`), so before and after come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from daemon import free_port  # noqa: E402
from vlmguard.health import run_dir  # noqa: E402
from gemini_server import FakeGemini  # noqa: E402
from test_hostile_clients import (TOKEN, HostileReceiver, guess_tokens, request,  # noqa: E402
                                  stalled_reader, status_of)

CAMERA = "lavfi:testsrc2=size=320x240:rate=25,noise=alls=20:allf=t"
SAMPLE_SECONDS = 0.5
STALE_SECONDS = 3.0


class Daemon:
    """`vlmguard run` from a given source tree (its folder first on sys.path)."""

    def __init__(self, directory: Path, code: Path, gemini_url: str, workers: int, alerts: str):
        self.port = free_port()
        self.data_dir = directory / "data"
        self.code = code
        self.log_path = directory / "vlmguard.log"
        self.config_path = directory / "config.toml"
        self.config_path.write_text(f"""
[server]
port = {self.port}
token = "{TOKEN}"
[storage]
data_dir = "{self.data_dir}"
segment_seconds = 1
archive_seconds = 10
[analysis]
workers = {workers}
window_seconds = 0
poll_seconds = 0.5
[gemini]
base_url = "{gemini_url}"
{alerts}
[[cameras]]
id = "cam1"
url = "{CAMERA}"
""")

    def start(self) -> "Daemon":
        env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "PYTHONPATH")}
        env.update(GEMINI_API_KEY="test-key-123", PYTHONPATH=str(self.code))
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config",
                                      str(self.config_path)], cwd=self.code, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while playlist(self.port)[0] != 200:
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"never went live:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        return self

    def pid(self, name: str) -> int | None:
        # A tree from before the state files moved to the RAM folder keeps them on disk.
        for folder in (run_dir(self.data_dir), self.data_dir / "run"):
            try:
                return json.loads((folder / f"{name}.json").read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
        return None

    def peak_rss_mb(self, name: str) -> float | None:
        pid = self.pid(name)
        try:
            return round(status_of(pid, "VmHWM") / 1024, 1) if pid else None
        except (OSError, AttributeError):
            return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        ram = list(Path("/dev/shm").glob(f"vlmguard-{os.getuid()}-*"))
        for folder in ram:
            try:
                if (folder / "data_dir.txt").read_text() == str(self.data_dir):
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass


def playlist(port: int) -> tuple[int, str]:
    try:
        status, _, body = request(port, "GET", f"/live/cam1/index.m3u8?token={quote(TOKEN)}",
                                  timeout=5)
        return status, body.decode(errors="replace")
    except OSError:
        return 0, ""


class LiveWatch(threading.Thread):
    """Samples the live playlist; a sample is lost when it failed or its newest segment
    (EXT-X-PROGRAM-DATE-TIME plus its length) is more than STALE_SECONDS old."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            at = time.time()
            status, text = playlist(self.port)
            self.samples.append((at, status == 200 and fresh(text, at)))
            self.halt.wait(max(0.0, SAMPLE_SECONDS - (time.time() - at)))

    def lost_seconds(self, start: float, end: float) -> float:
        return sum(SAMPLE_SECONDS for at, ok in self.samples if start <= at < end and not ok)


def fresh(text: str, at: float) -> bool:
    stamps = re.findall(r"#EXT-X-PROGRAM-DATE-TIME:(\S+)", text)
    if not stamps:
        return False
    newest = datetime.strptime(stamps[-1].replace("+0000", "+00:00"), "%Y-%m-%dT%H:%M:%S.%f%z")
    return at - newest.timestamp() - 1.0 <= STALE_SECONDS


def archives_missing(data_dir: Path, start: float, end: float) -> int:
    present = set()
    for stage in ("archives", "closed", "partial"):
        for path in (data_dir / stage / "cam1").glob("*Z.ts"):
            stamp = datetime.strptime(path.name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
            present.add(int(stamp.timestamp()))
    slots = range((int(start) // 10 + 1) * 10, int(end) // 10 * 10, 10)  # whole slots only
    return sum(1 for slot in slots if slot not in present)


def measured(daemon: Daemon, watch: LiveWatch, start: float, end: float, role: str) -> dict:
    time.sleep(12)  # the window's last archive is handed over
    return {"live_lost_s": watch.lost_seconds(start, end),
            "archives_missing": archives_missing(daemon.data_dir, start, end),
            **{f"{name}_peak_rss_mb": daemon.peak_rss_mb(name) for name in {"streamer", role}}}


def slow_clip(daemon: Daemon, watch: LiveWatch, seconds: float, started: datetime) -> dict:
    path = (f"/api/clip?camera=cam1&start={started:%Y-%m-%dT%H:%M:%SZ}&duration=600"
            f"&token={quote(TOKEN)}")
    size = len(request(daemon.port, "GET", path, timeout=120)[2])
    start = time.time()
    stalled = [stalled_reader(daemon.port, path) for _ in range(2)]
    time.sleep(2)
    tries, served_after = [], None
    while time.time() - start < seconds:
        try:
            status = request(daemon.port, "GET", path, timeout=120)[0]
        except OSError:
            status = 0
        tries.append(status)
        if status == 200 and served_after is None:
            served_after = round(time.time() - start, 1)
        time.sleep(4)
    end = time.time()
    for sock in stalled:
        sock.close()
    return {"clip_mb": round(size / 2**20, 1), "third_client_served_after_s": served_after,
            "third_client_503s": tries.count(503), "third_client_tries": len(tries),
            **measured(daemon, watch, start, end, "streamer")}


def brute_force(daemon: Daemon, watch: LiveWatch, seconds: float) -> dict:
    start = time.time()
    results = guess_tokens(daemon.port, "127.0.0.3", seconds)
    end = time.time()
    return {"requests_per_s": round(len(results) / (end - start)),
            "wrong_tokens_checked_per_s": round(results.count(401) / (end - start), 2),
            "wrong_tokens_checked": results.count(401), "refused_429": results.count(429),
            **measured(daemon, watch, start, end, "streamer")}


def huge_webhook(daemon: Daemon, watch: LiveWatch, seconds: float,
                 receiver: HostileReceiver) -> dict:
    start = time.time()
    first = len(receiver.bytes_sent)
    time.sleep(seconds)
    end = time.time()
    sent = receiver.bytes_sent[first:]
    delivered = sum(1 for line in daemon.log_path.read_text().splitlines()
                    if '"alert delivered"' in line)
    return {"deliveries_answered": len(sent), "alerts_delivered_in_log": delivered,
            "answer_mb_sent_median": round(sorted(sent)[len(sent) // 2] / 2**20, 1) if sent else None,
            **measured(daemon, watch, start, end, "notifier")}


def run_version(label: str, code: Path, args, gemini: FakeGemini) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix=f"vlmguard-bench-{label}-") as tmp:
        (Path(tmp) / "a").mkdir()
        daemon = Daemon(Path(tmp) / "a", code, gemini.base_url, workers=0, alerts="")
        started = datetime.now(timezone.utc)
        daemon.start()
        watch = LiveWatch(daemon.port)
        watch.start()
        time.sleep(2)
        streamer = daemon.pid("streamer")
        try:
            time.sleep(23)  # footage for the clip, and a quiet baseline
            quiet_end = time.time()
            results["quiet_baseline"] = measured(daemon, watch, quiet_end - 15, quiet_end,
                                                 "streamer")
            print(label, "quiet", results["quiet_baseline"], flush=True)
            results["slow_clip"] = slow_clip(daemon, watch, args.fault_seconds, started)
            print(label, "slow_clip", results["slow_clip"], flush=True)
            results["brute_force"] = brute_force(daemon, watch, args.fault_seconds)
            print(label, "brute_force", results["brute_force"], flush=True)
            results["streamer_pid_kept"] = streamer is not None and daemon.pid("streamer") == streamer
        finally:
            watch.halt.set()
            daemon.stop()
        with HostileReceiver(answer_bytes=400 << 20) as receiver:
            (Path(tmp) / "b").mkdir()
            alerts = (f'[[alerts.rules]]\nname = "site"\nmin_severity = "high"\n'
                      f'cooldown_seconds = 0\nwebhooks = ["{receiver.url}"]\n')
            daemon = Daemon(Path(tmp) / "b", code, gemini.base_url, workers=1, alerts=alerts)
            daemon.start()
            watch = LiveWatch(daemon.port)
            watch.start()
            try:
                time.sleep(12)  # the first archive and its job
                results["huge_webhook"] = huge_webhook(daemon, watch, args.fault_seconds, receiver)
                print(label, "huge_webhook", results["huge_webhook"], flush=True)
            finally:
                watch.halt.set()
                daemon.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="a source tree to measure first (before)")
    parser.add_argument("--fault-seconds", type=float, default=30)
    args = parser.parse_args()
    versions = ([("before", args.base.resolve())] if args.base else []) + [("after", REPO)]
    out = {"machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"}
    with FakeGemini() as gemini:
        for label, code in versions:
            out[label] = run_version(label, code, args, gemini)
    out["load_at_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
