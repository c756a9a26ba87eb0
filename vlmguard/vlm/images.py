"""What a JPEG says about itself, read from its header (no decoder needed)."""

from __future__ import annotations

import struct

# Start-of-frame markers (baseline, extended, progressive) carry the picture's size.
FRAME_MARKERS = (0xC0, 0xC1, 0xC2)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG's start-of-frame segment; ValueError if there is none."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise ValueError("corrupt JPEG")
        marker = data[at + 1]
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in FRAME_MARKERS:
            if at + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    raise ValueError("no frame header in JPEG")
