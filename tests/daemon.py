"""Run the streaming and archiver processes for a test, as the supervisor will."""

from __future__ import annotations

import multiprocessing
import subprocess
import time
import urllib.request
from pathlib import Path

from vlmguard import archiver, streamer
from vlmguard.config import load_config
from vlmguard.health import run_dir

from helpers import free_port, write_config

SPAWN = multiprocessing.get_context("spawn")


class Daemon:
    def __init__(self, directory: Path, camera_url: str = "lavfi:testsrc2=size=320x240:rate=25",
                 archive_seconds: int = 10, extra: str = "",
                 analysis: str = "window_seconds = 0", server: str = "",
                 segment_seconds: int = 1):
        self.port = free_port()
        self.data_dir = directory / "data"
        self.config_path = write_config(directory, f"""
            [server]
            port = {self.port}
            {server}
            [storage]
            data_dir = "{self.data_dir}"
            segment_seconds = {segment_seconds}
            archive_seconds = {archive_seconds}
            [analysis]
            {analysis}
            [[cameras]]
            id = "cam1"
            url = "{camera_url}"
            {extra}
        """)
        self.config = load_config(self.config_path)
        self.streamer = self.archiver = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/live/cam1/index.m3u8"

    def start(self) -> "Daemon":
        self.start_streamer()
        self.archiver = SPAWN.Process(target=archiver.main, args=(self.config,), name="archiver")
        self.archiver.start()
        return self

    def start_streamer(self) -> None:
        self.streamer = SPAWN.Process(target=streamer.main, args=(self.config,), name="streamer")
        self.streamer.start()

    def wait_live(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200 and b"seg-" in response.read():
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{self.url} never went live")

    def ffmpeg_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"ffmpeg.*{self.data_dir}/"], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        """In the supervisor's order: the streamer closes the open archive, then the
        archiver registers it on its way out."""
        for proc in (self.streamer, self.archiver):
            if proc is None:
                continue
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()


class RunningVlmguard:
    """`vlmguard run` as systemd would start it: a real process, logs to a file."""

    def __init__(self, directory: Path, gemini_url: str | None, *, workers: int = 2, extra: str = "",
                 daemon: str = "", env: dict | None = None, cameras: str | None = None,
                 analysis: str = "", window_seconds: int = 0, segment_seconds: int = 1,
                 server: str = ""):
        self.port = free_port()
        self.directory = directory
        self.data_dir = directory / "data"
        self.log_path = directory / "vlmguard.log"
        self.config_path = directory / "config.toml"
        self.env = env or {}
        cameras = cameras or '[[cameras]]\nid = "cam1"\nurl = "lavfi:testsrc2=size=320x240:rate=25"\n'
        # No gemini_url: the test writes its own [providers.*] tables in extra.
        gemini = f'[gemini]\nbase_url = "{gemini_url}"\ntimeout_seconds = 60' if gemini_url else ""
        self.config_path.write_text(f"""
[server]
port = {self.port}
{server}
[storage]
data_dir = "{self.data_dir}"
segment_seconds = {segment_seconds}
archive_seconds = 10
[analysis]
workers = {workers}
lease_seconds = 5
retry_backoff_seconds = 0.5
poll_seconds = 0.5
window_seconds = {window_seconds}
{analysis}
{gemini}
[daemon]
stop_timeout_seconds = 15
{daemon}
{extra}
{cameras}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RunningVlmguard":
        import os
        import sys
        env = {**os.environ, "GEMINI_API_KEY": "test-key-123", **self.env}
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config",
                                      str(self.config_path)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        return self

    def url(self, camera: str = "cam1") -> str:
        return f"http://127.0.0.1:{self.port}/live/{camera}/index.m3u8"

    def wait_live(self, camera: str = "cam1", timeout: float = 40, token: str = "") -> None:
        url = self.url(camera) + (f"?token={token}" if token else "")
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if b"seg-" in response.read():
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{camera} never went live:\n{self.log_text()[-3000:]}")

    def child_pid(self, name: str) -> int | None:
        import json
        try:
            return json.loads((run_dir(self.data_dir) / f"{name}.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_events(self) -> list[dict]:
        import json
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def stop(self, signum: int = 15, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
