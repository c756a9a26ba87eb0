"""Finding FFmpeg and building its command lines; nothing here runs for long.

One FFmpeg per camera reads the camera once and writes, through the tee muxer, both the
live HLS window (in RAM) and the clock-aligned archive. Archives are MPEG-TS and stay so:
written once, in their final form (a TS cut short by a crash still plays, and any part of
one can be cut out or rewrapped as MP4 with -c copy, no re-encoding). An analysis window
is an ffconcat list of the live segments it covers, or of archive files with in- and
out-points.
Every program run from here gets child_env(), never our whole environment.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

from vlmguard.config import CameraConfig, StorageConfig
from vlmguard.errors import VlmguardError

RTSP_TIMEOUT_US = 5_000_000
DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+\.\d+)")
FRAMES = re.compile(r"frame=\s*(\d+)")
VIDEO_CODEC = re.compile(r"Stream #\S+.*?: Video: (\w+)")
COPYABLE_CODECS = ("h264", "hevc")
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
# What the concat demuxer may open: the ffconcat file itself, then the camera.
CONCAT_PROTOCOLS = "file,rtsp,rtsps,rtp,srtp,tcp,udp,tls,http,https,httpproxy,crypto"
# What a child program may see of our environment: never a model API key or a database
# password. MALLOC_* are the supervisor's glibc tunings, meant for FFmpeg.
PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL")


def ffmpeg_binary() -> str:
    """A system ffmpeg on PATH, else the one the imageio-ffmpeg package ships."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise VlmguardError(f"no ffmpeg on PATH and none from imageio-ffmpeg: {exc}") from None


def last_line(stderr: str | bytes, empty: str = "no output") -> str:
    """The last line FFmpeg wrote to stderr, where it says why it stopped, at most 300
    characters (the earlier lines are its progress and warnings)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return (text.strip().splitlines() or [empty])[-1][:300]


async def run_awaited(args: list[str], timeout: float) -> tuple[int, bytes, bytes]:
    """Run FFmpeg as a child the event loop awaits (it goes on serving meanwhile) and return
    (exit code, stdout, stderr); past the timeout, or when the caller is cancelled, FFmpeg is
    killed and reaped, never left running behind a request that is gone."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env())
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return proc.returncode, out, err


def child_env() -> dict[str, str]:
    """The whole environment of every program we run (FFmpeg, setpriv): a minimal one."""
    env = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    env.update((name, value) for name, value in os.environ.items()
               if name.startswith("MALLOC_"))
    env.setdefault("PATH", os.defpath)
    env["TZ"] = "UTC"
    return env


def parent_death_prefix() -> list[str]:
    """Run FFmpeg under `setpriv --pdeathsig KILL` so it dies with the streaming process.

    The death signal is tied to the thread that forks; the streamer forks from its event
    loop thread, which lives as long as the process.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def input_args(url: str, input_file: Path | None = None) -> list[str]:
    """How FFmpeg opens the camera. A network URL goes through input_file (see
    write_input_file) when given, so its password is not on FFmpeg's command line."""
    if url.startswith(NETWORK_SCHEMES) and input_file is not None:
        return ["-f", "concat", "-safe", "0", "-protocol_whitelist", CONCAT_PROTOCOLS,
                "-i", str(input_file)]
    if url.startswith(("rtsp://", "rtsps://")):
        return ["-rtsp_transport", "tcp", "-timeout", str(RTSP_TIMEOUT_US), "-i", url]
    if url.startswith(("http://", "https://")):
        return ["-rw_timeout", str(RTSP_TIMEOUT_US), "-i", url]
    if url.startswith("file://"):
        return ["-re", "-stream_loop", "-1", "-i", url[len("file://"):]]
    return ["-re", "-f", "lavfi", "-i", url[len("lavfi:"):]]


def write_input_file(path: Path, url: str) -> None:
    """An ffconcat file naming the camera URL, readable by us alone: /proc/<pid>/cmdline
    is readable by every local user, a 0600 file is not. The concat demuxer opens the one
    entry with the `option` lines as input options and plays it live, as -i would."""
    if url.startswith(("rtsp://", "rtsps://")):
        options = ["rtsp_transport tcp", f"timeout {RTSP_TIMEOUT_US}"]
    else:
        options = [f"rw_timeout {RTSP_TIMEOUT_US}"]
    quoted = "'" + url.replace("'", "'\\''") + "'"
    text = "\n".join(["ffconcat version 1.0", f"file {quoted}",
                      *(f"option {line}" for line in options)]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an older file may have had wider rights
        handle.write(text)


def needs_encoding(camera: CameraConfig, probed_codec: str | None) -> bool:
    if camera.transcode != "auto":
        return camera.transcode == "always"
    return camera.url.startswith("lavfi:") or probed_codec not in COPYABLE_CODECS


def video_args(encode: bool, segment_seconds: int, codec: str | None = None) -> list[str]:
    if not encode:
        # H.265 in fMP4 as Apple's players (and the HLS spec's authoring rules) want it:
        # the hvc1 sample entry, parameter sets in the init section. MPEG-TS ignores it.
        return ["-c:v", "copy", *(["-tag:v", "hvc1"] if codec == "hevc" else [])]
    # A keyframe exactly every segment keeps every segment the same length, so the
    # playlist's target duration never changes.
    return ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
            "-pix_fmt", "yuv420p", "-sc_threshold", "0", "-g", str(segment_seconds * 60),
            "-force_key_frames", f"expr:gte(t,n_forced*{segment_seconds})"]


def tee_escape(value: str) -> str:
    return re.sub(r"([\\:|\[\]'=])", r"\\\1", value)


# One fragment per frame; cmaf + default_base_moof: self-contained CMAF fragments;
# delay_moov: the init section is written once the first frame has shown the codec's
# parameters (a camera may send them only in-band); no index at the end (never seekable).
LIVE_MOVFLAGS = "+cmaf+frag_every_frame+delay_moov+default_base_moof+skip_trailer"


# The live fMP4 goes through FFmpeg's fifo muxer, a thread and a queue of its own that
# drops packets (and starts again at a keyframe) when full: a streaming process that stops
# reading the pipe (stalled, paused, SIGSTOPped) costs live video, never the archive, which
# tee writes from FFmpeg's main thread. queue_size is in packets: about 2 s of frames, on
# top of the pipe's own buffer. Escaped for tee's two parsing passes before the fifo's.
LIVE_FIFO_OPTIONS = r"\\\:".join(["drop_pkts_on_overflow=1", "restart_with_keyframe=1",
                                 "queue_size=60"])


def live_output(storage: StorageConfig, live_dir: Path, start_number: int,
                low_latency: bool) -> str:
    """The tee's live output. Low latency: fragmented MP4 on stdout, one fragment per
    frame, for the streaming process to cut into parts and segments (llhls.py), through a
    fifo that never lets the pipe block FFmpeg. Else FFmpeg's own HLS muxer writes
    MPEG-TS segments and the playlist into live_dir."""
    if low_latency:
        mp4 = ":".join(["f=mp4", f"movflags={LIVE_MOVFLAGS}", "flush_packets=1",
                        "use_fifo=1", f"fifo_options={LIVE_FIFO_OPTIONS}"])
        return f"[{mp4}]pipe:1"
    hls = ":".join([
        "f=hls", f"hls_time={storage.segment_seconds}", f"hls_list_size={storage.live_segments}",
        "hls_flags=delete_segments+program_date_time+independent_segments+temp_file",
        # Numbered on from the previous run, so the served playlist's sequence grows by one.
        f"start_number={start_number}",
        f"hls_segment_filename={tee_escape(str(live_dir / 'seg-%d.ts'))}",
    ])
    return f"[{hls}]{live_dir / 'index.m3u8'}"


def camera_command(binary: str, camera: CameraConfig, storage: StorageConfig, live_dir: Path,
                   partial_dir: Path, run_list: Path, encode: bool,
                   start_number: int, input_file: Path | None = None,
                   low_latency: bool = False, codec: str | None = None) -> list[str]:
    archive = ":".join([
        "f=segment", f"segment_time={storage.archive_seconds}", "segment_atclocktime=1",
        "reset_timestamps=1", "strftime=1", "segment_format=mpegts",
        f"segment_list={tee_escape(str(run_list))}", "segment_list_type=csv",
        # A full disk must not take the live stream down with the archive.
        "onfail=ignore",
    ])
    # The live output is slave #0 and the archive #1 (the streamer reads tee's messages).
    outputs = (live_output(storage, live_dir, start_number, low_latency)
               + f"|[{archive}]{partial_dir / '%Y%m%dT%H%M%SZ.ts'}")
    return [*parent_death_prefix(), binary, "-hide_banner", "-nostdin", "-loglevel", "warning",
            *input_args(camera.url, input_file), "-map", "0:v:0", "-an",
            *video_args(encode, storage.segment_seconds, codec),
            "-f", "tee", outputs]


def probe_codec(binary: str, url: str, timeout: float = 20,
                input_file: Path | None = None) -> str | None:
    """The camera's video codec, read from `ffmpeg -i` (ffprobe is not always there)."""
    args = [binary, "-hide_banner", *input_args(url, input_file)]
    args = [a for a in args if a != "-re"]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=child_env())
    except subprocess.TimeoutExpired:
        return None
    match = VIDEO_CODEC.search(proc.stderr)
    return match.group(1) if match else None


def listed_duration(path: Path) -> float | None:
    """The length of an ffconcat list whose every entry says it (a window's segments
    with their durations, archive parts with in- and out-points): no FFmpeg run."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    total, entries, known, inpoint = 0.0, 0, 0, 0.0
    for line in lines:
        key, _, value = line.partition(" ")
        try:
            if key == "file":
                entries, inpoint = entries + 1, 0.0
            elif key == "duration":
                total, known = total + float(value), known + 1
            elif key == "inpoint":
                inpoint = float(value)
            elif key == "outpoint":
                total, known = total + float(value) - inpoint, known + 1
        except ValueError:
            return None
    return total if entries and known == entries and total > 0 else None


def media_duration(binary: str, path: Path, timeout: float = 60) -> float | None:
    if Path(path).suffix == ".ffconcat" and (listed := listed_duration(path)) is not None:
        return listed
    proc = subprocess.run([binary, "-hide_banner", *source_args(path)], capture_output=True,
                          text=True, timeout=timeout, env=child_env())
    match = DURATION.search(proc.stderr)
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def source_args(path: Path) -> list[str]:
    """How FFmpeg opens a video we stored: an ffconcat list (a window) through the concat
    demuxer, which may name archive files by absolute path, anything else as it is."""
    if Path(path).suffix == ".ffconcat":
        return ["-f", "concat", "-safe", "0", "-i", str(path)]
    return ["-i", str(path)]


def concat_text(entries: list[tuple[str, float | None, float | None, float | None]]) -> str:
    """An ffconcat list: (file, duration, inpoint, outpoint) per entry, None for unset."""
    lines = ["ffconcat version 1.0"]
    for name, duration, inpoint, outpoint in entries:
        lines.append("file '" + name.replace("'", "'\\''") + "'")
        if duration is not None:
            lines.append(f"duration {duration:.6f}")
        if inpoint is not None:
            lines.append(f"inpoint {inpoint:.6f}")
        if outpoint is not None:
            lines.append(f"outpoint {outpoint:.6f}")
    return "\n".join(lines) + "\n"


def analysis_copy_command(binary: str, source: Path, target: Path, fps: float,
                          height: int) -> list[str]:
    """A small H.264 copy for the model: keyframes only (no full decode), at most fps
    frames a second, scaled down, with the archive's timestamps kept so offsets in the
    answer map back to wall-clock time. One thread each way: as fast here (keyframes are
    few), and 20 % less memory than FFmpeg's per-core frame buffers."""
    interval = 1.0 / fps
    select = f"select='isnan(prev_selected_t)+gte(t-prev_selected_t\\,{interval:.3f})'"
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-threads", "1", "-skip_frame", "nokey", *source_args(source), "-map", "0:v:0", "-an",
            "-vf", f"{select},scale=-2:{height}", "-fps_mode", "vfr",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "30", "-threads", "1",
            "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", str(target)]


def count_frames(binary: str, path: Path, timeout: float = 120) -> int | None:
    """Video frames in a file, counted by copying the stream to nowhere (no decode)."""
    proc = subprocess.run([binary, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0",
                           "-c", "copy", "-f", "null", "-"], capture_output=True, text=True,
                          timeout=timeout, env=child_env())
    found = FRAMES.findall(proc.stderr)
    return int(found[-1]) if proc.returncode == 0 and found else None


SHOWINFO_PTS = re.compile(r"\[Parsed_showinfo.*?\bn:\s*(\d+).*?\bpts_time:\s*([-\d.]+)")


def distinct_frames_command(binary: str, source: Path, pattern: Path,
                            threshold: int) -> list[str]:
    """JPEGs of the frames of source that differ from the last one kept, timed from the
    first frame; showinfo logs each kept frame's time. A frame differs when any 8x8 block
    changed by more than threshold grey levels on average, or a third of the blocks by
    half that (mpdecimate's hi, lo and frac): sensor noise and compression flicker stay
    below it, a person entering does not. The source is the small keyframe copy, so this
    decodes a few dozen frames."""
    decimate = f"mpdecimate=hi={64 * threshold}:lo={32 * threshold}:frac=0.33"
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "info", "-y", "-threads", "1",
            "-i", str(source), "-map", "0:v:0", "-an",
            "-vf", f"setpts=PTS-STARTPTS,{decimate},showinfo", "-fps_mode", "vfr",
            "-q:v", "5", "-threads", "1", str(pattern)]


def frame_offsets(stderr: str) -> list[float]:
    """The kept frames' times, in output order, from the showinfo lines."""
    return [float(t) for _n, t in SHOWINFO_PTS.findall(stderr)]


def grid_command(binary: str, frames: list[tuple[Path, str]], target: Path, columns: int,
                 rows: int, tile_width: int) -> list[str]:
    """One JPEG tiling the frames left to right, top to bottom, each labelled (text
    burned in its top-left corner) and scaled down to tile_width at most."""
    inputs: list[str] = []
    chains = []
    for n, (path, text) in enumerate(frames):
        inputs += ["-i", str(path)]
        chains.append(f"[{n}:v]scale=w='min(iw\\,{tile_width})':h=-2,"
                      f"drawtext=text='{text}':fontsize=20:fontcolor=white:box=1:"
                      f"boxcolor=black@0.7:x=4:y=4[v{n}]")
    joined = "".join(f"[v{n}]" for n in range(len(frames)))
    graph = ";".join(chains) + (f";{joined}concat=n={len(frames)}:v=1:a=0,"
                                f"tile={columns}x{rows}:padding=4")
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *inputs,
            "-filter_complex", graph, "-frames:v", "1", "-q:v", "4", str(target)]


def still_video_command(binary: str, picture: Path, target: Path) -> list[str]:
    """A one-frame, one-second H.264 video of a picture: what a video model is shown of a
    clip in which nothing changed (it bills video by the second)."""
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-framerate", "1", "-i", str(picture), "-frames:v", "1", "-r", "1",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "30", "-threads", "1",
            "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", str(target)]
