"""Just enough ISO BMFF (fragmented MP4) to cut FFmpeg's live output into HLS parts.

FFmpeg writes the camera's video (copied) as fragmented MP4 to a pipe, one fragment
(moof + mdat) per frame: the init section (ftyp + moov) first, then the fragments. Here
the stream is split into top-level boxes, the init section read for the track's
timescale and defaults, and each fragment's moof read for its decode time, duration and
whether it starts with a keyframe. Nothing is decoded, nothing rewritten.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from pathlib import Path

# A box larger than this is not a frame of a camera's video: the stream is corrupt.
MAX_BOX_BYTES = 64 * 1024 * 1024
NON_SYNC_SAMPLE = 0x00010000
INIT_BOXES = (b"ftyp", b"moov")


class Fmp4Error(Exception):
    """The byte stream is not the fragmented MP4 it should be."""


@dataclass(frozen=True)
class Track:
    """What the init section says about the (single, video) track."""
    timescale: int
    default_duration: int = 0
    default_flags: int = 0


@dataclass(frozen=True)
class Timing:
    """One fragment's place on the track's timeline, in timescale units."""
    decode_time: int
    duration: int
    keyframe: bool


async def read_box(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next top-level box as (type, whole box bytes); None at a clean end of stream.
    A stream cut inside a box (FFmpeg killed) ends like a clean one."""
    try:
        header = await reader.readexactly(8)
    except asyncio.IncompleteReadError:
        return None
    size, kind = struct.unpack(">I4s", header)
    if size == 1:
        try:
            extended = await reader.readexactly(8)
        except asyncio.IncompleteReadError:
            return None
        size = struct.unpack(">Q", extended)[0]
        header += extended
    if size < len(header) or size > MAX_BOX_BYTES:
        raise Fmp4Error(f"box {kind!r} of {size} bytes")
    try:
        body = await reader.readexactly(size - len(header))
    except asyncio.IncompleteReadError:
        return None
    return kind, header + body


def children(data: bytes, start: int = 8, end: int | None = None):
    """(type, payload start, box end) of each box inside data[start:end]."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, offset + 8)[0]
            header = 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            raise Fmp4Error(f"box {kind!r} runs past its parent")
        yield kind, offset + header, offset + size
        offset += size


def find(data: bytes, path: tuple[bytes, ...], start: int = 8, end: int | None = None):
    """(payload start, end) of the first box along path, or None."""
    for kind, payload, box_end in children(data, start, end):
        if kind == path[0]:
            return (payload, box_end) if len(path) == 1 else find(data, path[1:], payload, box_end)
    return None


def parse_init(moov: bytes) -> Track:
    """The timescale (mdhd) and the fragment defaults (trex) of the moov's first track."""
    mdhd = find(moov, (b"trak", b"mdia", b"mdhd"))
    if mdhd is None:
        raise Fmp4Error("moov without a track")
    start = mdhd[0]
    version = moov[start]
    timescale = struct.unpack_from(">I", moov, start + (20 if version == 1 else 12))[0]
    if not timescale:
        raise Fmp4Error("track timescale 0")
    trex = find(moov, (b"mvex", b"trex"))
    if trex is None:
        return Track(timescale)
    duration, _size, flags = struct.unpack_from(">III", moov, trex[0] + 12)
    return Track(timescale, duration, flags)


def fragment_timing(moof: bytes, track: Track) -> Timing:
    """Decode time, total duration and keyframe start of a moof's (first) track run."""
    traf = find(moof, (b"traf",))
    if traf is None:
        raise Fmp4Error("moof without traf")
    default_duration, default_flags = track.default_duration, track.default_flags
    decode_time = None
    duration = 0
    first_flags = None
    for kind, payload, _end in children(moof, *traf):
        if kind == b"tfhd":
            flags = int.from_bytes(moof[payload + 1:payload + 4], "big")
            offset = payload + 8
            offset += 8 if flags & 0x01 else 0
            offset += 4 if flags & 0x02 else 0
            if flags & 0x08:
                default_duration = struct.unpack_from(">I", moof, offset)[0]
                offset += 4
            offset += 4 if flags & 0x10 else 0
            if flags & 0x20:
                default_flags = struct.unpack_from(">I", moof, offset)[0]
        elif kind == b"tfdt":
            version = moof[payload]
            decode_time = struct.unpack_from(">Q" if version == 1 else ">I", moof, payload + 4)[0]
        elif kind == b"trun":
            run_duration, run_first = sample_run(moof, payload, default_duration, default_flags)
            duration += run_duration
            if first_flags is None:
                first_flags = run_first
    if decode_time is None or first_flags is None:
        raise Fmp4Error("moof without tfdt or trun")
    return Timing(decode_time, duration, not first_flags & NON_SYNC_SAMPLE)


def sample_run(moof: bytes, payload: int, default_duration: int,
               default_flags: int) -> tuple[int, int]:
    """(sum of the run's sample durations, the first sample's flags) from a trun box."""
    flags = int.from_bytes(moof[payload + 1:payload + 4], "big")
    count = struct.unpack_from(">I", moof, payload + 4)[0]
    offset = payload + 8
    offset += 4 if flags & 0x001 else 0
    first_flags = None
    if flags & 0x004:
        first_flags = struct.unpack_from(">I", moof, offset)[0]
        offset += 4
    fields = [bit for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit]
    total = 0
    for n in range(count):
        values = dict(zip(fields, struct.unpack_from(f">{len(fields)}I", moof, offset)))
        offset += 4 * len(fields)
        total += values.get(0x100, default_duration)
        if n == 0 and first_flags is None:
            first_flags = values.get(0x400, default_flags)
    return total, default_flags if first_flags is None else first_flags


def init_size(path: Path) -> int:
    """Bytes of the init section (ftyp, moov) at the start of a whole fMP4 file: what to
    skip to serve the file as an HLS media segment. 0 when it starts otherwise."""
    offset = 0
    with open(path, "rb") as handle:
        while True:
            handle.seek(offset)
            header = handle.read(16)
            if len(header) < 8 or header[4:8] not in INIT_BOXES:
                return offset
            size = struct.unpack_from(">I", header)[0]
            if size == 1 and len(header) == 16:
                size = struct.unpack_from(">Q", header, 8)[0]
            if size < 8:
                return offset
            offset += size
