"""Incident media: clips cut from real archives by real FFmpeg, served through aiohttp's
test client; snapshots made by a real analyzer (against the test Gemini) and deleted by
the archiver's retention.

The fabricated archives (helpers/media.py) show a flat grey whose brightness grows 20
levels a second from the file's start, so a decoded frame says which second of which file it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from vlmguard.analyzer import Worker
from vlmguard.archiver import Archiver
from vlmguard.clips import recordings
from vlmguard.config import load_config
from vlmguard.layout import Layout, snapshot_path
from vlmguard.store.bundle import Store
from vlmguard.store.records import IncidentRecord, Outcome
from vlmguard.web import create_app

from helpers import write_config
from helpers.media import (LEVELS_PER_SECOND, T0, config, duration_of, footage,  # noqa: F401 (fixtures)
                           make_archive, second_at)

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

OLD = datetime(2020, 1, 1, 8, 0, tzinfo=timezone.utc)


def fetch(config, path, token="tok", headers=None):
    async def go():
        async with TestClient(TestServer(create_app(config))) as client:
            sent = dict(headers or {})
            if token:
                sent["Authorization"] = f"Bearer {token}"
            response = await client.get(path, headers=sent)
            return response.status, response.headers, await response.read()
    return asyncio.run(go())


def test_api_clip_is_an_mp4_from_the_start_with_range_support(config, tmp_path, monkeypatch):
    from vlmguard.web import scratch

    ram = tmp_path / "shm"  # its own, as other runs on this machine share /dev/shm
    ram.mkdir()
    monkeypatch.setattr(scratch, "RAM_DIR", ram)
    status, headers, body = fetch(config, "/api/clip?camera=cam1&start=2026-11-26T08:00:05Z"
                                          "&duration=10")
    assert status == 200 and headers["Content-Type"] == "video/mp4"
    assert headers["X-Clip-Start"] == "2026-11-26T08:00:05.000Z"
    video = tmp_path / "clip.mp4"
    video.write_bytes(body)
    assert abs(second_at(video, 0) - 5) < 1.0 and abs(second_at(video, 7) - 2) < 1.0
    assert abs(duration_of(video) - 10) < 1.0
    status, headers, part = fetch(config, "/api/clip?camera=cam1&start=2026-11-26T08:00:05Z"
                                          "&duration=10", headers={"Range": "bytes=0-99"})
    assert status == 206 and part == body[:100]
    assert not list(ram.iterdir())  # each clip deleted once sent


def test_footage_beginning_later_moves_time_zero_and_says_so(config, tmp_path):
    status, headers, body = fetch(config, "/api/clip?camera=cam1&start=2026-11-26T08:00:55Z"
                                          "&duration=10")
    assert status == 200 and headers["X-Clip-Start"] == "2026-11-26T08:01:00.000Z"
    video = tmp_path / "clip.mp4"
    video.write_bytes(body)
    assert second_at(video, 0) < 1.0


@pytest.mark.parametrize("query", ["camera=cam1&start=2026-11-26T08:00:30Z&duration=20",
                                   "camera=cam1&start=2026-11-26T07:00:00Z&duration=600",
                                   "camera=cam2&start=2026-11-26T08:00:00Z&duration=10"])
def test_no_footage_is_404(config, query):
    status, headers, body = fetch(config, f"/api/clip?{query}")
    assert status == 404 and "no recorded video" in json.loads(body)["error"]


@pytest.mark.parametrize("query,parameter", [
    ("start=2026-11-26T08:00:00Z", "camera"),
    ("camera=nope&start=2026-11-26T08:00:00Z", "camera"),
    ("camera=cam1", "start"),
    ("camera=cam1&start=yesterday", "start"),
    ("camera=cam1&start=9999-12-31T23:59:59-23:59", "start"),
    ("camera=cam1&start=2026-11-26T08:00:00Z&duration=0", "duration"),
    ("camera=cam1&start=2026-11-26T08:00:00Z&duration=601", "duration"),
    ("camera=cam1&start=2026-11-26T08:00:00Z&duration=-5", "duration"),
    ("camera=cam1&start=2026-11-26T08:00:00Z&duration=nan", "duration"),
    ("camera=cam1&start=2026-11-26T08:00:00Z&duration=1e3", "duration"),
])
def test_bad_parameters_are_400_naming_them(config, query, parameter):
    status, _, body = fetch(config, f"/api/clip?{query}")
    assert status == 400 and json.loads(body)["parameter"] == parameter


@pytest.mark.parametrize("path", ["/api/clip?camera=cam1&start=2026-11-26T08:00:00Z",
                                  "/api/incidents/1/clip.mp4", "/api/incidents/1/snapshot.jpg"])
def test_media_needs_the_token(config, path):
    assert fetch(config, path, token=None)[0] == 401
    assert fetch(config, path, token="wrong")[0] == 401


def store_incident(config, start, end, when=T0) -> int:
    with Store.from_config(config) as store:
        store.queue.register("cam1", f"/x/{when:%H%M%S}-{start}.mp4", when + timedelta(seconds=start),
                             when + timedelta(seconds=end))
        job = store.queue.claim("w")
        store.queue.complete(job, Outcome(result={}, safety_score=50, incidents=[IncidentRecord(
            when + timedelta(seconds=start), when + timedelta(seconds=end), "fall", "high",
            "a fall", 0.9)]))
        return store.incidents.list_incidents(job.id)[0]["id"]


def test_incident_clip_has_five_seconds_either_side(config, tmp_path):
    incident_id = store_incident(config, 8, 12)
    status, headers, body = fetch(config, f"/api/incidents/{incident_id}/clip.mp4")
    assert status == 200 and headers["X-Clip-Start"] == "2026-11-26T08:00:03.000Z"
    video = tmp_path / "incident.mp4"
    video.write_bytes(body)
    assert abs(second_at(video, 0) - 3) < 1.0 and abs(duration_of(video) - 14) < 1.0
    assert fetch(config, "/api/incidents/999999/clip.mp4")[0] == 404
    assert fetch(config, "/api/incidents/abc/clip.mp4")[0] == 400
    assert fetch(config, f"/api/incidents/{incident_id}/snapshot.jpg")[0] == 404  # none made


def test_analyzer_makes_the_snapshot_and_retention_deletes_it(tmp_path, gemini, monkeypatch):
    from gemini_server import VALID_KEY

    monkeypatch.setenv("GEMINI_API_KEY", VALID_KEY)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = load_config(write_config(tmp_path, f"""
        [server]
        token = "tok"
        [storage]
        data_dir = "{tmp_path / 'data'}"
        retention_days = 1
        [analysis]
        lease_seconds = 5
        [gemini]
        base_url = "{gemini.base_url}"
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """))
    layout = Layout(config.data_dir)
    old = layout.archives("cam1") / f"{OLD:%Y%m%dT%H%M%SZ}.mp4"
    make_archive(old, seconds=12)
    with Store.from_config(config) as store:
        job_id = store.queue.register("cam1", old, OLD, OLD + timedelta(seconds=12))
        worker = Worker(config, store.queue, store.pauses, "test-worker")
        worker.process(store.queue.next_job("test-worker", timeout=5))
        [incident] = store.incidents.list_incidents(job_id)  # the test model reports one at 3-5 s
        picture = snapshot_path(config.data_dir, "cam1", incident["id"])
        assert picture.read_bytes()[:2] == b"\xff\xd8" and picture.stat().st_size < 50_000
        status, headers, body = fetch(config, f"/api/incidents/{incident['id']}/snapshot.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        assert body == picture.read_bytes()
        stale, fresh = (picture.with_name(f"job{n}-0.jpg.part") for n in (7, 8))
        stale.write_bytes(b"x")  # staged by an analyzer that died before its commit
        fresh.write_bytes(b"x")  # staged by one still running
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        Archiver(config, store.queue, store.recordings).enforce_retention()  # 2020 is past retention_days
        assert not old.exists() and not picture.exists()
        assert not stale.exists() and fresh.exists()
        assert recordings(layout, "cam1") == []


CLIP_PAGE = """<!doctype html><meta charset="utf-8">
<video id="v" muted playsinline preload="auto" src="%s"></video>
<canvas id="c" width="64" height="48"></canvas>
<script>
  // What a console does: load the clip, look at time 0, seek, look again.
  const video = document.getElementById("v");
  const canvas = document.getElementById("c").getContext("2d");
  const report = (body) => fetch("/report?token=tok&body=" + encodeURIComponent(JSON.stringify(body)));
  const red = () => {
    canvas.drawImage(video, 0, 0, 64, 48);
    const data = canvas.getImageData(0, 0, 64, 48).data;
    let sum = 0;
    for (let i = 0; i < data.length; i += 4) sum += data[i];
    return sum / (data.length / 4);
  };
  video.addEventListener("error", () => report({error: String(video.error.code)}));
  video.addEventListener("loadeddata", () => {
    const first = red();
    video.addEventListener("seeked", () => report({duration: video.duration, first: first,
                                                   at4: red()}), {once: true});
    video.currentTime = 4;
  }, {once: true});
</script>"""


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium")
def test_chromium_plays_the_clip_from_time_zero_and_seeks(config, tmp_path):
    from browser import CHROMIUM_FLAGS

    src = "/api/clip?camera=cam1&start=2026-11-26T08:00:07.300Z&duration=6&token=tok"

    async def go():
        reports: asyncio.Queue = asyncio.Queue()
        app = create_app(config)

        async def page(request):
            return web.Response(text=CLIP_PAGE % src, content_type="text/html")

        async def report(request):  # a GET: the console's POSTs need a CSRF token
            await reports.put(json.loads(request.query["body"]))
            return web.Response(text="ok")
        app.router.add_get("/clip-check", page)
        app.router.add_get("/report", report)
        async with TestServer(app, host="127.0.0.1") as server:
            browser = await asyncio.create_subprocess_exec(
                shutil.which("chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}",
                str(server.make_url("/clip-check?token=tok")),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                return await asyncio.wait_for(reports.get(), 60)
            finally:
                browser.kill()
                await browser.wait()
    result = asyncio.run(go())
    assert "error" not in result, result
    assert abs(result["duration"] - 6) < 1.0
    assert abs(result["first"] / LEVELS_PER_SECOND - 7.3) < 1.0  # time 0 = requested start
    assert abs(result["at4"] / LEVELS_PER_SECOND - 1.3) < 1.0  # 4 s on: the next archive


def test_clip_requests_beyond_the_bound_get_503(config, monkeypatch):
    from vlmguard.web import media, sending
    from vlmguard.web.keys import CLIP_SLOTS_KEY

    monkeypatch.setattr(sending, "QUEUE_SECONDS", 0.2)

    async def go():
        app = create_app(config)
        async with TestClient(TestServer(app)) as client:
            slots = app[CLIP_SLOTS_KEY]
            for _ in range(media.MAX_CLIP_JOBS):  # every slot busy cutting someone's clip
                await slots.acquire()
            path = "/api/clip?camera=cam1&start=2026-11-26T08:00:00Z&duration=5&token=tok"
            busy = await client.get(path)
            slots.release()
            served = await client.get(path)
            return busy.status, busy.headers.get("Retry-After"), served.status
    assert asyncio.run(go()) == (503, "5", 200)


def test_a_clip_that_would_not_fit_in_memory_gets_503(config, monkeypatch):
    from vlmguard.web import scratch

    monkeypatch.setattr(scratch, "MEMORY_RESERVE", 2**62)  # as if the box had no RAM to spare
    status, headers, body = fetch(config, "/api/clip?camera=cam1&start=2026-11-26T08:00:00Z")
    assert status == 503 and "memory" in json.loads(body)["error"]
    monkeypatch.setattr(scratch, "MEMORY_RESERVE", 0)
    assert fetch(config, "/api/clip?camera=cam1&start=2026-11-26T08:00:00Z")[0] == 200
