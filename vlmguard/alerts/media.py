"""Where an incident's snapshot lies on disk, for the destinations that attach it.

The analyzer writes it (clips.py); this module only reads it, at the path layout.py
names. A missing file means no attachment, never a failed alert.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vlmguard.layout import snapshot_path

# The analyzer writes the snapshot right after the incident's commit (the file is named for
# the incident's id): a delivery that starts within this long of that commit waits for it.
SNAPSHOT_GRACE_SECONDS = 5.0
SNAPSHOT_POLL_SECONDS = 0.1


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
