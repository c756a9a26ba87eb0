"""The vision-language model seen by the analyzer: one small interface, any provider.

A provider (one module per kind, registered in vlm/registry.py) takes a prepared clip and
a prompt and returns the model's JSON answer with its token usage, or raises
AnalysisError saying whether trying again later can help. Checking the answer against the
fixed contract happens here, once, whatever the provider.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Protocol

from vlmguard.errors import first_line
from vlmguard.options import opt

SEVERITIES = ("low", "medium", "high", "critical")
CATEGORIES = ("fall", "fight", "fire_smoke", "intrusion", "unsafe_machinery", "vehicle",
              "person_in_distress", "blocked_exit", "spill", "ppe", "camera_problem", "other")

PROMPT = """You are a safety officer reviewing footage from one fixed CCTV camera.
What you are shown: {frames}. There is no audio. A date and time overlay burned into the
picture is part of the camera, not an event.

Report every event that puts people or property at risk:
- fall: a person falling, or lying on the ground;
- fight: fighting, assault, aggressive pushing;
- fire_smoke: fire, smoke or sparks;
- intrusion: someone entering a closed, fenced or restricted area;
- unsafe_machinery: reaching into moving parts, riding forks, standing under a load;
- vehicle: a person in the path of a moving vehicle or forklift, a collision, speeding;
- person_in_distress: someone who seems injured, unwell or asking for help;
- blocked_exit: an emergency exit or escape route obstructed;
- spill: liquid or debris on a walkway;
- ppe: missing protective equipment where it is clearly required (hard hat, high-visibility vest);
- camera_problem: the view is dark, covered, blurred, frozen or pointed away. A blinded
  camera is a safety problem in itself: report it as an incident covering the affected time;
- other: any other clear risk to people or property.

Do not flag: people walking, working or talking normally; vehicles driving normally;
shadows, reflections, light changes, rain or insects; the timestamp overlay; anything
you cannot actually see. Never identify people or guess who they are: describe them by
clothing and position only. When nothing unsafe happens, report no incident.

Offsets are seconds from the start of the clip and must lie within it.
safety_score: 100 when nothing unsafe happens, lower the more serious the risks."""

# The fixed contract as one neutral JSON Schema; each provider turns it into its own
# structured-output form (Gemini's OpenAPI subset, OpenAI's strict json_schema). The
# models read the descriptions, and the order of the properties is the order they are
# asked to write them in (the summary before the judgement).
INCIDENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One unsafe event seen in the clip.",
    "properties": {
        "start_offset_s": {"type": "number", "description": "When it starts, in seconds from "
                           "the start of the clip."},
        "end_offset_s": {"type": "number", "description": "When it ends, in seconds from the "
                         "start of the clip; not before start_offset_s."},
        "category": {"type": "string", "enum": list(CATEGORIES),
                     "description": "The kind of event."},
        "severity": {"type": "string", "enum": list(SEVERITIES),
                     "description": "How serious the risk is."},
        "description": {"type": "string", "description": "What happens and where in the "
                        "frame, people described by clothing and position, never named."},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1,
                       "description": "How sure you are that it happened, 0 to 1."},
    },
    "required": ["start_offset_s", "end_offset_s", "category", "severity", "description",
                 "confidence"],
}
RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The safety review of one clip.",
    "properties": {
        "summary": {"type": "string", "description": "One or two sentences on what happens "
                    "in the clip."},
        "incidents": {"type": "array", "items": INCIDENT_SCHEMA,
                      "description": "Every unsafe event, in time order; empty when there is "
                      "none."},
        "safety_score": {"type": "integer", "minimum": 0, "maximum": 100,
                         "description": "100 when nothing unsafe happens, lower the more "
                         "serious the risks."},
    },
    "required": ["summary", "incidents", "safety_score"],
}


# Bounds on what a model may hand back: an answer is stored in the job, its incidents and
# every alert payload, so a runaway or hostile one must not grow them without limit.
MAX_ANSWER_CHARS = 256 * 1024
MAX_INCIDENTS = 50
MAX_SUMMARY_CHARS = 2000
MAX_DESCRIPTION_CHARS = 1000
MAX_CATEGORY_CHARS = 100
TRUNCATED = "\u2026[truncated]"
JSON_TOO_DEEP = 64


class AnalysisError(Exception):
    """The analysis did not produce a usable answer; the message says what happened.

    bad_request: the provider refused the request itself (an HTTP 400 no adaptation
    fixed): the next provider is tried, and the same refusal on several windows in a row
    puts this provider aside as misconfigured. refusal: the model declined to look at
    this footage (a safety filter): the next provider is tried, the job is not retried."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None,
                 bad_request: bool = False, refusal: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.bad_request = bad_request
        self.refusal = refusal


class AccountProblem(Exception):
    """Nothing is wrong with the job: the account or model is (bad key, daily quota gone,
    model retired, access denied). Every analyzer pauses; the job waits untouched."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RateLimited(Exception):
    """A per-minute limit: every analyzer waits retry_after seconds; the job is not charged."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Frame:
    """One distinct keyframe as a JPEG, offset_s seconds from the start of the clip."""

    path: Path
    offset_s: float


@dataclass(frozen=True)
class Clip:
    path: Path
    duration_s: float
    fps: float
    mime_type: str = "video/mp4"
    # The keyframes left after near-duplicates were dropped (empty when not extracted).
    frames: tuple[Frame, ...] = ()
    # Nothing changed in the whole clip: path is a one-frame video of that one picture.
    still: bool = False

    @property
    def frame_interval_s(self) -> float:
        return 1.0 / self.fps if self.fps > 0 else 1.0


@dataclass(frozen=True)
class Answer:
    data: Any
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    thoughts_tokens: int | None = None
    model_version: str | None = None
    # Prompt tokens the provider served from its cache (billed lower), where it says.
    cached_tokens: int | None = None
    # What was sent, for the record: {"images": n, "requests": n, "estimated_prompt_tokens"...}.
    request: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderSettings:
    """The keys every [providers.NAME] table has; a kind adds its own in a subclass."""

    kind: str = opt()
    model: str = opt("")
    base_url: str = opt("")
    api_key_env: str = opt("")
    api_key_file: str = opt("")
    # One model request, start to finish (connect, upload, answer): a total deadline.
    timeout_seconds: float = opt(120.0, lo=1, hi=3600)
    max_output_tokens: int = opt(2048, lo=256, hi=65536)
    pause_probe_minutes: float = opt(10.0, lo=0.01, hi=1440)
    # Sent with every request; local servers otherwise sample at 1.0.
    temperature: float = opt(0.1, lo=0, hi=2)
    # A Retry-After or RetryInfo hint longer than this is cut to it (and logged).
    max_retry_wait_seconds: float = opt(3600.0, lo=1, hi=86400)
    # List prices per million tokens, for the console's cost estimate (0: not shown).
    # Thought tokens are billed as output.
    price_input_per_million: float = opt(0.0, lo=0, hi=100000)
    price_output_per_million: float = opt(0.0, lo=0, hi=100000)
    # Set from the table's name, never written in it.
    name: str = field(default="", metadata={"internal": True})

    @property
    def credential_name(self) -> str:
        return f"{self.name}_api_key"


def find_api_key(settings: ProviderSettings) -> str | None:
    """The key from the environment, systemd's credential store, or a key file."""
    key = os.environ.get(settings.api_key_env, "").strip() if settings.api_key_env else ""
    if key:
        return key
    candidates = []
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(os.environ["CREDENTIALS_DIRECTORY"]) / settings.credential_name)
    if settings.api_key_file:
        candidates.append(Path(settings.api_key_file).expanduser())
    for path in candidates:
        try:
            key = path.read_text().strip()
        except OSError:
            continue
        if key:
            return key
    return None


def where_keys_come_from(settings: ProviderSettings) -> str:
    places = [f"${settings.api_key_env}"] if settings.api_key_env else []
    places.append(f"$CREDENTIALS_DIRECTORY/{settings.credential_name}")
    if settings.api_key_file:
        places.append(settings.api_key_file)
    return " or ".join(places)


def retry_hint(value: Any, most: float, now: datetime | None = None) -> tuple[float, float] | None:
    """A server's wait hint in seconds (a number, "58s", or an HTTP date) as (seconds to
    wait, seconds asked), the wait cut to [0, most]; None when it says nothing usable.
    Hints come from outside: 1e12 or a date in the year 9999 must not park anything."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        asked = float(text[:-1] if text.endswith("s") else text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        asked = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if math.isnan(asked):
        return None
    return min(max(asked, 0.0), most), asked


def describe_wait(wait: float, asked: float) -> str:
    if asked <= wait:
        return f"{wait:g} s"
    return f"{wait:g} s (the server asked for {asked:.3g} s; max_retry_wait_seconds caps it)"


class VlmClient(Protocol):
    def analyze(self, clip: Clip, prompt: str, keep_alive: Callable[[], None]) -> Answer:
        """Analyse the clip; call keep_alive() between long steps (it may raise to stop)."""

    def probe(self) -> None:
        """The cheapest real request; raises AccountProblem while the account is unusable."""

    def adaptations(self) -> dict[str, str]:
        """What the client changed from its settings to suit its server, one line each."""


def build_prompt(site_context: str, clip: Clip | None = None,
                 part_of_stream: tuple[datetime, float] | None = None) -> str:
    """part_of_stream: (wall-clock start, seconds) when the clip is one window of a
    continuous recording, so that an event cut off at its edge is still reported."""
    prompt = PROMPT.format(frames=describe_frames(clip))
    if part_of_stream is not None:
        start, seconds = part_of_stream
        prompt += (f"\n\nThis clip is one {seconds:.0f}-second window of a continuous "
                   f"recording; it starts at {start:%Y-%m-%d %H:%M:%S} UTC. The footage "
                   "before and after it is reviewed separately: report an event even when it "
                   "is cut off at the start or the end of the clip, with the part you see.")
    if not site_context.strip():
        return prompt
    return f"{prompt}\n\nAbout this camera: {site_context.strip()}"


def describe_frames(clip: Clip | None) -> str:
    if clip is None:
        return "frames sampled from a CCTV recording"
    if clip.still:
        return (f"one frame, because the picture did not change at all during the whole "
                f"{clip.duration_s:.0f}-second recording (check that the camera is not "
                f"covered, frozen or pointed away)")
    return (f"keyframes about {clip.frame_interval_s:.0f} s apart from a "
            f"{clip.duration_s:.0f}-second recording")


MALFORMED = (AttributeError, TypeError, KeyError, IndexError, ValueError)


def read_answer(read: Callable[[Any], "Answer"], response: Any, server: str) -> "Answer":
    """read(response), a response the SDK could not shape into what it promises (a proxy's
    page, a body of the wrong shape) turned into this provider's failure."""
    try:
        return read(response)
    except MALFORMED as exc:
        raise AnalysisError(f"malformed response from {server} ({type(exc).__name__}: "
                            f"{first_line(exc)})", retryable=True) from None


def token_count(value: Any) -> int | None:
    """A token count from a server, if it is one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        return None
    return value


# The counts an Answer carries and a job stores, under the same names in both.
TOKEN_FIELDS = ("prompt_tokens", "output_tokens", "thoughts_tokens", "total_tokens")


def token_fields(source: Any) -> dict[str, int | None]:
    """An Answer's (or a stored job's) token counts by field name, to pass on whole."""
    return {name: getattr(source, name) for name in TOKEN_FIELDS}


def token_report(source: Any) -> dict[str, int | None]:
    """Token counts as the API and the CLI show them: prompt, output, thoughts, total."""
    return {name.removesuffix("_tokens"): getattr(source, name) for name in TOKEN_FIELDS}


def billed_together(earlier: list[Answer], answer: Answer) -> Answer:
    """The answer with the tokens of the requests made before it for the same clip: all
    were paid for. A count no request knew stays unknown."""
    def total(name: str) -> int | None:
        known = [v for v in (getattr(a, name) for a in (*earlier, answer)) if v is not None]
        return sum(known) if known else None
    return replace(answer, **{name: total(name) for name in (*TOKEN_FIELDS, "cached_tokens")})


def parse_answer(text: str) -> Any:
    """The model's answer text as JSON, refused when it is too large or nested too deeply
    (a deep nest would blow Python's recursion limit)."""
    if len(text) > MAX_ANSWER_CHARS:
        raise AnalysisError(f"invalid model output: {len(text):,} characters, more than "
                            f"{MAX_ANSWER_CHARS:,}", retryable=True)
    if nesting(text) > JSON_TOO_DEEP:
        raise AnalysisError("invalid model output: JSON nested too deeply", retryable=True)
    try:
        return json.loads(text)
    except ValueError:
        raise AnalysisError(f"invalid model output: not JSON ({text[:80]!r})",
                            retryable=True) from None


def nesting(text: str) -> int:
    """How deep brackets nest, counted without parsing (strings may hold brackets; then
    the count is too high, which only refuses an answer nobody would want)."""
    deepest = depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def clean_text(value: str, limit: int) -> str:
    """Text from a model as it may be stored and shown: control and format characters
    (and lone surrogates) removed, whitespace runs made one space, at most limit
    characters with the cut marked."""
    kept = []
    for char in value:
        category = unicodedata.category(char)
        if char in "\t\n\r" or category == "Zs":
            kept.append(" ")
        elif category not in ("Cc", "Cf", "Cs") or char == "\u200d":
            kept.append(char)
    text = " ".join("".join(kept).split())
    if len(text) > limit:
        text = text[:limit - len(TRUNCATED)].rstrip() + TRUNCATED
    return text


@dataclass(frozen=True)
class Finding:
    safety_score: int
    summary: str
    incidents: tuple[dict[str, Any], ...]


SEVERITY_RANK = {s: n for n, s in enumerate(SEVERITIES)}


def check_answer(data: Any, duration_s: float, slack_s: float = 1.0,
                 log: Callable[..., None] | None = None) -> Finding:
    """Hold the answer to the contract, repairing what can be: offsets up to slack_s (one
    frame interval) past the clip's end are clamped, an incident wholly outside the clip
    is dropped (and logged), texts are cleaned and cut to their bounds, and past
    MAX_INCIDENTS the least severe incidents are dropped (logged). AnalysisError
    (retryable) says what could not be repaired."""
    def broken(reason: str) -> AnalysisError:
        return AnalysisError(f"invalid model output: {reason}", retryable=True)

    if not isinstance(data, dict):
        raise broken(f"expected a JSON object, got {type(data).__name__}")
    score = data.get("safety_score")
    if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= 100:
        raise broken(f"safety_score must be an integer 0-100, got {repr(score)[:40]}")
    summary = data.get("summary")
    if not isinstance(summary, str):
        raise broken("summary missing")
    incidents = data.get("incidents")
    if not isinstance(incidents, list):
        raise broken("incidents must be a list")
    kept = []
    for n, item in enumerate(incidents):
        incident = check_incident(item, n, duration_s, slack_s, broken)
        if incident is None:
            if log:
                log("incident outside the clip dropped", index=n,
                    start_offset_s=item.get("start_offset_s"),
                    end_offset_s=item.get("end_offset_s"), clip_seconds=round(duration_s, 2))
            continue
        kept.append(incident)
    if len(kept) > MAX_INCIDENTS:
        if log:
            log("too many incidents, the least severe dropped", reported=len(kept),
                kept=MAX_INCIDENTS)
        worst = sorted(kept, key=lambda i: -SEVERITY_RANK[i["severity"]])[:MAX_INCIDENTS]
        kept = sorted(worst, key=lambda i: i["start_offset_s"])
    return Finding(score, clean_text(summary, MAX_SUMMARY_CHARS), tuple(kept))


def check_incident(item: Any, n: int, duration_s: float, slack_s: float,
                   broken) -> dict[str, Any] | None:
    """The incident made sound, or None when it lies wholly outside the clip."""
    if not isinstance(item, dict):
        raise broken(f"incidents[{n}] is not an object")
    start, end = item.get("start_offset_s"), item.get("end_offset_s")
    if not all(is_number(v) for v in (start, end)):
        raise broken(f"incidents[{n}] offsets must be numbers")
    if start > end:
        start, end = end, start
    if end < 0 or start > duration_s + slack_s:
        return None
    start, end = max(start, 0.0), min(end, duration_s)
    start = min(start, end)
    if item.get("severity") not in SEVERITIES:
        raise broken(f"incidents[{n}].severity must be one of {', '.join(SEVERITIES)}")
    texts = {}
    for key, limit in (("category", MAX_CATEGORY_CHARS), ("description", MAX_DESCRIPTION_CHARS)):
        value = item.get(key)
        texts[key] = clean_text(value, limit) if isinstance(value, str) else ""
        if not texts[key]:
            raise broken(f"incidents[{n}].{key} missing")
    confidence = item.get("confidence")
    if confidence is not None and not (is_number(confidence) and 0 <= confidence <= 1):
        raise broken(f"incidents[{n}].confidence must be 0-1")
    category = texts["category"].lower()
    return {"start_offset_s": float(start), "end_offset_s": float(end),
            "category": category if category in CATEGORIES else "other",
            "severity": item["severity"], "description": texts["description"],
            "confidence": float(confidence) if confidence is not None else None}


def is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits
        return False
