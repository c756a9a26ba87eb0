"""Watch a running `vlmguard run` through a fault: what a viewer and an operator would see.

LiveWatch samples once a second, from a thread of its own, until stopped:
- the live playlist of a camera: its HTTP status and its newest segment, so that a
  second without a 200, or with a playlist that did not move on for longer than
  stale_after seconds, counts as a second of live video lost;
- every process under the supervisor, from /proc: pid and resident memory by name
  (supervisor, streamer, archiver, analyzer-N, notifier, ffmpeg), keeping the peak.

Used by the fault tests (tests/test_outages.py) and the fault bench (bench/faults_bench.py).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from helpers.processes import descendants


@dataclass
class Sample:
    at: float
    status: int | None
    newest: str | None


@dataclass
class LiveWatch:
    url: str
    root_pid: int
    every: float = 1.0
    stale_after: float = 4.0
    samples: list[Sample] = field(default_factory=list)
    peak_rss_kb: dict[str, int] = field(default_factory=dict)
    pids: dict[str, set[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True, name="live-watch")

    def __enter__(self) -> "LiveWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(10)

    def loop(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            self.samples.append(self.sample_playlist())
            self.sample_processes()
            self.stopping.wait(max(self.every - (time.monotonic() - started), 0.0))

    def sample_playlist(self) -> Sample:
        now = time.time()
        try:
            with urllib.request.urlopen(self.url, timeout=self.every) as response:
                text = response.read().decode(errors="replace")
                segments = [line for line in text.splitlines()
                            if line and not line.startswith("#")]
                return Sample(now, response.status, segments[-1] if segments else None)
        except urllib.error.HTTPError as exc:
            return Sample(now, exc.code, None)
        except OSError:
            return Sample(now, None, None)

    def sample_processes(self) -> None:
        for pid in [self.root_pid, *descendants(self.root_pid)]:
            name = process_name(pid, self.root_pid)
            rss = rss_kb(pid)
            if name is None or rss is None:
                continue
            self.pids.setdefault(name, set()).add(pid)
            self.peak_rss_kb[name] = max(self.peak_rss_kb.get(name, 0), rss)

    # -- what the samples say -----------------------------------------------------------------

    def seconds_lost(self) -> int:
        """Samples (one a second) at which a player got no fresh live video: no 200, or a
        newest segment that had not changed for more than stale_after seconds."""
        lost, last_change, last_newest = 0, None, None
        for sample in self.samples:
            if sample.status != 200 or sample.newest is None:
                lost += 1
                continue
            if sample.newest != last_newest:
                last_newest, last_change = sample.newest, sample.at
            elif last_change is not None and sample.at - last_change > self.stale_after:
                lost += 1
        return lost

    def not_ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status != 200]


def process_name(pid: int, root: int) -> str | None:
    if pid == root:
        return "supervisor"
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return "ffmpeg" if name.startswith("ffmpeg") else name


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
