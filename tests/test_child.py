"""The child skeleton: periodic work, state files on change, bugs counted, and a hung
child's stack in the supervisor's log before it is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vlmguard.child import ChildState, every, on_stop
from vlmguard.health import read_states, run_dir

TESTS = Path(__file__).resolve().parent


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_runs_at_once_then_once_per_period():
    calls = []
    tick = every(0.3, lambda: calls.append(time.monotonic()))
    assert tick() is True and tick() is False and len(calls) == 1
    time.sleep(0.35)
    assert tick() is True and len(calls) == 2


def test_state_file_is_written_on_change_only(tmp_path):
    state = ChildState(tmp_path, "archiver")
    adapted: dict[str, str] = {}
    state.publish({"state": "running", "adapted": adapted})
    path = run_dir(tmp_path) / "archiver.json"
    assert json.loads(path.read_text())["state"] == "running"
    path.unlink()
    state.publish({"state": "running", "adapted": adapted})
    assert not path.exists()  # the same state: nothing written
    adapted["fps"] = "1"  # changed in place by its owner: still a change
    state.publish()
    assert json.loads(path.read_text())["adapted"] == {"fps": "1"}
    assert read_states(tmp_path)["archiver"]["unexpected_errors"] == 0


@pytest.mark.e2e  # a process of its own
def test_an_unexpected_error_is_counted_and_its_traceback_logged_once(tmp_path):
    script = f"""
from pathlib import Path
from vlmguard.child import ChildState
from vlmguard.logs import configure_logging, get_logger
configure_logging("archiver", json=True)
state = ChildState(Path({str(tmp_path)!r}), "archiver")
for n in range(3):
    try:
        {{}}["missing"]
    except Exception:
        state.unexpected(get_logger(), "step failed unexpectedly", turn=n)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["step failed unexpectedly"] * 3
    assert "KeyError" in events[0]["exception"] and "Traceback" in events[0]["exception"]
    assert [e["level"] for e in events] == ["error"] * 3
    assert all("exception" not in e and e["again"] and "KeyError" in e["error"]
               for e in events[1:])
    assert read_states(tmp_path)["archiver"]["unexpected_errors"] == 3


@pytest.mark.e2e  # a process of its own
def test_on_stop_outside_a_loop_may_interrupt_the_work(tmp_path):
    script = """
import os, signal, time
from vlmguard.child import on_stop

class Stopping(BaseException):
    pass

def stop():
    raise Stopping()

on_stop(stop)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
except Stopping:
    print("stopped")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "stopped", proc.stderr


@pytest.mark.e2e  # a process of its own
def test_on_stop_in_an_asyncio_loop_sets_its_event():
    script = """
import asyncio, os, signal
from vlmguard.child import on_stop

async def main():
    stop = asyncio.Event()
    on_stop(stop.set)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(stop.wait(), 10)
    print("stopped")

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "stopped", proc.stderr


class PlantedVlmguard:
    """`vlmguard run` through tests/child_hooks.py (see there)."""

    def __init__(self, running):
        self.running = running

    def start(self):
        daemon = self.running
        env = {**os.environ, "GEMINI_API_KEY": "test-key-123",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent),
                                                          os.environ.get("PYTHONPATH")]))}
        daemon.log = open(daemon.log_path, "a")
        daemon.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "child_hooks.py"), "run", "--config",
             str(daemon.config_path)], stdout=daemon.log, stderr=subprocess.STDOUT, env=env)
        return daemon


def metric(daemon, name: str, child: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics",
                                    timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f'{name}{{child="{child}"}} '):
            return float(line.split()[-1])
    return None


@pytest.mark.e2e  # a process of its own
def test_bugs_are_counted_and_a_hung_childs_stack_is_logged_before_the_kill(tmp_path):
    from daemon import RunningVlmguard

    daemon = PlantedVlmguard(RunningVlmguard(tmp_path, None, workers=0,
                                             daemon="hang_seconds = 5")).start()
    try:
        daemon.data_dir.mkdir(parents=True, exist_ok=True)
        (daemon.data_dir / "bug-sidecar").touch()
        daemon.wait_live()
        # Every archive's sidecar hits the planted bug: counted, the archiver goes on.
        wait_until(lambda: (metric(daemon, "vlmguard_unexpected_errors_total", "archiver")
                            or 0) >= 2, 90, "two unexpected errors in /metrics")
        assert metric(daemon, "vlmguard_unexpected_errors_total", "streamer") == 0
        bugs = [e for e in daemon.log_events()
                if e["event"] == "sidecar not written: unexpected error"]
        assert len(bugs) >= 2
        assert "a bug planted by the test" in bugs[0]["exception"]
        assert all("exception" not in e and e["again"] for e in bugs[1:])  # traceback once

        old = wait_until(lambda: daemon.child_pid("archiver"), 20, "the archiver")
        (daemon.data_dir / "bug-sidecar").unlink()
        (daemon.data_dir / "hang-archiver").touch()
        wait_until(lambda: (pid := daemon.child_pid("archiver")) and pid != old, 60,
                   "a new archiver")
        events = daemon.log_events()
        names = [e["event"] for e in events]
        stacks = [e for e in events if e["event"] == "stack of a hung child"]
        assert stacks and stacks[0]["child"] == "archiver" and stacks[0]["child_pid"] == old
        stack = stacks[0]["stack"]
        # The Python stack of the hang, innermost first, down to the child's bootstrap.
        assert "hang_here_for_the_test" in stack and "finalize_or_hang" in stack, stack
        assert "archiver.py" in stack and "child.py" in stack and "bootstrap" in stack, stack
        killed = names.index("child hung: no heartbeat, killing it")
        assert names.index("stack of a hung child") < killed
        assert events[killed]["stack_logged"] is True
        assert not (daemon.data_dir / "hang-archiver").exists()
        assert daemon.child_pid("archiver") != old and os.kill(daemon.child_pid("archiver"), 0) is None
        assert daemon.stop() == 0
    finally:
        daemon.kill()

