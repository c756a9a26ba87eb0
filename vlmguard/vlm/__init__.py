"""The vision-language model seen by the analyzer: one small interface, any provider.

A provider (Gemini in vlm/gemini.py) takes a prepared clip and a prompt and returns the
model's JSON answer with its token usage, or raises AnalysisError saying whether trying
again later can help. Checking the answer against the fixed contract happens here, once,
whatever the provider.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

SEVERITIES = ("low", "medium", "high", "critical")

DEFAULT_PROMPT = """You are a safety officer reviewing CCTV footage from a fixed camera.
Watch the whole clip and report every event that puts people or property at risk, such as:
a person falling or lying on the ground; fights, assaults or aggressive behaviour; fire,
smoke or sparks; intrusion into restricted or closed areas; unsafe acts near machinery,
forklifts or vehicles (no protective equipment, standing in the path of a moving vehicle,
reaching into moving parts); people in distress or needing help; blocked emergency exits;
spills or obstacles on walkways.

Answer in JSON only:
- safety_score: 0-100, 100 when nothing unsafe happens, lower the more serious the risks;
- summary: one or two sentences on what happens in the clip;
- incidents: one entry per event, with start_offset_s and end_offset_s (seconds from the
  start of the clip), category (a short lower-case label such as "fall", "fire",
  "intrusion", "vehicle", "machinery", "fight", "distress"), severity (low, medium, high or
  critical), description (what happens, who and where in the frame) and confidence (0-1).
Report no incident when nothing unsafe happens. Do not invent events you cannot see."""

# The fixed contract, in the OpenAPI subset that structured output takes.
RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "OBJECT",
    "properties": {
        "safety_score": {"type": "INTEGER", "minimum": 0, "maximum": 100},
        "summary": {"type": "STRING"},
        "incidents": {"type": "ARRAY", "items": {
            "type": "OBJECT",
            "properties": {
                "start_offset_s": {"type": "NUMBER"},
                "end_offset_s": {"type": "NUMBER"},
                "category": {"type": "STRING"},
                "severity": {"type": "STRING", "enum": list(SEVERITIES)},
                "description": {"type": "STRING"},
                "confidence": {"type": "NUMBER", "minimum": 0, "maximum": 1},
            },
            "required": ["start_offset_s", "end_offset_s", "category", "severity",
                         "description", "confidence"],
        }},
    },
    "required": ["safety_score", "summary", "incidents"],
}


class AnalysisError(Exception):
    """The analysis did not produce a usable answer; the message says what happened."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class Clip:
    path: Path
    duration_s: float
    fps: float
    mime_type: str = "video/mp4"


@dataclass(frozen=True)
class Answer:
    data: Any
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None


class VlmClient(Protocol):
    def analyze(self, clip: Clip, prompt: str, keep_alive: Callable[[], None]) -> Answer:
        """Analyse the clip; call keep_alive() between long steps (it may raise to stop)."""


def build_prompt(site_context: str) -> str:
    if not site_context.strip():
        return DEFAULT_PROMPT
    return f"{DEFAULT_PROMPT}\n\nAbout this camera: {site_context.strip()}"


@dataclass(frozen=True)
class Finding:
    safety_score: int
    summary: str
    incidents: tuple[dict[str, Any], ...]


def check_answer(data: Any, duration_s: float) -> Finding:
    """Hold the answer to the contract; AnalysisError (retryable) says what broke it."""
    def broken(reason: str) -> AnalysisError:
        return AnalysisError(f"invalid model output: {reason}", retryable=True)

    if not isinstance(data, dict):
        raise broken(f"expected a JSON object, got {type(data).__name__}")
    score = data.get("safety_score")
    if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= 100:
        raise broken(f"safety_score must be an integer 0-100, got {score!r}")
    summary = data.get("summary")
    if not isinstance(summary, str):
        raise broken("summary missing")
    incidents = data.get("incidents")
    if not isinstance(incidents, list):
        raise broken("incidents must be a list")
    return Finding(score, summary, tuple(check_incident(i, n, duration_s, broken)
                                         for n, i in enumerate(incidents)))


def check_incident(item: Any, n: int, duration_s: float, broken) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise broken(f"incidents[{n}] is not an object")
    start, end = item.get("start_offset_s"), item.get("end_offset_s")
    if not all(is_number(v) for v in (start, end)):
        raise broken(f"incidents[{n}] offsets must be numbers")
    # A second of slack: models round to whole seconds.
    if not 0 <= start <= end <= duration_s + 1:
        raise broken(f"incidents[{n}] offsets {start}-{end} s are outside the "
                     f"{duration_s:.0f} s clip")
    if item.get("severity") not in SEVERITIES:
        raise broken(f"incidents[{n}].severity must be one of {', '.join(SEVERITIES)}")
    for key in ("category", "description"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise broken(f"incidents[{n}].{key} missing")
    confidence = item.get("confidence")
    if confidence is not None and not (is_number(confidence) and 0 <= confidence <= 1):
        raise broken(f"incidents[{n}].confidence must be 0-1")
    return {"start_offset_s": float(start), "end_offset_s": float(min(end, duration_s)),
            "category": item["category"].strip().lower()[:100], "severity": item["severity"],
            "description": item["description"].strip(),
            "confidence": float(confidence) if confidence is not None else None}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
