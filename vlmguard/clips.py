"""Recorded video on demand: which files cover a stretch of time, cut out without re-encoding,
and the picture of an incident's middle frame.

Files are found through layout.py (archive_start reads a file's start from its name; its
length is probed), whatever their container (.mp4 or .ts), in every place footage lives,
so a clip of the last minutes reads the archive FFmpeg is still writing.

A clip is the concat demuxer over those files, the first entered at `inpoint` (the demuxer
seeks it to the keyframe at or before the start), with -copyts: the frames between that
keyframe and the start keep negative times, and the MP4 muxer writes an edit list that
hides them. So nothing is decoded, the clip's time 0 is the requested start (FFmpeg and
Chromium honour the edit list; both are tested), and what is copied is the range plus at most
one GOP. (`-ss` before a concat input does not work here: FFmpeg 5.1 cannot seek the
concat demuxer and then copies every packet from the first file's start.) The inpoint is
in the file's own times: an MPEG-TS file starts at ~1.4 s, not 0, so its start is probed
and added. The web side runs it; nothing here imports aiohttp.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import takewhile
from pathlib import Path
from typing import Any, Callable

from vlmguard.ffmpeg import child_env, last_line, parent_death_prefix, run_awaited
from vlmguard.layout import Layout, archive_start
from vlmguard.logs import get_logger
from vlmguard.times import iso

log = get_logger("vlmguard.clips")

MAX_CLIP_SECONDS = 600
CUT_TIMEOUT_SECONDS = 120.0
SNAPSHOT_WIDTH = 640  # enough to see what happened on a phone; ~20-40 kB
TIMES = re.compile(r"Duration: (\d+):(\d+):(\d+\.\d+), start: (-?\d+\.\d+)")


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
    lead: float = 0.0  # the first file's own start time (MPEG-TS: ~1.4 s)
    bytes_per_second: float = 0.0  # the first file's, to foresee the clip's size

    @property
    def expected_bytes(self) -> int:
        return int(self.bytes_per_second * self.duration)


Probe = Callable[[str, Path], "tuple[float, float] | None"]


def media_times(binary: str, path: Path, timeout: float = 30) -> tuple[float, float] | None:
    """(start, duration) in seconds of a video file as `ffmpeg -i` reads them; None when
    it cannot tell (not video, gone, or FFmpeg hung on it)."""
    try:
        proc = subprocess.run([binary, "-hide_banner", "-nostdin", "-i", str(path)],
                              capture_output=True, text=True, timeout=timeout, env=child_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = TIMES.search(proc.stderr)
    if not match:
        return None
    hours, minutes, seconds, start = match.groups()
    return float(start), int(hours) * 3600 + int(minutes) * 60 + float(seconds)


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
              probe: Probe = media_times) -> ClipPlan | None:
    """The files covering [start, start + seconds), or None when none does. Footage that
    begins later than start makes the clip begin there (ClipPlan.start says so)."""
    end = start + timedelta(seconds=seconds)
    found = recordings(layout, camera_id)
    before = [f for f in found if f.start <= start]
    # Only the file begun before the range is probed (does it last until start?): the
    # others' starts are in their names.
    times = probe(binary, before[-1].path) if before else None
    if times and before[-1].start + timedelta(seconds=times[1]) > start:
        chosen = [before[-1]]
    else:
        chosen, times = [], None
    chosen += [f for f in found if start < f.start < end]
    if not chosen:
        return None
    # The concat demuxer cannot join an MP4 to an MPEG-TS (their times start apart):
    # a clip that crosses a change of archive format stops at it.
    chosen = list(takewhile(lambda f: f.path.suffix == chosen[0].path.suffix, chosen))
    first = chosen[0]
    times = times or probe(binary, first.path)
    clip_start = max(start, first.start)
    return ClipPlan(files=tuple(f.path for f in chosen),
                    offset=(clip_start - first.start).total_seconds(), start=clip_start,
                    duration=(end - clip_start).total_seconds(),
                    lead=times[0] if times else 0.0, bytes_per_second=rate(first.path, times))


def rate(path: Path, times: tuple[float, float] | None) -> float:
    try:
        return path.stat().st_size / times[1] if times and times[1] > 0 else 0.0
    except OSError:
        return 0.0


def concat_list(plan: ClipPlan) -> str:
    lines = ["ffconcat version 1.0"]
    for n, path in enumerate(plan.files):
        lines.append("file '" + str(path).replace("'", "'\\''") + "'")
        if n == 0:  # in the file's own times, which for MPEG-TS do not start at 0
            lines.append(f"inpoint {plan.lead + plan.offset:.6f}")
    return "\n".join(lines) + "\n"


def cut_command(binary: str, plan: ClipPlan, list_file: Path, target: Path) -> list[str]:
    """Stream copy into an MP4 with its index first (a <video> starts at once); one
    thread and nice 10, so a clip never takes time from the live stream's FFmpeg."""
    nice = shutil.which("nice")
    return [*parent_death_prefix(), *([nice, "-n", "10"] if nice else []), binary,
            "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-threads", "1",
            "-f", "concat", "-safe", "0",
            "-i", str(list_file), "-copyts", "-t", f"{plan.duration:.3f}",
            "-map", "0:v:0", "-map", "0:a?", "-c", "copy",
            "-movflags", "+faststart", "-f", "mp4", str(target)]


async def cut_clip(binary: str, plan: ClipPlan, workdir: Path) -> Path:
    """Run FFmpeg (a child process, awaited: the event loop goes on serving) and return
    the finished MP4 in workdir. Cancelling this kills FFmpeg."""
    list_file = workdir / "list.ffconcat"
    list_file.write_text(concat_list(plan))
    target = workdir / "clip.mp4"
    code, _, stderr = await run_awaited(cut_command(binary, plan, list_file, target),
                                        CUT_TIMEOUT_SECONDS)
    if code != 0 or not target.exists() or target.stat().st_size == 0:
        raise ClipError(f"ffmpeg could not cut the clip: {last_line(stderr)}")
    return target


def middle(incident: dict[str, Any]) -> datetime:
    return incident["start_at"] + (incident["end_at"] - incident["start_at"]) / 2


def snapshot_command(binary: str, source: Path, offset: float, target: Path) -> list[str]:
    """One frame as a JPEG: -ss before -i decodes from the keyframe before it only."""
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-threads", "1",
            "-ss", f"{max(offset, 0.0):.3f}", "-i", str(source), "-map", "0:v:0",
            "-frames:v", "1", "-vf", f"scale='min(iw,{SNAPSHOT_WIDTH})':-2", "-q:v", "5",
            "-f", "image2", "-c:v", "mjpeg", str(target)]


def make_picture(binary: str, layout: Layout, camera_id: str, when: datetime,
                 target: Path) -> bool:
    """The camera's picture at `when` written to target; False (logged) when there is no
    footage then or FFmpeg failed: an incident is stored with or without its picture."""
    found = [f for f in recordings(layout, camera_id) if f.start <= when]
    if not found:
        log.warning("no footage for the incident's snapshot", camera_id=camera_id,
                    at=iso(when))
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(snapshot_command(binary, found[-1].path,
                                               (when - found[-1].start).total_seconds(), target),
                              capture_output=True, text=True, timeout=60, env=child_env())
        if proc.returncode == 0 and target.exists() and target.stat().st_size > 0:
            return True
        reason = last_line(proc.stderr, "no frame at that time")
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    log.warning("snapshot not made", camera_id=camera_id, at=iso(when), error=reason)
    target.unlink(missing_ok=True)
    return False


def save_snapshot(binary: str, layout: Layout, camera_id: str, incident_id: int,
                  when: datetime) -> Path | None:
    """The picture of a stored incident, made now and put in place in one rename."""
    target = layout.snapshot(camera_id, incident_id)
    partial = target.with_name(target.name + ".part")
    if not make_picture(binary, layout, camera_id, when, partial):
        return None
    partial.rename(target)
    return target


def complete_with_snapshots(queue: Any, job: Any, outcome: Any, binary: str,
                            layout: Layout) -> None:
    """queue.complete(job, outcome), each incident's picture made before the commit and
    put in place by a rename right after it: whoever reads a committed incident (the
    notifier attaching it to a message) finds its picture milliseconds later, not after
    an FFmpeg run per incident. Pictures are named by incident id, known only then."""
    staged = [stage_picture(binary, layout, job, n, incident)
              for n, incident in enumerate(outcome.incidents)]
    try:
        stored = queue.complete(job, outcome)  # checks the lease itself
        publish(layout, job.camera_id, staged, stored)
    finally:
        for path in staged:
            if path is not None:
                path.unlink(missing_ok=True)


def stage_picture(binary: str, layout: Layout, job: Any, n: int, incident: Any) -> Path | None:
    target = layout.snapshots(job.camera_id) / f"job{job.id}-{n}.jpg.part"
    when = incident.start_at + (incident.end_at - incident.start_at) / 2
    return target if make_picture(binary, layout, job.camera_id, when, target) else None


def publish(layout: Layout, camera_id: str, staged: list[Path | None],
            stored: list[int | None]) -> None:
    """Each staged picture renamed to its stored incident's id; an incident that extended
    an earlier one (None) keeps that one's picture."""
    for path, incident_id in zip(staged, stored):
        if path is not None and incident_id is not None:
            path.rename(layout.snapshot(camera_id, incident_id))