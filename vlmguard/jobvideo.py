"""The video a job covers, wherever it is on this box: its window's segments in RAM, else
the part of the archive(s) its sources name (cut by the concat demuxer, no copy), and one
MP4 of it made by stream copy. The analyzer reads it to analyse a job; the web server
reads it to hand a job's footage to an analyzer on another box (GET /api/jobs/ID/footage.mp4).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from vlmguard.ffmpeg import child_env, concat_text, last_line, source_args
from vlmguard.layout import Layout
from vlmguard.vlm import AnalysisError

if TYPE_CHECKING:  # a row type only: media code does not depend on the store
    from vlmguard.store.records import Job


def job_video(layout: Layout, job: Job, workdir: Path) -> Path:
    """The video a job covers: its window in RAM, else the part of the archive(s) its
    sources name (cut by the concat demuxer's in- and out-points, no copy), else its file.
    Offset 0 of what is returned is job.first_frame_at."""
    video = Path(job.video_path)
    sources = [s for s in job.sources or () if isinstance(s, dict) and s.get("path")]
    whole = len(sources) == 1 and not sources[0].get("offset_s") and video.suffix == ".ts"
    if video.suffix == ".ffconcat" and complete_listing(video):
        return video
    if video.suffix != ".ffconcat" and video.exists() and (not sources or whole):
        return video
    if not sources:
        return video  # prepare_video says it is missing
    entries = []
    for source in sources:
        path = find_archive(layout, job.camera_id, Path(source["path"]))
        if path is None:
            raise AnalysisError(f"footage gone: neither the window in RAM nor the archive "
                                f"{source['path']} exists", retryable=False)
        offset = float(source.get("offset_s") or 0.0)
        entries.append((str(path), None, offset,
                        offset + float(source["duration_s"]) if source.get("duration_s") else None))
    listing = workdir / "sources.ffconcat"
    listing.write_text(concat_text(entries))
    return listing


def complete_listing(listing: Path) -> bool:
    """An ffconcat list (a window in RAM) whose every file is still there: a merged
    window's segments sit in several window folders, and RAM pressure may drop one."""
    try:
        lines = listing.read_text().splitlines()
    except OSError:
        return False
    names = [line[6:-1].replace("'\\''", "'") for line in lines
             if line.startswith("file '") and line.endswith("'")]
    return bool(names) and all((listing.parent / name).exists() for name in names)


def find_archive(layout: Layout, camera_id: str, path: Path) -> Path | None:
    """An archive by its final path, or where it is on its way there (still written,
    or closed and not yet filed)."""
    for folder in (path.parent, layout.closed(camera_id), layout.partial(camera_id)):
        if (folder / path.name).exists():
            return folder / path.name
    return None


def mp4_copy_command(binary: str, source: Path, target: Path) -> list[str]:
    return [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            *source_args(source), "-map", "0:v:0", "-c", "copy",
            "-movflags", "+faststart", "-f", "mp4", str(target)]


def mp4_copy(binary: str, source: Path, target: Path) -> Path:
    """An MPEG-TS archive or a window's segments as one MP4 (streams copied, in the job's
    RAM folder, never on the archive disk) for mode original: video models' APIs take
    MP4, not always MPEG-TS."""
    proc = subprocess.run(mp4_copy_command(binary, source, target),
                          capture_output=True, text=True, timeout=600, env=child_env())
    if proc.returncode != 0 or not target.exists():
        reason = last_line(proc.stderr)
        raise AnalysisError(f"footage could not be copied to MP4: {reason}", retryable=False)
    return target
