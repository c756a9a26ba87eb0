"""Gemini through the google-genai SDK: upload, wait for ACTIVE, generate, delete.

Every failure the API is known for ends as an AnalysisError that says what happened and
whether trying again can help; the SDK's own retries are off (one attempt per call), so
the job table's backoff, which survives restarts, is the only retry loop.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from vlmguard.config import GeminiConfig
from vlmguard.vlm import RESPONSE_SCHEMA, AnalysisError, Answer, Clip

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
CREDENTIAL_NAME = "gemini_api_key"
FILE_POLL_SECONDS = 2.0
MEDIA_RESOLUTIONS = {"low": "MEDIA_RESOLUTION_LOW", "medium": "MEDIA_RESOLUTION_MEDIUM",
                     "high": "MEDIA_RESOLUTION_HIGH", "default": None}


def find_api_key(config: GeminiConfig) -> str | None:
    """The key from the environment, systemd's credential store, or a key file."""
    key = os.environ.get(config.api_key_env, "").strip() if config.api_key_env else ""
    if key:
        return key
    candidates = []
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME)
    if config.api_key_file:
        candidates.append(Path(config.api_key_file).expanduser())
    for path in candidates:
        try:
            key = path.read_text().strip()
        except OSError:
            continue
        if key:
            return key
    return None


def where_keys_come_from(config: GeminiConfig) -> str:
    places = [f"${config.api_key_env}", f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}"]
    if config.api_key_file:
        places.append(config.api_key_file)
    return " or ".join(places)


def http_options(config: GeminiConfig):
    from google.genai import types

    options = types.HttpOptions(api_version="v1beta", timeout=int(config.timeout_seconds * 1000),
                                retry_options=types.HttpRetryOptions(attempts=1))
    if config.base_url:
        options.base_url = config.base_url
    return options


def load_sdk(config: GeminiConfig) -> None:
    """Make and close a client that is never used: the SDK imports its HTTP stack with
    the first client, not on import. The supervisor does this before it forks the
    analyzers, so that they share those modules' pages instead of each loading them."""
    from google import genai

    genai.Client(api_key="unused", http_options=http_options(config)).close()


class GeminiClient:
    def __init__(self, config: GeminiConfig, api_key: str, *, media_resolution: str = "low"):
        from google import genai
        from google.genai import types

        self.config = config
        self.types = types
        self.media_resolution = MEDIA_RESOLUTIONS[media_resolution]
        self.client = genai.Client(api_key=api_key, http_options=http_options(config))

    def analyze(self, clip: Clip, prompt: str, keep_alive: Callable[[], None]) -> Answer:
        uploaded = self.call("upload", lambda: self.client.files.upload(
            file=str(clip.path), config=self.types.UploadFileConfig(
                mime_type=clip.mime_type, display_name=clip.path.name)))
        try:
            active = self.wait_until_active(uploaded, keep_alive)
            keep_alive()
            response = self.call("generate", lambda: self.client.models.generate_content(
                model=self.config.model, contents=[self.video_part(active, clip), prompt],
                config=self.generation_config()))
            return self.read_response(response)
        finally:
            self.delete(uploaded)

    def video_part(self, uploaded, clip: Clip):
        types = self.types
        return types.Part(file_data=types.FileData(file_uri=uploaded.uri, mime_type=clip.mime_type),
                          video_metadata=types.VideoMetadata(fps=clip.fps))

    def generation_config(self):
        settings: dict[str, Any] = dict(response_mime_type="application/json",
                                        response_schema=RESPONSE_SCHEMA,
                                        max_output_tokens=self.config.max_output_tokens)
        if self.media_resolution:
            settings["media_resolution"] = self.media_resolution
        return self.types.GenerateContentConfig(**settings)

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
        usage = response.usage_metadata
        tokens = dict(prompt_tokens=getattr(usage, "prompt_token_count", None),
                      output_tokens=getattr(usage, "candidates_token_count", None),
                      total_tokens=getattr(usage, "total_token_count", None))
        feedback = response.prompt_feedback
        if not response.candidates:
            reason = getattr(getattr(feedback, "block_reason", None), "value", None) or "unknown"
            raise AnalysisError(f"prompt blocked by Gemini (blockReason {reason})", retryable=True)
        finish = getattr(response.candidates[0].finish_reason, "value",
                         response.candidates[0].finish_reason) or "STOP"
        if finish == "MAX_TOKENS":
            raise AnalysisError("answer truncated (finishReason MAX_TOKENS): raise "
                                "gemini.max_output_tokens", retryable=True)
        if finish != "STOP":
            raise AnalysisError(f"no usable answer (finishReason {finish})", retryable=True)
        text = response.text or ""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise AnalysisError(f"invalid model output: not JSON ({text[:80]!r})",
                                retryable=True) from None
        return Answer(data=data, **tokens)

    def call(self, what: str, request: Callable[[], Any]) -> Any:
        """One SDK call, its failures turned into AnalysisError."""
        from google.genai import errors

        try:
            return request()
        except errors.APIError as exc:
            raise api_error(what, exc, self.config.model) from None
        except Exception as exc:
            if is_transport_error(exc):
                raise AnalysisError(f"{what}: {type(exc).__name__}: {first_line(exc)}",
                                    retryable=True) from None
            raise


def api_error(what: str, exc, model: str) -> AnalysisError:
    code = exc.code or 0
    status = exc.status or ""
    message = first_line(exc.message or "")
    label = f"{what}: HTTP {code} {status}".rstrip()
    if code in (401, 403) or status in ("UNAUTHENTICATED", "PERMISSION_DENIED") or \
            "API key not valid" in message:
        return AnalysisError(f"{label}: bad API key ({message})", retryable=False)
    if code == 404:
        return AnalysisError(f"{label}: unknown model {model!r} or file ({message})",
                             retryable=False)
    if code in RETRYABLE_STATUS:
        return AnalysisError(f"{label}: {message}", retryable=True,
                             retry_after=retry_delay(exc.details))
    return AnalysisError(f"{label}: {message}", retryable=False)


def retry_delay(details: Any) -> float | None:
    """RetryInfo.retryDelay ("58s") from a 429 body, if the server sent one."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    for item in error.get("details", []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            match = re.fullmatch(r"([\d.]+)s", str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def is_transport_error(exc: Exception) -> bool:
    """Timeouts and connection failures from whichever HTTP stack the SDK uses."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    module = type(exc).__module__.split(".")[0]
    return (module in ("httpx", "httpx2", "httpcore", "aiohttp", "requests", "urllib3")
            or bool(names & {"TimeoutError", "ConnectionError", "TimeoutException"}))


def first_line(value: Any) -> str:
    return (str(value).strip().splitlines() or [""])[0][:300]
