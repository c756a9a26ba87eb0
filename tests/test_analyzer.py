"""The analysis pool: real FFmpeg archives, the real google-genai SDK, our Gemini server."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vlmguard import analyzer
from vlmguard.analyzer import Worker
from vlmguard.config import load_config
from vlmguard.store import JobStore, utcnow

from conftest import write_config
from gemini_server import VALID_KEY, FakeGemini

SPAWN = multiprocessing.get_context("spawn")
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A 12-s H.264 archive with a keyframe every second, as the streamer makes them."""
    path = tmp_path_factory.mktemp("archives") / "20261126T080000Z.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
                    "-t", "12", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=120)
    return path


@pytest.fixture
def gemini():
    with FakeGemini() as server:
        yield server


@pytest.fixture
def setup(tmp_path, gemini, monkeypatch):
    """(config, store) with the API key in the environment and the test server as Gemini."""
    monkeypatch.setenv("GEMINI_API_KEY", VALID_KEY)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    def make(**overrides):
        gemini_settings = {"base_url": f'"{gemini.base_url}"', "timeout_seconds": 5,
                           "file_active_timeout_seconds": 10} | overrides.pop("gemini", {})
        analysis = {"max_retries": 2, "retry_backoff_seconds": 0.1, "lease_seconds": 5,
                    "poll_seconds": 0.2} | overrides.pop("analysis", {})
        config = load_config(write_config(tmp_path, f"""
            [storage]
            data_dir = "{tmp_path / 'data'}"
            [analysis]
            {chr(10).join(f'{k} = {v}' for k, v in analysis.items())}
            [gemini]
            {chr(10).join(f'{k} = {v}' for k, v in gemini_settings.items())}
            [[cameras]]
            id = "cam1"
            url = "lavfi:testsrc2"
            prompt = "Loading bay with forklifts."
        """))
        return config, JobStore.from_config(config)
    return make


def register(store, path, duration=12):
    return store.register("cam1", path, T0, T0 + timedelta(seconds=duration), max_retries=2)


def attempt(config, store):
    """One claim-and-process round by a worker, as its loop does it."""
    worker = Worker(config, store, "test-worker")
    job = store.next_job("test-worker", timeout=5)
    assert job is not None
    worker.process(job, worker.make_client())
    return store.get(job.id)


def test_archive_goes_pending_to_completed(setup, gemini, archive):
    config, store = setup()
    job_id = register(store, archive)
    job = attempt(config, store)
    assert (job.id, job.status, job.safety_score, job.incident_count) == (job_id, "completed", 72, 1)
    assert (job.prompt_tokens, job.output_tokens, job.total_tokens) == (1234, 56, 1300)
    assert job.analysis_result["summary"].startswith("A worker walks")
    [incident] = store.list_incidents(job_id)
    assert incident["start_at"] == T0 + timedelta(seconds=3)
    assert incident["end_at"] == T0 + timedelta(seconds=5)
    assert (incident["category"], incident["severity"], incident["confidence"]) == ("fall", "high", 0.8)
    assert gemini.files == {} and len(gemini.deleted) == 1  # nothing left at the provider
    request = gemini.generate_requests[0]
    config_sent = request["generationConfig"]
    assert config_sent["responseMimeType"] == "application/json"
    assert config_sent["responseSchema"]["required"] == ["safety_score", "summary", "incidents"]
    assert config_sent["mediaResolution"] == "MEDIA_RESOLUTION_LOW"
    video = request["contents"][0]["parts"][0]
    assert (video.get("videoMetadata") or video.get("video_metadata"))["fps"] == 0.5
    assert "Loading bay with forklifts." in request["contents"][0]["parts"][1]["text"]
    store.close()


def test_reduced_copy_is_a_fraction_of_the_archive(setup, gemini, archive):
    config, store = setup()
    register(store, archive)
    assert attempt(config, store).status == "completed"
    original, _ = setup(analysis={"mode": '"original"'})
    store.register("cam1", archive, T0 + timedelta(hours=1), T0 + timedelta(hours=1, seconds=12))
    assert attempt(original, store).status == "completed"
    reduced_bytes, original_bytes = gemini.uploaded_sizes
    assert original_bytes == archive.stat().st_size
    assert reduced_bytes * 10 < original_bytes
    store.close()


FAULTS = [
    ("429", "pending", "generate: HTTP 429 RESOURCE_EXHAUSTED: You exceeded your current quota."),
    ("500", "pending", "generate: HTTP 500 INTERNAL: An internal error has occurred."),
    ("503", "pending", "generate: HTTP 503 UNAVAILABLE: The service is currently unavailable."),
    ("proxy", "pending", "generate: HTTP 502"),
    ("slow", "pending", "generate: ReadTimeout"),
    ("blocked", "pending", "prompt blocked by Gemini (blockReason OTHER)"),
    ("max_tokens", "pending", "answer truncated (finishReason MAX_TOKENS)"),
    ("safety", "pending", "no usable answer (finishReason SAFETY)"),
    ("bad_schema", "pending", "invalid model output: safety_score must be an integer 0-100, got 150"),
    ("not_json", "pending", "invalid model output: not JSON"),
    ("400", "failed", "generate: HTTP 400 INVALID_ARGUMENT: Request contains an invalid argument."),
    ("403", "failed", "generate: HTTP 403 PERMISSION_DENIED: bad API key"),
]


@pytest.mark.parametrize("fault,status,message", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_has_its_outcome(setup, gemini, archive, fault, status, message):
    config, store = setup()
    register(store, archive)
    gemini.faults = [fault]
    job = attempt(config, store)
    assert job.status == status
    assert job.error_message.startswith(message), job.error_message
    assert job.retry_count == 1
    assert gemini.files == {}  # deleted even when the answer was no good
    if fault == "429":
        assert (job.run_after - utcnow()).total_seconds() > 30  # RetryInfo.retryDelay 37s honoured
    store.close()


def test_uploaded_file_failed_is_retried(setup, gemini, archive):
    config, store = setup()
    register(store, archive)
    gemini.file_fails = True
    job = attempt(config, store)
    assert (job.status, job.error_message) == (
        "pending", "uploaded video failed processing at Gemini: Video could not be processed.")


def test_retries_then_failed_with_the_last_error(setup, gemini, archive):
    config, store = setup()
    job_id = register(store, archive)
    gemini.faults = ["503", "500", "max_tokens"]
    for _ in range(3):
        time.sleep(0.3)  # past the short test backoff
        job = attempt(config, store)
    assert (job.id, job.status, job.retry_count) == (job_id, "failed", 3)
    assert job.error_message.startswith("answer truncated (finishReason MAX_TOKENS)")
    store.close()


def test_bad_api_key_fails_at_once(setup, gemini, archive, monkeypatch):
    config, store = setup()
    monkeypatch.setenv("GEMINI_API_KEY", "wrong-key")
    register(store, archive)
    job = attempt(config, store)
    assert job.status == "failed"
    assert "bad API key" in job.error_message and "wrong-key" not in job.error_message
    store.close()


def test_unknown_model_fails_at_once(setup, gemini, archive):
    config, store = setup(gemini={"model": '"gemini-9-ultra"'})
    register(store, archive)
    job = attempt(config, store)
    assert job.status == "failed"
    assert "unknown model 'gemini-9-ultra'" in job.error_message
    assert gemini.files == {}
    store.close()


@pytest.mark.parametrize("content,message", [
    (None, "archive missing: "),
    (b"", "archive is empty (0 bytes): "),
    (b"\x00garbage" * 1000, "archive is not readable video: "),
])
def test_unusable_archive_fails_at_once(setup, gemini, tmp_path, content, message):
    config, store = setup()
    path = tmp_path / "20261126T080000Z.mp4"
    if content is not None:
        path.write_bytes(content)
    register(store, path)
    job = attempt(config, store)
    assert (job.status, job.retry_count) == ("failed", 1)
    assert job.error_message == f"{message}{path}"
    assert gemini.generate_requests == []
    store.close()


def test_no_api_key_leaves_jobs_pending(setup, gemini, archive, monkeypatch):
    config, store = setup()
    monkeypatch.delenv("GEMINI_API_KEY")
    job_id = register(store, archive)
    worker = Worker(config, store, "keyless")
    threading_run = __import__("threading").Thread(target=worker.run)
    threading_run.start()
    time.sleep(1.5)
    worker.stopping.set()
    threading_run.join(20)
    job = store.get(job_id)
    assert (job.status, job.retry_count, job.error_message) == ("pending", 0, None)
    assert worker.state.startswith("waiting: no Gemini API key ($GEMINI_API_KEY")
    store.close()


def test_key_from_systemd_credentials(setup, gemini, archive, monkeypatch, tmp_path):
    config, store = setup()
    monkeypatch.delenv("GEMINI_API_KEY")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "gemini_api_key").write_text(VALID_KEY + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    register(store, archive)
    assert attempt(config, store).status == "completed"
    store.close()


def test_worker_killed_mid_upload_is_rescued_and_completed_once(setup, gemini, archive, capfd):
    config, store = setup(analysis={"mode": '"original"'})
    job_id = register(store, archive)
    gemini.upload_delay = 5
    doomed = SPAWN.Process(target=analyzer.main, args=(config, 0))
    doomed.start()
    assert gemini.upload_started.wait(60)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join()
    gemini.upload_delay = 0
    assert store.get(job_id).status == "processing"
    rescuer = SPAWN.Process(target=analyzer.main, args=(config, 1))
    rescuer.start()
    deadline = time.time() + 60
    while store.get(job_id).status != "completed" and time.time() < deadline:
        time.sleep(0.5)
    rescuer.terminate()
    rescuer.join(30)
    job = store.get(job_id)
    assert (job.status, job.retry_count, job.incident_count) == ("completed", 1, 1)
    assert job.worker_id.endswith("-analyzer-1")
    assert len(store.list_incidents(job_id)) == 1
    assert rescuer.exitcode == 0
    # The API key is nowhere in what the processes logged, nor in the database files.
    logs = capfd.readouterr()
    assert "job completed" in logs.out
    assert VALID_KEY not in logs.out + logs.err
    for path in Path(config.data_dir).glob("vlmguard.db*"):
        assert VALID_KEY.encode() not in path.read_bytes()
    store.close()


def test_analyze_command_prints_the_checked_answer(setup, gemini, archive):
    from click.testing import CliRunner
    from vlmguard.cli import main
    import json as jsonlib
    config, store = setup()
    store.close()
    result = CliRunner().invoke(main, ["analyze", str(archive), "--camera", "cam1", "--json",
                                       "--config", str(config.source)])
    assert result.exit_code == 0, result.output
    answer = jsonlib.loads(result.stdout)
    assert answer["safety_score"] == 72 and answer["tokens"]["total"] == 1300
    assert answer["incidents"][0]["category"] == "fall"
    assert gemini.files == {}
    text = CliRunner().invoke(main, ["analyze", str(archive), "--config", str(config.source)])
    assert text.output.startswith("safety score 72/100   tokens 1300\n")
    assert "high     fall" in text.output


def test_analyze_command_without_key_is_one_line(setup, gemini, archive, monkeypatch):
    from click.testing import CliRunner
    from vlmguard.cli import main
    config, store = setup()
    store.close()
    monkeypatch.delenv("GEMINI_API_KEY")
    result = CliRunner().invoke(main, ["analyze", str(archive), "--config", str(config.source)])
    assert result.exit_code == 1
    assert result.stderr.startswith("vlmguard: no Gemini API key: set $GEMINI_API_KEY")
    gemini.faults = ["400"]
    monkeypatch.setenv("GEMINI_API_KEY", VALID_KEY)
    result = CliRunner().invoke(main, ["analyze", str(archive), "--config", str(config.source)])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("vlmguard: generate: HTTP 400 INVALID_ARGUMENT: "
                                     "Request contains an invalid argument.")


def test_client_is_reused_until_the_key_changes(setup, monkeypatch):
    from vlmguard.analyzer import gemini_client_factory
    config, store = setup()
    store.close()
    make = gemini_client_factory(config)
    first = make()
    assert make() is first
    monkeypatch.setenv("GEMINI_API_KEY", "rotated-key")
    assert make() is not first
    monkeypatch.delenv("GEMINI_API_KEY")
    assert make() is None
