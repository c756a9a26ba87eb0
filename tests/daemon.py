"""Run the streaming and archiver processes for a test, as the supervisor will."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from vlmguard import archiver, streamer
from vlmguard.config import load_config

from conftest import write_config

SPAWN = multiprocessing.get_context("spawn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    def __init__(self, directory: Path, camera_url: str = "lavfi:testsrc2=size=320x240:rate=25",
                 archive_seconds: int = 10, extra: str = ""):
        self.port = free_port()
        self.data_dir = directory / "data"
        self.config_path = write_config(directory, f"""
            [server]
            port = {self.port}
            [storage]
            data_dir = "{self.data_dir}"
            segment_seconds = 1
            archive_seconds = {archive_seconds}
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
                    if response.status == 200 and b".ts" in response.read():
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
        for proc in (self.streamer, self.archiver):
            if proc is not None and proc.is_alive():
                proc.terminate()
        for proc in (self.streamer, self.archiver):
            if proc is not None:
                proc.join(timeout=20)
                if proc.is_alive():
                    proc.kill()
