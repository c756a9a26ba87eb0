"""Video checked by FFmpeg itself, the RTSP test camera, and fabricated archives whose
frames say which second of their file they are.

The fabricated archives show a flat grey whose brightness grows 20 levels a second from
the file's start, so a decoded frame says which second of which file it is.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from vlmguard.layout import Layout

from helpers import make_config

TESTS = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
LEVELS_PER_SECOND = 20 * 255 / 219  # the ramp's grey levels a second, decoded full range


def ffprobe_duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                          "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    return float(json.loads(out.stdout)["format"]["duration"])


def decoded_frames(path_or_url: str, seconds: float | None = None) -> int:
    args = ["ffmpeg", "-v", "error", "-nostdin", "-i", path_or_url]
    if seconds:
        args += ["-t", str(seconds)]
    out = subprocess.run(args + ["-f", "null", "-progress", "pipe:1", "-"], capture_output=True,
                         text=True, timeout=120)
    frames = re.findall(r"^frame=(\d+)$", out.stdout, re.M)
    return int(frames[-1]) if frames else 0


def start_rtsp_camera(port: int) -> subprocess.Popen:
    camera = subprocess.Popen(["/usr/bin/python3", str(TESTS / "rtsp_camera.py"), str(port)],
                              stdout=subprocess.PIPE, text=True)
    assert camera.stdout.readline().strip() == "ready"
    return camera


def make_archive(path: Path, seconds: int = 10) -> None:
    """An H.264 archive with a keyframe every 2 s (like a camera's), grey ramp inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "nullsrc=s=64x48:r=10,geq=lum='16+20*T':cb=128:cr=128", "-t", str(seconds),
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "20", "-pix_fmt", "yuv420p",
                    str(path)], check=True, timeout=60)


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    """cam1: two 10-s MP4 archives back to back from T0, a gap, then two MPEG-TS ones
    from T0+60 s and two fragmented MP4 ones (which start at 0.2 s) from T0+120 s; cam2:
    nothing."""
    data = tmp_path_factory.mktemp("media") / "data"
    archives = Layout(data).archives("cam1")
    make_archive(archives / "20261126T080000Z.mp4")
    shutil.copy(archives / "20261126T080000Z.mp4", archives / "20261126T080010Z.mp4")
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(archives / "20261126T080000Z.mp4"),
                    "-c", "copy", str(archives / "20261126T080100Z.ts")], check=True, timeout=60)
    shutil.copy(archives / "20261126T080100Z.ts", archives / "20261126T080110Z.ts")
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(archives / "20261126T080000Z.mp4"),
                    "-c", "copy", "-movflags", "frag_keyframe+empty_moov+default_base_moof",
                    str(archives / "20261126T080200Z.mp4")], check=True, timeout=60)
    shutil.copy(archives / "20261126T080200Z.mp4", archives / "20261126T080210Z.mp4")
    return data


@pytest.fixture
def config(tmp_path, footage):
    return make_config(tmp_path, token="tok", cameras=("cam1", "cam2"), data_dir=footage)


def second_at(video: Path, at: float) -> float | None:
    """Which second of its archive the frame shown at `at` s into the video comes from."""
    proc = subprocess.run(["ffmpeg", "-v", "error", "-ss", str(at), "-i", str(video),
                           "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                          capture_output=True, timeout=60)
    pixels = proc.stdout
    return sum(pixels) / len(pixels) / LEVELS_PER_SECOND if pixels else None


def duration_of(video: Path) -> float:
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-i", str(video)], capture_output=True,
                          text=True, timeout=60)
    hours, minutes, seconds = proc.stderr.split("Duration: ")[1].split(",")[0].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
