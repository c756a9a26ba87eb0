"""Where an incident's snapshot lies on disk, for the destinations that attach it.

The analyzer writes it (the incident media work); this module only reads it, by the path
convention both sides share. A missing file means no attachment, never a failed alert.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any


# The analyzer writes the snapshot right after the incident's commit (the file is named for
# the incident's id): a delivery that starts within this long of that commit waits for it.
SNAPSHOT_GRACE_SECONDS = 5.0
SNAPSHOT_POLL_SECONDS = 0.1


def snapshot_path(data_dir: Path, camera_id: str, incident_id: int) -> Path:
    """<data_dir>/snapshots/<camera>/<incident id>.jpg: the convention of
    vlmguard.layout.snapshot_path (branch i14m, same arguments); once merged, this
    should simply call that."""
    return Path(data_dir) / "snapshots" / camera_id / f"{int(incident_id)}.jpg"


def existing_snapshot(data_dir: Path, payload: dict[str, Any],
                      committed_at: datetime | None = None) -> Path | None:
    """The incident's snapshot file, waiting for it while its commit is recent."""
    if payload.get("type") != "incident":
        return None
    path = snapshot_path(data_dir, str(payload["camera_id"]), int(payload["id"]))
    deadline = (committed_at.timestamp() + SNAPSHOT_GRACE_SECONDS) if committed_at else 0.0
    while not path.is_file():
        if time.time() >= deadline:
            return None
        time.sleep(SNAPSHOT_POLL_SECONDS)
    return path
