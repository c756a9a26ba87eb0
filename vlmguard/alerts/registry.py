"""The destination seam: every kind of alert destination registers here, and the notifier
and `vlmguard alerts test` reach destinations only through it.

A kind is a class decorated with @register("kind"). Its classmethod configured(config)
returns {destination name: instance} for what the config asks of that kind (names as in
vlmguard.alerts.plan: "mqtt", "webhook:RULE:N", "apprise:RULE:N"). An instance has
async start(), send(delivery) -> Answer, test() -> Answer, close(), and describe() (a
label with no secret in it). The table is filled once, on import of the plug-in modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vlmguard.plugins import PluginTable

PLUGIN_MODULES = ("vlmguard.alerts.mqtt", "vlmguard.alerts.webhook", "vlmguard.alerts.apprise_urls")
KINDS = PluginTable(PLUGIN_MODULES)


@dataclass(frozen=True)
class Answer:
    """What one attempt came to: delivered, worth retrying, or failed for good."""

    outcome: str  # delivered | retry | failed
    detail: str = ""
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


def delivered(detail: str = "") -> Answer:
    return Answer("delivered", detail)


def retry(detail: str, retry_after: float | None = None) -> Answer:
    return Answer("retry", detail, retry_after)


def failed(detail: str) -> Answer:
    return Answer("failed", detail)


def register(kind: str) -> Callable[[type], type]:
    return KINDS.register(kind)


def kinds() -> dict[str, type]:
    return KINDS.kinds()


def configured(config: Any, rule: str | None = None) -> dict[str, Any]:
    """Every destination the config names, or only those of one rule (MQTT with none)."""
    out: dict[str, Any] = {}
    for cls in kinds().values():
        out.update(cls.configured(config))
    if rule is not None:
        out = {name: d for name, d in out.items() if name.split(":")[1:2] == [rule]}
    return out
