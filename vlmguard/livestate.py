"""What the running daemon's files say, no database needed: whether the daemon runs (the
data directory's lock), whether each camera is online, how a child last exited. The
status report is built on these; the notifier reads them without the rest of it."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from vlmguard.config import Config
from vlmguard.health import read_states
from vlmguard.layout import Layout, stale_after
from vlmguard.livelist import live_age


def daemon_pid(data_dir: Path) -> int | None:
    """The pid holding the data directory's lock, or None when no vlmguard runs there."""
    path = data_dir / "vlmguard.pid"
    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            return None
    except FileNotFoundError:
        return None


def camera_online(config: Config, streamer: dict[str, Any] | None, age: float) -> bool:
    """Online: the streamer is alive (its supervisor says so) and the camera's live
    playlist gained a segment within the stale limit (age seconds ago)."""
    return bool(streamer and streamer.get("alive")) and age <= stale_after(config)


def cameras_online(config: Config) -> dict[str, bool]:
    states = read_states(config.data_dir) if daemon_pid(config.data_dir) else {}
    streamer = states.get("supervisor", {}).get("children", {}).get("streamer")
    layout = Layout(config.data_dir)
    return {camera.id: camera_online(config, streamer,
                                     live_age(layout, camera.id, config.storage.live_segments))
            for camera in config.cameras}


def exit_text(last_exit: dict[str, Any] | None) -> str:
    if not last_exit:
        return "unknown"
    if "signal" in last_exit:
        return f"killed by {last_exit['signal']}"
    return f"exit code {last_exit.get('exitcode')}"
