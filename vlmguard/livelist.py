"""One live playlist per camera across FFmpeg runs.

Each FFmpeg run writes its own playlist (live/<cam>/index.m3u8) and numbers its segments
from where the previous run stopped. A run's segments are MPEG-TS files (seg-N.ts, FFmpeg's
HLS muxer) or, with low latency, whole fragmented MP4 files (seg-N.mp4: the run's init
section, then the segment's fragments), each listed after an EXT-X-MAP naming the run's
init file (init-R.mp4); llhls.py writes those. When a run ends, the streamer carries that run's last
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

SEGMENT_URI = re.compile(r"seg-(\d{1,20})\.(ts|mp4)")
INIT_URI = re.compile(r"init-(\d{1,20})\.mp4")
# Playlist-wide tags: written once in the served header, never copied per segment.
HEADER_TAGS = ("#EXTM3U", "#EXT-X-VERSION", "#EXT-X-TARGETDURATION", "#EXT-X-MEDIA-SEQUENCE",
               "#EXT-X-DISCONTINUITY-SEQUENCE", "#EXT-X-INDEPENDENT-SEGMENTS", "#EXT-X-ENDLIST",
               "#EXT-X-PLAYLIST-TYPE", "#EXT-X-ALLOW-CACHE", "#EXT-X-START",
               "#EXT-X-DISCONTINUITY", "#EXT-X-MAP", "#EXT-X-SERVER-CONTROL", "#EXT-X-PART-INF")


@dataclass(frozen=True)
class Segment:
    sequence: int
    uri: str
    duration: float
    tags: tuple[str, ...]  # EXTINF, PROGRAM-DATE-TIME, ... in FFmpeg's order
    # Discontinuities before it: runs, and holes in a run's live video (llhls.py). In a
    # run's own playlist, counted from the run's start.
    discontinuity: int = 0
    init: str | None = None  # an fMP4 segment's init file (EXT-X-MAP); None for MPEG-TS

    @property
    def container(self) -> str:
        return "mp4" if self.uri.endswith(".mp4") else "ts"


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
    """A run's playlist as segments (only our seg-N names), and its version. A segment's
    discontinuity counts those within the run (FFmpeg's own playlists have none)."""
    segments, tags, version, init, discontinuity = [], [], 3, None, 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#EXT-X-VERSION:"):
            version = int(line[15:]) if line[15:].isdigit() else version
        elif line.startswith("#EXT-X-DISCONTINUITY-SEQUENCE:"):
            discontinuity = int(line[30:]) if line[30:].isdigit() else discontinuity
        elif line == "#EXT-X-DISCONTINUITY":
            discontinuity += 1
        elif line.startswith("#EXT-X-MAP:"):
            init = map_uri(line)
        elif line.startswith("#"):
            if not line.startswith(HEADER_TAGS):
                tags.append(line)
        else:
            match = SEGMENT_URI.fullmatch(line)
            if match:
                segments.append(Segment(int(match.group(1)), line, extinf(tags), tuple(tags),
                                        discontinuity,
                                        init=init if match.group(2) == "mp4" else None))
            tags = []
    return segments, version


def map_uri(line: str) -> str | None:
    """The URI of an EXT-X-MAP tag when it names one of our init files."""
    match = re.search(r'URI="([^"]*)"', line)
    return match.group(1) if match and INIT_URI.fullmatch(match.group(1)) else None


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
                                   tuple(s["tags"]), int(s["discontinuity"]), s.get("init"))
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
    ended = [replace(s, discontinuity=history.discontinuity + s.discontinuity) for s in ended
             if history.next_sequence is None or s.sequence >= history.next_sequence]
    segments = list(history.segments)
    updated = history.updated
    discontinuity = history.discontinuity
    if ended:
        segments = same_container(segments, ended[0]) + ended
        updated = ended_at
        discontinuity = ended[-1].discontinuity + 1
    if now - updated > stale_seconds:
        segments = []
    last = max([s.sequence for s in segments + ended], default=None)
    next_sequence = history.next_sequence
    if last is not None:
        next_sequence = max(next_sequence or 0, last + 1)
    return History(tuple(segments[-keep:]), next_sequence, discontinuity, updated, version)


def same_container(segments: list[Segment], following: Segment) -> list[Segment]:
    """The segments a playlist may list before `following`: none when the container
    changed (low latency turned on or off): an EXT-X-MAP cannot be taken back."""
    return segments if not segments or segments[-1].container == following.container else []


def live_window(history: History, current_playlist: str | None, current_at: float,
                size: int) -> Window:
    """The last `size` segments: carried ones, then the current run's."""
    current, version = (parse_playlist(current_playlist) if current_playlist
                        else ([], history.version))
    if history.next_sequence is not None:
        # The streamer may be between writing the history and removing the ended
        # run's playlist: a segment already carried over is not listed twice.
        current = [s for s in current if s.sequence >= history.next_sequence]
    current = [replace(s, discontinuity=history.discontinuity + s.discontinuity)
               for s in current]
    carried = same_container(list(history.segments), current[0]) if current else \
        list(history.segments)
    segments = (carried + current)[-size:]
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
    version = max(window.version, 6) if first.init else window.version
    out = ["#EXTM3U", f"#EXT-X-VERSION:{version}", f"#EXT-X-TARGETDURATION:{target}",
           # The spec's floor for a live start point: three target durations from the end.
           f"#EXT-X-START:TIME-OFFSET=-{3 * target}",
           f"#EXT-X-MEDIA-SEQUENCE:{first.sequence}"]
    if first.discontinuity:
        out.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{first.discontinuity}")
    out.append("#EXT-X-INDEPENDENT-SEGMENTS")
    out.extend(segment_lines(window.segments, token_query))
    return "\n".join(out) + "\n"


def segment_lines(segments, token_query: str = "", previous: Segment | None = None,
                  parts=None) -> list[str]:
    """Each segment's lines as served: a discontinuity where the run changes, the init
    section (EXT-X-MAP) where it changes, its tags, its parts (parts(segment): EXT-X-PART
    lines), its EXTINF and URI."""
    out = []
    for segment in segments:
        if previous is not None and segment.discontinuity != previous.discontinuity:
            out.append("#EXT-X-DISCONTINUITY")
        if segment.init and (previous is None or previous.init != segment.init):
            out.append(f'#EXT-X-MAP:URI="{segment.init}{token_query}"')
        out.extend(t for t in segment.tags if not t.startswith("#EXTINF:"))
        if parts is not None:
            out.extend(parts(segment))
        out.extend(t for t in segment.tags if t.startswith("#EXTINF:"))
        out.append(served_uri(segment.uri) + token_query)
        previous = segment
    return out


def served_uri(uri: str) -> str:
    """The URI players fetch for a segment file: an fMP4 file (init section + fragments,
    playable on its own) is served from its fragments on as seg-N.m4s, since players
    get the init section once, from EXT-X-MAP."""
    return uri[:-4] + ".m4s" if uri.endswith(".mp4") else uri


def program_date(segment: Segment) -> float | None:
    """The wall-clock start (epoch) FFmpeg wrote for a segment, None without one."""
    for tag in segment.tags:
        if tag.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
            try:
                return datetime.strptime(tag[25:], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class LiveSegment:
    """One live segment as a file: MPEG-TS (container "ts") or a whole fragmented MP4
    (container "mp4": init section, then the fragments; fmp4.init_size tells where the
    fragments begin, for serving it after an EXT-X-MAP)."""
    path: Path
    sequence: int
    start: float | None  # epoch of its first frame (EXT-X-PROGRAM-DATE-TIME), None unknown
    # Seconds of video. Its timestamps continue the run's (an MPEG-TS one starts at ~1.4 s
    # plus the run so far): a probe of the file alone reports its end as an fMP4's length.
    duration: float
    discontinuity: int  # changes where FFmpeg restarted: timestamps restart there
    container: str
    init: Path | None  # the run's init file, for an "mp4" segment


def live_segments(layout, camera_id: str, size: int | None = None) -> list[LiveSegment]:
    """The camera's live segments as the live playlist lists them now, oldest first, in
    either container, whose files still exist (at most the last `size`; None: all the
    playlist lists). A segment file is complete and never rewritten once listed; it is
    deleted some time after it leaves the playlist (hard-link it to keep it)."""
    live = layout.live(camera_id)
    window = served_window(layout, camera_id, size if size is not None else 10 ** 6)
    found = []
    for segment in window.segments:
        path = live / segment.uri
        if path.is_file():
            found.append(LiveSegment(path, segment.sequence, program_date(segment),
                                     segment.duration, segment.discontinuity, segment.container,
                                     live / segment.init if segment.init else None))
    return found
