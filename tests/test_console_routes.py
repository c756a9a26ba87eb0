"""The console's routes and files without a browser: static serving, the vendored hls.js,
acknowledge and keep with bad input (aiohttp's test client, a real SQLite job table).

The browser tests are in test_console.py: Playwright's event loop runs for that whole
module, so these (which run their own loop) live apart.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path


def route_config(tmp_path):
    from helpers import write_config
    from vlmguard.config import load_config
    from vlmguard.store.bundle import Store
    from vlmguard.store.records import IncidentRecord, Outcome
    config = load_config(write_config(tmp_path, f"""
        [storage]
        data_dir = "{tmp_path / 'data'}"
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """))
    start = datetime.fromisoformat("2026-11-26T08:00:00+00:00")
    with Store.from_config(config) as store:
        store.queue.register("cam1", "/cam1/0.mp4", start, start)
        store.queue.complete(store.queue.claim("w"), Outcome(result={}, safety_score=60, incidents=[
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
