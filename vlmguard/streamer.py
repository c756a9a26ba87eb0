"""The streaming process: one FFmpeg per camera, plus the aiohttp HLS server.

It does no analysis, and the database reads of the API it serves run in threads of their
own (web/database.py), so nothing competes with serving video. For
each camera it keeps FFmpeg running (restarting it alone, with backoff, when it exits or
stalls) and hands every closed archive to the archiver by moving it from partial/ to
closed/: a file FFmpeg's segment list names is closed; when a run ends, whatever it left
in partial/ was cut short, still plays (MPEG-TS), and is handed over too. Between runs it
carries the ended run's live segments over (livelist.py), so the live URL survives a
restart, and it deletes those segments once no playlist can list them.

A low-latency camera's FFmpeg writes its live output as fragmented MP4 to a pipe, which
this process reads and packages into LL-HLS segments and parts (llhls.py); if FFmpeg
cannot write fMP4 for the camera, its later runs use FFmpeg's own MPEG-TS HLS output, and
the camera's status says why. Recording never waits for this process: FFmpeg drops live
frames when the pipe is full (ffmpeg.live_output), its log pipe has room for a long
stall, and a stall of this process's own is not taken for FFmpeg's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import re
import shutil
import signal
import time
from pathlib import Path

from vlmguard.config import CameraConfig, Config, check_server_settings
from vlmguard.ffmpeg import (NETWORK_SCHEMES, camera_command, child_env, ffmpeg_binary,
                             needs_encoding, probe_codec, write_input_file)
from vlmguard.child import ChildState, every, on_stop
from vlmguard.health import Beat
from vlmguard.web import create_app
from vlmguard.web.keys import CHILD_STATE_KEY, LIVE_KEY
from vlmguard.httpguard import start_server
from vlmguard.layout import Layout, stale_after
from vlmguard.livelist import (INIT_URI, SEGMENT_URI, History, carry_over, live_age,
                               read_history, served_window, write_history)
from vlmguard.llhls import LiveStream, Settings, pump
from vlmguard.logs import Noticed, configure_logging, get_logger

log = get_logger("vlmguard.streamer")

CHECK_INTERVAL = 0.5
START_GRACE_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 10.0
STABLE_RUN_SECONDS = 60.0
REPORT_SECONDS = 1.0
PRUNE_SECONDS = 2.0
# Free space on the archive disk before FFmpeg is restarted after a full disk.
ARCHIVE_ROOM_BYTES = 16 * 1024 * 1024
ROOM_AGAIN = "archive output failed; there is room again"
NO_FMP4 = "live fMP4 output failed; MPEG-TS segments from now on"
# tee: "Slave muxer #1 failed: No space left on device, continuing with 1/2 slaves."
ARCHIVE_SLAVE_FAILED = re.compile(r"[Ss]lave muxer #1 failed(?::\s*([^,]+))?")
# tee: "Slave muxer #0 failed: Invalid argument, continuing with 1/2 slaves." The live
# output (fMP4 for low latency) could not take the camera's stream.
LIVE_SLAVE_FAILED = re.compile(r"[Ss]lave muxer #0 failed(?::\s*([^,]+))?")
LIVE_FILES = ("index.m3u8", "history.json")
# The pipes FFmpeg writes fMP4 and its log to: room for a second or two of video, or
# minutes of warnings, while the loop is busy or this process is stopped.
PIPE_BYTES = 1 << 20
LOG_LINE_BYTES = 1 << 16
# The supervising loop ran this much later than it should have: this process was stopped
# or its loop stalled, so an old live playlist says nothing about FFmpeg.
LOOP_STALL_SECONDS = 2.0
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PUMP_DRAIN_SECONDS = 5.0


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
        self.published = ChildState(config.data_dir, "streamer")
        self.feeds = [CameraFeed(config, camera, self.layout, self.binary,
                                 unexpected=self.published.unexpected)
                      for camera in config.cameras]

    async def run(self) -> None:
        stop = asyncio.Event()
        self.watch_for_stop(stop)
        for feed in self.feeds:
            self.layout.make_dirs(feed.camera.id)
            hand_over_leftovers(self.layout, feed.camera.id, feed.noticed)
        app = create_app(self.config)
        app[LIVE_KEY].update((feed.camera.id, feed.stream) for feed in self.feeds)
        app[CHILD_STATE_KEY] = self.published
        runner = await start_server(app, self.config)
        log.info("hls server listening", host=self.config.server.host,
                 port=self.config.server.port, cameras=len(self.feeds))
        reporter = asyncio.create_task(self.report(stop))
        await asyncio.gather(*(feed.run(stop) for feed in self.feeds))
        await reporter
        await runner.cleanup()
        log.info("streamer stopped")

    def watch_for_stop(self, stop: asyncio.Event) -> None:
        on_stop(stop.set)

    async def report(self, stop: asyncio.Event) -> None:
        """Beat from the event loop itself: if the loop stalls, the supervisor sees it.
        The state file is written when a camera's state changes; the age of its newest
        segment, which changes every second, is read from the files by whoever asks."""
        while not stop.is_set():
            self.beat()
            self.published.publish({"cameras": {feed.camera.id: feed.reported()
                                                for feed in self.feeds}})
            try:
                await asyncio.wait_for(stop.wait(), REPORT_SECONDS)
            except asyncio.TimeoutError:
                pass


def hand_over_leftovers(layout: Layout, camera_id: str, noticed: Noticed) -> None:
    """Everything in partial/ belongs to an FFmpeg that is gone: it is closed now."""
    partial = layout.partial(camera_id)
    for path in sorted(partial.iterdir()):
        if path.suffix == ".ts" and path.is_file():
            move_to_closed(layout, camera_id, path.name)
        elif path.name.startswith("run-") and path.suffix == ".csv" and path.is_file():
            path.unlink(missing_ok=True)
        elif noticed.first(path):
            log.warning("unexpected entry in partial dir, left alone", camera_id=camera_id,
                        entry=str(path))


def move_to_closed(layout: Layout, camera_id: str, name: str) -> None:
    source = layout.partial(camera_id) / name
    try:
        if source.stat().st_size == 0:
            source.unlink()  # FFmpeg opened it and wrote nothing: no footage to keep
            return
        source.rename(layout.closed(camera_id) / name)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.error("archive not handed over, will retry", camera_id=camera_id, file=name,
                  error=str(exc))
        return
    log.info("archive closed", camera_id=camera_id, file=name)


class CameraFeed:
    """Keeps one camera's FFmpeg running and hands its closed archives on.

    FFmpeg's archive output can fail alone (a full disk): tee carries on with the live
    output and never reopens the archive. The feed reads that from FFmpeg's log, reports
    "archiving stopped: <reason>", and restarts FFmpeg as soon as there is room again.
    """

    def __init__(self, config: Config, camera: CameraConfig, layout: Layout, binary: str,
                 unexpected=None):
        self.config = config
        # ChildState.unexpected of the streamer: a bug is logged and counted.
        self.unexpected = unexpected or ChildState().unexpected
        self.camera = camera
        self.layout = layout
        self.binary = binary
        self.restarts = 0
        self.encode: bool | None = None
        self.codec: str | None = None  # as probed (transcode "auto" network cameras)
        self.noticed = Noticed()
        self.archive_problem: str | None = None  # why archiving stopped, None when it runs
        self.archive_failed_in_run = False
        self.run_start = 0  # the current run's first segment number
        self.listed_segments = False  # the last run put segments in the playlist
        self.prune = every(PRUNE_SECONDS, self.prune_live)
        self.input_file: Path | None = None
        storage = config.storage
        self.stream = LiveStream(camera.id, layout.live(camera.id),
                                 Settings(storage.segment_seconds, storage.live_segments,
                                          storage.part_seconds, camera.low_latency))
        # Why this camera's live output is MPEG-TS although low latency is on.
        self.fmp4_problem: str | None = None
        self.fmp4_failed_in_run = False

    @property
    def low_latency(self) -> bool:
        """Whether this run's live output is fMP4 for the packager (always, unless the
        camera turned it off or FFmpeg could not write fMP4 for it)."""
        return self.camera.low_latency and self.fmp4_problem is None

    def live_mode(self) -> str:
        if not self.camera.low_latency:
            return "hls (MPEG-TS segments: low_latency is off)"
        if self.fmp4_problem is not None:
            return f"hls (MPEG-TS segments: FFmpeg could not write fMP4: {self.fmp4_problem})"
        return self.stream.health()

    def hide_camera_url(self) -> Path | None:
        """A network camera's URL goes to FFmpeg in a 0600 file, not on its command line."""
        if not self.camera.url.startswith(NETWORK_SCHEMES):
            return None
        path = self.layout.camera_input(self.camera.id)
        try:
            write_input_file(path, self.camera.url)
        except OSError as exc:
            log.error("camera URL file not written: the URL goes on FFmpeg's command line",
                      camera_id=self.camera.id, error=str(exc))
            return None
        return path

    def health(self) -> dict:
        age = live_age(self.layout, self.camera.id, self.config.storage.live_segments)
        return {"online": age <= stale_after(self.config),
                "segment_age_s": round(age, 1) if age != float("inf") else None,
                "restarts": self.restarts,
                "mode": None if self.encode is None else ("encode" if self.encode else "copy"),
                "live": self.live_mode(),
                "archiving": ("ok" if self.archive_problem is None
                              else f"archiving stopped: {self.archive_problem}")}

    def reported(self) -> dict:
        """health() without what changes every second."""
        return {key: value for key, value in self.health().items() if key != "segment_age_s"}

    async def run(self, stop: asyncio.Event) -> None:
        self.input_file = self.hide_camera_url()
        backoff = 1.0
        while not stop.is_set():
            started = time.monotonic()
            reason = await self.run_once(stop)
            if stop.is_set():
                break
            if time.monotonic() - started > STABLE_RUN_SECONDS or self.listed_segments:
                backoff = 1.0
            # A run that was delivering video is restarted at once: players are waiting
            # on the live URL. One that produced nothing backs off.
            wait = 0.0 if self.listed_segments or reason in (ROOM_AGAIN, NO_FMP4) else backoff
            self.restarts += 1
            log.warning("ffmpeg restarting", camera_id=self.camera.id, reason=reason,
                        backoff_s=wait, restarts=self.restarts)
            if wait:
                await self.pause(stop, wait)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait before a restart; cut short when the disk that filled up has room again."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            if self.archive_failed_in_run and self.room_for_archives():
                return
            try:
                await asyncio.wait_for(stop.wait(), min(CHECK_INTERVAL, seconds))
            except asyncio.TimeoutError:
                pass

    async def decide_encoding(self) -> bool | None:
        """Copy or encode; None while an "auto" camera can't be reached to tell."""
        if self.encode is None:
            codec = None
            if self.camera.transcode == "auto" and not self.camera.url.startswith("lavfi:"):
                codec = await asyncio.to_thread(probe_codec, self.binary, self.camera.url,
                                                input_file=self.input_file)
                if codec is None:
                    return None
            self.encode = needs_encoding(self.camera, codec)
            self.codec = codec
            log.info("camera codec", camera_id=self.camera.id, codec=codec,
                     mode="encode" if self.encode else "copy")
        return self.encode

    async def run_once(self, stop: asyncio.Event) -> str:
        """One FFmpeg run; returns why it ended."""
        live = self.layout.live(self.camera.id)
        history = self.carry_over_live()
        self.run_start = history.next_sequence
        self.listed_segments = False
        encode = await self.decide_encoding()
        if encode is None:
            return "camera unreachable: no video stream found"
        low_latency = self.low_latency
        if low_latency:
            self.stream.start_run(history, self.run_start)
        elif self.stream.serving:
            self.stream.stop_serving()
        run_list = self.layout.partial(self.camera.id) / f"run-{time.time_ns()}.csv"
        command = camera_command(self.binary, self.camera, self.config.storage, live,
                                 self.layout.partial(self.camera.id), run_list, encode,
                                 self.run_start, self.input_file, low_latency=low_latency,
                                 codec=self.codec)
        self.archive_failed_in_run = False
        self.fmp4_failed_in_run = False
        stdout, reader, pipe = await open_pipe(PIPE_BYTES) if low_latency else (None, None, None)
        errors, error_reader, error_pipe = await open_pipe(LOG_LINE_BYTES)
        # Forked from the event-loop thread, so the parent-death signal stays armed.
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout if stdout is not None else asyncio.subprocess.DEVNULL,
                stderr=errors, start_new_session=True, env=child_env())
        finally:
            os.close(errors)  # FFmpeg holds the write ends: its exit is our end of file
            if stdout is not None:
                os.close(stdout)
        log.info("ffmpeg started", camera_id=self.camera.id, pid=proc.pid,
                 first_segment=self.run_start, live="fmp4" if low_latency else "mpegts")
        stderr = asyncio.create_task(self.log_stderr(error_reader))
        packager = asyncio.create_task(self.package(reader, proc)) if reader else None
        reason = await self.supervise(proc, stop, run_list, live)
        await stderr
        error_pipe.close()
        if packager is not None:
            await self.finish_packaging(packager)
            pipe.close()
        # carry_over_live removed the last run's playlist: one there now is this run's.
        self.listed_segments = (live / "index.m3u8").exists()
        hand_over_listed(self.layout, self.camera.id, run_list, 0)
        hand_over_leftovers(self.layout, self.camera.id, self.noticed)
        log.info("ffmpeg ended", camera_id=self.camera.id, reason=reason,
                 returncode=proc.returncode)
        return reason

    async def package(self, reader: asyncio.StreamReader, proc) -> None:
        """Cut FFmpeg's fMP4 into LL-HLS parts and segments until FFmpeg ends. A stream
        that cannot be read ends the run (FFmpeg is restarted): never the process."""
        try:
            await pump(reader, self.stream)
        except Exception as exc:  # noqa: BLE001 - any failure here must only end this run
            self.unexpected(log, "live fMP4 output unreadable: restarting ffmpeg",
                            camera_id=self.camera.id, error=str(exc))
            await self.kill_ffmpeg(proc)
        finally:
            self.stream.end_run()

    async def finish_packaging(self, packager: asyncio.Task) -> None:
        """FFmpeg has exited; the pipe ends with it (a child it left holding the pipe
        must not keep the run open)."""
        try:
            await asyncio.wait_for(asyncio.shield(packager), PUMP_DRAIN_SECONDS)
        except asyncio.TimeoutError:
            packager.cancel()
            await asyncio.gather(packager, return_exceptions=True)

    def carry_over_live(self) -> History:
        """Carry the ended run's segments into the served playlist's history, clear its
        playlist and half-written files; returns the history, whose next_sequence is the
        number the next run starts at."""
        live = self.layout.live(self.camera.id)
        playlist = live / "index.m3u8"
        try:
            ended_at, text = playlist.stat().st_mtime, playlist.read_text()
        except OSError:
            ended_at, text = 0.0, None
        history_path = self.layout.live_history(self.camera.id)
        history = carry_over(read_history(history_path), text, ended_at,
                             self.config.storage.live_segments, stale_after(self.config))
        if history.next_sequence is None:
            # First run ever: start from the clock, so numbers keep growing across reboots.
            history = dataclasses.replace(history, next_sequence=int(time.time()))
        try:
            write_history(history_path, history)
            playlist.unlink(missing_ok=True)
        except OSError as exc:
            log.error("live history not saved", camera_id=self.camera.id, error=str(exc))
        for entry in live.iterdir():
            if entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)  # FFmpeg's half-written segment or playlist
        return history

    def prune_live(self) -> None:
        """Delete earlier runs' segments once no playlist can list them; FFmpeg deletes
        its own run's. A removed segment stays downloadable for the spec's time."""
        storage = self.config.storage
        live = self.layout.live(self.camera.id)
        keep_seconds = stale_after(self.config) + \
            (2 * storage.live_segments + 2) * storage.segment_seconds
        window = served_window(self.layout, self.camera.id, storage.live_segments).segments
        listed = {s.sequence for s in window} | {int(INIT_URI.fullmatch(s.init).group(1))
                                                 for s in window if s.init}
        for entry in live.iterdir():
            # An earlier run's init file goes with the last of that run's segments.
            match = SEGMENT_URI.fullmatch(entry.name) or INIT_URI.fullmatch(entry.name)
            if match is None:
                if entry.name not in LIVE_FILES and not entry.name.endswith(".tmp") and \
                        self.noticed.first(entry):
                    log.warning("unexpected entry in live dir, left alone",
                                camera_id=self.camera.id, entry=str(entry))
                continue
            sequence = int(match.group(1))
            if sequence >= self.run_start or sequence in listed:
                continue
            if newest_age(entry) > keep_seconds and entry.is_file():
                entry.unlink(missing_ok=True)

    def room_for_archives(self) -> bool:
        try:
            return shutil.disk_usage(self.layout.partial(self.camera.id)).free >= ARCHIVE_ROOM_BYTES
        except OSError:
            return False

    def archive_written(self) -> bool:
        """Whether this run's archive file has footage in it."""
        try:
            return any(p.suffix == ".ts" and p.stat().st_size > 0
                       for p in self.layout.partial(self.camera.id).iterdir())
        except OSError:
            return False

    async def supervise(self, proc, stop: asyncio.Event, run_list: Path, live: Path) -> str:
        started = checked = time.monotonic()
        offset = 0
        stall_limit = max(4.0 * self.config.storage.segment_seconds, 10.0)
        while True:
            try:
                await asyncio.wait_for(proc.wait(), CHECK_INTERVAL)
                return f"exited with status {proc.returncode}"
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            if now - checked > CHECK_INTERVAL + LOOP_STALL_SECONDS:
                # FFmpeg kept recording meanwhile; the packager gets the start's grace to
                # catch up before an old playlist counts against FFmpeg.
                started = now
            checked = now
            offset = hand_over_listed(self.layout, self.camera.id, run_list, offset)
            self.prune()
            if stop.is_set():
                await self.stop_ffmpeg(proc)
                return "stopping"
            if self.fmp4_failed_in_run:
                await self.stop_ffmpeg(proc)
                return NO_FMP4
            if self.archive_failed_in_run and self.room_for_archives():
                log.warning("room for archives again: restarting ffmpeg",
                            camera_id=self.camera.id)
                await self.stop_ffmpeg(proc)
                return ROOM_AGAIN
            if self.archive_problem is not None and not self.archive_failed_in_run and \
                    self.archive_written():
                log.info("archiving again", camera_id=self.camera.id)
                self.archive_problem = None
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

    async def log_stderr(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            text = line.decode(errors="replace").strip()
            if text:
                self.read_ffmpeg_line(text)
                log.warning("ffmpeg says", camera_id=self.camera.id, line=text[:500])

    def read_ffmpeg_line(self, text: str) -> None:
        """Spot the live fMP4 output failing (tee's slave #0), the archive output failing
        (slave #1) or the disk filling up."""
        live_failed = LIVE_SLAVE_FAILED.search(text)
        if live_failed and self.low_latency:
            self.fmp4_failed_in_run = True
            self.fmp4_problem = live_failed.group(1) or "the live output failed"
            log.error("fMP4 live output failed: MPEG-TS segments without parts from now on",
                      camera_id=self.camera.id, reason=self.fmp4_problem)
            return
        failed = ARCHIVE_SLAVE_FAILED.search(text)
        if failed:
            self.archive_failed_in_run = True
            self.archive_problem = failed.group(1) or "the archive output failed"
            log.error("archiving stopped", camera_id=self.camera.id, reason=self.archive_problem)
        elif "No space left on device" in text:
            self.archive_failed_in_run = True
            self.archive_problem = self.archive_problem or "No space left on device"


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


async def open_pipe(limit: int) -> tuple[int, asyncio.StreamReader, asyncio.ReadTransport]:
    """A pipe for FFmpeg's fMP4 or its log: (write end for FFmpeg, reader of the other end
    (lines up to limit bytes), its transport). Enlarged to 1 MiB, so that FFmpeg's log
    does not fill it while this process is stopped (its live output drops frames rather
    than wait: ffmpeg.live_output)."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: the default 64 KiB still works
    reader = asyncio.StreamReader(limit=limit)
    loop = asyncio.get_running_loop()
    transport, _protocol = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0))
    return write_end, reader, transport
