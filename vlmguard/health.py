"""How the processes tell the supervisor (and `vlmguard status`) that they are alive.

Liveness is a timestamp in shared memory that a child's main loop refreshes: a full disk
cannot stop it, and a blocked loop (the seed's stutter) stops it. What each child is
doing is a small JSON file in <data_dir>/run/, replaced atomically, for humans and the
systemd STATUS line; losing one of those writes is harmless.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vlmguard.errors import VlmguardError
from vlmguard.logs import get_logger


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
    return data_dir / "run"


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


PR_SET_PDEATHSIG = 1


def stop_when_parent_dies(lifeline: int | None = None) -> None:
    """SIGTERM ourselves when the parent goes, even by SIGKILL: the orderly stop then runs.

    lifeline is the read end of a pipe whose write end only the supervisor holds (see
    Supervisor.lifeline); without one, multiprocessing's parent sentinel serves.
    """
    if lifeline is None:
        parent = multiprocessing.parent_process()
        if parent is None:
            return
        lifeline = parent.sentinel
    wake_when_parent_dies()

    def watch() -> None:
        multiprocessing.connection.wait([lifeline])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def wake_when_parent_dies() -> None:
    """Have the kernel send SIGCONT when the parent dies. A stopped child (SIGSTOP, a
    debugger) runs no code, so its watch thread cannot see the parent go; the kernel's
    parent-death signal reaches it all the same, and of the two signals that move a
    stopped process only SIGCONT keeps the orderly stop: the child resumes, its watch
    thread finds the lifeline closed and it stops itself in order. SIGKILL would cut
    that short (an open archive, a leased job). A running child ignores SIGCONT."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGCONT), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: a stopped child stays until someone continues or kills it


def name_process(name: str) -> None:
    """Show the child's role in top, pgrep and `ps -o comm` (the kernel keeps 15 bytes):
    forked children all carry the supervisor's command line."""
    try:
        Path("/proc/self/comm").write_text(name[:15])
    except OSError:
        pass  # not Linux: the name is only a convenience


def child_entry(entry: Any, *args: Any, lifeline: int | None = None) -> None:
    """First code in every supervised child: fresh signal dispositions, then its main.

    SIGINT is ignored so that Ctrl-C on a terminal reaches only the supervisor, which
    then stops the children in order; SIGTERM stays the way to stop a child. SIGHUP is
    ignored too: when the supervisor dies and leaves a stopped child behind, the kernel
    sends SIGHUP (then SIGCONT) to the orphaned process group, and the default action
    would kill every child before the parent watch could stop it in order.
    """
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    name_process(multiprocessing.current_process().name)
    stop_when_parent_dies(lifeline)
    try:
        entry(*args)
    except VlmguardError as exc:
        # A problem a person must fix (a database from a newer vlmguard, say): one line.
        get_logger("vlmguard").error("cannot run", error=str(exc))
        sys.exit(1)
