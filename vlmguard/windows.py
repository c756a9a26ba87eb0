"""Analysis windows: clock-aligned stretches of a camera's video, cut from what FFmpeg
already wrote, never a third copy.

The archiver hard-links every live segment (in RAM) into the folder of the window its
program date falls in, windows/<cam>/<start>/, before FFmpeg deletes it from the live
playlist (a link costs no bytes). A window is closed once a later segment exists, or once
the camera has been silent well past its end; it then gets clip.ffconcat (its segments in
order, with their durations) and becomes a job whose clip_start is its first segment's
program date, and whose sources name the archive file(s) and offsets it covers. Its folder
is removed once no unfinished job covers its start. When RAM runs short, or a window's
folder is gone (a reboot cleared the tmpfs), the job is analysed from its archive.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from vlmguard.ffmpeg import concat_text
from vlmguard.layout import ARCHIVE_TIME, Layout, archive_start
from vlmguard.livelist import SEGMENT_URI, parse_playlist, program_date
from vlmguard.logs import get_logger

log = get_logger("vlmguard.windows")

SEGMENTS_FILE = "segments.txt"
CLIP_FILE = "clip.ffconcat"
JOB_FILE = "job"
MERGED_FILE = "merged.ffconcat"
PLACED_KEPT = 4096  # segment names remembered; a playlist lists far fewer


@dataclass(frozen=True)
class Piece:
    """One live segment linked into a window."""
    name: str
    start: float  # epoch
    duration: float


def window_start(epoch: float, seconds: int) -> float:
    return math.floor(epoch / seconds) * seconds


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime(ARCHIVE_TIME)


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def read_pieces(folder: Path) -> list[Piece]:
    pieces = {}
    try:
        text = (folder / SEGMENTS_FILE).read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and (folder / parts[0]).exists():
            try:
                pieces[parts[0]] = Piece(parts[0], float(parts[1]), float(parts[2]))
            except ValueError:
                continue
    return sorted(pieces.values(), key=lambda p: p.start)


def archive_sources(layout: Layout, camera_id: str, start: float, end: float) -> list[dict]:
    """The archive files (by their final path) that hold [start, end), with offsets."""
    found = {}
    for folder in (layout.partial(camera_id), layout.closed(camera_id),
                   layout.archives(camera_id)):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for path in entries:
            begun = archive_start(path)
            if begun is not None and path.suffix == ".ts":
                found[path.name] = begun.timestamp()
    names = sorted(found, key=found.get)
    sources = []
    for n, name in enumerate(names):
        begun = found[name]
        ends = found[names[n + 1]] if n + 1 < len(names) else math.inf
        low, high = max(begun, start), min(ends, end)
        if high > low:
            sources.append({"path": str(layout.archives(camera_id) / name),
                            "offset_s": round(low - begun, 3),
                            "duration_s": round(high - low, 3)})
    return sources


class WindowCutter:
    """Cuts one camera's live segments into analysis windows and registers them."""

    def __init__(self, layout: Layout, camera_id: str, seconds: int, silent_after: float,
                 register):
        self.layout = layout
        self.camera_id = camera_id
        self.seconds = seconds
        self.silent_after = silent_after
        self.register = register  # (clip, start, end, clip_start, sources) -> job id
        # Segments already placed (by name: numbers are never reused), so that one still
        # listed after its window was analysed and removed is not placed again.
        self.placed: dict[str, None] = {}

    @property
    def root(self) -> Path:
        return self.layout.windows(self.camera_id)

    def folders(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return []

    def step(self, now: float | None = None) -> None:
        """Link the new live segments, then register the windows that are complete."""
        now = time.time() if now is None else now
        newest = self.link_segments()
        for folder in self.folders():
            if (folder / JOB_FILE).exists():
                continue
            begun = self.start_of(folder)
            if begun is None:
                continue
            end = self.end_of(begun)
            if (newest is not None and newest >= end) or now > end + self.silent_after:
                self.close(folder)

    def close_past(self, now: float | None = None) -> None:
        """At start: the windows a crash left in RAM whose time is over become jobs; one
        still running (a quick restart) goes on collecting segments."""
        now = time.time() if now is None else now
        for folder in self.folders():
            begun = self.start_of(folder)
            if begun is not None and not (folder / JOB_FILE).exists() \
                    and self.end_of(begun) <= now:
                self.close(folder)

    def open_spans(self) -> list[tuple[datetime, datetime]]:
        """The windows still collecting: footage they will cover needs no catch-up."""
        spans = []
        for folder in self.folders():
            begun = self.start_of(folder)
            if begun is not None and not (folder / JOB_FILE).exists():
                spans.append((utc(begun), utc(self.end_of(begun))))
        return spans

    def flush(self) -> None:
        """An orderly stop: every window with footage becomes a job, complete or not."""
        self.link_segments()
        for folder in self.folders():
            if not (folder / JOB_FILE).exists():
                self.close(folder)

    def start_of(self, folder: Path) -> float | None:
        try:
            return datetime.strptime(folder.name, ARCHIVE_TIME).replace(
                tzinfo=timezone.utc).timestamp()
        except ValueError:
            return None

    def end_of(self, begun: float) -> float:
        """A window ends at the next clock boundary (the rest of a window closed early
        starts between two)."""
        return window_start(begun, self.seconds) + self.seconds

    def link_segments(self) -> float | None:
        """Hard-link each listed segment into its window; returns the newest segment's
        program date (None when the playlist is gone)."""
        live = self.layout.live(self.camera_id)
        try:
            text = (live / "index.m3u8").read_text()
        except OSError:
            return None
        segments, _version = parse_playlist(text)
        newest = None
        for segment in segments:
            begun = program_date(segment)
            if begun is None or not SEGMENT_URI.fullmatch(segment.uri):
                continue
            newest = begun if newest is None else max(newest, begun)
            if segment.uri in self.placed:
                continue
            folder = self.open_folder(begun, segment.uri)
            if folder is None:
                self.place(segment.uri)
                continue
            target = folder / segment.uri
            folder.mkdir(parents=True, exist_ok=True)
            try:
                os.link(live / segment.uri, target)
            except FileExistsError:
                continue
            except OSError:
                continue  # FFmpeg deleted it between the listing and now
            with (folder / SEGMENTS_FILE).open("a") as handle:
                handle.write(f"{segment.uri} {begun:.3f} {segment.duration:.6f}\n")
            self.place(segment.uri)
        return newest

    def open_folder(self, begun: float, name: str) -> Path | None:
        """The folder a segment starting at begun goes to: its window's, or, when that
        was closed already (a restart, or the camera came back after a silence), the
        rest of the window as a window of its own from this segment on. None when the
        segment is there already."""
        aligned = window_start(begun, self.seconds)
        parts = [f for f in self.folders()
                 if (s := self.start_of(f)) is not None and aligned <= s < aligned + self.seconds]
        if any((f / name).exists() for f in parts):
            return None
        open_parts = [f for f in parts if not (f / JOB_FILE).exists()]
        if open_parts:
            return open_parts[-1]
        return self.root / stamp(aligned if not parts else math.floor(begun))

    def place(self, name: str) -> None:
        self.placed[name] = None
        while len(self.placed) > PLACED_KEPT:
            del self.placed[next(iter(self.placed))]

    def close(self, folder: Path) -> None:
        pieces = read_pieces(folder)
        begun = self.start_of(folder)
        if not pieces or begun is None:
            shutil.rmtree(folder, ignore_errors=True)
            return
        clip = folder / CLIP_FILE
        clip.write_text(concat_text([(p.name, p.duration, None, None) for p in pieces]))
        first = pieces[0].start
        last = pieces[-1].start + pieces[-1].duration
        sources = archive_sources(self.layout, self.camera_id, first, last)
        end = self.end_of(begun)
        job_id = self.register(clip, utc(begun), utc(end), utc(first), sources)
        (folder / JOB_FILE).write_text(f"{job_id}\n")
        if job_id is None:
            return  # registered before (a restart): the unique key keeps it to one job
        log.info("window registered", camera_id=self.camera_id, window=folder.name,
                 job_id=job_id, segments=len(pieces), seconds=round(last - first, 2))

    def merged_clip(self, start: datetime, end: datetime, videos: list[str]) -> Path | None:
        """One ffconcat over every window in [start, end), written in the first window's
        folder; None when any of them (videos) has left RAM (the job reads the archive)."""
        if not all(Path(v).exists() and Path(v).is_relative_to(self.root) for v in videos):
            return None
        folders = [f for f in self.folders()
                   if (s := self.start_of(f)) is not None
                   and start.timestamp() <= s < end.timestamp()]
        if not folders:
            return None
        entries = []
        for folder in folders:
            pieces = read_pieces(folder)
            if not pieces:
                return None
            entries += [(str(folder / p.name), p.duration, None, None) for p in pieces]
        target = folders[0] / MERGED_FILE
        temp = target.with_suffix(".tmp")
        temp.write_text(concat_text(entries))
        os.replace(temp, target)
        return target

    def sweep(self, in_flight: list[tuple[datetime, datetime]]) -> None:
        """Remove the registered windows no unfinished job covers any more."""
        for folder in self.folders():
            begun = self.start_of(folder)
            if begun is None or not (folder / JOB_FILE).exists():
                continue
            moment = utc(begun)
            if not any(a <= moment < b for a, b in in_flight):
                shutil.rmtree(folder, ignore_errors=True)

    def evict(self, pending: list[tuple[datetime, datetime]]) -> bool:
        """Drop the oldest registered window still waiting to be analysed from RAM (its
        job reads the archive instead); False when there is none."""
        for folder in self.folders():
            begun = self.start_of(folder)
            if begun is None or not (folder / JOB_FILE).exists():
                continue
            moment = utc(begun)
            if any(a <= moment < b for a, b in pending):
                shutil.rmtree(folder, ignore_errors=True)
                log.warning("RAM for windows full: window dropped from RAM, it will be "
                            "analysed from its archive", camera_id=self.camera_id,
                            window=folder.name)
                return True
        return False


def adjacent_groups(jobs, longest: timedelta) -> list[list]:
    """Runs of back-to-back jobs, each run at most `longest` long, of two jobs or more."""
    groups, current = [], []
    for job in jobs:
        if current and (job.segment_start != current[-1].segment_end
                        or job.segment_end - current[0].segment_start > longest):
            groups.append(current)
            current = []
        current.append(job)
    groups.append(current)
    return [g for g in groups if len(g) > 1]
