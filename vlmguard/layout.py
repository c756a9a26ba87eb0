"""Where each process's files live under data_dir: the contract between them.

camera -> FFmpeg writes live/<cam>/ (HLS) and partial/<cam>/ (archive being written);
the streamer moves a closed archive to closed/<cam>/; the archiver remuxes it into
archives/<cam>/<start>.mp4 and registers it. A file is only ever in one of these places.
An analyzer that stores an incident leaves its picture in snapshots/<cam>/<incident id>.jpg;
the archiver deletes it when the incident's footage is gone.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ARCHIVE_NAME = re.compile(r"(\d{8}T\d{6}Z)\.(ts|mp4)")
ARCHIVE_TIME = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Layout:
    data_dir: Path

    def live(self, camera_id: str) -> Path:
        return self.data_dir / "live" / camera_id

    def live_history(self, camera_id: str) -> Path:
        """The segments the served playlist carries over from ended FFmpeg runs."""
        return self.live(camera_id) / "history.json"

    def camera_input(self, camera_id: str) -> Path:
        """The 0600 ffconcat file that hands FFmpeg the camera URL (off its command line)."""
        return self.data_dir / "run" / f"camera-{camera_id}.ffconcat"

    def partial(self, camera_id: str) -> Path:
        return self.data_dir / "partial" / camera_id

    def closed(self, camera_id: str) -> Path:
        return self.data_dir / "closed" / camera_id

    def archives(self, camera_id: str) -> Path:
        return self.data_dir / "archives" / camera_id

    def archive_root(self) -> Path:
        return self.data_dir / "archives"

    def footage_dirs(self, camera_id: str) -> tuple[Path, ...]:
        """Where a camera's recorded video may be, oldest stage last: a clip of the last
        minutes reads the archive FFmpeg is still writing."""
        return (self.archives(camera_id), self.closed(camera_id), self.partial(camera_id))

    def snapshots(self, camera_id: str) -> Path:
        return self.data_dir / "snapshots" / camera_id

    def snapshot(self, camera_id: str, incident_id: int) -> Path:
        """The JPEG of an incident's middle frame (it may not exist: no footage, or gone)."""
        return self.snapshots(camera_id) / f"{int(incident_id)}.jpg"

    def make_dirs(self, camera_id: str) -> None:
        for path in (self.live(camera_id), self.partial(camera_id), self.closed(camera_id),
                     self.archives(camera_id)):
            path.mkdir(parents=True, exist_ok=True)


def snapshot_path(data_dir: Path, camera_id: str, incident_id: int) -> Path:
    """data_dir/snapshots/<camera>/<incident id>.jpg: the one place that says so."""
    return Layout(Path(data_dir)).snapshot(camera_id, incident_id)


def snapshot_id(path: Path) -> int | None:
    """The incident id a snapshot file is named for, or None for anything else."""
    stem, dot, ext = path.name.partition(".")
    return int(stem) if ext == "jpg" and stem.isascii() and stem.isdigit() else None


def archive_start(path: Path) -> datetime | None:
    """The UTC start time FFmpeg wrote into an archive's name, or None if not one of ours."""
    match = ARCHIVE_NAME.fullmatch(path.name)
    if not match:
        return None
    try:
        return datetime.strptime(match.group(1), ARCHIVE_TIME).replace(tzinfo=timezone.utc)
    except ValueError:
        return None  # shaped like ours but no such time (20261131T000000Z): a stray file


def playlist_age(live_dir: Path) -> float:
    """Seconds since FFmpeg last replaced the live playlist; inf when there is none."""
    try:
        return time.time() - (live_dir / "index.m3u8").stat().st_mtime
    except OSError:
        return math.inf


def stale_after(config) -> float:
    """A playlist older than this means FFmpeg is not producing: the camera is offline."""
    return max(3.0 * config.storage.segment_seconds, 6.0)
