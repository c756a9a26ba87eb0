"""Reading recorded files without FFmpeg: how long each is, and where its keyframes are.

An archive is MPEG-TS as FFmpeg's segment muxer writes it: 188-byte packets, a PAT and a
PMT before every video keyframe (FFmpeg repeats them there), the keyframe's first packet
flagged random-access. So:
- a file's extent (first and last presentation time) is read from its first and last
  few hundred kilobytes: enough to list a week of archives in well under a second;
- its keyframe index (presentation time and byte offset of the PAT before each keyframe)
  comes from one pass over the file with a byte pattern, ~0.2 s per 300 MB in RAM; a byte
  range from one such offset to the next is a segment any HLS player decodes on its own.
  The archiver writes that index next to each archive it files, while the file is still
  in the page cache (see recordings.py); files without one are scanned on demand.
Older archives may be MP4 (plain or fragmented): their extent comes from the boxes
(mvhd, or the fragments' tfdt and trun); their keyframes from FFmpeg (mp4_keyframes).
Times here are seconds in the file's own clock; recordings.py maps them to wall-clock.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vlmguard.ffmpeg import child_env

PACKET = 188
SYNC = 0x47
CLOCK = 90_000  # MPEG-TS timestamps tick at 90 kHz
WRAP = 1 << 33
HEAD_BYTES = 256 * 1024
TAIL_BYTES = 512 * 1024
MAX_TAIL_BYTES = 16 * 1024 * 1024  # a 4K keyframe can be a few MB: look further back
SCAN_CHUNK = PACKET * 21_000  # ~4 MB, whole packets, so no packet straddles two reads
PSI_PIDS = (0x0000, 0x0011)  # PAT and SDT; the PMT's PID is read from the PAT
DEFAULT_FRAME = 0.04
MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"moof", b"traf",
                  b"edts"}


class FootageError(Exception):
    """The file is not video we can read (not MPEG-TS or MP4, empty, or gone)."""


@dataclass(frozen=True)
class Extent:
    """The presentation times of a file's first and last frame (end = last + one frame)."""
    first: float
    end: float

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.first)


@dataclass(frozen=True)
class Keyframe:
    time: float  # presentation time, in the file's clock
    offset: int  # byte offset of the segment that starts with it (its PAT, for MPEG-TS)
    frames: int = 0  # frames from this keyframe to the next (MP4 only: how many to copy)


@dataclass
class KeyframeIndex:
    """Keyframes in file order; `scanned` bytes were read, so a growing file's index is
    extended from there; `end` is the extent's end when the scan reached the file's end."""
    keyframes: list[Keyframe] = field(default_factory=list)
    scanned: int = 0
    first: float | None = None
    end: float | None = None
    size: int = 0

    def as_json(self) -> dict:
        return {"version": 1, "size": self.size, "first": self.first, "end": self.end,
                "keyframes": [[round(k.time, 6), k.offset, k.frames] for k in self.keyframes]}

    @classmethod
    def from_json(cls, data: dict) -> "KeyframeIndex":
        if data.get("version") != 1:
            raise ValueError("unknown index version")
        keyframes = [Keyframe(float(t), int(o), int(n)) for t, o, n in data["keyframes"]]
        return cls(keyframes, int(data["size"]), float(data["first"]), float(data["end"]),
                   int(data["size"]))


# -- MPEG-TS ----------------------------------------------------------------------------

def packet_pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def payload_start(packet: bytes) -> int | None:
    """Where the payload begins in a packet, None when it has none."""
    control = (packet[3] >> 4) & 3
    start = 4
    if control & 2:
        start += 1 + packet[4]
    return start if control & 1 and start < PACKET else None


def pes_pts(packet: bytes) -> int | None:
    """The 90-kHz presentation time in a packet that starts a PES, else None."""
    if not packet[1] & 0x40:
        return None
    start = payload_start(packet)
    if start is None or start + 14 > PACKET or packet[start:start + 3] != b"\0\0\1":
        return None
    if not packet[start + 7] & 0x80:
        return None
    p = packet[start + 9:start + 14]
    return (((p[0] >> 1) & 7) << 30) | (p[1] << 22) | ((p[2] >> 1) << 15) | (p[3] << 7) | (p[4] >> 1)


def is_video_pes(packet: bytes) -> bool:
    start = payload_start(packet) if packet[1] & 0x40 else None
    return (start is not None and start + 4 <= PACKET and packet[start:start + 3] == b"\0\0\1"
            and 0xE0 <= packet[start + 3] <= 0xEF)


def random_access(packet: bytes) -> bool:
    return bool((packet[3] >> 4) & 2 and packet[4] > 0 and packet[5] & 0x40)


def packets(data: bytes, base: int = 0):
    """(file offset, packet) for each whole packet in data, which starts at file offset base
    (not necessarily on a packet boundary: it is realigned)."""
    skip = (-base) % PACKET
    for at in range(skip, len(data) - PACKET + 1, PACKET):
        if data[at] == SYNC:
            yield base + at, data[at:at + PACKET]


def read_at(handle, offset: int, size: int) -> bytes:
    return os.pread(handle.fileno(), size, offset)


@dataclass(frozen=True)
class TsLayout:
    video_pid: int
    pmt_pid: int | None
    first_pts: int


def ts_layout(head: bytes) -> TsLayout:
    """The video PID, PMT PID and first video presentation time from a file's head."""
    if len(head) < PACKET or head[0] != SYNC or (len(head) >= 2 * PACKET and head[PACKET] != SYNC):
        raise FootageError("not MPEG-TS")
    pmt_pid = None
    for _at, packet in packets(head):
        pid = packet_pid(packet)
        if pid == 0 and packet[1] & 0x40 and pmt_pid is None:
            start = payload_start(packet)
            if start is not None:
                section = packet[start + 1 + packet[start]:]
                if len(section) >= 12:
                    pmt_pid = ((section[10] & 0x1F) << 8) | section[11]
        elif is_video_pes(packet):
            pts = pes_pts(packet)
            if pts is not None:
                return TsLayout(pid, pmt_pid, pts)
    raise FootageError("no video in the first packets")


def unwrap(pts: int, first: int) -> int:
    """A 33-bit timestamp that wrapped after first, continued past 2**33."""
    return pts + WRAP if pts < first - WRAP // 2 else pts


def frame_seconds(times: list[int]) -> float:
    """One frame's length, from the smallest step between presentation times."""
    ordered = sorted(set(times))
    steps = [b - a for a, b in zip(ordered, ordered[1:]) if b > a]
    return min(steps) / CLOCK if steps and min(steps) < 2 * CLOCK else DEFAULT_FRAME


def ts_tail_end(handle, size: int, layout: TsLayout) -> float | None:
    """The end of the last whole frame, in seconds: the last video PES times, read from the
    tail (further back when a big keyframe fills it)."""
    span = TAIL_BYTES
    while True:
        base = max(0, size - span)
        data = read_at(handle, base, size - base)
        times = [unwrap(pts, layout.first_pts) for _at, packet in packets(data, base)
                 if packet_pid(packet) == layout.video_pid and (pts := pes_pts(packet)) is not None]
        if times:
            return (max(times) / CLOCK) + frame_seconds(times[-16:])
        if base == 0 or span >= MAX_TAIL_BYTES:
            return None
        span *= 4


def ts_extent(path: Path) -> Extent:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        layout = ts_layout(read_at(handle, 0, HEAD_BYTES))
        end = ts_tail_end(handle, size, layout)
    first = layout.first_pts / CLOCK
    return Extent(first, end if end is not None and end > first else first)


def keyframe_pattern(pid: int) -> re.Pattern:
    """A packet of the video PID that starts a PES and whose adaptation field has the
    random-access flag: a keyframe's first packet."""
    head = bytes([SYNC, 0x40 | (pid >> 8), pid & 0xFF])
    return re.compile(re.escape(head) + rb"[\x30-\x3f][\x01-\xb7][\x40-\x7f\xc0-\xff]", re.S)


def segment_offset(handle, packet_at: int, layout: TsLayout) -> int:
    """The keyframe's segment starts at the PAT/PMT (and SDT) just before it."""
    pids = {*PSI_PIDS, layout.pmt_pid}
    at = packet_at
    for _ in range(4):
        if at < PACKET:
            return 0 if at == 0 or packet_pid(read_at(handle, 0, PACKET)) in pids else at
        before = read_at(handle, at - PACKET, PACKET)
        if len(before) < PACKET or before[0] != SYNC or packet_pid(before) not in pids:
            break
        at -= PACKET
    return at


def scan_ts(path: Path, index: KeyframeIndex | None = None, complete: bool = True) -> KeyframeIndex:
    """The keyframe index of an MPEG-TS file, extended from `index` when given (a file that
    grew since). complete=False: the file is still being written; its end is left unset."""
    index = index or KeyframeIndex()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        layout = ts_layout(read_at(handle, 0, HEAD_BYTES))
        first = unwrap(layout.first_pts, layout.first_pts)
        pattern = keyframe_pattern(layout.video_pid)
        whole = size - size % PACKET
        at = index.scanned
        while at < whole:
            data = read_at(handle, at, min(SCAN_CHUNK, whole - at))
            if not data:
                break
            for match in pattern.finditer(data):
                if match.start() % PACKET:
                    continue
                packet = data[match.start():match.start() + PACKET]
                pts = pes_pts(packet)
                if pts is None or not random_access(packet):
                    continue
                offset = segment_offset(handle, at + match.start(), layout)
                index.keyframes.append(Keyframe(unwrap(pts, first) / CLOCK, offset))
            at += len(data)
        index.scanned = at
        index.first = first / CLOCK
        index.size = size
        index.end = ts_tail_end(handle, size, layout) if complete else None
    if index.keyframes and index.keyframes[0].offset <= 3 * PACKET:
        index.keyframes[0] = Keyframe(index.keyframes[0].time, 0)
    return index


def keyframe_bytes(path: Path, offset: int, limit: int = 16 * 1024 * 1024) -> bytes:
    """The PAT, PMT and keyframe starting at offset, up to the next video frame: what a
    decoder needs for that one picture."""
    with open(path, "rb") as handle:
        layout = ts_layout(read_at(handle, 0, HEAD_BYTES))
        data = bytearray()
        seen_key = False
        at = offset
        while at - offset < limit:
            chunk = read_at(handle, at, 64 * PACKET)
            if not chunk:
                break
            for where, packet in packets(chunk, at):
                if packet_pid(packet) == layout.video_pid and packet[1] & 0x40:
                    if seen_key:
                        return bytes(data)
                    seen_key = True
                data += packet
            at += len(chunk) - len(chunk) % PACKET
    return bytes(data)


# -- MP4 --------------------------------------------------------------------------------

def boxes(handle, start: int, end: int):
    """(type, payload offset, box end) for each box between start and end."""
    at = start
    while at + 8 <= end:
        header = read_at(handle, at, 16)
        if len(header) < 8:
            return
        size, kind = struct.unpack(">I4s", header[:8])
        body = at + 8
        if size == 1 and len(header) >= 16:
            size, body = struct.unpack(">Q", header[8:16])[0], at + 16
        elif size == 0:
            size = end - at
        if size < body - at:
            return
        yield kind, body, min(at + size, end)
        at += size


def find_box(handle, start: int, end: int, path: list[bytes]) -> tuple[int, int] | None:
    for kind, body, stop in boxes(handle, start, end):
        if kind == path[0]:
            return (body, stop) if len(path) == 1 else find_box(handle, body, stop, path[1:])
    return None


def video_track(handle, moov: tuple[int, int]) -> tuple[int, int] | None:
    """(track id, timescale) of the first video track."""
    for kind, body, stop in boxes(handle, *moov):
        if kind != b"trak":
            continue
        hdlr = find_box(handle, body, stop, [b"mdia", b"hdlr"])
        if hdlr is None or read_at(handle, hdlr[0] + 8, 4) != b"vide":
            continue
        mdhd = find_box(handle, body, stop, [b"mdia", b"mdhd"])
        tkhd = find_box(handle, body, stop, [b"tkhd"])
        if mdhd is None or tkhd is None:
            continue
        version = read_at(handle, mdhd[0], 1)[0]
        scale_at = mdhd[0] + (20 if version == 1 else 12)
        timescale = struct.unpack(">I", read_at(handle, scale_at, 4))[0]
        track_version = read_at(handle, tkhd[0], 1)[0]
        track_id = struct.unpack(">I", read_at(handle, tkhd[0] + (20 if track_version == 1 else 12), 4))[0]
        return track_id, timescale
    return None


def fragment_end(handle, moof: tuple[int, int], track_id: int, default_duration: int) -> int | None:
    """tfdt + the samples' durations of the track's run(s) in one moof."""
    end = None
    for kind, body, stop in boxes(handle, *moof):
        if kind != b"traf":
            continue
        tfhd = find_box(handle, body, stop, [b"tfhd"])
        if tfhd is None:
            continue
        head = read_at(handle, tfhd[0], 8)
        flags = int.from_bytes(head[1:4], "big")
        if struct.unpack(">I", head[4:8])[0] != track_id:
            continue
        duration = default_duration
        if flags & 0x08:
            skip = 8 + (8 if flags & 0x01 else 0) + (4 if flags & 0x02 else 0)
            duration = struct.unpack(">I", read_at(handle, tfhd[0] + skip, 4))[0]
        tfdt = find_box(handle, body, stop, [b"tfdt"])
        if tfdt is None:
            continue
        version = read_at(handle, tfdt[0], 1)[0]
        raw = read_at(handle, tfdt[0] + 4, 8 if version == 1 else 4)
        base = int.from_bytes(raw, "big")
        total = 0
        for kind2, body2, stop2 in boxes(handle, body, stop):
            if kind2 == b"trun":
                total += run_duration(read_at(handle, body2, stop2 - body2), duration)
        end = max(end or 0, base + total)
    return end


def run_duration(trun: bytes, default_duration: int) -> int:
    flags = int.from_bytes(trun[1:4], "big")
    count = struct.unpack(">I", trun[4:8])[0]
    if not flags & 0x100:
        return count * default_duration
    at = 8 + (4 if flags & 0x01 else 0) + (4 if flags & 0x04 else 0)
    per = 4 * sum(bool(flags & bit) for bit in (0x100, 0x200, 0x400, 0x800))
    return sum(struct.unpack(">I", trun[at + n * per:at + n * per + 4])[0]
               for n in range(count) if at + n * per + 4 <= len(trun))


def trex_duration(handle, moov: tuple[int, int], track_id: int) -> int:
    mvex = find_box(handle, *moov, [b"mvex"])
    if mvex is None:
        return 0
    for kind, body, _stop in boxes(handle, *mvex):
        if kind == b"trex":
            data = read_at(handle, body, 20)
            if struct.unpack(">I", data[4:8])[0] == track_id:
                return struct.unpack(">I", data[12:16])[0]
    return 0


def mp4_extent(path: Path) -> Extent:
    """From mvhd for a plain MP4; from the last fragment for a fragmented one. An MP4 whose
    writer died before its moov has no index at all: FootageError."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        top = list(boxes(handle, 0, size))
        moov = next(((body, stop) for kind, body, stop in top if kind == b"moov"), None)
        if moov is None:
            raise FootageError("MP4 without a moov box (its writer stopped before the end)")
        track = video_track(handle, moov)
        if track is None:
            raise FootageError("MP4 without a video track")
        track_id, timescale = track
        moofs = [(body, stop) for kind, body, stop in top if kind == b"moof"]
        if moofs:
            default = trex_duration(handle, moov, track_id)
            first = fragment_start(handle, moofs[0], track_id)
            end = fragment_end(handle, moofs[-1], track_id, default)
            if end is not None and timescale:
                return Extent((first or 0) / timescale, end / timescale)
        mvhd = find_box(handle, *moov, [b"mvhd"])
        if mvhd is None:
            raise FootageError("MP4 without an mvhd box")
        head = read_at(handle, mvhd[0], 32)
        if head[0] == 1:
            scale, duration = struct.unpack(">IQ", head[20:32])
        else:
            scale, duration = struct.unpack(">II", head[12:20])
        return Extent(0.0, duration / scale if scale else 0.0)


def fragment_start(handle, moof: tuple[int, int], track_id: int) -> int | None:
    for kind, body, stop in boxes(handle, *moof):
        if kind != b"traf":
            continue
        tfdt = find_box(handle, body, stop, [b"tfdt"])
        if tfdt is not None:
            version = read_at(handle, tfdt[0], 1)[0]
            return int.from_bytes(read_at(handle, tfdt[0] + 4, 8 if version == 1 else 4), "big")
    return None


FRAMECRC_LINE = re.compile(r"^0,\s*(-?\d+),\s*(-?\d+),\s*(\d+),\s*\d+,\s*0x[0-9a-f]+(, F=0x([0-9A-Fa-f]+))?$")
FRAMECRC_TB = re.compile(r"^#tb 0: (\d+)/(\d+)$")


def mp4_keyframes(binary: str, path: Path, timeout: float = 120) -> KeyframeIndex:
    """An MP4's keyframes as FFmpeg demuxes them (edit lists applied): one copy pass to
    nowhere, no decoding. offset is unused for MP4 (segments are cut by FFmpeg); frames is
    how many frames each keyframe's stretch holds."""
    proc = subprocess.run([binary, "-hide_banner", "-nostdin", "-v", "error", "-copyts",
                           "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"],
                          capture_output=True, text=True, timeout=timeout, env=child_env())
    num, den = 1, CLOCK
    frames: list[tuple[int, int, bool]] = []
    for line in proc.stdout.splitlines():
        if (tb := FRAMECRC_TB.match(line)):
            num, den = int(tb.group(1)), int(tb.group(2))
        elif (row := FRAMECRC_LINE.match(line)):
            pts, duration, flags = int(row.group(2)), int(row.group(3)), row.group(5)
            key = flags is None or int(flags, 16) & 1
            frames.append((pts, duration, bool(key)))
    if not frames:
        raise FootageError(f"ffmpeg read no video from {path.name}")
    scale = num / den
    keyframes: list[Keyframe] = []
    count = 0
    for pts, _duration, key in frames:
        if key:
            if keyframes:
                keyframes[-1] = Keyframe(keyframes[-1].time, 0, count)
            keyframes.append(Keyframe(pts * scale, 0))
            count = 0
        count += 1
    if keyframes:
        keyframes[-1] = Keyframe(keyframes[-1].time, 0, count)
    first = min(pts for pts, _d, _k in frames) * scale
    end = max(pts + duration for pts, duration, _k in frames) * scale
    return KeyframeIndex(keyframes, path.stat().st_size, first, end, path.stat().st_size)


def extent(path: Path) -> Extent:
    """A recorded file's extent by its container, read without FFmpeg."""
    try:
        return ts_extent(path) if path.suffix == ".ts" else mp4_extent(path)
    except (OSError, struct.error, IndexError) as exc:
        raise FootageError(f"{path.name}: {exc}") from None
