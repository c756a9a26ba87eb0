"""Real receivers for alert tests: an aiohttp webhook server on 127.0.0.1 (checks the
signature, can answer 500 for a while) and a paho MQTT subscriber that records topics,
payloads and retained flags."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

from helpers import free_port


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes
    at: float
    signature_ok: bool | None
    answered: int
    json: object = None
    files: dict = field(default_factory=dict)


class Receiver:
    """POSTs to any path are recorded; the first `fail_until` seconds (or `fail_count`
    requests) get 500, later ones 200 (or `status`)."""

    def __init__(self, secret: str | None = None):
        self.secret = secret
        self.port = free_port()
        self.requests: list[Received] = []
        self.fail_until = 0.0
        self.fail_count = 0
        self.status = 200
        self.delay = 0.0  # seconds before answering (a slow receiver: kill mid-delivery)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=50 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.runner = runner
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> "Receiver":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def check(self, headers, body: bytes) -> bool | None:
        if self.secret is None:
            return None
        timestamp = headers.get("X-Vlmguard-Timestamp", "")
        expected = "sha256=" + hmac.new(self.secret.encode(), timestamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, headers.get("X-Vlmguard-Signature", ""))

    async def handle(self, request: web.Request) -> web.Response:
        files = {}
        if request.content_type.startswith("multipart/"):
            body = b""
            data = await request.post()
            payload = {}
            for name, value in data.items():
                if hasattr(value, "file"):
                    files[name] = value.file.read()
                else:
                    payload[name] = value
        else:
            body = await request.read()
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            # Apprise's json:// puts attachments inline, base64.
            if isinstance(payload, dict):
                for item in payload.get("attachments") or []:
                    files[item.get("filename", "?")] = item.get("base64", "")
        if self.delay:
            await asyncio.sleep(self.delay)
        failing = time.time() < self.fail_until or self.fail_count > 0
        if self.fail_count > 0:
            self.fail_count -= 1
        answered = 500 if failing else self.status
        self.requests.append(Received(request.path, dict(request.headers), body, time.time(),
                                      self.check(request.headers, body), answered, payload, files))
        return web.Response(status=answered, text="down for a while" if failing else "ok")

    def delivered(self, path: str | None = None) -> list[Received]:
        return [r for r in self.requests if r.answered < 300 and (path is None or r.path == path)]

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out; received {[(r.path, r.answered) for r in self.requests]}")


class Subscriber:
    """A real MQTT client subscribed to some topic filters; messages in arrival order."""

    def __init__(self, port: int, *filters: str):
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes, bool, float]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.filters = filters
        self.client.on_connect = self.on_connect
        self.client.on_message = self.on_message
        self.client.on_subscribe = lambda *a, **k: self.subscribed.set()
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise AssertionError(f"no MQTT broker on 127.0.0.1:{port}")

    def on_connect(self, client, _userdata, _flags, _reason, _properties=None) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    def on_message(self, _client, _userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, bool(message.retain),
                                  time.time()))

    def on(self, topic: str) -> list[tuple[bytes, bool]]:
        with self.lock:
            return [(p, r) for t, p, r, _ in self.messages if t == topic]

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        with self.lock:
            seen = [(t, p[:60], r) for t, p, r, _ in self.messages][-20:]
        raise AssertionError(f"timed out; last MQTT messages: {seen}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
