"""Any OpenAI-compatible chat-completions server (OpenAI, Ollama, vLLM, llama.cpp's server,
LocalAI) through the official openai package: the clip's distinct keyframes as JPEG
image_url parts, each labelled with its offset, or (images = "grid") one picture tiling
them with each tile's time burned in, for servers that take one image per message.

The answer is asked for with a strict json_schema response_format; a server that refuses
that (400 naming response_format or json_schema) is asked again in JSON mode with the
schema in the prompt, and stays in JSON mode for the life of the client: check_answer
holds either answer to the contract. The SDK's own retries are off, as for Gemini: the
job table's backoff and the fallback to the next provider are the retry loop.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vlmguard.config import opt
from vlmguard.ffmpeg import child_env, ffmpeg_binary, grid_command
from vlmguard.vlm import (RESPONSE_SCHEMA, AccountProblem, AnalysisError, Answer, Clip, Frame,
                          ProviderSettings, RateLimited)
from vlmguard.vlm.registry import register

DEFAULT_RATE_WAIT_SECONDS = 30.0
GRID_WIDTH = 1920  # pixels across the whole grid; tiles are scaled to fit
PROBE_PROMPT = "Reply with the word OK."
SCHEMA_WORDS = ("response_format", "json_schema")


@dataclass(frozen=True)
class OpenAISettings(ProviderSettings):
    model: str = opt()
    images: str = opt("frames", choices=("frames", "grid"))
    max_images: int = opt(20, lo=1, hi=100)
    structured_output: str = opt("json_schema", choices=("json_schema", "json_object"))
    image_detail: str = opt("auto", choices=("auto", "low", "high"))


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The neutral schema as strict structured outputs want it: every object closed
    (additionalProperties false) with all its properties required."""
    out = dict(schema)
    if schema.get("type") == "object":
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
        out["required"] = list(schema["properties"])
        out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = strict_schema(schema["items"])
    return out


def pick_evenly(frames: tuple[Frame, ...], most: int) -> tuple[Frame, ...]:
    if len(frames) <= most:
        return frames
    step = (len(frames) - 1) / (most - 1) if most > 1 else 0
    return tuple(frames[round(i * step)] for i in range(most))


def grid_shape(count: int) -> tuple[int, int]:
    columns = math.ceil(math.sqrt(count))
    return columns, math.ceil(count / columns)


def offset_label(offset_s: float) -> str:
    return f"{offset_s:.1f} s"


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def make_grid(frames: tuple[Frame, ...], target: Path) -> Path:
    columns, rows = grid_shape(len(frames))
    tile_width = max(2 * (GRID_WIDTH // columns // 2), 64)
    proc = subprocess.run(grid_command(ffmpeg_binary(), [(f.path, offset_label(f.offset_s))
                                                         for f in frames],
                                       target, columns, rows, tile_width),
                          capture_output=True, text=True, timeout=300, env=child_env())
    if proc.returncode != 0 or not target.exists():
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise AnalysisError(f"frame grid could not be made: {reason}", retryable=False)
    return target


@register("openai")
class OpenAIChatClient:
    Settings = OpenAISettings
    WANTS = "frames"
    LABEL = "OpenAI-compatible"
    NEEDS_KEY = False

    def __init__(self, settings: OpenAISettings, api_key: str):
        from openai import OpenAI

        self.settings = settings
        self.client = OpenAI(api_key=api_key, base_url=settings.base_url or None,
                             timeout=settings.timeout_seconds, max_retries=0)
        self.schema_mode = settings.structured_output

    @staticmethod
    def load_sdk(settings: OpenAISettings) -> None:
        """Import the SDK in the supervisor, so the forked analyzers share its pages."""
        importlib.import_module("openai")

    @staticmethod
    def longest_wait_seconds(settings: OpenAISettings) -> float:
        return settings.timeout_seconds

    @staticmethod
    def structured_output(schema: dict[str, Any]) -> dict[str, Any]:
        return {"type": "json_schema",
                "json_schema": {"name": "safety_review", "strict": True,
                                "schema": strict_schema(schema)}}

    # -- one clip ---------------------------------------------------------------------------

    def analyze(self, clip: Clip, prompt: str, keep_alive: Callable[[], None]) -> Answer:
        if not clip.frames:
            raise AnalysisError("no frames to send", retryable=False)
        frames = pick_evenly(clip.frames, self.settings.max_images)
        with tempfile.TemporaryDirectory(prefix="vlmguard-grid-") as workdir:
            content = self.image_parts(frames, Path(workdir))
            keep_alive()
            try:
                return self.ask(prompt, content)
            except SchemaRefused:
                self.schema_mode = "json_object"
                keep_alive()
                return self.ask(prompt, content)

    def image_parts(self, frames: tuple[Frame, ...], workdir: Path) -> list[dict[str, Any]]:
        detail = self.settings.image_detail
        if self.settings.images == "grid":
            grid = make_grid(frames, workdir / "grid.jpg")
            columns, rows = grid_shape(len(frames))
            times = ", ".join(offset_label(f.offset_s) for f in frames)
            return [{"type": "text", "text": f"One picture of {len(frames)} frames in a "
                     f"{columns}x{rows} grid, left to right then top to bottom, each "
                     f"labelled with its time from the start of the clip: {times}."},
                    {"type": "image_url", "image_url": {"url": data_url(grid),
                                                        "detail": detail}}]
        parts: list[dict[str, Any]] = []
        for frame in frames:
            parts.append({"type": "text", "text": f"Frame at {offset_label(frame.offset_s)}:"})
            parts.append({"type": "image_url", "image_url": {"url": data_url(frame.path),
                                                             "detail": detail}})
        return parts

    def ask(self, prompt: str, content: list[dict[str, Any]]) -> Answer:
        if self.schema_mode == "json_schema":
            response_format = self.structured_output(RESPONSE_SCHEMA)
            text = prompt
        else:
            response_format = {"type": "json_object"}
            text = (f"{prompt}\n\nAnswer with one JSON object only, matching this JSON "
                    f"Schema:\n{json.dumps(RESPONSE_SCHEMA)}")
        response = self.call("chat", lambda: self.client.chat.completions.create(
            model=self.settings.model, response_format=response_format,
            max_tokens=self.settings.max_output_tokens,
            messages=[{"role": "user", "content": [{"type": "text", "text": text}, *content]}]))
        return self.read_response(response)

    def read_response(self, response) -> Answer:
        usage = response.usage
        details = getattr(usage, "completion_tokens_details", None) if usage else None
        tokens = dict(prompt_tokens=getattr(usage, "prompt_tokens", None),
                      output_tokens=getattr(usage, "completion_tokens", None),
                      total_tokens=getattr(usage, "total_tokens", None),
                      thoughts_tokens=getattr(details, "reasoning_tokens", None),
                      model_version=getattr(response, "model", None))
        if not response.choices:
            raise AnalysisError("no usable answer (no choices)", retryable=True)
        choice = response.choices[0]
        if choice.finish_reason == "length":
            raise AnalysisError("answer truncated (finish_reason length)", retryable=True)
        if choice.finish_reason == "content_filter":
            raise AnalysisError("answer withheld (finish_reason content_filter)",
                                retryable=False)
        text = choice.message.content or ""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise AnalysisError(f"invalid model output: not JSON ({text[:80]!r})",
                                retryable=True) from None
        return Answer(data=data, **tokens)

    def probe(self) -> None:
        self.call("probe", lambda: self.client.chat.completions.create(
            model=self.settings.model, max_tokens=16,
            messages=[{"role": "user", "content": PROBE_PROMPT}]))

    def call(self, what: str, request: Callable[[], Any]) -> Any:
        """One SDK call, its failures sorted into job, rate-limit and account problems."""
        import openai

        try:
            return request()
        except openai.APITimeoutError:
            raise AnalysisError(f"{what}: timed out after {self.settings.timeout_seconds:g} s",
                                retryable=True) from None
        except openai.APIConnectionError as exc:
            raise AnalysisError(f"{what}: cannot connect ({first_line(exc.__cause__ or exc)})",
                                retryable=True) from None
        except openai.APIStatusError as exc:
            raise status_error(what, exc, self.settings.model, self.schema_mode) from None


class SchemaRefused(Exception):
    """The server does not take a json_schema response_format."""


def status_error(what: str, exc, model: str, schema_mode: str) -> Exception:
    code = exc.status_code
    message = first_line(error_message(exc))
    label = f"{what}: HTTP {code}"
    if code == 400 and schema_mode == "json_schema" and \
            any(word in message.lower() for word in SCHEMA_WORDS):
        return SchemaRefused(message)
    if code == 401:
        return AccountProblem("bad_key", f"{label}: bad API key ({message})")
    if code == 403:
        return AccountProblem("permission_denied", f"{label}: access denied ({message})")
    if code == 404 and "model" in message.lower():
        return AccountProblem("model_unavailable",
                              f"{label}: model {model!r} unknown ({message})")
    if code == 429:
        if "insufficient_quota" in str(getattr(exc, "code", "")) or "quota" in message.lower():
            return AccountProblem("quota_exhausted", f"{label}: quota used up ({message})")
        wait = retry_after(exc.response) or DEFAULT_RATE_WAIT_SECONDS
        return RateLimited(f"{label}: rate limited, waiting {wait:g} s ({message})", wait)
    if code in (408, 409) or code >= 500:
        return AnalysisError(f"{label}: {message}", retryable=True,
                             retry_after=retry_after(exc.response))
    return AnalysisError(f"{label}: {message}", retryable=False)


def error_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", "") or exc)


def retry_after(response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except (AttributeError, TypeError, ValueError):
        return None


def first_line(value: Any) -> str:
    return (str(value).strip().splitlines() or [""])[0][:300]
