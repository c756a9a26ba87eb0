"""The web console in a real browser: headless Debian Chromium driven by Playwright, against
one real `vlmguard run` (two cameras, the stand-in Gemini making an incident per archive)
shared by every test here.

Page A (the live grid) is hidden early and shown again last, so its 60 hidden seconds
pass while page B checks incidents, clips, acknowledgement and CSRF.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from daemon import RunningVlmguard
from gemini_server import FakeGemini

TOKEN = "console-test-token"
CHROMIUM = "/usr/bin/chromium"
SEGMENT_SECONDS = 2
HIDDEN_SECONDS = 60
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
CAMERAS = """
[[cameras]]
id = "gate"
url = "lavfi:testsrc2=size=320x240:rate=10"
[[cameras]]
id = "loading-bay"
url = "lavfi:testsrc=size=320x240:rate=10"
"""
# A tab in the background: the page is told it is hidden, and the browser pauses its
# muted video as Chrome does. Only the console's own handler can bring it back.
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
# The live edge: the end of the newest segment the playlist lists. hls.js's own latency
# adds the playlist's age since it was loaded; the wall-clock delay adds FFmpeg's too.
LIVE_EDGE = """() => {
  const player = window.vlmguardConsole.players[0];
  const details = player.hls.levels[player.hls.currentLevel]?.details;
  return {behind: details ? details.edge - player.video.currentTime : null,
          latency: player.hls.latency, target: details ? details.targetduration : null,
          wall: player.hls.playingDate ? (Date.now() - player.hls.playingDate) / 1000 : null,
          time: player.video.currentTime, paused: player.video.paused};
}"""


class Console:
    def __init__(self, daemon: RunningVlmguard, browser, base: str):
        self.daemon = daemon
        self.browser = browser
        self.base = base
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.live = self.context.new_page()  # page A
        self.incidents = self.context.new_page()  # page B
        self.hidden_at: float | None = None

    def api(self, path: str) -> dict:
        response = self.context.request.get(self.base + path)
        assert response.ok, (path, response.status)
        return response.json()


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    directory = tmp_path_factory.mktemp("console")
    with FakeGemini() as gemini, sync_playwright() as playwright:
        daemon = RunningVlmguard(directory, gemini.base_url, workers=1, cameras=CAMERAS,
                                 segment_seconds=SEGMENT_SECONDS,
                                 server=f'token = "{TOKEN}"').start()
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            for camera in ("gate", "loading-bay"):
                wait_live(daemon, camera)
            yield Console(daemon, browser, f"http://127.0.0.1:{daemon.port}")
        finally:
            browser.close()
            daemon.kill()


def wait_live(daemon: RunningVlmguard, camera: str, timeout: float = 40) -> None:
    import urllib.request
    url = f"{daemon.url(camera)}?token={TOKEN}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if b".ts" in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{camera} never went live:\n{daemon.log_text()[-3000:]}")


def sign_in(page, base: str) -> None:
    page.goto(base + "/")
    page.wait_for_selector("#view-signin:not([hidden])")
    page.fill("#token", "wrong")
    page.click("#signin-form button")
    page.wait_for_selector("#signin-error:has-text('Wrong token')")
    page.fill("#token", TOKEN)
    page.click("#signin-form button")
    page.wait_for_selector("#view-live:not([hidden]) .tile video")


def test_sign_in_then_live_video_plays_20_s_without_a_stall(console):
    page = console.live
    sign_in(page, console.base)
    [cookie] = [c for c in console.context.cookies() if c["name"] == "vlmguard_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > time.time()
    assert page.locator(".tile").count() == 2
    page.wait_for_function("() => window.vlmguardConsole.players[0].video.currentTime > 0",
                           timeout=30000)
    page.evaluate("""() => { const v = window.vlmguardConsole.players[0].video;
                             window.__stalls = 0; window.__start = v.currentTime;
                             v.addEventListener("waiting", () => { window.__stalls += 1; }); }""")
    page.wait_for_function("() => window.vlmguardConsole.players[0].video.currentTime"
                           " >= window.__start + 20", timeout=40000, polling=500)
    assert page.evaluate("() => window.__stalls") == 0
    # Without a stall the player stays at the seed's 3 s from the live edge.
    edge = page.evaluate(LIVE_EDGE)
    assert edge["behind"] <= 3 * edge["target"], edge


def test_live_tab_goes_to_the_background(console):
    """Hidden from here until the last test: the player stops loading and is paused."""
    console.live.evaluate(HIDE)
    console.hidden_at = time.monotonic()
    state = console.live.evaluate(LIVE_EDGE)
    assert state["paused"]


def newest_incident_id(console) -> int:
    found = console.api("/api/incidents?limit=1")["incidents"]
    return found[0]["id"] if found else 0


def test_a_stored_incident_appears_within_2_s_without_reload(console):
    page = console.incidents
    page.goto(console.base + "/#/incidents")
    page.wait_for_selector("#view-incidents:not([hidden])")
    page.wait_for_function("() => document.querySelector('#connection').textContent"
                           ".includes('on')", timeout=10000)
    page.evaluate("() => { window.__not_reloaded = true; }")
    before = newest_incident_id(console)
    deadline = time.monotonic() + 60
    while (newest := newest_incident_id(console)) == before:
        assert time.monotonic() < deadline, "the analyzer stored no incident in 60 s"
        time.sleep(0.1)
    page.wait_for_selector(f"#incident-list [data-incident='{newest}']", timeout=2000)
    assert page.evaluate("() => window.__not_reloaded") is True
    page.wait_for_selector(f"#timeline .mark", timeout=2000)


def test_clicking_an_incident_plays_its_clip_from_its_start(console):
    page = console.incidents
    newest = newest_incident_id(console)
    incident = console.api(f"/api/incidents/{newest}")
    page.evaluate("""() => { const v = document.querySelector("#clip");
        v.addEventListener("seeked", () => { window.__clipAt = v.currentTime; }, {once: true}); }""")
    with page.expect_response(lambda r: r.url.endswith(f"/api/incidents/{newest}/clip.mp4"),
                              timeout=30000) as answer:
        page.click(f"#incident-list [data-incident='{newest}']")
    clip_start = datetime.fromisoformat(answer.value.headers["x-clip-start"].replace("Z", "+00:00"))
    page.wait_for_function("() => window.__clipAt !== undefined", timeout=20000)
    seeked_to = page.evaluate("() => window.__clipAt")
    start = datetime.fromisoformat(incident["start_at"])
    assert abs((clip_start - start).total_seconds() + seeked_to) <= 1.0, (clip_start, seeked_to, start)
    page.wait_for_function("(t) => document.querySelector('#clip').currentTime > t + 0.5",
                           arg=seeked_to, timeout=10000)


def test_acknowledge_with_a_note_survives_a_reload(console):
    page = console.incidents
    incident_id = int(page.evaluate("() => window.vlmguardConsole.dialogIncident.id"))
    page.fill("#ack-note", "checked on site")
    page.click("#ack-button")
    page.wait_for_selector("#ack-state:has-text('Acknowledged')")
    page.reload()
    item = page.wait_for_selector(f"#incident-list [data-incident='{incident_id}'] .acked")
    assert "checked on site" in item.inner_text()
    assert console.api(f"/api/incidents/{incident_id}")["ack_note"] == "checked on site"


def test_a_post_without_the_csrf_token_is_refused(console):
    incident_id = newest_incident_id(console)
    path = f"{console.base}/api/incidents/{incident_id}/acknowledge"
    request = console.context.request  # carries the session cookie, as the page's fetch does
    assert request.post(path, data={}).status == 403
    assert request.post(path, data={}, headers={"X-CSRF-Token": "0" * 40}).status == 403
    csrf = console.api("/api/session")["csrf"]
    assert request.post(path, data={}, headers={"X-CSRF-Token": csrf}).status == 200
    keep = f"{console.base}/api/jobs/1/keep"
    assert request.post(keep, data=json.dumps({"keep": True})).status == 403
    # A script with the token needs no cookie and no CSRF token.
    fresh = console.browser.new_context()
    try:
        bearer = fresh.request.post(path, data={}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status == 200
        assert fresh.request.post(path, data={}).status == 401
    finally:
        fresh.close()


def test_keyboard_and_phone_width(console, tmp_path):
    """Every view at 1280x800 and 390x844, with no sideways scrolling on the phone;
    the tiles open by keyboard. VLMGUARD_SCREENSHOTS=1 writes the README's pictures."""
    out = SCREENSHOTS if os.environ.get("VLMGUARD_SCREENSHOTS") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    page = console.context.new_page()
    try:
        for width, height in ((1280, 800), (390, 844)):
            page.set_viewport_size({"width": width, "height": height})
            for view in ("live", "incidents", "system"):
                page.goto(f"{console.base}/#/{view}")
                page.wait_for_selector(f"#view-{view}:not([hidden])")
                if view == "live":
                    page.wait_for_function("() => window.vlmguardConsole.players.every("
                                           "p => p.video.currentTime > 0)", timeout=30000)
                elif view == "incidents":
                    page.wait_for_selector("#incident-list li")
                else:
                    page.wait_for_selector("#jobs table")
                page.wait_for_timeout(500)
                assert page.evaluate("() => document.documentElement.scrollWidth") <= width
                page.screenshot(path=str(out / f"{view}-{width}x{height}.png"))
        page.goto(f"{console.base}/#/live")
        page.wait_for_selector(".tile")
        page.focus(".tile")
        page.keyboard.press("Enter")
        page.wait_for_function("() => location.hash === '#/live/gate'")
        assert page.locator(".tile").count() == 1
    finally:
        page.close()


def test_back_from_the_background_within_3_s_at_the_live_edge(console):
    page = console.live
    if console.hidden_at is None:
        test_live_tab_goes_to_the_background(console)
    time.sleep(max(0.0, HIDDEN_SECONDS - (time.monotonic() - console.hidden_at)))
    shown = time.monotonic()
    page.evaluate(SHOW)
    page.wait_for_function(f"""() => {{ const s = ({LIVE_EDGE})();
        return !s.paused && s.target && s.behind <= 3 * s.target; }}""", timeout=3000,
                           polling=100)
    edge = page.evaluate(LIVE_EDGE)
    assert time.monotonic() - shown <= 3.5, edge
    print("after the hidden tab:", json.dumps(edge))


# -- the console's routes without a browser -----------------------------------------------

def route_config(tmp_path):
    from conftest import write_config
    from vlmguard.config import load_config
    from vlmguard.store import IncidentRecord, JobStore, Outcome
    config = load_config(write_config(tmp_path, f"""
        [storage]
        data_dir = "{tmp_path / 'data'}"
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """))
    start = datetime.fromisoformat("2026-11-26T08:00:00+00:00")
    with JobStore.from_config(config) as store:
        store.register("cam1", "/cam1/0.mp4", start, start)
        store.complete(store.claim("w"), Outcome(result={}, safety_score=60, incidents=[
            IncidentRecord(start, start, "fire", "critical", "smoke", 0.9)]))
    return config


def call_app(config, script):
    import asyncio
    from aiohttp.test_utils import TestClient, TestServer
    from vlmguard.web import create_app

    async def go():
        async with TestClient(TestServer(create_app(config))) as client:
            csrf = (await (await client.get("/api/session")).json())["csrf"]
            return await script(client, {"X-CSRF-Token": csrf})
    return asyncio.run(go())


def test_static_files_are_gzipped_once_and_revalidated(tmp_path):
    async def script(client, _):
        first = await client.get("/static/hls.light.min.js", headers={"Accept-Encoding": "gzip"})
        body = await first.read()
        again = await client.get("/static/hls.light.min.js",
                                 headers={"If-None-Match": first.headers["ETag"]})
        missing = await client.get("/static/nope.js")
        dotted = await client.get("/static/..%2Fconsole.py")
        return first, body, again.status, missing.status, dotted.status
    first, body, again, missing, dotted = call_app(route_config(tmp_path), script)
    assert first.headers["Content-Encoding"] == "gzip" and first.status == 200
    assert body.startswith(b"!function")  # the client undid the gzip
    assert (again, missing, dotted) == (304, 404, 404)


def test_vendored_hls_js_is_the_pinned_npm_file_with_its_licence():
    static = Path(__file__).parent.parent / "vlmguard" / "web" / "static"
    package = json.loads((Path(__file__).parent / "web" / "package.json").read_text())
    assert package["dependencies"]["hls.js"] == "1.7.4"
    assert '"1.7.4"' in (static / "hls.light.min.js").read_text()  # Hls.version
    assert "Licensed under the Apache License" in (static / "hls.js-LICENSE.txt").read_text()
    npm = Path(__file__).parent / "web" / "node_modules" / "hls.js" / "dist" / "hls.light.min.js"
    if npm.exists():  # after `npm ci` in tests/web: byte for byte the pinned release
        assert npm.read_bytes() == (static / "hls.light.min.js").read_bytes()


def test_acknowledge_keep_and_their_bad_input(tmp_path):
    async def script(client, csrf):
        bad = await client.post("/api/incidents/1/acknowledge", headers=csrf,
                                json={"note": "x" * 1001})
        not_json = await client.post("/api/incidents/1/acknowledge", headers=csrf, data=b"[1")
        missing = await client.post("/api/incidents/99/acknowledge", headers=csrf, json={})
        done = await client.post("/api/incidents/1/acknowledge", headers=csrf, json={"note": "ok"})
        kept = await client.post("/api/jobs/1/keep", headers=csrf, json={"keep": True})
        wrong = await client.post("/api/jobs/1/keep", headers=csrf, json={"keep": "yes"})
        listed = await (await client.get("/api/incidents")).json()
        report = await (await client.get("/api/status")).json()
        return (bad.status, not_json.status, missing.status, done.status, kept.status,
                wrong.status, listed, report)
    bad, not_json, missing, done, kept, wrong, listed, report = call_app(route_config(tmp_path),
                                                                         script)
    assert (bad, not_json, missing, done, kept, wrong) == (400, 400, 404, 200, 200, 400)
    [row] = listed["incidents"]
    assert row["ack_note"] == "ok" and row["acknowledged_at"] and row["kept_at"]
    assert report["archives"]["kept"]["count"] == 1
