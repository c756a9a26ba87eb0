"""The REST API and /metrics, over a real SQLite job table, through aiohttp's test client."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from vlmguard.config import load_config
from vlmguard.web import create_app
from vlmguard.store.bundle import Store
from vlmguard.store.records import IncidentRecord, Outcome

from helpers import write_config

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
SEVERITY_OF = ["low", "medium", "high", "critical"]


@pytest.fixture
def config(tmp_path):
    config = load_config(write_config(tmp_path, f"""
        [server]
        token = "tok"
        [storage]
        data_dir = "{tmp_path / 'data'}"
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
        [[cameras]]
        id = "cam2"
        url = "lavfi:testsrc2"
    """))
    with Store.from_config(config) as store:
        for n in range(12):
            camera = "cam1" if n % 3 else "cam2"
            start = T0 + timedelta(minutes=10 * n)
            store.queue.register(camera, f"/{camera}/{n}.mp4", start, start + timedelta(minutes=10))
            job = store.queue.claim("w")
            if n < 8:
                store.queue.complete(job, Outcome(result={"n": n}, safety_score=90 - n, prompt_tokens=100,
                                                  output_tokens=10, total_tokens=110, incidents=[
                    IncidentRecord(start + timedelta(seconds=5), start + timedelta(seconds=9), "fall",
                                         SEVERITY_OF[n % 4], f"incident {n}", 0.5)]))
            elif n < 10:
                store.queue.fail(job, "HTTP 400 INVALID_ARGUMENT", permanent=True)
            else:
                store.queue.release(job)
    return config


def call(config, path, token="tok"):
    async def go():
        async with TestClient(TestServer(create_app(config))) as client:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await client.get(path, headers=headers)
            return response.status, response.headers, await response.text()
    return asyncio.run(go())


def as_json(config, path):
    status, _, body = call(config, path)
    return status, json.loads(body)


@pytest.mark.parametrize("path", ["/api/health", "/api/cameras", "/api/jobs", "/api/jobs/1",
                                  "/api/incidents", "/metrics"])
def test_every_endpoint_needs_the_token(config, path):
    assert call(config, path, token=None)[0] == 401
    assert call(config, path, token="wrong")[0] == 401
    assert call(config, path)[0] in (200, 503)
    assert call(config, path + ("&" if "?" in path else "?") + "token=tok", token=None)[0] in (200, 503)


def test_health_is_503_with_reasons_when_degraded(config):
    status, body = as_json(config, "/api/health")
    assert status == 503 and body["healthy"] is False
    assert "daemon not running" in body["problems"]
    assert "2 job(s) failed in the last 24 h" in body["problems"]
    assert body["jobs"] == {"pending": 2, "processing": 0, "completed": 8, "failed": 2}


def test_cameras(config):
    status, body = as_json(config, "/api/cameras")
    assert status == 200
    assert [(c["id"], c["online"], c["hls_url"]) for c in body["cameras"]] == [
        ("cam1", False, "http://127.0.0.1:8080/live/cam1/index.m3u8"),
        ("cam2", False, "http://127.0.0.1:8080/live/cam2/index.m3u8")]


def test_jobs_pagination_and_filters(config):
    status, body = as_json(config, "/api/jobs?limit=5")
    assert status == 200 and body["total"] == 12 and [j["id"] for j in body["jobs"]] == [12, 11, 10, 9, 8]
    _, page = as_json(config, "/api/jobs?limit=5&offset=10")
    assert [j["id"] for j in page["jobs"]] == [2, 1]
    _, empty = as_json(config, "/api/jobs?offset=100")
    assert empty["jobs"] == [] and empty["total"] == 12
    _, failed = as_json(config, "/api/jobs?state=failed")
    assert failed["total"] == 2 and {j["status"] for j in failed["jobs"]} == {"failed"}
    _, mixed = as_json(config, "/api/jobs?state=failed,pending&camera=cam1")
    assert {(j["status"], j["camera_id"]) for j in mixed["jobs"]} <= {("failed", "cam1"), ("pending", "cam1")}
    assert mixed["total"] == len(mixed["jobs"]) > 0


@pytest.mark.parametrize("query,parameter", [
    ("/api/jobs?limit=0", "limit"), ("/api/jobs?limit=501", "limit"), ("/api/jobs?limit=ten", "limit"),
    ("/api/jobs?offset=-1", "offset"), ("/api/jobs?state=done", "state"),
    ("/api/jobs?camera=nope", "camera"), ("/api/incidents?since=yesterday", "since"),
    ("/api/incidents?severity=dire", "severity"), ("/api/jobs/abc", "id"),
])
def test_bad_parameters_are_400_naming_them(config, query, parameter):
    status, body = as_json(config, query)
    assert status == 400 and body["parameter"] == parameter
    assert body["error"].startswith(f"{parameter}: ")


def test_one_job_with_result_and_incidents(config):
    status, body = as_json(config, "/api/jobs/3")
    assert status == 200
    assert body["analysis_result"] == {"n": 2} and body["safety_score"] == 88
    assert body["incidents"][0]["description"] == "incident 2"
    assert body["tokens"] == {"prompt": 100, "output": 10, "thoughts": None, "total": 110}
    status, body = as_json(config, "/api/jobs/999")
    assert status == 404 and body["error"] == "no job 999"


def test_incidents_newest_first_with_filters(config):
    _, body = as_json(config, "/api/incidents")
    starts = [i["start_at"] for i in body["incidents"]]
    assert len(starts) == 8 and starts == sorted(starts, reverse=True)
    _, severe = as_json(config, "/api/incidents?severity=high")
    assert {i["severity"] for i in severe["incidents"]} == {"high", "critical"}
    _, cam2 = as_json(config, "/api/incidents?camera=cam2&limit=2")
    assert [i["description"] for i in cam2["incidents"]] == ["incident 6", "incident 3"]
    _, recent = as_json(config, "/api/incidents?since=2026-11-26T09:00:00Z")
    assert all(i["start_at"] >= "2026-11-26T09:00:00" for i in recent["incidents"])
    assert len(recent["incidents"]) == 2


def test_metrics_parse_with_prometheus_parser(config):
    status, headers, text = call(config, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["state"]: s.value for s in families["vlmguard_jobs"].samples}
    assert jobs == {"pending": 2, "processing": 0, "completed": 8, "failed": 2}
    tokens = {(s.labels["camera"], s.labels["kind"]): s.value
              for s in families["vlmguard_model_tokens"].samples}
    assert tokens[("cam1", "total")] + tokens[("cam2", "total")] == 8 * 110
    histogram = families["vlmguard_analysis_duration_seconds"]
    count = [s.value for s in histogram.samples if s.name.endswith("_count")]
    assert histogram.type == "histogram" and count == [8]
    online = {s.labels["camera"]: s.value for s in families["vlmguard_camera_online"].samples}
    assert online == {"cam1": 0, "cam2": 0}
    assert {"vlmguard_archive_bytes", "vlmguard_ffmpeg_restarts", "vlmguard_child_restarts",
            "vlmguard_up"} <= set(families)


def test_an_account_wide_pause_is_said_by_health_metrics_and_status(config):
    from vlmguard.status import gather_status, render_status

    def paused_samples():
        text = call(config, "/metrics")[2]
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return [(s.labels, s.value) for s in families["vlmguard_analysis_paused"].samples]

    assert paused_samples() == [({}, 0)]
    with Store.from_config(config) as store:
        store.pauses.pause("gemini", "quota_exhausted", "generate: HTTP 429 RESOURCE_EXHAUSTED: daily "
                           "quota used up (GenerateRequestsPerDayPerProjectPerModel-FreeTier)", 600)
        text = render_status(gather_status(config, store))
    assert paused_samples() == [({"provider": "gemini", "reason": "quota_exhausted"}, 1)]
    status, body = as_json(config, "/api/health")
    assert status == 503
    assert ("analysis paused (gemini): quota_exhausted: generate: HTTP 429 RESOURCE_EXHAUSTED: "
            "daily quota used up (GenerateRequestsPerDayPerProjectPerModel-FreeTier)") in body["problems"]
    assert "analysis  PAUSED (gemini) since " in text and "next probe" in text


def test_analysis_lag_is_in_metrics_and_health(config):
    """Lag: now minus the end of the oldest unanalysed footage (cam1's job 10 is pending)."""
    text = call(config, "/metrics")[2]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    lag = {s.labels["camera"]: s.value for s in families["vlmguard_analysis_lag_seconds"].samples}
    expected = (datetime.now(timezone.utc) - (T0 + timedelta(minutes=110))).total_seconds()
    assert abs(lag["cam1"] - expected) < 60 and lag["cam2"] == 0
    merged = {s.labels["camera"]: s.value
              for s in families["vlmguard_analysis_windows_merged"].samples}
    assert merged == {"cam1": 0, "cam2": 0}
    body = as_json(config, "/api/health")[1]
    assert abs(body["analysis_lag_s"]["cam1"] - expected) < 60 and body["analysis_lag_s"]["cam2"] == 0


def test_a_window_job_names_its_archive_and_offset(config):
    start = datetime.now(timezone.utc).replace(microsecond=0)
    sources = [{"path": "/data/archives/cam1/x.ts", "offset_s": 30.5, "duration_s": 60.0}]
    with Store.from_config(config) as store:
        job_id = store.queue.register("cam1", "/ram/clip.ffconcat", start, start + timedelta(minutes=1),
                                      kind="window", clip_start=start + timedelta(seconds=0.25),
                                      sources=sources)
    status, body = as_json(config, f"/api/jobs/{job_id}")
    assert status == 200 and (body["kind"], body["sources"]) == ("window", sources)
    assert body["clip_start"] == f"{start:%Y-%m-%dT%H:%M:%S}.250Z"


def test_a_page_of_huge_descriptions_is_bounded_in_bytes_and_says_where_to_go_on(config,
                                                                                 monkeypatch):
    """Descriptions of megabytes (written around the answer caps, say by hand) are read
    bounded, and a page stops at MAX_PAGE_BYTES with next_offset for the rest."""
    import sqlite3

    from vlmguard.web import api
    monkeypatch.setattr(api, "MAX_PAGE_BYTES", 20_000)  # 2 descriptions of 8000 characters
    conn = sqlite3.connect(config.data_dir / "vlmguard.db")
    conn.execute("UPDATE incidents SET description = printf('%.*c', 3000000, 'x')")
    conn.commit()
    conn.close()
    seen, offset, pages = [], 0, 0
    while offset is not None:
        status, _, text = call(config, f"/api/incidents?limit=500&offset={offset}")
        assert status == 200 and len(text) <= 20_000 + 1000
        body = json.loads(text)
        assert all(i["description_truncated"] for i in body["incidents"])
        seen += [i["id"] for i in body["incidents"]]
        offset, pages = body["next_offset"], pages + 1
    assert sorted(seen) == list(range(1, 9)) and pages == 4


def test_database_away_is_503_with_retry_after_and_health_still_answers(config, monkeypatch):
    from vlmguard.errors import DatabaseUnreachable
    from vlmguard.store.database import Database

    def away(self, *args, **kwargs):
        raise DatabaseUnreachable("cannot open database: connection refused")
    monkeypatch.setattr(Database, "ensure_ready", away)
    status, headers, body = call(config, "/api/incidents")
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error"].startswith("database unreachable")
    status, body = as_json(config, "/api/health")
    assert status == 503 and body["database"]["ready"] is False
    assert body["database"]["error"].startswith("database unreachable")
    status, _, text = call(config, "/metrics")
    assert status == 200 and "vlmguard_database_up 0" in text
