"""The notifier process against real parts: the shared Mosquitto (a unique topic prefix
per test), a Mosquitto of our own that we stop mid-run, an aiohttp webhook receiver that
checks signatures and answers 500 for a while, Apprise json:// to it, SIGKILLs."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import timedelta

import pytest
from click.testing import CliRunner

from vlmguard import notifier
from vlmguard.layout import snapshot_path
from vlmguard.cli import main as cli_main
from vlmguard.config import load_config
from vlmguard.status import gather_status, render_status
from vlmguard.store.bundle import Store
from vlmguard.web.metrics import render_metrics

from alert_receiver import Receiver, Subscriber
from helpers import free_port, write_config
from helpers.alerts import CAMERAS, T0, incident, store_window

pytestmark = pytest.mark.e2e  # the tests here run FFmpeg, daemons, players or browsers

SPAWN = multiprocessing.get_context("spawn")
SECRET = "hmac-secret-1"


def notifier_config(tmp_path, receiver: Receiver, broker_port: int = 1883, rules: bool = True):
    prefix = "t" + secrets.token_hex(4)
    rule = f"""
[[alerts.rules]]
name = "r"
min_severity = "low"
cooldown_seconds = 0
webhooks = ["{receiver.url}/hook"]
urls = ["json://127.0.0.1:{receiver.port}/apprise"]
webhook_secret = "{SECRET}"
""" if rules else ""
    return load_config(write_config(tmp_path, f"""
[storage]
data_dir = "{tmp_path / 'data'}"
[mqtt]
host = "127.0.0.1"
port = {broker_port}
topic_prefix = "{prefix}"
discovery_prefix = "ha{prefix}"
keepalive_seconds = 5
{rule}
{CAMERAS}
"""))


def start_notifier(config):
    proc = SPAWN.Process(target=notifier.main, args=(config,), name="notifier")
    proc.start()
    return proc


def stop(proc, signum=signal.SIGTERM) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signum)
    proc.join(20)
    assert not proc.is_alive()


def wait_all_done(store: Store, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not store.reports.list_deliveries(statuses=("pending",)):
            return
        time.sleep(0.1)
    raise AssertionError(f"still pending: {store.reports.list_deliveries(statuses=('pending',))}")


def test_every_alert_arrives_through_500s_and_a_sigkill(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        config = notifier_config(tmp_path, receiver)
        prefix, disc = config.mqtt.topic_prefix, config.mqtt.discovery_prefix
        watcher = Subscriber(1883, f"{prefix}/#", f"{disc}/#")
        with Store.from_config(config) as store:
            first = start_notifier(config)
            watcher.wait_for(lambda: (b"online", False) in watcher.on(f"{prefix}/available"))
            receiver.fail_until = time.time() + 3  # a receiver down for 3 s, then 200
            receiver.delay = 0.3
            ids = []
            for n in range(6):
                job_id = store_window(store, "dock-2", T0 + timedelta(minutes=10 * n),
                                      [incident(600 * n + 3), incident(600 * n + 30)])
                ids += [i["id"] for i in store.incidents.list_incidents(job_id)]
            snapshot = snapshot_path(config.data_dir, "dock-2", ids[0])
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            snapshot.write_bytes(b"\xff\xd8jpeg\xff\xd9")
            # Mid-delivery: requests are in the receiver's hands when the notifier dies.
            receiver.wait_for(lambda: len(receiver.requests) >= 3)
            os.kill(first.pid, signal.SIGKILL)
            first.join(10)
            # The broker publishes the last will: offline, retained.
            watcher.wait_for(lambda: (b"offline", False) in watcher.on(f"{prefix}/available"))
            second = start_notifier(config)
            wait_all_done(store)
            stop(second)
            watcher.wait_for(lambda: watcher.on(f"{prefix}/available")[-1] == (b"offline", False))
            rows = store.reports.list_deliveries()
            report = gather_status(config, store)
            histogram = store.reports.duration_histogram()
        watcher.close()

    assert {r["status"] for r in rows} == {"delivered"}
    keys = {(r["incident_id"], r["destination"]): r["key"] for r in rows}
    # Webhooks: every incident delivered; a repeat (the SIGKILL, the 500s) always with the
    # same Idempotency-Key; every signature checks.
    hooks = defaultdict(set)
    for request in receiver.requests:
        if request.path == "/hook":
            assert request.signature_ok is True
            hooks[request.json["id"]].add(request.headers["Idempotency-Key"])
    assert sorted(hooks) == sorted(ids)
    assert all(hooks[i] == {keys[(i, "webhook:r:0")]} for i in ids)
    assert {r.json["id"] for r in receiver.delivered("/hook")} == set(ids)
    assert any(r.answered == 500 for r in receiver.requests)
    # Apprise: every incident, titled, the first with its snapshot attached.
    apprise = receiver.delivered("/apprise")
    assert {r.json["title"] for r in apprise} >= {"HIGH fall on dock-2 at 08:00:03"}
    assert len({r.json["message"] for r in apprise}) == len(ids)
    assert any(r.files for r in apprise if f"/incidents/{ids[0]}/" in r.json["message"])
    # MQTT: every incident on both topics, QoS 1 (no message lost while subscribed).
    for topic in (f"{prefix}/incidents", f"{prefix}/dock-2/incident"):
        got = {json.loads(p)["id"] for p, _ in watcher.on(topic)}
        assert got == set(ids), topic
    assert json.loads(watcher.on(f"{prefix}/dock-2/incident")[0][0])["event_type"] == "high"
    # Status and metrics count per destination, with the last error.
    hook = report["alerts"]["webhook:r:0"]
    assert (hook["delivered"], hook["pending"], hook["failed"]) == (len(ids), 0, 0)
    assert hook["last_error"].startswith("HTTP 500")
    assert report["alerts"]["mqtt"]["delivered"] == len(ids) + 6
    assert "alerts    webhook:r:0: pending 0, delivered 12" in render_status(report)
    metrics = render_metrics(report, histogram, {})
    assert f'vlmguard_alert_deliveries{{destination="webhook:r:0",state="delivered"}} {len(ids)}' in metrics

    # What a newcomer (Home Assistant starting later) finds retained on the broker.
    late = Subscriber(1883, f"{prefix}/#", f"{disc}/#")
    late.wait_for(lambda: len(late.on(f"{disc}/event/{prefix}_gate/incident/config")) == 1)
    late.wait_for(lambda: late.on(f"{prefix}/dock-2/safety_score") != [])
    late.close()
    assert late.on(f"{prefix}/available") == [(b"offline", True)]
    assert late.on(f"{prefix}/dock-2/safety_score") == [(b"40", True)]
    assert late.on(f"{prefix}/incidents") == []  # incidents are events, not retained
    sensor = json.loads(late.on(f"{disc}/sensor/{prefix}_dock-2/safety_score/config")[0][0])
    assert sensor["state_topic"] == f"{prefix}/dock-2/safety_score"
    assert sensor["availability_topic"] == f"{prefix}/available"
    assert sensor["device"]["identifiers"] == [f"{prefix}_dock-2"]
    online = json.loads(late.on(f"{disc}/binary_sensor/{prefix}_dock-2/online/config")[0][0])
    assert (online["device_class"], online["state_topic"]) == ("connectivity", f"{prefix}/dock-2/online")
    event = json.loads(late.on(f"{disc}/event/{prefix}_dock-2/incident/config")[0][0])
    assert event["event_types"] == ["low", "medium", "high", "critical"]
    assert event["device"] == sensor["device"] == online["device"]
    assert all(retained for t, _, retained, _ in late.messages if t.startswith(disc))


@pytest.mark.postgres
def test_notifier_on_postgresql(tmp_path, pg_url):
    with Receiver(secret=SECRET) as receiver:
        config = notifier_config(tmp_path, receiver)
        config.source.write_text(config.source.read_text()
                                 + f'\n[database]\nurl = "{pg_url}"\n')
        config = load_config(config.source)
        with Store.from_config(config) as store:
            proc = start_notifier(config)
            ids = []
            for n in range(3):
                job_id = store_window(store, "gate", T0 + timedelta(minutes=10 * n),
                                      [incident(600 * n + 3)])
                ids += [i["id"] for i in store.incidents.list_incidents(job_id)]
                time.sleep(0.2)
            wait_all_done(store)
            stop(proc)
    assert sorted(r.json["id"] for r in receiver.delivered("/hook")) == sorted(ids)


@pytest.fixture
def own_broker(tmp_path):
    """A Mosquitto of this test's own, which the test may stop and start again."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    yield from broker_process(binary, port, conf)


@pytest.fixture
def auth_broker(tmp_path):
    """A Mosquitto that takes user guard with its password only."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "guard", "Zq-mqtt-pass"],
                   check=True, capture_output=True)
    conf = tmp_path / "mosquitto-auth.conf"
    # Started as root, Mosquitto drops to its own user, who cannot read tmp_path (0700);
    # "user root" keeps it as it was started (and means nothing when not started as root).
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\nuser root\n"
                    f"password_file {passwords}\n")
    yield from broker_process(binary, port, conf)


def broker_process(binary, port, conf):
    class Broker:
        def __init__(self):
            self.port = port
            self.proc = None

        def start(self):
            self.log = open(f"{conf}.log", "ab")
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log,
                                         stderr=subprocess.STDOUT)
            deadline = time.time() + 10
            while time.time() < deadline:
                if subprocess.run(["ss", "-ltn", f"sport = :{port}"], capture_output=True,
                                  text=True).stdout.count("LISTEN"):
                    return
                time.sleep(0.05)

        def stop(self):
            self.proc.terminate()
            self.proc.wait(10)

    broker = Broker()
    broker.start()
    yield broker
    if broker.proc.poll() is None:
        broker.stop()


def test_broker_password_from_systemd_credential(tmp_path, auth_broker, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt_password").write_text("Zq-mqtt-pass\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    with Receiver() as receiver:
        config = notifier_config(tmp_path, receiver, auth_broker.port, rules=False)
        config.source.write_text(config.source.read_text().replace(
            "[mqtt]\n", '[mqtt]\nusername = "guard"\n'))
        config = load_config(config.source)
        prefix = config.mqtt.topic_prefix
        proc = start_notifier(config)  # spawn: the child inherits the environment
        try:
            # Anonymous clients are refused by this broker: the notifier's "online" is
            # seen through a subscriber that logs in too.
            import paho.mqtt.client as paho
            seen = []
            client = paho.Client(paho.CallbackAPIVersion.VERSION2)
            client.username_pw_set("guard", "Zq-mqtt-pass")
            client.on_connect = lambda c, *a: c.subscribe(f"{prefix}/available", 1)
            client.on_message = lambda _c, _u, m: seen.append(m.payload)
            client.connect("127.0.0.1", auth_broker.port)
            client.loop_start()
            deadline = time.time() + 20
            while b"online" not in seen and time.time() < deadline:
                time.sleep(0.05)
            client.loop_stop()
            client.disconnect()
        finally:
            stop(proc)
    assert b"online" in seen


def test_broker_outage_loses_nothing(tmp_path, own_broker):
    with Receiver() as receiver:
        config = notifier_config(tmp_path, receiver, own_broker.port, rules=False)
        prefix = config.mqtt.topic_prefix
        watcher = Subscriber(own_broker.port, f"{prefix}/incidents")
        with Store.from_config(config) as store:
            proc = start_notifier(config)
            ids = []
            for n in range(8):
                if n == 2:
                    own_broker.stop()
                if n == 6:
                    own_broker.start()
                job_id = store_window(store, "gate", T0 + timedelta(minutes=10 * n),
                                      [incident(600 * n + 3)])
                ids += [i["id"] for i in store.incidents.list_incidents(job_id)]
                time.sleep(0.5)
            wait_all_done(store)
            retried = [r for r in store.reports.list_deliveries() if r["attempts"] > 1]
            stop(proc)
        watcher.wait_for(lambda: {json.loads(p)["id"] for p, _ in watcher.on(f"{prefix}/incidents")}
                         == set(ids))
        watcher.close()
    assert retried, "the outage should have made some deliveries wait"


def test_alerts_test_command_reports_each_destination(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        config = notifier_config(tmp_path, receiver)
        watcher = Subscriber(1883, f"{config.mqtt.topic_prefix}/test")
        result = CliRunner().invoke(cli_main, ["alerts", "test", "--config", str(config.source)])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert [line.split()[0] for line in lines] == ["mqtt", "webhook:r:0", "apprise:r:0"]
        assert all(" ok " in line for line in lines)
        assert "json://***" in result.output and SECRET not in result.output
        watcher.wait_for(lambda: watcher.on(f"{config.mqtt.topic_prefix}/test") != [])
        watcher.close()
        assert {r.path for r in receiver.requests} == {"/hook", "/apprise"}
        receiver.status = 410
        result = CliRunner().invoke(cli_main, ["alerts", "test", "--rule", "r", "--config",
                                               str(config.source)])
        assert result.exit_code == 1
        assert "webhook:r:0" in result.output and "FAILED  HTTP 410" in result.output
        assert "mqtt" not in result.output
        result = CliRunner().invoke(cli_main, ["alerts", "test", "--rule", "nope", "--config",
                                               str(config.source)])
        assert result.exit_code != 0 and "no rule 'nope'" in result.output


def test_destination_kinds_keep_their_listed_order_whatever_was_imported_first():
    """`alerts test` prints destinations in kind order; a process that imported the webhook
    plug-in before the others (as a long-lived test process does) must not reorder them."""
    code = ("import sys, vlmguard.alerts.apprise_urls, vlmguard.alerts.webhook\n"
            "from vlmguard.alerts.registry import kinds\n"
            "print(' '.join(kinds()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["mqtt", "webhook", "apprise"]


def daemon_config(daemon):
    return load_config(daemon.config_path)


def wait_gone(daemon, timeout: float = 30) -> None:
    """The SIGKILLed supervisor's children stop in order on their own (the lifeline)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not subprocess.run(["pgrep", "-f", str(daemon.config_path)],
                              capture_output=True).stdout.strip():
            return
        time.sleep(0.2)
    raise AssertionError("the children outlived their supervisor")


def test_vlmguard_run_alerts_end_to_end(tmp_path, vlmguard):
    """`vlmguard run` with the stand-in Gemini: an analysed archive's incident reaches the
    webhook and MQTT; the supervisor restarts a SIGKILLed notifier (the broker says
    offline by the will, then online again); a SIGKILLed supervisor leaves offline."""
    prefix = "t" + secrets.token_hex(4)
    with Receiver(secret=SECRET) as receiver:
        watcher = Subscriber(1883, f"{prefix}/#")
        daemon_extra = f"""
[mqtt]
host = "127.0.0.1"
topic_prefix = "{prefix}"
discovery_prefix = "ha{prefix}"
keepalive_seconds = 5
[[alerts.rules]]
name = "site"
min_severity = "high"
cooldown_seconds = 0
webhooks = ["{receiver.url}/hook"]
webhook_secret = "{SECRET}"
"""
        daemon = vlmguard(workers=1, extra=daemon_extra)
        receiver.wait_for(lambda: receiver.delivered("/hook"), timeout=120)
        sent = receiver.delivered("/hook")[0]
        assert sent.signature_ok and sent.json["camera_id"] == "cam1"
        assert (sent.json["category"], sent.json["severity"]) == ("fall", "high")
        assert sent.json["snapshot_url"] == (f"http://127.0.0.1:{daemon.port}/api/incidents/"
                                             f"{sent.json['id']}/snapshot.jpg")
        watcher.wait_for(lambda: any(json.loads(p)["id"] == sent.json["id"]
                                     for p, _ in watcher.on(f"{prefix}/cam1/incident")))
        watcher.wait_for(lambda: watcher.on(f"{prefix}/cam1/safety_score") != [])
        watcher.wait_for(lambda: (b"online", False) in watcher.on(f"{prefix}/cam1/online"))
        pid = daemon.child_pid("notifier")
        assert pid is not None
        before = len(watcher.on(f"{prefix}/available"))
        os.kill(pid, signal.SIGKILL)
        watcher.wait_for(lambda: [p for p, _ in watcher.on(f"{prefix}/available")[before:]]
                         [:2] == [b"offline", b"online"], timeout=30)
        # The whole daemon SIGKILLed while the receiver is down: what it had not delivered
        # stays in the outbox and goes out after the next start.
        receiver.fail_until = time.time() + 3600
        with Store.from_config(daemon_config(daemon)) as store:
            receiver.wait_for(lambda: [r for r in store.reports.list_deliveries(statuses=("pending",))
                                       if r["destination"] == "webhook:site:0"], timeout=60)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(10)
            watcher.wait_for(lambda: watcher.on(f"{prefix}/available")[-1][0] == b"offline")
            receiver.fail_until = 0
            wait_gone(daemon)
            again = vlmguard(workers=0, extra=daemon_extra)
            wait_all_done(store)
            incident_ids = {r["incident_id"] for r in store.reports.list_deliveries()
                            if r["destination"] == "webhook:site:0"}
            rows_after = store.reports.list_deliveries()
            again.stop()
        watcher.close()
    assert {r["status"] for r in rows_after} == {"delivered"}
    assert len(incident_ids) >= 2
    assert {r.json["id"] for r in receiver.delivered("/hook")} == incident_ids
    assert SECRET not in daemon.log_text()
