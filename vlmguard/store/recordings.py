"""What the job table says about archive files: which are registered (the archiver's
catch-up skips them), which retention must keep (analysis still to come, or kept by a
person), and which incidents' footage is gone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Sequence

from sqlalchemy import select, update

from vlmguard.store.database import Database
from vlmguard.store.quarantine import quarantining
from vlmguard.store.records import utcnow
from vlmguard.store.schema import INCIDENT_OK, JOB_OK, incidents, jobs


class RecordingsIndex:
    """Archive paths in the job table, for retention and the recordings browser."""

    def __init__(self, db: Database):
        self.db = db

    def keep_archive(self, job_id: int, keep: bool) -> bool:
        """Keep a job's archive out of retention's reach, or release it; False if no job."""
        with self.db.write() as conn:
            changed = conn.execute(update(jobs).where(jobs.c.id == job_id, JOB_OK)
                                   .values(kept_at=utcnow() if keep else None)).rowcount
        return bool(changed)

    @quarantining
    def kept_paths(self) -> set[str]:
        """Archives a person keeps: retention never deletes them. A window's job keeps the
        archive file(s) its footage lies in (its sources), not only its RAM copy."""
        with self.db.read() as conn:
            rows = conn.execute(select(jobs.c.video_path, jobs.c.sources)
                                .where(jobs.c.kept_at.is_not(None), JOB_OK)).all()
        kept = set()
        for video_path, sources in rows:
            kept.add(video_path)
            kept.update(str(s["path"]) for s in sources or ()
                        if isinstance(s, dict) and s.get("path"))
        return kept

    def incidents_ended_before(self, camera_id: str, before: datetime,
                               ids: Sequence[int]) -> list[int]:
        """Which of these incidents of the camera ended before `before` (their footage is
        gone when that is the camera's oldest recording)."""
        if not ids:
            return []
        query = select(incidents.c.id).where(incidents.c.camera_id == camera_id,
                                             incidents.c.end_at <= before, INCIDENT_OK,
                                             incidents.c.id.in_(list(ids)))
        with self.db.read() as conn:
            return list(conn.execute(query).scalars())

    def registered_paths(self) -> set[str]:
        """Every archive the table already knows (the archiver's catch-up skips them)."""
        with self.db.read() as conn:
            return set(conn.execute(select(jobs.c.video_path)).scalars())

    @quarantining
    def in_flight_paths(self) -> set[str]:
        """Archives whose analysis is still to come (retention must keep them): a job's
        video and the archives its sources name."""
        query = (select(jobs.c.video_path, jobs.c.sources)
                 .where(jobs.c.status.in_(("pending", "processing")), JOB_OK))
        paths = set()
        with self.db.read() as conn:
            for video, sources in conn.execute(query):
                paths.add(video)
                paths.update(s.get("path") for s in sources or () if isinstance(s, dict))
        return paths
