"""The vlmguard command, driven as a user drives it, over a real SQLite job table."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from vlmguard import __version__
from vlmguard.cli import main
from vlmguard.config import load_config
from vlmguard.store.bundle import Store
from vlmguard.store.records import Outcome

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def filled(config_file):
    """Two cameras' jobs in every state but processing."""
    with Store.from_config(load_config(config_file)) as store:
        for n in range(3):
            start = T0 + timedelta(minutes=10 * n)
            store.queue.register("cam1", f"/a/{n}.mp4", start, start + timedelta(minutes=10))
        store.queue.register("cam2", "/b/0.mp4", T0, T0 + timedelta(minutes=10))
        store.queue.complete(store.queue.claim("w1"), Outcome(result={"summary": "fine"}, safety_score=95))
        store.queue.fail(store.queue.claim("w1"), "HTTP 401: bad API key", permanent=True)
    return config_file


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_help_reads_like_docs():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("check-config", "status", "jobs", "retry", "job"):
        assert command in result.output


def test_status_before_first_run_says_so(config_file):
    result = run("status", "--config", config_file)
    assert result.exit_code == 1  # nothing runs: needs attention
    assert "no vlmguard database" in result.output
    assert "NOT RUNNING" in result.output
    assert not (config_file.parent / "data" / "vlmguard.db").exists()


def test_status_json_counts(filled):
    result = run("status", "--json", "--config", filled)
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["problems"] == ["daemon not running", "1 job(s) failed in the last 24 h"]
    assert report["daemon"]["running"] is False
    assert report["database"]["ready"] is True
    jobs = report["jobs"]
    assert (jobs["pending"], jobs["processing"], jobs["completed"], jobs["failed"]) == (2, 0, 1, 1)
    assert jobs["by_camera"]["cam1"] == {"pending": 1, "processing": 0, "completed": 1, "failed": 1}
    assert jobs["oldest_pending_age_s"] >= 0
    assert [c["id"] for c in report["cameras"]] == ["cam1", "cam2"]
    assert report["failures"][0]["error_message"] == "HTTP 401: bad API key"


def test_status_text(filled):
    result = run("status", "--config", filled)
    assert result.exit_code == 1
    assert "pending 2  processing 0  completed 1  failed 1" in result.output
    assert "needs attention: daemon not running; 1 job(s) failed in the last 24 h" in result.output
    assert "HTTP 401: bad API key" in result.output


def test_jobs_filters(filled):
    result = run("jobs", "--json", "--state", "pending", "--config", filled)
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert {r["status"] for r in rows} == {"pending"} and len(rows) == 2
    result = run("jobs", "--json", "--camera", "cam2", "--config", filled)
    assert [json.loads(line)["camera_id"] for line in result.output.splitlines()] == ["cam2"]
    result = run("jobs", "--state", "bogus", "--config", filled)
    assert result.exit_code == 2 and "bogus" in result.output


def test_retry_failed_job(filled):
    failed = json.loads(run("jobs", "--json", "--state", "failed", "--config", filled).output)
    result = run("retry", failed["id"], "--config", filled)
    assert result.exit_code == 0 and "pending again" in result.output
    assert json.loads(run("status", "--json", "--config", filled).output)["jobs"]["failed"] == 0


def test_retry_refuses_other_states_and_unknown_ids(filled):
    done = json.loads(run("jobs", "--json", "--state", "completed", "--config", filled).output)
    result = run("retry", done["id"], "--config", filled)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"vlmguard: job {done['id']} is completed, only failed jobs can be retried"
    result = run("retry", 9999, "--config", filled)
    assert (result.exit_code, result.stderr.strip()) == (1, "vlmguard: no job 9999")


def test_job_show(filled):
    done = json.loads(run("jobs", "--json", "--state", "completed", "--config", filled).output)
    detail = json.loads(run("job", "show", done["id"], "--config", filled).output)
    assert detail["analysis_result"] == {"summary": "fine"}
    assert detail["safety_score"] == 95 and detail["incidents"] == []


def test_jobs_without_database_is_one_line(config_file):
    result = run("jobs", "--config", config_file)
    assert result.exit_code == 1
    assert result.stderr.startswith("vlmguard: no vlmguard database at ")


def test_config_from_environment(filled, monkeypatch):
    monkeypatch.setenv("VLMGUARD_CONFIG", str(filled))
    assert json.loads(run("status", "--json").output)["jobs"]["completed"] == 1


@pytest.mark.e2e
def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "vlmguard", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.fixture
def with_incidents(config_file):
    from vlmguard.store.records import IncidentRecord
    with Store.from_config(load_config(config_file)) as store:
        for camera, n, severity in [("cam1", 0, "low"), ("cam1", 1, "critical"), ("cam2", 2, "high")]:
            start = T0 + timedelta(hours=n)
            store.queue.register(camera, f"/{camera}/{n}.mp4", start, start + timedelta(minutes=10))
            job = store.queue.claim("w")
            store.queue.complete(job, Outcome(result={}, safety_score=50, incidents=[
                IncidentRecord(start + timedelta(seconds=30), start + timedelta(seconds=40),
                                     "fall", severity, f"incident {n}", 0.9)]))
    return config_file


def test_incidents_newest_first_and_filters(with_incidents):
    def ids(*args):
        result = run("incidents", "--json", "--config", with_incidents, *args)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["description"] for line in result.output.splitlines()]
    assert ids() == ["incident 2", "incident 1", "incident 0"]
    assert ids("--camera", "cam1") == ["incident 1", "incident 0"]
    assert ids("--severity", "high") == ["incident 2", "incident 1"]
    assert ids("--since", "2026-11-26T09:00:00") == ["incident 2", "incident 1"]
    assert ids("--limit", "1") == ["incident 2"]
    row = json.loads(run("incidents", "--json", "--limit", "1", "--config", with_incidents).output)
    assert row["start_at"] == "2026-11-26T10:00:30.000Z"
    text = run("incidents", "--config", with_incidents).output
    assert "2026-11-26 10:00:30  cam2             high     fall         incident 2  (job 3)" in text
