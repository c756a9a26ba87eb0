"""The web console's figures, by hand: python bench/console_bench.py [--quick]

Runs one real `vlmguard run` (4 lavfi cameras at 640x360, 15 fps, 2-s segments; the test
Gemini stand-in makes incidents) and headless Debian Chromium through Playwright, and prints
one JSON object:

- page weight: every file the console loads, gzip as served, and raw;
- time to the first video frame on loopback (fresh browser context each time, N runs);
- distance behind the live edge (end of the newest listed segment) after the tab was hidden
  60 s and shown again, and after a 30-s network outage (Playwright's offline emulation),
  sampled 1, 3 and 10 s after;
- with the console playing all 4 cameras for 60 s vs no console: the streaming process's CPU
  (from /proc, user+system) and a second player's (bench/hls_load.py) fetch p50/p99.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from daemon import RunningVlmguard  # noqa: E402
from gemini_server import FakeGemini  # noqa: E402

CAMERAS = "".join(f'[[cameras]]\nid = "cam{i}"\nurl = "lavfi:testsrc2=size=640x360:rate=15"\n'
                  for i in range(1, 5))
FILES = ["/", "/static/console.css", "/static/console.js", "/static/hls.light.min.js"]
BEHIND = """() => window.vlmguardConsole.players.map((p) => {
  const d = p.hls && p.hls.levels[p.hls.currentLevel]?.details;
  return d ? d.edge - p.video.currentTime : null; })"""
HIDE = """() => {
  Object.defineProperty(document, "visibilityState", {configurable: true,
                        get: () => window.__visibility || "visible"});
  Object.defineProperty(document, "hidden", {configurable: true,
                        get: () => (window.__visibility || "visible") === "hidden"});
  window.__visibility = "hidden";
  document.dispatchEvent(new Event("visibilitychange"));
  for (const video of document.querySelectorAll("video")) video.pause();
}"""
SHOW = """() => { window.__visibility = "visible";
                 document.dispatchEvent(new Event("visibilitychange")); }"""


def page_weight(base: str) -> dict:
    gz = raw = 0
    for path in FILES:
        for encoding in ("gzip", "identity"):
            request = urllib.request.Request(base + path, headers={"Accept-Encoding": encoding})
            with urllib.request.urlopen(request) as response:
                size = len(response.read())
            if encoding == "gzip":
                gz += size
            else:
                raw += size
    return {"files": len(FILES), "gzip_bytes": gz, "raw_bytes": raw}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks of 10 ms


def first_frame(browser, base: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        started = time.monotonic()
        page.goto(base + "/#/live")
        page.wait_for_function("() => window.vlmguardConsole.players.length &&"
                               " window.vlmguardConsole.players[0].video.currentTime > 0",
                               polling=20, timeout=60000)
        times.append(time.monotonic() - started)
        context.close()
    return times


def samples_after(page, offsets=(1, 3, 10)) -> dict:
    out, started = {}, time.monotonic()
    for offset in offsets:
        time.sleep(max(0.0, offset - (time.monotonic() - started)))
        out[f"{offset}s"] = [round(b, 2) if b is not None else None for b in page.evaluate(BEHIND)]
    return out


def second_player(base: str, data_dir: Path, seconds: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "bench" / "hls_load.py"), base,
                             str(data_dir), str(seconds), "1", "cam1"], stdout=subprocess.PIPE,
                            text=True)


def load_phase(daemon, base: str, seconds: int, page=None) -> dict:
    pid = daemon.child_pid("streamer")
    load = second_player(base, daemon.data_dir, seconds)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    if page is not None:
        page.wait_for_timeout(seconds * 1000)
    else:
        time.sleep(seconds)
    out = json.loads(load.communicate(timeout=seconds + 60)[0])
    cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    return {"streamer_cpu_percent": round(cpu * 100, 1), "second_player": out}


def main() -> None:
    quick = "--quick" in sys.argv
    runs, load_seconds = (2, 20) if quick else (5, 60)
    directory = Path(tempfile.mkdtemp(prefix="console-bench-"))
    result: dict = {"machine": "2-core VM, shared", "cameras": "4 x lavfi 640x360 15 fps, 2-s segments"}
    with FakeGemini() as gemini, sync_playwright() as playwright:
        daemon = RunningVlmguard(directory, gemini.base_url, workers=1, cameras=CAMERAS,
                                 segment_seconds=2).start()
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            for i in range(1, 5):
                daemon.wait_live(f"cam{i}", timeout=60)
            base = f"http://127.0.0.1:{daemon.port}"
            time.sleep(5)
            result["page_weight"] = page_weight(base)
            frames = first_frame(browser, base, runs)
            result["first_frame_s"] = {"runs": [round(t, 2) for t in frames],
                                       "median": round(statistics.median(frames), 2)}
            result["no_console"] = load_phase(daemon, base, load_seconds)
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(base + "/#/live")
            page.wait_for_function("() => window.vlmguardConsole.players.length === 4 &&"
                                   " window.vlmguardConsole.players.every(p => p.video.currentTime > 0)",
                                   timeout=60000)
            result["console_4_cameras"] = load_phase(daemon, base, load_seconds, page)
            result["behind_edge_before_s"] = [round(b, 2) for b in page.evaluate(BEHIND)]
            page.evaluate(HIDE)
            page.wait_for_timeout(60_000)
            page.evaluate(SHOW)
            result["behind_edge_after_hidden_60s"] = samples_after(page)
            context.set_offline(True)
            page.wait_for_timeout(30_000)
            context.set_offline(False)
            result["behind_edge_after_offline_30s"] = samples_after(page)
            context.close()
        finally:
            browser.close()
            daemon.kill()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
