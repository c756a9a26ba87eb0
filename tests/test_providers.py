"""Any vision model: the OpenAI-compatible provider through the real openai SDK against our
OpenAI-protocol server, fallback between providers, and no request for a static clip.
Real FFmpeg archives, real SQLite, the real SDKs; every server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vlmguard.analyzer import Worker
from vlmguard.config import load_config
from vlmguard.health import run_dir
from vlmguard.layout import Layout
from vlmguard.status import gather_status, render_status
from vlmguard.store.bundle import Store
from vlmguard.store.records import utcnow

from helpers import wait_for, write_config
from daemon import RunningVlmguard, free_port
from gemini_server import VALID_KEY, FakeGemini
from openai_server import FakeOpenAI

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
LOCAL_MODEL = "qwen2.5vl:7b"


def encode(path: Path, graph: str, seconds: int = 12) -> Path:
    """A 12-s H.264 archive with a keyframe every second, as the streamer makes them."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-filter_complex", graph, "-t", str(seconds),
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p",
                    str(path)], check=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    size = "size=320x180:rate=25"
    return {
        "busy": encode(folder / "busy.mp4", f"testsrc2={size}"),
        "static": encode(folder / "static.mp4", f"color=c=gray:{size}"),
        # Gray for 6 s, then the test pattern: the one change of an otherwise still scene.
        "changes": encode(folder / "changes.mp4", f"color=c=gray:{size}:d=6[a];"
                          f"testsrc2={size}:d=6[b];[a][b]concat=n=2:v=1"),
        # A still scene under sensor noise, and the same with one small figure walking.
        "noisy": encode(folder / "noisy.mp4", "color=c=0x606060:size=640x360:rate=25,"
                        "noise=alls=16:allf=t"),
        "walker": encode(folder / "walker.mp4", "color=c=0x606060:size=640x360:rate=25,"
                         "noise=alls=16:allf=t[bg];color=c=0x803030:size=16x40:rate=25[p];"
                         "[bg][p]overlay=x='t*40':y=150"),
        "rgb": encode(folder / "rgb.mp4", f"color=c=red:{size}:d=4[r];color=c=lime:{size}:d=4[g];"
                      f"color=c=blue:{size}:d=4[b];[r][g][b]concat=n=3:v=1"),
        # One busy 60-s window: 30 distinct keyframes of 640x360 at the default 0.5 fps.
        "minute": encode(folder / "minute.mp4", "testsrc2=size=640x360:rate=25", seconds=60),
    }


@pytest.fixture
def local():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def gemini():
    with FakeGemini() as server:
        yield server


@pytest.fixture
def setup(tmp_path, local, gemini, monkeypatch):
    """(config, store) with an OpenAI-compatible provider "local" and a Gemini "cloud"."""
    monkeypatch.setenv("GEMINI_API_KEY", VALID_KEY)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    made = []

    def make(order=("local",), static_check_minutes=0, local_keys="", local_url=None,
             cloud_keys=""):
        config = load_config(write_config(tmp_path, f"""
            [storage]
            data_dir = "{tmp_path / 'data'}"
            [analysis]
            max_retries = 2
            retry_backoff_seconds = 0.1
            lease_seconds = 5
            poll_seconds = 0.2
            providers = {json.dumps(list(order))}
            static_check_minutes = {static_check_minutes}
            [providers.local]
            kind = "openai"
            model = "{LOCAL_MODEL}"
            base_url = "{local_url or local.base_url}"
            timeout_seconds = 2
            {local_keys}
            [providers.cloud]
            kind = "gemini"
            base_url = "{gemini.base_url}"
            timeout_seconds = 60
            {cloud_keys}
            [[cameras]]
            id = "cam1"
            url = "lavfi:testsrc2"
            prompt = "Loading bay with forklifts."
        """))
        # The RAM folder marked as this test's (other sessions' clean-ups leave it alone).
        Layout(config.data_dir).make_dirs("cam1")
        store = Store.from_config(config)
        made.append(store)
        return config, store
    yield make
    for store in made:
        store.close()


def run_job(config, store, clip: Path, start: datetime = T0, worker: Worker | None = None,
            seconds: int = 12):
    """Register one clip and let a worker process it, as its loop does."""
    store.queue.register("cam1", clip, start, start + timedelta(seconds=seconds), max_retries=2)
    worker = worker or Worker(config, store.queue, store.pauses, "test-worker")
    job = store.queue.next_job("test-worker", timeout=5)
    assert job is not None
    worker.process(job)
    return store.reports.get(job.id)


# -- the OpenAI-compatible provider ---------------------------------------------------------

def test_frames_go_as_labelled_jpegs_with_a_strict_schema(setup, local, clips):
    config, store = setup()
    job = run_job(config, store, clips["busy"])
    assert job.status == "completed", job.error_message
    assert (job.provider, job.model, job.model_version) == ("local", LOCAL_MODEL, LOCAL_MODEL)
    [request] = local.requests
    # The copy's keyframes at 0.5 fps, all different: six JPEGs 360 px high, each labelled.
    assert [i["height"] for i in request["images"]] == [360] * 6
    assert [t for t in request["texts"] if t.startswith("Frame at")] == [
        f"Frame at {s:.1f} s:" for s in (0, 2, 4, 6, 8, 10)]
    assert request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["strict"] is True
    # The task comes last, after every frame: a server that cuts the middle keeps it.
    kinds = [kind for kind, _ in request["parts"]]
    assert kinds == ["text", "image"] * 6 + ["text"]
    assert "Loading bay with forklifts." in request["texts"][-1]
    assert "safety_score" in request["texts"][-1]
    assert request["temperature"] == 0.1 and request["max_tokens"] <= 2048
    usage = request["usage"]
    assert (job.prompt_tokens, job.output_tokens, job.total_tokens) == (
        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
    assert job.analysis_result["incidents"][0]["category"] == "fall"
    assert store.incidents.list_incidents(job.id)[0]["start_at"] == T0 + timedelta(seconds=3)


def test_max_images_picks_frames_evenly(setup, local, clips):
    config, store = setup(local_keys="max_images = 3")
    job = run_job(config, store, clips["busy"])
    assert job.status == "completed", job.error_message
    assert [t for t in local.requests[0]["texts"] if t.startswith("Frame at")] == [
        "Frame at 0.0 s:", "Frame at 4.0 s:", "Frame at 10.0 s:"]


def test_server_without_json_schema_gets_json_mode_checked_by_us(setup, local, clips):
    config, store = setup()
    local.schema_support = False
    worker = Worker(config, store.queue, store.pauses, "w")
    for n in range(2):
        store.queue.register("cam1", clips["busy"], T0 + timedelta(minutes=10 * n),
                             T0 + timedelta(minutes=10 * n, seconds=12))
        worker.process(store.queue.next_job("w", timeout=5))
    assert [j.status for j in store.reports.list_jobs()] == ["completed", "completed"]
    # One refused json_schema request, then JSON mode for the life of the client.
    assert [(r["status"], r["response_format"]["type"]) for r in local.requests] == [
        (400, "json_schema"), (200, "json_object"), (200, "json_object")]
    assert '"safety_score"' in local.requests[1]["texts"][-1]  # the schema is in the prompt
    # An answer that breaks the contract is still refused, by vlmguard's own check.
    local.answer = {"summary": "fine", "incidents": [], "safety_score": 150}
    store.queue.register("cam1", clips["busy"], T0 + timedelta(hours=1),
                         T0 + timedelta(hours=1, seconds=12), max_retries=2)
    worker.process(store.queue.next_job("w", timeout=5))
    [bad] = store.reports.list_jobs(states=["pending"])
    assert bad.retry_count == 1
    assert "invalid model output: safety_score must be an integer 0-100" in bad.error_message


def tile_colour(pixels: bytes, width: int, x: int, y: int) -> tuple[int, int, int]:
    at = (y * width + x) * 3
    return tuple(pixels[at:at + 3])


def test_grid_is_one_image_whose_tiles_are_the_frames(setup, local, clips, tmp_path):
    config, store = setup(local_keys='images = "grid"')
    local.one_image_per_message = True  # a server that takes a single image
    job = run_job(config, store, clips["rgb"])
    assert job.status == "completed", job.error_message
    [request] = local.requests
    [image] = request["images"]
    # Three distinct frames (red, green, blue) of the 360-px copy: a 2x2 grid of 640x360
    # tiles, 4 px apart.
    assert (image["width"], image["height"]) == (2 * 640 + 4, 2 * 360 + 4)
    assert any("0.0 s, 4.0 s, 8.0 s" in t for t in request["texts"])
    grid = tmp_path / "grid.jpg"
    grid.write_bytes(image["data"])
    pixels = subprocess.run(["ffmpeg", "-v", "error", "-i", str(grid), "-f", "rawvideo",
                             "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    width = image["width"]
    centres = [tile_colour(pixels, width, 320 + 644 * col, 200 + 364 * row)
               for row, col in ((0, 0), (0, 1), (1, 0), (1, 1))]
    dominant = [max(range(3), key=lambda c: rgb[c]) if max(rgb) > 128 else None
                for rgb in centres]
    assert dominant == [0, 1, 2, None], centres  # red, green, blue, then an empty tile
    # Each tile's time is burned into its top-left corner: the label box darkens the red.
    label = tile_colour(pixels, width, 12, 12)
    assert label[0] < centres[0][0] - 60, (label, centres[0])


# -- fallback --------------------------------------------------------------------------------

# What a provider can do wrong, and what it is recorded as; the clip goes to the next.
FALLBACK_FAULTS = {
    "500": "chat: HTTP 500", "503": "chat: HTTP 503", "timeout": "chat: timed out after 2 s",
    "down": "chat: cannot connect",
    # A byte every half second: the total deadline ends it, not a per-read timeout.
    "drip": "chat: timed out after 2 s",
    "nonjson": "invalid model output: not JSON",
    "html": "malformed response from the server (AttributeError",
    "shape": "malformed response from the server (AttributeError",
    "nested": "invalid model output: JSON nested too deeply",
    "huge": "chat: connection failed (answer larger than 2,097,152 bytes, not read further)",
    "400": "chat: HTTP 400: Invalid 'messages[0].content[1].image_url.url'",
    "refusal": "refused by the model: I can't help with that request.",
}


@pytest.mark.parametrize("fault", FALLBACK_FAULTS)
def test_failing_first_provider_hands_the_clip_to_the_next(setup, local, gemini, clips, fault):
    down = f"http://127.0.0.1:{free_port()}/v1" if fault == "down" else None
    config, store = setup(order=("local", "cloud"), local_url=down)
    local.hang_seconds = 5  # the client gives up after timeout_seconds = 2
    local.faults = [] if fault == "down" else [fault]
    started = time.monotonic()
    job = run_job(config, store, clips["busy"])
    assert time.monotonic() - started < 20
    assert (job.status, job.retry_count, job.provider) == ("completed", 0, "cloud")
    assert job.model == "gemini-3.8-flash" and len(gemini.generate_requests) == 1
    shared = store.pauses.provider_state("local")
    assert shared.failures == 1 and not shared.paused
    assert shared.last_error.startswith(FALLBACK_FAULTS[fault]), shared.last_error


def test_rate_limited_or_paused_provider_is_skipped_without_a_failure(setup, local, gemini, clips):
    config, store = setup(order=("local", "cloud"))
    local.faults = ["429"]
    first = run_job(config, store, clips["busy"])
    assert first.provider == "cloud"
    shared = store.pauses.provider_state("local")
    assert shared.failures == 0 and shared.not_before is not None  # Retry-After: 2
    local.faults = ["quota"]
    time.sleep(2.1)
    second = run_job(config, store, clips["busy"], T0 + timedelta(minutes=10))
    assert second.provider == "cloud" and store.pauses.provider_state("local").reason == "quota_exhausted"
    asked = len(local.requests)
    third = run_job(config, store, clips["busy"], T0 + timedelta(minutes=20))
    assert third.provider == "cloud" and len(local.requests) == asked  # paused: not asked


def test_every_provider_failing_costs_one_retry_and_names_each(setup, local, gemini, clips):
    config, store = setup(order=("local", "cloud"))
    local.faults = ["500"]
    gemini.faults = ["500"]
    job = run_job(config, store, clips["busy"])
    assert (job.status, job.retry_count) == ("pending", 1)
    assert job.error_message.startswith("local: chat: HTTP 500"), job.error_message
    assert "; cloud: generate: HTTP 500" in job.error_message


def test_every_provider_paused_puts_the_job_back_uncharged(setup, local, gemini, clips):
    config, store = setup(order=("local", "cloud"))
    local.faults = ["quota"]
    gemini.faults = ["429_daily"]
    job = run_job(config, store, clips["busy"])
    assert (job.status, job.retry_count, job.error_message) == ("pending", 0, None)
    assert {p.provider: p.reason for p in store.pauses.paused_providers()} == {
        "local": "quota_exhausted", "cloud": "quota_exhausted"}
    worker = Worker(config, store.queue, store.pauses, "other")
    assert worker.held_back()
    assert worker.state.startswith("paused: local: quota_exhausted")


# -- real servers: Ollama, vLLM, llama.cpp, GPT-5 --------------------------------------------------

def test_ollama_mode_cuts_the_middle_and_answers_without_a_task_it_lost(local, clips):
    """The stand-in is as unkind as Ollama: a prompt whose task comes first, over the
    context, loses its task and is still answered, "safe"; nothing says so but the usage."""
    import base64
    from openai import OpenAI
    local.mode = "ollama"
    frame = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clips["busy"]), "-frames:v", "1",
                            "-vf", "scale=640:360", "-f", "image2", "-c:v", "mjpeg", "-"],
                           capture_output=True, check=True).stdout
    picture = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                  + base64.b64encode(frame).decode()}}
    task = {"type": "text", "text": "Review the frames. Answer with safety_score 0-100."}
    client = OpenAI(api_key="x", base_url=local.base_url, max_retries=0)
    answer = client.chat.completions.create(model=LOCAL_MODEL, messages=[
        {"role": "user", "content": [task] + [picture] * 20}])
    request = local.requests[-1]
    assert request["truncated"] and not request["task_seen"]
    assert answer.usage.prompt_tokens == request["prompt_kept"] <= 4096 < request["prompt_sent"]
    assert json.loads(answer.choices[0].message.content)["safety_score"] == 100
    assert request["temperature_used"] == 1.0  # nothing sent: Ollama samples at 1.0


MODES = {
    # mode: (server settings, provider keys, requests for the first window)
    "ollama": ({"mode": "ollama"}, "", 1),  # context_tokens' default is Ollama's 4,096
    "ollama_16k_claimed": ({"mode": "ollama"}, "context_tokens = 16384", 2),
    "vllm": ({"mode": "vllm"}, "context_tokens = 16384", 2),
    "vllm_one_image": ({"mode": "vllm", "mm_limit": 1}, "", 2),
    "llamacpp": ({"mode": "llamacpp", "n_ctx": 4096}, "context_tokens = 16384", 2),
    "gpt5": ({"mode": "gpt5"}, "context_tokens = 400000", 3),
}


@pytest.mark.parametrize("name", MODES)
def test_local_server_modes_are_answered_by_the_provider_itself(setup, local, clips, name):
    """Each real server's way of refusing or cutting a request costs the first window a
    request or two, is remembered, and nothing fails or is stored from a cut prompt."""
    settings, keys, first = MODES[name]
    for key, value in settings.items():
        setattr(local, key, value)
    config, store = setup(local_keys=keys)
    if name == "gpt5":
        config = replace_model(config, "local", "gpt-5-mini")
    worker = Worker(config, store.queue, store.pauses, "w")
    jobs = [run_job(config, store, clips["minute"], T0 + timedelta(minutes=n), worker, seconds=60)
            for n in range(2)]
    assert [(j.status, j.retry_count, j.provider) for j in jobs] == [("completed", 0, "local")] * 2
    assert [j.analysis_result["request"]["requests"] for j in jobs] == [first, 1]
    assert len(local.requests) == first + 1
    answered = local.answered
    assert all(r.get("task_seen", True) for r in answered)
    assert "test pattern" not in " ".join(j.analysis_result["summary"] for j in jobs)
    last = local.requests[-1]
    if name.startswith("ollama"):
        assert not last["truncated"] and last["temperature_used"] == 0.1
        assert last["prompt_kept"] <= 4096 - 768
    if name == "gpt5":
        assert "max_tokens" not in last["params"] and "temperature" not in last["params"]
        assert jobs[1].thoughts_tokens == 64
        assert jobs[1].analysis_result["request"]["cached_tokens"] == 1024
        assert set(worker.adapted["local"]) == {"max_tokens", "temperature"}
    elif first > 1:
        assert worker.adapted["local"], "the adaptation is noted for status"
    if name == "vllm":
        assert last["prompt_sent"] + last["max_tokens"] <= 8192
        assert len(last["images"]) == 20  # 8,192 holds all twenty
    if name == "vllm_one_image":
        assert len(last["images"]) == 1 and jobs[1].analysis_result["request"]["grid"]
    if name == "ollama_16k_claimed":
        assert local.requests[0]["truncated"]  # the cut request: its answer was not used
        assert jobs[0].prompt_tokens == sum(r["usage"]["prompt_tokens"]
                                            for r in local.requests[:2])  # both were paid
        assert "the server kept" in worker.adapted["local"]["context"]


def replace_model(config, name, model):
    from dataclasses import replace as swap
    providers = tuple(swap(p, model=model) if p.name == name else p for p in config.providers)
    return swap(config, providers=providers)


def test_a_misconfigured_provider_is_put_aside_and_the_next_answers(setup, local, gemini, clips):
    local.mode = "misconfigured"  # every request a 400, probes too
    config, store = setup(order=("local", "cloud"))
    worker = Worker(config, store.queue, store.pauses, "w")
    jobs = [run_job(config, store, clips["busy"], T0 + timedelta(minutes=n), worker)
            for n in range(4)]
    assert [(j.status, j.retry_count, j.provider) for j in jobs] == [("completed", 0, "cloud")] * 4
    assert len(local.requests) == 3  # the fourth window did not ask it
    pause = store.pauses.provider_state("local")
    assert pause.reason == "misconfigured"
    assert pause.detail.startswith("chat: HTTP 400: image input is not supported - hint:")
    text = render_status(gather_status(config, store))
    assert "PAUSED (local) since" in text and "image input is not supported" in text
    assert store.pauses.probe_now("local") == 1  # SIGHUP: probed at once, refused again
    assert worker.blocked("local") is not None and store.pauses.provider_state("local").paused
    local.mode = None  # the server was started with its --mmproj
    store.pauses.probe_now("local")
    assert worker.blocked("local") is None
    assert run_job(config, store, clips["busy"], T0 + timedelta(hours=1), worker).provider == "local"


@pytest.mark.parametrize("fault", ["429_huge", "429_date"])
def test_absurd_retry_after_is_one_capped_shared_wait(setup, local, gemini, clips, fault):
    config, store = setup(order=("local", "cloud"), local_keys="max_retry_wait_seconds = 30")
    local.faults = [fault]
    job = run_job(config, store, clips["busy"])
    assert (job.status, job.retry_count, job.provider) == ("completed", 0, "cloud")
    shared = store.pauses.provider_state("local")
    assert shared.failures == 0 and 25 < (shared.not_before - utcnow()).total_seconds() <= 30


def test_absurd_retry_after_on_a_5xx_bounds_the_jobs_retry(setup, local, clips):
    config, store = setup(local_keys="max_retry_wait_seconds = 30")
    local.faults = ["503_huge"]
    job = run_job(config, store, clips["busy"])
    assert (job.status, job.retry_count) == ("pending", 1)
    assert 25 < (job.run_after - utcnow()).total_seconds() <= 30


def test_answers_are_bounded_and_cleaned_whatever_the_provider(setup, local, clips):
    config, store = setup()
    local.faults = ["long"]
    job = run_job(config, store, clips["busy"])
    assert job.status == "completed", job.error_message
    assert len(job.analysis_result["summary"]) == 2000
    assert "\x00" not in job.analysis_result["summary"]
    [incident] = store.incidents.list_incidents(job.id)
    assert incident["description"].startswith("A person falls.[31my")  # NUL, ESC, U+202E gone
    assert incident["description"].endswith("\u2026[truncated]") and len(incident["description"]) == 1000
    assert incident["category"] == "other"  # "fall\a zzz..." is no known category
    local.faults = ["many"]
    job = run_job(config, store, clips["busy"], T0 + timedelta(hours=1))
    incidents = store.incidents.list_incidents(job.id)
    assert len(incidents) == job.incident_count == 50
    assert sum(i["severity"] == "critical" for i in incidents) == 5  # the worst are kept


def test_retry_hints_are_bounded_whatever_their_form():
    from vlmguard.vlm import retry_hint
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert retry_hint("2", 3600) == (2.0, 2.0)
    assert retry_hint("58s", 3600) == (58.0, 58.0)  # Gemini's RetryInfo form
    assert retry_hint("1e12", 3600) == (3600.0, 1e12)
    assert retry_hint("99999999999", 30) == (30.0, 99999999999.0)  # fits a date: year 5195
    assert retry_hint("inf", 30) == (30.0, float("inf"))
    assert retry_hint("-5", 30) == (0.0, -5.0)
    assert retry_hint("nan", 30) is None and retry_hint("soon", 30) is None
    assert retry_hint("Tue, 01 Dec 2026 00:00:10 GMT", 3600, now) == (10.0, 10.0)
    assert retry_hint("Fri, 31 Dec 9999 23:59:59 GMT", 3600, now)[0] == 3600.0


def test_answers_that_cannot_be_stored_are_refused_not_crashed_on():
    from vlmguard.vlm import AnalysisError, check_answer, parse_answer
    incident = {"start_offset_s": 1, "end_offset_s": 2, "category": "fall", "severity": "high",
                "description": "x", "confidence": 0.5}
    for text in ('{"safety_score": 1e400, "summary": "", "incidents": []}',
                 '{"safety_score": 50, "summary": "", "incidents": [%s]}'
                 % json.dumps(dict(incident, start_offset_s=10**400)),
                 "[" * 1000 + "]" * 1000, "x" * 300_000):
        with pytest.raises(AnalysisError, match="invalid model output"):
            check_answer(parse_answer(text), 60)
    lone = check_answer(parse_answer('{"safety_score": 50, "summary": "a\\ud800b\\u0000c", '
                                     '"incidents": []}'), 60)
    assert lone.summary == "abc"  # a lone surrogate and NUL would break PostgreSQL


# -- no request for a static clip --------------------------------------------------------------

def test_static_scene_is_sent_once_per_static_check(setup, local, clips):
    config, store = setup(static_check_minutes=30)
    jobs = [run_job(config, store, clips["static"], T0 + timedelta(minutes=10 * n))
            for n in range(7)]  # an hour of 10-minute archives of a still scene
    sent = [j.segment_start.minute + 60 * (j.segment_start.hour - 8) for j in jobs if j.provider]
    assert sent == [0, 30, 60]  # the first clip, then once per 30 minutes
    assert len(local.requests) == 3
    for job in jobs:
        assert job.status == "completed"
        if not job.provider:
            assert job.analysis_result == {"safety_score": 100, "summary": "no activity",
                                           "incidents": []}
            assert (job.total_tokens, job.prompt_tokens, job.incident_count, job.model) == \
                (0, 0, 0, None)


def test_active_and_changing_scenes_are_sent_every_time(setup, local, clips):
    config, store = setup(static_check_minutes=30)
    assert run_job(config, store, clips["static"]).provider == "local"  # first clip
    quiet = run_job(config, store, clips["static"], T0 + timedelta(minutes=10))
    assert quiet.provider is None
    changed = run_job(config, store, clips["changes"], T0 + timedelta(minutes=20))
    assert changed.provider == "local"  # the clip in which the scene changes
    [request] = local.requests[1:]
    # The duplicates are dropped: the gray frames once, then each new test-pattern frame.
    assert [t for t in request["texts"] if t.startswith("Frame at")] == [
        "Frame at 0.0 s:", "Frame at 6.0 s:", "Frame at 8.0 s:", "Frame at 10.0 s:"]
    busy = [run_job(config, store, clips["busy"], T0 + timedelta(minutes=30 + 10 * n))
            for n in range(3)]
    assert [j.provider for j in busy] == ["local"] * 3
    assert len(local.requests) == 5


def test_sensor_noise_is_no_activity_but_a_small_figure_walking_is(setup, local, clips):
    config, store = setup(static_check_minutes=30)
    assert run_job(config, store, clips["noisy"]).provider == "local"  # the first clip
    assert run_job(config, store, clips["noisy"], T0 + timedelta(minutes=10)).provider is None
    walker = run_job(config, store, clips["walker"], T0 + timedelta(minutes=20))
    assert walker.provider == "local"
    assert len(local.requests[-1]["images"]) == 6  # every keyframe shows it somewhere new


def test_static_check_shows_a_video_model_one_picture(setup, gemini, clips):
    """The periodic look at a still camera asks whether it still sees: one frame, not ten
    minutes of the same picture billed by the second."""
    config, store = setup(order=("cloud",), static_check_minutes=30)
    still = run_job(config, store, clips["static"])
    busy = run_job(config, store, clips["busy"], T0 + timedelta(minutes=10))
    assert (still.provider, busy.provider) == ("cloud", "cloud")
    first, second = (request["contents"][0]["parts"] for request in gemini.generate_requests)
    metadata = first[0].get("videoMetadata") or first[0]["video_metadata"]
    assert metadata["fps"] == 1.0
    assert "did not change at all during the whole 12-second recording" in first[1]["text"]
    assert still.prompt_tokens < busy.prompt_tokens
    assert still.total_tokens < busy.total_tokens


def test_gating_off_sends_every_static_clip(setup, local, clips):
    config, store = setup(static_check_minutes=0)
    jobs = [run_job(config, store, clips["static"], T0 + timedelta(minutes=10 * n))
            for n in range(3)]
    assert [j.provider for j in jobs] == ["local"] * 3
    assert [len(r["images"]) for r in local.requests] == [1, 1, 1]


# -- end to end: `vlmguard run` ----------------------------------------------------------------

def test_run_falls_back_while_the_local_model_is_down_and_gates_a_still_camera(
        tmp_path, local, gemini):
    local.outage = "503"
    daemon = RunningVlmguard(
        tmp_path, None, workers=1, analysis="static_check_minutes = 0.5",
        extra=f"""
[providers.local]
kind = "openai"
model = "{LOCAL_MODEL}"
base_url = "{local.base_url}"
timeout_seconds = 5
[providers.cloud]
kind = "gemini"
base_url = "{gemini.base_url}"
timeout_seconds = 60
""", cameras="""
[[cameras]]
id = "cam1"
url = "lavfi:testsrc2=size=320x240:rate=25"
[[cameras]]
id = "still"
url = "lavfi:color=c=gray:size=320x240:rate=25"
""", env={"GEMINI_API_KEY": VALID_KEY}).start()
    config = load_config(daemon.config_path)
    try:
        daemon.wait_live()
        with Store.from_config(config) as store:
            def answered(camera, provider):
                return [j for j in store.reports.list_jobs(camera_id=camera, states=["completed"])
                        if j.provider == provider]
            wait_for(lambda: answered("cam1", "cloud"), 60, "a clip answered by cloud", daemon)
            local.outage = None  # the GPU box is back
            wait_for(lambda: answered("cam1", "local"), 60, "a clip answered by local", daemon)
            wait_for(lambda: len(store.reports.list_jobs(camera_id="still", states=["completed"])) >= 4,
                     60, "four clips of the still camera", daemon)
            report = gather_status(config, store)
        text = render_status(report)
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        daemon.stop()
    with Store.from_config(config) as store:
        still = sorted(store.reports.list_jobs(camera_id="still", states=["completed"]),
                       key=lambda j: j.segment_start)
        cam1 = store.reports.list_jobs(camera_id="cam1", states=["completed"])
    # The busy camera: every clip went to a model, and the job table says which.
    assert all(j.provider in ("local", "cloud") for j in cam1)
    assert {j.model for j in cam1 if j.provider == "local"} == {LOCAL_MODEL}
    # The still camera: requests at least 30 s of footage apart, "no activity" between.
    sent = [j.segment_start for j in still if j.provider]
    assert sent and all(b - a >= timedelta(seconds=30) for a, b in zip(sent, sent[1:]))
    quiet = [j for j in still if not j.provider]
    assert quiet and all(j.analysis_result["summary"] == "no activity" and j.total_tokens == 0
                         for j in quiet)
    providers = report["analysis"]["providers"]
    assert providers["local"]["failed"] >= 1 and providers["local"]["answered"] >= 1
    assert providers["cloud"]["answered"] >= 1
    assert "provider  local: answered" in text and "provider  cloud: answered" in text
    assert re.search(r'^vlmguard_provider_answered_total\{provider="local"\} [1-9]', metrics, re.M)
    assert re.search(r'^vlmguard_provider_failures_total\{provider="local"\} [1-9]', metrics, re.M)
    assert re.search(r'^vlmguard_model_tokens_total\{camera="still",kind="total"\} ', metrics, re.M)


# -- end to end: real servers' ways and a provider's faults, one daemon -------------------------

class LiveWatch:
    """Asks a camera's live playlist every half second, from a thread, until stopped."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.answers: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.wait(0.5):
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        self.answers.append(response.status)
                except OSError as exc:
                    self.answers.append(getattr(exc, "code", 0) or 0)

    def __enter__(self) -> "LiveWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.done.is_set():
            self.done.set()
            self.thread.join(10)


def test_run_with_real_server_ways_and_model_faults(tmp_path, gemini):
    """`vlmguard run` with two cameras, each with its own OpenAI-compatible server first
    and Gemini second. dock's server behaves as vLLM, then Ollama, then GPT-5 (each
    window answered by that server itself, nothing failed, nothing stored that was
    answered without the task), then misconfigured (put aside after three windows, the
    next provider answers, status says why, SIGHUP probes it back). yard's server meanwhile
    sends absurd Retry-After hints, drips bytes, answers 5 MB, HTML, wrongly shaped JSON
    and over-long texts, and Gemini an absurd RetryInfo: the live playlists answer 200
    throughout, the streamer keeps its pid, no analyzer restarts, no job fails."""
    with FakeOpenAI() as edge, FakeOpenAI() as spare:
        edge.mode, edge.max_model_len = "vllm", 4096
        spare.faults = ["429_huge", "drip", "huge", "html", "shape", "long", "503_huge",
                        "nested"]
        daemon = RunningVlmguard(
            tmp_path, None, workers=2, window_seconds=10,
            analysis="fps = 1\nstatic_check_minutes = 0\nmax_lag_seconds = 3600",
            extra=f"""
[providers.edge]
kind = "openai"
model = "{LOCAL_MODEL}"
base_url = "{edge.base_url}"
timeout_seconds = 3
context_tokens = 16384
pause_probe_minutes = 60
[providers.spare]
kind = "openai"
model = "{LOCAL_MODEL}"
base_url = "{spare.base_url}"
timeout_seconds = 3
max_retry_wait_seconds = 15
context_tokens = 32768
[providers.cloud]
kind = "gemini"
base_url = "{gemini.base_url}"
timeout_seconds = 60
max_retry_wait_seconds = 15
price_input_per_million = 0.75
price_output_per_million = 3.75
""", cameras="""
[[cameras]]
id = "dock"
url = "lavfi:testsrc2=size=640x360:rate=25"
providers = ["edge", "cloud"]
[[cameras]]
id = "yard"
url = "lavfi:testsrc2=size=640x360:rate=25"
providers = ["spare", "cloud"]
""", env={"GEMINI_API_KEY": VALID_KEY}).start()
        config = load_config(daemon.config_path)
        try:
            daemon.wait_live("dock")
            daemon.wait_live("yard")
            streamer = daemon.child_pid("streamer")
            live = LiveWatch([daemon.url("dock"), daemon.url("yard")])
            with live, Store.from_config(config) as store:
                def answered_by(provider, mode=None, server=edge):
                    return [r for r in server.requests if r["status"] == 200
                            and (mode is None or r["mode"] == mode)] and \
                        [j for j in store.reports.list_jobs(states=["completed"]) if j.provider == provider]

                for mode, settle in (("vllm", None), ("ollama", 2048), ("gpt5", None)):
                    edge.mode = mode
                    if settle:
                        edge.num_ctx = settle
                    wait_for(lambda: any(r["status"] == 200 and r["mode"] == mode
                                         for r in edge.requests), 60,
                             f"a window answered by the {mode} server", daemon)
                edge.mode = "misconfigured"
                wait_for(lambda: (store.pauses.provider_state("edge") or 0) and
                         store.pauses.provider_state("edge").reason == "misconfigured", 90,
                         "edge put aside", daemon)
                aside = len(edge.requests)
                cloud_before = len([j for j in store.reports.list_jobs(camera_id="dock",
                                                                      states=["completed"])
                                    if j.provider == "cloud"])
                gemini.faults = ["429_huge"]
                wait_for(lambda: len([j for j in store.reports.list_jobs(camera_id="dock",
                                                                        states=["completed"])
                                      if j.provider == "cloud"]) > cloud_before + 1, 60,
                         "dock's windows answered by cloud", daemon)
                wait_for(lambda: not spare.faults, 120, "every fault of spare's sent", daemon)
                wait_for(lambda: [r for r in spare.requests[-3:] if r["status"] == 200
                                  and r.get("fault") is None], 60, "spare answering again",
                         daemon)
                status = subprocess.run([sys.executable, "-m", "vlmguard", "status", "--config",
                                         str(daemon.config_path)], capture_output=True,
                                        text=True, timeout=60).stdout
                report = gather_status(config, store)
                with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/api/status",
                                            timeout=30) as response:
                    console = json.loads(response.read())
                assert daemon.child_pid("streamer") == streamer
                supervisor = json.loads((run_dir(daemon.data_dir) / "supervisor.json").read_text())
                restarts = {name: c["restarts"] for name, c in supervisor["children"].items()}
                live.__exit__()  # SIGHUP restarts every child, the streamer too
                # The server is fixed; SIGHUP probes edge at once.
                edge.mode = None
                daemon.proc.send_signal(signal.SIGHUP)
                wait_for(lambda: len(edge.answered) > 0 and not store.pauses.provider_state("edge").paused,
                         60, "edge back after SIGHUP", daemon)
                failed = store.reports.list_jobs(states=["failed"])
                jobs = store.reports.list_jobs(states=["completed"])
        finally:
            daemon.stop()
    assert failed == [], [j.error_message for j in failed]
    assert set(restarts.values()) == {0}, restarts
    assert live.answers and set(live.answers) == {200}, sorted(set(live.answers))
    # edge: every mode answered by edge itself; nothing from a prompt that lost its task.
    summaries = " ".join(j.analysis_result["summary"] for j in jobs)
    assert "test pattern" not in summaries
    assert all(r["task_seen"] for r in edge.requests if r["mode"] == "ollama" and r["status"] == 200)
    assert len(edge.requests) - aside <= 2  # aside: asked again only by a probe (and SIGHUP's)
    assert "misconfigured" in status and "image input is not supported" in status
    assert report["analysis"]["paused"][0]["provider"] == "edge"
    assert report["analysis"]["adapted"]["edge"]["context"]  # what edge's client learned
    # The console's cost: input and output priced apart, thoughts billed as output.
    cloud = console["cost_today"]["cloud"]
    assert cloud["input_tokens"] > 0 and cloud["output_tokens"] > 0
    assert cloud["cost"] == pytest.approx(cloud["input_tokens"] / 1e6 * 0.75
                                          + cloud["output_tokens"] / 1e6 * 3.75, abs=1e-6)
    assert console["cost_today"]["edge"]["cost"] is None  # no price set: none made up
    # yard: every fault went to the next provider; the over-long answer was stored cut.
    yard = [j for j in jobs if j.camera_id == "yard"]
    assert {j.provider for j in yard} == {"spare", "cloud"}
    assert any(len(j.analysis_result["summary"]) == 2000 for j in yard if j.provider == "spare"), (
        [(r["status"], r.get("fault")) for r in spare.requests],
        [(j.provider, len(j.analysis_result["summary"])) for j in yard])
    last_errors = store_errors(config)
    assert "spare" in last_errors
    assert not any(error.startswith("unexpected") for error in last_errors.values())
    events = daemon.log_events()
    assert any(e.get("event") == "rate limited, every analyzer waits" and e.get("seconds") == 15
               for e in events)
    assert not any(e.get("event") == "unexpected error" for e in events)


def store_errors(config) -> dict[str, str]:
    with Store.from_config(config) as store:
        return {p.provider: p.last_error or "" for p in store.pauses.provider_states()}
