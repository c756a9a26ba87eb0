"""How the processes tell the supervisor (and `vlmguard status`) that they are alive.

Liveness is a timestamp in shared memory that a child's main loop refreshes: a full disk
cannot stop it, and a blocked loop (the seed's stutter) stops it. What each child is
doing is a small JSON file in the RAM folder's run/ (run_dir), replaced atomically when it
changes (see child.ChildState), for humans and the systemd STATUS line; losing one of
those writes is harmless. A child's bootstrap is in child.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vlmguard.layout import ram_root


class Beat:
    """A child's heartbeat; a Beat() without shared memory (outside the supervisor) is a no-op."""

    def __init__(self, value=None):
        self.value = value

    def __call__(self) -> None:
        if self.value is not None:
            self.value.value = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self.value.value


def run_dir(data_dir: Path) -> Path:
    """The state files are runtime state: in the RAM folder (layout.ram_root), not on the
    data disk, which may be flash."""
    return ram_root(data_dir) / "run"


def write_state(data_dir: Path, name: str, state: dict[str, Any]) -> None:
    directory = run_dir(data_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temp = directory / f".{name}.json.tmp"
        temp.write_text(json.dumps(state | {"pid": os.getpid(), "updated": time.time()}))
        temp.replace(directory / f"{name}.json")
    except OSError:
        pass  # a full disk must not take a process down over a status line


def read_states(data_dir: Path) -> dict[str, dict[str, Any]]:
    states = {}
    for path in sorted(run_dir(data_dir).glob("*.json")):
        try:
            states[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return states


def clear_states(data_dir: Path) -> None:
    for path in run_dir(data_dir).glob("*.json"):
        path.unlink(missing_ok=True)


def clear_stacks(data_dir: Path) -> None:
    for path in run_dir(data_dir).glob("*.stack"):
        path.unlink(missing_ok=True)
