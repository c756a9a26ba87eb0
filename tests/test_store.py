"""The job table, on SQLite (WAL) and PostgreSQL, through Store's public methods."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy

from vlmguard.errors import DatabaseError, LeaseLost
from vlmguard.store.bundle import Store
from vlmguard.store.queue import backoff_seconds
from vlmguard.store.records import IncidentRecord, Outcome, utcnow
from vlmguard.store.schema import SCHEMA_VERSION, schema_version

import queue_workers
from helpers import pg_address, pg_url_with_database, through_proxy

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
SPAWN = multiprocessing.get_context("spawn")


def register(store, n=0, camera="cam1"):
    start = T0 + timedelta(minutes=10 * n)
    return store.queue.register(camera, f"/data/{camera}/{n}.mp4", start, start + timedelta(minutes=10))


def outcome(score=90, incidents=()):
    return Outcome(result={"safety_score": score, "summary": "ok", "incidents": []},
                   safety_score=score, incidents=incidents, prompt_tokens=100,
                   output_tokens=20, total_tokens=120)


# -- register --------------------------------------------------------------------------------

def test_register_twice_is_a_no_op(store):
    first = register(store)
    assert first is not None
    assert register(store) is None
    assert [j.id for j in store.reports.list_jobs()] == [first]
    job = store.reports.get(first)
    assert (job.status, job.retry_count, job.max_retries) == ("pending", 0, 3)
    assert job.segment_start == T0 and job.segment_end == T0 + timedelta(minutes=10)


def test_same_start_on_other_camera_is_another_job(store):
    assert register(store, camera="a") != register(store, camera="b")
    assert len(store.reports.list_jobs()) == 2


# -- claim -----------------------------------------------------------------------------------

def test_claim_takes_oldest_due_job_once(store):
    ids = [register(store, n) for n in range(3)]
    job = store.queue.claim("w1")
    assert job.id == ids[0]
    assert (job.status, job.worker_id) == ("processing", "w1")
    assert job.lease_token and job.lease_expires_at > utcnow()
    assert store.queue.claim("w2").id == ids[1]
    assert store.queue.claim("w3").id == ids[2]
    assert store.queue.claim("w4") is None


def test_claim_skips_job_not_yet_due(store):
    register(store)
    job = store.queue.claim("w1")
    assert store.queue.fail(job, "boom") == "pending"
    assert store.queue.claim("w1") is None  # backing off
    assert 0 < store.queue.seconds_until_due() <= 12


@pytest.mark.e2e
def test_eight_processes_claim_two_thousand_jobs_exactly_once(db_url):
    with Store(db_url) as store:
        with store.db.write() as conn:  # one bulk insert: the test is about claiming
            conn.execute(sqlalchemy.text(
                "INSERT INTO analysis_jobs (camera_id, video_path, segment_start, segment_end, "
                "status, created_at, run_after, retry_count, max_retries) VALUES "
                "(:c, :p, :s, :e, 'pending', :now, :now, 0, 3)"),
                [{"c": "cam", "p": f"/{i}.mp4", "s": (T0 + timedelta(minutes=i)).replace(tzinfo=None),
                  "e": (T0 + timedelta(minutes=i + 10)).replace(tzinfo=None),
                  "now": utcnow().replace(tzinfo=None)} for i in range(2000)])
    out, start = SPAWN.Queue(), SPAWN.Event()
    procs = [SPAWN.Process(target=queue_workers.drain, args=(db_url, f"w{i}", out, start))
             for i in range(8)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    start.set()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [error for _, _, error in results if error]
    assert errors == []
    claimed = [job_id for _, ids, _ in results for job_id in ids]
    assert len(claimed) == 2000
    assert len(set(claimed)) == 2000
    with Store(db_url) as store:
        counts = store.reports.counts()["cam"]
        assert counts["completed"] == 2000 and counts["pending"] == 0
        workers = {j.worker_id for j in store.reports.list_jobs(limit=2000)}
    assert len(workers) > 1  # the work really was shared


# -- leases ----------------------------------------------------------------------------------

def test_heartbeat_extends_lease(db_url):
    with Store(db_url, lease_seconds=5) as store:
        register(store)
        job = store.queue.claim("w1")
        time.sleep(0.2)
        store.queue.heartbeat(job)
        assert store.reports.get(job.id).lease_expires_at > job.lease_expires_at


def test_worker_whose_lease_was_taken_over_cannot_write(db_url):
    with Store(db_url, lease_seconds=0.3) as store:
        register(store)
        stale = store.queue.claim("slow")
        time.sleep(0.5)
        assert store.queue.rescue_expired() == 1
        fresh = store.queue.claim("fast")
        assert fresh.id == stale.id and fresh.lease_token != stale.lease_token
        for attempt in (lambda: store.queue.heartbeat(stale), lambda: store.queue.complete(stale, outcome()),
                        lambda: store.queue.fail(stale, "late"), lambda: store.queue.release(stale)):
            with pytest.raises(LeaseLost):
                attempt()
        store.queue.complete(fresh, outcome())
        job = store.reports.get(fresh.id)
        assert (job.status, job.worker_id, job.retry_count) == ("completed", "fast", 1)


@pytest.mark.e2e
def test_worker_sigkilled_mid_job_is_rescued_and_completed_by_another(db_url):
    with Store(db_url, lease_seconds=1, poll_seconds=0.2) as store:
        job_id = register(store)
        out = SPAWN.Queue()
        doomed = SPAWN.Process(target=queue_workers.claim_and_hang, args=(db_url, 1, out))
        doomed.start()
        assert out.get(timeout=60) == job_id
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join()
        assert store.reports.get(job_id).status == "processing"
        job = store.queue.next_job("rescuer", timeout=20)
        assert job is not None and job.id == job_id
        assert job.retry_count == 1
        assert job.error_message == "lease expired: worker doomed stopped heartbeating"
        store.queue.complete(job, outcome())
        done = store.reports.get(job_id)
        assert (done.status, done.worker_id, done.error_message) == ("completed", "rescuer", None)


def test_rescue_gives_up_after_max_retries(db_url):
    with Store(db_url, lease_seconds=0.2) as store:
        job_id = store.queue.register("cam", "/x.mp4", T0, T0 + timedelta(minutes=10), max_retries=1)
        for _ in range(2):
            assert store.queue.claim("w") is not None
            time.sleep(0.3)
            assert store.queue.rescue_expired() == 1
        job = store.reports.get(job_id)
        assert job.status == "failed"
        assert job.error_message == "lease expired: worker w stopped heartbeating"


def test_release_hands_back_without_counting(store):
    job_id = register(store)
    job = store.queue.claim("w1")
    store.queue.release(job)
    again = store.reports.get(job_id)
    assert (again.status, again.retry_count, again.lease_token) == ("pending", 0, None)
    assert store.queue.claim("w2").id == job_id


# -- complete and fail -----------------------------------------------------------------------

def test_complete_writes_result_and_incidents_together(store):
    register(store)
    job = store.queue.claim("w1")
    found = [IncidentRecord(T0 + timedelta(seconds=30), T0 + timedelta(seconds=42), "fall",
                            "high", "person falls from ladder", 0.9),
             IncidentRecord(T0 + timedelta(seconds=300), T0 + timedelta(seconds=310), "fire",
                            "critical", "smoke near machine", 0.7)]
    store.queue.complete(job, outcome(40, found))
    done = store.reports.get(job.id)
    assert (done.status, done.safety_score, done.incident_count) == ("completed", 40, 2)
    assert (done.prompt_tokens, done.output_tokens, done.total_tokens) == (100, 20, 120)
    assert done.analysis_result["summary"] == "ok"
    assert done.lease_token is None and done.completed_at is not None
    rows = store.incidents.list_incidents(job.id)
    assert [(r["category"], r["severity"], r["start_at"]) for r in rows] == [
        ("fall", "high", T0 + timedelta(seconds=30)), ("fire", "critical", T0 + timedelta(seconds=300))]
    assert all(r["camera_id"] == "cam1" for r in rows)


def test_incident_by_id_and_those_whose_footage_is_gone(store):
    register(store)
    job = store.queue.claim("w1")
    store.queue.complete(job, outcome(40, [
        IncidentRecord(T0 + timedelta(seconds=30), T0 + timedelta(seconds=42), "fall", "high", "a"),
        IncidentRecord(T0 + timedelta(seconds=300), T0 + timedelta(seconds=310), "fire", "low", "b")]))
    first, second = sorted(r["id"] for r in store.incidents.list_incidents(job.id))
    assert store.incidents.get_incident(first)["description"] == "a"
    assert store.incidents.get_incident(second + 1000) is None
    ids = [first, second, second + 1000]
    assert store.recordings.incidents_ended_before("cam1", T0 + timedelta(seconds=60), ids) == [first]
    assert sorted(store.recordings.incidents_ended_before("cam1", T0 + timedelta(hours=1), ids)) == [first, second]
    assert store.recordings.incidents_ended_before("cam2", T0 + timedelta(hours=1), ids) == []
    assert store.recordings.incidents_ended_before("cam1", T0 + timedelta(hours=1), []) == []


def test_complete_twice_writes_one_result(store):
    register(store)
    job = store.queue.claim("w1")
    store.queue.complete(job, outcome(50, [IncidentRecord(T0, T0, "fall", "low", "x")]))
    with pytest.raises(LeaseLost):
        store.queue.complete(job, outcome(50, [IncidentRecord(T0, T0, "fall", "low", "x")]))
    assert len(store.incidents.list_incidents(job.id)) == 1


def test_backoff_schedule_doubles_with_jitter_and_caps():
    rng = random.Random(7)
    for retry, nominal in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 160)]:
        delays = [backoff_seconds(retry, 10, rng) for _ in range(200)]
        assert nominal * 0.8 <= min(delays) and max(delays) <= nominal * 1.2
        assert max(delays) - min(delays) > nominal * 0.2  # there really is jitter
    assert backoff_seconds(30, 10, rng) <= 3600 * 1.2


def test_retryable_failure_backs_off_then_fails_at_max_retries(store):
    job_id = store.queue.register("cam", "/x.mp4", T0, T0 + timedelta(minutes=10), max_retries=2)
    expected = [("pending", 10), ("pending", 20), ("failed", None)]
    for attempt, (status, nominal) in enumerate(expected, start=1):
        with store.db.write() as conn:  # make the job due now, whatever its backoff
            conn.execute(sqlalchemy.text("UPDATE analysis_jobs SET run_after = :t"),
                         {"t": (utcnow() - timedelta(seconds=1)).replace(tzinfo=None)})
        job = store.queue.claim("w")
        before = utcnow()
        assert store.queue.fail(job, f"HTTP 503 attempt {attempt}") == status
        row = store.reports.get(job_id)
        assert (row.status, row.retry_count) == (status, attempt)
        assert row.error_message == f"HTTP 503 attempt {attempt}"
        if nominal:
            delay = (row.run_after - before).total_seconds()
            assert nominal * 0.8 - 1 <= delay <= nominal * 1.2 + 1
    assert store.reports.get(job_id).completed_at is not None


def test_permanent_failure_fails_at_once(store):
    job_id = register(store)
    assert store.queue.fail(store.queue.claim("w"), "HTTP 401: bad API key", permanent=True) == "failed"
    job = store.reports.get(job_id)
    assert (job.status, job.retry_count, job.error_message) == ("failed", 1, "HTTP 401: bad API key")


def test_retry_after_hint_is_honoured(store):
    job_id = register(store)
    before = utcnow()
    store.queue.fail(store.queue.claim("w"), "429", retry_after=58)
    assert (store.reports.get(job_id).run_after - before).total_seconds() >= 58


def test_retry_by_hand_only_for_failed(store):
    job_id = register(store)
    assert store.queue.retry(job_id) is False
    store.queue.fail(store.queue.claim("w"), "bad", permanent=True)
    assert store.queue.retry(job_id) is True
    job = store.reports.get(job_id)
    assert (job.status, job.retry_count) == ("pending", 0)
    assert store.queue.claim("w").id == job_id


def test_counts_and_recent_failures(store):
    for n in range(3):
        register(store, n, camera="a")
    register(store, 0, camera="b")
    store.queue.complete(store.queue.claim("w"), outcome())
    store.queue.fail(store.queue.claim("w"), "gone", permanent=True)
    assert store.reports.counts() == {
        "a": {"pending": 1, "processing": 0, "completed": 1, "failed": 1},
        "b": {"pending": 1, "processing": 0, "completed": 0, "failed": 0}}
    assert [j.error_message for j in store.reports.recent_failures()] == ["gone"]
    assert store.reports.oldest_pending() is not None


# -- waiting for work ------------------------------------------------------------------------

@pytest.mark.e2e
def test_idle_worker_wakes_on_register_without_waiting_for_poll(db_url):
    """The poll fallback is 30 s: a claim well before it proves the wake-up path works."""
    with Store(db_url) as store:
        out = SPAWN.Queue()
        waiter = SPAWN.Process(target=queue_workers.wait_and_claim, args=(db_url, 30.0, out))
        waiter.start()
        assert out.get(timeout=60)[0] == "ready"
        time.sleep(1.0)  # let it settle into its wait
        registered = time.time()
        job_id = register(store)
        tag, claimed_id, claimed_at = out.get(timeout=60)
        waiter.join(timeout=10)
    assert (tag, claimed_id) == ("claimed", job_id)
    assert claimed_at - registered < 10


def test_idle_waiting_never_writes_on_sqlite(tmp_path):
    path = tmp_path / "idle.db"
    with Store(f"sqlite:///{path}", poll_seconds=0.1) as store:
        register(store)
        store.queue.complete(store.queue.claim("w"), outcome())
        observer = sqlite3.connect(path)
        version = observer.execute("PRAGMA data_version").fetchone()[0]
        wal_size = Path(f"{path}-wal").stat().st_size
        assert store.queue.next_job("idle", timeout=1.5) is None
        assert observer.execute("PRAGMA data_version").fetchone()[0] == version
        assert Path(f"{path}-wal").stat().st_size == wal_size
        observer.close()


# -- durability and schema -------------------------------------------------------------------

@pytest.mark.parametrize("synchronous,level", [("normal", 1), ("full", 2)])
def test_sqlite_is_wal_with_chosen_sync(tmp_path, synchronous, level):
    with Store(f"sqlite:///{tmp_path / 'q.db'}", synchronous=synchronous) as store:
        with store.db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == level
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.mark.e2e
def test_sqlite_writers_sigkilled_mid_transaction_lose_nothing_committed(tmp_path):
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    Store(url).close()
    committed = set()
    for round_ in range(6):
        out = SPAWN.Queue()
        writers = [SPAWN.Process(target=queue_workers.register_forever,
                                 args=(url, f"r{round_}w{i}", out)) for i in range(3)]
        for w in writers:
            w.start()
        deadline = time.time() + 60
        while len(committed) < 100 * (round_ + 1) and time.time() < deadline:
            committed.add(out.get(timeout=60))
        time.sleep(random.uniform(0.05, 0.3))
        for w in writers:
            os.kill(w.pid, signal.SIGKILL)
        for w in writers:
            w.join()
        while not out.empty():
            committed.add(out.get())
    conn = sqlite3.connect(tmp_path / "crash.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    present = {row[0] for row in conn.execute("SELECT id FROM analysis_jobs")}
    conn.close()
    assert len(committed) >= 600
    assert committed <= present


def test_reopening_keeps_data_and_schema_version(db_url):
    with Store(db_url) as store:
        job_id = register(store)
    with Store(db_url) as store:
        assert store.reports.get(job_id) is not None
        assert schema_version(store.db) == SCHEMA_VERSION


def test_database_from_a_newer_vlmguard_is_refused(db_url):
    with Store(db_url) as store:
        with store.db.write() as conn:
            conn.execute(sqlalchemy.text("UPDATE vlmguard_meta SET value = '99' "
                                         "WHERE key = 'schema_version'"))
    with pytest.raises(DatabaseError, match="schema version 99 is newer"):
        Store(db_url)


def test_unreachable_postgres_is_one_line():
    with pytest.raises(DatabaseError) as caught:
        Store("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")
    message = str(caught.value)
    assert message.startswith("cannot open database postgresql+psycopg://***@127.0.0.1:1/test")
    assert "\n" not in message


def test_password_never_in_database_errors():
    with pytest.raises(DatabaseError) as caught:
        Store("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test?connect_timeout=2")
    assert "s3cret" not in str(caught.value)


V1_TABLE = """CREATE TABLE analysis_jobs (
    id INTEGER PRIMARY KEY, camera_id VARCHAR(50) NOT NULL, video_path VARCHAR(1000) NOT NULL,
    segment_start DATETIME NOT NULL, segment_end DATETIME NOT NULL, status VARCHAR(16) NOT NULL,
    analysis_result JSON, safety_score INTEGER, incident_count INTEGER, error_message TEXT,
    created_at DATETIME NOT NULL, started_at DATETIME, completed_at DATETIME,
    retry_count INTEGER NOT NULL, max_retries INTEGER NOT NULL, worker_id VARCHAR(100),
    run_after DATETIME NOT NULL, lease_token VARCHAR(32), lease_expires_at DATETIME,
    prompt_tokens INTEGER, output_tokens INTEGER, total_tokens INTEGER,
    CONSTRAINT uq_jobs_camera_segment UNIQUE (camera_id, segment_start))"""


def test_database_from_schema_version_1_is_upgraded(db_url):
    """The first released schema (before analysis_seconds) opens and gains the column."""
    engine = sqlalchemy.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(V1_TABLE.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY")
                             .replace("DATETIME", "TIMESTAMP") if "postgresql" in db_url else V1_TABLE)
        conn.exec_driver_sql("CREATE TABLE vlmguard_meta (key VARCHAR(50) PRIMARY KEY, value VARCHAR(200) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO vlmguard_meta VALUES ('schema_version', '1')")
        conn.exec_driver_sql(
            "INSERT INTO analysis_jobs (camera_id, video_path, segment_start, segment_end, status, "
            "created_at, retry_count, max_retries, run_after) VALUES ('old', '/old.mp4', "
            "'2026-01-01 00:00:00', '2026-01-01 00:10:00', 'pending', '2026-01-01 00:10:01', 0, 3, "
            "'2026-01-01 00:10:01')")
    engine.dispose()
    with Store(db_url) as store:
        assert schema_version(store.db) == SCHEMA_VERSION
        job = store.queue.claim("w")
        assert job.camera_id == "old" and job.analysis_seconds is None
        assert job.kind == "archive" and job.priority == 0 and job.first_frame_at == job.segment_start
        store.queue.complete(job, outcome())
        assert store.reports.get(job.id).analysis_seconds >= 0


def test_database_from_schema_version_2_is_upgraded_in_place(db_url):
    """Schema 2 (before model_version, thoughts_tokens and provider pauses) opens, keeps its
    jobs, and gains the columns and the table."""
    engine = sqlalchemy.create_engine(db_url)
    v2 = V1_TABLE.replace("total_tokens INTEGER,", "total_tokens INTEGER, analysis_seconds FLOAT,")
    with engine.begin() as conn:
        conn.exec_driver_sql(v2.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY")
                             .replace("DATETIME", "TIMESTAMP") if "postgresql" in db_url else v2)
        conn.exec_driver_sql("CREATE TABLE vlmguard_meta (key VARCHAR(50) PRIMARY KEY, value VARCHAR(200) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO vlmguard_meta VALUES ('schema_version', '2')")
        conn.exec_driver_sql(
            "INSERT INTO analysis_jobs (camera_id, video_path, segment_start, segment_end, status, "
            "created_at, retry_count, max_retries, run_after, total_tokens, analysis_seconds) "
            "VALUES ('old', '/old.mp4', '2026-01-01 00:00:00', '2026-01-01 00:10:00', 'completed', "
            "'2026-01-01 00:10:01', 0, 3, '2026-01-01 00:10:01', 500, 12.5)")
    engine.dispose()
    with Store(db_url) as store:
        assert schema_version(store.db) == SCHEMA_VERSION
        [old] = store.reports.list_jobs()
        assert (old.total_tokens, old.analysis_seconds, old.model_version) == (500, 12.5, None)
        register(store)
        store.queue.complete(store.queue.claim("w"), Outcome(result={}, safety_score=90, total_tokens=130,
                                                             thoughts_tokens=10, model_version="gemini-3.8-flash"))
        assert store.reports.token_usage()["cam1"] == {"prompt": 0, "output": 0, "thoughts": 10,
                                                       "total": 130}
        store.pauses.pause("gemini", "bad_key", "bad API key", probe_in=600)
        assert store.pauses.provider_state("gemini").reason == "bad_key"


def test_database_from_schema_version_3_is_upgraded_in_place(db_url):
    """Schema 3 (one provider, before jobs recorded which provider and model answered and
    before per-provider failure counts) opens, keeps its jobs and pauses, and gains them."""
    engine = sqlalchemy.create_engine(db_url)
    v3 = V1_TABLE.replace("total_tokens INTEGER,", "total_tokens INTEGER, analysis_seconds FLOAT, "
                          "model_version VARCHAR(100), thoughts_tokens INTEGER,")
    with engine.begin() as conn:
        conn.exec_driver_sql(v3.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY")
                             .replace("DATETIME", "TIMESTAMP") if "postgresql" in db_url else v3)
        conn.exec_driver_sql("CREATE TABLE vlmguard_meta (key VARCHAR(50) PRIMARY KEY, value VARCHAR(200) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO vlmguard_meta VALUES ('schema_version', '3')")
        conn.exec_driver_sql(
            "CREATE TABLE provider_pauses (provider VARCHAR(50) PRIMARY KEY, reason VARCHAR(50), "
            "detail TEXT, paused_at TIMESTAMP, probe_at TIMESTAMP, not_before TIMESTAMP)")
        conn.exec_driver_sql("INSERT INTO provider_pauses (provider, reason, detail) "
                             "VALUES ('gemini', 'bad_key', 'bad API key')")
        conn.exec_driver_sql(
            "INSERT INTO analysis_jobs (camera_id, video_path, segment_start, segment_end, status, "
            "created_at, retry_count, max_retries, run_after, total_tokens, model_version) "
            "VALUES ('old', '/old.mp4', '2026-01-01 00:00:00', '2026-01-01 00:10:00', 'completed', "
            "'2026-01-01 00:10:01', 0, 3, '2026-01-01 00:10:01', 500, 'gemini-3.8-flash')")
    engine.dispose()
    with Store(db_url) as store:
        assert schema_version(store.db) == SCHEMA_VERSION
        [old] = store.reports.list_jobs()
        assert (old.total_tokens, old.model_version, old.provider, old.model) == \
            (500, "gemini-3.8-flash", None, None)
        old_pause = store.pauses.provider_state("gemini")
        assert old_pause.reason == "bad_key" and old_pause.failures == 0
        register(store)
        store.queue.complete(store.queue.claim("w"), Outcome(result={}, safety_score=90, total_tokens=130,
                                                             provider="local", model="qwen2.5vl:7b"))
        store.pauses.note_failure("gemini", "generate: HTTP 503")
        assert store.reports.answers_by_provider() == {"local": {"answered": 1, "tokens": 130,
                                                                 "models": ["qwen2.5vl:7b"]}}
        assert store.pauses.provider_state("gemini").failures == 1
        assert store.queue.last_model_request("cam1") is not None
        assert store.queue.last_model_request("old") is None  # answered before providers were recorded


# -- provider pauses -------------------------------------------------------------------------

def test_pause_is_shared_and_one_worker_probes(store, tmp_path):
    assert store.pauses.provider_state("gemini") is None and not store.pauses.take_probe("gemini", 600)
    store.pauses.pause("gemini", "quota_exhausted", "daily quota used up", probe_in=600)
    with Store(store.db.url) as other:  # another process, or another box on PostgreSQL
        seen = other.pauses.provider_state("gemini")
        assert seen.paused and seen.reason == "quota_exhausted"
        assert not other.pauses.take_probe("gemini", 600)  # not due yet
        assert store.pauses.probe_now("gemini") == 1        # SIGHUP
        assert other.pauses.take_probe("gemini", 600)       # one worker gets the probe...
        assert not store.pauses.take_probe("gemini", 600)   # ...and only one
        assert store.pauses.resume("gemini") and not other.pauses.provider_state("gemini").paused
        assert not store.pauses.resume("gemini")


def test_rate_limit_wait_only_grows_and_defer_charges_nothing(store):
    register(store)
    store.pauses.hold_off("gemini", 40)
    store.pauses.hold_off("gemini", 5)  # a shorter wait never cuts a longer one short
    assert 35 < (store.pauses.provider_state("gemini").not_before - utcnow()).total_seconds() <= 40
    job = store.queue.claim("w")
    store.queue.defer(job, utcnow() + timedelta(seconds=40))
    again = store.reports.get(job.id)
    assert (again.status, again.retry_count, again.error_message) == ("pending", 0, None)
    assert store.queue.claim("w") is None  # waits out the rate limit


def test_token_usage_and_duration_histogram(store):
    for n in range(3):
        register(store, n, camera="a" if n < 2 else "b")
        store.queue.complete(store.queue.claim("w"), outcome())
    assert store.reports.token_usage() == {"a": {"prompt": 200, "output": 40, "thoughts": 0, "total": 240},
                                           "b": {"prompt": 100, "output": 20, "thoughts": 0, "total": 120}}
    assert store.reports.token_usage(since=utcnow() + timedelta(hours=1)) == {}
    buckets, count, total = store.reports.duration_histogram()
    assert count == 3 and total >= 0
    assert buckets[0] == (5.0, 3) and [n for _, n in buckets] == [3] * len(buckets)
    assert store.reports.count_jobs(states=["completed"]) == 3 and store.reports.count_jobs(camera_id="b") == 1


# -- windows, incident merging, lag (schema 5) ---------------------------------------------------

def window(store, n, camera="cam1", seconds=60, kind="window"):
    start = T0 + timedelta(seconds=seconds * n)
    return store.queue.register(camera, f"/ram/{camera}/{n}/clip.ffconcat", start,
                                start + timedelta(seconds=seconds), kind=kind,
                                clip_start=start + timedelta(seconds=0.5),
                                sources=[{"path": f"/data/{camera}/a.ts", "offset_s": 60.0 * n,
                                          "duration_s": 60.0}])


def fire(start, end):
    return IncidentRecord(start_at=start, end_at=end, category="fire_smoke", severity="high",
                          description="flames")


def finish(store, job_id, incidents, within=2.5):
    job = store.queue.claim("w")
    assert job.id == job_id
    store.queue.complete(job, Outcome(result={}, safety_score=20, incidents=incidents,
                                      merge_within_s=within))


def test_an_incident_across_a_window_edge_is_one_incident_with_a_stable_id(store):
    first, second, third = window(store, 0), window(store, 1), window(store, 2)
    finish(store, first, [fire(T0 + timedelta(seconds=55), T0 + timedelta(seconds=59))])
    [stored] = store.incidents.find_incidents()
    # Two seconds later (one frame interval) the next window still sees it.
    finish(store, second, [fire(T0 + timedelta(seconds=61), T0 + timedelta(seconds=64))])
    [merged] = store.incidents.find_incidents()
    assert merged["id"] == stored["id"]
    assert (merged["start_at"], merged["end_at"]) == (T0 + timedelta(seconds=55),
                                                      T0 + timedelta(seconds=64))
    # Out of touch (a frame interval and more apart): a new incident.
    finish(store, third, [fire(T0 + timedelta(seconds=130), T0 + timedelta(seconds=131))])
    assert len(store.incidents.find_incidents()) == 2


def test_complete_returns_each_stored_incidents_id_and_none_where_one_was_extended(store):
    first, second = window(store, 0), window(store, 1)
    job = store.queue.claim("w")
    ids = store.queue.complete(job, Outcome(result={}, safety_score=20, merge_within_s=2.5,
                                            incidents=[fire(T0 + timedelta(seconds=55),
                                                            T0 + timedelta(seconds=59))]))
    assert ids == [i["id"] for i in store.incidents.list_incidents(first)]
    fall = IncidentRecord(start_at=T0 + timedelta(seconds=70), end_at=T0 + timedelta(seconds=72),
                          category="fall", severity="high", description="a fall")
    job = store.queue.claim("w")
    ids = store.queue.complete(job, Outcome(
        result={}, safety_score=20, merge_within_s=2.5,
        incidents=[fire(T0 + timedelta(seconds=61), T0 + timedelta(seconds=64)), fall]))
    assert ids == [None, store.incidents.list_incidents(second)[0]["id"]]


def test_incidents_of_other_categories_or_archive_jobs_are_not_merged(store):
    first, second = window(store, 0), window(store, 1)
    finish(store, first, [fire(T0 + timedelta(seconds=55), T0 + timedelta(seconds=59))])
    other = IncidentRecord(start_at=T0 + timedelta(seconds=60), end_at=T0 + timedelta(seconds=62),
                           category="fall", severity="high", description="a fall")
    finish(store, second, [other, fire(T0 + timedelta(seconds=60), T0 + timedelta(seconds=61))],
           within=None)
    assert sorted(i["category"] for i in store.incidents.find_incidents()) == ["fall", "fire_smoke",
                                                                               "fire_smoke"]


def test_window_columns_round_trip_and_first_frame_time(store):
    job = store.reports.get(window(store, 3))
    assert job.kind == "window" and job.priority == 0 and job.windows == 1
    assert job.first_frame_at == job.segment_start + timedelta(seconds=0.5)
    assert job.sources == [{"path": "/data/cam1/a.ts", "offset_s": 180.0, "duration_s": 60.0}]


def test_live_windows_are_claimed_before_catch_up(store):
    old = store.queue.register("cam1", "/data/cam1/old.ts", T0 - timedelta(hours=1),
                               T0 - timedelta(minutes=50), kind="catchup")
    live = window(store, 0)
    assert store.queue.claim("w").id == live
    assert store.queue.claim("w").id == old


def test_lag_is_now_minus_the_end_of_the_oldest_unanalysed_footage(store):
    window(store, 0)
    window(store, 1)
    window(store, 0, camera="cam2")
    now = T0 + timedelta(minutes=5)
    assert store.queue.lag_seconds(now) == {"cam1": 240.0, "cam2": 240.0}
    finish(store, store.queue.pending_windows("cam1")[0].id, [])
    assert store.queue.lag_seconds(now)["cam1"] == 180.0


def test_merging_pending_windows_keeps_one_job_over_them_all(store):
    ids = [window(store, n) for n in range(4)]
    pending = store.queue.pending_windows("cam1")
    assert [j.id for j in pending] == ids
    assert store.queue.merge_jobs(pending[0], pending[1:3], "/ram/merged.ffconcat", [])
    jobs = sorted(store.reports.list_jobs(), key=lambda j: j.segment_start)
    assert [j.id for j in jobs] == [ids[0], ids[3]]
    merged = jobs[0]
    assert (merged.kind, merged.windows, merged.segment_end) == (
        "merged", 3, T0 + timedelta(minutes=3))
    assert merged.video_path == "/ram/merged.ffconcat"
    assert store.reports.merge_counts() == {"cam1": 2}


def test_a_window_claimed_meanwhile_is_not_merged(store):
    ids = [window(store, n) for n in range(3)]
    pending = store.queue.pending_windows("cam1")
    store.queue.claim("w")  # takes the first
    assert not store.queue.merge_jobs(pending[0], pending[1:], "/ram/merged.ffconcat", [])
    assert sorted(j.id for j in store.reports.list_jobs()) == ids


def test_in_flight_paths_name_the_archives_a_window_covers(store):
    window(store, 0)
    assert {"/ram/cam1/0/clip.ffconcat", "/data/cam1/a.ts"} <= store.recordings.in_flight_paths()
def two_incidents(store):
    register(store)
    job = store.queue.claim("w1")
    found = [IncidentRecord(T0 + timedelta(seconds=30), T0 + timedelta(seconds=42), "fall",
                            "high", "person falls from ladder", 0.9),
             IncidentRecord(T0 + timedelta(seconds=300), T0 + timedelta(seconds=310), "fire",
                            "critical", "smoke near machine", 0.7)]
    store.queue.complete(job, outcome(40, found))
    return job, store.incidents.list_incidents(job.id)


def test_incident_filters_count_and_categories(store):
    job, _ = two_incidents(store)
    assert store.incidents.incident_categories() == ["fall", "fire"]
    assert [r["category"] for r in store.incidents.find_incidents(categories=["fire"])] == ["fire"]
    until = T0 + timedelta(seconds=100)
    assert [r["category"] for r in store.incidents.find_incidents(until=until)] == ["fall"]
    assert store.incidents.count_incidents(severities=["high", "critical"]) == 2
    assert store.incidents.count_incidents(camera_id="cam2") == 0
    assert store.incidents.find_incidents()[0]["kept_at"] is None


def test_acknowledge_stores_time_and_note_and_feeds_changes(store):
    job, (fall, fire) = two_incidents(store)
    cursor = store.incidents.event_cursor()
    assert cursor[0] == fire["id"]
    when = store.incidents.acknowledge(fall["id"], "checked on site")
    assert when is not None and store.incidents.acknowledge(10**9, None) is None
    found = store.incidents.get_incident(fall["id"])
    assert (found["acknowledged_at"], found["ack_note"]) == (when, "checked on site")
    assert found["video_path"] == job.video_path
    changes = store.incidents.changes_since(*cursor)
    assert [r["id"] for r in changes["acknowledged"]] == [fall["id"]]
    assert changes["stored"] == [] and changes["failed"] == []
    assert store.incidents.changes_since(*store.incidents.event_cursor())["acknowledged"] == []


def test_kept_archive_is_listed_until_released(store):
    job, (fall, _) = two_incidents(store)
    assert store.recordings.kept_paths() == set()
    assert store.recordings.keep_archive(job.id, True) and not store.recordings.keep_archive(10**9, True)
    assert store.recordings.kept_paths() == {job.video_path}
    assert store.incidents.get_incident(fall["id"])["kept_at"] is not None
    assert store.reports.get(job.id).kept_at is not None
    store.recordings.keep_archive(job.id, False)
    assert store.recordings.kept_paths() == set()


def test_a_kept_window_keeps_the_archives_its_footage_lies_in(store):
    sources = [{"path": "/data/archives/cam1/20261126T080000Z.ts", "offset_s": 540.0,
                "duration_s": 60.0},
               {"path": "/data/archives/cam1/20261126T081000Z.ts", "offset_s": 0.0,
                "duration_s": 2.0}]
    job_id = store.queue.register("cam1", "/dev/shm/windows/cam1/20261126T080900Z.ffconcat",
                                  T0, T0 + timedelta(seconds=60), sources=sources)
    store.recordings.keep_archive(job_id, True)
    assert store.recordings.kept_paths() == {"/dev/shm/windows/cam1/20261126T080900Z.ffconcat",
                                             *(s["path"] for s in sources)}


def test_changes_since_reports_new_incidents_and_failures(store):
    cursor = store.incidents.event_cursor()
    assert cursor == (0, None, None)
    register(store, 1)
    store.queue.fail(store.queue.claim("w1"), "model said no", permanent=True)
    _, (fall, fire) = two_incidents(store)
    changes = store.incidents.changes_since(*cursor)
    assert [r["id"] for r in changes["stored"]] == [fall["id"], fire["id"]]
    assert [j.error_message for j in changes["failed"]] == ["model said no"]


# -- unreadable rows, bounds, outages -----------------------------------------------------

def corrupt(store, statement: str) -> None:
    with store.db.write() as conn:
        conn.execute(sqlalchemy.text(statement))


def with_incident(store, n=0, description="person falls"):
    register(store, n)
    job = store.queue.claim("w1")
    store.queue.complete(job, outcome(40, [IncidentRecord(
        job.segment_start + timedelta(seconds=5), job.segment_start + timedelta(seconds=9),
        "fall", "high", description, 0.9)]))
    return job.id


def test_rows_out_of_range_are_quarantined_once_and_skipped_on_both_engines(store, caplog):
    """Values both engines can hold but no reader may be handed: a time past year 9000,
    sources of the wrong shape, an id out of range."""
    done = with_incident(store, 3)
    good = register(store, 0)
    far = register(store, 1)
    shape = register(store, 2)
    corrupt(store, f"UPDATE analysis_jobs SET segment_end = '9500-01-01 00:00:00' WHERE id = {far}")
    corrupt(store, f"UPDATE analysis_jobs SET sources = '5' WHERE id = {shape}")
    corrupt(store, f"UPDATE incidents SET id = -7 WHERE job_id = {done}")
    claimed = store.queue.claim("w1")
    assert claimed.id == good  # the bad pending rows were quarantined, not claimed or fatal
    assert store.queue.claim("w1") is None
    assert {j.id for j in store.reports.list_jobs()} == {good, done}
    assert store.incidents.find_incidents() == [] and store.incidents.count_incidents() == 0
    assert store.incidents.event_cursor()[0] == 0
    report = store.quarantine.quarantined()
    assert report["rows"] == {"analysis_jobs": 2, "incidents": 1, "alert_deliveries": 0}
    reasons = {row["id"]: row["reason"] for row in report["latest"]}
    assert "segment_end out of range" in reasons[far]
    assert reasons[shape] == "sources is not a list"
    assert "id out of range" in reasons[-7]
    # Quarantined once: a later scan finds nothing new.
    assert store.quarantine.quarantine_unreadable() == 0


def test_undecodable_sqlite_values_are_quarantined_and_reads_go_on(tmp_path):
    """SQLite holds whatever is written: invalid JSON in sources, a garbage time. The
    claim, the listings and the event feed skip them; nothing raises at every start."""
    with Store(f"sqlite:///{tmp_path / 'q.db'}") as store:
        incident_job = with_incident(store, 9)
        ids = [register(store, n) for n in range(4)]
        corrupt(store, f"UPDATE analysis_jobs SET sources = '{{not json' WHERE id = {ids[0]}")
        corrupt(store, f"UPDATE analysis_jobs SET run_after = 'garbage' WHERE id = {ids[1]}")
        corrupt(store, f"UPDATE analysis_jobs SET analysis_result = '[1, 2' WHERE id = {incident_job}")
        corrupt(store, "UPDATE incidents SET start_at = 'yesterday-ish'")
        cursor = store.incidents.event_cursor()
        assert store.queue.claim("w1").id == ids[2]
        assert store.queue.seconds_until_due() == 0
        assert {j.id for j in store.reports.list_jobs()} == {ids[2], ids[3]}
        assert store.incidents.find_incidents() == []
        assert store.incidents.changes_since(*cursor) == {"stored": [], "acknowledged": [], "failed": []}
        assert store.quarantine.quarantined()["rows"] == {"analysis_jobs": 3, "incidents": 1,
                                                          "alert_deliveries": 0}
        assert store.reports.get(ids[0]) is None


def test_stored_text_is_sanitised_and_bounded_and_reads_are_bounded(store):
    from vlmguard.store.records import MAX_DESCRIPTION, MAX_TEXT_READ, TRUNCATED
    job_id = with_incident(store, 0, description="ladder\x00 fall\x1b[31m " + "x" * 1_000_000)
    row = store.incidents.list_incidents(job_id)[0]
    assert len(row["description"]) == MAX_DESCRIPTION and row["description"].endswith(TRUNCATED)
    assert "\x00" not in row["description"] and "\x1b" not in row["description"]
    assert row["description"].startswith("ladder fall[31m ")
    # A row written around complete() (an older vlmguard, by hand) is read bounded.
    corrupt(store, "UPDATE incidents SET description = '" + "y" * 200_000 + "'")
    found = store.incidents.find_incidents()[0]
    assert len(found["description"]) == MAX_TEXT_READ and found["description_truncated"]
    # A job's result too large to serve stands in as its size.
    corrupt(store, "UPDATE analysis_jobs SET analysis_result = '{\"summary\": \""
            + "z" * 300_000 + "\"}'")
    assert store.reports.get(job_id).analysis_result == {"truncated": True, "chars": 300_015}
    assert store.reports.list_jobs()[0].analysis_result == {"truncated": True, "chars": 300_015}
    assert store.reports.list_jobs(results=False)[0].analysis_result is None  # a page of the API


def test_postgres_away_is_an_outage_not_a_bad_database(pg_url):
    from tcp_proxy import TcpProxy

    from vlmguard.errors import DatabaseUnreachable, UnusableDatabase
    from vlmguard.store.engines import is_outage

    proxy = TcpProxy(pg_address())
    url = through_proxy(pg_url, proxy)
    try:
        proxy.refuse()
        with pytest.raises(DatabaseUnreachable):
            Store(url)
        lazy = Store(url, lazy=True)  # made without reaching the server
        proxy.up()
        lazy.db.ensure_ready()
        first = register(lazy, 0)
        proxy.cut()  # connections dropped mid-life, new ones reset
        with pytest.raises(Exception) as caught:
            register(lazy, 1)
        assert is_outage(caught.value)
        proxy.up()
        assert register(lazy, 1) is not None  # the pool reconnects by itself
        assert [j.id for j in lazy.reports.list_jobs()][-1] == first
        lazy.close()
    finally:
        proxy.close()
    # A server that answers "no" is not away: that is a bad database.
    with pytest.raises(UnusableDatabase):
        Store(pg_url_with_database("no_such_database_here"))


def test_a_locked_sqlite_file_is_an_outage(tmp_path, monkeypatch):
    from vlmguard.store import engines
    from vlmguard.store.engines import is_outage

    monkeypatch.setattr(engines, "SQLITE_BUSY_MS", 300)
    path = tmp_path / "locked.db"
    with Store(f"sqlite:///{path}") as store:
        first = register(store, 0)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another program's long write transaction
        try:
            with pytest.raises(Exception) as caught:
                register(store, 1)
            assert is_outage(caught.value)
            assert [j.id for j in store.reports.list_jobs()] == [first]  # readers go on (WAL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert register(store, 1) is not None
