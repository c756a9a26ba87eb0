"""MQTT (paho-mqtt): incidents, per-camera scores and states, availability with a last will,
and Home Assistant discovery so a Home Assistant user sees vlmguard with no YAML.

Topics under <prefix>: available (online/offline, retained; the broker publishes offline
as our last will when the notifier dies without saying goodbye), incidents and
<camera>/incident (each incident, QoS 1), <camera>/safety_score (retained, after every
analysed window), <camera>/online (retained). paho's network thread reconnects on its
own; deliveries made while the broker is away are retried from the outbox, and made due
at once when the connection comes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

from vlmguard import __version__
from vlmguard.alerts.plan import MQTT
from vlmguard.alerts.registry import Answer, delivered, register, retry
from vlmguard.logs import get_logger
from vlmguard.vlm import SEVERITIES

log = get_logger("vlmguard.alerts.mqtt")
PUBACK_SECONDS = 10.0
NODE_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


CREDENTIAL = "mqtt_password"


def password(path: str) -> str | None:
    """From password_file, else systemd's credential $CREDENTIALS_DIRECTORY/mqtt_password
    (LoadCredential=), else none."""
    if path:
        return Path(path).read_text().strip()
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).is_file():
        return (Path(credentials) / CREDENTIAL).read_text().strip()
    return None


def node_id(prefix: str, camera_id: str) -> str:
    return NODE_CHARS.sub("_", f"{prefix}_{camera_id}")


def discovery_documents(settings: Any, camera_id: str) -> dict[str, dict[str, Any]]:
    """{topic: retained config document} for one camera's Home Assistant device."""
    prefix, node = settings.topic_prefix, node_id(settings.topic_prefix, camera_id)
    base = f"{settings.discovery_prefix}/{{}}/{node}/{{}}/config"
    device = {"identifiers": [node], "name": f"vlmguard {camera_id}", "manufacturer": "vlmguard",
              "model": "vlmguard camera", "sw_version": __version__}
    common = {"availability_topic": f"{prefix}/available", "payload_available": "online",
              "payload_not_available": "offline", "device": device}
    return {
        base.format("sensor", "safety_score"): common | {
            "name": "Safety score", "unique_id": f"{node}_safety_score",
            "state_topic": f"{prefix}/{camera_id}/safety_score", "state_class": "measurement",
            "icon": "mdi:shield-check"},
        base.format("binary_sensor", "online"): common | {
            "name": "Online", "unique_id": f"{node}_online", "device_class": "connectivity",
            "state_topic": f"{prefix}/{camera_id}/online", "payload_on": "online",
            "payload_off": "offline"},
        base.format("event", "incident"): common | {
            "name": "Incident", "unique_id": f"{node}_incident",
            "state_topic": f"{prefix}/{camera_id}/incident", "event_types": list(SEVERITIES),
            "icon": "mdi:alert"},
    }


@register("mqtt")
class Mqtt:
    def __init__(self, config: Any):
        self.settings = config.mqtt
        self.cameras = [c.id for c in config.cameras]
        self.prefix = self.settings.topic_prefix
        self.client = None
        self.connected = threading.Event()
        # Set by paho's thread on every (re)connect; the notifier makes waiting retries due.
        self.came_back = threading.Event()
        self.camera_states: dict[str, str] = {}
        self.lock = threading.Lock()

    @classmethod
    def configured(cls, config: Any) -> dict[str, "Mqtt"]:
        return {MQTT: cls(config)} if config.mqtt.enabled else {}

    def describe(self) -> str:
        return f"mqtt://{self.settings.host}:{self.settings.port}/{self.prefix}"

    async def start(self) -> None:
        if self.client is not None:
            return
        import paho.mqtt.client as paho

        client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                             client_id=f"vlmguard-{socket.gethostname()}-{self.prefix}"[:120])
        client.will_set(f"{self.prefix}/available", "offline", qos=1, retain=True)
        if self.settings.username:
            client.username_pw_set(self.settings.username, password(self.settings.password_file))
        if self.settings.tls:
            client.tls_set()
        client.reconnect_delay_set(1, 30)
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        self.client = client
        client.connect_async(self.settings.host, self.settings.port,
                             keepalive=self.settings.keepalive_seconds)
        client.loop_start()

    def on_connect(self, client, _userdata, _flags, reason, _properties=None) -> None:
        if reason.is_failure:
            log.warning("MQTT broker refused the connection", reason=str(reason))
            return
        client.publish(f"{self.prefix}/available", "online", qos=1, retain=True)
        if self.settings.discovery_prefix:
            for camera_id in self.cameras:
                for topic, document in discovery_documents(self.settings, camera_id).items():
                    client.publish(topic, json.dumps(document), qos=1, retain=True)
        with self.lock:
            for camera_id, state in self.camera_states.items():
                client.publish(f"{self.prefix}/{camera_id}/online", state, qos=1, retain=True)
        self.connected.set()
        self.came_back.set()
        log.info("MQTT connected", broker=self.describe())

    def on_disconnect(self, _client, _userdata, _flags, reason, _properties=None) -> None:
        if self.connected.is_set():
            log.warning("MQTT connection lost", broker=self.describe(), reason=str(reason))
        self.connected.clear()

    def set_camera_states(self, states: dict[str, bool]) -> None:
        """Publish each camera's online state when it changes (retained)."""
        with self.lock:
            for camera_id, online in states.items():
                state = "online" if online else "offline"
                if self.camera_states.get(camera_id) == state:
                    continue
                self.camera_states[camera_id] = state
                if self.client is not None and self.connected.is_set():
                    self.client.publish(f"{self.prefix}/{camera_id}/online", state, qos=1,
                                        retain=True)

    def publish_and_wait(self, messages: list[tuple[str, str, bool]]) -> Answer:
        if self.client is None or not self.connected.is_set():
            return retry("not connected to the MQTT broker")
        infos = [self.client.publish(topic, body, qos=1, retain=retain)
                 for topic, body, retain in messages]
        for info in infos:
            try:
                info.wait_for_publish(PUBACK_SECONDS)
            except (RuntimeError, ValueError) as exc:
                return retry(f"publish failed: {exc}")
            if not info.is_published():
                return retry(f"no PUBACK within {PUBACK_SECONDS:g} s")
        return delivered("PUBACK")

    def messages(self, payload: dict[str, Any]) -> list[tuple[str, str, bool]]:
        if payload.get("type") == "system":
            # The daemon's own state (a role crash-looping, recovered): retained, so a
            # dashboard that connects later sees it.
            return [(f"{self.prefix}/system", json.dumps(payload), True)]
        camera_id = payload["camera_id"]
        if payload.get("type") == "safety_score":
            return [(f"{self.prefix}/{camera_id}/safety_score", str(payload["safety_score"]), True)]
        body = json.dumps(payload)
        return [(f"{self.prefix}/incidents", body, False),
                (f"{self.prefix}/{camera_id}/incident", body, False)]

    async def send(self, delivery: Any) -> Answer:
        return await asyncio.to_thread(self.publish_and_wait, self.messages(delivery.payload))

    async def test(self, payload: dict[str, Any], key: str) -> Answer:
        deadline = asyncio.get_running_loop().time() + PUBACK_SECONDS
        while not self.connected.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        return await asyncio.to_thread(self.publish_and_wait,
                                       [(f"{self.prefix}/test", json.dumps(payload), False)])

    async def close(self) -> None:
        """Say offline ourselves (retained), so a clean stop is not left to the will."""
        if self.client is None:
            return
        if self.connected.is_set():
            info = self.client.publish(f"{self.prefix}/available", "offline", qos=1, retain=True)
            try:
                await asyncio.to_thread(info.wait_for_publish, 3.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.client = None
