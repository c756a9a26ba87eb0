"""Any OpenAI-compatible chat-completions server (OpenAI, Ollama, vLLM, llama.cpp's server,
LocalAI) through the official openai package: the clip's distinct keyframes as JPEG
image_url parts, each labelled with its offset, or (images = "grid") one picture tiling
them with each tile's time burned in, for servers that take one image per message.

Real servers are less kind than a protocol test: Ollama cuts a prompt over its context
silently, keeping the first few tokens and the tail; vLLM and llama.cpp refuse one with a
400; OpenAI's newer models refuse `max_tokens` and any temperature but 1. So:

- the task text is the last part of the message, after the frames: a cut from the
  middle loses frames, never the task;
- each request is planned to fit `context_tokens` (images counted, sized and, past
  that, shrunk from an estimate of tokens per image; the answer's budget included);
- where the server reports fewer prompt tokens than were sent (or fills the whole
  context), the answer is not used and a smaller request is made; the provider learns
  the size (logged once, in status);
- known parameter refusals adapt once and are remembered by this client
  (`max_tokens` -> `max_completion_tokens`, temperature dropped, a context-length 400 ->
  a smaller request, "at most 1 image" -> the grid); any other 400 is the provider's
  problem, not the job's (AnalysisError.bad_request).

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
import re
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from vlmguard.errors import first_line
from vlmguard.options import opt
from vlmguard.ffmpeg import child_env, ffmpeg_binary, grid_command, last_line
from vlmguard.vlm import (RESPONSE_SCHEMA, AccountProblem, AnalysisError, Answer, Clip, Frame,
                          ProviderSettings, RateLimited, billed_together, describe_wait,
                          parse_answer, read_answer, retry_hint)
from vlmguard.vlm import token_count as count
from vlmguard.vlm.images import jpeg_size
from vlmguard.vlm.registry import register
from vlmguard.vlm.transport import bounded, bounded_client

DEFAULT_RATE_WAIT_SECONDS = 30.0
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
GRID_WIDTH = 1920  # pixels across the whole grid; tiles are scaled to fit
GRID_PADDING = 4
PROBE_PROMPT = "Reply with the word OK."
# A 32x32 grey JPEG: the probe sends an image like every real request, so that a server
# that cannot take images (llama.cpp without --mmproj) is not mistaken for a cured one.
PROBE_IMAGE = ("/9j/4AAQSkZJRgABAgAAAQABAAD//gAQTGF2YzU5LjM3LjEwMAD/2wBDAAgUFBcUFxsbGxsbGyAeICE"
               "hISAgICAhISEkJCQqKiokJCQhISQkKCgqKi4vLisrKisvLzIyMjw8OTlGRkhWVmf/xABKAAEAAAAAA"
               "AAAAAAAAAAAAAAAAQEAAAAAAAAAAAAAAAAAAAAAEAEAAAAAAAAAAAAAAAAAAAAAEQEAAAAAAAAAAAAA"
               "AAAAAAAA/8AAEQgAIAAgAwEiAAIRAAMRAP/aAAwDAQACEQMRAD8AAAAAAAAA/9k=")
SCHEMA_WORDS = ("response_format", "json_schema")

# The request plan's estimate. Text: about 3 characters a token (real tokenizers do ~4
# on English; the estimate errs high) plus a chat template's few tokens per message
# (Ollama makes every content part its own message). Images: Qwen2.5-VL's rule, the
# largest of the common local models at CCTV sizes: the picture resized to multiples of
# 28 px (at most 1280 such patches) and one token per 28x28 patch, plus its two
# vision markers: a 640x360 frame is 299 tokens (Gemma 3 takes 256 for any picture).
CHARS_PER_TOKEN = 3
PART_TOKENS = 8
PATCH = 28
MAX_PATCHES = 1280
LOW_DETAIL_TOKENS = 85  # OpenAI's detail "low"
# The answer's room in the plan (an answer with several incidents is ~400 tokens);
# max_tokens then gets whatever the context has left, up to max_output_tokens.
ANSWER_RESERVE = 768
# Fewer frames than this and the plan tries smaller pictures before fewer of them.
MIN_IMAGES = 6
SCALES = (1.0, 0.75, 0.5)
# A prompt reported below this share of the estimate was (probably) cut.
SHORT_RATIO = 0.7
# Requests one window may take while the client adapts to the server.
MAX_REQUESTS = 4
MIN_CONTEXT = 1024

CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+)")
PROMPT_COUNT = re.compile(r"\((\d+) in the messages|request has (\d+) input tokens")
IMAGE_LIMIT = re.compile(r"at most (\d+) image", re.I)
CONTEXT_WORDS = ("maximum context length", "exceeds the available context size",
                 "context_length_exceeded", "exceed_context_size", "context size")


@dataclass(frozen=True)
class OpenAISettings(ProviderSettings):
    model: str = opt()
    images: str = opt("frames", choices=("frames", "grid"))
    max_images: int = opt(20, lo=1, hi=100)
    structured_output: str = opt("json_schema", choices=("json_schema", "json_object"))
    image_detail: str = opt("auto", choices=("auto", "low", "high"))
    # The server's context in tokens (Ollama: OLLAMA_CONTEXT_LENGTH, 4,096 by default on a
    # GPU under 24 GiB; vLLM: --max-model-len; llama.cpp: -c): every request is planned
    # to fit it, the answer included.
    context_tokens: int = opt(4096, lo=MIN_CONTEXT, hi=10_000_000)
    # Tokens the model spends on one picture; 0: estimated (Qwen2.5-VL's 28x28 patches).
    image_tokens: int = opt(0, lo=0, hi=100_000)


@dataclass
class Learned:
    """What this client found out about its server, and keeps for its life. notes: one
    line per adaptation, for the log and status."""

    schema_mode: str
    token_param: str = "max_tokens"
    temperature: bool = True
    context: int | None = None
    image_factor: float = 1.0
    grid: bool = False
    max_images: int | None = None
    server_holds: int = 0  # the most prompt tokens the server ever reported: it holds that
    notes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    frames: tuple[Frame, ...]
    width: int  # of each picture sent (the grid's, in grid mode)
    height: int
    scaled: bool
    grid: bool
    text_tokens: int
    image_tokens: int  # all pictures
    largest_image: int
    context: int
    reserve: int
    max_tokens: int

    @property
    def estimate(self) -> int:
        return self.text_tokens + self.image_tokens

    def describe(self) -> dict[str, Any]:
        return {"images": len(self.frames), "grid": self.grid,
                "image_size": f"{self.width}x{self.height}",
                "estimated_prompt_tokens": self.estimate, "context_tokens": self.context,
                "max_tokens": self.max_tokens}


class Adaptation(Exception):
    """The server refused a parameter in a way this client knows how to change."""

    def __init__(self, kind: str, message: str, **numbers: int | None):
        super().__init__(message)
        self.kind = kind
        self.numbers = numbers


class SchemaRefused(Exception):
    """The server does not take a json_schema response_format."""


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


def grid_tile_width(columns: int) -> int:
    return max(2 * (GRID_WIDTH // columns // 2), 64)


def grid_size(count: int, width: int, height: int) -> tuple[int, int]:
    """The grid picture's size for count frames of width x height (make_grid's layout)."""
    columns, rows = grid_shape(count)
    tile_width = min(width, grid_tile_width(columns))
    tile_height = 2 * round(height * tile_width / width / 2)
    return (columns * tile_width + (columns - 1) * GRID_PADDING,
            rows * tile_height + (rows - 1) * GRID_PADDING)


def patch_tokens(width: int, height: int) -> int:
    """Qwen2.5-VL's tokens for a picture (smart_resize to multiples of 28, capped)."""
    rows = max(1, round(height / PATCH))
    columns = max(1, round(width / PATCH))
    if rows * columns > MAX_PATCHES:
        shrink = math.sqrt(rows * columns / MAX_PATCHES)
        rows = max(1, math.floor(height / shrink / PATCH))
        columns = max(1, math.floor(width / shrink / PATCH))
    return rows * columns + 2


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) + PART_TOKENS


def even(value: float) -> int:
    return max(2, 2 * round(value / 2))


def offset_label(offset_s: float) -> str:
    return f"{offset_s:.1f} s"


def frame_label(frame: Frame) -> str:
    return f"Frame at {offset_label(frame.offset_s)}:"


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def run_ffmpeg(command: list[str], target: Path, what: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=child_env())
    if proc.returncode != 0 or not target.exists():
        raise AnalysisError(f"{what} could not be made: {last_line(proc.stderr)}",
                            retryable=False)


def make_grid(frames: tuple[Frame, ...], target: Path) -> Path:
    columns, rows = grid_shape(len(frames))
    run_ffmpeg(grid_command(ffmpeg_binary(), [(f.path, offset_label(f.offset_s)) for f in frames],
                            target, columns, rows, grid_tile_width(columns)),
               target, "frame grid")
    return target


def shrunk(frames: tuple[Frame, ...], width: int, height: int, folder: Path) -> tuple[Frame, ...]:
    """The frames as smaller JPEGs, in one FFmpeg run."""
    folder.mkdir(exist_ok=True)
    inputs: list[str] = []
    graph, outputs = [], []
    for n, frame in enumerate(frames):
        inputs += ["-i", str(frame.path)]
        graph.append(f"[{n}:v]scale={width}:{height}[s{n}]")
        outputs += ["-map", f"[s{n}]", "-frames:v", "1", "-q:v", "4", str(folder / f"{n:03d}.jpg")]
    run_ffmpeg([ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *inputs,
                "-filter_complex", ";".join(graph), *outputs],
               folder / f"{len(frames) - 1:03d}.jpg", "smaller frames")
    return tuple(replace(f, path=folder / f"{n:03d}.jpg") for n, f in enumerate(frames))


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
                             timeout=settings.timeout_seconds, max_retries=0,
                             http_client=bounded_client(follow_redirects=True))
        self.learned = Learned(schema_mode=settings.structured_output,
                               grid=settings.images == "grid")

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

    @property
    def schema_mode(self) -> str:
        return self.learned.schema_mode

    def adaptations(self) -> dict[str, str]:
        """What this client changed from its settings to suit the server, one line each."""
        return dict(self.learned.notes)

    # -- one clip ---------------------------------------------------------------------------

    def analyze(self, clip: Clip, prompt: str, keep_alive: Callable[[], None]) -> Answer:
        if not clip.frames:
            raise AnalysisError("no frames to send", retryable=False)
        unused: list[Answer] = []  # answers paid for and not used (a cut prompt)
        with tempfile.TemporaryDirectory(prefix="vlmguard-frames-") as workdir:
            for sent in range(1, MAX_REQUESTS + 1):
                keep_alive()
                plan = self.plan(clip.frames, prompt)
                content = self.content(plan, prompt, Path(workdir))
                try:
                    answer = self.ask(content, plan)
                except SchemaRefused:
                    self.learned.schema_mode = "json_object"
                    continue
                except Adaptation as change:
                    self.adapt(change, plan)
                    continue
                problem = self.misfit(plan, answer.prompt_tokens)
                if problem is None:
                    return replace(billed_together(unused, answer),
                                   request=plan.describe() | {"requests": sent})
                unused.append(answer)
                self.refit(problem, plan, answer.prompt_tokens)
        raise AnalysisError(f"no request fitted the server's context after {MAX_REQUESTS} "
                            f"tries ({'; '.join(self.learned.notes.values())})", retryable=True)

    # -- the plan ------------------------------------------------------------------------------

    def image_cost(self, width: int, height: int) -> int:
        if self.settings.image_tokens:
            base = self.settings.image_tokens
        elif self.settings.image_detail == "low":
            base = LOW_DETAIL_TOKENS
        else:
            base = patch_tokens(width, height)
        return math.ceil(base * self.learned.image_factor) + PART_TOKENS

    def task_text(self, prompt: str) -> str:
        if self.learned.schema_mode == "json_schema":
            return prompt
        return (f"{prompt}\n\nAnswer with one JSON object only, matching this JSON "
                f"Schema:\n{json.dumps(RESPONSE_SCHEMA)}")

    def plan(self, frames: tuple[Frame, ...], prompt: str) -> Plan:
        """The most frames, at the largest size, that fit the context with the answer's
        room; below MIN_IMAGES frames, smaller pictures first."""
        context = self.learned.context or self.settings.context_tokens
        reserve = min(self.settings.max_output_tokens, ANSWER_RESERVE)
        text = text_tokens(self.task_text(prompt))
        room = context - reserve - text
        most = min(len(frames), self.learned.max_images or self.settings.max_images)
        width, height = jpeg_size(frames[0].path.read_bytes())
        chosen = (self.grid_plan(frames, most, width, height, room) if self.learned.grid
                  else self.frames_plan(frames, most, width, height, room))
        if chosen is None:
            raise AnalysisError(f"context of {context} tokens leaves no room for one picture "
                                f"after the prompt (~{text} tokens) and the answer "
                                f"({reserve}): raise context_tokens and the server's context",
                                retryable=True, bad_request=True)
        picked, size, scaled, labels, images, largest = chosen
        estimate = text + labels + images
        return Plan(frames=picked, width=size[0], height=size[1], scaled=scaled,
                    grid=self.learned.grid, text_tokens=text + labels, image_tokens=images,
                    largest_image=largest, context=context, reserve=reserve,
                    max_tokens=min(self.settings.max_output_tokens, context - estimate))

    def frames_plan(self, frames, most, width, height, room):
        label = text_tokens("Frame at 000.0 s:")
        for scale in SCALES:
            size = (even(width * scale), even(height * scale))
            cost = self.image_cost(*size)
            count = min(most, room // (cost + label))
            if count >= min(MIN_IMAGES, most) or (scale == SCALES[-1] and count >= 1):
                return (pick_evenly(frames, count), size, scale < 1, count * label,
                        count * cost, cost)
        return None

    def grid_plan(self, frames, most, width, height, room):
        for count in range(most, 0, -1):
            size = grid_size(count, width, height)
            cost = self.image_cost(*size)
            label = text_tokens(self.grid_text(pick_evenly(frames, count)))
            if cost + label <= room:
                return pick_evenly(frames, count), size, False, label, cost, cost
        return None

    @staticmethod
    def grid_text(frames: tuple[Frame, ...]) -> str:
        columns, rows = grid_shape(len(frames))
        times = ", ".join(offset_label(f.offset_s) for f in frames)
        return (f"One picture of {len(frames)} frames in a {columns}x{rows} grid, left to "
                f"right then top to bottom, each labelled with its time from the start of "
                f"the clip: {times}.")

    def content(self, plan: Plan, prompt: str, workdir: Path) -> list[dict[str, Any]]:
        """The frames, then the task: a server that cuts from the middle keeps the task."""
        detail = self.settings.image_detail
        frames = plan.frames
        if plan.grid:
            grid = make_grid(frames, workdir / f"grid{len(frames)}.jpg")
            parts = [{"type": "text", "text": self.grid_text(frames)},
                     {"type": "image_url", "image_url": {"url": data_url(grid), "detail": detail}}]
        else:
            if plan.scaled:
                frames = shrunk(frames, plan.width, plan.height,
                                workdir / f"{plan.width}x{plan.height}")
            parts = []
            for frame in frames:
                parts.append({"type": "text", "text": frame_label(frame)})
                parts.append({"type": "image_url", "image_url": {"url": data_url(frame.path),
                                                                 "detail": detail}})
        return parts + [{"type": "text", "text": self.task_text(prompt)}]

    # -- fitting the server ------------------------------------------------------------------

    def misfit(self, plan: Plan, reported: int | None) -> str | None:
        """Whether the server may not have seen the whole prompt: "short" (it reports far
        fewer prompt tokens than were sent: Ollama's silent cut), "filled" (it reports the
        whole context, more than estimated: pictures cost more than thought), or None."""
        if reported is None:
            return None
        held_before = self.learned.server_holds
        self.learned.server_holds = max(held_before, reported)
        if reported < held_before - plan.largest_image or reported > plan.context:
            return None  # below what the server held before, or more than the plan's room
        if reported < SHORT_RATIO * plan.estimate:
            return "short"
        if reported > plan.estimate and reported >= plan.context - plan.reserve // 2:
            return "filled"
        return None

    def refit(self, problem: str, plan: Plan, reported: int) -> None:
        if problem == "short":
            if reported < MIN_CONTEXT:
                raise AnalysisError(f"the server kept only {reported} prompt tokens of "
                                    f"~{plan.estimate}", retryable=True, bad_request=True)
            self.learned.context = reported
            self.note("context", f"the server kept {reported} of ~{plan.estimate} prompt "
                      f"tokens sent: requests are planned for {reported} tokens of context "
                      f"(raise the server's context, e.g. OLLAMA_CONTEXT_LENGTH, or set "
                      f"image_tokens if its pictures cost fewer tokens)")
        else:
            images = max(reported - plan.text_tokens, 1) / max(plan.image_tokens, 1)
            self.learned.image_factor = min(self.learned.image_factor * max(images, 1.25), 50.0)
            self.note("image_tokens", f"the server's pictures cost more than estimated "
                      f"({reported} prompt tokens for ~{plan.estimate}): estimates x"
                      f"{self.learned.image_factor:.2f} (set image_tokens to say)")

    def adapt(self, change: Adaptation, plan: Plan) -> None:
        learned = self.learned
        reason = first_line(change)
        most = change.numbers.get("most") or 0
        if change.kind == "max_tokens" and learned.token_param == "max_tokens":
            learned.token_param = "max_completion_tokens"
            self.note("max_tokens", f"sent as max_completion_tokens ({reason})")
        elif change.kind == "temperature" and learned.temperature:
            learned.temperature = False
            self.note("temperature", f"not sent ({reason})")
        elif change.kind == "images" and most == 1 and not learned.grid:
            learned.grid = True
            self.note("images", f"one grid picture per request ({reason})")
        elif change.kind == "images" and 1 < most < len(plan.frames):
            learned.max_images = most
            self.note("images", f"at most {most} pictures per request ({reason})")
        elif change.kind == "context":
            self.fit_context(change, plan, reason)
        else:
            raise AnalysisError(f"chat: HTTP 400: {reason}", retryable=True, bad_request=True)

    def fit_context(self, change: Adaptation, plan: Plan, reason: str) -> None:
        """A context-length 400: the server's limit (when it says it) and its count of
        our prompt (when it says it, and it is more than estimated) go into the plan;
        with neither, a quarter smaller."""
        limit, counted = change.numbers.get("limit"), change.numbers.get("prompt")
        learned = self.learned
        undercounted = bool(counted and counted > plan.estimate)
        if undercounted:
            images = max(counted - plan.text_tokens, 1) / max(plan.image_tokens, 1)
            learned.image_factor = min(learned.image_factor * images * 1.05, 50.0)
        if limit and limit < plan.context:
            context = limit
        else:
            context = plan.context if undercounted else int(plan.context * 0.75)
        if context < MIN_CONTEXT:
            raise AnalysisError(f"chat: HTTP 400: {reason}", retryable=True, bad_request=True)
        learned.context = context
        self.note("context", f"requests planned for {context} tokens of context ({reason})")

    def note(self, key: str, text: str) -> None:
        self.learned.notes[key] = text

    # -- the request -------------------------------------------------------------------------

    def ask(self, content: list[dict[str, Any]], plan: Plan) -> Answer:
        if self.learned.schema_mode == "json_schema":
            response_format = self.structured_output(RESPONSE_SCHEMA)
        else:
            response_format = {"type": "json_object"}
        params: dict[str, Any] = dict(model=self.settings.model, response_format=response_format,
                                      messages=[{"role": "user", "content": content}])
        params[self.learned.token_param] = plan.max_tokens
        if self.learned.temperature:
            params["temperature"] = self.settings.temperature
        response = self.call("chat", lambda: self.client.chat.completions.create(**params))
        return self.read_response(response)

    def read_response(self, response) -> Answer:
        return read_answer(self.answer_of, response, "the server")

    def answer_of(self, response) -> Answer:
        usage = response.usage
        details = getattr(usage, "completion_tokens_details", None) if usage else None
        cached = getattr(usage, "prompt_tokens_details", None) if usage else None
        completion = count(getattr(usage, "completion_tokens", None))
        reasoning = count(getattr(details, "reasoning_tokens", None))
        if completion is not None and reasoning is not None:
            # OpenAI's completion_tokens include the reasoning; stored apart, as Gemini's.
            completion = max(completion - reasoning, 0)
        tokens = dict(prompt_tokens=count(getattr(usage, "prompt_tokens", None)),
                      output_tokens=completion,
                      total_tokens=count(getattr(usage, "total_tokens", None)),
                      thoughts_tokens=reasoning,
                      cached_tokens=count(getattr(cached, "cached_tokens", None)),
                      model_version=str(getattr(response, "model", "") or "")[:100] or None)
        if not response.choices:
            raise AnalysisError("no usable answer (no choices)", retryable=True)
        choice = response.choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise AnalysisError(f"refused by the model: {first_line(refusal)[:200]}",
                                retryable=False, refusal=True)
        if choice.finish_reason == "length":
            raise AnalysisError("answer truncated (finish_reason length)", retryable=True)
        if choice.finish_reason == "content_filter":
            raise AnalysisError("answer withheld (finish_reason content_filter)",
                                retryable=False, refusal=True)
        text = choice.message.content or ""
        if not isinstance(text, str):
            raise TypeError(f"message content is {type(text).__name__}")
        return Answer(data=parse_answer(text), **tokens)

    def probe(self) -> None:
        """The cheapest request that still carries what every real one does: a picture,
        the output-token parameter and the temperature as this client sends them."""
        params: dict[str, Any] = dict(model=self.settings.model, messages=[{
            "role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + PROBE_IMAGE,
                                                    "detail": "low"}},
                {"type": "text", "text": PROBE_PROMPT}]}])
        params[self.learned.token_param] = 16
        if self.learned.temperature:
            params["temperature"] = self.settings.temperature
        try:
            self.call("probe", lambda: self.client.chat.completions.create(**params))
        except (Adaptation, SchemaRefused) as exc:
            raise AnalysisError(f"probe: HTTP 400: {first_line(exc)}", retryable=True,
                                bad_request=True) from None

    def call(self, what: str, request: Callable[[], Any]) -> Any:
        """One SDK call within the request's total deadline, its failures sorted into job,
        rate-limit and account problems."""
        import openai

        settings = self.settings
        try:
            with bounded(settings.timeout_seconds, MAX_RESPONSE_BYTES):
                return request()
        except openai.APITimeoutError:
            raise AnalysisError(f"{what}: timed out after {settings.timeout_seconds:g} s",
                                retryable=True) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            verb = "cannot connect" if "Connect" in type(cause).__name__ else "connection failed"
            raise AnalysisError(f"{what}: {verb} ({first_line(cause)})", retryable=True) from None
        except openai.APIStatusError as exc:
            raise status_error(what, exc, settings, self.learned.schema_mode) from None
        except openai.APIResponseValidationError as exc:
            raise AnalysisError(f"{what}: malformed response from the server "
                                f"({first_line(exc)})", retryable=True) from None


def status_error(what: str, exc, settings: OpenAISettings, schema_mode: str) -> Exception:
    code = exc.status_code
    body = error_body(exc)
    message = first_line(body.get("message") or getattr(exc, "message", "") or exc)
    label = f"{what}: HTTP {code}"
    if code == 400:
        return bad_request(what, message, body, schema_mode)
    if code == 401:
        return AccountProblem("bad_key", f"{label}: bad API key ({message})")
    if code == 403:
        return AccountProblem("permission_denied", f"{label}: access denied ({message})")
    if code == 404 and "model" in message.lower():
        return AccountProblem("model_unavailable",
                              f"{label}: model {settings.model!r} unknown ({message})")
    hint = retry_hint(header(exc.response, "retry-after"), settings.max_retry_wait_seconds)
    if code == 429:
        if "insufficient_quota" in str(body.get("code", "")) or "quota" in message.lower():
            return AccountProblem("quota_exhausted", f"{label}: quota used up ({message})")
        wait, asked = hint or (DEFAULT_RATE_WAIT_SECONDS, DEFAULT_RATE_WAIT_SECONDS)
        return RateLimited(f"{label}: rate limited, waiting {describe_wait(wait, asked)} "
                           f"({message})", wait)
    if code in (408, 409) or code >= 500:
        return AnalysisError(f"{label}: {message}", retryable=True,
                             retry_after=hint[0] if hint else None)
    # Any other 4xx (a wrong base_url's 404, 405, 413, 422): the provider's setup.
    return AnalysisError(f"{label}: {message}", retryable=True, bad_request=True)


def bad_request(what: str, message: str, body: dict[str, Any], schema_mode: str) -> Exception:
    """A 400: a known parameter refusal to adapt to, or the provider's problem."""
    lowered = message.lower()
    param = str(body.get("param") or "")
    code = str(body.get("code") or body.get("type") or "")
    if schema_mode == "json_schema" and any(word in lowered for word in SCHEMA_WORDS):
        return SchemaRefused(message)
    if param == "max_tokens" or ("max_tokens" in lowered and "max_completion_tokens" in lowered):
        return Adaptation("max_tokens", message)
    if param == "temperature" or ("temperature" in lowered and
                                  ("unsupported" in lowered or "not support" in lowered)):
        return Adaptation("temperature", message)
    if any(word in lowered or word in code for word in CONTEXT_WORDS):
        limit = CONTEXT_LIMIT.search(message)
        prompt = PROMPT_COUNT.search(message)
        return Adaptation("context", message,
                          limit=int(limit.group(1)) if limit else count(body.get("n_ctx")),
                          prompt=(int(prompt.group(1) or prompt.group(2)) if prompt
                                  else count(body.get("n_prompt_tokens"))))
    images = IMAGE_LIMIT.search(message)
    if images:
        return Adaptation("images", message, most=int(images.group(1)))
    return AnalysisError(f"{what}: HTTP 400: {message}", retryable=True, bad_request=True)


def error_body(exc) -> dict[str, Any]:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
        if isinstance(inner, str):
            return {"message": inner}
    return {}


def header(response, name: str) -> str | None:
    try:
        return response.headers.get(name)
    except AttributeError:
        return None
