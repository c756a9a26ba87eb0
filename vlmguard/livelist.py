"""One live playlist per camera across FFmpeg runs.

Each FFmpeg run writes its own playlist (live/<cam>/index.m3u8) and numbers its segments
from where the previous run stopped. When a run ends, the streamer carries that run's last
segments over into live/<cam>/history.json; the HLS server serves the carried segments
followed, after an EXT-X-DISCONTINUITY, by whatever the current run's playlist lists at
that moment (so a new segment is served as soon as FFmpeg lists it). Players see one
playlist whose media sequence grows by one per segment, never a 503 during a restart.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

SEGMENT_URI = re.compile(r"seg-(\d{1,20})\.ts")
# Playlist-wide tags: written once in the served header, never copied per segment.
HEADER_TAGS = ("#EXTM3U", "#EXT-X-VERSION", "#EXT-X-TARGETDURATION", "#EXT-X-MEDIA-SEQUENCE",
               "#EXT-X-DISCONTINUITY-SEQUENCE", "#EXT-X-INDEPENDENT-SEGMENTS", "#EXT-X-ENDLIST",
               "#EXT-X-PLAYLIST-TYPE", "#EXT-X-ALLOW-CACHE", "#EXT-X-START",
               "#EXT-X-DISCONTINUITY")


@dataclass(frozen=True)
class Segment:
    sequence: int
    uri: str
    duration: float
    tags: tuple[str, ...]  # EXTINF, PROGRAM-DATE-TIME, ... in FFmpeg's order
    discontinuity: int = 0  # which run it came from, counted in discontinuities


@dataclass(frozen=True)
class History:
    """What the served playlist carries over from ended runs."""
    segments: tuple[Segment, ...] = ()
    next_sequence: int | None = None  # where the next run starts numbering
    discontinuity: int = 0  # the current run's discontinuity number
    updated: float = 0.0  # when the carried segments were last fresh (epoch)
    version: int = 3


@dataclass(frozen=True)
class Window:
    segments: tuple[Segment, ...] = field(default_factory=tuple)
    version: int = 3
    fresh_at: float = 0.0  # epoch of the newest listing: older than the stale limit = offline


def parse_playlist(text: str) -> tuple[list[Segment], int]:
    """FFmpeg's playlist as segments (only our seg-N.ts names), and its version."""
    segments, tags, version = [], [], 3
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#EXT-X-VERSION:"):
            version = int(line[15:]) if line[15:].isdigit() else version
        elif line.startswith("#"):
            if not line.startswith(HEADER_TAGS):
                tags.append(line)
        else:
            match = SEGMENT_URI.fullmatch(line)
            if match:
                segments.append(Segment(int(match.group(1)), line, extinf(tags), tuple(tags)))
            tags = []
    return segments, version


def extinf(tags: list[str]) -> float:
    for tag in tags:
        if tag.startswith("#EXTINF:"):
            try:
                return float(tag[8:].split(",")[0])
            except ValueError:
                return 0.0
    return 0.0


def read_history(path: Path) -> History:
    """The carried-over segments; an absent or unreadable file is an empty history."""
    try:
        data = json.loads(path.read_text())
        return History(
            segments=tuple(Segment(s["sequence"], s["uri"], float(s["duration"]),
                                   tuple(s["tags"]), int(s["discontinuity"]))
                           for s in data["segments"]),
            next_sequence=data["next_sequence"], discontinuity=int(data["discontinuity"]),
            updated=float(data["updated"]), version=int(data.get("version", 3)))
    except (OSError, ValueError, KeyError, TypeError):
        return History()


def write_history(path: Path, history: History) -> None:
    """Atomically, so the HLS server never reads half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(asdict(history)))
    os.replace(temp, path)


def carry_over(history: History, ended_playlist: str | None, ended_at: float, keep: int,
               stale_seconds: float, now: float | None = None) -> History:
    """The history once a run has ended with ended_playlist (None: it listed nothing).

    Segments older than the stale limit are dropped (the camera was offline: nothing to
    continue), but the numbering and the discontinuity count go on regardless."""
    now = time.time() if now is None else now
    ended, version = parse_playlist(ended_playlist) if ended_playlist else ([], history.version)
    ended = [replace(s, discontinuity=history.discontinuity) for s in ended
             if history.next_sequence is None or s.sequence >= history.next_sequence]
    segments = list(history.segments)
    updated = history.updated
    discontinuity = history.discontinuity
    if ended:
        segments += ended
        updated = ended_at
        discontinuity += 1
    if now - updated > stale_seconds:
        segments = []
    last = max([s.sequence for s in segments + ended], default=None)
    next_sequence = history.next_sequence
    if last is not None:
        next_sequence = max(next_sequence or 0, last + 1)
    return History(tuple(segments[-keep:]), next_sequence, discontinuity, updated, version)


def live_window(history: History, current_playlist: str | None, current_at: float,
                size: int) -> Window:
    """The last `size` segments: carried ones, then the current run's."""
    current, version = (parse_playlist(current_playlist) if current_playlist
                        else ([], history.version))
    if history.next_sequence is not None:
        # The streamer may be between writing the history and removing the ended
        # run's playlist: a segment already carried over is not listed twice.
        current = [s for s in current if s.sequence >= history.next_sequence]
    current = [replace(s, discontinuity=history.discontinuity) for s in current]
    segments = (list(history.segments) + current)[-size:]
    fresh_at = max(current_at if current else 0.0, history.updated if history.segments else 0.0)
    return Window(tuple(segments), version, fresh_at)


def served_window(layout, camera_id: str, size: int) -> Window:
    """What the HLS server lists right now: the history, then the running FFmpeg's
    playlist as FFmpeg last replaced it (read at request time: no added latency)."""
    playlist = layout.live(camera_id) / "index.m3u8"
    try:
        current_at, current = playlist.stat().st_mtime, playlist.read_text()
    except OSError:
        current_at, current = 0.0, None
    return live_window(read_history(layout.live_history(camera_id)), current, current_at, size)


def live_age(layout, camera_id: str, size: int) -> float:
    """Seconds since the served playlist last gained a segment; inf when it lists none.
    Across an FFmpeg restart this keeps counting from the ended run's last segment."""
    window = served_window(layout, camera_id, size)
    return time.time() - window.fresh_at if window.segments else float("inf")


def render(window: Window, target: int, token_query: str = "") -> str:
    first = window.segments[0]
    out = ["#EXTM3U", f"#EXT-X-VERSION:{window.version}", f"#EXT-X-TARGETDURATION:{target}",
           # The spec's floor for a live start point: three target durations from the end.
           f"#EXT-X-START:TIME-OFFSET=-{3 * target}",
           f"#EXT-X-MEDIA-SEQUENCE:{first.sequence}"]
    if first.discontinuity:
        out.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{first.discontinuity}")
    out.append("#EXT-X-INDEPENDENT-SEGMENTS")
    previous = first
    for segment in window.segments:
        if segment.discontinuity != previous.discontinuity:
            out.append("#EXT-X-DISCONTINUITY")
        out.extend(segment.tags)
        out.append(segment.uri + token_query)
        previous = segment
    return "\n".join(out) + "\n"


def program_date(segment: Segment) -> float | None:
    """The wall-clock start (epoch) FFmpeg wrote for a segment, None without one."""
    for tag in segment.tags:
        if tag.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
            try:
                return datetime.strptime(tag[25:], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
            except ValueError:
                return None
    return None
