"""Where an incident's snapshot lies on disk, for the destinations that attach it.

The analyzer writes it (the incident media work); this module only reads it, by the path
convention both sides share. A missing file means no attachment, never a failed alert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def snapshot_path(data_dir: Path, incident_id: int, camera_id: str) -> Path:
    """<data_dir>/snapshots/<camera>/<incident id>.jpg."""
    return data_dir / "snapshots" / camera_id / f"{incident_id}.jpg"


def existing_snapshot(data_dir: Path, payload: dict[str, Any]) -> Path | None:
    if payload.get("type") != "incident":
        return None
    path = snapshot_path(data_dir, int(payload["id"]), str(payload["camera_id"]))
    return path if path.is_file() else None
