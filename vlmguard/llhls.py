"""Low-Latency HLS for one camera (draft-pantos-hls-rfc8216bis), packaged in the
streaming process from what FFmpeg writes.

FFmpeg copies the camera's video into fragmented MP4 on a pipe, one fragment (moof +
mdat) per frame. LiveStream groups those fragments, unchanged, into parts of about
storage.part_seconds and into segments that begin at keyframes, about
storage.segment_seconds long. FFmpeg's own fragments are the parts' bytes: nothing is
re-encoded or rewritten, and a part is listed the moment its last frame arrives.

Files, in the camera's live folder (RAM), written once each: init-R.mp4 (the run's init
section, R its first segment number), seg-N.mp4 (a whole fMP4 file: the init section,
then the segment's fragments, so every consumer of live segments - analysis windows,
clips, players given the file - can open it alone), and index.m3u8 listing the run's
segments the way FFmpeg's HLS muxer did (livelist.py reads it; so do the archiver's
windows). The parts of the segment being written live in memory only; a finished
segment's parts are byte ranges of its file.

Served (web/hls.py): one playlist with the carried segments of earlier runs (livelist),
this run's segments, and the parts of the last few; EXT-X-PRELOAD-HINT names the next
part. A blocking playlist request (_HLS_msn/_HLS_part) or a request for the hinted part
waits on one shared future, no thread and no file per waiting client, and is answered
when the part is listed. Players that know nothing of parts read the same playlist as
ordinary fMP4 HLS.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from vlmguard.fmp4 import Timing, Track, fragment_timing, parse_init, read_box
from vlmguard.livelist import History, Segment, same_container, segment_lines
from vlmguard.logs import get_logger
from vlmguard.times import iso_epoch

log = get_logger("vlmguard.llhls")

# Parts are listed for the segments ending within this many target durations of the end.
PART_LIST_TARGETS = 3
# A part is given this much room over its nominal length (frames' timing jitters): its
# PART-TARGET, which no part may exceed, while full parts stay above the 85 % the spec asks.
PART_MARGIN = 1.15
# No parts when the camera's frames are further apart than this many part_seconds.
MAX_FRAME_PARTS = 2.0
FRAMES_KEPT = 50  # recent frame durations, for the median frame length
REANCHOR_SECONDS = 0.1  # program dates follow the wall clock again past this drift
# A frame lasting longer than this many median frames (and over HOLE_SECONDS), followed by
# a keyframe, stands for a hole in the live video: FFmpeg's live fifo dropped frames while
# this process did not read, the muxer stretched the last frame before the hole over it,
# and the fifo started again at a keyframe.
HOLE_FRAMES = 10
HOLE_SECONDS = 1.0
PART_HOLD_BACK_PARTS = 3  # the spec's SHOULD: at least three part targets
HOLD_BACK_TARGETS = 3
SKIP_TARGETS = 6  # CAN-SKIP-UNTIL may not be less than six target durations


@dataclass(frozen=True)
class Part:
    number: int  # counted through the run: the URI, so the preload hint is always right
    index: int  # within its segment: what _HLS_part counts
    duration: float
    independent: bool
    offset: int  # from the segment's first fragment (its file's init section excluded)
    size: int


@dataclass(frozen=True)
class DoneSegment:
    """A finished segment of this run: its playlist entry and where its parts are."""
    segment: Segment
    parts: tuple[Part, ...]
    path: Path
    media_offset: int  # the init section's length: where the fragments begin in the file


@dataclass
class OpenSegment:
    """The segment being written: its finished parts (bytes kept until it closes) and the
    fragments of the part being assembled."""
    sequence: int
    start_dts: int
    program_date: float
    duration: int = 0
    parts: list[Part] = field(default_factory=list)
    part_bytes: list[bytes] = field(default_factory=list)
    pending: list[tuple[bytes, Timing]] = field(default_factory=list)  # the next part's
    pending_duration: int = 0
    pending_independent: bool = False
    size: int = 0  # bytes in finished parts


@dataclass(frozen=True)
class Settings:
    segment_seconds: int
    live_segments: int
    part_seconds: float
    low_latency: bool = True


def part_plan(frame_seconds: float, part_seconds: float,
              gop_frames: int | None = None) -> float | None:
    """The PART-TARGET for frames frame_seconds apart: a whole number of frames near
    part_seconds (one that divides the GOP when one is near enough, so that a segment is
    whole parts, not a last sliver), with PART_MARGIN of room; None when frames are too
    far apart for parts."""
    if frame_seconds <= 0 or frame_seconds > MAX_FRAME_PARTS * part_seconds:
        return None
    frames = max(1, round(part_seconds / frame_seconds))
    if gop_frames:
        fitting = [n for n in range(1, gop_frames + 1) if gop_frames % n == 0
                   and 0.8 * part_seconds <= n * frame_seconds <= 1.34 * part_seconds]
        if fitting:
            frames = min(fitting, key=lambda n: abs(n * frame_seconds - part_seconds))
    return math.ceil(frames * frame_seconds * PART_MARGIN * 1000) / 1000


def fmt(seconds: float) -> str:
    return f"{seconds:.5f}".rstrip("0").rstrip(".") if seconds else "0"


class LiveStream:
    """One camera's live HLS in the streaming process, across FFmpeg runs."""

    def __init__(self, camera_id: str, live_dir: Path, settings: Settings, clock=time.time):
        self.clock = clock  # the wall clock: program dates, freshness
        self.camera_id = camera_id
        self.live_dir = live_dir
        self.settings = settings
        self.carried: list[Segment] = []
        self.discontinuity = 0
        self.run_start = 0
        self.run_active = False
        self.track: Track | None = None
        self.init_uri: str | None = None
        self.init_bytes = b""
        self.done: list[DoneSegment] = []
        self.open: OpenSegment | None = None
        self.part_target: float | None = None  # fixed once known, for the stream's life
        self.no_parts: str | None = None  # why this camera gets no parts
        self.frames: deque[int] = deque(maxlen=FRAMES_KEPT)
        self.anchor: tuple[float, int] | None = None  # (epoch, decode time) for program dates
        self.least_lag = math.inf
        self.target = settings.segment_seconds
        self.fresh_at = 0.0
        self.version = 0
        self.changed: asyncio.Future | None = None
        # Blocking playlist requests, by the (msn, part) they wait for (a whole segment
        # sorts after its parts): only those whose part has come are woken.
        self.waiters: list[tuple[tuple[int, float], int, asyncio.Future]] = []
        self.tickets = itertools.count()
        self.rendered: dict[tuple, str] = {}
        self.part_count = 0  # parts made in this run
        self.run_discontinuity = 0  # the discontinuity number the run began with
        self.holes = 0  # holes in the live video, for the stream's life
        self.hole_seconds = 0.0
        # A frame that may stand for a hole, until the next shows whether video starts
        # again after it at a keyframe (FFmpeg's fifo after dropping frames does).
        self.held: tuple[bytes, Timing, float] | None = None

    # -- what the packager is told -------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Whether the served playlist comes from here (an fMP4 run has begun)."""
        return self.init_uri is not None

    def stop_serving(self) -> None:
        """The camera went back to FFmpeg's own MPEG-TS segments (web/hls.py serves them)."""
        self.init_uri = None
        self.done, self.open, self.run_active = [], None, False
        self.bump()

    def start_run(self, history: History, run_start: int) -> None:
        """A new FFmpeg run numbers its segments from run_start; history holds what the
        ended runs left in the playlist (livelist.carry_over)."""
        self.carried = [s for s in history.segments if s.sequence < run_start]
        self.discontinuity = self.run_discontinuity = history.discontinuity
        self.fresh_at = history.updated if self.carried else 0.0
        self.run_start = run_start
        self.run_active = True
        self.track = None
        self.done = []
        self.open = None
        self.anchor = None
        self.least_lag = math.inf
        self.frames.clear()
        self.part_count = 0
        self.held = None
        self.bump()

    def add_init(self, data: bytes, moov: bytes) -> None:
        """The run's init section (ftyp + moov), written to init-R.mp4."""
        self.track = parse_init(moov)
        self.init_bytes = data
        self.init_uri = f"init-{self.run_start}.mp4"
        write_once(self.live_dir / self.init_uri, [data])

    def add_fragment(self, data: bytes, moof: bytes) -> None:
        """One fragment (a frame) from FFmpeg, in order."""
        if self.track is None:
            return
        now = self.clock()
        timing = fragment_timing(moof, self.track)
        if self.held is not None:
            held, self.held = self.held, None
            if timing.keyframe:
                self.skip_hole(held[1])
            else:
                self.place(*held)  # a long frame within a GOP: the camera's, kept as it is
        if self.is_hole(timing):
            self.held = (data, timing, now)  # the next frame tells
            return
        self.place(data, timing, now)

    def place(self, data: bytes, timing: Timing, now: float) -> None:
        """Add a frame to the part and segment it belongs to."""
        if timing.duration > 0:
            self.frames.append(timing.duration)
        if self.open is None and not timing.keyframe:
            return  # a segment starts with a keyframe
        self.follow_clock(timing.decode_time + timing.duration, now)
        scale = self.track.timescale
        if self.open is None or (timing.keyframe and self.open.duration + self.open.pending_duration
                                 >= self.settings.segment_seconds * scale - self.frame_units() / 2):
            if self.open is not None:
                self.close_segment()
            self.open = OpenSegment(self.next_sequence(), timing.decode_time,
                                    self.program_date(timing.decode_time))
        if self.part_target is not None and self.open.pending and \
                self.open.pending_duration + timing.duration > self.part_target * scale:
            self.close_part()
        if not self.open.pending:
            self.open.pending_independent = timing.keyframe
        self.open.pending.append((data, timing))
        self.open.pending_duration += timing.duration
        if self.part_target is not None and self.open.pending_duration + self.frame_units() > \
                self.part_target * scale:
            self.close_part()

    def end_run(self) -> None:
        """FFmpeg has ended: the segment it was writing ends here, with what it has."""
        if self.held is not None:
            self.place(*self.held)
            self.held = None
        if self.open is not None and (self.open.pending or self.open.parts):
            self.close_segment(at_keyframe=False)
        self.open = None
        self.run_active = False
        self.bump()

    # -- holes ---------------------------------------------------------------------------

    def is_hole(self, timing: Timing) -> bool:
        median = self.frame_units()
        return median > 0 and timing.duration > HOLE_FRAMES * median and \
            timing.duration > HOLE_SECONDS * self.track.timescale

    def skip_hole(self, timing: Timing) -> None:
        """Frames are missing after this one (its duration spans them, and a keyframe
        follows them): it is left out, the segment being written ends before it, and the
        video that follows comes after EXT-X-DISCONTINUITY, as the spec asks where the
        timestamps jump. Every part and segment already listed stays where it is."""
        seconds = timing.duration / self.track.timescale
        self.holes += 1
        self.hole_seconds += seconds
        log.warning("live video skipped: a hole in the frames (FFmpeg drops live ones, never"
                    " archived ones, while this process falls behind)", camera_id=self.camera_id,
                    hole_s=round(seconds, 2), holes=self.holes)
        if self.open is not None and (self.open.pending or self.open.parts):
            self.close_segment(at_keyframe=False)
        self.open = None
        if self.done:
            self.discontinuity += 1
        self.bump()

    # -- cutting -------------------------------------------------------------------------

    def frame_units(self) -> int:
        return int(statistics.median(self.frames)) if self.frames else 0

    def next_sequence(self) -> int:
        return self.done[-1].segment.sequence + 1 if self.done else self.run_start

    def follow_clock(self, media_end: int, now: float) -> None:
        """Program dates are the wall clock at each frame's arrival, kept continuous: the
        anchor moves only by the drift the least delayed frame of a segment shows."""
        scale = self.track.timescale
        if self.anchor is None:
            self.anchor = (now, media_end)
        lag = now - (self.anchor[0] + (media_end - self.anchor[1]) / scale)
        self.least_lag = min(self.least_lag, lag)

    def program_date(self, decode_time: int) -> float:
        if self.least_lag != math.inf and abs(self.least_lag) > REANCHOR_SECONDS:
            self.anchor = (self.anchor[0] + self.least_lag, self.anchor[1])
        self.least_lag = math.inf
        return self.anchor[0] + (decode_time - self.anchor[1]) / self.track.timescale

    def close_part(self) -> None:
        segment = self.open
        data = b"".join(chunk for chunk, _timing in segment.pending)
        part = Part(self.part_count, len(segment.parts), segment.pending_duration / self.track.timescale,
                    segment.pending_independent, segment.size, len(data))
        segment.parts.append(part)
        segment.part_bytes.append(data)
        segment.size += len(data)
        segment.duration += segment.pending_duration
        segment.pending, segment.pending_duration = [], 0
        self.part_count += 1
        self.bump()

    def close_segment(self, at_keyframe: bool = True) -> None:
        """The open segment is complete (the next keyframe is here, or FFmpeg ended)."""
        segment = self.open
        if self.part_target is None and self.no_parts is None:
            self.choose_part_target(len(segment.pending) if at_keyframe else None)
            if self.part_target is not None:
                self.split_first_segment()
        if segment.pending:
            self.close_part()
        seconds = segment.duration / self.track.timescale
        name = f"seg-{segment.sequence}.mp4"
        path = self.live_dir / name
        write_once(path, [self.init_bytes, *segment.part_bytes])
        entry = Segment(segment.sequence, name, seconds,
                        (f"#EXTINF:{seconds:.6f},", f"#EXT-X-PROGRAM-DATE-TIME:{iso_epoch(segment.program_date)}"),
                        self.discontinuity, self.init_uri)
        self.done.append(DoneSegment(entry, tuple(segment.parts), path, len(self.init_bytes)))
        self.open = None
        self.target = max(self.target, math.ceil(seconds - 0.01))
        self.fresh_at = self.clock()
        self.delete_old_files()
        self.write_run_playlist()
        self.bump()

    def choose_part_target(self, gop: int | None) -> None:
        """Decided once, from the frames of the first segment (gop of them, None when it
        was cut short): PART-TARGET may not change."""
        if not self.settings.low_latency:
            self.no_parts = "low_latency is off for this camera"
            return
        frame = self.frame_units() / self.track.timescale
        self.part_target = part_plan(frame, self.settings.part_seconds, gop)
        if self.part_target is None:
            self.no_parts = (f"frames {frame:.2f} s apart: parts need at least one frame "
                             f"every {MAX_FRAME_PARTS * self.settings.part_seconds:.2f} s")
            log.warning("no low-latency parts for this camera, ordinary segments only",
                        camera_id=self.camera_id, reason=self.no_parts)
        else:
            log.info("low-latency parts", camera_id=self.camera_id, part_target_s=self.part_target,
                     frame_s=round(frame, 4))

    def split_first_segment(self) -> None:
        """The first segment was collected before the part length was known: cut it into
        parts now, with the same rule as every later one."""
        segment = self.open
        fragments = segment.pending
        segment.pending, segment.pending_duration = [], 0
        track = self.track
        for data, timing in fragments:
            if segment.pending and segment.pending_duration + timing.duration > \
                    self.part_target * track.timescale:
                self.close_part()
            if not segment.pending:
                segment.pending_independent = timing.keyframe
            segment.pending.append((data, timing))
            segment.pending_duration += timing.duration
            if segment.pending_duration + self.frame_units() > self.part_target * track.timescale:
                self.close_part()

    def delete_old_files(self) -> None:
        """A segment stays downloadable for the playlist's length after it leaves it."""
        keep = 2 * self.settings.live_segments + 1
        while len(self.done) > keep:
            gone = self.done.pop(0)
            gone.path.unlink(missing_ok=True)

    def write_run_playlist(self) -> None:
        """index.m3u8 as FFmpeg's HLS muxer wrote it: this run's last segments."""
        listed = [d.segment for d in self.done[-self.settings.live_segments:]]
        lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{self.target}",
                 f"#EXT-X-MEDIA-SEQUENCE:{listed[0].sequence}"]
        # Holes within the run, counted from its start (livelist.parse_playlist).
        if listed[0].discontinuity > self.run_discontinuity:
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:"
                         f"{listed[0].discontinuity - self.run_discontinuity}")
        lines += ["#EXT-X-INDEPENDENT-SEGMENTS", f'#EXT-X-MAP:URI="{self.init_uri}"']
        previous = listed[0]
        for segment in listed:
            if segment.discontinuity != previous.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines += [*segment.tags, segment.uri]
            previous = segment
        write_once(self.live_dir / "index.m3u8", ["\n".join(lines).encode() + b"\n"])

    # -- waiting -------------------------------------------------------------------------

    def bump(self) -> None:
        self.version += 1
        self.rendered.clear()
        if self.changed is not None and not self.changed.done():
            self.changed.set_result(None)
        self.changed = None
        self.release_waiters()

    def release_waiters(self) -> None:
        """Answer the blocking requests whose part (or segment) the playlist now holds:
        the heap's first ones, in the order parts come."""
        while self.waiters:
            (msn, part), ticket, future = self.waiters[0]
            if future.done():  # timed out
                heapq.heappop(self.waiters)
                continue
            parts = self.parts_of(msn) if part != math.inf else None
            if parts is not None and part >= len(parts):
                # Past a finished segment's last part: part 0 of the next one.
                heapq.heapreplace(self.waiters, ((msn + 1, 0), ticket, future))
                continue
            if not self.has(msn, None if part == math.inf else int(part)):
                return
            heapq.heappop(self.waiters)
            future.set_result(None)

    async def wait_for(self, msn: int, part: int | None, timeout: float) -> bool:
        """Until the playlist holds segment msn (part None) or that part; False on timeout.
        A waiting request costs a future in a heap: no thread, no file, no wake-up at
        every part."""
        if self.has(msn, part):
            return True
        future = asyncio.get_running_loop().create_future()
        key = (msn, math.inf if part is None else part)
        heapq.heappush(self.waiters, (key, next(self.tickets), future))
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def next_change(self, timeout: float) -> bool:
        """Wait for the next change; False on timeout. One future for every waiter."""
        if self.changed is None:
            self.changed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self.changed), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # -- what the server asks ------------------------------------------------------------

    @property
    def low_latency(self) -> bool:
        return self.part_target is not None

    def listed(self) -> list[Segment]:
        """The complete segments the served playlist lists now, oldest first."""
        run = [d.segment for d in self.done]
        carried = same_container(self.carried, run[0]) if run else self.carried
        return (carried + run)[-self.settings.live_segments:]

    def last_sequence(self) -> int | None:
        listed = self.listed()
        return listed[-1].sequence if listed else None

    def hint(self) -> tuple[int, int]:
        """Where the part that comes next goes: (media sequence number, part index), as
        far as can be told (a keyframe may start a new segment with it)."""
        if self.open is not None:
            return self.open.sequence, len(self.open.parts)
        last = self.last_sequence()
        return (self.next_sequence() if self.run_active or last is None else last + 1), 0

    def part_name(self, number: int) -> str:
        return f"part-{self.run_start}-{number}.m4s"

    def parts_of(self, sequence: int) -> tuple[Part, ...] | None:
        for done in self.done:
            if done.segment.sequence == sequence:
                return done.parts
        return None

    def has(self, msn: int, part: int | None) -> bool:
        """Whether the playlist holds segment msn (part None) or its part, or later."""
        last = self.last_sequence()
        if part is None:
            return last is not None and last >= msn
        while True:
            if self.open is not None and msn == self.open.sequence:
                return part < len(self.open.parts)
            if last is None or msn > last:
                return False
            parts = self.parts_of(msn)
            # A part index past a finished segment's last part means part 0 of the next.
            if parts is None or part < len(parts):
                return True
            msn, part = msn + 1, 0

    def too_far(self, msn: int, part: int | None) -> bool:
        """A request beyond what the spec lets a client ask for: the last segment plus
        two, or parts more than the Advance Part Limit ahead of the last one."""
        last = self.last_sequence()
        if last is None:
            return False
        if msn > last + 2:
            return True
        if part is None or not self.low_latency:
            return False
        limit = 3 / self.part_target if self.part_target < 1 else 3
        hint_msn, hint_part = self.hint()
        per_segment = max(1, round(self.target / self.part_target))
        ahead = (msn - hint_msn) * per_segment + part - hint_part + 1
        return ahead > limit

    def playlist(self, skip: bool = False, token_query: str = "") -> str | None:
        """The served playlist; None while there is nothing to serve. Cached per change."""
        key = (skip, token_query)
        if key not in self.rendered:
            text = self.render(skip, token_query)
            if text is None:
                return None
            self.rendered[key] = text
        return self.rendered[key]

    def skip_until(self) -> float | None:
        """CAN-SKIP-UNTIL, offered when a delta update would leave segments out."""
        seconds = SKIP_TARGETS * self.target
        if not self.low_latency or \
                self.settings.live_segments * self.settings.segment_seconds <= seconds:
            return None
        return float(seconds)

    def render(self, skip: bool, token_query: str) -> str | None:
        listed = self.listed()
        if not listed:
            return None
        target = self.target = max(self.target, *(math.ceil(s.duration - 0.01) for s in listed))
        skip_until = self.skip_until()
        skipped = skipped_count(listed, skip_until) if skip and skip_until else 0
        first = listed[0]
        out = ["#EXTM3U", f"#EXT-X-VERSION:{9 if skipped else 6}",
               f"#EXT-X-TARGETDURATION:{target}"]
        if self.low_latency:
            control = ["CAN-BLOCK-RELOAD=YES",
                       f"PART-HOLD-BACK={fmt(PART_HOLD_BACK_PARTS * self.part_target)}",
                       f"HOLD-BACK={fmt(HOLD_BACK_TARGETS * target)}"]
            if skip_until:
                control.append(f"CAN-SKIP-UNTIL={fmt(skip_until)}")
            out += ["#EXT-X-SERVER-CONTROL:" + ",".join(control),
                    f"#EXT-X-PART-INF:PART-TARGET={fmt(self.part_target)}"]
        else:
            out.append(f"#EXT-X-START:TIME-OFFSET=-{HOLD_BACK_TARGETS * target}")
        out.append(f"#EXT-X-MEDIA-SEQUENCE:{first.sequence}")
        if first.discontinuity:
            out.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{first.discontinuity}")
        out.append("#EXT-X-INDEPENDENT-SEGMENTS")
        if skipped:
            out.append(f"#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}")
        shown = listed[skipped:]
        with_parts = self.part_window(listed) if self.low_latency else set()
        out += segment_lines(shown, token_query,
                             parts=lambda s: self.part_lines(s, with_parts, token_query))
        if self.low_latency:
            out += self.open_lines(listed[-1], token_query)
        return "\n".join(out) + "\n"

    def part_window(self, listed: list[Segment]) -> set[int]:
        """The segments whose parts are listed: those ending within PART_LIST_TARGETS
        target durations of the playlist's end."""
        seconds = (self.open.duration / self.track.timescale) if self.open else 0.0
        chosen = set()
        for segment in reversed(listed):
            if seconds >= PART_LIST_TARGETS * self.target:
                break
            chosen.add(segment.sequence)
            seconds += segment.duration
        return chosen

    def part_lines(self, segment: Segment, with_parts: set[int], token_query: str) -> list[str]:
        parts = self.parts_of(segment.sequence) if segment.sequence in with_parts else None
        return [self.part_line(p, token_query) for p in parts or ()]

    def part_line(self, part: Part, token_query: str) -> str:
        independent = ",INDEPENDENT=YES" if part.independent else ""
        return (f'#EXT-X-PART:DURATION={part.duration:.5f},URI="{self.part_name(part.number)}'
                f'{token_query}"{independent}')

    def open_lines(self, last: Segment, token_query: str) -> list[str]:
        """The segment being written: its parts so far, then the hint for the next."""
        out = []
        segment = self.open
        if segment is not None and segment.parts:
            if last.discontinuity != self.discontinuity:
                out.append("#EXT-X-DISCONTINUITY")
            if last.init != self.init_uri:
                out.append(f'#EXT-X-MAP:URI="{self.init_uri}{token_query}"')
            out.append(f"#EXT-X-PROGRAM-DATE-TIME:{iso_epoch(segment.program_date)}")
            out += [self.part_line(p, token_query) for p in segment.parts]
        out.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{self.part_name(self.part_count)}'
                   f'{token_query}"')
        return out

    def part_data(self, run: int, number: int) -> bytes | None:
        """A part's bytes by its URI's numbers (the open segment's from memory, a finished
        one's from its file); None when there is no such part (any more, or yet)."""
        if run != self.run_start or not self.serving:
            return None
        if self.open is not None:
            for part, data in zip(self.open.parts, self.open.part_bytes):
                if part.number == number:
                    return data
        for done in self.done:
            for part in done.parts:
                if part.number == number:
                    try:
                        with open(done.path, "rb") as handle:
                            handle.seek(done.media_offset + part.offset)
                            return handle.read(part.size)
                    except OSError:
                        return None
        return None

    def is_coming(self, run: int, number: int) -> bool:
        """Whether a part not there yet is the one the preload hint names: worth waiting for."""
        return self.run_active and run == self.run_start and number == self.part_count

    def health(self) -> str:
        if self.part_target is not None:
            mode = f"ll-hls (parts of up to {self.part_target:.3f} s)"
        elif self.no_parts is not None:
            mode = f"hls, fMP4 segments without parts: {self.no_parts}"
        else:
            mode = "ll-hls (starting)"
        if self.holes:
            mode += f"; gaps in live video: {self.holes} ({self.hole_seconds:.1f} s)"
        return mode


def skipped_count(listed: list[Segment], skip_until: float) -> int:
    """Leading segments a delta update leaves out: those starting more than skip_until
    before the end, and only of the same run as the first one shown."""
    remaining = sum(s.duration for s in listed)
    count = 0
    for segment in listed[:-1]:
        if remaining - segment.duration < skip_until:
            break
        remaining -= segment.duration
        count += 1
    while 0 < count < len(listed) and (listed[count].discontinuity != listed[0].discontinuity
                                       or listed[count].init != listed[0].init):
        count -= 1
    return count


def write_once(path: Path, chunks: list[bytes]) -> None:
    """Write a file whole, under a temporary name renamed into place: a reader never sees
    half of it. Media files are written once (their names are never reused); the run's
    playlist is replaced this way at every segment."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
    os.replace(temp, path)


async def pump(reader: asyncio.StreamReader, stream: LiveStream) -> None:
    """Feed FFmpeg's fMP4 output to stream until FFmpeg closes it: the boxes before the
    first moof are the init section; then each moof, with what precedes it and its
    mdat, is one fragment. Raises Fmp4Error on a stream that is not fMP4."""
    init: list[bytes] = []
    pending: list[bytes] = []
    moof = None
    while (box := await read_box(reader)) is not None:
        kind, data = box
        if stream.track is None:
            init.append(data)
            if kind == b"moov":
                stream.add_init(b"".join(init), data)
                init = []
            continue
        pending.append(data)
        if kind == b"moof":
            moof = data
        elif kind == b"mdat" and moof is not None:
            stream.add_fragment(b"".join(pending), moof)
            pending, moof = [], None
