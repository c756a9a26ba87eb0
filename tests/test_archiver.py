"""The archiver: closed archives are filed (renamed, never rewritten) and become jobs or
windows, catch-up after a crash or an outage, lag merging, RAM bound, retention."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vlmguard.archiver import Archiver
from vlmguard.config import load_config
from vlmguard.layout import ARCHIVE_TIME, Layout
from vlmguard.store.bundle import Store
from vlmguard.store.records import Outcome, utcnow

from helpers import write_config

MB = 1_000_000


def make_archiver(tmp_path, analysis="window_seconds = 0", **storage):
    settings = "\n".join(f"{key} = {value}" for key, value in storage.items())
    config = load_config(write_config(tmp_path, f"""
        [storage]
        data_dir = "{tmp_path / 'data'}"
        {settings}
        [analysis]
        {analysis}
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """))
    store = Store.from_config(config)
    return Archiver(config, store.queue, store.recordings), store, Layout(config.data_dir)


def name_at(when: datetime, suffix: str = "mp4") -> str:
    return f"{when.strftime(ARCHIVE_TIME)}.{suffix}"


def real_ts(path: Path, seconds: int = 2) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=10",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-f", "mpegts",
                    str(path)], check=True, timeout=60)
    return path


@pytest.mark.e2e
def test_catch_up_finalizes_and_registers_everything_left(tmp_path):
    """window_seconds = 0: one job per archive. Archives stay MPEG-TS, as FFmpeg wrote
    them (they were remuxed to MP4 before: a second full write of every byte); an MP4
    archive an older version left is still registered."""
    archiver, store, layout = make_archiver(tmp_path)
    t0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
    real_ts(layout.closed("cam1") / name_at(t0, "ts"), seconds=3)
    real_ts(layout.closed("cam1") / name_at(t0 + timedelta(minutes=10), "ts"))
    (layout.closed("cam1") / name_at(t0 + timedelta(minutes=20), "ts")).write_bytes(os.urandom(5000))
    done = layout.archives("cam1") / name_at(t0 - timedelta(minutes=10))
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(real_ts(tmp_path / "x.ts")), "-c", "copy",
                    str(done)], check=True, timeout=60)
    archiver.catch_up()
    archiver.catch_up()  # a second start registers nothing twice
    jobs = sorted(store.reports.list_jobs(), key=lambda j: j.segment_start)
    assert [Path(j.video_path).name for j in jobs] == [
        done.name, name_at(t0, "ts"), name_at(t0 + timedelta(minutes=10), "ts"),
        name_at(t0 + timedelta(minutes=20), "ts")]  # the unreadable one is kept, not dropped
    assert all(Path(j.video_path).parent == layout.archives("cam1") for j in jobs)
    assert jobs[1].segment_start == t0
    assert abs((jobs[1].segment_end - t0).total_seconds() - 3) < 0.5
    assert not list(layout.closed("cam1").iterdir())
    store.close()


def fill_archives(layout, count, size=MB):
    t0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=count)
    paths = []
    for n in range(count):
        path = layout.archives("cam1") / name_at(t0 + timedelta(hours=n))
        path.write_bytes(b"\0" * size)
        paths.append(path)
    return paths


def test_disk_budget_deletes_oldest_first(tmp_path):
    archiver, store, layout = make_archiver(tmp_path, max_disk_gb=0.0025, min_free_gb=0)
    paths = fill_archives(layout, 5)
    archiver.enforce_retention()
    left = sorted(layout.archives("cam1").iterdir())
    assert left == paths[3:]
    assert sum(p.stat().st_size for p in left) <= 2.5 * MB
    store.close()


def test_budget_keeps_archives_still_to_be_analysed(tmp_path):
    archiver, store, layout = make_archiver(tmp_path, max_disk_gb=0.0025, min_free_gb=0)
    paths = fill_archives(layout, 5)
    start = datetime.now(timezone.utc)
    store.queue.register("cam1", paths[0], start, start)  # the oldest is pending
    archiver.enforce_retention()
    # The pending one stays, so one more of the others goes to meet the budget.
    assert sorted(layout.archives("cam1").iterdir()) == [paths[0], paths[4]]
    store.close()


def test_disk_nearly_full_deletes_even_unanalysed_archives(tmp_path, capsys):
    archiver, store, layout = make_archiver(tmp_path, min_free_gb=100_000)
    paths = fill_archives(layout, 2)
    start = datetime.now(timezone.utc)
    store.queue.register("cam1", paths[0], start, start)
    archiver.enforce_retention()
    assert list(layout.archives("cam1").iterdir()) == []
    assert "deleting an archive not yet analysed: the disk is nearly full" in capsys.readouterr().out
    store.close()


def test_age_limit(tmp_path):
    archiver, store, layout = make_archiver(tmp_path, retention_days=0.5, min_free_gb=0)
    old = layout.archives("cam1") / name_at(datetime.now(timezone.utc) - timedelta(days=1))
    new = layout.archives("cam1") / name_at(datetime.now(timezone.utc) - timedelta(hours=1))
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    archiver.enforce_retention()
    assert list(layout.archives("cam1").iterdir()) == [new]
    store.close()


# -- windows (analysis.window_seconds > 0) ----------------------------------------------------

def live_playlist(layout, first_sequence, starts, duration=2.0, camera="cam1"):
    """A live playlist as FFmpeg writes it (program dates on), with its segment files."""
    live = layout.live(camera)
    live.mkdir(parents=True, exist_ok=True)
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-TARGETDURATION:2",
             f"#EXT-X-MEDIA-SEQUENCE:{first_sequence}"]
    for n, start in enumerate(starts):
        stamp = start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"
        lines += [f"#EXTINF:{duration:.6f},", f"#EXT-X-PROGRAM-DATE-TIME:{stamp}",
                  f"seg-{first_sequence + n}.ts"]
        (live / f"seg-{first_sequence + n}.ts").write_bytes(b"\x47" * 1880)
    (live / "index.m3u8").write_text("\n".join(lines) + "\n")


def test_live_segments_are_linked_into_clock_aligned_windows(tmp_path):
    archiver, store, layout = make_archiver(tmp_path, analysis="window_seconds = 10")
    # A minute ahead: a window long past its end would be closed for the camera's silence.
    t0 = datetime.fromtimestamp((time.time() // 60 + 1) * 60, timezone.utc)
    (layout.partial("cam1") / name_at(t0 - timedelta(seconds=30), "ts")).write_bytes(b"x")
    first = [t0 + timedelta(seconds=0.3 + 2 * n) for n in range(5)]   # 08:00:00.3-08:00:10.3
    live_playlist(layout, 100, first)
    archiver.cut_windows()
    assert store.reports.list_jobs() == []  # no segment of a later window yet
    live_playlist(layout, 103, first[3:] + [t0 + timedelta(seconds=10.3)])
    archiver.cut_windows()
    [job] = store.reports.list_jobs()
    assert (job.kind, job.segment_start, job.segment_end) == (
        "window", t0, t0 + timedelta(seconds=10))
    assert job.first_frame_at == first[0]
    folder = Path(job.video_path).parent
    assert folder.parent == layout.windows("cam1") and folder.is_relative_to(layout.ram)
    assert Path(job.video_path).read_text().count("file 'seg-") == 5
    # Hard links: the window holds no second copy of a segment.
    assert (folder / "seg-100.ts").stat().st_ino == (layout.live("cam1") / "seg-100.ts").stat().st_ino
    assert job.sources == [{"path": str(layout.archives("cam1") / name_at(t0 - timedelta(seconds=30), "ts")),
                            "offset_s": 30.3, "duration_s": 10.0}]
    # An orderly stop registers the window in progress, once.
    archiver.flush_windows()
    archiver.flush_windows()
    jobs = sorted(store.reports.list_jobs(), key=lambda j: j.segment_start)
    assert [j.segment_start for j in jobs] == [t0, t0 + timedelta(seconds=10)]
    # A window is removed from RAM once its job is done.
    done = store.queue.claim("w")
    store.queue.complete(done, Outcome(result={}, safety_score=100))
    archiver.housekeeping()
    assert not folder.exists() and Path(jobs[1].video_path).exists()
    store.close()


def test_lagging_camera_has_its_waiting_windows_merged(tmp_path, capsys):
    archiver, store, layout = make_archiver(
        tmp_path, analysis="window_seconds = 10\nmax_lag_seconds = 30", archive_seconds=30)
    t0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    t0 -= timedelta(seconds=t0.second % 10)
    starts = [t0 + timedelta(seconds=2 * n) for n in range(20)]  # 40 s: four windows
    live_playlist(layout, 10, starts)
    archiver.cut_windows()
    archiver.flush_windows()
    assert len(store.queue.pending_windows("cam1")) == 4
    archiver.housekeeping()
    jobs = sorted(store.reports.list_jobs(), key=lambda j: j.segment_start)
    # At most one archive's length (30 s) per merged job: 3 windows, then the last alone.
    assert [(j.kind, j.windows) for j in jobs] == [("merged", 3), ("window", 1)]
    assert jobs[0].segment_end == t0 + timedelta(seconds=30)
    listing = Path(jobs[0].video_path).read_text()
    assert listing.count("file '") == 15 and jobs[0].first_frame_at == t0
    assert store.reports.merge_counts() == {"cam1": 2}
    assert "analysis lagging: windows merged into one job" in capsys.readouterr().out
    store.close()


def test_ram_over_its_bound_drops_the_oldest_waiting_windows(tmp_path):
    archiver, store, layout = make_archiver(tmp_path, analysis="window_seconds = 10",
                                            ram_max_mb=16)
    t0 = datetime.fromtimestamp((time.time() // 60 + 1) * 60, timezone.utc)
    live_playlist(layout, 10, [t0 + timedelta(seconds=2 * n) for n in range(10)])
    big = layout.live("cam1") / "seg-10.ts"
    big.write_bytes(b"\x47" * 18_000_000)  # 18 MB > 16 MB
    archiver.cut_windows()
    archiver.flush_windows()
    archiver.housekeeping()
    assert archiver.state()["windows_evicted"] == 0  # still live: FFmpeg's, not the windows'
    big.unlink()  # FFmpeg deleted it from the live playlist: now only a window holds it
    archiver.housekeeping()
    assert archiver.state()["windows_evicted"] == 1
    jobs = sorted(store.reports.list_jobs(), key=lambda j: j.segment_start)
    assert not Path(jobs[0].video_path).exists() and Path(jobs[1].video_path).exists()
    assert archiver.state()["ram_bytes"] < 16 * MB
    store.close()


@pytest.mark.e2e
def test_footage_no_job_covers_is_caught_up_archive_by_archive(tmp_path):
    """Fifteen minutes recorded while analysis was down (archives fabricated on disk):
    archive-sized catch-up jobs, oldest first, after live windows; a part that windows
    covered is not analysed again."""
    archiver, store, layout = make_archiver(tmp_path, analysis="window_seconds = 60",
                                            archive_seconds=300)
    t0 = datetime(2026, 11, 26, 7, 0, tzinfo=timezone.utc)
    for n in range(3):
        real_ts(layout.archives("cam1") / name_at(t0 + timedelta(minutes=5 * n), "ts"), seconds=4)
    # The first 2 s of the last archive were analysed as a window before the outage.
    store.queue.register("cam1", "/ram/w.ffconcat", t0 + timedelta(minutes=10),
                         t0 + timedelta(minutes=10, seconds=2), kind="window")
    store.queue.complete(store.queue.claim("w"), Outcome(result={}, safety_score=100))
    live = store.queue.register("cam1", "/ram/live.ffconcat", utcnow(), utcnow() + timedelta(minutes=1),
                                kind="window")
    archiver.catch_up()
    archiver.catch_up()  # a second start registers nothing twice
    catch_up = sorted((j for j in store.reports.list_jobs() if j.kind == "catchup"),
                      key=lambda j: j.segment_start)
    assert [(j.segment_start - t0).total_seconds() for j in catch_up] == [0, 300, 602]
    assert all(j.priority == 1 for j in catch_up)
    assert [j.sources[0]["offset_s"] for j in catch_up] == [0, 0, 2]
    assert 3.5 < catch_up[0].duration_seconds < 4.5
    assert store.queue.claim("w").id == live
    assert [store.queue.claim("w").id for _ in catch_up] == [j.id for j in catch_up]
    store.close()


def test_footage_after_its_window_was_closed_becomes_a_window_of_its_own(tmp_path):
    """A restart (or a camera back from a silence) inside a window already registered: the
    rest of that window is a job from the first new segment to the window's end."""
    archiver, store, layout = make_archiver(tmp_path, analysis="window_seconds = 10")
    t0 = datetime.fromtimestamp((time.time() // 60 + 1) * 60, timezone.utc)
    live_playlist(layout, 10, [t0 + timedelta(seconds=2 * n) for n in range(2)])
    archiver.cut_windows()
    archiver.flush_windows()  # an orderly stop at t0 + 4 s
    restarted = archiver.__class__(archiver.config, store.queue, store.recordings)
    live_playlist(layout, 12, [t0 + timedelta(seconds=6.5 + 2 * n) for n in range(3)])
    restarted.cut_windows()
    restarted.flush_windows()
    restarted.flush_windows()
    jobs = sorted(store.reports.list_jobs(), key=lambda j: j.segment_start)
    assert [(j.segment_start - t0, j.segment_end - t0) for j in jobs] == [
        (timedelta(0), timedelta(seconds=10)), (timedelta(seconds=6), timedelta(seconds=10)),
        (timedelta(seconds=10), timedelta(seconds=20))]
    assert jobs[1].first_frame_at == t0 + timedelta(seconds=6.5)
    assert Path(jobs[1].video_path).read_text().count("file '") == 2
    store.close()


@pytest.mark.e2e
def test_at_start_windows_left_by_a_crash_are_registered_or_go_on_collecting(tmp_path):
    archiver, store, layout = make_archiver(tmp_path, analysis="window_seconds = 10")
    now = datetime.fromtimestamp(time.time() // 10 * 10, timezone.utc)
    past, current = now - timedelta(seconds=20), now
    live_playlist(layout, 10, [past + timedelta(seconds=2 * n) for n in range(3)]
                  + [current + timedelta(seconds=0.5)])
    archiver.cut_windows()  # links; the past window closes (a later segment exists)
    [done] = store.reports.list_jobs()
    store.close()
    (tmp_path / "data" / "vlmguard.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / "data" / f"vlmguard.db{suffix}").unlink(missing_ok=True)
    for folder in layout.windows("cam1").iterdir():
        (folder / "job").unlink(missing_ok=True)  # as if the crash came before registering
    # The previous run's archive: 25 s from the past window on; nothing was linked for
    # its second 10 s (say the archiver was down), the last 5 s are the open window's.
    real_ts(layout.archives("cam1") / name_at(past, "ts"), seconds=25)
    archiver2, store2, _ = make_archiver(tmp_path, analysis="window_seconds = 10")
    archiver2.catch_up()
    jobs = sorted(store2.reports.list_jobs(), key=lambda j: j.segment_start)
    assert [(j.kind, j.segment_start - past, j.segment_end - past) for j in jobs] == [
        ("window", timedelta(0), timedelta(seconds=10)),
        ("catchup", timedelta(seconds=10), timedelta(seconds=20))]
    store2.close()
