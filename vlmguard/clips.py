"""Recorded video on demand: which files cover a stretch of time, cut out without re-encoding,
and the picture of an incident's middle frame.

Files are found through layout.py (archive_start reads a file's start from its name; its
length is probed), whatever their container (.mp4 or .ts), in every place footage lives,
so a clip of the last minutes reads the archive FFmpeg is still writing.

A clip is `ffmpeg -ss OFFSET -f concat -i LIST -t DURATION -c copy`: the seek lands on the
keyframe at or before the start, and the MP4 muxer writes an edit list that hides the frames
before it, so the clip's time 0 is the requested start (FFmpeg, Chromium and Firefox honour
the edit list) and nothing is decoded. The web side runs it; nothing here imports aiohttp.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from itertools import takewhile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

from vlmguard.ffmpeg import child_env, media_duration, parent_death_prefix
from vlmguard.layout import Layout, archive_start
from vlmguard.logs import get_logger

log = get_logger("vlmguard.clips")

MAX_CLIP_SECONDS = 600
CUT_TIMEOUT_SECONDS = 120.0
SNAPSHOT_WIDTH = 640  # enough to see what happened on a phone; ~20-40 kB


class ClipError(Exception):
    """FFmpeg could not cut the clip (a corrupt or vanished file): the message says why."""


@dataclass(frozen=True)
class Footage:
    path: Path
    start: datetime


@dataclass(frozen=True)
class ClipPlan:
    """What to give FFmpeg: files in order, seconds into the first, and how long."""

    files: tuple[Path, ...]
    offset: float
    start: datetime  # the wall-clock time of the clip's time 0
    duration: float


def recordings(layout: Layout, camera_id: str) -> list[Footage]:
    """Every file holding the camera's video, oldest first. A file being renamed from one
    stage to the next may show up in two places: the first one found is kept."""
    found: dict[datetime, Footage] = {}
    for directory in layout.footage_dirs(camera_id):
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for path in entries:
            start = archive_start(path)
            if start is not None and start not in found:
                found[start] = Footage(path, start)
    return [found[start] for start in sorted(found)]


def plan_clip(binary: str, layout: Layout, camera_id: str, start: datetime, seconds: float,
              duration_of: Callable[[str, Path], float | None] = media_duration
              ) -> ClipPlan | None:
    """The files covering [start, start + seconds), or None when none does. Footage that
    begins later than start makes the clip begin there (ClipPlan.start says so)."""
    end = start + timedelta(seconds=seconds)
    chosen = covering(binary, recordings(layout, camera_id), start, end, duration_of)
    if not chosen:
        return None
    # The concat demuxer cannot join an MP4 to an MPEG-TS (their timestamps start apart):
    # a clip that crosses a change of archive format stops at it.
    chosen = list(takewhile(lambda f: f.path.suffix == chosen[0].path.suffix, chosen))
    first = chosen[0]
    clip_start = max(start, first.start)
    return ClipPlan(files=tuple(f.path for f in chosen),
                    offset=(clip_start - first.start).total_seconds(), start=clip_start,
                    duration=(end - clip_start).total_seconds())


def covering(binary: str, found: list[Footage], start: datetime, end: datetime,
             duration_of: Callable[[str, Path], float | None]) -> list[Footage]:
    """The file that began at or before start, if it lasts past it (only it is probed:
    the others' starts are in their names), then every file beginning inside the range."""
    before = [f for f in found if f.start <= start]
    chosen = []
    if before:
        length = duration_of(binary, before[-1].path)
        if length and before[-1].start + timedelta(seconds=length) > start:
            chosen.append(before[-1])
    return chosen + [f for f in found if start < f.start < end]


def concat_list(files: Iterable[Path]) -> str:
    quoted = ("'" + str(path).replace("'", "'\\''") + "'" for path in files)
    return "ffconcat version 1.0\n" + "".join(f"file {q}\n" for q in quoted)


def cut_command(binary: str, plan: ClipPlan, list_file: Path, target: Path) -> list[str]:
    """Stream copy into an MP4 with its index first (a <video> starts at once); one
    thread and nice 10, so a clip never takes time from the live stream's FFmpeg."""
    source = (["-f", "concat", "-safe", "0", "-i", str(list_file)] if len(plan.files) > 1
              else ["-i", str(plan.files[0])])
    nice = shutil.which("nice")
    return [*parent_death_prefix(), *([nice, "-n", "10"] if nice else []), binary, "-hide_banner", "-nostdin",
            "-loglevel", "error", "-y", "-threads", "1", "-ss", f"{plan.offset:.3f}", *source,
            "-t", f"{plan.duration:.3f}", "-map", "0:v:0", "-map", "0:a?", "-c", "copy",
            "-movflags", "+faststart", "-f", "mp4", str(target)]


async def cut_clip(binary: str, plan: ClipPlan, workdir: Path) -> Path:
    """Run FFmpeg (a child process, awaited: the event loop goes on serving) and return
    the finished MP4 in workdir. Cancelling this kills FFmpeg."""
    list_file = workdir / "list.ffconcat"
    list_file.write_text(concat_list(plan.files))
    target = workdir / "clip.mp4"
    proc = await asyncio.create_subprocess_exec(
        *cut_command(binary, plan, list_file, target), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=child_env())
    try:
        async with asyncio.timeout(CUT_TIMEOUT_SECONDS):
            _, stderr = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0 or not target.exists() or target.stat().st_size == 0:
        reason = (stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise ClipError(f"ffmpeg could not cut the clip: {reason[:300]}")
    return target


def middle(incident: dict[str, Any]) -> datetime:
    return incident["start_at"] + (incident["end_at"] - incident["start_at"]) / 2


def snapshot_command(binary: str, source: Path, offset: float, target: Path) -> list[str]:
    """One frame as a JPEG: -ss before -i decodes from the keyframe before it only."""
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-threads", "1",
            "-ss", f"{max(offset, 0.0):.3f}", "-i", str(source), "-map", "0:v:0",
            "-frames:v", "1", "-vf", f"scale='min(iw,{SNAPSHOT_WIDTH})':-2", "-q:v", "5",
            "-f", "image2", "-c:v", "mjpeg", str(target)]


def save_snapshot(binary: str, layout: Layout, camera_id: str, incident_id: int,
                  when: datetime) -> Path | None:
    """The picture at `when`, written to layout.snapshot(); None (logged) when there is no
    footage then or FFmpeg failed: an incident is stored with or without its picture."""
    found = [f for f in recordings(layout, camera_id) if f.start <= when]
    if not found:
        log.warning("no footage for the incident's snapshot", camera_id=camera_id,
                    incident_id=incident_id)
        return None
    target = layout.snapshot(camera_id, incident_id)
    partial = target.with_name(target.name + ".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(snapshot_command(binary, found[-1].path,
                                               (when - found[-1].start).total_seconds(), partial),
                              capture_output=True, text=True, timeout=60, env=child_env())
        if proc.returncode != 0 or not partial.exists() or partial.stat().st_size == 0:
            reason = (proc.stderr.strip().splitlines() or ["no frame at that time"])[-1]
            log.warning("snapshot not made", camera_id=camera_id, incident_id=incident_id,
                        error=reason[:300])
            partial.unlink(missing_ok=True)
            return None
        partial.rename(target)  # whoever sees the file sees all of it
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("snapshot not made", camera_id=camera_id, incident_id=incident_id,
                    error=str(exc))
        partial.unlink(missing_ok=True)
        return None
    return target


def save_snapshots(binary: str, layout: Layout, incidents: Iterable[dict[str, Any]]) -> None:
    """A picture of each stored incident's middle frame (rows as JobStore returns them)."""
    for incident in incidents:
        save_snapshot(binary, layout, incident["camera_id"], incident["id"], middle(incident))
