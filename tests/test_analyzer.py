"""The analysis pool: real FFmpeg archives, the real google-genai SDK, our Gemini server."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vlmguard import analyzer
from vlmguard.analyzer import Worker
from vlmguard.config import load_config
from vlmguard.layout import Layout
from vlmguard.store.bundle import Store
from vlmguard.store.records import utcnow

from helpers import wait_for, write_config
from gemini_server import VALID_KEY

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

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


@pytest.fixture(scope="module")
def gop4_archive(tmp_path_factory) -> Path:
    """A 12-s archive from a camera with a 4-s GOP: its keyframe copy has 0.25 fps."""
    path = tmp_path_factory.mktemp("gop4") / "20261126T090000Z.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25",
                    "-t", "12", "-c:v", "libx264", "-preset", "ultrafast", "-g", "100",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=120)
    return path


@pytest.fixture
def setup(tmp_path, gemini, monkeypatch):
    """(config, store) with the API key in the environment and the test server as Gemini."""
    monkeypatch.setenv("GEMINI_API_KEY", VALID_KEY)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    def make(**overrides):
        gemini_settings = {"base_url": f'"{gemini.base_url}"', "timeout_seconds": 60,
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
        # The RAM folder marked as this test's (other sessions' clean-ups leave it alone).
        Layout(config.data_dir).make_dirs("cam1")
        return config, Store.from_config(config)
    return make


def register(store, path, duration=12):
    return store.queue.register("cam1", path, T0, T0 + timedelta(seconds=duration), max_retries=2)


def attempt(config, store):
    """One claim-and-process round by a worker, as its loop does it."""
    worker = Worker(config, store.queue, store.pauses, "test-worker")
    job = store.queue.next_job("test-worker", timeout=5)
    assert job is not None
    worker.process(job)
    return store.reports.get(job.id)


GENERATE = "POST /v1beta/models/gemini-3.8-flash:generateContent"


def camel(value):
    """A request as the service reads it: SDK 3.x sends nested keys snake_case."""
    if isinstance(value, dict):
        return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): camel(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [camel(v) for v in value]
    return value


def sent(gemini, n=0):
    return camel(gemini.generate_requests[n])


def test_archive_goes_pending_to_completed_in_one_request(setup, gemini, archive):
    config, store = setup()
    job_id = register(store, archive)
    job = attempt(config, store)
    assert (job.id, job.status, job.safety_score, job.incident_count) == (job_id, "completed", 72, 1)
    assert gemini.calls == [GENERATE]  # inline: no upload, no poll, no delete
    assert job.model_version == "gemini-3.8-flash"
    assert job.thoughts_tokens == 300  # thinking off: LOW, the lowest level 3.8 takes
    assert job.total_tokens == job.prompt_tokens + job.output_tokens + job.thoughts_tokens
    assert job.analysis_result["summary"].startswith("A worker walks")
    [incident] = store.incidents.list_incidents(job_id)
    assert incident["start_at"] == T0 + timedelta(seconds=3)
    assert incident["end_at"] == T0 + timedelta(seconds=5)
    assert (incident["category"], incident["severity"], incident["confidence"]) == ("fall", "high", 0.8)
    request = sent(gemini)
    config_sent = request["generationConfig"]
    assert config_sent["responseMimeType"] == "application/json"
    assert config_sent["responseSchema"]["propertyOrdering"] == ["summary", "incidents", "safety_score"]
    assert "camera_problem" in config_sent["responseSchema"]["properties"]["incidents"]["items"][
        "properties"]["category"]["enum"]
    assert config_sent["mediaResolution"] == "MEDIA_RESOLUTION_LOW"
    assert config_sent["maxOutputTokens"] == 2048
    assert config_sent["thinkingConfig"] == {"thinkingLevel": "LOW"}
    assert config_sent["temperature"] == 1.0  # Google's advice for 3-class models
    assert {s["threshold"] for s in request["safetySettings"]} == {"BLOCK_NONE"}
    video, text = request["contents"][0]["parts"]
    assert video["inlineData"]["dataBytes"] > 0
    # 6 keyframes in 12 s: the copy's real rate, which here is the asked-for 0.5
    assert video["videoMetadata"]["fps"] == pytest.approx(0.5, abs=0.05)
    assert "Loading bay with forklifts." in text["text"]
    assert "keyframes about 2 s apart" in text["text"] and "no audio" in text["text"]
    assert "Never identify people" in text["text"] and "camera_problem" in text["text"]
    assert "overlay" in text["text"] and "Do not flag" in text["text"]

    def described(schema):  # every property the model reads has a description
        assert schema.get("description"), schema
        for child in schema.get("properties", {}).values():
            described(child)
        if "items" in schema:
            described(schema["items"])
    described(config_sent["responseSchema"])
    store.close()


def test_fps_sent_is_the_copys_real_rate(setup, gemini, gop4_archive):
    config, store = setup()
    register(store, gop4_archive)
    assert attempt(config, store).status == "completed"
    video = sent(gemini)["contents"][0]["parts"][0]
    assert video["videoMetadata"]["fps"] == pytest.approx(0.25, abs=0.03)
    store.close()


def test_original_mode_uses_the_files_api_and_deletes(setup, gemini, archive):
    config, store = setup(analysis={"mode": '"original"'}, gemini={"inline_max_mb": 0})
    gemini.processing_polls = 2
    register(store, archive)
    job = attempt(config, store)
    assert job.status == "completed"
    assert gemini.uploaded_sizes == [archive.stat().st_size]
    assert gemini.files == {} and len(gemini.deleted) == 1  # nothing left at the provider
    assert sum(call.startswith("GET /v1beta/files/") for call in gemini.calls) == 2  # PROCESSING, ACTIVE
    store.close()


def test_thinking_off_is_minimal_where_the_model_has_it(setup, gemini, archive):
    config, store = setup(gemini={"model": '"gemini-3.5-flash"'})
    register(store, archive)
    job = attempt(config, store)
    assert job.status == "completed" and job.thoughts_tokens is None
    assert sent(gemini)["generationConfig"]["thinkingConfig"] == {"thinkingLevel": "MINIMAL"}
    store.close()


def test_thinking_budget_on_2_5_class_and_thoughts_billed(setup, gemini, archive):
    config, store = setup(gemini={"model": '"gemini-2.5-flash-lite"'})
    register(store, archive)
    job = attempt(config, store)
    assert job.status == "completed" and not job.thoughts_tokens
    assert sent(gemini)["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    high, _ = setup(gemini={"thinking": '"high"', "max_output_tokens": 8192})
    store.queue.register("cam1", archive, T0 + timedelta(hours=1), T0 + timedelta(hours=1, seconds=12))
    job = attempt(high, store)
    assert job.status == "completed" and job.thoughts_tokens == 2000
    assert job.total_tokens == job.prompt_tokens + job.output_tokens + job.thoughts_tokens
    store.close()


def test_thinking_that_eats_the_budget_gets_one_larger_retry(setup, gemini, archive):
    config, store = setup(gemini={"thinking": '"default"'})  # 3-class default: HIGH, 2000 thoughts
    register(store, archive)
    job = attempt(config, store)
    assert (job.status, job.retry_count) == ("completed", 0)
    budgets = [r["generationConfig"]["maxOutputTokens"] for r in gemini.generate_requests]
    assert budgets == [2048, 4096]
    assert job.thoughts_tokens == 2 * 2000  # both requests were billed, both are counted
    store.close()


def test_reduced_copy_is_a_fraction_of_the_archive(setup, gemini, archive):
    config, store = setup()
    register(store, archive)
    assert attempt(config, store).status == "completed"
    inline = sent(gemini)["contents"][0]["parts"][0]["inlineData"]["dataBytes"]
    assert inline * 10 < archive.stat().st_size
    store.close()


# Per-job failures: the job's retry budget pays, the pool carries on.
JOB_FAULTS = [
    ("500", "pending", "generate: HTTP 500 INTERNAL: An internal error has occurred."),
    ("503", "pending", "generate: HTTP 503 UNAVAILABLE: The service is currently unavailable."),
    ("proxy", "pending", "generate: HTTP 502"),
    ("bad_schema", "pending", "invalid model output: safety_score must be an integer 0-100, got 150"),
    ("not_json", "pending", "invalid model output: not JSON"),
    ("recitation", "pending", "no usable answer (finishReason RECITATION)"),
    # What a provider answers that is not an answer: its failure, never "unexpected error".
    ("html200", "pending", "generate: malformed response from Gemini"),
    ("shape", "pending", "generate: malformed response from Gemini"),
    ("huge", "pending", "generate: ReadError: answer larger than 2,097,152 bytes"),
]


@pytest.mark.parametrize("fault,status,message", JOB_FAULTS, ids=[f[0] for f in JOB_FAULTS])
def test_each_job_fault_has_its_outcome(setup, gemini, archive, fault, status, message):
    config, store = setup()
    register(store, archive)
    gemini.faults = [fault]
    job = attempt(config, store)
    assert job.status == status
    assert job.error_message.startswith(message), job.error_message
    assert job.retry_count == 1
    shared = store.pauses.provider_state("gemini")  # nothing account-wide
    assert shared is None or (not shared.paused and shared.not_before is None)
    store.close()


# Refusals: one changed retry in the same attempt, then failed with the reason.
REFUSALS = [
    ("blocked", "prompt blocked by Gemini (blockReason OTHER)", "fps 0.5 -> 0.25"),
    ("blocked_safety", "prompt blocked by Gemini (blockReason PROHIBITED_CONTENT)",
     "fps 0.5 -> 0.25"),
    ("safety", "answer withheld (finishReason SAFETY)", "fps 0.5 -> 0.25"),
    ("prohibited", "answer withheld (finishReason PROHIBITED_CONTENT)", "fps 0.5 -> 0.25"),
    ("blocklist", "answer withheld (finishReason BLOCKLIST)", "fps 0.5 -> 0.25"),
    ("spii", "answer withheld (finishReason SPII)", "fps 0.5 -> 0.25"),
    ("image_prohibited", "answer withheld (finishReason IMAGE_PROHIBITED_CONTENT)",
     "fps 0.5 -> 0.25"),
    ("max_tokens", "answer truncated (finishReason MAX_TOKENS)", "max_output_tokens 2048 -> 4096"),
]


@pytest.mark.parametrize("fault,message,change", REFUSALS, ids=[f[0] for f in REFUSALS])
def test_refusal_gets_one_changed_retry_then_fails(setup, gemini, archive, fault, message, change):
    config, store = setup()
    register(store, archive)
    gemini.faults = [fault]
    job = attempt(config, store)
    assert (job.status, job.retry_count) == ("completed", 0)
    first, second = (sent(gemini, n)["generationConfig"] for n in range(2))
    fps = [sent(gemini, n)["contents"][0]["parts"][0]["videoMetadata"]["fps"] for n in range(2)]
    assert (fps[1] < fps[0]) if "fps" in change else (second["maxOutputTokens"] == 4096)
    store.queue.register("cam1", archive, T0 + timedelta(hours=1), T0 + timedelta(hours=1, seconds=12))
    gemini.faults = [fault, fault]
    job = attempt(config, store)
    assert (job.status, job.retry_count) == ("failed", 1)
    assert job.error_message.startswith(message), job.error_message
    assert change in job.error_message
    store.close()


def test_thinking_level_the_model_lacks_is_adapted_to_once(setup, gemini, archive):
    gemini.levels["gemini-3.5-flash"] = ("LOW", "MEDIUM", "HIGH")  # MINIMAL withdrawn
    config, store = setup(gemini={"model": '"gemini-3.5-flash"'})
    worker = Worker(config, store.queue, store.pauses, "w")
    for hour in range(2):
        store.queue.register("cam1", archive, T0 + timedelta(hours=hour),
                             T0 + timedelta(hours=hour, seconds=12))
        worker.process(store.queue.next_job("w", timeout=5))
    assert [(j.status, j.retry_count) for j in store.reports.list_jobs()] == [("completed", 0)] * 2
    levels = [sent(gemini, n)["generationConfig"]["thinkingConfig"]["thinkingLevel"]
              for n in range(len(gemini.generate_requests))]
    assert levels == ["MINIMAL", "LOW", "LOW"]  # one refusal, then remembered
    assert "thinking_level LOW (Thinking level MINIMAL is not supported" in \
        worker.adapted["gemini"]["thinking"]
    store.close()


def test_the_same_400_on_three_windows_puts_the_provider_aside(setup, gemini, archive):
    """A 400 is about the provider's setup until it answers other windows: no window is
    charged for it, and the third in a row puts the provider aside with the server's
    message, probed again like a paused provider."""
    from vlmguard.status import gather_status, render_status
    config, store = setup(gemini={"pause_probe_minutes": 0.01})
    gemini.outage = "400"
    worker = Worker(config, store.queue, store.pauses, "w")
    ids = [store.queue.register("cam1", archive, T0 + timedelta(minutes=m),
                                T0 + timedelta(minutes=m, seconds=12)) for m in range(3)]
    for _ in range(3):
        worker.process(store.queue.next_job("w", timeout=5))
    assert {(store.reports.get(i).status, store.reports.get(i).retry_count) for i in ids} == {("pending", 0)}
    pause = store.pauses.provider_state("gemini")
    assert pause.reason == "misconfigured"
    assert pause.detail == ("generate: HTTP 400 INVALID_ARGUMENT: Request contains an invalid "
                            "argument. (the same on 3 windows in a row)")
    report = gather_status(config, store)
    assert report["analysis"]["paused"][0]["reason"] == "misconfigured"
    assert "PAUSED (gemini)" in render_status(report) and "misconfigured" in render_status(report)
    assert worker.held_back()  # the probe is refused too: still aside
    assert store.pauses.provider_state("gemini").paused
    gemini.outage = None  # the server's setup was fixed
    time.sleep(0.7)
    assert not worker.held_back()  # the next probe succeeds
    for _ in range(3):
        worker.process(store.queue.next_job("w", timeout=5))
    assert {store.reports.get(i).status for i in ids} == {"completed"}
    assert {store.reports.get(i).retry_count for i in ids} == {0}
    store.close()


def test_a_400_on_one_clip_while_others_are_answered_is_that_jobs(setup, gemini, archive):
    config, store = setup()
    worker = Worker(config, store.queue, store.pauses, "w")
    bad = register(store, archive)
    gemini.faults = ["400"]
    worker.process(store.queue.next_job("w", timeout=5))
    assert (store.reports.get(bad).status, store.reports.get(bad).retry_count) == ("pending", 0)
    good = store.queue.register("cam1", archive, T0 + timedelta(hours=1),
                                T0 + timedelta(hours=1, seconds=12))
    job = store.queue.next_job("w", timeout=5)  # the refused one is not due yet
    assert job.id == good
    worker.process(job)
    time.sleep(0.3)
    gemini.faults = ["400"]
    worker.process(store.queue.next_job("w", timeout=5))
    job = store.reports.get(bad)
    assert (job.status, job.retry_count) == ("pending", 1)  # now it pays, as any failure
    assert job.error_message.startswith("generate: HTTP 400 INVALID_ARGUMENT")
    assert not store.pauses.provider_state("gemini").paused
    store.close()


@pytest.mark.parametrize("fault", ["429_huge", "503_huge"])
def test_absurd_retry_delays_are_cut_to_the_maximum_wait(setup, gemini, archive, fault):
    """RetryInfo 999999999999s overflowed a date and ended every analyzer; one that fits
    a date would park every job for millennia."""
    config, store = setup(gemini={"max_retry_wait_seconds": 30})
    register(store, archive)
    gemini.faults = [fault]
    job = attempt(config, store)
    if fault == "429_huge":  # one shared wait, the job uncharged
        assert (job.status, job.retry_count, job.error_message) == ("pending", 0, None)
        wait = (store.pauses.provider_state("gemini").not_before - utcnow()).total_seconds()
    else:  # the job's retry waits at most as long
        assert (job.status, job.retry_count) == ("pending", 1)
        wait = (job.run_after - utcnow()).total_seconds()
    assert 20 < wait <= 30
    store.close()


def test_an_overlong_answer_is_stored_cleaned_and_cut(setup, gemini, archive):
    config, store = setup()
    register(store, archive)
    gemini.faults = ["long"]
    job = attempt(config, store)
    assert job.status == "completed", job.error_message
    summary = job.analysis_result["summary"]
    assert len(summary) == 2000 and summary.endswith("\u2026[truncated]")
    [incident] = store.incidents.list_incidents(job.id)
    assert len(incident["description"]) == 1000
    assert incident["description"].startswith("Flames spread.y")  # NUL and U+202E removed
    store.close()


def test_a_dripping_answer_ends_at_the_total_deadline(gemini, archive):
    """A byte every half second never trips a per-read timeout; timeout_seconds is one
    deadline for the whole request."""
    from vlmguard.vlm import AnalysisError, Clip
    from vlmguard.vlm.gemini import GeminiClient, GeminiSettings
    client = GeminiClient(GeminiSettings(base_url=gemini.base_url, timeout_seconds=10), VALID_KEY)
    gemini.faults = ["drip"]
    started = time.monotonic()
    with pytest.raises(AnalysisError, match="generate: ReadTimeout: no answer within 10 s"):
        client.analyze(Clip(archive, 12, 0.5), "prompt", lambda: None)
    assert 9.5 < time.monotonic() - started < 14


def test_original_mode_sends_a_ts_archive_as_mp4(setup, gemini, red_archive):
    config, store = setup(analysis={"mode": '"original"'})
    register(store, red_archive, duration=20)
    job = attempt(config, store)
    assert job.status == "completed", job.error_message
    inline = sent(gemini)["contents"][0]["parts"][0]["inlineData"]
    assert inline["mimeType"] == "video/mp4" and inline["dataBytes"] > 0
    store.close()


# Account-wide conditions: the pool pauses, the job goes back untouched.
ACCOUNT_FAULTS = [
    ("bad_key", "bad_key", "generate: HTTP 400 INVALID_ARGUMENT: bad API key"),
    ("401", "bad_key", "generate: HTTP 401 UNAUTHENTICATED: bad API key"),
    ("403", "permission_denied", "generate: HTTP 403 PERMISSION_DENIED: access denied"),
    ("429_daily", "quota_exhausted", "generate: HTTP 429 RESOURCE_EXHAUSTED: daily quota used up "
     "(GenerateRequestsPerDayPerProjectPerModel-FreeTier)"),
    ("429_zero", "quota_exhausted", "generate: HTTP 429 RESOURCE_EXHAUSTED: quota limit 0"),
]


@pytest.mark.parametrize("fault,reason,message", ACCOUNT_FAULTS, ids=[f[0] for f in ACCOUNT_FAULTS])
def test_account_fault_pauses_without_charging_the_job(setup, gemini, archive, fault, reason, message):
    config, store = setup()
    register(store, archive)
    gemini.faults = [fault]
    job = attempt(config, store)
    assert (job.status, job.retry_count, job.error_message) == ("pending", 0, None)
    pause = store.pauses.provider_state("gemini")
    assert pause.reason == reason and pause.detail.startswith(message), pause.detail
    assert 590 < (pause.probe_at - utcnow()).total_seconds() <= 600  # pause_probe_minutes 10
    assert VALID_KEY not in pause.detail
    store.close()


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-9-ultra"])
def test_retired_or_unknown_model_pauses(setup, gemini, archive, model):
    config, store = setup(gemini={"model": f'"{model}"'})
    register(store, archive)
    job = attempt(config, store)
    assert (job.status, job.retry_count) == ("pending", 0)
    pause = store.pauses.provider_state("gemini")
    assert pause.reason == "model_unavailable" and f"model '{model}' unknown or retired" in pause.detail
    store.close()


def test_per_minute_429_makes_everyone_wait_without_charging(setup, gemini, archive):
    config, store = setup()
    job_id = register(store, archive)
    gemini.faults = ["429"]
    job = attempt(config, store)
    assert (job.status, job.retry_count, job.error_message) == ("pending", 0, None)
    shared = store.pauses.provider_state("gemini")
    assert not shared.paused and 30 < (shared.not_before - utcnow()).total_seconds() <= 41  # retryDelay 41s
    assert (job.run_after - utcnow()).total_seconds() > 30
    worker = Worker(config, store.queue, store.pauses, "other-worker")
    assert worker.held_back()
    assert worker.state.startswith("waiting: rate limited until")
    assert store.reports.get(job_id).status == "pending"
    store.close()


def test_connection_refused_is_retried(setup, gemini, archive):
    from helpers import free_port
    config, store = setup(gemini={"base_url": f'"http://127.0.0.1:{free_port()}"'})
    register(store, archive)
    job = attempt(config, store)
    assert (job.status, job.retry_count) == ("pending", 1)
    assert job.error_message.startswith("generate: ConnectError"), job.error_message
    store.close()


def test_file_gone_403_is_the_jobs_problem(setup, gemini, archive):
    config, store = setup(analysis={"mode": '"original"'}, gemini={"inline_max_mb": 0})
    gemini.processing_polls = 1
    register(store, archive)
    gemini.faults = ["file_gone"]
    job = attempt(config, store)
    assert (job.status, job.retry_count) == ("pending", 1)
    assert "uploaded file not accessible" in job.error_message
    shared = store.pauses.provider_state("gemini")
    assert shared is None or (not shared.paused and shared.not_before is None)
    store.close()


def test_short_server_timeout_is_refused_by_config_and_by_the_service(setup, gemini, archive, tmp_path):
    from vlmguard.errors import ConfigError
    from vlmguard.vlm import AnalysisError, Clip
    from vlmguard.vlm.gemini import GeminiClient, GeminiSettings as GeminiConfig
    with pytest.raises(ConfigError, match=r"gemini.timeout_seconds: must be >= 60, got 5$"):
        setup(gemini={"timeout_seconds": 5})
    client = GeminiClient(GeminiConfig(base_url=gemini.base_url, timeout_seconds=5), VALID_KEY)
    with pytest.raises(AnalysisError, match="generate: HTTP 500 INTERNAL"):
        client.analyze(Clip(archive, 12, 0.5), "prompt", lambda: None)


def test_answer_past_the_clip_is_repaired_not_retried(setup, gemini, archive):
    config, store = setup()
    register(store, archive)
    near = {"start_offset_s": 10, "end_offset_s": 13.5, "category": "spill", "severity": "low",
            "description": "Water on the floor.", "confidence": 0.6}   # 1.5 s over: clamped
    outside = dict(near, start_offset_s=30, end_offset_s=35)          # wholly outside: dropped
    gemini.answer = {"summary": "A spill.", "incidents": [near, outside], "safety_score": 80}
    job = attempt(config, store)
    assert (job.status, job.retry_count, job.incident_count) == ("completed", 0, 1)
    [incident] = store.incidents.list_incidents(job.id)
    assert incident["end_at"] == T0 + timedelta(seconds=12)
    store.close()


def test_uploaded_file_failed_is_retried(setup, gemini, archive):
    config, store = setup(analysis={"mode": '"original"'}, gemini={"inline_max_mb": 0})
    register(store, archive)
    gemini.file_fails = True
    job = attempt(config, store)
    assert (job.status, job.error_message) == (
        "pending", "uploaded video failed processing at Gemini: Video could not be processed.")


def test_retries_then_failed_with_the_last_error(setup, gemini, archive):
    config, store = setup()
    job_id = register(store, archive)
    gemini.faults = ["503", "500", "not_json"]
    for _ in range(3):
        time.sleep(0.3)  # past the short test backoff
        job = attempt(config, store)
    assert (job.id, job.status, job.retry_count) == (job_id, "failed", 3)
    assert job.error_message.startswith("invalid model output: not JSON")
    store.close()


def analyzer_parts(config):
    """(queue, pauses) on a database of their own, as each analyzer process has."""
    store = Store.from_config(config)
    return store.queue, store.pauses


def run_pool(config, store, n=2):
    """n workers, each with a store of its own as each analyzer process has."""
    workers = [Worker(config, *analyzer_parts(config), f"pool-{i}") for i in range(n)]
    threads = [threading.Thread(target=run_and_close, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    return workers, threads


def stop_pool(workers, threads):
    for worker in workers:
        worker.stopping.set()
    for thread in threads:
        thread.join(30)


def run_and_close(worker):
    try:
        worker.run()
    finally:
        worker.db.close()  # in its own thread: the SQLite watcher is bound to it


def test_pool_pauses_on_daily_quota_and_resumes_when_a_probe_succeeds(setup, gemini, archive):
    config, store = setup(gemini={"pause_probe_minutes": 0.02})  # a probe every 1.2 s
    ids = [store.queue.register("cam1", archive, T0 + timedelta(minutes=i),
                                T0 + timedelta(minutes=i, seconds=12)) for i in range(4)]
    gemini.outage = "429_daily"
    workers, threads = run_pool(config, store)
    try:
        wait_for(lambda: all(w.state.startswith("paused: quota_exhausted") for w in workers))
        probes = len(gemini.generate_requests)
        time.sleep(3)
        assert len(gemini.generate_requests) - probes <= 4  # one probe per interval, not a storm
        assert {(store.reports.get(i).status, store.reports.get(i).retry_count) for i in ids} == {("pending", 0)}
        gemini.outage = None
        wait_for(lambda: all(store.reports.get(i).status == "completed" for i in ids))
        assert store.pauses.provider_state("gemini").paused is False
    finally:
        stop_pool(workers, threads)
    assert {store.reports.get(i).retry_count for i in ids} == {0}
    store.close()


def test_sighup_probe_resumes_a_long_pause_at_once(setup, gemini, archive, monkeypatch):
    config, store = setup()  # probe every 10 minutes
    job_id = register(store, archive)
    gemini.outage = "bad_key"
    workers, threads = run_pool(config, store, n=1)
    try:
        wait_for(lambda: workers[0].state.startswith("paused: bad_key"))
        gemini.outage = None  # the key was fixed
        assert store.pauses.probe_now("gemini") == 1  # what the supervisor does on SIGHUP
        wait_for(lambda: store.reports.get(job_id).status == "completed", 30)
    finally:
        stop_pool(workers, threads)
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


def test_a_failure_while_stopping_hands_the_job_back(setup, gemini, tmp_path):
    """On a stop every process of the unit is signalled, FFmpeg too: its failure then is
    not the footage's, and the job must wait for the next start rather than fail."""
    config, store = setup()
    path = tmp_path / "20261126T080000Z.mp4"
    path.write_bytes(b"\x00garbage" * 1000)  # fails to prepare, as a killed FFmpeg does
    register(store, path)
    worker = Worker(config, store.queue, store.pauses, "test-worker")
    job = store.queue.next_job("test-worker", timeout=5)
    worker.stopping.set()
    worker.process(job)
    job = store.reports.get(job.id)
    assert (job.status, job.error_message, job.retry_count) == ("pending", None, 0)
    assert gemini.generate_requests == []
    store.close()


def test_no_api_key_leaves_jobs_pending(setup, gemini, archive, monkeypatch):
    config, store = setup()
    monkeypatch.delenv("GEMINI_API_KEY")
    job_id = register(store, archive)
    worker = Worker(config, store.queue, store.pauses, "keyless")
    threading_run = __import__("threading").Thread(target=worker.run)
    threading_run.start()
    time.sleep(1.5)
    worker.stopping.set()
    threading_run.join(20)
    job = store.reports.get(job_id)
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
    config, store = setup(analysis={"mode": '"original"'}, gemini={"inline_max_mb": 0})
    job_id = register(store, archive)
    gemini.upload_delay = 5
    doomed = SPAWN.Process(target=analyzer.main, args=(config, 0))
    doomed.start()
    assert gemini.upload_started.wait(60)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join()
    gemini.upload_delay = 0
    assert store.reports.get(job_id).status == "processing"
    rescuer = SPAWN.Process(target=analyzer.main, args=(config, 1))
    rescuer.start()
    deadline = time.time() + 60
    while store.reports.get(job_id).status != "completed" and time.time() < deadline:
        time.sleep(0.5)
    rescuer.terminate()
    rescuer.join(30)
    job = store.reports.get(job_id)
    assert (job.status, job.retry_count, job.incident_count) == ("completed", 1, 1)
    assert job.worker_id.endswith("-analyzer-1")
    assert len(store.incidents.list_incidents(job_id)) == 1
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
    assert answer["safety_score"] == 72 and answer["tokens"]["total"] > 1000
    assert answer["model_version"] == "gemini-3.8-flash" and answer["tokens"]["thoughts"] == 300
    assert answer["incidents"][0]["category"] == "fall"
    assert gemini.files == {}
    text = CliRunner().invoke(main, ["analyze", str(archive), "--config", str(config.source)])
    assert text.output.startswith("safety score 72/100   tokens ")
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
    from vlmguard.vlm import registry
    config, store = setup()
    store.close()
    make = registry.client_maker(config.provider("gemini"))
    first = make()
    assert make() is first
    monkeypatch.setenv("GEMINI_API_KEY", "rotated-key")
    assert make() is not first
    monkeypatch.delenv("GEMINI_API_KEY")
    assert make() is None


@pytest.fixture(scope="module")
def red_archive(tmp_path_factory) -> Path:
    """A 20-s MPEG-TS archive whose picture is solid red from 12 s to 14 s."""
    path = tmp_path_factory.mktemp("red") / "20261126T080000Z.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=10,drawbox=x=0:y=0:w=iw:h=ih:color=red:t=fill:"
                    "enable='between(t,12,13.99)'", "-t", "20", "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "10", "-pix_fmt", "yuv420p", "-f", "mpegts",
                    str(path)], check=True, timeout=120)
    return path


def test_a_window_gone_from_ram_is_cut_from_its_archive(setup, gemini, red_archive):
    """A window whose RAM copy is gone (a reboot, the RAM bound) is analysed from the
    archive part its sources name; offsets count from the window, not the archive."""
    gemini.looks = True
    config, store = setup(analysis={"fps": 1})
    start = T0 + timedelta(seconds=10)
    store.queue.register("cam1", "/nowhere/clip.ffconcat", start, start + timedelta(seconds=10),
                         kind="window", clip_start=start,
                         sources=[{"path": str(red_archive), "offset_s": 10.0, "duration_s": 10.0}])
    job = attempt(config, store)
    assert job.status == "completed", job.error_message
    [incident] = store.incidents.list_incidents(job.id)
    assert abs((incident["start_at"] - (T0 + timedelta(seconds=12))).total_seconds()) <= 1.0
    assert abs((incident["end_at"] - (T0 + timedelta(seconds=13))).total_seconds()) <= 1.0
    text = [p["text"] for p in sent(gemini)["contents"][0]["parts"] if "text" in p][0]
    assert "one 10-second window of a continuous recording" in text
    assert "2026-11-26 08:00:10 UTC" in text


def test_a_window_with_neither_ram_copy_nor_archive_fails_saying_so(setup, gemini, tmp_path):
    config, store = setup()
    store.queue.register("cam1", "/nowhere/clip.ffconcat", T0, T0 + timedelta(seconds=10),
                         kind="window", sources=[{"path": str(tmp_path / "gone.ts"), "offset_s": 0.0,
                                                  "duration_s": 10.0}])
    job = attempt(config, store)
    assert job.status == "failed" and job.error_message.startswith("footage gone")
    assert gemini.calls == []


def test_a_merged_window_missing_a_segment_is_cut_from_its_archive(setup, gemini, red_archive,
                                                                   tmp_path):
    gemini.looks = True
    config, store = setup(analysis={"fps": 1})
    listing = tmp_path / "merged.ffconcat"
    listing.write_text(f"ffconcat version 1.0\nfile '{red_archive}'\nfile '{tmp_path}/gone.ts'\n")
    start = T0 + timedelta(seconds=10)
    store.queue.register("cam1", listing, start, start + timedelta(seconds=10), kind="merged",
                         clip_start=start,
                         sources=[{"path": str(red_archive), "offset_s": 10.0, "duration_s": 10.0}])
    job = attempt(config, store)
    assert job.status == "completed", job.error_message
    [incident] = store.incidents.list_incidents(job.id)
    assert abs((incident["start_at"] - (T0 + timedelta(seconds=12))).total_seconds()) <= 1.0
