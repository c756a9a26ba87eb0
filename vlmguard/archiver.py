"""The archiver process: closed archives are filed, footage becomes jobs, old archives go.

It moves what the streamer handed over in closed/<camera>/ (MPEG-TS files FFmpeg has
finished with) to archives/<camera>/ - a rename: the archive's bytes were written once, by
FFmpeg. With analysis.window_seconds = 0 each archive is a job. Otherwise the jobs are
clock-aligned windows cut from the live segments in RAM (windows.py); at start, footage on
disk that no job covers (recorded while analysis was down) becomes archive-sized catch-up
jobs, claimed after the live windows. When a camera's analysis lags more than
analysis.max_lag_seconds, its waiting windows are merged into longer jobs. Registering is
idempotent, so a crash or a stop leaves nothing behind that the next start misses.
Retention deletes the oldest archives, and with them the snapshots of incidents that
have no footage left.

Filing never needs the database. While it is away (down at start, cut off, locked by
another program) archives are still filed and windows still cut; what could not be
registered is registered by the same catch-up scan once the database answers again, and
retention goes on with what it last knew of kept and unanalysed archives.
"""

from __future__ import annotations

import errno
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from vlmguard.clips import recordings
from vlmguard.config import Config
from vlmguard.ffmpeg import ffmpeg_binary, media_duration
from vlmguard.child import ChildState, every, on_stop
from vlmguard.health import Beat
from vlmguard.layout import Layout, archive_start, snapshot_id, stale_after
from vlmguard.logs import Noticed, configure_logging, get_logger
from vlmguard.outage import Outage
from vlmguard.recordings import SidecarWriter, held_names, sweep_sidecars
from vlmguard.store.database import Database
from vlmguard.store.engines import is_outage
from vlmguard.store.queue import JobQueue
from vlmguard.store.records import utcnow
from vlmguard.store.recordings import RecordingsIndex
from vlmguard.windows import JOB_FILE, WindowCutter, adjacent_groups, archive_sources

log = get_logger("vlmguard.archiver")

LOOP_SECONDS = 1.0
RETENTION_EVERY_SECONDS = 30.0
HOUSEKEEPING_SECONDS = 5.0
# Windows are clock-aligned and back to back, so any gap in them is footage missed; under
# a second is rounding, not footage.
CATCH_UP_LEAST_SECONDS = 1.0
GB = 1_000_000_000
MB = 1_000_000
STALE_STAGED_SECONDS = 3600


def main(config: Config, beat: Beat = Beat()) -> None:
    """Entry point of the archiver process."""
    configure_logging("archiver")
    stopping = threading.Event()
    on_stop(stopping.set)
    with Database.from_config(config, lazy=True) as db:
        archiver = Archiver(config, JobQueue.from_config(db, config), RecordingsIndex(db),
                            ChildState(config.data_dir, "archiver"))
        beat()
        housekeeping = every(HOUSEKEEPING_SECONDS, archiver.housekeeping_turn)
        retention = every(RETENTION_EVERY_SECONDS, archiver.enforce_retention)
        while not stopping.is_set():
            beat()
            if archiver.behind and archiver.outage.due():
                archiver.with_database(archiver.catch_up)
            archiver.finalize_closed()
            archiver.cut_windows()
            housekeeping()
            retention()
            stopping.wait(LOOP_SECONDS)
        # The supervisor stops the streamer first: register what it closed on the way out,
        # and the window it was in the middle of.
        archiver.finalize_closed()
        archiver.flush_windows()
        archiver.sidecars.stop()
    log.info("archiver stopped")


@dataclass(frozen=True)
class ArchiveFile:
    camera_id: str
    path: Path
    start: datetime
    size: int


class Archiver:
    def __init__(self, config: Config, queue: JobQueue, recordings: RecordingsIndex,
                 state: ChildState | None = None):
        self.config = config
        self.queue = queue  # registers archives and windows, merges lagging windows
        self.recordings = recordings  # what retention must keep
        self.db = queue.db
        self.published = state or ChildState()
        self.layout = Layout(config.data_dir)
        self.binary = ffmpeg_binary()
        self.noticed = Noticed()
        self.outage = Outage("archiver")
        # Footage may be on disk that no job covers yet: at start, and after any outage
        # of the database. The catch-up scan clears it.
        self.behind = True
        # What retention last read of kept and unanalysed archives (used while the
        # database is away).
        self.kept: set[str] = set()
        self.in_flight: set[str] = set()
        self.protected_at: datetime | None = None
        self.window_seconds = config.analysis.window_seconds
        self.ram_bytes = 0
        self.evicted = 0
        self.cutters = {}
        self.sidecars = SidecarWriter(self.layout, self.binary, self.published.unexpected)
        for camera in config.cameras:
            self.layout.make_dirs(camera.id)
            if self.window_seconds:
                self.cutters[camera.id] = WindowCutter(
                    self.layout, camera.id, self.window_seconds,
                    stale_after(config) + config.storage.segment_seconds,
                    self.window_registrar(camera.id))

    def window_registrar(self, camera_id: str):
        def register(clip: Path, start: datetime, end: datetime, clip_start: datetime,
                     sources: list) -> int | None:
            self.outage.check()
            self.db.ensure_ready()
            return self.queue.register(camera_id, clip, start, end, kind="window",
                                       clip_start=clip_start, sources=sources,
                                       max_retries=self.config.analysis.max_retries)
        return register

    def state(self) -> dict:
        return {"state": "running", "ram_bytes": self.ram_bytes,
                "ram_max_bytes": self.config.storage.ram_max_mb * MB,
                "windows_evicted": self.evicted, "database": self.outage.describe()}

    def housekeeping_turn(self) -> None:
        self.with_database(self.housekeeping)
        self.bound_unregistered()
        self.published.publish(self.state())

    def with_database(self, step) -> bool:
        """Run a step that needs the database; while it is away the step is skipped (and
        tried again after the outage's wait). True when it ran."""
        try:
            self.outage.check()
            self.db.ensure_ready()
            step()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.lost_database(exc)
            return False
        if self.outage.back():
            self.behind = True  # what was filed meanwhile is registered now
        return True

    def lost_database(self, exc: Exception) -> None:
        if not self.outage.down or self.outage.due():
            self.outage.failed(exc)
        self.behind = True

    def catch_up(self) -> None:
        """Register what a crash, a stop or an outage of the database left unregistered.
        Only unknown archives are probed: a week of archives is thousands of files, each
        an FFmpeg run to measure."""
        for camera in self.config.cameras:
            self.sidecars.add_missing(camera.id, 2.0 * self.config.storage.archive_seconds)
        self.finalize_closed()
        self.behind = False
        if self.window_seconds:
            for cutter in self.cutters.values():
                cutter.close_past()  # windows a crash left in RAM
            self.catch_up_gaps()
            return
        known = self.recordings.registered_paths()
        for archive in self.archives():
            if str(archive.path) not in known:
                self.register(archive.camera_id, archive.path)

    def catch_up_gaps(self) -> None:
        """Footage on disk that no job covers (analysis was down, windows were lost)
        becomes catch-up jobs, one per archive, oldest first."""
        by_camera: dict[str, list[ArchiveFile]] = {}
        for archive in self.archives():
            by_camera.setdefault(archive.camera_id, []).append(archive)
        least = timedelta(seconds=CATCH_UP_LEAST_SECONDS)
        for camera_id, archives in by_camera.items():
            spans = self.queue.job_spans(camera_id, since=archives[0].start)
            if camera_id in self.cutters:
                spans += self.cutters[camera_id].open_spans()
            for n, archive in enumerate(archives):
                limit = archive.start + timedelta(seconds=self.config.storage.archive_seconds)
                if n + 1 < len(archives):
                    limit = min(limit, archives[n + 1].start)
                if not uncovered(archive.start, limit, spans, least):
                    continue
                duration = media_duration(self.binary, archive.path) or 0.0
                end = min(limit, archive.start + timedelta(seconds=duration))
                for low, high in uncovered(archive.start, end, spans, least):
                    self.register_catch_up(archive, low, high)

    def register_catch_up(self, archive: "ArchiveFile", low: datetime, high: datetime) -> None:
        offset = (low - archive.start).total_seconds()
        sources = [{"path": str(archive.path), "offset_s": round(offset, 3),
                    "duration_s": round((high - low).total_seconds(), 3)}]
        job_id = self.queue.register(archive.camera_id, archive.path, low, high,
                                     kind="catchup", clip_start=low, sources=sources,
                                     max_retries=self.config.analysis.max_retries)
        if job_id is not None:
            log.info("footage not analysed yet: catch-up job", camera_id=archive.camera_id,
                     job_id=job_id, file=archive.path.name, offset_s=round(offset, 1),
                     seconds=round((high - low).total_seconds(), 1))

    def cut_windows(self) -> None:
        """Link live segments into their windows, and register the complete ones; while
        the database is away the windows wait in RAM (bound_unregistered keeps that
        bounded) and are registered when it is back."""
        for cutter in self.cutters.values():
            try:
                cutter.step()
            except OSError as exc:
                log.error("window not cut, will retry", camera_id=cutter.camera_id,
                          error=str(exc))
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.lost_database(exc)

    def flush_windows(self) -> None:
        for cutter in self.cutters.values():
            try:
                cutter.flush()
            except OSError as exc:
                log.error("window not registered on stop", camera_id=cutter.camera_id,
                          error=str(exc))
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # The catch-up scan at the next start registers its footage.
                log.warning("window not registered on stop: the database is away",
                            camera_id=cutter.camera_id, error=str(exc))

    def bound_unregistered(self) -> None:
        """While the database is away, complete windows cannot become jobs and stay in
        RAM: past storage.ram_max_mb the oldest go (their footage is in the archives,
        which the catch-up scan registers once the database is back)."""
        if not self.outage.down or not self.cutters:
            return
        budget = self.config.storage.ram_max_mb * MB
        for cutter in self.cutters.values():
            for folder in waiting_windows(cutter):
                if self.layout.ram_bytes(windows_only=True) <= budget:
                    return
                shutil.rmtree(folder, ignore_errors=True)
                self.evicted += 1
                log.warning("database away and RAM for windows full: window dropped from "
                            "RAM, the catch-up scan registers its footage from the archive",
                            camera_id=cutter.camera_id, window=folder.name)

    def housekeeping(self) -> None:
        """Windows analysed leave RAM; lagging cameras' windows merge; RAM stays bounded."""
        if not self.cutters:
            self.ram_bytes = self.layout.ram_bytes()
            return
        for camera_id, cutter in self.cutters.items():
            cutter.sweep(self.queue.job_spans(camera_id, in_flight=True))
        lags = self.queue.lag_seconds()
        for camera_id, lag in lags.items():
            if lag > self.config.analysis.max_lag_seconds and camera_id in self.cutters:
                self.merge_lagging(camera_id, lag)
        budget = self.config.storage.ram_max_mb * MB
        while self.layout.ram_bytes(windows_only=True) > budget and self.evict_one():
            self.evicted += 1
        self.ram_bytes = self.layout.ram_bytes()

    def evict_one(self) -> bool:
        for camera_id, cutter in self.cutters.items():
            pending = [(j.segment_start, j.segment_end)
                       for j in self.queue.pending_windows(camera_id)]
            if cutter.evict(pending):
                return True
        return False

    def merge_lagging(self, camera_id: str, lag: float) -> None:
        """Fewer, longer requests for the same frames: back-to-back waiting windows are
        merged, up to one archive's length each."""
        cutter = self.cutters[camera_id]
        longest = timedelta(seconds=max(self.config.storage.archive_seconds, 2 * self.window_seconds))
        for group in adjacent_groups(self.queue.pending_windows(camera_id), longest):
            start, end = group[0].segment_start, group[-1].segment_end
            clip = cutter.merged_clip(start, end, [j.video_path for j in group])
            first = group[0].first_frame_at
            sources = archive_sources(self.layout, camera_id, first.timestamp(),
                                      end.timestamp())
            path = str(clip) if clip else (sources[0]["path"] if sources else group[0].video_path)
            if self.queue.merge_jobs(group[0], group[1:], path, sources):
                log.warning("analysis lagging: windows merged into one job",
                            camera_id=camera_id, lag_s=round(lag), windows=len(group),
                            job_id=group[0].id, seconds=(end - start).total_seconds())

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
        """File the archive as it is: a rename, so its bytes reach the disk once."""
        target = self.layout.archives(camera_id) / closed.name
        try:
            try:
                closed.rename(target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self.copy_across(camera_id, closed, target)
        except OSError as exc:
            log.error("archive not finalized, will retry", camera_id=camera_id,
                      file=str(closed), error=str(exc))
            return
        log.info("archive filed", camera_id=camera_id, file=target.name)
        self.sidecars.add(camera_id, target)  # keyframe index and minute thumbnails
        if not self.window_seconds and not self.behind:
            self.with_database(lambda: self.register(camera_id, target))

    def copy_across(self, camera_id: str, closed: Path, target: Path) -> None:
        """archives/ on another file system than closed/ (a mount of its own): the file
        is copied, which writes it a second time; said once, as it wears flash."""
        if self.noticed.first(Path("exdev")):
            log.warning("archives are on another file system than partial/ and closed/: "
                        "each archive is copied, written twice; keep them on one file "
                        "system", camera_id=camera_id)
        temp = target.with_name(target.name + ".part")
        shutil.copyfile(closed, temp)
        temp.rename(target)
        closed.unlink()

    def register(self, camera_id: str, path: Path) -> None:
        start = archive_start(path)
        duration = media_duration(self.binary, path) or 0.0
        job_id = self.queue.register(camera_id, path, start, start + timedelta(seconds=duration),
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

    def read_protected(self) -> None:
        self.in_flight = self.recordings.in_flight_paths()
        self.kept = self.recordings.kept_paths()
        self.protected_at = utcnow()

    def enforce_retention(self) -> None:
        """Oldest first: past retention_days, over max_disk_gb, or under min_free_gb;
        never an archive a person keeps (the console's "keep") until it is released.
        While the database is away, what it said last stands; archives filed since are
        not registered yet, so they count as unanalysed."""
        storage = self.config.storage
        current = self.with_database(self.read_protected)
        in_flight, kept = self.in_flight, self.kept
        archives = self.archives()
        if not current:
            recent = (self.protected_at - timedelta(seconds=storage.archive_seconds)
                      if self.protected_at else None)
            in_flight = in_flight | {str(a.path) for a in archives
                                     if recent is None or a.start >= recent}
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
            if (archive.camera_id, archive.path.name) in held_names(self.layout):
                continue  # being exported: kept until the export is done
            if unanalysed:
                log.error("deleting an archive not yet analysed: the disk is nearly full",
                          camera_id=archive.camera_id, file=archive.path.name,
                          free_gb=round(free / GB, 2), min_free_gb=storage.min_free_gb)
            if self.delete(archive):
                total -= archive.size
                free += archive.size
                pruned.add(archive.camera_id)
        for camera_id in pruned:
            self.with_database(lambda camera_id=camera_id: self.prune_snapshots(camera_id))
        for camera in self.config.cameras:
            sweep_sidecars(self.layout, camera.id)  # index and thumbnails go with the footage

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
        for incident_id in self.recordings.incidents_ended_before(camera_id, oldest, list(files)):
            files[incident_id].unlink(missing_ok=True)

    def delete(self, archive: ArchiveFile) -> bool:
        try:
            archive.path.unlink()
        except OSError as exc:
            log.error("cannot delete archive", file=str(archive.path), error=str(exc))
            return False
        log.info("archive deleted", camera_id=archive.camera_id, file=archive.path.name)
        return True


def waiting_windows(cutter: WindowCutter) -> list[Path]:
    """A camera's windows that are over but not registered yet, oldest first."""
    now = time.time()
    return [folder for folder in cutter.folders()
            if not (folder / JOB_FILE).exists()
            and (begun := cutter.start_of(folder)) is not None and cutter.end_of(begun) <= now]


def uncovered(start: datetime, end: datetime, spans: list[tuple[datetime, datetime]],
              least: timedelta) -> list[tuple[datetime, datetime]]:
    """The parts of [start, end) no span covers, each at least `least` long."""
    gaps, cursor = [], start
    for low, high in sorted(spans):
        if high <= cursor:
            continue
        if low >= end:
            break
        if low > cursor:
            gaps.append((cursor, low))
        cursor = max(cursor, high)
    if cursor < end:
        gaps.append((cursor, end))
    return [(a, b) for a, b in gaps if b - a >= least]
