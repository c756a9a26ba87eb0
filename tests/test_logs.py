"""Logging: JSON lines off a terminal, with role and pid, stdlib loggers included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

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


REDACT_SCRIPT = """
import logging
from vlmguard.logs import configure_logging, get_logger
configure_logging("streamer")
url = "rtsp://admin:pw-secret@10.0.0.5:554/s1?authtoken=tok-secret"
get_logger().warning("ffmpeg says", line=f"[rtsp @ 0x1] {url}: 401 Unauthorized",
                     nested={"urls": [url]})
logging.getLogger("aiohttp.server").error("bad %s", url)
try:
    raise ValueError(url)
except ValueError:
    get_logger().exception("it broke")
"""


def test_urls_are_redacted_in_every_string_of_every_event():
    proc = subprocess.run([sys.executable, "-c", REDACT_SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "secret" not in proc.stdout
    said, stdlib, broke = [json.loads(line) for line in proc.stdout.splitlines()]
    assert said["line"] == "[rtsp @ 0x1] rtsp://admin:***@10.0.0.5:554/s1?***: 401 Unauthorized"
    assert said["nested"] == {"urls": ["rtsp://admin:***@10.0.0.5:554/s1?***"]}
    assert stdlib["event"] == "bad rtsp://admin:***@10.0.0.5:554/s1?***"
    assert "ValueError: rtsp://admin:***@10.0.0.5:554/s1?***" in broke["exception"]
