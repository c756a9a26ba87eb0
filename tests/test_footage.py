"""footage.py: extents and keyframes of real archive files, checked against FFmpeg."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from vlmguard.footage import (PACKET, FootageError, KeyframeIndex, extent, keyframe_bytes,
                              mp4_keyframes, scan_ts)

from footage_maker import frame_clocks, make_session

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

START = datetime(2026, 11, 26, 7, 59, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 90-s TS session cut at 08:00 (the second file killed mid-write), and 30 s each
    of plain and fragmented MP4."""
    folder = tmp_path_factory.mktemp("footage")
    first, killed = make_session(folder / "ts", START, 90, archive_seconds=60, killed=True)
    [mp4] = make_session(folder / "mp4", START, 30, archive_seconds=600, container="mp4")
    [fmp4] = make_session(folder / "fmp4", START, 30, archive_seconds=600, container="fmp4")
    return {"ts": first, "killed": killed, "mp4": mp4, "fmp4": fmp4}


def ffmpeg_keyframes(path: Path) -> list[float]:
    """FFmpeg's own keyframe times (its demuxer's flags), in the file's clock."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-copyts", "-i", str(path), "-map", "0:v:0",
                          "-c", "copy", "-f", "framecrc", "-"], capture_output=True, text=True,
                         check=True).stdout
    return [int(m.group(1)) / 90000 for m in re.finditer(r"^0,\s*-?\d+,\s*(\d+),.*$", out, re.M)
            if "F=" not in m.group(0)]


def test_extents_are_read_from_the_containers(files):
    assert extent(files["ts"]).duration == pytest.approx(60, abs=0.01)
    assert extent(files["ts"]).first == pytest.approx(1.4, abs=0.01)  # FFmpeg's TS offset
    # Killed mid-write: its last packet is cut short; the end is its last whole frame.
    assert 29 < extent(files["killed"]).duration <= 30
    assert extent(files["mp4"]).duration == pytest.approx(30, abs=0.01)
    assert extent(files["fmp4"]).duration == pytest.approx(30, abs=0.01)


def test_ts_keyframes_match_ffmpeg_and_each_range_decodes_alone(files, tmp_path):
    index = scan_ts(files["ts"])
    assert [round(k.time, 3) for k in index.keyframes] == \
        [round(t, 3) for t in ffmpeg_keyframes(files["ts"])]
    assert index.keyframes[0].offset == 0 and index.end == pytest.approx(61.4, abs=0.01)
    data = files["ts"].read_bytes()
    piece = tmp_path / "piece.ts"
    piece.write_bytes(data[index.keyframes[10].offset:index.keyframes[13].offset])
    clocks = frame_clocks(str(piece), START)
    assert len(clocks) == 60 and None not in clocks  # 6 s at 10 fps, every frame whole
    assert clocks[0] == pytest.approx(START.timestamp() + 20, abs=0.01)


def test_a_growing_file_is_indexed_from_where_it_was_left(files, tmp_path):
    data = files["ts"].read_bytes()
    growing = tmp_path / "growing.ts"
    growing.write_bytes(data[:len(data) // 3 + 77])  # mid-packet, as FFmpeg's buffer leaves it
    partial = scan_ts(growing, complete=False)
    assert partial.end is None and partial.scanned % PACKET == 0
    with open(growing, "ab") as handle:
        handle.write(data[len(data) // 3 + 77:])
    grown = scan_ts(growing, partial, complete=True)
    assert grown.keyframes == scan_ts(files["ts"]).keyframes
    assert KeyframeIndex.from_json(grown.as_json()).keyframes == grown.keyframes


def test_one_keyframe_decodes_from_its_bytes(files, tmp_path):
    index = scan_ts(files["ts"])
    picture = tmp_path / "key.ts"
    picture.write_bytes(keyframe_bytes(files["ts"], index.keyframes[5].offset))
    [clock] = frame_clocks(str(picture), START)
    assert clock == pytest.approx(START.timestamp() + 10, abs=0.01)


@pytest.mark.parametrize("kind", ["mp4", "fmp4"])
def test_mp4_keyframes_as_ffmpeg_demuxes_them(files, kind):
    index = mp4_keyframes(shutil.which("ffmpeg"), files[kind])
    assert [k.time for k in index.keyframes] == pytest.approx([2.0 * n for n in range(15)])
    assert all(k.frames == 20 for k in index.keyframes)  # 2 s at 10 fps each
    assert index.end == pytest.approx(30, abs=0.01)


@pytest.mark.parametrize("content", [b"", b"not video at all" * 100, b"\x47" + b"\0" * 400])
@pytest.mark.parametrize("suffix", [".ts", ".mp4"])
def test_what_is_not_video_is_one_error(tmp_path, content, suffix):
    path = tmp_path / f"20261126T080000Z{suffix}"
    path.write_bytes(content)
    with pytest.raises(FootageError):
        extent(path)
