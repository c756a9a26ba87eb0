"""An OpenAI-compatible chat-completions server for the tests, speaking the wire protocol
the real openai SDK speaks (POST /v1/chat/completions, GET /v1/models), the way the local
servers vlmguard meets do (Ollama, vLLM, llama.cpp's server, LocalAI) and OpenAI itself.

It tells the truth about what it was sent: every image part is decoded from its data URL
and its JPEG size read. By default it counts as OpenAI does: text at about 4 characters a
token, each image by OpenAI's published rule (85 tokens at detail low; otherwise 85 + 170
per 512-px tile after fitting in 2048x2048 and scaling the short side to 768). A strict
json_schema is checked the way strict mode checks it (every object closed, every
property required).

`mode` makes it behave as a real server does (../shared/docs/real-servers.md):
- "ollama": a context of `num_ctx` tokens (4,096 by default); every content part is its
  own message (Ollama's FromChatRequest), images cost Qwen2.5-VL's 28x28 patches; a prompt
  over the context is cut silently, keeping the first 4 tokens and the tail (the runner's
  NewSequence; an image is never split), and usage.prompt_tokens reports what was kept.
  When the task text was cut away, the answer still parses (the schema is a grammar) but
  is about "a colourful test pattern", score 100, no incidents. Temperature 1.0 unless
  the request sends one; reads max_tokens only.
- "vllm": prompt + completion over `max_model_len` (8,192) is a 400 naming both counts;
  with `mm_limit` set, more images than that is a 400 ("At most N image(s)").
- "llamacpp": a prompt over `n_ctx` is a 400 "exceeds the available context size" with
  n_prompt_tokens and n_ctx in the error body.
- "gpt5": max_tokens is a 400 unsupported_parameter ("Use 'max_completion_tokens'"), any
  temperature but 1 a 400 unsupported_value; usage carries reasoning and cached tokens.
- "misconfigured": every chat request is a 400 (llama.cpp started without --mmproj).

Failures seen in the wild can be injected per request (`faults`, one consumed per chat
request) or for every request (`outage`): 429 (with Retry-After 2, 1e12 or 99999999999),
quota, 500, 503 (also with Retry-After 1e12), a request that outlives the client's
timeout, bytes dripped one every half second, an answer that is not JSON, an HTML page
or JSON of the wrong shape with status 200, an answer nested too deeply, a 5 MB
description, over-long texts with control characters, 200 incidents, a refusal. It runs
on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import secrets
import threading
import time
from typing import Any

from aiohttp import web

from helpers import free_port
from vlmguard.vlm.images import jpeg_size

MODELS = {"qwen2.5vl:7b", "gpt-4.1-mini", "gpt-5-mini"}
CHARS_PER_TOKEN = 4
DEFAULT_ANSWER = {
    "summary": "A worker walks past a forklift and trips near the loading bay.",
    "incidents": [{"start_offset_s": 3, "end_offset_s": 5, "category": "fall",
                   "severity": "high", "description": "A person trips and falls.",
                   "confidence": 0.7}],
    "safety_score": 70,
}
# What a model answers about CCTV frames when the instructions were cut away: valid JSON
# (the schema is a grammar), about the picture, and "safe".
NO_TASK_ANSWER = {"summary": "A colourful test pattern with moving shapes and a timestamp.",
                  "incidents": [], "safety_score": 100}
TASK_MARKER = "safety_score"
# Ollama: the first tokens kept when a prompt is cut (numKeep), the chat template's tokens
# around each message, and the assistant prefix at the end.
NUM_KEEP = 4
MESSAGE_TOKENS = 5
ASSISTANT_TOKENS = 3
# Qwen2.5-VL's image processor (smart_resize): factor 28, at most 1280 patches.
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
MISCONFIGURED_MESSAGE = ("image input is not supported - hint: if this is unexpected, you "
                         "may need to provide the mmproj")
DRIP_SECONDS = 0.5


def image_tokens(width: int, height: int, detail: str) -> int:
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


def qwen_image_tokens(width: int, height: int) -> int:
    """Qwen2.5-VL: the picture resized to multiples of 28 within the pixel bounds, one
    token per 28x28 patch after the 2x2 merge of 14-px patches, plus vision start/end."""
    h_bar = max(QWEN_FACTOR, round(height / QWEN_FACTOR) * QWEN_FACTOR)
    w_bar = max(QWEN_FACTOR, round(width / QWEN_FACTOR) * QWEN_FACTOR)
    if h_bar * w_bar > QWEN_MAX_PIXELS:
        beta = math.sqrt(height * width / QWEN_MAX_PIXELS)
        h_bar = math.floor(height / beta / QWEN_FACTOR) * QWEN_FACTOR
        w_bar = math.floor(width / beta / QWEN_FACTOR) * QWEN_FACTOR
    elif h_bar * w_bar < QWEN_MIN_PIXELS:
        beta = math.sqrt(QWEN_MIN_PIXELS / (height * width))
        h_bar = math.ceil(height * beta / QWEN_FACTOR) * QWEN_FACTOR
        w_bar = math.ceil(width * beta / QWEN_FACTOR) * QWEN_FACTOR
    return (h_bar // QWEN_FACTOR) * (w_bar // QWEN_FACTOR) + 2


def text_count(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def strict_problem(schema: Any, where: str = "schema") -> str | None:
    """What strict structured outputs would refuse in this schema, or None."""
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "object":
        if schema.get("additionalProperties") is not False:
            return f"{where}: additionalProperties must be false"
        if sorted(schema.get("required", [])) != sorted(schema.get("properties", {})):
            return f"{where}: all properties must be required"
        for name, sub in schema.get("properties", {}).items():
            problem = strict_problem(sub, f"{where}.{name}")
            if problem:
                return problem
    if "items" in schema:
        return strict_problem(schema["items"], f"{where}[]")
    return None


def error(status: int, message: str, kind: str = "invalid_request_error",
          code: str | None = None, headers: dict | None = None, param: str | None = None,
          **extra: Any) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": code, **extra}}, status=status, headers=headers)


def completion(model: str, content: str | None, usage: dict, refusal: str | None = None,
               finish: str = "stop") -> dict:
    return {"id": "chatcmpl-" + secrets.token_hex(8), "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content,
                                     "refusal": refusal}}],
            "usage": usage}


def ollama_cut(units: list[tuple[int, str, int]], num_ctx: int) -> tuple[int, int]:
    """Ollama's runner on a prompt of units (tokens, "text" or "image", part index):
    (tokens kept, index of the first token kept after the first NUM_KEEP). Over num_ctx
    it keeps the first NUM_KEEP tokens and the tail, moving the cut past a whole image."""
    total = sum(n for n, _, _ in units)
    if total <= num_ctx:
        return total, 0
    start = NUM_KEEP + total - num_ctx
    at = 0
    for tokens, kind, _ in units:
        if kind == "image" and at < start < at + tokens:
            start = at + tokens  # an image is never split: all of it goes
        at += tokens
    return NUM_KEEP + total - start, start


class FakeOpenAI:
    """Set .mode (None, "ollama", "vllm", "llamacpp", "gpt5", "misconfigured"), .faults
    (consumed one per chat request), .outage (every chat request fails so until cleared),
    .schema_support, .one_image_per_message, .answer, .api_key (None: any key, as local
    servers do); .num_ctx, .max_model_len, .mm_limit, .n_ctx for the modes."""

    def __init__(self):
        self.port = free_port()
        self.requests: list[dict] = []  # what each chat request carried (images decoded)
        self.faults: list[str] = []
        self.outage: str | None = None
        self.mode: str | None = None
        self.num_ctx = 4096
        self.max_model_len = 8192
        self.mm_limit: int | None = None
        self.n_ctx = 4096
        self.schema_support = True
        self.one_image_per_message = False
        self.api_key: str | None = None
        self.answer: Any = DEFAULT_ANSWER
        self.hang_seconds = 30.0
        self.drip_for_seconds = 30.0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        # A handler sleeping on purpose (delays, hangs, drips) is cancelled after 1 s at
        # the end of a test, instead of holding the test's teardown.
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(15)
        except TimeoutError:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def answered(self) -> list[dict]:
        return [r for r in self.requests if r["status"] == 200]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in MODELS]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        record: dict[str, Any] = {"bytes": len(raw), "model": body.get("model"),
                                  "response_format": body.get("response_format"),
                                  "images": [], "texts": [], "parts": [], "status": 200,
                                  "time": time.time(), "mode": self.mode,
                                  "params": sorted(k for k in body if k != "messages"),
                                  "temperature": body.get("temperature"),
                                  "max_tokens": body.get("max_tokens"),
                                  "max_completion_tokens": body.get("max_completion_tokens")}
        self.requests.append(record)
        response = self.refuse(request, body, record)
        if response is None:
            fault = self.faults.pop(0) if self.faults else self.outage
            record["fault"] = fault
            if fault:
                response = await self.inject(fault, request, body, record)
            else:
                response = self.as_mode(body, record)
        record["status"] = response.status
        return response

    def refuse(self, request: web.Request, body: dict, record: dict) -> web.Response | None:
        """What a real server refuses before looking at the content."""
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and key != self.api_key:
            return error(401, "Incorrect API key provided.", code="invalid_api_key")
        if body.get("model") not in MODELS:
            return error(404, f"The model `{body.get('model')}` does not exist or you do not "
                         f"have access to it.", code="model_not_found")
        if self.mode == "misconfigured":
            return error(400, MISCONFIGURED_MESSAGE)
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema":
            if not self.schema_support:
                return error(400, "response_format type 'json_schema' is not supported by "
                             "this server")
            spec = response_format.get("json_schema", {})
            problem = strict_problem(spec.get("schema")) if spec.get("strict") else None
            if problem:
                return error(400, f"Invalid schema for response_format: {problem}")
        for message in body.get("messages", []):
            content = message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            for part in parts:
                if part.get("type") == "text":
                    record["texts"].append(part["text"])
                    record["parts"].append(("text", part["text"]))
                elif part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    if not url.startswith("data:image/jpeg;base64,"):
                        return error(400, "image_url must be a base64 JPEG data URL here")
                    data = base64.b64decode(url.split(",", 1)[1])
                    try:
                        width, height = jpeg_size(data)
                    except ValueError as exc:
                        return error(400, f"invalid image: {exc}")
                    image = {"data": data, "width": width, "height": height,
                             "detail": part["image_url"].get("detail", "auto")}
                    record["images"].append(image)
                    record["parts"].append(("image", image))
        if self.one_image_per_message and len(record["images"]) > 1:
            return error(400, "this server takes at most one image per message")
        if self.mode == "gpt5":
            if "max_tokens" in body:
                return error(400, "Unsupported parameter: 'max_tokens' is not supported with "
                             "this model. Use 'max_completion_tokens' instead.",
                             code="unsupported_parameter", param="max_tokens")
            if body.get("temperature", 1) != 1:
                return error(400, f"Unsupported value: 'temperature' does not support "
                             f"{body['temperature']} with this model. Only the default (1) "
                             "value is supported.", code="unsupported_value",
                             param="temperature")
        return None

    # -- the modes ----------------------------------------------------------------------------

    def answer_text(self) -> str:
        return self.answer if isinstance(self.answer, str) else json.dumps(self.answer)

    def as_mode(self, body: dict, record: dict) -> web.Response:
        if self.mode == "ollama":
            return self.as_ollama(body, record)
        if self.mode in ("vllm", "llamacpp"):
            return self.as_context_checker(body, record)
        return self.as_openai(body, record)

    def as_openai(self, body: dict, record: dict, content: str | None = None,
                  refusal: str | None = None) -> web.Response:
        prompt = sum(text_count(t) for t in record["texts"]) + sum(
            image_tokens(i["width"], i["height"], i["detail"]) for i in record["images"])
        content = self.answer_text() if content is None and refusal is None else content
        output = text_count(content or refusal or "")
        usage = {"prompt_tokens": prompt, "completion_tokens": output,
                 "total_tokens": prompt + output}
        if self.mode == "gpt5":
            reasoning = 64
            usage.update(completion_tokens=output + reasoning, total_tokens=prompt + output
                         + reasoning, completion_tokens_details={"reasoning_tokens": reasoning},
                         prompt_tokens_details={"cached_tokens": min(prompt, 1024)})
        record["usage"] = usage
        return web.json_response(completion(body["model"], content, usage, refusal=refusal))

    def qwen_units(self, record: dict) -> list[tuple[int, str, int]]:
        """The prompt as Qwen2.5-VL's tokens: each part its own message (Ollama), or one
        message (vLLM, llama.cpp) when the mode says so."""
        units: list[tuple[int, str, int]] = []
        separate = self.mode == "ollama"
        for n, (kind, value) in enumerate(record["parts"]):
            frame = MESSAGE_TOKENS if separate or n == 0 else 0
            if kind == "text":
                units.append((text_count(value) + frame, "text", n))
            else:
                if frame:
                    units.append((frame, "text", n))
                units.append((qwen_image_tokens(value["width"], value["height"]), "image", n))
        units.append((ASSISTANT_TOKENS, "text", len(record["parts"])))
        return units

    def as_ollama(self, body: dict, record: dict) -> web.Response:
        units = self.qwen_units(record)
        kept, start = ollama_cut(units, self.num_ctx)
        task_parts = [n for n, (kind, value) in enumerate(record["parts"])
                      if kind == "text" and TASK_MARKER in value]
        # A part was seen whole when its first token is at or after the cut.
        starts: dict[int, int] = {}
        at = 0
        for tokens, _, part in units:
            starts.setdefault(part, at)
            at += tokens
        seen = {part for part, begin in starts.items() if begin >= start}
        record.update(truncated=start > 0, prompt_sent=sum(n for n, _, _ in units),
                      prompt_kept=kept,
                      images_seen=sum(1 for n, (kind, _) in enumerate(record["parts"])
                                      if kind == "image" and n in seen),
                      task_seen=bool(task_parts) and all(p in seen for p in task_parts),
                      temperature_used=body.get("temperature", 1.0),
                      num_predict=body.get("max_tokens", -1))
        content = self.answer_text() if record["task_seen"] else json.dumps(NO_TASK_ANSWER)
        output = text_count(content)
        record["usage"] = {"prompt_tokens": kept, "completion_tokens": output,
                           "total_tokens": kept + output}
        return web.json_response(completion(body["model"], content, record["usage"]))

    def as_context_checker(self, body: dict, record: dict) -> web.Response:
        prompt = sum(n for n, _, _ in self.qwen_units(record))
        record["prompt_sent"] = prompt
        if self.mode == "llamacpp" and prompt > self.n_ctx:
            return error(400, "the request exceeds the available context size, try increasing "
                         "it", kind="exceed_context_size_error", n_prompt_tokens=prompt,
                         n_ctx=self.n_ctx)
        if self.mode == "vllm":
            if self.mm_limit is not None and len(record["images"]) > self.mm_limit:
                return error(400, f"At most {self.mm_limit} image(s) may be provided in one "
                             "prompt.")
            wanted = body.get("max_completion_tokens") or body.get("max_tokens")
            completion_tokens = wanted if wanted is not None else self.max_model_len - prompt
            if prompt + completion_tokens > self.max_model_len:
                return error(400, f"This model's maximum context length is "
                             f"{self.max_model_len} tokens. However, you requested "
                             f"{prompt + completion_tokens} tokens ({prompt} in the messages, "
                             f"{completion_tokens} in the completion). Please reduce the "
                             "length of the messages or completion.", code="BadRequestError")
        content = self.answer_text()
        output = text_count(content)
        record["usage"] = {"prompt_tokens": prompt, "completion_tokens": output,
                           "total_tokens": prompt + output}
        return web.json_response(completion(body["model"], content, record["usage"]))

    # -- faults -------------------------------------------------------------------------------

    async def inject(self, fault: str, request: web.Request, body: dict,
                     record: dict) -> web.StreamResponse:
        model = body.get("model", "qwen2.5vl:7b")
        if fault in ("429", "429_huge", "429_date"):
            after = {"429": "2", "429_huge": "1e12", "429_date": "99999999999"}[fault]
            return error(429, "Rate limit reached for requests per minute. Please try again "
                         "in 2s.", kind="requests", code="rate_limit_exceeded",
                         headers={"Retry-After": after})
        if fault == "quota":
            return error(429, "You exceeded your current quota, please check your plan and "
                         "billing details.", kind="insufficient_quota", code="insufficient_quota")
        if fault == "500":
            return error(500, "The server had an error while processing your request.",
                         kind="server_error")
        if fault in ("503", "503_huge"):
            headers = {"Retry-After": "1e12"} if fault == "503_huge" else None
            return error(503, "The model is loading, try again later.", kind="server_error",
                         headers=headers)
        if fault == "timeout":
            await asyncio.sleep(self.hang_seconds)
            return error(504, "too late")
        if fault == "drip":
            return await self.drip(request, model)
        if fault == "nonjson":
            return self.as_openai(body, record, "Sure! The clip shows a warehouse.")
        if fault == "html":
            return web.Response(status=200, text="<html><body>Welcome to nginx!</body></html>",
                                content_type="text/html")
        if fault == "shape":
            return web.json_response({"object": "chat.completion", "choices": "busy",
                                      "usage": "none"})
        if fault == "nested":
            return self.as_openai(body, record, "[" * 100_000 + "]" * 100_000)
        if fault == "huge":
            answer = dict(DEFAULT_ANSWER, incidents=[dict(DEFAULT_ANSWER["incidents"][0],
                                                          description="x" * 5_000_000)])
            return self.as_openai(body, record, json.dumps(answer))
        if fault == "long":
            incident = dict(DEFAULT_ANSWER["incidents"][0],
                            description="A person\x00 falls.\x1b[31m\u202e" + "y" * 50_000,
                            category="fall\x07" + "z" * 500)
            answer = {"summary": "Over\x00long\r\nsummary " + "s" * 20_000,
                      "incidents": [incident], "safety_score": 40}
            return self.as_openai(body, record, json.dumps(answer))
        if fault == "many":
            incident = DEFAULT_ANSWER["incidents"][0]
            answer = dict(DEFAULT_ANSWER, incidents=[
                dict(incident, severity="critical" if n % 40 == 0 else "low",
                     start_offset_s=n * 0.05, end_offset_s=n * 0.05 + 0.05) for n in range(200)])
            return self.as_openai(body, record, json.dumps(answer))
        if fault == "400":  # what a server says of one request it will not take
            return error(400, "Invalid 'messages[0].content[1].image_url.url': the image "
                         "could not be decoded.", code="invalid_value")
        if fault == "refusal":
            return self.as_openai(body, record, refusal="I can't help with that request.")
        raise ValueError(f"unknown fault {fault}")

    async def drip(self, request: web.Request, model: str) -> web.StreamResponse:
        return await drip(request, self.drip_for_seconds, json.dumps(completion(
            model, self.answer_text(), {"prompt_tokens": 1, "completion_tokens": 1,
                                        "total_tokens": 2})).encode())


async def drip(request: web.Request, seconds: float, body: bytes) -> web.StreamResponse:
    """Status and headers at once, then a space every DRIP_SECONDS for `seconds`, then the
    body: never idle long enough for a per-read timeout to fire."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await response.prepare(request)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            await response.write(b" ")
            await asyncio.sleep(DRIP_SECONDS)
        await response.write(body)
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass  # the client gave up, as it should
    return response


def main() -> None:
    """Run standalone (for the benchmarks): python tests/openai_server.py PORT [MODE]."""
    import sys

    server = FakeOpenAI()
    server.port = int(sys.argv[1])
    server.mode = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "openai" else None
    with server:
        print("ready", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
