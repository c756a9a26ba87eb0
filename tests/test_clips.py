"""clips.py: finding footage, cutting it with FFmpeg without re-encoding, and the
snapshots staged around an incident's commit. The footage fixtures live in helpers/media.py
(shared with test_media.py: the routes that serve what this module makes)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from vlmguard.clips import complete_with_snapshots, cut_clip, plan_clip, recordings
from vlmguard.errors import LeaseLost
from vlmguard.ffmpeg import count_frames, ffmpeg_binary
from vlmguard.layout import Layout
from vlmguard.store.bundle import Store
from vlmguard.store.records import IncidentRecord, Outcome

from helpers.media import T0, config, duration_of, footage, second_at  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers


@pytest.mark.parametrize("minute,kind", [(0, "mp4"), (1, "ts"), (2, "mp4")],
                         ids=["mp4", "ts", "fragmented-mp4"])
def test_clip_across_two_archives_starts_at_the_requested_time(config, tmp_path, minute, kind):
    start = T0 + timedelta(minutes=minute, seconds=7.3)
    plan = plan_clip(ffmpeg_binary(), Layout(config.data_dir), "cam1", start, 6)
    assert [p.name for p in plan.files] == [f"20261126T08{minute:02d}00Z.{kind}",
                                            f"20261126T08{minute:02d}10Z.{kind}"]
    assert plan.start == start
    clip = asyncio.run(cut_clip(ffmpeg_binary(), plan, tmp_path))
    assert abs(second_at(clip, 0) - 7.3) < 1.0  # time 0 is the requested start
    assert abs(second_at(clip, 4) - 1.3) < 1.0  # 4 s later: the second archive
    assert abs(duration_of(clip) - 6) < 1.0
    assert count_frames(ffmpeg_binary(), clip) <= 6 * 10 + 20  # the range and one GOP


def test_recordings_include_the_archive_being_written_once(tmp_path):
    layout = Layout(tmp_path)
    for directory, name in [(layout.archives("cam1"), "20261126T080000Z.mp4"),
                            (layout.closed("cam1"), "20261126T080000Z.ts"),  # being remuxed
                            (layout.closed("cam1"), "20261126T081000Z.ts"),
                            (layout.partial("cam1"), "20261126T082000Z.ts"),
                            (layout.archives("cam1"), "20261126T080000Z.mp4.part"),
                            (layout.archives("cam1"), "notes.txt")]:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"x")
    found = recordings(layout, "cam1")
    assert [(f.path.parent.name, f.path.name) for f in found] == [
        ("cam1", "20261126T080000Z.mp4"), ("cam1", "20261126T081000Z.ts"),
        ("cam1", "20261126T082000Z.ts")]
    assert [f.path.parent.parent.name for f in found] == ["archives", "closed", "partial"]
    assert recordings(layout, "cam2") == []


def test_pictures_are_staged_before_the_commit_and_never_left_behind(config):
    layout = Layout(config.data_dir)
    found = [IncidentRecord(T0 + timedelta(seconds=2), T0 + timedelta(seconds=4), "fall", "high",
                            "in the footage", 0.9),
             IncidentRecord(T0 + timedelta(seconds=40), T0 + timedelta(seconds=44), "fire", "low",
                            "in the gap: no picture", 0.5)]
    with Store.from_config(config) as store:
        store.queue.register("cam1", "/x/staged.mp4", T0 + timedelta(hours=5), T0 + timedelta(hours=6))
        job = store.queue.claim("w")
        complete_with_snapshots(store.queue, job, Outcome(result={}, safety_score=50, incidents=found),
                                ffmpeg_binary(), layout)
        rows = {r["description"]: r["id"] for r in store.incidents.list_incidents(job.id)}
        assert layout.snapshot("cam1", rows["in the footage"]).is_file()
        assert not layout.snapshot("cam1", rows["in the gap: no picture"]).exists()
        with pytest.raises(LeaseLost):  # a second completion: the lease is gone, nothing kept
            complete_with_snapshots(store.queue, job, Outcome(result={}, safety_score=50,
                                                              incidents=found), ffmpeg_binary(), layout)
    assert not list(layout.snapshots("cam1").glob("*.part"))
