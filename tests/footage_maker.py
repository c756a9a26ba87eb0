"""Archives as vlmguard's FFmpeg leaves them, made faster than real time, whose every frame
carries its own wall-clock time.

One FFmpeg run is one recording session (what one camera FFmpeg run writes): the segment
muxer cuts it at the clock's archive boundaries into MPEG-TS files (reset_timestamps, as
the daemon's tee output does), which are then named for their wall-clock start, as the
daemon's strftime names them. A session can end like a killed FFmpeg (its last file cut
mid-packet). Older archives come as MP4 or fragmented MP4.

Each frame shows, white on black, four bars whose x positions read the frame's time:
second of the minute, minute, hour (UTC) and tenth of a second, 5 px per step, plus the
time as text for people. read_clock turns a decoded grey frame back into that time.
"""

from __future__ import annotations

import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

WIDTH, HEIGHT = 320, 180
FPS = 10
GOP_SECONDS = 2
STEP = 5
BAR = 4
ROWS = ((0, 60, 1), (20, 60, 60), (40, 24, 3600))  # (y, modulo, seconds per step)
TENTHS_Y = 60
BAND = 20
CLOCK_ROWS = TENTHS_Y + BAND  # the bars' rows: all a reader needs
LIT = re.compile(rb"[\x80-\xff]+")
ARCHIVE_TIME = "%Y%m%dT%H%M%SZ"


# The same reading in a page: CLOCK_JS(video) -> seconds since UTC midnight of the frame
# the <video> shows (drawn on a canvas), or null.
CLOCK_JS = """(video) => {
  const canvas = document.createElement("canvas");
  canvas.width = 320; canvas.height = 180;
  const g = canvas.getContext("2d", {willReadFrequently: true});
  g.drawImage(video, 0, 0, 320, 180);
  const position = (y) => {
    const row = g.getImageData(0, y + 10, 320, 1).data;
    let best = null, from = -1;
    for (let x = 0; x <= 320; x++) {
      const lit = x < 320 && row[x * 4] > 128;
      if (lit && from < 0) from = x;
      if (!lit && from >= 0) { if (!best || x - from > best[1] - best[0]) best = [from, x]; from = -1; }
    }
    return best ? Math.round(((best[0] + best[1] - 1) / 2 - 1.5) / 5) : null;
  };
  const p = [0, 20, 40, 60].map(position);
  return p.includes(null) ? null : p[2] * 3600 + p[1] * 60 + p[0] + p[3] / 10;
}"""


def clock_graph(epoch: float, seconds: float) -> str:
    """A lavfi graph: black frames with the time bars and the time as text."""
    parts = [f"color=c=black:s={WIDTH}x{HEIGHT}:r={FPS}:d={seconds}[v0]"]
    rows = [(y, f"{STEP}*mod(floor((t+{epoch})/{per}),{modulo})") for y, modulo, per in ROWS]
    rows.append((TENTHS_Y, f"{STEP}*mod(floor((t+{epoch})*10),10)"))
    for n, (y, x) in enumerate(rows):
        parts.append(f"color=c=white:s={BAR}x{BAND}:r={FPS}[b{n}]")
        parts.append(f"[v{n}][b{n}]overlay=x='{x}':y={y}:eval=frame:shortest=1[v{n + 1}]")
    parts.append(f"[v{len(rows)}]drawtext=text='%{{pts\\:gmtime\\:{epoch}}}':x=8:y=100:"
                 f"fontsize=22:fontcolor=white")
    return ";".join(parts)


def archive_name(when: datetime, suffix: str) -> str:
    return f"{when:{ARCHIVE_TIME}}.{suffix}"


def make_session(folder: Path, start: datetime, seconds: float, archive_seconds: int = 600,
                 container: str = "ts", killed: bool = False) -> list[Path]:
    """Record `seconds` of clock footage from `start` (whole seconds, even) into folder,
    cut at the clock's multiples of archive_seconds; returns the files, oldest first."""
    folder.mkdir(parents=True, exist_ok=True)
    epoch = start.timestamp()
    first_cut = archive_seconds - epoch % archive_seconds
    cuts = []
    at = first_cut
    while at < seconds:
        cuts.append(at)
        at += archive_seconds
    work = folder / f".session-{int(epoch)}"
    work.mkdir()
    options = {"ts": ["-segment_format", "mpegts"],
               "mp4": ["-segment_format", "mp4"],
               "fmp4": ["-segment_format", "mp4", "-segment_format_options",
                        "movflags=frag_keyframe+empty_moov+default_base_moof"]}[container]
    suffix = "ts" if container == "ts" else "mp4"
    command = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", clock_graph(epoch, seconds),
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
               "-g", str(FPS * GOP_SECONDS), "-sc_threshold", "0",
               "-force_key_frames", f"expr:gte(t,n_forced*{GOP_SECONDS})",
               "-f", "segment", "-reset_timestamps", "1", *options]
    if cuts:
        command += ["-segment_times", ",".join(f"{c:g}" for c in cuts)]
    else:
        command += ["-segment_time", str(seconds + 1)]
    command.append(str(work / f"%03d.{suffix}"))
    subprocess.run(command, check=True, timeout=600)
    made = []
    for n, path in enumerate(sorted(work.iterdir())):
        begun = start + timedelta(seconds=0 if n == 0 else cuts[n - 1])
        target = folder / archive_name(begun, suffix)
        path.rename(target)
        made.append(target)
    work.rmdir()
    if killed and made:
        size = made[-1].stat().st_size
        with open(made[-1], "r+b") as handle:  # a kill leaves a buffer's worth unwritten
            handle.truncate(size - size % 4096 - 100)
    return made


def bar_position(grey: bytes, width: int, y: int, scale: float = 1.0) -> int | None:
    """The step a bar's centre stands at in the band starting at row y (read on its middle
    row); scale: the picture's width over WIDTH."""
    row = grey[(y + BAND // 2) * width:(y + BAND // 2 + 1) * width]
    runs = [m.span() for m in LIT.finditer(row)]
    if not runs:
        return None
    low, high = max(runs, key=lambda span: span[1] - span[0])
    centre = (low + high - 1) / 2 / scale
    return round((centre - (BAR - 1) / 2) / STEP)


def read_clock(grey: bytes, day: datetime) -> float | None:
    """The epoch time a decoded frame (WIDTH wide, CLOCK_ROWS or more rows of 8-bit grey)
    shows, on that UTC day."""
    if len(grey) < WIDTH * CLOCK_ROWS:
        return None
    found = [bar_position(grey, WIDTH, y) for y, _modulo, _per in ROWS]
    found.append(bar_position(grey, WIDTH, TENTHS_Y))
    if None in found:
        return None
    second, minute, hour, tenth = found
    midnight = day.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=timezone.utc)
    return midnight.timestamp() + hour * 3600 + minute * 60 + second + tenth / 10


def frame_clocks(source: str, day: datetime, *, args: tuple[str, ...] = (), every: int = 1,
                 limit: int | None = None, timeout: float = 600) -> list[float | None]:
    """The time shown by every `every`-th frame FFmpeg decodes from source (a file or URL),
    read as it decodes (a long source is never held whole)."""
    command = ["ffmpeg", "-v", "error", *args, "-i", source, "-map", "0:v:0"]
    if limit:
        command += ["-frames:v", str(limit)]
    keep = f"select='not(mod(n\\,{every}))'," if every > 1 else ""
    command += ["-vf", f"{keep}scale={WIDTH}:{HEIGHT},crop={WIDTH}:{CLOCK_ROWS}:0:0",
                "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "gray", "-"]
    size = WIDTH * CLOCK_ROWS
    clocks = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        try:
            while True:
                frame = proc.stdout.read(size)
                if len(frame) < size:
                    break
                clocks.append(read_clock(frame, day))
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
    return clocks
