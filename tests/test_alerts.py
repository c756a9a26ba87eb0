"""Alerts: rules and payloads (vlmguard.alerts.plan), the outbox written with the incidents
(vlmguard/store/outbox.py), the config keys, and the webhook and Apprise plug-ins against
a real receiver."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmguard.alerts import registry
from vlmguard.layout import snapshot_path
from vlmguard.alerts.plan import AlertPlan, title
from vlmguard.cli import main as cli_main
from vlmguard.config import load_config
from vlmguard.errors import ConfigError
from vlmguard.store.bundle import Store
from vlmguard.store.records import Outcome

from alert_receiver import Receiver
from helpers import free_port, write_config
from helpers.alerts import CAMERAS, T0, incident, store_window
from helpers.config_fuzz import ANY_VALUE, assert_loads_or_one_line, toml_literal


def alert_config(tmp_path, rules: str = "", mqtt: str = 'host = "127.0.0.1"', extra: str = ""):
    return load_config(write_config(tmp_path, f"""
[server]
public_url = "https://guard.example.com/"
[storage]
data_dir = "{tmp_path / 'data'}"
[mqtt]
{mqtt}
topic_prefix = "t-{tmp_path.name}"
{extra}
{rules}
{CAMERAS}
"""))


RULES = """
[alerts]
max_age_hours = 1
[[alerts.rules]]
name = "manager"
min_severity = "high"
cooldown_seconds = 60
webhooks = ["http://127.0.0.1:9/hook"]
urls = ["json://127.0.0.1:9/apprise"]
[[alerts.rules]]
name = "fire"
min_severity = "low"
categories = ["fire_smoke"]
cameras = ["gate"]
cooldown_seconds = 0
webhooks = ["http://127.0.0.1:9/fire"]
"""


@pytest.fixture
def outbox(db_url, tmp_path):
    config = alert_config(tmp_path, RULES)
    with Store(db_url, alerts=AlertPlan(config)) as s:
        yield s


# -- the outbox ---------------------------------------------------------------------------

def test_deliveries_are_written_with_the_incidents(outbox):
    job_id = store_window(outbox, "dock-2", T0, [incident(3), incident(30, "fire_smoke", "low")])
    rows = outbox.reports.list_deliveries()
    by_kind = {}
    for row in rows:
        by_kind.setdefault((row["kind"], row["destination"]), []).append(row)
    # The window's score to MQTT; each incident to MQTT; only the high one to the manager
    # rule (webhook and Apprise); the fire rule is for the gate camera only.
    assert sorted(by_kind) == [("incident", "apprise:manager:0"), ("incident", "mqtt"),
                               ("incident", "webhook:manager:0"), ("safety_score", "mqtt")]
    assert len(by_kind[("incident", "mqtt")]) == 2
    assert all(r["status"] == "pending" and r["job_id"] == job_id for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    payload = by_kind[("incident", "webhook:manager:0")][0]["payload"]
    [stored] = [i for i in outbox.incidents.list_incidents(job_id) if i["category"] == "fall"]
    assert payload == {
        "type": "incident", "id": stored["id"], "camera_id": "dock-2",
        "start": "2026-11-26T08:00:03.000Z", "end": "2026-11-26T08:00:05.000Z", "category": "fall",
        "severity": "high", "event_type": "high", "description": "fall at 3",
        "confidence": 0.9, "safety_score": 40, "summary": "a window", "job_id": job_id,
        "snapshot_url": f"https://guard.example.com/api/incidents/{stored['id']}/snapshot.jpg",
        "clip_url": f"https://guard.example.com/api/incidents/{stored['id']}/clip.mp4"}
    assert title(payload) == "HIGH fall on dock-2 at 08:00:03"
    score = by_kind[("safety_score", "mqtt")][0]["payload"]
    assert (score["safety_score"], score["camera_id"], score["window_start"]) == \
        (40, "dock-2", "2026-11-26T08:00:00.000Z")


def test_a_failed_commit_writes_neither_incidents_nor_deliveries(outbox):
    outbox.queue.register("dock-2", "/a/x.mp4", T0, T0 + timedelta(minutes=10))
    job = outbox.queue.claim("w")

    class Broken(AlertPlan):
        def incident_payload(self, *args):
            raise RuntimeError("disk full half way")

    outbox.outbox.plan = Broken(outbox.outbox.plan.config)
    with pytest.raises(RuntimeError):
        outbox.queue.complete(job, Outcome(result={}, safety_score=10, incidents=[incident(1)]))
    assert outbox.incidents.list_incidents(job.id) == [] and outbox.reports.list_deliveries() == []
    assert outbox.reports.get(job.id).status == "processing"


def test_cooldown_suppresses_and_records_it(outbox):
    store_window(outbox, "dock-2", T0, [incident(3), incident(40)])
    store_window(outbox, "dock-2", T0 + timedelta(minutes=10), [incident(600)])  # 10 min later
    store_window(outbox, "gate", T0, [incident(5)])  # another camera: its own cooldown
    rows = [r for r in outbox.reports.list_deliveries() if r["destination"] == "webhook:manager:0"]
    assert [(r["camera_id"], r["status"]) for r in rows] == [
        ("dock-2", "pending"), ("dock-2", "suppressed"), ("dock-2", "pending"),
        ("gate", "pending")]
    assert "cooldown" in rows[1]["last_error"]
    # MQTT takes every incident: no cooldown there.
    assert all(r["status"] == "pending" for r in outbox.reports.list_deliveries()
               if r["destination"] == "mqtt")
    counts = outbox.reports.delivery_counts()
    assert (counts["webhook:manager:0"]["suppressed"], counts["webhook:manager:0"]["pending"]) == (1, 3)


def test_claim_lease_release_and_outcomes(outbox):
    store_window(outbox, "dock-2", T0, [incident(3)])
    claimed = outbox.outbox.claim_deliveries("n1", 100, lease_seconds=600)
    assert len(claimed) == 4
    assert outbox.outbox.claim_deliveries("n2", 100, lease_seconds=600) == []  # leased
    assert outbox.outbox.release_deliveries("n1") == 4  # a restart takes its own back at once
    first, second, third, fourth = outbox.outbox.claim_deliveries("n1", 100, lease_seconds=600)
    outbox.outbox.delivered(first.id)
    assert outbox.outbox.delivery_failed(second.id, "HTTP 500", retry_in=30, max_age_seconds=3600) == "pending"
    assert outbox.outbox.delivery_failed(third.id, "HTTP 404: gone", retry_in=None,
                                         max_age_seconds=3600) == "failed"
    assert outbox.outbox.delivery_failed(fourth.id, "refused", retry_in=1, max_age_seconds=0) == "failed"
    rows = {r["id"]: r for r in outbox.reports.list_deliveries()}
    assert rows[first.id]["status"] == "delivered" and rows[first.id]["attempts"] == 1
    assert rows[second.id]["status"] == "pending" and rows[second.id]["last_error"] == "HTTP 500"
    assert rows[fourth.id]["last_error"].startswith("gave up after 0 h: refused")
    assert 25 < outbox.outbox.seconds_until_delivery_due() <= 30
    outbox.outbox.deliveries_due_now(second.destination)
    assert outbox.outbox.seconds_until_delivery_due() == 0


def test_an_incident_with_deliveries_is_not_sent_again(outbox):
    """A window that re-stores an incident (issue 13's extension keeps its id) makes no
    second alert: only incidents without deliveries get them."""
    job_id = store_window(outbox, "gate", T0, [incident(3, "fire_smoke", "high")])
    before = len(outbox.reports.list_deliveries())
    with outbox.db.write() as conn:
        job = outbox.reports.get(job_id)
        outbox.outbox.enqueue_deliveries(conn, job, Outcome(result={}, safety_score=1))
    assert len(outbox.reports.list_deliveries()) == before + 1  # the window's score only


def test_no_alerts_configured_writes_nothing(db_url, tmp_path):
    config = alert_config(tmp_path, mqtt="")
    with Store(db_url, alerts=AlertPlan(config)) as store:
        store_window(store, "dock-2", T0, [incident(3)])
        assert store.reports.list_deliveries() == []


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("body,message", [
    ('[[alerts.rules]]\nname = "a"\nmin_severity = "urgent"\nwebhooks = ["http://x"]\n',
     "alerts.rules[0].min_severity: must be one of low, medium, high, critical, got 'urgent'"),
    ('[[alerts.rules]]\nname = "a"\ncategories = ["cats"]\nwebhooks = ["http://x"]\n',
     "alerts.rules[0].categories[0]: must be one of"),
    ('[[alerts.rules]]\nname = "a"\ncameras = ["nope"]\nwebhooks = ["http://x"]\n',
     "alerts.rules[0].cameras[0]: no camera 'nope'"),
    ('[[alerts.rules]]\nname = "a"\nwebhooks = "http://x"\n',
     "alerts.rules[0].webhooks: must be an array of strings, got string"),
    ('[[alerts.rules]]\nname = "a"\nwebhooks = ["ftp://x"]\n',
     "alerts.rules[0].webhooks[0]: must be an http:// or https:// URL"),
    ('[[alerts.rules]]\nname = "a"\nurls = [3]\n', "alerts.rules[0].urls[0]: must be a string"),
    ('[[alerts.rules]]\nname = "a"\n', "alerts.rules[0]: needs urls or webhooks"),
    ('[[alerts.rules]]\nname = "a"\nwebhooks = ["http://x"]\n[[alerts.rules]]\nname = "a"\n'
     'webhooks = ["http://y"]\n', "alerts.rules[1].name: duplicate rule name 'a'"),
    ('[[alerts.rules]]\nname = "a"\ncooldown_seconds = 1e9\nwebhooks = ["http://x"]\n',
     "alerts.rules[0].cooldown_seconds: must be <= 86400"),
    ('[alerts]\nmax_age_hours = 0\n', "alerts.max_age_hours: must be >= 0.01"),
    ('[alerts]\nrules = 3\n', "alerts.rules: must be an array of tables"),
    ('[mqtt]\ntls = "yes"\n', "mqtt.tls: must be a boolean (true or false), got string"),
    ('[mqtt]\ntls = 1\n', "mqtt.tls: must be a boolean (true or false), got integer"),
    ('[mqtt]\ntopic_prefix = "a/#"\n', "mqtt.topic_prefix: must be a topic without + #"),
    ('[mqtt]\nport = 0\n', "mqtt.port: must be >= 1"),
])
def test_bad_alert_config_is_one_line_naming_the_key(tmp_path, body, message):
    path = write_config(tmp_path, body + CAMERAS)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_config_masks_alert_secrets(tmp_path):
    path = write_config(tmp_path, """
[mqtt]
host = "127.0.0.1"
username = "guard"
password_file = "/run/credentials/mqtt"
[[alerts.rules]]
name = "a"
urls = ["tgram://123456:Zq-bot-token/-100200", "mailtos://me:Zq-mailpass@example.com"]
webhooks = ["https://hooks.example.com/x?token=Zq-hooktoken", "https://u:Zq-hookpass@h.example/"]
webhook_secret = "Zq-signing-secret"
""" + CAMERAS)
    result = CliRunner().invoke(cli_main, ["check-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "Zq" not in result.output
    shown = json.loads(result.output)
    rule = shown["alerts"]["rules"][0]
    assert rule["urls"] == ["tgram://***", "mailtos://***"]
    # A webhook's path may be its token (Slack's are): host only.
    assert rule["webhooks"] == ["https://hooks.example.com/***", "https://u:***@h.example/***"]
    assert rule["webhook_secret"] == "***" and shown["mqtt"]["tls"] is False


# -- the plug-ins against a real receiver -------------------------------------------------

def delivery_of(outbox, destination: str):
    return next(d for d in outbox.outbox.claim_deliveries("t", 100, 600) if d.destination == destination)


def test_webhook_signs_and_judges_answers(tmp_path):
    secret = "s3cret"
    with Receiver(secret=secret) as receiver:
        config = alert_config(tmp_path, f"""
[[alerts.rules]]
name = "r"
min_severity = "low"
webhooks = ["{receiver.url}/hook"]
webhook_secret = "{secret}"
""", mqtt="")
        [hook] = registry.configured(config).values()
        payload = {"type": "incident", "id": 7, "camera_id": "dock-2"}

        async def attempts():
            answers = []
            receiver.fail_count = 1
            answers.append(await hook.test(payload, "key-1"))
            answers.append(await hook.test(payload, "key-1"))
            receiver.status = 404
            answers.append(await hook.test(payload, "key-2"))
            receiver.status = 429
            answers.append(await hook.test(payload, "key-3"))
            await hook.close()
            return answers

        answers = asyncio.run(attempts())
    assert [a.outcome for a in answers] == ["retry", "delivered", "failed", "retry"]
    assert answers[0].detail == "HTTP 500: down for a while"
    assert answers[2].detail == "HTTP 404: ok"
    first = receiver.requests[0]
    assert first.signature_ok is True and first.headers["Idempotency-Key"] == "key-1"
    assert json.loads(first.body) == payload
    assert abs(int(first.headers["X-Vlmguard-Timestamp"]) - first.at) < 5


def test_webhook_without_a_listener_is_retried(tmp_path):

    config = alert_config(tmp_path, f"""
[[alerts.rules]]
name = "r"
webhooks = ["http://127.0.0.1:{free_port()}/hook"]
""", mqtt="")
    [hook] = registry.configured(config).values()

    async def attempt():
        try:
            return await hook.test({"type": "test"}, "k")
        finally:
            await hook.close()
    answer = asyncio.run(attempt())
    assert answer.outcome == "retry" and "ClientConnectorError" in answer.detail


def test_apprise_json_url_carries_title_and_snapshot(tmp_path, db_url):
    with Receiver() as receiver:
        config = alert_config(tmp_path, f"""
[[alerts.rules]]
name = "r"
urls = ["json://127.0.0.1:{receiver.port}/apprise"]
""", mqtt="")
        with Store(db_url, alerts=AlertPlan(config)) as store:
            job_id = store_window(store, "dock-2", T0, [incident(3)])
            [row] = store.incidents.list_incidents(job_id)
            snapshot = snapshot_path(config.data_dir, "dock-2", row["id"])
            snapshot.parent.mkdir(parents=True)
            snapshot.write_bytes(b"\xff\xd8 a jpeg \xff\xd9")
            delivery = delivery_of(store, "apprise:r:0")
        [destination] = registry.configured(config).values()
        answer = asyncio.run(destination.send(delivery))
        assert answer.delivered, answer.detail
    [request] = receiver.requests
    assert request.json["title"] == "HIGH fall on dock-2 at 08:00:03"
    assert "fall at 3" in request.json["message"]
    assert f"/api/incidents/{row['id']}/snapshot.jpg" in request.json["message"]
    assert [base64.b64decode(v) for v in request.files.values()] == [b"\xff\xd8 a jpeg \xff\xd9"]


def test_apprise_missing_snapshot_attaches_nothing_and_failure_is_retried(tmp_path):

    config = alert_config(tmp_path, f"""
[[alerts.rules]]
name = "r"
urls = ["json://127.0.0.1:{free_port()}/apprise"]
""", mqtt="")
    [destination] = registry.configured(config).values()
    answer = asyncio.run(destination.test({"type": "test", "message": "hi"}, "k"))
    assert answer.outcome == "retry" and answer.detail


RULE_VALUES = {
    "name": st.sampled_from(["a", "b", "A!", ""]),
    "min_severity": st.sampled_from(["low", "high", "urgent"]),
    "categories": st.lists(st.sampled_from(["fall", "fire_smoke", "cats"]), max_size=2),
    "cameras": st.lists(st.sampled_from(["gate", "dock-2", "nope"]), max_size=2),
    "cooldown_seconds": st.floats(min_value=-1, max_value=1e6) | st.integers(-5, 100000),
    "urls": st.lists(st.sampled_from(["json://127.0.0.1/x", "tgram://t/c", "nourl", ""]), max_size=2),
    "webhooks": st.lists(st.sampled_from(["http://127.0.0.1/x", "ftp://x", "https://h/\n"]), max_size=2),
    "webhook_secret": st.text(max_size=8),
    "webhook_secret_file": st.text(max_size=8),
}


@settings(database=None, max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=st.lists(st.fixed_dictionaries({}, optional={
    key: strategy | ANY_VALUE for key, strategy in RULE_VALUES.items()}), max_size=3),
       max_age=st.none() | ANY_VALUE | st.floats(min_value=-1, max_value=1000))
def test_fuzz_alert_rules_load_or_are_one_config_error(tmp_path, rules, max_age):
    body = "[alerts]\n" + (f"max_age_hours = {toml_literal(max_age)}\n" if max_age is not None else "")
    for rule in rules:
        body += "[[alerts.rules]]\n" + "".join(f"{k} = {toml_literal(v)}\n" for k, v in rule.items())
    assert_loads_or_one_line(write_config(tmp_path, body + CAMERAS))


def test_apprise_failure_reason_hides_the_url_pieces():
    from vlmguard.alerts.apprise_urls import scrub

    url = "tgram://123456:Zq-bot-token/-100200"
    assert scrub("Failed to send to 123456:Zq-bot-token chat -100200: 401", url) == \
        "Failed to send to ***:*** chat ***: 401"
