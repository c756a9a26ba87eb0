"""The archiver process: closed archives become MP4 files and jobs; old ones are deleted.

It only reads what the streamer handed over in closed/<camera>/ (MPEG-TS files FFmpeg has
finished with), remuxes each into archives/<camera>/<start>.mp4 without re-encoding, and
registers it. Registering is idempotent, so on start it simply registers every archive on
disk again: whatever a crash or a stop left behind is caught up. Retention deletes the
oldest archives, and with them the snapshots of incidents that have no footage left.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from vlmguard.config import Config
from vlmguard.ffmpeg import ffmpeg_binary, media_duration, remux_to_mp4
from vlmguard.health import Beat, write_state
from vlmguard.clips import recordings
from vlmguard.layout import Layout, archive_start, snapshot_id
from vlmguard.logs import Noticed, configure_logging, get_logger
from vlmguard.store import JobStore, utcnow

log = get_logger("vlmguard.archiver")

LOOP_SECONDS = 1.0
RETENTION_EVERY_SECONDS = 30.0
GB = 1_000_000_000
STALE_STAGED_SECONDS = 3600


def main(config: Config, beat: Beat = Beat()) -> None:
    """Entry point of the archiver process."""
    configure_logging("archiver")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    with JobStore.from_config(config) as store:
        archiver = Archiver(config, store)
        beat()
        archiver.catch_up()
        last_retention = 0.0
        while not stopping.is_set():
            beat()
            archiver.finalize_closed()
            if time.monotonic() - last_retention > RETENTION_EVERY_SECONDS:
                archiver.enforce_retention()
                last_retention = time.monotonic()
                write_state(config.data_dir, "archiver", {"state": "running"})
            stopping.wait(LOOP_SECONDS)
        # The supervisor stops the streamer first: register what it closed on the way out.
        archiver.finalize_closed()
    log.info("archiver stopped")


@dataclass(frozen=True)
class ArchiveFile:
    camera_id: str
    path: Path
    start: datetime
    size: int


class Archiver:
    def __init__(self, config: Config, store: JobStore):
        self.config = config
        self.store = store
        self.layout = Layout(config.data_dir)
        self.binary = ffmpeg_binary()
        self.noticed = Noticed()
        for camera in config.cameras:
            self.layout.make_dirs(camera.id)

    def catch_up(self) -> None:
        """Register what a crash or a stop left unregistered. Only unknown archives are
        probed: a week of archives is thousands of files, each an FFmpeg run to measure."""
        self.finalize_closed()
        known = self.store.registered_paths()
        for archive in self.archives():
            if str(archive.path) not in known:
                self.register(archive.camera_id, archive.path)

    def finalize_closed(self) -> None:
        for camera in self.config.cameras:
            for closed in sorted(self.layout.closed(camera.id).glob("*.ts")):
                if self.is_archive(camera.id, closed):
                    self.finalize(camera.id, closed)

    def is_archive(self, camera_id: str, path: Path) -> bool:
        """A file named as FFmpeg names archives; anything else is logged once and skipped."""
        if archive_start(path) is not None and path.is_file():
            return True
        if self.noticed.first(path):
            log.warning("not an archive, left alone", camera_id=camera_id, file=str(path))
        return False

    def finalize(self, camera_id: str, closed: Path) -> None:
        target = self.layout.archives(camera_id) / f"{closed.stem}.mp4"
        partial = target.with_name(target.name + ".part")
        try:
            if remux_to_mp4(self.binary, closed, partial):
                partial.rename(target)
                closed.unlink()
            else:
                # Unreadable as video, or no room for a copy: keep the footage as it is;
                # the analyzer will say what is wrong with it rather than it vanishing.
                partial.unlink(missing_ok=True)
                target = self.layout.archives(camera_id) / closed.name
                closed.rename(target)
                log.error("archive kept as MPEG-TS: remux failed", camera_id=camera_id,
                          file=str(target))
        except OSError as exc:
            log.error("archive not finalized, will retry", camera_id=camera_id,
                      file=str(closed), error=str(exc))
            return
        self.register(camera_id, target)

    def register(self, camera_id: str, path: Path) -> None:
        start = archive_start(path)
        duration = media_duration(self.binary, path) or 0.0
        job_id = self.store.register(camera_id, path, start, start + timedelta(seconds=duration),
                                     max_retries=self.config.analysis.max_retries)
        if job_id is not None:
            log.info("archive registered", camera_id=camera_id, job_id=job_id,
                     file=path.name, duration_s=round(duration, 2))

    def archives(self) -> list[ArchiveFile]:
        found = []
        for camera in self.config.cameras:
            for path in self.layout.archives(camera.id).iterdir():
                if path.name.endswith(".part") or not self.is_archive(camera.id, path):
                    continue
                start = archive_start(path)
                try:
                    found.append(ArchiveFile(camera.id, path, start, path.stat().st_size))
                except FileNotFoundError:
                    continue
        return sorted(found, key=lambda a: a.start)

    def enforce_retention(self) -> None:
        """Oldest first: past retention_days, over max_disk_gb, or under min_free_gb;
        never an archive a person keeps (the console's "keep") until it is released."""
        storage = self.config.storage
        in_flight = self.store.in_flight_paths()
        kept = self.store.kept_paths()
        archives = self.archives()
        total = sum(a.size for a in archives)
        free = shutil.disk_usage(self.layout.data_dir).free
        cutoff = utcnow() - timedelta(days=storage.retention_days)
        pruned: set[str] = set()
        for archive in archives:
            expired = storage.retention_days > 0 and archive.start < cutoff
            over_budget = storage.max_disk_gb > 0 and total > storage.max_disk_gb * GB
            disk_filling = free < storage.min_free_gb * GB
            if not (expired or over_budget or disk_filling) or str(archive.path) in kept:
                continue
            unanalysed = str(archive.path) in in_flight
            if unanalysed and not disk_filling:
                continue
            if unanalysed:
                log.error("deleting an archive not yet analysed: the disk is nearly full",
                          camera_id=archive.camera_id, file=archive.path.name,
                          free_gb=round(free / GB, 2), min_free_gb=storage.min_free_gb)
            if self.delete(archive):
                total -= archive.size
                free += archive.size
                pruned.add(archive.camera_id)
        for camera_id in pruned:
            self.prune_snapshots(camera_id)

    def prune_snapshots(self, camera_id: str) -> None:
        """An incident's picture goes with the last of its footage: when it ended before
        the camera's oldest recording left on disk. A picture staged by an analyzer that
        died before its commit is swept once it is an hour old."""
        for staged in self.layout.snapshots(camera_id).glob("*.part"):
            try:
                if time.time() - staged.stat().st_mtime > STALE_STAGED_SECONDS:
                    staged.unlink()
            except OSError:
                continue
        files = {snapshot_id(p): p for p in self.layout.snapshots(camera_id).glob("*.jpg")}
        files.pop(None, None)
        if not files:
            return
        left = recordings(self.layout, camera_id)
        oldest = left[0].start if left else utcnow()
        for incident_id in self.store.incidents_ended_before(camera_id, oldest, list(files)):
            files[incident_id].unlink(missing_ok=True)

    def delete(self, archive: ArchiveFile) -> bool:
        try:
            archive.path.unlink()
        except OSError as exc:
            log.error("cannot delete archive", file=str(archive.path), error=str(exc))
            return False
        log.info("archive deleted", camera_id=archive.camera_id, file=archive.path.name)
        return True
