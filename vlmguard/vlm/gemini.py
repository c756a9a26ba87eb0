"""Gemini through the google-genai SDK: one generateContent per clip.

A clip up to gemini.inline_max_mb travels inside the request; only a larger one (mode
"original") goes through the Files API (upload, wait for ACTIVE, generate, delete).
Every failure the API is known for ends as one of three things: an AnalysisError about
this job (retryable or not; a 400 is the provider's, bad_request), a RateLimited (every
analyzer waits, the job is not charged) or an AccountProblem (bad key, daily quota,
retired model: every analyzer pauses). A thinking level the model does not offer is a 400
this client adapts to once (the next level the model has) and remembers. Each SDK call
has one total deadline (timeout_seconds) and a bound on the bytes read (vlm.transport).
The SDK's request retries are off, so the job table's backoff, which survives restarts, is
the retry loop; the SDK still retries a resumable-upload chunk on its own (up to 3 times).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from vlmguard.errors import first_line
from vlmguard.options import opt
from vlmguard.vlm import (RESPONSE_SCHEMA, AccountProblem, AnalysisError, Answer, Clip,
                          ProviderSettings, RateLimited, billed_together, describe_wait,
                          parse_answer, read_answer, retry_hint)
from vlmguard.vlm import token_count as count
from vlmguard.vlm.registry import register
from vlmguard.vlm.transport import bounded, bounded_client

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
FILE_POLL_SECONDS = 2.0
DEFAULT_RATE_WAIT_SECONDS = 60.0
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
# Finish reasons (SDK FinishReason) and prompt block reasons that say the model will not
# look at this footage; RECITATION and OTHER say nothing about it.
REFUSALS = ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_PROHIBITED_CONTENT",
            "IMAGE_SAFETY")
# The thinking levels of 3-class models, least first; a model offers some of them.
LEVELS = ("MINIMAL", "LOW", "MEDIUM", "HIGH")
MEDIA_RESOLUTIONS = {"low": "MEDIA_RESOLUTION_LOW", "medium": "MEDIA_RESOLUTION_MEDIUM",
                     "high": "MEDIA_RESOLUTION_HIGH", "default": None}
# 2.5-class models take a token budget (0 turns thinking off on Flash); 3-class models
# take a level and refuse a budget.
THINKING_BUDGETS = {"off": 0, "low": 1024, "high": 8192}
THINKING_LEVELS = {"low": "LOW", "high": "HIGH"}
# The lowest level is MINIMAL on the 3-class models that have it; gemini-3.8-flash is
# reported to take LOW, MEDIUM and HIGH only, so the floor is LOW for any model not known.
MINIMAL_THINKERS = re.compile(r"(models/)?gemini-3(\.1|\.5)?-flash")
SAFETY_CATEGORIES = ("HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH",
                     "HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_DANGEROUS_CONTENT")
PROBE_PROMPT = "Reply with the word OK."


@dataclass(frozen=True)
class Request:
    """What may change between the first try and the one changed retry of a refusal."""

    fps: float
    max_output_tokens: int


class Refused(Exception):
    """A safety refusal, a blocked prompt or MAX_TOKENS: asking the same again would pay
    for the same. usage is what the refused request was billed."""

    def __init__(self, message: str, kind: str, usage: Answer):
        super().__init__(message)
        self.kind = kind
        self.usage = usage


@dataclass(frozen=True)
class GeminiSettings(ProviderSettings):
    kind: str = opt("gemini")
    model: str = opt("gemini-3.8-flash")
    api_key_env: str = opt("GEMINI_API_KEY")
    # The SDK sends the timeout as X-Server-Timeout; short ones come back as 500s.
    timeout_seconds: float = opt(300.0, lo=60, hi=3600)
    file_active_timeout_seconds: float = opt(300.0, lo=5, hi=3600)
    thinking: str = opt("off", choices=("off", "low", "high", "default"))
    inline_max_mb: float = opt(15.0, lo=0, hi=90)
    safety_threshold: str = opt("block_none", choices=("off", "block_none", "block_only_high",
                                                       "block_medium_and_above",
                                                       "block_low_and_above", "default"))
    media_resolution: str = opt("low", choices=("low", "medium", "high", "default"))
    # Google recommends the default 1.0 for 3-class models (lower may loop or reason
    # worse: the Gemini 3 guide); 2.5-class models take any.
    temperature: float = opt(1.0, lo=0, hi=2)


class ThinkingRefused(Exception):
    """A 400 about the thinking configuration: the model lacks that level (or takes a
    level, not a budget, or the other way round)."""


GeminiConfig = GeminiSettings  # the name of earlier versions


def to_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """The neutral JSON Schema in the OpenAPI subset Gemini takes: upper-case types, and
    propertyOrdering so that the model writes the properties in the order given."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type":
            out[key] = value.upper()
        elif key == "properties":
            out[key] = {name: to_openapi(sub) for name, sub in value.items()}
            out["propertyOrdering"] = list(value)
        elif key == "items":
            out[key] = to_openapi(value)
        elif key != "additionalProperties":
            out[key] = value
    return out


def http_options(config: GeminiSettings, client=None):
    from google.genai import types

    options = types.HttpOptions(api_version="v1beta", timeout=int(config.timeout_seconds * 1000),
                                retry_options=types.HttpRetryOptions(attempts=1))
    if client is not None:
        options.httpx_client = client
    if config.base_url:
        options.base_url = config.base_url
    return options


def load_sdk(config: GeminiSettings) -> None:
    """Make and close a client that is never used: the SDK imports its HTTP stack with
    the first client, not on import. The supervisor does this before it forks the
    analyzers, so that they share those modules' pages instead of each loading them."""
    from google import genai

    genai.Client(api_key="unused", http_options=http_options(config)).close()


def is_gemini_2(model: str) -> bool:
    return re.match(r"(models/)?gemini-[12]\.", model) is not None


@register("gemini")
class GeminiClient:
    Settings = GeminiSettings
    WANTS = "video"
    LABEL = "Gemini"
    NEEDS_KEY = True

    def __init__(self, config: GeminiSettings, api_key: str):
        from google import genai
        from google.genai import types

        self.config = config
        self.types = types
        self.media_resolution = MEDIA_RESOLUTIONS[config.media_resolution]
        self.client = genai.Client(api_key=api_key, http_options=http_options(
            config, bounded_client(follow_redirects=True)))
        # What the model was found to take instead of the configured thinking: a config
        # dict for ThinkingConfig, and the levels it refused. notes: for status.
        self.thinking_found: dict[str, Any] | None = None
        self.levels_refused: set[str] = set()
        self.notes: dict[str, str] = {}

    def adaptations(self) -> dict[str, str]:
        return dict(self.notes)

    @staticmethod
    def load_sdk(config: GeminiSettings) -> None:
        load_sdk(config)

    @staticmethod
    def longest_wait_seconds(config: GeminiSettings) -> float:
        return config.timeout_seconds + config.file_active_timeout_seconds

    @staticmethod
    def structured_output(schema: dict[str, Any]) -> dict[str, Any]:
        return to_openapi(schema)

    # -- one clip ---------------------------------------------------------------------------

    def analyze(self, clip: Clip, prompt: str, keep_alive: Callable[[], None]) -> Answer:
        """One request; a refusal gets one changed retry, then fails for good."""
        request = Request(fps=clip.fps, max_output_tokens=self.config.max_output_tokens)
        try:
            return self.ask_adapting(clip, prompt, request, keep_alive)
        except Refused as refused:
            changed = changed_request(refused.kind, request)
            keep_alive()
            try:
                return billed_together([refused.usage],
                                       self.ask_adapting(clip, prompt, changed, keep_alive))
            except Refused as again:
                raise AnalysisError(f"{again} (again after a changed request: "
                                    f"{describe_change(request, changed)})",
                                    retryable=False, refusal=again.kind == "safety") from None

    def ask_adapting(self, clip: Clip, prompt: str, request: Request,
                     keep_alive: Callable[[], None]) -> Answer:
        """ask(), and again with the next thinking setting while the model refuses one."""
        for _ in range(len(LEVELS) + 1):
            try:
                return self.ask(clip, prompt, request, keep_alive)
            except ThinkingRefused as refused:
                self.adapt_thinking(str(refused))
                keep_alive()
        raise AnalysisError("generate: HTTP 400: no thinking setting the model takes",
                            retryable=True, bad_request=True)

    def adapt_thinking(self, message: str) -> None:
        """The next thinking setting to try after a 400 about this one, remembered."""
        current = self.thinking_settings() or {}
        level = current.get("thinking_level")
        lowered = message.lower()
        if "thinking_budget" in current and "budget" in lowered:
            found = {"thinking_level": self.lowest_level()}
        elif level is not None and level.lower() in lowered:
            self.levels_refused.add(level)
            found = {"thinking_level": self.next_level(level)}
        elif level is not None:  # levels refused as such: a model that takes a budget
            found = {"thinking_budget": THINKING_BUDGETS.get(self.config.thinking, 0)}
        else:
            raise AnalysisError(f"generate: HTTP 400: {first_line(message)}", retryable=True,
                                bad_request=True)
        self.thinking_found = found
        self.notes["thinking"] = (f"thinking sent as {next(iter(found))} "
                                  f"{next(iter(found.values()))} ({first_line(message)})")

    def lowest_level(self) -> str:
        return self.next_level(None)

    def next_level(self, refused: str | None) -> str:
        """A level the model has not refused: upward from the one it refused for "off" and
        "low", downward for "high" (cheaper first, then nearer to what was asked)."""
        order = list(LEVELS) if self.config.thinking != "high" else list(reversed(LEVELS))
        start = order.index(refused) + 1 if refused in order else 0
        for level in order[start:] + order[:start]:
            if level not in self.levels_refused:
                return level
        raise AnalysisError("generate: HTTP 400: the model refused every thinking level",
                            retryable=True, bad_request=True)

    def ask(self, clip: Clip, prompt: str, request: Request,
            keep_alive: Callable[[], None]) -> Answer:
        if clip.path.stat().st_size <= self.config.inline_max_mb * 1024 * 1024:
            part = self.inline_part(clip, request)
            return self.generate(part, prompt, request)
        uploaded = self.call("upload", lambda: self.client.files.upload(
            file=str(clip.path), config=self.types.UploadFileConfig(
                mime_type=clip.mime_type, display_name=clip.path.name)))
        try:
            active = self.wait_until_active(uploaded, keep_alive)
            keep_alive()
            return self.generate(self.file_part(active, clip, request), prompt, request)
        finally:
            self.delete(uploaded)

    def generate(self, part, prompt: str, request: Request) -> Answer:
        """The video first, the task after it."""
        settings = self.generation_config(request.max_output_tokens)
        response = self.call("generate", lambda: self.client.models.generate_content(
            model=self.config.model, contents=[part, prompt], config=settings))
        return self.read_response(response)

    def probe(self) -> None:
        """The cheapest real request: does the key, model and quota work again?"""
        settings = self.types.GenerateContentConfig(max_output_tokens=16,
                                                    temperature=self.config.temperature,
                                                    thinking_config=self.thinking_config())
        try:
            self.call("probe", lambda: self.client.models.generate_content(
                model=self.config.model, contents=PROBE_PROMPT, config=settings))
        except ThinkingRefused as refused:
            self.adapt_thinking(str(refused))
            raise AnalysisError(f"probe: HTTP 400: {first_line(refused)}", retryable=True,
                                bad_request=True) from None

    def inline_part(self, clip: Clip, request: Request):
        types = self.types
        return types.Part(inline_data=types.Blob(data=clip.path.read_bytes(),
                                                 mime_type=clip.mime_type),
                          video_metadata=types.VideoMetadata(fps=request.fps))

    def file_part(self, uploaded, clip: Clip, request: Request):
        types = self.types
        return types.Part(file_data=types.FileData(file_uri=uploaded.uri, mime_type=clip.mime_type),
                          video_metadata=types.VideoMetadata(fps=request.fps))

    def generation_config(self, max_output_tokens: int):
        settings: dict[str, Any] = dict(response_mime_type="application/json",
                                        response_schema=to_openapi(RESPONSE_SCHEMA),
                                        max_output_tokens=max_output_tokens,
                                        temperature=self.config.temperature)
        if self.media_resolution:
            settings["media_resolution"] = self.media_resolution
        thinking = self.thinking_config()
        if thinking is not None:
            settings["thinking_config"] = thinking
        if self.config.safety_threshold != "default":
            settings["safety_settings"] = [
                self.types.SafetySetting(category=category,
                                         threshold=self.config.safety_threshold.upper())
                for category in SAFETY_CATEGORIES]
        return self.types.GenerateContentConfig(**settings)

    def thinking_settings(self) -> dict[str, Any] | None:
        """The thinking to send: what the model was found to take, else from the config."""
        if self.thinking_found is not None:
            return self.thinking_found
        mode = self.config.thinking
        if mode == "default":
            return None
        if is_gemini_2(self.config.model):
            return {"thinking_budget": THINKING_BUDGETS[mode]}
        return {"thinking_level": THINKING_LEVELS.get(mode) or
                lowest_thinking_level(self.config.model)}

    def thinking_config(self):
        found = self.thinking_settings()
        return None if found is None else self.types.ThinkingConfig(**found)

    def wait_until_active(self, uploaded, keep_alive: Callable[[], None]):
        deadline = time.monotonic() + self.config.file_active_timeout_seconds
        current = uploaded
        while True:
            state = getattr(current.state, "value", current.state)
            if state == "ACTIVE":
                return current
            if state == "FAILED":
                detail = getattr(current.error, "message", None) or "no reason given"
                raise AnalysisError(f"uploaded video failed processing at Gemini: {detail}",
                                    retryable=True)
            if time.monotonic() > deadline:
                raise AnalysisError(f"uploaded video not ACTIVE after "
                                    f"{self.config.file_active_timeout_seconds:.0f} s "
                                    f"(state {state})", retryable=True)
            keep_alive()
            time.sleep(FILE_POLL_SECONDS)
            current = self.call("file status", lambda: self.client.files.get(name=uploaded.name))

    def delete(self, uploaded) -> None:
        """Footage must not linger at the provider; a failed delete expires in 48 h anyway."""
        try:
            self.client.files.delete(name=uploaded.name)
        except Exception:  # the analysis result matters more than this clean-up
            pass

    def read_response(self, response) -> Answer:
        return read_answer(self.answer_of, response, "Gemini")

    def answer_of(self, response) -> Answer:
        usage = response.usage_metadata
        tokens = dict(prompt_tokens=count(getattr(usage, "prompt_token_count", None)),
                      output_tokens=count(getattr(usage, "candidates_token_count", None)),
                      thoughts_tokens=count(getattr(usage, "thoughts_token_count", None)),
                      total_tokens=count(getattr(usage, "total_token_count", None)),
                      cached_tokens=count(getattr(usage, "cached_content_token_count", None)),
                      model_version=str(response.model_version or "")[:100] or None)
        feedback = response.prompt_feedback
        if not response.candidates:
            reason = getattr(getattr(feedback, "block_reason", None), "value", None) or "unknown"
            raise Refused(f"prompt blocked by Gemini (blockReason {reason})",
                          "safety" if reason in REFUSALS else "blocked", Answer(None, **tokens))
        finish = getattr(response.candidates[0].finish_reason, "value",
                         response.candidates[0].finish_reason) or "STOP"
        if finish == "MAX_TOKENS":
            raise Refused("answer truncated (finishReason MAX_TOKENS)", "max_tokens",
                          Answer(None, **tokens))
        if finish in REFUSALS:
            raise Refused(f"answer withheld (finishReason {finish})", "safety",
                          Answer(None, **tokens))
        if finish != "STOP":
            raise AnalysisError(f"no usable answer (finishReason {first_line(finish)[:40]})",
                                retryable=True)
        text = response.text or ""
        return Answer(data=parse_answer(text), **tokens)

    def call(self, what: str, request: Callable[[], Any]) -> Any:
        """One SDK call within the request's total deadline, its failures sorted into job,
        rate-limit and account problems. Whatever else the SDK raises (an answer it cannot
        parse) is this provider failing, not a fault in vlmguard."""
        from google.genai import errors

        try:
            with bounded(self.config.timeout_seconds, MAX_RESPONSE_BYTES):
                return request()
        except errors.APIError as exc:
            raise api_error(what, exc, self.config) from None
        except Exception as exc:
            if is_transport_error(exc):
                raise AnalysisError(f"{what}: {type(exc).__name__}: {first_line(exc)}",
                                    retryable=True) from None
            raise AnalysisError(f"{what}: malformed response from Gemini "
                                f"({type(exc).__name__}: {first_line(exc)})",
                                retryable=True) from None


def lowest_thinking_level(model: str) -> str:
    return "MINIMAL" if MINIMAL_THINKERS.match(model) else "LOW"


def changed_request(kind: str, request: Request) -> Request:
    """MAX_TOKENS: twice the output budget. SAFETY or a blocked prompt: half the frames
    (fewer chances for one frame to trip a filter, and half the cost of a second no)."""
    if kind == "max_tokens":
        return replace(request, max_output_tokens=min(request.max_output_tokens * 2, 65536))
    return replace(request, fps=round(request.fps / 2, 4))


def describe_change(before: Request, after: Request) -> str:
    if after.max_output_tokens != before.max_output_tokens:
        return f"max_output_tokens {before.max_output_tokens} -> {after.max_output_tokens}"
    return f"fps {before.fps:g} -> {after.fps:g}"


def api_error(what: str, exc, config: GeminiSettings) -> Exception:
    """The SDK's APIError as AnalysisError (this job; bad_request: the provider's),
    ThinkingRefused, RateLimited or AccountProblem."""
    model = config.model
    code = exc.code or 0
    status = exc.status or ""
    message = first_line(exc.message or "")
    label = f"{what}: HTTP {code} {status}".rstrip()
    details = error_details(exc.details)
    if code == 401 or status == "UNAUTHENTICATED" or "API key not valid" in message or \
            any(d.get("reason") == "API_KEY_INVALID" for d in details):
        return AccountProblem("bad_key", f"{label}: bad API key ({message})")
    if code == 403 or status == "PERMISSION_DENIED":
        if "file" in message.lower() or what == "file status":
            # One uploaded file gone or not ours: this job's problem, and a new upload fixes it.
            return AnalysisError(f"{label}: uploaded file not accessible ({message})",
                                 retryable=True)
        return AccountProblem("permission_denied", f"{label}: access denied ({message})")
    if code == 404:
        if what in ("generate", "probe") and "models/" in message:
            return AccountProblem("model_unavailable",
                                  f"{label}: model {model!r} unknown or retired ({message})")
        return AnalysisError(f"{label}: not found ({message})", retryable=True)
    if code == 429:
        quota = daily_quota(details, exc.message or "")
        if quota:
            return AccountProblem("quota_exhausted", f"{label}: {quota} ({message})")
        hint = retry_hint(retry_delay(details), config.max_retry_wait_seconds)
        wait, asked = hint or (DEFAULT_RATE_WAIT_SECONDS, DEFAULT_RATE_WAIT_SECONDS)
        return RateLimited(f"{label}: rate limited, waiting {describe_wait(wait, asked)} "
                           f"({message})", wait)
    if code in RETRYABLE_STATUS:
        hint = retry_hint(retry_delay(details), config.max_retry_wait_seconds)
        return AnalysisError(f"{label}: {message}", retryable=True,
                             retry_after=hint[0] if hint else None)
    if status == "FAILED_PRECONDITION" and "ACTIVE" in message:
        return AnalysisError(f"{label}: {message}", retryable=True)
    if status == "FAILED_PRECONDITION" and "location" in message.lower():
        return AccountProblem("permission_denied", f"{label}: not offered here ({message})")
    if code == 400 and "thinking" in message.lower():
        return ThinkingRefused(message)
    # Any other 4xx: the request as this provider is set up, not (as far as one window
    # shows) the footage; the analyzer decides which after several windows.
    return AnalysisError(f"{label}: {message}", retryable=True, bad_request=True)


def error_details(details: Any) -> list[dict]:
    error = details.get("error", details) if isinstance(details, dict) else {}
    items = error.get("details", []) if isinstance(error, dict) else []
    return [item for item in items if isinstance(item, dict)]


def daily_quota(details: list[dict], message: str) -> str | None:
    """Why waiting a minute will not help: a per-day quota used up, or a limit of 0 (the
    model is not offered on this tier). None for a per-minute limit."""
    for item in details:
        if str(item.get("@type", "")).endswith("QuotaFailure"):
            for violation in item.get("violations", []):
                quota_id = str(violation.get("quotaId", ""))
                if "PerDay" in quota_id:
                    return f"daily quota used up ({quota_id})"
                if str(violation.get("quotaValue", "")) == "0":
                    return f"quota limit 0 ({quota_id})"
    if re.search(r"limit: 0\b", message):
        return "quota limit 0 (model not available on this tier)"
    return None


def retry_delay(details: list[dict]) -> str | None:
    """RetryInfo.retryDelay ("58s") from an error body, if the server sent one (a hint
    from outside: vlm.retry_hint parses and bounds it)."""
    for item in details:
        if str(item.get("@type", "")).endswith("RetryInfo"):
            delay = str(item.get("retryDelay", ""))[:40]
            if re.fullmatch(r"[\d.]+(e\d+)?s", delay):
                return delay
    return None


def is_transport_error(exc: Exception) -> bool:
    """Timeouts and connection failures from whichever HTTP stack the SDK uses."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    module = type(exc).__module__.split(".")[0]
    return (module in ("httpx", "httpx2", "httpcore", "aiohttp", "requests", "urllib3")
            or bool(names & {"TimeoutError", "ConnectionError", "TimeoutException"}))
