"""`vlmguard status`, /api/health and /metrics against a running daemon, then a stopped one."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import RunningVlmguard
from helpers import wait_for
from helpers.db import status_counts

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    """Both tests' daemons, one with the API key and one without, started together so
    that they record their first archives at the same time."""
    from gemini_server import FakeGemini

    with FakeGemini() as gemini:
        started = {"keyed": RunningVlmguard(tmp_path_factory.mktemp("keyed"), gemini.base_url),
                   "keyless": RunningVlmguard(tmp_path_factory.mktemp("keyless"), gemini.base_url,
                                              env={"GEMINI_API_KEY": ""})}
        for daemon in started.values():
            daemon.start()
        try:
            yield started
        finally:
            for daemon in started.values():
                daemon.kill()


def status(daemon, *args):
    proc = subprocess.run([sys.executable, "-m", "vlmguard", "status", "--config",
                           str(daemon.config_path), *args], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout


def get(daemon, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_status_running_then_stopped(daemons):
    daemon = daemons["keyed"]
    try:
        daemon.wait_live()
        wait_for(lambda: status_counts(daemon).get("completed", 0) >= 1, 60, "a completed job")
        wait_for(lambda: status(daemon)[0] == 0, 20, "a healthy status")
        code, out = status(daemon, "--json")
        report = json.loads(out)
        assert code == 0 and report["healthy"] is True and report["problems"] == []
        assert report["daemon"]["running"] is True and report["daemon"]["pid"] == daemon.proc.pid
        assert report["daemon"]["since"] is not None
        [camera] = report["cameras"]
        assert (camera["id"], camera["online"]) == ("cam1", True)
        assert camera["hls_url"] == daemon.url()
        assert report["jobs"]["completed"] >= 1 and report["jobs"]["failed"] == 0
        assert {"pending", "processing", "completed", "failed"} <= set(report["jobs"])
        assert sorted(w["name"] for w in report["workers"]) == ["analyzer-0", "analyzer-1"]
        assert all(w["alive"] for w in report["workers"])
        assert report["tokens"]["last_24h"]["cam1"]["total"] > 0
        assert report["archives"]["count"] >= 1
        code, text = status(daemon)
        assert text.startswith(f"vlmguard  running, pid {daemon.proc.pid} since ")
        assert "cam1             live" in text and text.rstrip().endswith("healthy")
        assert "analysis lag " in text and "ram       " in text
        assert camera["analysis_lag_s"] >= 0 and report["ram"]["bytes"] > 0
        assert report["ram"]["folder"].startswith("/dev/shm/vlmguard-")
        assert get(daemon, "/api/health")[0] == 200
        _, metrics = get(daemon, "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        assert [s.value for s in families["vlmguard_camera_online"].samples] == [1]
        assert [s.value for s in families["vlmguard_up"].samples] == [1]
        children = {s.labels["child"] for s in families["vlmguard_child_restarts"].samples}
        assert children == {"archiver", "streamer", "analyzer-0", "analyzer-1"}
    finally:
        assert daemon.stop() == 0
    code, out = status(daemon, "--json")
    report = json.loads(out)
    assert code == 1 and report["daemon"]["running"] is False
    assert report["problems"] == ["daemon not running"]
    assert report["jobs"]["completed"] >= 1  # still read from the table
    assert status(daemon)[1].startswith("vlmguard  NOT RUNNING")


def test_status_says_why_nothing_is_analysed_without_a_key(daemons):
    daemon = daemons["keyless"]
    try:
        daemon.wait_live()
        wait_for(lambda: status_counts(daemon).get("pending", 0) >= 1, 40, "a pending job")
        code, out = status(daemon)
        assert code == 1
        assert "needs attention: waiting: no Gemini API key ($GEMINI_API_KEY" in out
        assert status_counts(daemon).get("failed", 0) == 0
        status_code, body = get(daemon, "/api/health")
        assert status_code == 503 and "no Gemini API key" in body
    finally:
        assert daemon.stop() == 0
