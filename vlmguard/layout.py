"""Where each process's files live: the contract between them.

camera -> FFmpeg writes live/<cam>/ (HLS, in RAM) and partial/<cam>/<start>.ts (the archive
being written, on disk); the streamer moves a closed archive to closed/<cam>/; the archiver
moves it on to archives/<cam>/ and registers it. Moves are renames on one file system, so
an archive's bytes are written once, by FFmpeg. The archiver hard-links the live segments
of each analysis window into windows/<cam>/<start>/ (RAM too), where they stay until the
window is analysed. A file is only ever in one of these places.
An analyzer that stores an incident leaves its picture in snapshots/<cam>/<incident id>.jpg;
the archiver deletes it when the incident's footage is gone.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import time
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path

from vlmguard.errors import StartupError

ARCHIVE_NAME = re.compile(r"(\d{8}T\d{6}Z)\.(ts|mp4)")
ARCHIVE_TIME = "%Y%m%dT%H%M%SZ"


WINDOW_NAME = re.compile(r"(\d{8}T\d{6}Z)")
SHM = Path("/dev/shm")


def ram_root(data_dir: Path) -> Path:
    """The tmpfs folder for this data directory: systemd's RuntimeDirectory when the unit
    has one, else a /dev/shm folder named for the user and the data directory (two
    daemons with different data directories never share one)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime)
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        return SHM / f"vlmguard-{os.getuid()}-{digest}"
    return data_dir / "ram"  # no tmpfs here: correct, just not flash-friendly


def claim_private_dir(path: Path) -> None:
    """Make path a folder only this user can use, or refuse (StartupError) one that is not.

    /dev/shm is shared by every local user, and the folder's name is predictable (every
    process of this daemon derives it alone), so another user could make it first and
    feed the player and the model their own segments. It is made with mode 0700; one that
    exists is taken only when it is a real directory of this user that nobody else can
    write into (0700 is then restored: an earlier vlmguard made its folders 0755). /dev/shm
    is sticky, so once ours nobody else can rename or replace it.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(f"RAM folder {path}: cannot create it: {exc.strerror or exc}") from None
    problem = ram_problem(path)
    if problem:
        raise StartupError(problem)
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if stat.S_IMODE(os.fstat(descriptor).st_mode) != 0o700:
            os.fchmod(descriptor, 0o700)
    finally:
        os.close(descriptor)


def ram_problem(path: Path) -> str | None:
    """Why path may not be used as this user's private folder; None when it may (or does
    not exist yet)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"RAM folder {path}: cannot read it: {exc.strerror or exc}"
    fix = ("remove it, or set RUNTIME_DIRECTORY to a private folder (systemd's "
           "RuntimeDirectory does)")
    if not stat.S_ISDIR(info.st_mode):
        return f"RAM folder {path}: is not a directory (someone else made it first): {fix}"
    if info.st_uid != os.geteuid():
        return (f"RAM folder {path}: belongs to uid {info.st_uid}, not to this user "
                f"(uid {os.geteuid()}): someone else made it first; {fix}")
    if stat.S_IMODE(info.st_mode) & 0o022:
        return (f"RAM folder {path}: others may write into it (mode "
                f"{stat.S_IMODE(info.st_mode):04o}), so its files cannot be trusted; {fix}")
    return None


@dataclass(frozen=True)
class Layout:
    data_dir: Path

    @cached_property
    def ram(self) -> Path:
        return ram_root(Path(self.data_dir))

    @property
    def ram_is_shared(self) -> bool:
        """Whether the RAM folder sits in /dev/shm, where every local user may create."""
        return self.ram.parent == SHM

    def claim_ram(self) -> None:
        """Create or check the RAM folder before anything is written into it."""
        if self.ram_is_shared:
            claim_private_dir(self.ram)

    def ram_problem(self) -> str | None:
        return ram_problem(self.ram) if self.ram_is_shared else None

    def live(self, camera_id: str) -> Path:
        return self.ram / "live" / camera_id

    def windows(self, camera_id: str) -> Path:
        """One folder per analysis window: hard links to its live segments."""
        return self.ram / "windows" / camera_id

    def work(self) -> Path:
        """The analyzers' scratch space (reduced copies, frames): RAM, not the disk."""
        return self.ram / "work"

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
        self.claim_ram()
        for path in (self.live(camera_id), self.partial(camera_id), self.closed(camera_id),
                     self.archives(camera_id), self.windows(camera_id), self.work()):
            path.mkdir(parents=True, exist_ok=True)
        owner = self.ram / "data_dir.txt"  # whose folder this is (tests clean theirs up)
        if not owner.exists():
            owner.write_text(str(self.data_dir))

    def ram_bytes(self, windows_only: bool = False) -> int:
        """Bytes held in RAM: live segments plus analysis windows (a hard link counts
        once); windows_only: what the windows alone keep (segments FFmpeg has deleted)."""
        seen, total = set(), 0
        for root, _dirs, files in os.walk(self.ram / "windows" if windows_only else self.ram):
            for name in files:
                try:
                    info = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                if info.st_ino not in seen and not (windows_only and info.st_nlink > 1):
                    seen.add(info.st_ino)
                    total += info.st_size
        return total


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
