"""The console's Recordings view in Debian Chromium (Playwright), on one real `vlmguard run`
with two live cameras whose data dir also holds an hour-old stretch of footage made
faster than real time (footage_maker: every frame shows its wall-clock time, read back
here from the page's own <video> elements through a canvas).

dock-2 recorded T0..T0+8 min (its FFmpeg killed), again from T0+8:04 to T0+14, was down
until T0+16, then recorded until T0+20; gate recorded T0+1 min..T0+15. Two incidents are
stored before the daemon starts. The daemon's own live recording continues both cameras.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from vlmguard.config import load_config
from vlmguard.layout import Layout
from vlmguard.store.bundle import Store
from vlmguard.store.records import IncidentRecord, Outcome

from daemon import RunningVlmguard
from footage_maker import CLOCK_JS, GOP_SECONDS, frame_clocks, make_session

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

TOKEN = "recordings-console-token"
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
CAMERAS = """
[[cameras]]
id = "dock-2"
url = "lavfi:testsrc2=size=320x180:rate=10"
[[cameras]]
id = "gate"
url = "lavfi:testsrc=size=320x180:rate=10"
"""
# The wall-clock time the frame a camera's player shows carries (seconds since the epoch).
CLOCK_OF = """([camera, day]) => {
  const video = document.querySelector(`.rec-player[data-camera="${camera}"] video`);
  if (!video || video.readyState < 2) return null;
  const seconds = (%s)(video);
  return seconds === null ? null : day + seconds;
}""" % CLOCK_JS


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


class Scene:
    def __init__(self, daemon: RunningVlmguard, base: str, t0: datetime, incidents: dict):
        self.daemon = daemon
        self.base = base
        self.t0 = t0
        self.day = t0.replace(hour=0, minute=0, second=0).timestamp()
        self.incidents = incidents
        self.started = time.time()

    def at(self, minutes: float) -> datetime:
        return self.t0 + timedelta(minutes=minutes)

    def clock(self, page, camera: str) -> float | None:
        return page.evaluate(CLOCK_OF, [camera, self.day])

    def wait_clock(self, page, camera: str, near: datetime, within: float = 3.0,
                   timeout: float = 30) -> float:
        """Wait until the camera's player shows a frame within `within` s after `near`."""
        deadline = time.time() + timeout
        seen = None
        while time.time() < deadline:
            seen = self.clock(page, camera)
            if seen is not None and -GOP_SECONDS <= seen - near.timestamp() <= within:
                return seen
            time.sleep(0.2)
        shown = datetime.fromtimestamp(seen, timezone.utc) if seen else None
        raise AssertionError(f"{camera} shows {shown}, expected about {near}")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    directory = tmp_path_factory.mktemp("recordings-console")
    daemon = RunningVlmguard(directory, None, workers=0, cameras=CAMERAS, segment_seconds=2,
                             server=f'token = "{TOKEN}"',
                             extra='[providers.none]\nkind = "gemini"\nbase_url = "http://127.0.0.1:9"')
    config = load_config(daemon.config_path)
    layout = Layout(config.data_dir)
    t0 = (datetime.now(timezone.utc) - timedelta(minutes=50)).replace(second=0, microsecond=0)
    make_session(layout.archives("dock-2"), t0, 8 * 60, killed=True)
    make_session(layout.archives("dock-2"), t0 + timedelta(minutes=8, seconds=4), 356)
    make_session(layout.archives("dock-2"), t0 + timedelta(minutes=16), 4 * 60)
    make_session(layout.archives("gate"), t0 + timedelta(minutes=1), 14 * 60)
    incidents = {}
    with Store.from_config(config) as store:
        for camera, minute, severity in (("dock-2", 5, "high"), ("gate", 10, "medium")):
            when = t0 + timedelta(minutes=minute)
            store.queue.register(camera, f"/planted/{camera}.ts", when, when + timedelta(seconds=60))
            job = store.queue.claim("test")
            store.queue.complete(job, Outcome(result={}, safety_score=40, incidents=[IncidentRecord(
                when, when + timedelta(seconds=4), "fall", severity, f"planted on {camera}", 0.9)]))
            incidents[camera] = store.incidents.list_incidents(job.id)[0]["id"]
    daemon.start()
    try:
        for camera in ("dock-2", "gate"):
            daemon.wait_live(camera, timeout=60, token=TOKEN)
        yield Scene(daemon, f"http://127.0.0.1:{daemon.port}", t0, incidents)
    finally:
        daemon.kill()


@pytest.fixture(scope="module")
def page(scene):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        page = context.new_page()
        page.goto(scene.base + "/")
        page.wait_for_selector("#view-signin:not([hidden])")
        page.fill("#token", TOKEN)
        page.click("#signin-form button")
        page.wait_for_selector("#view-live:not([hidden])")
        try:
            yield page
        finally:
            browser.close()


def open_at(page, scene: Scene, cameras: str, when: datetime) -> None:
    page.evaluate("(hash) => { location.hash = hash; }",
                  f"#/recordings/{cameras}/{iso(when)}")
    page.wait_for_selector("#view-recordings:not([hidden]) .rec-player video")


def click_time(page, scene: Scene, camera: str, when: datetime) -> None:
    bar = page.locator(f'.rec-bar[data-camera="{camera}"]')
    box = bar.bounding_box()
    start, end = page.evaluate("() => window.vlmguardRecordings.range()")
    x = box["x"] + (when.timestamp() * 1000 - start) / (end - start) * box["width"]
    page.mouse.click(x, box["y"] + box["height"] / 2)


def test_two_cameras_play_in_step_and_jump(scene, page):
    open_at(page, scene, "dock-2,gate", scene.at(6))
    first = scene.wait_clock(page, "dock-2", scene.at(6))
    scene.wait_clock(page, "gate", datetime.fromtimestamp(first, timezone.utc), within=1.5)
    time.sleep(3)  # playing: both move on together
    dock, gate = scene.clock(page, "dock-2"), scene.clock(page, "gate")
    assert dock - first >= 2 and abs(dock - gate) <= 1.0
    assert page.locator("#rec-play").get_attribute("aria-pressed") == "true"
    page.click("#rec-fwd-min")
    moved = scene.wait_clock(page, "dock-2", datetime.fromtimestamp(dock + 60, timezone.utc))
    scene.wait_clock(page, "gate", datetime.fromtimestamp(moved, timezone.utc), within=1.5)
    page.click("#rec-back")
    scene.wait_clock(page, "dock-2", datetime.fromtimestamp(moved - 10, timezone.utc))
    # The timeline: spans per camera, the incidents, the playhead.
    assert page.locator('.rec-bar[data-camera="dock-2"] .rec-span').count() >= 3  # + live
    assert page.locator('.rec-bar[data-camera="dock-2"] .mark.sev-high').count() == 1
    assert page.locator('.rec-bar[data-camera="gate"] .mark.sev-medium').count() == 1


def test_click_on_the_timeline_plays_from_there_and_gaps_say_so(scene, page):
    open_at(page, scene, "dock-2,gate", scene.at(3))
    scene.wait_clock(page, "gate", scene.at(3))
    page.click('#rec-zoom button[data-zoom="hour"]')
    # dock-2 is down at T0+14:40, gate records until T0+15.
    click_time(page, scene, "gate", scene.at(14 + 40 / 60))
    clicked = page.evaluate("() => window.vlmguardRecordings.wall") / 1000
    assert abs(clicked - scene.at(14 + 40 / 60).timestamp()) < 10  # a pixel is ~3 s here
    scene.wait_clock(page, "gate", datetime.fromtimestamp(clicked, timezone.utc), within=3)
    note = page.locator('.rec-player[data-camera="dock-2"] .rec-note')
    assert "No recording at this time" in note.inner_text()
    # Hovering a recorded minute shows its picture.
    bar = page.locator('.rec-bar[data-camera="gate"]').bounding_box()
    page.mouse.move(bar["x"] + bar["width"] * 0.3, bar["y"] + 10)
    page.wait_for_function("() => { const i = document.querySelector('#rec-preview-image');"
                           " return !i.hidden && i.complete && i.naturalWidth === 160; }",
                           timeout=15000)
    assert not page.locator("#rec-preview").is_hidden()


def test_export_a_selection_and_take_screenshots(scene, page, tmp_path):
    open_at(page, scene, "dock-2,gate", scene.at(2))
    start = scene.wait_clock(page, "dock-2", scene.at(2))
    page.click("#rec-play")  # pause, so marks fall where asked
    page.wait_for_function("() => !window.vlmguardRecordings.playing")
    page.click('#rec-zoom button[data-zoom="hour"]')
    page.click("#rec-mark-in")
    marked = page.evaluate("() => window.vlmguardRecordings.selection[0]") / 1000
    for _ in range(3):
        page.click("#rec-fwd")
    page.wait_for_timeout(500)
    page.click("#rec-mark-out")
    assert "30 s" in page.inner_text("#rec-selection-text")
    # VLMGUARD_SCREENSHOTS=1 writes the README's pictures.
    out = SCREENSHOTS if os.environ.get("VLMGUARD_SCREENSHOTS") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "recordings-1280x800.png"), full_page=True)
    downloads = []
    page.on("download", lambda download: downloads.append(download))
    page.click("#rec-export")  # one MP4 per camera with footage in the selection
    deadline = time.time() + 60
    while len(downloads) < 2 and time.time() < deadline:
        page.wait_for_timeout(200)
    names = sorted(d.suggested_filename for d in downloads)
    assert [n.split("_")[0] for n in names] == ["dock-2", "gate"] and names[0].endswith(".mp4")
    video = tmp_path / "export.mp4"
    next(d for d in downloads if d.suggested_filename == names[0]).save_as(video)
    clocks = frame_clocks(str(video), datetime.fromtimestamp(scene.day, timezone.utc))
    assert None not in clocks
    assert 0 <= marked - clocks[0] <= GOP_SECONDS and abs(start - marked) < 5
    assert 30 <= clocks[-1] - clocks[0] + 0.1 <= 30 + GOP_SECONDS
    page.mouse.move(0, 0)  # no hover picture; and the export's toast gone
    page.wait_for_function("() => !document.querySelector('#toast').textContent", timeout=15000)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "recordings-390x844.png"), full_page=True)
    width, wider = page.evaluate("""() => [document.documentElement.scrollWidth,
        [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > 390)
          .map((e) => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`)]""")
    page.set_viewport_size({"width": 1280, "height": 800})
    assert width <= 390, wider  # nothing wider than the phone


def test_an_incident_opens_in_recordings_at_its_time(scene, page):
    page.evaluate("() => { location.hash = '#/incidents'; }")
    incident = scene.incidents["dock-2"]
    day = datetime.fromtimestamp(scene.day, timezone.utc).strftime("%Y-%m-%d")
    page.fill("#filters [name=from]", day)
    page.click("#filters button[type=submit]")
    page.click(f'[data-incident="{incident}"]')
    page.wait_for_selector("#incident-dialog[open]")
    page.click("#dialog-recordings")
    page.wait_for_selector("#view-recordings:not([hidden])")
    assert not page.locator("#incident-dialog").evaluate("d => d.open")
    scene.wait_clock(page, "dock-2", scene.at(5), within=4)


def test_footage_deleted_while_watched_ends_cleanly(scene, page):
    layout = Layout(scene.daemon.data_dir)
    files = sorted(layout.archives("dock-2").glob("*.ts"))
    boundary = next(p for p in files if p.stem > f"{scene.t0:%Y%m%dT%H%M%SZ}")
    ends = datetime.strptime(boundary.stem, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    # A minute before the boundary: hls.js buffers 30 s ahead, so the next file is not
    # loaded yet when retention deletes it; then played fast to that point.
    open_at(page, scene, "dock-2", ends - timedelta(seconds=60))
    scene.wait_clock(page, "dock-2", ends - timedelta(seconds=60))
    for path in files:
        if boundary.stem <= path.stem < f"{scene.t0 + timedelta(minutes=9):%Y%m%dT%H%M%SZ}":
            path.unlink()
    page.evaluate("() => { document.querySelector('.rec-player video').playbackRate = 4; }")
    note = page.locator('.rec-player[data-camera="dock-2"] .rec-note')
    note.wait_for(state="visible", timeout=40000)
    assert "deleted" in note.inner_text()
    last = scene.clock(page, "dock-2")
    # Played to the end of what was there (the last whole segment before the boundary).
    assert ends.timestamp() - 6.5 <= last < ends.timestamp()
    errors = [line for line in scene.daemon.log_text().splitlines() if '"level": "error"' in line
              and "recordings" in line]
    assert errors == []


def test_the_api_on_the_running_daemon_reaches_the_live_edge(scene):
    while time.time() - scene.started < 30:  # half a minute of the daemon's own footage
        time.sleep(1)
    now = datetime.now(timezone.utc)
    request = urllib.request.Request(
        f"{scene.base}/api/recordings?camera=gate&start={iso(now - timedelta(hours=2))}",
        headers={"Authorization": f"Bearer {TOKEN}"})
    report = json.load(urllib.request.urlopen(request, timeout=30))
    last = report["spans"][-1]
    assert last["live"] and report["live_edge"]
    edge = datetime.fromisoformat(report["live_edge"].replace("Z", "+00:00"))
    assert (now - edge).total_seconds() < 15  # the live playlist's end: a few segments back
    # An EVENT playlist from a minute ago grows as the daemon records.
    url = f"{scene.base}/api/recordings/gate/index.m3u8?start={iso(now - timedelta(minutes=1))}&token={TOKEN}"
    first = urllib.request.urlopen(url, timeout=30).read()
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(2)
        second = urllib.request.urlopen(url, timeout=30).read()
        if second.count(b"#EXTINF") > first.count(b"#EXTINF"):
            break
    assert b"#EXT-X-PLAYLIST-TYPE:EVENT" in first and b"#EXT-X-ENDLIST" not in second
    # Only ever appended to, the header (target duration included) unchanged.
    assert second.startswith(first[:first.rindex(b"#EXT-X-PROGRAM-DATE-TIME")]), (first, second)
    assert second.count(b"#EXTINF") > first.count(b"#EXTINF")
    # A player reads it (live to ffmpeg: it stops after 10 s of frames).
    proc = subprocess.run(["ffmpeg", "-v", "error", "-i", url, "-t", "10", "-f", "null", "-"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
