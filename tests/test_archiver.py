"""The archiver: closed archives become MP4 jobs, catch-up after a crash, retention."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path


from vlmguard.archiver import Archiver
from vlmguard.config import load_config
from vlmguard.layout import ARCHIVE_TIME, Layout
from vlmguard.store import JobStore

from conftest import write_config

MB = 1_000_000


def make_archiver(tmp_path, **storage):
    settings = "\n".join(f"{key} = {value}" for key, value in storage.items())
    config = load_config(write_config(tmp_path, f"""
        [storage]
        data_dir = "{tmp_path / 'data'}"
        {settings}
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """))
    store = JobStore.from_config(config)
    return Archiver(config, store), store, Layout(config.data_dir)


def name_at(when: datetime, suffix: str = "mp4") -> str:
    return f"{when.strftime(ARCHIVE_TIME)}.{suffix}"


def real_ts(path: Path, seconds: int = 2) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=10",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-f", "mpegts",
                    str(path)], check=True, timeout=60)
    return path


def test_catch_up_finalizes_and_registers_everything_left(tmp_path):
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
    jobs = sorted(store.list_jobs(), key=lambda j: j.segment_start)
    assert [Path(j.video_path).name for j in jobs] == [
        done.name, name_at(t0), name_at(t0 + timedelta(minutes=10)),
        name_at(t0 + timedelta(minutes=20), "ts")]  # the unreadable one is kept, not dropped
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
    store.register("cam1", paths[0], start, start)  # the oldest is pending
    archiver.enforce_retention()
    # The pending one stays, so one more of the others goes to meet the budget.
    assert sorted(layout.archives("cam1").iterdir()) == [paths[0], paths[4]]
    store.close()


def test_disk_nearly_full_deletes_even_unanalysed_archives(tmp_path, capsys):
    archiver, store, layout = make_archiver(tmp_path, min_free_gb=100_000)
    paths = fill_archives(layout, 2)
    start = datetime.now(timezone.utc)
    store.register("cam1", paths[0], start, start)
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
