"""An OpenAI-compatible chat-completions server for the tests, speaking the wire protocol
the real openai SDK speaks (POST /v1/chat/completions, GET /v1/models), the way the local
servers vlmguard meets do (Ollama, vLLM, llama.cpp's server, LocalAI).

It tells the truth about what it was sent: every image part is decoded from its data URL
and its JPEG size read; usage counts text at about 4 characters a token and each image
by OpenAI's published rule (85 tokens at detail low; otherwise 85 + 170 per 512-px tile
after fitting in 2048x2048 and scaling the short side to 768). A strict json_schema is
checked the way strict mode checks it (every object closed, every property required).
Failures seen in the wild can be injected: 429 with Retry-After, 500, 503, a request that
outlives the client's timeout, an answer that is not JSON, a truncated answer, a bad key;
and two kinds of server: one without json_schema support (400 naming response_format),
and one that takes a single image per message. It runs on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import secrets
import struct
import threading
import time
from typing import Any

from aiohttp import web

from daemon import free_port

MODELS = {"qwen2.5vl:7b", "gpt-4.1-mini"}
CHARS_PER_TOKEN = 4
DEFAULT_ANSWER = {
    "summary": "A worker walks past a forklift and trips near the loading bay.",
    "incidents": [{"start_offset_s": 3, "end_offset_s": 5, "category": "fall",
                   "severity": "high", "description": "A person trips and falls.",
                   "confidence": 0.7}],
    "safety_score": 70,
}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG's start-of-frame marker."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    at = 2
    while at < len(data):
        if data[at] != 0xFF:
            raise ValueError("corrupt JPEG")
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    raise ValueError("no frame header in JPEG")


def image_tokens(width: int, height: int, detail: str) -> int:
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


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
          code: str | None = None, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                        "code": code}}, status=status, headers=headers)


class FakeOpenAI:
    """Set .faults (consumed one per chat request), .outage (every chat request fails so
    until cleared), .schema_support, .one_image_per_message, .answer, .api_key (None:
    any key, as local servers do)."""

    def __init__(self):
        self.port = free_port()
        self.requests: list[dict] = []  # what each chat request carried (images decoded)
        self.faults: list[str] = []
        self.outage: str | None = None
        self.schema_support = True
        self.one_image_per_message = False
        self.api_key: str | None = None
        self.answer: Any = DEFAULT_ANSWER
        self.hang_seconds = 30.0
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
        self.runner = web.AppRunner(app, access_log=None)
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
                                  "images": [], "texts": [], "status": 200,
                                  "time": time.time()}
        self.requests.append(record)
        response = self.refuse(request, body, record)
        if response is None:
            fault = self.faults.pop(0) if self.faults else self.outage
            response = await self.inject(fault) if fault else self.complete(body, record)
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
                elif part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    if not url.startswith("data:image/jpeg;base64,"):
                        return error(400, "image_url must be a base64 JPEG data URL here")
                    data = base64.b64decode(url.split(",", 1)[1])
                    try:
                        width, height = jpeg_size(data)
                    except ValueError as exc:
                        return error(400, f"invalid image: {exc}")
                    record["images"].append({"data": data, "width": width, "height": height,
                                             "detail": part["image_url"].get("detail", "auto")})
        if self.one_image_per_message and len(record["images"]) > 1:
            return error(400, "this server takes at most one image per message")
        return None

    def complete(self, body: dict, record: dict) -> web.Response:
        text_chars = sum(len(t) for t in record["texts"])
        prompt = math.ceil(text_chars / CHARS_PER_TOKEN) + sum(
            image_tokens(i["width"], i["height"], i["detail"]) for i in record["images"])
        content = self.answer if isinstance(self.answer, str) else json.dumps(self.answer)
        output = math.ceil(len(content) / CHARS_PER_TOKEN)
        record["usage"] = {"prompt_tokens": prompt, "completion_tokens": output,
                           "total_tokens": prompt + output}
        return web.json_response({
            "id": "chatcmpl-" + secrets.token_hex(8), "object": "chat.completion",
            "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": record["usage"]})

    async def inject(self, fault: str) -> web.StreamResponse:
        if fault == "429":
            return error(429, "Rate limit reached for requests per minute. Please try again "
                         "in 2s.", kind="requests", code="rate_limit_exceeded",
                         headers={"Retry-After": "2"})
        if fault == "quota":
            return error(429, "You exceeded your current quota, please check your plan and "
                         "billing details.", kind="insufficient_quota", code="insufficient_quota")
        if fault == "500":
            return error(500, "The server had an error while processing your request.",
                         kind="server_error")
        if fault == "503":
            return error(503, "The model is loading, try again later.", kind="server_error")
        if fault == "timeout":
            await asyncio.sleep(self.hang_seconds)
            return error(504, "too late")
        if fault == "nonjson":
            return web.json_response({
                "id": "chatcmpl-x", "object": "chat.completion", "created": int(time.time()),
                "model": "qwen2.5vl:7b", "usage": {"prompt_tokens": 100, "completion_tokens": 9,
                                                   "total_tokens": 109},
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "Sure! The clip shows a warehouse."}}]})
        raise ValueError(f"unknown fault {fault}")
