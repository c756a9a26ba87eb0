"""One view of the site in a real browser: two `vlmguard run` boxes on one PostgreSQL, the
console served by box A (no camera of its own) signed in to A only, showing box B's
camera, its incidents and its clip, all through A's server.

Box B records camera `dock-b` and analyses it (the stand-in Gemini makes an incident per
archive); box A serves only. Both share the token, as docs/nodes.md says boxes must.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from daemon import RunningVlmguard
from gemini_server import FakeGemini
from helpers import PG_URL

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

TOKEN = "shared-by-both-boxes-0123456789"
CHROMIUM = "/usr/bin/chromium"
CAMERA_B = """
[[cameras]]
id = "dock-b"
url = "lavfi:testsrc2=size=320x240:rate=10"
"""
# Where the screenshot of A's console goes (never the repository): VLMGUARD_ONEVIEW_SHOTS
# names another folder.
SHOTS = Path(os.environ.get("VLMGUARD_ONEVIEW_SHOTS", "/tmp/vlmguard-oneview"))


@pytest.fixture(scope="module")
def schema_url(pg_up):
    """One PostgreSQL schema for both boxes, for the module's tests."""
    if not pg_up:
        pytest.skip("PostgreSQL is not reachable (tests/run.sh starts one)")
    schema = "t_" + secrets.token_hex(6)
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


class Site:
    def __init__(self, a: RunningVlmguard, b: RunningVlmguard, browser):
        self.a, self.b, self.browser = a, b, browser
        self.base = f"http://127.0.0.1:{a.port}"
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.refused: list[str] = []  # the page's answers of 400 and more, for a failure
        self.page.on("response", lambda r: self.refused.append(f"{r.status} {r.url}")
                     if r.status >= 400 else None)

    def api(self, path: str) -> dict:
        response = self.context.request.get(self.base + path)
        assert response.ok, (path, response.status, response.text()[:300])
        return response.json()


def box(folder: Path, gemini: FakeGemini, name: str, url: str, *, workers: int,
        cameras: str) -> RunningVlmguard:
    folder.mkdir()
    return RunningVlmguard(folder, gemini.base_url, workers=workers, daemon=f'node = "{name}"',
                           extra=f'[database]\nurl = "{url}"', cameras=cameras,
                           server=f'token = "{TOKEN}"', segment_seconds=1)


@pytest.fixture(scope="module")
def site(tmp_path_factory, schema_url):
    directory = tmp_path_factory.mktemp("oneview")
    with FakeGemini() as gemini, sync_playwright() as playwright:
        b = box(directory / "box-b", gemini, "box-b", schema_url, workers=1,
                cameras=CAMERA_B).start()
        a = box(directory / "box-a", gemini, "box-a", schema_url, workers=0, cameras="\n").start()
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            b.wait_live("dock-b", token=TOKEN)
            yield Site(a, b, browser)
        finally:
            browser.close()
            a.kill()
            b.kill()


@contextmanager
def explained(site: Site):
    """A browser wait that times out says what the page showed and what it was refused."""
    try:
        yield
    except PlaywrightTimeout as exc:
        shown = site.page.evaluate("""() => ({hash: location.hash,
            list: document.querySelector("#incident-list")?.innerText.slice(0, 500),
            timeline: document.querySelector("#timeline")?.innerText.slice(0, 300),
            clip: document.querySelector("#clip-error")?.textContent,
            connection: document.querySelector("#connection")?.textContent})""")
        raise AssertionError(f"{str(exc).splitlines()[0]}\npage: {shown}\nrefused: "
                             f"{site.refused[-10:]}\nA: {site.a.log_text()[-1500:]}\n"
                             f"B: {site.b.log_text()[-1500:]}") from None


def sign_in(site: Site) -> None:
    page = site.page
    page.goto(site.base + "/")
    page.wait_for_selector("#view-signin:not([hidden])")
    page.fill("#token", TOKEN)
    page.click("#signin-form button")
    page.wait_for_selector("#view-live:not([hidden])")


def first_incident_of_b(site: Site, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for box_ in (site.a, site.b):
            assert box_.proc.poll() is None, box_.log_text()[-3000:]
        found = site.api("/api/incidents?camera=dock-b&limit=1")["incidents"]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no incident of dock-b in {timeout} s\n{site.b.log_text()[-3000:]}")


def test_console_on_a_lists_b_incident_and_plays_its_clip(site):
    """The issue's Test line: signed in to A only, B's incident is listed with its
    picture, and its clip (cut on B, streamed through A) plays in Chromium."""
    sign_in(site)
    incident = first_incident_of_b(site)
    assert incident["node"] == "box-b"
    assert incident["clip_url"].startswith(f"http://127.0.0.1:{site.b.port}/")
    # The one-incident route (the dialog) says where it was recorded too.
    assert site.api(f"/api/incidents/{incident['id']}")["node"] == "box-b"

    # Its picture through A: wait until B has it (renamed into place just after the commit).
    deadline = time.monotonic() + 30
    while site.context.request.get(f"{site.base}/api/incidents/{incident['id']}/snapshot.jpg"
                                   ).status != 200:
        assert time.monotonic() < deadline, site.b.log_text()[-3000:]
        time.sleep(0.5)

    with explained(site):
        lists_and_plays(site, incident)


def lists_and_plays(site: Site, incident: dict) -> None:
    page = site.page
    page.goto(f"{site.base}/#/incidents")
    page.wait_for_selector("#view-incidents:not([hidden])")
    item = f"#incident-list [data-incident='{incident['id']}']"
    page.wait_for_selector(item, timeout=10000)
    assert "box-b" in page.inner_text(item)
    # Its picture came through A (made on B), and is a real decoded image.
    page.wait_for_function(f"""() => {{ const img = document.querySelector("{item} img");
        return img && img.complete && img.naturalWidth > 0; }}""", timeout=20000)
    # The camera filter offers B's camera, and filtering by it keeps the incident.
    page.select_option("#filters [name=camera]", "dock-b")
    page.click("#filters button[type=submit]")
    page.wait_for_selector(item, timeout=10000)
    page.wait_for_selector("#timeline .mark", timeout=10000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "a-lists-b-incident.png"))

    with page.expect_response(lambda r: r.url == f"{site.base}/api/incidents/"
                              f"{incident['id']}/clip.mp4", timeout=60000) as answer:
        page.click(item)
    assert answer.value.status == 200 and answer.value.headers["x-clip-start"]
    page.wait_for_function("() => document.querySelector('#clip').currentTime > 0",
                           timeout=30000)
    # Its recordings are browsed on B: the dialog's link opens B's console at that time.
    link = page.locator("#dialog-recordings")
    assert link.is_visible()
    assert link.get_attribute("href").startswith(
        f"http://127.0.0.1:{site.b.port}/#/recordings/dock-b/")
    page.screenshot(path=str(SHOTS / "a-plays-b-incident.png"))
    page.keyboard.press("Escape")


def test_b_media_needs_a_sign_in_on_a(site):
    """Through A, B's clip needs A's session or token like A's own; without either, 401."""
    incident = first_incident_of_b(site)
    url = f"{site.base}/api/incidents/{incident['id']}/snapshot.jpg"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.headers["Content-Type"] == "image/jpeg"
        assert answer.read(3) == b"\xff\xd8\xff"


def test_b_camera_plays_live_on_a(site):
    """A's Live view shows B's camera, marked with its node, and hls.js plays it through
    A's own /live/ (parts and blocking reloads passed on), never from B directly."""
    cameras = site.api("/api/cameras")["cameras"]
    assert [(c["id"], c["node"], c["node_alive"]) for c in cameras] == [("dock-b", "box-b", True)]
    assert cameras[0]["hls_url"] == f"http://127.0.0.1:{site.b.port}/live/dock-b/index.m3u8"
    assert cameras[0]["console_url"] == f"http://127.0.0.1:{site.b.port}/"
    page = site.page
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/live/" in r.url else None)
    page.goto(f"{site.base}/#/live")
    page.wait_for_selector(".tile[data-camera='dock-b']")
    assert "box-b" in page.inner_text(".tile[data-camera='dock-b'] .name")
    page.wait_for_function("() => window.vlmguardConsole.players.length &&"
                           " window.vlmguardConsole.players[0].video.currentTime > 2",
                           timeout=40000)
    state = page.evaluate("""() => { const p = window.vlmguardConsole.players[0];
        return {part: p.hls.latestLevelDetails.partTarget, latency: p.latency}; }""")
    assert state["part"], state  # LL-HLS parts came through
    page.screenshot(path=str(SHOTS / "a-plays-b-live.png"))
    assert asked and all(url.startswith(f"{site.base}/live/dock-b/") for url in asked), asked[:5]
    assert any("_HLS_msn=" in url for url in asked)
    # A camera no box records is not found, through the pass-through too.
    missing = site.context.request.get(f"{site.base}/live/nowhere/index.m3u8")
    assert missing.status == 404
    page.goto(f"{site.base}/#/incidents")


def test_b_down_its_live_video_on_a_is_503_and_its_camera_marked(site):
    """Last in the module: B stopped, A answers 503 with Retry-After at once (no hang)
    and lists B's camera with its node down."""
    assert site.b.stop() == 0
    url = f"{site.base}/live/dock-b/index.m3u8"
    started = time.monotonic()
    answer = site.context.request.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 503 and answer.headers["retry-after"]
    assert time.monotonic() - started < 10
    assert "box-b" in answer.json()["error"]
    [camera] = site.api("/api/cameras")["cameras"]
    assert camera["node"] == "box-b" and not camera["node_alive"] and not camera["online"]
