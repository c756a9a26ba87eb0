"""Analysis-copy benchmark: what goes to the model, and what making it costs.

Run by hand:  .venv/bin/python bench/analysis_bench.py [--runs 3]

Input: a 10-minute 1920x1080 25 fps H.264 archive at ~4 Mbit/s (2-s GOP), made by FFmpeg.
(a) the raw archive as uploaded ("original" mode): bytes, no CPU;
(b) vlmguard's analysis copy (keyframes only, <= fps frames/s, scaled): bytes, CPU-seconds;
(c) a naive copy: every frame decoded, scaled to the same height, re-encoded.
CPU-seconds are the FFmpeg child's user+system time (getrusage), median of the runs.
Tokens per camera-hour come from the documented per-frame figures (not measured).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import tempfile
from pathlib import Path

from vlmguard.ffmpeg import analysis_copy_command

ARCHIVE = Path(tempfile.gettempdir()) / "vlmguard-bench-10min-1080p.mp4"
SOURCE_60S = Path(tempfile.gettempdir()) / "vlmguard-bench-1080p-4M.mp4"
FPS, HEIGHT = 0.5, 360


def make_archive() -> None:
    if ARCHIVE.exists():
        return
    if not SOURCE_60S.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                        "testsrc2=size=1920x1080:rate=25,noise=alls=12:allf=t", "-t", "60",
                        "-c:v", "libx264", "-preset", "veryfast", "-b:v", "4M", "-maxrate", "4M",
                        "-bufsize", "8M", "-g", "50", "-pix_fmt", "yuv420p", str(SOURCE_60S)],
                       check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-stream_loop", "9", "-i", str(SOURCE_60S), "-c", "copy",
                    str(ARCHIVE)], check=True)


def timed(command: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def naive_command(source: Path, target: Path) -> list[str]:
    return ["ffmpeg", "-v", "error", "-y", "-i", str(source), "-an", "-vf", f"scale=-2:{HEIGHT}",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "30", "-pix_fmt", "yuv420p",
            str(target)]


def tokens_per_hour(fps: float, per_frame: int, audio_per_s: int = 0) -> int:
    return int(3600 * (fps * per_frame + audio_per_s))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    make_archive()
    with tempfile.TemporaryDirectory() as tmp:
        ours, naive = Path(tmp) / "ours.mp4", Path(tmp) / "naive.mp4"
        ours_cpu = [timed(analysis_copy_command("ffmpeg", ARCHIVE, ours, FPS, HEIGHT))
                    for _ in range(args.runs)]
        naive_cpu = [timed(naive_command(ARCHIVE, naive)) for _ in range(args.runs)]
        raw_bytes, ours_bytes, naive_bytes = (p.stat().st_size for p in (ARCHIVE, ours, naive))
    b, c = statistics.median(ours_cpu), statistics.median(naive_cpu)
    print(f"archive: 600 s, 1920x1080, 25 fps, {raw_bytes * 8 / 600 / 1e6:.1f} Mbit/s, 2-s GOP\n")
    print("| what is uploaded | bytes | vs (a) | CPU-seconds (median) | vs (c) |")
    print("|---|---|---|---|---|")
    print(f"| (a) raw archive | {raw_bytes:,} | 1 | 0 | - |")
    print(f"| (b) vlmguard copy: keyframes, <= {FPS} fps, {HEIGHT}p | {ours_bytes:,} | "
          f"1/{raw_bytes / ours_bytes:,.0f} | {b:.2f} | 1/{c / b:.0f} |")
    print(f"| (c) naive: decode all, {HEIGHT}p, all frames | {naive_bytes:,} | "
          f"1/{raw_bytes / naive_bytes:,.0f} | {c:.2f} | 1 |")
    ours_tokens = tokens_per_hour(FPS, 66)
    default_tokens = tokens_per_hour(1.0, 258)
    with_audio = tokens_per_hour(1.0, 258, 32)
    print(f"\nEstimated Gemini 2.5 input tokens per camera-hour (documented per-frame figures):")
    print(f"- vlmguard defaults ({FPS} fps, media_resolution LOW, 66 tokens/frame, no audio): "
          f"{ours_tokens:,} (${ours_tokens * 0.30 / 1e6:.3f}/h at $0.30/M)")
    print(f"- SDK defaults (1 fps, default resolution, 258 tokens/frame): {default_tokens:,} "
          f"(${default_tokens * 0.30 / 1e6:.3f}/h), {with_audio:,} with an audio track; "
          f"{default_tokens / ours_tokens:.1f}x ours")


if __name__ == "__main__":
    main()
