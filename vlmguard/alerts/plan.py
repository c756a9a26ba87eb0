"""Which deliveries an analysed window makes, and what each one carries.

Pure functions of the config: the outbox (vlmguard/store/outbox.py) calls them inside the
transaction that stores the incidents, so the deliveries are written with the incidents or
not at all (the transactional outbox). Nothing here touches the network or the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmguard.config import AlertRule, Config
from vlmguard.times import iso
from vlmguard.vlm import SEVERITIES

MQTT = "mqtt"


@dataclass(frozen=True)
class Route:
    """One destination an incident goes to, under one rule (None: MQTT, every incident)."""

    destination: str
    rule: str | None
    cooldown_seconds: float


def destination_name(kind: str, rule: str, index: int) -> str:
    """The stable name a delivery row keeps: kind:rule:position in the rule's list."""
    return f"{kind}:{rule}:{index}"


def kind_of(destination: str) -> str:
    return destination.split(":", 1)[0]


def rule_destinations(rule: AlertRule) -> list[str]:
    return ([destination_name("webhook", rule.name, n) for n in range(len(rule.webhooks))]
            + [destination_name("apprise", rule.name, n) for n in range(len(rule.urls))])


def matches(rule: AlertRule, camera_id: str, category: str, severity: str) -> bool:
    if severity not in SEVERITIES:
        return False
    if SEVERITIES.index(severity) < SEVERITIES.index(rule.min_severity):
        return False
    if rule.categories and category not in rule.categories:
        return False
    return not rule.cameras or camera_id in rule.cameras


class AlertPlan:
    """The routing half of the alerts config, handed to the job table."""

    def __init__(self, config: Config):
        self.config = config

    @property
    def enabled(self) -> bool:
        return self.config.mqtt.enabled or self.config.alerts.enabled

    def incident_routes(self, camera_id: str, category: str, severity: str) -> list[Route]:
        routes = [Route(MQTT, None, 0.0)] if self.config.mqtt.enabled else []
        for rule in self.config.alerts.rules:
            if matches(rule, camera_id, category, severity):
                routes += [Route(d, rule.name, rule.cooldown_seconds)
                           for d in rule_destinations(rule)]
        return routes

    def score_destinations(self, camera_id: str) -> list[str]:
        """Where each analysed window's safety score goes (MQTT's retained topic)."""
        return [MQTT] if self.config.mqtt.enabled else []

    def incident_payload(self, incident: dict[str, Any], job: Any, safety_score: int | None,
                         summary: str | None) -> dict[str, Any]:
        return incident_payload(self.config.public_url, incident, job.id, safety_score, summary)

    def score_payload(self, job: Any, safety_score: int | None,
                      summary: str | None) -> dict[str, Any]:
        return {"type": "safety_score", "camera_id": job.camera_id, "job_id": job.id,
                "safety_score": safety_score, "summary": summary,
                "window_start": iso(job.segment_start), "window_end": iso(job.segment_end)}


def incident_payload(public_url: str, incident: dict[str, Any], job_id: int,
                     safety_score: int | None, summary: str | None) -> dict[str, Any]:
    """The JSON every destination gets for one incident (webhooks verbatim, MQTT too)."""
    incident_id = incident["id"]
    return {
        "type": "incident",
        "id": incident_id,
        "camera_id": incident["camera_id"],
        "start": iso(incident["start_at"]),
        "end": iso(incident["end_at"]),
        "category": incident["category"],
        "severity": incident["severity"],
        # Home Assistant's event entity reads the event's type from this key.
        "event_type": incident["severity"],
        "description": incident["description"],
        "confidence": incident.get("confidence"),
        "safety_score": safety_score,
        "summary": summary,
        "job_id": job_id,
        "snapshot_url": f"{public_url}/api/incidents/{incident_id}/snapshot.jpg",
        "clip_url": f"{public_url}/api/incidents/{incident_id}/clip.mp4",
    }


def with_links(payload: dict[str, Any], public_url: str) -> dict[str, Any]:
    """An incident's payload with its links on this box's server: the box that recorded
    the incident serves its snapshot and clip, whichever box analysed it."""
    if payload.get("type") != "incident" or "id" not in payload:
        return payload
    base = f"{public_url}/api/incidents/{payload['id']}"
    return dict(payload, snapshot_url=f"{base}/snapshot.jpg", clip_url=f"{base}/clip.mp4")


def title(payload: dict[str, Any]) -> str:
    """A phone-sized headline: "HIGH fall on dock-2 at 08:00:31" (UTC)."""
    when = payload.get("start") or ""
    clock = when[11:19] if len(when) >= 19 else when
    return (f"{str(payload.get('severity', '')).upper()} {payload.get('category', '')} on "
            f"{payload.get('camera_id', '')} at {clock}")


