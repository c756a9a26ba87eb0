"""A checker for live media playlists against the rules of RFC 8216 and its second
edition (draft-pantos-hls-rfc8216bis: Low-Latency HLS) that vlmguard's playlists must
keep: one playlist at a time (check_playlist), and what may change between two successive
reloads of the same URL (check_successor).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


def attributes(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in ATTRIBUTE.findall(line.split(":", 1)[1])}


@dataclass
class Part:
    uri: str
    duration: float
    independent: bool


@dataclass
class Entry:
    """A segment (uri set) or the segment being written (uri None: parts only)."""
    msn: int
    uri: str | None = None
    duration: float | None = None
    parts: list[Part] = field(default_factory=list)
    discontinuity: int = 0  # its discontinuity sequence number
    init: str | None = None
    program_date: str | None = None


@dataclass
class Playlist:
    version: int
    target: int
    media_sequence: int
    discontinuity_sequence: int
    entries: list[Entry]
    part_target: float | None
    server_control: dict[str, str]
    hint: str | None
    skipped: int
    start: str | None

    @property
    def segments(self) -> list[Entry]:
        return [e for e in self.entries if e.uri is not None]

    @property
    def parts(self) -> list[tuple[int, int, Part]]:
        """(msn, index within the segment, part) of every listed part, in order."""
        return [(e.msn, n, p) for e in self.entries for n, p in enumerate(e.parts)]


class Violation(AssertionError):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Violation(message)


def parse(text: str) -> Playlist:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    require(lines and lines[0] == "#EXTM3U", "the first line must be #EXTM3U")
    values: dict[str, str] = {}
    entries: list[Entry] = []
    server_control: dict[str, str] = {}
    hint = start = None
    part_target = None
    skipped = 0
    current = Entry(0)
    seen_segment = False
    discontinuity = None
    init = None
    for line in lines[1:]:
        tag, _, value = line.partition(":")
        if tag in ("#EXT-X-VERSION", "#EXT-X-TARGETDURATION", "#EXT-X-MEDIA-SEQUENCE",
                   "#EXT-X-DISCONTINUITY-SEQUENCE"):
            require(not seen_segment, f"{tag} after the first segment")
            require(tag not in values, f"{tag} twice")
            values[tag] = value
        elif tag == "#EXT-X-SERVER-CONTROL":
            server_control = attributes(line)
        elif tag == "#EXT-X-PART-INF":
            part_target = float(attributes(line)["PART-TARGET"])
        elif tag == "#EXT-X-START":
            start = value
        elif tag == "#EXT-X-SKIP":
            skipped = int(attributes(line)["SKIPPED-SEGMENTS"])
        elif tag == "#EXT-X-PRELOAD-HINT":
            require(hint is None, "two preload hints")
            found = attributes(line)
            require(found.get("TYPE") == "PART", f"preload hint type {found.get('TYPE')}")
            hint = found["URI"]
        elif tag == "#EXT-X-MAP":
            init = attributes(line)["URI"]
        elif tag == "#EXT-X-DISCONTINUITY":
            current.discontinuity = -1  # resolved below
        elif tag == "#EXT-X-PROGRAM-DATE-TIME":
            current.program_date = value
        elif tag == "#EXT-X-PART":
            found = attributes(line)
            current.parts.append(Part(found["URI"], float(found["DURATION"]),
                                      found.get("INDEPENDENT") == "YES"))
        elif tag == "#EXTINF":
            current.duration = float(value.split(",")[0])
        elif not line.startswith("#"):
            require(current.duration is not None, f"{line} without EXTINF")
            current.uri = line
            current.init = init
            entries.append(current)
            seen_segment = True
            current = Entry(0)
    if current.parts:
        current.init = init
        entries.append(current)
    require("#EXT-X-TARGETDURATION" in values, "no EXT-X-TARGETDURATION")
    media_sequence = int(values.get("#EXT-X-MEDIA-SEQUENCE", "0"))
    sequence = int(values.get("#EXT-X-DISCONTINUITY-SEQUENCE", "0"))
    for n, entry in enumerate(entries):
        entry.msn = media_sequence + skipped + n
        if entry.discontinuity == -1:
            sequence += 1
        entry.discontinuity = sequence
    return Playlist(int(values.get("#EXT-X-VERSION", "1")), int(values["#EXT-X-TARGETDURATION"]),
                    media_sequence, int(values.get("#EXT-X-DISCONTINUITY-SEQUENCE", "0")),
                    entries, part_target, server_control, hint, skipped, start)


def check_playlist(text: str) -> Playlist:
    """Parse and check one playlist; raises Violation naming the first broken rule."""
    playlist = parse(text)
    target = playlist.target
    for segment in playlist.segments:
        require(round(segment.duration) <= target,
                f"EXTINF {segment.duration} of {segment.uri} rounds above the target {target}")
        require(segment.init is not None or segment.uri.endswith(".ts"),
                f"fMP4 segment {segment.uri} without EXT-X-MAP")
    uris = [s.uri for s in playlist.segments]
    require(len(set(uris)) == len(uris), "a segment URI listed twice")
    parts = playlist.parts
    if playlist.part_target is None:
        # An ordinary playlist (a camera without parts).
        require(not parts, "EXT-X-PART without EXT-X-PART-INF")
        require(playlist.hint is None, "a preload hint without EXT-X-PART-INF")
        return playlist
    part_target = playlist.part_target
    control = playlist.server_control
    require(control.get("CAN-BLOCK-RELOAD") == "YES", "parts without CAN-BLOCK-RELOAD=YES")
    hold_back = float(control["PART-HOLD-BACK"])
    require(hold_back >= 2 * part_target, f"PART-HOLD-BACK {hold_back} < 2 x {part_target}")
    require(hold_back >= 3 * part_target - 1e-9, f"PART-HOLD-BACK {hold_back} < 3 x {part_target}")
    if "HOLD-BACK" in control:
        require(float(control["HOLD-BACK"]) >= 3 * target, "HOLD-BACK < 3 target durations")
    if "CAN-SKIP-UNTIL" in control:
        require(float(control["CAN-SKIP-UNTIL"]) >= 6 * target,
                "CAN-SKIP-UNTIL < 6 target durations")
    if playlist.skipped:
        require(playlist.version >= 9, "EXT-X-SKIP needs version 9")
    require(playlist.start is None, "EXT-X-START in a low-latency playlist (players would "
                                    "start there, not at PART-HOLD-BACK)")
    part_uris = [p.uri for _msn, _n, p in parts]
    require(len(set(part_uris)) == len(part_uris), "a part URI listed twice")
    # A low-latency playlist always names the next part (hls.js loops without it); it may
    # list no part for a moment, when FFmpeg has just restarted.
    require(playlist.hint is not None, "no EXT-X-PRELOAD-HINT")
    require(playlist.hint not in part_uris, "the preload hint names a listed part")
    for entry in playlist.entries:
        for n, part in enumerate(entry.parts):
            require(part.duration <= part_target + 1e-6,
                    f"part {part.uri}: {part.duration} > PART-TARGET {part_target}")
            final = entry.uri is not None and n == len(entry.parts) - 1
            if not final and entry.uri is not None:
                require(part.duration >= 0.85 * part_target - 1e-6,
                        f"part {part.uri}: {part.duration} < 85 % of PART-TARGET {part_target}")
        if entry.parts:
            require(entry.parts[0].independent,
                    f"segment {entry.msn} starts with a part that is not INDEPENDENT")
        if entry.parts and entry.uri is not None:
            total = sum(p.duration for p in entry.parts)
            require(math.isclose(total, entry.duration, abs_tol=0.002),
                    f"segment {entry.msn}: parts {total} s, EXTINF {entry.duration} s")
    listed_with_parts = [e for e in playlist.entries if e.parts]
    require(not listed_with_parts or listed_with_parts[-1] is playlist.entries[-1],
            "the parts listed are not the playlist's last")
    for before, after in zip(listed_with_parts, listed_with_parts[1:]):
        require(after.msn == before.msn + 1, "parts skip a segment")
    return playlist


def check_successor(before: Playlist, after: Playlist) -> None:
    """Rules between two reloads: a media sequence number names the same segment in both,
    sequence numbers and discontinuity sequence never go back, a part keeps its place, the
    targets never change."""
    require(after.media_sequence >= before.media_sequence, "EXT-X-MEDIA-SEQUENCE went back")
    require(after.target == before.target, "EXT-X-TARGETDURATION changed")
    if before.part_target is not None and after.part_target is not None:
        require(after.part_target == before.part_target, "PART-TARGET changed")
    old = {s.msn: s for s in before.segments}
    for segment in after.segments:
        if segment.msn in old:
            require(old[segment.msn].uri == segment.uri,
                    f"msn {segment.msn} was {old[segment.msn].uri}, now {segment.uri}")
            require(old[segment.msn].discontinuity == segment.discontinuity,
                    f"msn {segment.msn} changed its discontinuity sequence")
    if before.segments and after.segments:
        require(after.segments[-1].msn >= before.segments[-1].msn, "the last segment went back")
    places = {p.uri: (msn, n) for msn, n, p in before.parts}
    for msn, n, part in after.parts:
        if part.uri in places:
            require(places[part.uri] == (msn, n),
                    f"part {part.uri} moved from {places[part.uri]} to {(msn, n)}")
