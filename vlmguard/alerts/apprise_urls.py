"""Apprise URLs: ntfy, Telegram, Slack, e-mail, Pushover, Matrix and about a hundred more,
one URL each, with no code of ours per service.

Apprise answers only yes or no; why it failed is in its log, captured per attempt (and
redacted: those lines may hold the URL and its token). Every failure is retried until the
delivery's max age, since a no cannot be told apart from a service that is down.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

from vlmguard.alerts.media import existing_snapshot
from vlmguard.alerts.plan import destination_name, title
from vlmguard.alerts.registry import Answer, delivered, failed, register, retry
from vlmguard.redact import redact_text


def body(payload: dict[str, Any]) -> str:
    if payload.get("type") != "incident":
        return str(payload.get("message", ""))
    lines = [str(payload.get("description", ""))]
    if payload.get("safety_score") is not None:
        lines.append(f"Safety score {payload['safety_score']}/100")
    lines.append(f"Snapshot: {payload['snapshot_url']}")
    lines.append(f"Clip: {payload['clip_url']}")
    return "\n".join(lines)


def scrub(text: str, url: str) -> str:
    """Apprise's log lines may quote pieces of the URL (a bot token, a topic, a user);
    every piece of the URL is masked wherever it shows."""
    for piece in sorted(re.split(r"[/:@?&=#,]+", url.partition("://")[2]), key=len, reverse=True):
        if len(piece) >= 4:
            text = text.replace(piece, "***")
    return text


@register("apprise")
class AppriseUrl:
    def __init__(self, url: str, data_dir: Path):
        self.url = url
        self.data_dir = data_dir

    @classmethod
    def configured(cls, config: Any) -> dict[str, "AppriseUrl"]:
        return {destination_name("apprise", rule.name, n): cls(url, config.data_dir)
                for rule in config.alerts.rules for n, url in enumerate(rule.urls)}

    def describe(self) -> str:
        # Apprise URLs keep their tokens in the path: the scheme alone is safe to show.
        return self.url.partition("://")[0] + "://***"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def notify(self, payload: dict[str, Any], committed_at=None) -> Answer:
        import apprise

        sender = apprise.Apprise()
        if not sender.add(self.url):
            return failed(f"{self.describe()}: not a URL Apprise knows")
        snapshot = existing_snapshot(self.data_dir, payload, committed_at)
        heading = (title(payload) if payload.get("type") == "incident"
                   else str(payload.get("title") or "vlmguard test"))
        with apprise.LogCapture(level=logging.WARNING) as captured:
            ok = sender.notify(title=heading, body=body(payload),
                               attach=str(snapshot) if snapshot else None)
        if ok:
            return delivered("sent" + (" with snapshot" if snapshot else ""))
        reason = " ".join(captured.getvalue().split())[-300:] or "Apprise reported a failure"
        return retry(scrub(redact_text(reason), self.url))

    async def send(self, delivery: Any) -> Answer:
        # Apprise's own calls block; a thread keeps the other deliveries moving.
        return await asyncio.to_thread(self.notify, delivery.payload, delivery.created_at)

    async def test(self, payload: dict[str, Any], key: str) -> Answer:
        return await asyncio.to_thread(self.notify, payload)
