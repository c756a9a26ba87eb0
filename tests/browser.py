"""hls.js in headless Debian Chromium, reporting back to a page server on its own origin."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import subprocess
import threading
from pathlib import Path

from aiohttp import web

from helpers import free_port

WEB = Path(__file__).parent / "web"
HLS_JS = WEB / "node_modules" / "hls.js" / "dist" / "hls.min.js"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic", "--autoplay-policy=no-user-gesture-required"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class PageServer:
    """Serves player.html and hls.js on another port than vlmguard (a cross-origin player)."""

    def __init__(self):
        self.port = free_port()
        self.reports: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/clock.html", self.clock_page)
        app.router.add_get("/hls.min.js", self.script)
        app.router.add_post("/report", self.report)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB / "player.html")

    async def clock_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB / "clock.html")

    async def script(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(HLS_JS)

    async def report(self, request: web.Request) -> web.Response:
        self.reports.put(json.loads(await request.text()))
        return web.Response(text="ok")

    def __enter__(self) -> "PageServer":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def play_with_hlsjs(hls_url: str, profile: Path, samples: int = 10, timeout: float = 90,
                    watch: int = 0) -> list[dict]:
    """Open the player page on hls_url; return its reports up to the last one or an error.

    watch=N: play for N seconds counting stalls (a "watched" report) instead of sampling latency.
    """
    with PageServer() as pages:
        page = f"http://127.0.0.1:{pages.port}/?samples={samples}&watch={watch}&src={hls_url}"
        browser = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", page],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reports = []
        try:
            while True:
                report = pages.reports.get(timeout=timeout + watch)
                reports.append(report)
                if report["event"] in ("latency", "watched", "error", "unsupported"):
                    return reports
        except queue.Empty:
            return reports
        finally:
            browser.kill()
            browser.wait()
