"""A test camera whose every frame carries the wall clock, for glass-to-glass latency.

An FFmpeg lavfi graph: the `realtime` filter releases each frame at its time, setpts then
stamps it with the wall clock (RTCTIME), and 32 drawbox filters burn that time in, as
milliseconds since the epoch mod 2^32: one 20-px block per bit, 16 a row, white for 1,
in the frame's top-left 320x40 pixels. tests/web/clock.html reads it back from a canvas
when Chromium shows the frame (no OCR). The timestamps are made regular again after.
"""

from __future__ import annotations

BITS = 32
BLOCK = 20
PER_ROW = 16


def clock_graph(size: str = "320x240", rate: int = 25, source: str = "testsrc2") -> str:
    """The lavfi graph (for a camera url "lavfi:<graph>")."""
    rows = (BITS + PER_ROW - 1) // PER_ROW
    boxes = [f"drawbox=x=0:y=0:w={PER_ROW * BLOCK}:h={rows * BLOCK}:color=black:t=fill"]
    for bit in range(BITS):
        x, y = (bit % PER_ROW) * BLOCK, (bit // PER_ROW) * BLOCK
        boxes.append(f"drawbox=x={x}:y={y}:w={BLOCK}:h={BLOCK}:color=white:t=fill:"
                     f"enable='eq(mod(floor(t*1000/{2 ** bit}),2),1)'")
    return ",".join([f"{source}=size={size}:rate={rate}", "realtime", "settb=AVTB",
                     "setpts=RTCTIME", *boxes, f"setpts=N/{rate}/TB"])


def read_code(gray: bytes, width: int) -> int:
    """The burned-in time (ms mod 2^32) from one 8-bit grey frame."""
    code = 0
    for bit in range(BITS):
        x = (bit % PER_ROW) * BLOCK + BLOCK // 2
        y = (bit // PER_ROW) * BLOCK + BLOCK // 2
        if gray[y * width + x] > 128:
            code |= 1 << bit
    return code
