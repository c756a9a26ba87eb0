"""Logging: JSON lines off a terminal, with role and pid, stdlib loggers included."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging
from vlmguard.logs import configure_logging, get_logger
import structlog
configure_logging("analyzer")
with structlog.contextvars.bound_contextvars(job_id=7, worker_id="analyzer-1"):
    get_logger().info("job claimed", camera_id="cam1")
logging.getLogger("aiohttp.server").warning("from stdlib")
try:
    1 / 0
except ZeroDivisionError:
    get_logger().exception("it broke")
"""


def test_json_lines_carry_role_pid_and_context():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 3
    claimed, stdlib, broke = lines
    assert claimed["event"] == "job claimed"
    assert (claimed["role"], claimed["job_id"], claimed["worker_id"], claimed["camera_id"]) == (
        "analyzer", 7, "analyzer-1", "cam1")
    assert isinstance(claimed["pid"], int) and claimed["level"] == "info"
    assert (stdlib["event"], stdlib["logger"], stdlib["role"]) == ("from stdlib", "aiohttp.server", "analyzer")
    assert "job_id" not in stdlib
    assert "ZeroDivisionError" in broke["exception"]
