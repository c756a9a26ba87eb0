"""Webhooks: a POST of the JSON payload per delivery (aiohttp client).

Idempotency-Key is the delivery's key, the same on every retry of it, so a receiver that
got an attempt whose answer was lost can tell. With a secret, the body is signed:
X-Vlmguard-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>"> with the
X-Vlmguard-Timestamp sent alongside (a receiver can refuse old timestamps: replays).

A delivery has one deadline, TIMEOUT_SECONDS from connecting to the last byte read,
however slowly a receiver drips its answer; of the answer's body at most
MAX_ANSWER_BYTES are read (only its start is kept, as the failure's reason) and the
connection is closed on the rest, so a receiver answering gigabytes costs nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from vlmguard.alerts.plan import destination_name
from vlmguard.alerts.registry import Answer, delivered, failed, register, retry
from vlmguard.redact import mask_path, redact_text

TIMEOUT_SECONDS = 10.0
MAX_ANSWER_BYTES = 64 * 1024
RETRIED_STATUSES = (408, 429)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def judge(status: int, text: str, retry_after: str | None) -> Answer:
    """2xx delivered; 408, 429 and 5xx retried; any other answer fails with its reason."""
    if 200 <= status < 300:
        return delivered(f"HTTP {status}")
    reason = f"HTTP {status}: {redact_text(text.strip()[:200])}".rstrip(": ")
    if status in RETRIED_STATUSES or status >= 500:
        return retry(reason, seconds(retry_after))
    return failed(reason)


def seconds(retry_after: str | None) -> float | None:
    try:
        return min(max(float(retry_after), 0.0), 3600.0) if retry_after else None
    except ValueError:
        return None  # an HTTP date: the backoff serves


async def read_start(response: aiohttp.ClientResponse) -> bytes:
    """At most MAX_ANSWER_BYTES of the body; the rest is never drained (leaving the
    block closes the connection on it)."""
    body = bytearray()
    while len(body) < MAX_ANSWER_BYTES:
        chunk = await response.content.read(MAX_ANSWER_BYTES - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


@register("webhook")
class Webhook:
    def __init__(self, url: str, secret: str, secret_file: str):
        self.url = url
        self.secret = secret
        self.secret_file = secret_file
        self.session: aiohttp.ClientSession | None = None

    @classmethod
    def configured(cls, config: Any) -> dict[str, "Webhook"]:
        return {destination_name("webhook", rule.name, n):
                cls(url, rule.webhook_secret, rule.webhook_secret_file)
                for rule in config.alerts.rules for n, url in enumerate(rule.webhooks)}

    def describe(self) -> str:
        return mask_path(self.url)

    async def start(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def read_secret(self) -> bytes | None:
        """Read on every send, so a rotated secret file takes effect without a restart."""
        if self.secret:
            return self.secret.encode()
        if self.secret_file:
            return Path(self.secret_file).read_text().strip().encode()
        return None

    async def post(self, payload: dict[str, Any], key: str) -> Answer:
        await self.start()
        body = encode(payload)
        headers = {"Content-Type": "application/json", "Idempotency-Key": key,
                   "User-Agent": "vlmguard"}
        try:
            secret = self.read_secret()
        except OSError as exc:
            return retry(f"cannot read webhook_secret_file: {exc.strerror or exc}")
        if secret is not None:
            timestamp = str(int(time.time()))
            headers["X-Vlmguard-Timestamp"] = timestamp
            headers["X-Vlmguard-Signature"] = signature(secret, timestamp, body)
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS), \
                    self.session.post(self.url, data=body, headers=headers,
                                      allow_redirects=False) as response:
                text = (await read_start(response)).decode(errors="replace")
                return judge(response.status, text, response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return retry(f"no answer within {TIMEOUT_SECONDS:g} s")
        except aiohttp.ClientError as exc:
            return retry(redact_text(f"{type(exc).__name__}: {exc}"))

    async def send(self, delivery: Any) -> Answer:
        return await self.post(delivery.payload, delivery.key)

    async def test(self, payload: dict[str, Any], key: str) -> Answer:
        return await self.post(payload, key)
