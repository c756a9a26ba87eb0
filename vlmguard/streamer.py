"""The streaming process: one FFmpeg per camera, plus the aiohttp HLS server.

It does no analysis and no database work, so nothing competes with serving video. For
each camera it keeps FFmpeg running (restarting it alone, with backoff, when it exits or
stalls) and hands every closed archive to the archiver by moving it from partial/ to
closed/: a file FFmpeg's segment list names is closed; when a run ends, whatever it left
in partial/ was cut short, still plays (MPEG-TS), and is handed over too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from vlmguard.config import CameraConfig, Config, check_server_settings
from vlmguard.ffmpeg import camera_command, ffmpeg_binary, needs_encoding, probe_codec
from vlmguard.health import Beat, write_state
from vlmguard.hls import create_app
from vlmguard.httpguard import start_server
from vlmguard.layout import Layout, stale_after
from vlmguard.logs import configure_logging, get_logger

log = get_logger("vlmguard.streamer")

CHECK_INTERVAL = 0.5
START_GRACE_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 10.0
STABLE_RUN_SECONDS = 60.0
REPORT_SECONDS = 1.0


def main(config: Config, beat: Beat = Beat()) -> None:
    """Entry point of the streaming process."""
    configure_logging("streamer")
    asyncio.run(Streamer(config, beat).run())


class Streamer:
    def __init__(self, config: Config, beat: Beat = Beat()):
        check_server_settings(config)
        self.config = config
        self.beat = beat
        self.layout = Layout(config.data_dir)
        self.binary = ffmpeg_binary()
        self.feeds = [CameraFeed(config, camera, self.layout, self.binary)
                      for camera in config.cameras]

    async def run(self) -> None:
        stop = asyncio.Event()
        self.watch_for_stop(stop)
        for camera in self.config.cameras:
            self.layout.make_dirs(camera.id)
            hand_over_leftovers(self.layout, camera.id)
        runner = await start_server(create_app(self.config), self.config)
        log.info("hls server listening", host=self.config.server.host,
                 port=self.config.server.port, cameras=len(self.feeds))
        reporter = asyncio.create_task(self.report(stop))
        await asyncio.gather(*(feed.run(stop) for feed in self.feeds))
        await reporter
        await runner.cleanup()
        log.info("streamer stopped")

    def watch_for_stop(self, stop: asyncio.Event) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def report(self, stop: asyncio.Event) -> None:
        """Beat from the event loop itself: if the loop stalls, the supervisor sees it."""
        while not stop.is_set():
            self.beat()
            write_state(self.config.data_dir, "streamer",
                        {"cameras": {feed.camera.id: feed.health() for feed in self.feeds}})
            try:
                await asyncio.wait_for(stop.wait(), REPORT_SECONDS)
            except asyncio.TimeoutError:
                pass


def hand_over_leftovers(layout: Layout, camera_id: str) -> None:
    """Everything in partial/ belongs to an FFmpeg that is gone: it is closed now."""
    partial = layout.partial(camera_id)
    for path in sorted(partial.glob("*.ts")):
        move_to_closed(layout, camera_id, path.name)
    for run_list in partial.glob("run-*.csv"):
        run_list.unlink(missing_ok=True)


def move_to_closed(layout: Layout, camera_id: str, name: str) -> None:
    source = layout.partial(camera_id) / name
    try:
        if source.stat().st_size == 0:
            source.unlink()  # FFmpeg opened it and wrote nothing: no footage to keep
            return
        source.rename(layout.closed(camera_id) / name)
    except FileNotFoundError:
        return
    log.info("archive closed", camera_id=camera_id, file=name)


class CameraFeed:
    """Keeps one camera's FFmpeg running and hands its closed archives on."""

    def __init__(self, config: Config, camera: CameraConfig, layout: Layout, binary: str):
        self.config = config
        self.camera = camera
        self.layout = layout
        self.binary = binary
        self.restarts = 0
        self.encode: bool | None = None

    def health(self) -> dict:
        age = newest_age(self.layout.live(self.camera.id) / "index.m3u8")
        return {"online": age <= stale_after(self.config),
                "segment_age_s": round(age, 1) if age != float("inf") else None,
                "restarts": self.restarts,
                "mode": None if self.encode is None else ("encode" if self.encode else "copy")}

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            started = time.monotonic()
            reason = await self.run_once(stop)
            if stop.is_set():
                break
            if time.monotonic() - started > STABLE_RUN_SECONDS:
                backoff = 1.0
            self.restarts += 1
            log.warning("ffmpeg restarting", camera_id=self.camera.id, reason=reason,
                        backoff_s=backoff, restarts=self.restarts)
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def decide_encoding(self) -> bool | None:
        """Copy or encode; None while an "auto" camera can't be reached to tell."""
        if self.encode is None:
            codec = None
            if self.camera.transcode == "auto" and not self.camera.url.startswith("lavfi:"):
                codec = await asyncio.to_thread(probe_codec, self.binary, self.camera.url)
                if codec is None:
                    return None
            self.encode = needs_encoding(self.camera, codec)
            log.info("camera codec", camera_id=self.camera.id, codec=codec,
                     mode="encode" if self.encode else "copy")
        return self.encode

    async def run_once(self, stop: asyncio.Event) -> str:
        """One FFmpeg run; returns why it ended."""
        live = self.layout.live(self.camera.id)
        for stale in live.iterdir():
            stale.unlink(missing_ok=True)
        encode = await self.decide_encoding()
        if encode is None:
            return "camera unreachable: no video stream found"
        run_list = self.layout.partial(self.camera.id) / f"run-{time.time_ns()}.csv"
        command = camera_command(self.binary, self.camera, self.config.storage, live,
                                 self.layout.partial(self.camera.id), run_list, encode)
        # Forked from the event-loop thread, so the parent-death signal stays armed.
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
            env={**os.environ, "TZ": "UTC"})
        log.info("ffmpeg started", camera_id=self.camera.id, pid=proc.pid)
        stderr = asyncio.create_task(self.log_stderr(proc))
        reason = await self.supervise(proc, stop, run_list, live)
        await stderr
        hand_over_listed(self.layout, self.camera.id, run_list, 0)
        hand_over_leftovers(self.layout, self.camera.id)
        log.info("ffmpeg ended", camera_id=self.camera.id, reason=reason,
                 returncode=proc.returncode)
        return reason

    async def supervise(self, proc, stop: asyncio.Event, run_list: Path, live: Path) -> str:
        started = time.monotonic()
        offset = 0
        stall_limit = max(4.0 * self.config.storage.segment_seconds, 10.0)
        while True:
            try:
                await asyncio.wait_for(proc.wait(), CHECK_INTERVAL)
                return f"exited with status {proc.returncode}"
            except asyncio.TimeoutError:
                pass
            offset = hand_over_listed(self.layout, self.camera.id, run_list, offset)
            if stop.is_set():
                await self.stop_ffmpeg(proc)
                return "stopping"
            if time.monotonic() - started > START_GRACE_SECONDS and \
                    newest_age(live / "index.m3u8") > stall_limit:
                log.warning("ffmpeg stalled", camera_id=self.camera.id, limit_s=stall_limit)
                await self.kill_ffmpeg(proc)
                return "stalled"

    async def stop_ffmpeg(self, proc) -> None:
        """SIGINT lets FFmpeg close the archive it is writing; SIGKILL if it won't."""
        try:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_SECONDS)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            await self.kill_ffmpeg(proc)

    async def kill_ffmpeg(self, proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()

    async def log_stderr(self, proc) -> None:
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").strip()
            if text:
                log.warning("ffmpeg says", camera_id=self.camera.id, line=text[:500])


def hand_over_listed(layout: Layout, camera_id: str, run_list: Path, offset: int) -> int:
    """Move the archives FFmpeg has listed as closed since offset; returns the new offset."""
    try:
        with run_list.open() as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return offset
    complete = data[:data.rfind("\n") + 1]  # a line without its newline is still being written
    for line in complete.splitlines():
        name = line.split(",")[0].strip()
        if name:
            move_to_closed(layout, camera_id, Path(name).name)
    return offset + len(complete)


def newest_age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")
