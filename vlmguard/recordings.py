"""Recorded footage by time: the spans on disk, HLS playlists over the archives as they are,
exports, timeline thumbnails, and the holds that keep exported archives from retention.

Nothing here copies an archive. A camera's footage is its archive files (found through
clips.recordings in partial/, closed/ and archives/, named for their wall-clock start);
footage.py reads each file's extent and keyframes without FFmpeg. So:
- spans: each file covers [name time, name time + its duration); files closer than
  GAP_SECONDS (the names' one-second precision) join into one span; the rest are gaps.
  The live playlist (live_edge) says how far the camera's video reaches right now.
- a playlist: each file's keyframes grouped into segments of at least SEGMENT_SECONDS,
  each a byte range of the MPEG-TS archive from the PAT before one keyframe to the PAT
  before the next (players decode each on its own), with its EXT-X-PROGRAM-DATE-TIME from
  the file's name and the keyframe's time, and an EXT-X-DISCONTINUITY at every file
  boundary (each archive's timestamps start again). An MP4 archive's segments are cut by
  FFmpeg with -c copy into MPEG-TS on request, in memory.
- the keyframe index of a file is read from its sidecar, index/<cam>/<stem>/keyframes.json,
  which the archiver writes when it files the archive (the file is then in the page cache),
  together with one small JPEG per minute (index/<cam>/<stem>/<minute>.jpg). A sidecar
  folder goes when its archive goes (sweep_sidecars). Files without one (the archive
  being written, older footage) are scanned on demand and the index kept in memory.
- an export holds its files (run/holds/<id>.json, locked while it runs): retention skips
  held archives, and a lock that is free again means the exporter is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from vlmguard.child import ChildState
from vlmguard.clips import Footage, recordings
from vlmguard.errors import VlmguardError
from vlmguard.ffmpeg import child_env, last_line, parent_death_prefix
from vlmguard.footage import (PACKET, Extent, FootageError, KeyframeIndex, extent,
                              keyframe_bytes, mp4_keyframes, scan_ts)
from vlmguard.layout import Layout, archive_start
from vlmguard.livelist import program_date, served_window
from vlmguard.logs import get_logger
from vlmguard.times import iso

log = get_logger("vlmguard.recordings")

SEGMENT_SECONDS = 6.0  # Apple's recommendation; a segment is whole GOPs of at least this
GAP_SECONDS = 1.5  # names have one-second precision: closer files are back to back
LONGEST_FILE_SECONDS = 3600 + 120  # archive_seconds' ceiling, plus a restart's slack
MAX_PLAYLIST_SECONDS = 24 * 3600
MAX_EXPORT_SECONDS = 3600
MAX_LIST_SECONDS = 31 * 24 * 3600
THUMB_WIDTH = 160
INDEX_FILE = "keyframes.json"
MINUTE = "%Y%m%dT%H%MZ"
EXTENTS_KEPT = 50_000
INDEXES_KEPT = 256
HALF_FRAME = 0.02


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def index_root(layout: Layout, camera_id: str) -> Path:
    """Sidecars of the camera's archives: one folder per archive, named for its stem."""
    return layout.data_dir / "index" / camera_id


def sidecar_dir(layout: Layout, camera_id: str, name: str) -> Path:
    return index_root(layout, camera_id) / Path(name).stem


def holds_dir(layout: Layout) -> Path:
    return layout.data_dir / "run" / "holds"


# -- what is on disk --------------------------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    """One file of footage: its name's wall-clock start and what the container says."""
    path: Path
    start: datetime
    extent: Extent
    growing: bool  # FFmpeg is still writing it (partial/)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.extent.duration)

    def wall(self, file_time: float) -> datetime:
        """The wall-clock time of a moment in the file's own clock."""
        return self.start + timedelta(seconds=file_time - self.extent.first)

    def file_time(self, when: datetime) -> float:
        return self.extent.first + (when - self.start).total_seconds()


class Catalog:
    """Extents and keyframe indexes of recorded files, cached in memory by name (a file
    keeps its name through partial/ -> closed/ -> archives/) and checked against the
    file's size, so a grown file is read again. Thread-safe: the web side calls it from
    worker threads."""

    def __init__(self, layout: Layout, binary: str, unexpected=None):
        self.layout = layout
        self.binary = binary
        # ChildState.unexpected of the process it runs in: a bug is logged and counted.
        self.unexpected = unexpected or ChildState().unexpected
        self.lock = threading.Lock()
        self.extents: OrderedDict[tuple[str, str], tuple[int, Extent]] = OrderedDict()
        self.indexes: OrderedDict[tuple[str, str], tuple[int, bool, KeyframeIndex]] = OrderedDict()
        self.scanning: dict[tuple[str, str], threading.Lock] = {}
        self.unreadable: set[tuple[str, str, int]] = set()

    def files(self, camera_id: str, start: datetime, end: datetime) -> list[Recorded]:
        """The camera's files that hold footage in [start, end), oldest first."""
        found = recordings(self.layout, camera_id)
        partial = self.layout.partial(camera_id)
        earliest = start - timedelta(seconds=LONGEST_FILE_SECONDS)
        chosen = []
        for n, item in enumerate(found):
            if item.start >= end or item.start < earliest:
                continue
            if n + 1 < len(found) and found[n + 1].start <= start:
                continue  # a later file began before start: this one ended by then
            growing = item.path.parent == partial
            measured = self.extent(camera_id, item, quiet=growing)
            if measured is None:
                continue
            recorded = Recorded(item.path, item.start, measured, growing)
            if recorded.end > start:
                chosen.append(recorded)
        return chosen

    def extent(self, camera_id: str, item: Footage, quiet: bool = False) -> Extent | None:
        """The file's extent, None when it is not readable video: logged once per size,
        unless quiet (a file FFmpeg has just opened holds no frame yet)."""
        key = (camera_id, item.path.name)
        try:
            size = item.path.stat().st_size
        except OSError:
            return None
        with self.lock:
            cached = self.extents.get(key)
            if cached and cached[0] == size:
                self.extents.move_to_end(key)
                return cached[1]
            if (*key, size) in self.unreadable:
                return None
        try:
            found = extent(item.path)
        except (FootageError, OSError) as exc:
            if quiet:
                return None
            with self.lock:
                self.unreadable.add((*key, size))
            log.warning("recording not readable, left out", camera_id=camera_id,
                        file=item.path.name, error=str(exc)[:200])
            return None
        with self.lock:
            self.extents[key] = (size, found)
            while len(self.extents) > EXTENTS_KEPT:
                self.extents.popitem(last=False)
        return found

    def index(self, camera_id: str, recorded: Recorded) -> KeyframeIndex | None:
        """The file's keyframes: its sidecar, else a scan (extended as the file grows)."""
        key = (camera_id, recorded.path.name)
        with self.lock:
            lock = self.scanning.setdefault(key, threading.Lock())
        with lock:
            try:
                return self.index_locked(camera_id, recorded, key)
            except (FootageError, OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("keyframes not readable, file left out", camera_id=camera_id,
                            file=recorded.path.name, error=str(exc)[:200])
                return None
            finally:
                with self.lock:
                    self.scanning.pop(key, None)

    def index_locked(self, camera_id: str, recorded: Recorded, key) -> KeyframeIndex:
        size = recorded.path.stat().st_size
        complete = not recorded.growing
        with self.lock:
            cached = self.indexes.get(key)
        if cached and cached[0] == size and (cached[1] or not complete):
            return cached[2]
        found = read_sidecar(self.layout, camera_id, recorded.path.name, size)
        if found is None:
            if recorded.path.suffix != ".ts":
                found = mp4_keyframes(self.binary, recorded.path)
            else:
                grown = cached[2] if cached and not cached[1] and cached[0] <= size else None
                found = scan_ts(recorded.path, copy_index(grown), complete=complete)
        with self.lock:
            self.indexes[key] = (size, complete, found)
            self.indexes.move_to_end(key)
            while len(self.indexes) > INDEXES_KEPT:
                self.indexes.popitem(last=False)
        return found


def copy_index(index: KeyframeIndex | None) -> KeyframeIndex | None:
    if index is None:
        return None
    return KeyframeIndex(list(index.keyframes), index.scanned, index.first, index.end, index.size)


# -- spans ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    start: datetime
    end: datetime
    files: int
    live: bool = False

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def join_spans(files: list[Recorded]) -> list[Span]:
    spans: list[Span] = []
    gap = timedelta(seconds=GAP_SECONDS)
    for item in files:
        if spans and item.start - spans[-1].end <= gap:
            last = spans[-1]
            spans[-1] = Span(last.start, max(last.end, item.end), last.files + 1)
        else:
            spans.append(Span(item.start, item.end, 1))
    return spans


def live_edge(layout: Layout, camera_id: str, live_segments: int) -> tuple[datetime, datetime] | None:
    """Where the camera's live playlist begins and ends in wall-clock time, None when it
    lists nothing. The one place that reads the live side: its segments carry
    EXT-X-PROGRAM-DATE-TIME and EXTINF, whatever their container."""
    window = served_window(layout, camera_id, live_segments)
    dated = [(program_date(s), s.duration) for s in window.segments]
    dated = [(begun, duration) for begun, duration in dated if begun is not None]
    if not dated:
        return None
    return utc(dated[0][0]), utc(dated[-1][0] + dated[-1][1])


def span_report(catalog: Catalog, camera_id: str, start: datetime, end: datetime,
                live: tuple[datetime, datetime] | None = None) -> dict:
    """The spans of recorded footage in [start, end) and the gaps between them. The last
    span reaches the live edge when the camera's live window continues it (the archive
    being written lags the live segments by a buffer's worth)."""
    spans = join_spans(catalog.files(camera_id, start, end))
    if live and spans and spans[-1].end >= live[0] - timedelta(seconds=GAP_SECONDS):
        last = spans[-1]
        spans[-1] = Span(last.start, max(last.end, live[1]), last.files, live=True)
    clipped = [Span(max(s.start, start), min(s.end, end), s.files, s.live) for s in spans]
    clipped = [s for s in clipped if s.end > s.start]
    horizon = min(end, datetime.now(timezone.utc))
    gaps, cursor = [], start
    for span in clipped:
        if span.start - cursor > timedelta(seconds=GAP_SECONDS):
            gaps.append((cursor, span.start))
        cursor = max(cursor, span.end)
    if horizon - cursor > timedelta(seconds=GAP_SECONDS):
        gaps.append((cursor, horizon))
    return {
        "camera": camera_id, "start": iso(start), "end": iso(end),
        "spans": [{"start": iso(s.start), "end": iso(s.end), "duration": round(s.seconds, 3),
                   "files": s.files, "live": s.live} for s in clipped],
        "gaps": [{"start": iso(a), "end": iso(b), "duration": round((b - a).total_seconds(), 3)}
                 for a, b in gaps],
        "recorded_seconds": round(sum(s.seconds for s in clipped), 3),
        "live_edge": iso(live[1]) if live else None,
    }


# -- playlists --------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """One playlist entry: a byte range of an MPEG-TS archive (mp4_frames == 0), or a
    stretch of an MP4 archive to be cut into MPEG-TS (from its keyframe at file_time)."""
    name: str
    at: datetime  # wall-clock time of its first frame
    duration: float
    offset: int = 0
    length: int = 0
    file_time: float = 0.0
    mp4_frames: int = 0
    discontinuity: bool = False


def file_segments(recorded: Recorded, index: KeyframeIndex, start: datetime, end: datetime,
                  target: float = SEGMENT_SECONDS) -> list[Segment]:
    """Whole GOPs of the file from the keyframe at or before start to the keyframe at or
    after end, grouped into segments of at least `target` seconds. A file still being
    written yields only segments whose next keyframe is there already (they never
    change), the finished file its last one too, up to its end."""
    keys = index.keyframes
    if not keys:
        return []
    begin_at = recorded.file_time(start)
    stop_at = recorded.file_time(end)
    first = max((n for n, k in enumerate(keys) if k.time <= begin_at + 1e-6), default=0)
    whole = index.size - index.size % PACKET if index.size else 0
    file_end = index.end if index.end is not None else recorded.extent.end
    mp4 = recorded.path.suffix != ".ts"
    segments = []
    n = first
    while n < len(keys) and keys[n].time < stop_at - 1e-6:
        m = n + 1
        while m < len(keys) and keys[m].time - keys[n].time < target - 1e-6 \
                and keys[m].time < stop_at - 1e-6:
            m += 1
        if m < len(keys):
            finish, offset_end = keys[m].time, keys[m].offset
        elif recorded.growing or index.end is None:
            break  # the rest of a file being written: not yet whole
        else:
            finish, offset_end = file_end, whole
        duration = finish - keys[n].time
        if duration > 0.001:
            segments.append(Segment(
                recorded.path.name, recorded.wall(keys[n].time), duration,
                offset=keys[n].offset, length=max(0, offset_end - keys[n].offset),
                file_time=keys[n].time,
                mp4_frames=sum(k.frames for k in keys[n:m]) if mp4 else 0))
        n = m
    return segments


def plan_playlist(catalog: Catalog, camera_id: str, start: datetime,
                  end: datetime) -> list[Segment]:
    """The segments covering [start, end), a discontinuity before each file's first."""
    planned: list[Segment] = []
    for recorded in catalog.files(camera_id, start, end):
        index = catalog.index(camera_id, recorded)
        if index is None:
            continue
        found = file_segments(recorded, index, start, end)
        if found and planned:
            found[0] = Segment(**{**found[0].__dict__, "discontinuity": True})
        planned += found
    return planned


def render_playlist(segments: list[Segment], *, ended: bool, token_query: str = "") -> str:
    """VOD (ended) or EVENT (still growing into live), byte ranges need version 4. A
    growing playlist's target duration must never change: segments are whole GOPs of at
    least SEGMENT_SECONDS, so under twice that unless a GOP alone is longer."""
    longest = max([math.ceil(s.duration - 0.001) for s in segments] + [1])
    target = longest if ended else max(longest, math.ceil(2 * SEGMENT_SECONDS))
    out = ["#EXTM3U", "#EXT-X-VERSION:4", f"#EXT-X-TARGETDURATION:{target}",
           "#EXT-X-MEDIA-SEQUENCE:0", f"#EXT-X-PLAYLIST-TYPE:{'VOD' if ended else 'EVENT'}",
           "#EXT-X-INDEPENDENT-SEGMENTS"]
    for segment in segments:
        if segment.discontinuity:
            out.append("#EXT-X-DISCONTINUITY")
        out.append(f"#EXT-X-PROGRAM-DATE-TIME:{iso(segment.at)}")
        out.append(f"#EXTINF:{segment.duration:.3f},")
        if segment.mp4_frames:
            query = f"t={segment.file_time:.6f}&frames={segment.mp4_frames}"
            out.append(f"files/{segment.name}/segment.ts?{query}{token_query.replace('?', '&')}")
        else:
            out.append(f"#EXT-X-BYTERANGE:{segment.length}@{segment.offset}")
            out.append(f"files/{segment.name}{token_query}")
    if ended:
        out.append("#EXT-X-ENDLIST")
    return "\n".join(out) + "\n"


def mp4_segment_command(binary: str, path: Path, seek: float, frames: int) -> list[str]:
    """A stretch of an MP4 archive as MPEG-TS on stdout: input seek to the keyframe (half
    a frame past it, so rounding never lands on the one before), its frames copied, the
    file's own timestamps kept so consecutive segments continue each other."""
    return [*parent_death_prefix(), binary, "-hide_banner", "-nostdin", "-loglevel", "error",
            "-threads", "1", "-ss", f"{max(0.0, seek) + HALF_FRAME:.6f}", "-copyts",
            "-i", str(path), "-map", "0:v:0", "-c", "copy", "-frames:v", str(frames),
            "-f", "mpegts", "pipe:1"]


def find_file(layout: Layout, camera_id: str, name: str) -> Footage | None:
    """A recorded file by name, wherever it is now (it moves from partial/ to archives/)."""
    start = archive_start(Path(name))
    if start is None:
        return None
    for directory in layout.footage_dirs(camera_id):
        if (directory / name).is_file():
            return Footage(directory / name, start)
    return None


# -- exports ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportPlan:
    camera_id: str
    files: tuple[Path, ...]
    inpoint: float  # in the first file's own clock: its keyframe at or before the start
    outpoint: float | None  # in the last file's own clock, None: to its end
    start: datetime  # wall-clock time of the export's first frame
    end: datetime
    first_offset: int | None = None  # MPEG-TS: the first keyframe's byte offset

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.files]

    def filename(self) -> str:
        stamp = "%Y-%m-%dT%H-%M-%SZ"
        return f"{self.camera_id}_{self.start:{stamp}}_{self.end:{stamp}}.mp4"


def plan_export(catalog: Catalog, camera_id: str, start: datetime,
                end: datetime) -> ExportPlan | None:
    """The files covering [start, end), entered at the keyframe at or before start. The
    concat demuxer cannot join MPEG-TS to MP4: an export that crosses a change of archive
    format stops at it."""
    files = catalog.files(camera_id, start, end)
    if not files:
        return None
    run = [files[0]]
    for item in files[1:]:
        if item.path.suffix != run[0].path.suffix:
            break
        run.append(item)
    first, last = run[0], run[-1]
    index = catalog.index(camera_id, first)
    begin = max(start, first.start)
    inpoint, offset = first.file_time(begin), None
    if index is not None and index.keyframes:
        key = max((k for k in index.keyframes if k.time <= inpoint + 1e-6),
                  key=lambda k: k.time, default=index.keyframes[0])
        inpoint = key.time
        offset = key.offset if first.path.suffix == ".ts" else None
    outpoint = last.file_time(end) if end < last.end else None
    finish = min(end, last.end)
    return ExportPlan(camera_id, tuple(f.path for f in run), inpoint, outpoint,
                      first.wall(inpoint), finish, offset)


def open_export(plan: ExportPlan) -> list[int]:
    """Open every file of the export now: FFmpeg reads them through these descriptors
    (export_list), so the file being written may move from partial/ to archives/
    meanwhile. FileNotFoundError when one is gone already."""
    opened: list[int] = []
    try:
        for path in plan.files:
            opened.append(os.open(path, os.O_RDONLY))
    except OSError:
        for descriptor in opened:
            os.close(descriptor)
        raise
    return opened


def export_list(plan: ExportPlan, descriptors: list[int]) -> str:
    """The concat demuxer's list over the open files, as FFmpeg (which inherits the
    descriptors) sees them. An MPEG-TS export starts with the bytes of its first keyframe
    (FFmpeg's subfile protocol): FFmpeg's own seek in MPEG-TS goes by the PCR and can land
    a GOP late. An MP4 is entered at the keyframe's time (its demuxer seeks exactly)."""
    lines = ["ffconcat version 1.0"]
    for n, descriptor in enumerate(descriptors):
        name = f"/proc/self/fd/{descriptor}"
        if n == 0 and plan.first_offset is not None:
            name = f"subfile,,start,{plan.first_offset},end,0,,:{name}"
        lines.append(f"file '{name}'")
        if n == 0 and plan.first_offset is None:
            lines.append(f"inpoint {plan.inpoint:.6f}")
        if n == len(descriptors) - 1 and plan.outpoint is not None:
            lines.append(f"outpoint {plan.outpoint:.6f}")
    return "\n".join(lines) + "\n"


def export_command(binary: str, list_file: Path, target: str, *, streamed: bool) -> list[str]:
    """Stream copy of the planned files into one MP4. Streamed (to a pipe): fragmented,
    each GOP written as it is read, so neither side holds the file. To a file: a plain
    MP4, its index written once at the end (no second pass). One thread, nice 10: an
    export never takes time from the live stream's FFmpeg."""
    nice = shutil.which("nice")
    fragments = ["-movflags", "frag_keyframe+empty_moov+default_base_moof"] if streamed else []
    return [*parent_death_prefix(), *([nice, "-n", "10"] if nice else []), binary,
            "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-threads", "1",
            "-f", "concat", "-safe", "0", "-protocol_whitelist", "file,subfile",
            "-i", str(list_file), "-map", "0:v:0", "-map", "0:a?", "-c", "copy",
            *fragments, "-f", "mp4", target]


def export_file(layout: Layout, binary: str, camera_id: str, start: datetime, seconds: float,
                output: str) -> ExportPlan:
    """`vlmguard export`: the footage from start as one MP4 at output ("-": a fragmented
    MP4 on stdout). A file is written as output.part and renamed when complete."""
    plan = plan_export(Catalog(layout, binary), camera_id, start,
                       start + timedelta(seconds=seconds))
    if plan is None:
        raise VlmguardError(f"no recorded video of {camera_id} from {iso(start)} "
                            f"for {seconds:g} s")
    streamed = output == "-"
    partial = Path(output + ".part")
    with hold(layout, camera_id, plan.names):
        try:
            descriptors = open_export(plan)
        except OSError as exc:
            raise VlmguardError(f"recorded video of {camera_id} became unreadable: "
                                f"{exc.strerror or exc}") from None
        try:
            with tempfile.NamedTemporaryFile("w", prefix="vlmguard-export-",
                                             suffix=".ffconcat") as listing:
                listing.write(export_list(plan, descriptors))
                listing.flush()
                command = export_command(binary, Path(listing.name),
                                         "pipe:1" if streamed else str(partial),
                                         streamed=streamed)
                proc = subprocess.run(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      stdout=None if streamed else subprocess.DEVNULL,
                                      pass_fds=descriptors, env=child_env())
        finally:
            for descriptor in descriptors:
                os.close(descriptor)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise VlmguardError(f"ffmpeg could not export: {last_line(proc.stderr)}")
    if not streamed:
        partial.rename(output)
    return plan


# -- holds against retention ------------------------------------------------------------

@contextmanager
def hold(layout: Layout, camera_id: str, names: list[str]) -> Iterator[Path | None]:
    """Keep these archives from retention while the block runs: a small file, locked
    for as long as this process holds it open. Where it cannot be written (another
    user's data dir) the block runs unheld, said once: the export reads through open
    descriptors, so a deletion meanwhile frees the space only once it is done."""
    folder = holds_dir(layout)
    path = folder / f"{os.getpid()}-{secrets.token_hex(4)}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        log.warning("archives not held from retention", camera_id=camera_id,
                    error=exc.strerror or str(exc))
        yield None
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(descriptor, json.dumps({"camera": camera_id, "names": names}).encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def held_names(layout: Layout) -> set[tuple[str, str]]:
    """(camera, archive name) of every file an export holds now. A hold whose lock is
    free belongs to a process that is gone: it is removed."""
    found: set[tuple[str, str]] = set()
    try:
        entries = list(holds_dir(layout).glob("*.json"))
    except OSError:
        return found
    for path in entries:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                data = json.loads(os.pread(descriptor, 65536, 0) or b"{}")
                found.update((str(data.get("camera")), str(n)) for n in data.get("names", ()))
            else:
                path.unlink(missing_ok=True)  # its exporter died without removing it
        except ValueError:
            continue  # being written this instant; the lock is held, read it next time
        finally:
            os.close(descriptor)
    return found


# -- sidecars: keyframe index and minute thumbnails ----------------------------------------

def read_sidecar(layout: Layout, camera_id: str, name: str, size: int) -> KeyframeIndex | None:
    """The archiver's index of a file, when it was made from the file as it is now."""
    try:
        data = json.loads((sidecar_dir(layout, camera_id, name) / INDEX_FILE).read_text())
        index = KeyframeIndex.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index if index.size == size else None


def minute_name(when: datetime) -> str:
    return f"{when:{MINUTE}}.jpg"


def thumbnail_minutes(recorded: Recorded) -> list[datetime]:
    """The minutes the file has footage in (the first from the file's start)."""
    minute = recorded.start.replace(second=0, microsecond=0)
    found = []
    while minute < recorded.end:
        found.append(minute)
        minute += timedelta(minutes=1)
    return found


def picture_source(index: KeyframeIndex | None, recorded: Recorded,
                   when: datetime) -> tuple[bytes | None, float]:
    """What to give FFmpeg for the picture at `when`: an MPEG-TS file's keyframe at or
    before it as bytes (decoded alone, no seek), or an MP4's seconds to seek to."""
    seconds = max(0.0, (when - recorded.start).total_seconds())
    if recorded.path.suffix != ".ts" or index is None or not index.keyframes:
        return None, seconds
    target = recorded.file_time(when)
    key = max((k for k in index.keyframes if k.time <= target + 1e-6), key=lambda k: k.time,
              default=index.keyframes[0])
    return keyframe_bytes(recorded.path, key.offset), seconds


def thumbnail_command(binary: str, path: Path | None, seconds: float = 0.0) -> list[str]:
    """One small JPEG on stdout: from a keyframe on stdin (path None), or from an MP4 file
    at the keyframe at or before `seconds` (the MP4 demuxer seeks exactly)."""
    source = (["-f", "mpegts", "-i", "pipe:0"] if path is None else
              ["-noaccurate_seek", "-ss", f"{max(0.0, seconds):.3f}", "-i", str(path)])
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-threads", "1", *source, "-map", "0:v:0", "-frames:v", "1",
            "-vf", f"scale={THUMB_WIDTH}:-2", "-q:v", "7", "-f", "image2pipe",
            "-c:v", "mjpeg", "pipe:1"]


def make_thumbnail(binary: str, index: KeyframeIndex | None, recorded: Recorded,
                   when: datetime) -> bytes | None:
    """The JPEG of the camera at `when` (its keyframe at or before), None when FFmpeg
    made none. Decodes one frame."""
    try:
        data, seconds = picture_source(index, recorded, when)
        proc = subprocess.run(
            thumbnail_command(binary, None if data is not None else recorded.path, seconds),
            input=data or b"", capture_output=True, timeout=60, env=child_env())
    except (OSError, FootageError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 and proc.stdout[:2] == b"\xff\xd8" else None


def write_sidecar(layout: Layout, binary: str, camera_id: str, path: Path,
                  start: datetime) -> Path | None:
    """The keyframe index and minute thumbnails of a filed archive, in its sidecar folder.
    Written once per archive: a few kB next to its hundreds of MB."""
    folder = sidecar_dir(layout, camera_id, path.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".ts":
            index = scan_ts(path)
            temp = folder / f".{INDEX_FILE}.tmp"
            temp.write_text(json.dumps(index.as_json(), separators=(",", ":")))
            os.replace(temp, folder / INDEX_FILE)
        measured = extent(path)
    except (OSError, FootageError) as exc:
        log.warning("archive index not written", camera_id=camera_id, file=path.name,
                    error=str(exc)[:200])
        return None
    recorded = Recorded(path, start, measured, growing=False)
    index = read_sidecar(layout, camera_id, path.name, path.stat().st_size)
    for minute in thumbnail_minutes(recorded):
        target = folder / minute_name(minute)
        if target.exists():
            continue
        picture = make_thumbnail(binary, index, recorded, max(minute, start))
        if picture is None:
            log.warning("thumbnail not made", camera_id=camera_id, file=path.name,
                        minute=iso(minute))
            continue
        temp = target.with_name(f".{target.name}.tmp")
        temp.write_bytes(picture)
        os.replace(temp, target)
    return folder


def stored_thumbnail(layout: Layout, camera_id: str, recorded: Recorded,
                     minute: datetime) -> Path | None:
    path = sidecar_dir(layout, camera_id, recorded.path.name) / minute_name(minute)
    return path if path.is_file() else None


def sweep_sidecars(layout: Layout, camera_id: str) -> int:
    """Remove the sidecar folders whose archive is gone; returns how many."""
    root = index_root(layout, camera_id)
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return 0
    stems = {f.path.stem for f in recordings(layout, camera_id)}
    removed = 0
    for folder in folders:
        if folder.name not in stems:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


class SidecarWriter:
    """Writes sidecars in a thread of its own, so the archiver's loop (which must link live
    segments before FFmpeg deletes them) never waits on a scan or a thumbnail."""

    def __init__(self, layout: Layout, binary: str, unexpected=None):
        self.layout = layout
        self.binary = binary
        # ChildState.unexpected of the process it runs in: a bug is logged and counted.
        self.unexpected = unexpected or ChildState(layout.data_dir, None).unexpected
        self.queue: "queue.Queue[tuple[str, Path] | None]" = queue.Queue()
        self.thread: threading.Thread | None = None

    def add(self, camera_id: str, path: Path) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="sidecars", daemon=True)
            self.thread.start()
        self.queue.put((camera_id, path))

    def add_missing(self, camera_id: str, younger_than: float) -> int:
        """Queue the camera's filed archives younger than this many seconds that have no
        sidecar (filed just before a stop). Older footage is indexed on demand."""
        horizon = datetime.now(timezone.utc) - timedelta(seconds=younger_than)
        added = 0
        for item in recordings(self.layout, camera_id):
            if item.start >= horizon and item.path.parent == self.layout.archives(camera_id) \
                    and not (sidecar_dir(self.layout, camera_id, item.path.name) / INDEX_FILE).exists():
                self.add(camera_id, item.path)
                added += 1
        return added

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            camera_id, path = item
            start = archive_start(path)
            if start is None or not path.exists():
                continue
            try:
                write_sidecar(self.layout, self.binary, camera_id, path, start)
            except OSError as exc:
                log.error("sidecar not written", camera_id=camera_id, file=path.name,
                          error=str(exc)[:300])
            except Exception:  # a sidecar is an extra: a bug here never ends the archiver
                self.unexpected(log, "sidecar not written: unexpected error",
                                camera_id=camera_id, file=path.name)

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout)
