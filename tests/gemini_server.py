"""A Gemini Developer API server for the tests, speaking the wire protocol the real
google-genai SDK speaks (../shared/docs/gemini-wire.md): resumable upload, files get and
delete, generateContent with inline or uploaded video, and the failures seen in the wild.

It tells the truth about cost and failure the way the real service does: usageMetadata is
computed from what was sent (video frames at the requested fps x the documented tokens per
frame for the media resolution and model family, about 4 characters a text token, thought
tokens when thinking is on, and those count against maxOutputTokens); modelVersion says
which model answered; uploads stay PROCESSING for a few polls; 429s carry QuotaFailure,
Help and RetryInfo details (per minute and per day); a short X-Server-Timeout is answered
with 500; retired models answer 404; a thinking level a model does not offer (`levels`)
is a 400. Faults: refusals by every finish reason the SDK names (SAFETY, SPII,
IMAGE_PROHIBITED_CONTENT, ...), absurd RetryInfo delays, a 5 MB answer, over-long texts,
HTML or wrongly shaped JSON with status 200, bytes dripped one every half second. It runs
on 127.0.0.1 in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from helpers import free_port
from openai_server import drip

VALID_KEY = "test-key-123"
MODELS = {"gemini-3.8-flash", "gemini-3.5-flash", "gemini-2.5-flash-lite"}
RETIRED = {"gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash", "gemini-1.5-flash"}
# Documented video tokens per frame (gemini-wire.md): 2.x 66 at LOW, 258 otherwise;
# 3.x 70 at LOW and MEDIUM (and its default for video), 280 at HIGH.
TOKENS_PER_FRAME = {
    "2": {"MEDIA_RESOLUTION_LOW": 66, "MEDIA_RESOLUTION_MEDIUM": 258,
          "MEDIA_RESOLUTION_HIGH": 258, None: 258},
    "3": {"MEDIA_RESOLUTION_LOW": 70, "MEDIA_RESOLUTION_MEDIUM": 70,
          "MEDIA_RESOLUTION_HIGH": 280, None: 70},
}
CHARS_PER_TOKEN = 4
# Thought tokens a request of this kind spends (a model's typical, not a documented figure).
DYNAMIC_THOUGHTS = 1200
THOUGHTS_BY_LEVEL = {"MINIMAL": 0, "LOW": 300, "MEDIUM": 800, "HIGH": 2000, None: 2000}
SHORTEST_SERVER_TIMEOUT = 10  # seconds; below this the service answers 500
# The thinking levels each 3-class model offers (gemini-3.8-flash has no MINIMAL, as
# API resellers report; not in Google's docs as read).
LEVELS = {"gemini-3.8-flash": ("LOW", "MEDIUM", "HIGH"),
          "gemini-3.5-flash": ("MINIMAL", "LOW", "MEDIUM", "HIGH")}
# Finish reasons that withhold the answer (SDK FinishReason), as faults.
REFUSAL_FAULTS = {"safety": "SAFETY", "prohibited": "PROHIBITED_CONTENT",
                  "blocklist": "BLOCKLIST", "spii": "SPII",
                  "image_prohibited": "IMAGE_PROHIBITED_CONTENT"}

QUOTA_HELP = {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
    "description": "Learn more about Gemini API quotas",
    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}

SHOWINFO_PTS = re.compile(r"\bpts_time:\s*([-\d.]+)")
SHOWINFO_MEAN = re.compile(r"\bmean:\[([\d ]+)\]")

DEFAULT_ANSWER = {
    "safety_score": 72,
    "summary": "A worker walks past a forklift and trips near the loading bay.",
    "incidents": [{"start_offset_s": 3, "end_offset_s": 5, "category": "fall", "severity": "high",
                   "description": "A person trips and falls next to the forklift.",
                   "confidence": 0.8}],
}


def video_seconds(data: bytes) -> float:
    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(data)
        handle.flush()
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                              "-of", "csv=p=0", handle.name], capture_output=True, text=True)
    try:
        return float(out.stdout.strip())
    except ValueError:
        return 0.0


def answer_within(seconds: float) -> dict:
    """Like a model, place the incident inside the clip it was shown (3-5 s when it can)."""
    incident = dict(DEFAULT_ANSWER["incidents"][0],
                    start_offset_s=round(min(3.0, seconds / 2), 2),
                    end_offset_s=round(min(5.0, seconds), 2))
    return dict(DEFAULT_ANSWER, incidents=[incident])


def error_body(code: int, status: str, message: str, details: list | None = None) -> dict:
    return {"error": {"code": code, "message": message, "status": status,
                      "details": details or []}}


def quota_429(quota_id: str, value: str, delay: str, message: str) -> dict:
    return error_body(429, "RESOURCE_EXHAUSTED", message, [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": quota_id, "quotaDimensions": {"location": "global",
                                                     "model": "gemini-3.8-flash"},
            "quotaValue": value}]},
        QUOTA_HELP,
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}])


def pick(mapping: dict, camel: str, snake: str, default: Any = None) -> Any:
    """SDK 1.x sends nested keys camelCase, 2.x/3.x snake_case; the service takes both."""
    if not isinstance(mapping, dict):
        return default
    return mapping.get(camel, mapping.get(snake, default))


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def family(model: str) -> str:
    return "2" if model.startswith(("gemini-1.", "gemini-2.")) else "3"


def thought_tokens(model: str, generation: dict) -> int:
    thinking = pick(generation, "thinkingConfig", "thinking_config") or {}
    budget = pick(thinking, "thinkingBudget", "thinking_budget")
    level = pick(thinking, "thinkingLevel", "thinking_level")
    if family(model) == "2":
        return DYNAMIC_THOUGHTS if budget is None or budget < 0 else min(budget, DYNAMIC_THOUGHTS)
    return THOUGHTS_BY_LEVEL.get(level, THOUGHTS_BY_LEVEL[None])


@dataclass
class StoredFile:
    id: str
    display_name: str
    mime_type: str
    size: int
    data: bytearray = field(default_factory=bytearray)
    state: str = "PROCESSING"
    polls: int = 0
    created: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def resource(self) -> dict[str, Any]:
        stamp = self.created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"name": f"files/{self.id}", "displayName": self.display_name,
                "mimeType": self.mime_type, "sizeBytes": str(len(self.data)),
                "createTime": stamp, "updateTime": stamp,
                "expirationTime": (self.created + timedelta(hours=48)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "sha256Hash": "ZmFrZQ==", "uri": f"https://generativelanguage.googleapis.com/v1beta/files/{self.id}",
                "state": self.state, "source": "UPLOADED"}
        if self.state == "FAILED":
            body["error"] = {"code": 400, "message": "Video could not be processed."}
        return body


def frame_colours(data: bytes) -> list[tuple[float, tuple[int, int, int]]]:
    """(timestamp, mean Y U V) of every frame of a video, decoded by FFmpeg: the stand-in
    model looks at what it is sent."""
    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(data)
        handle.flush()
        out = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-i", handle.name,
                              "-map", "0:v:0", "-vf", "showinfo", "-f", "null", "-"],
                             capture_output=True, text=True)
    frames = []
    for line in out.stderr.splitlines():
        pts = SHOWINFO_PTS.search(line)
        mean = SHOWINFO_MEAN.search(line)
        if pts and mean:
            frames.append((float(pts.group(1)), tuple(int(v) for v in mean.group(1).split())[:3]))
    return frames


def is_red(yuv: tuple[int, ...]) -> bool:
    """A solid red picture: BT.601 red is Y 81, U 90, V 240."""
    y, u, v = yuv
    return v > 200 and u < 120 and y < 120


def answer_from_looking(frames: list[tuple[float, tuple[int, ...]]]) -> dict:
    """An incident for every run of solid red frames, from the first red frame's time to
    the last one's: what a model would report of a fire filling the view."""
    incidents, run = [], []
    for pts, yuv in frames + [(math.inf, (0, 0, 0))]:
        if pts != math.inf and is_red(yuv):
            run.append(pts)
            continue
        if run:
            incidents.append({"start_offset_s": round(run[0], 3), "end_offset_s": round(run[-1], 3),
                              "category": "fire_smoke", "severity": "high",
                              "description": "The whole picture turns red: flames fill the view.",
                              "confidence": 0.9})
            run = []
    return {"safety_score": 20 if incidents else 100,
            "summary": "Flames fill the view." if incidents else "Nothing unsafe happens.",
            "incidents": incidents}


class FakeGemini:
    """Set .faults (consumed one per generateContent), .outage (every generateContent
    fails so until cleared), .file_fails, .answer, .generate_delay, .looks (answer from
    what the frames show: solid red frames are an incident)."""

    def __init__(self):
        self.port = free_port()
        self.files: dict[str, StoredFile] = {}
        self.uploads: dict[str, StoredFile] = {}
        self.deleted: list[str] = []
        self.uploaded_sizes: list[int] = []
        self.generate_requests: list[dict] = []
        self.keys_seen: set[str] = set()
        self.faults: list[str] = []
        self.outage: str | None = None
        self.fault_times: list[float] = []  # time.time() of every injected failure answered
        self.calls: list[str] = []  # "METHOD path" of every request, for counting round trips
        self.processing_polls = 2
        self.file_fails = False
        self.answer: Any = DEFAULT_ANSWER
        self.upload_delay = 0.0
        self.generate_delay = 0.0  # "realistic latency" for the benchmarks
        self.looks = False
        self.levels = dict(LEVELS)
        self.drip_for_seconds = 30.0
        self.upload_started = threading.Event()
        self.generate_started = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- server plumbing --------------------------------------------------------------------

    def serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=100 * 1024 * 1024, middlewares=[self.count])
        app.router.add_post("/upload/v1beta/files", self.upload)
        app.router.add_get("/v1beta/files/{id}", self.get_file)
        app.router.add_delete("/v1beta/files/{id}", self.delete_file)
        app.router.add_post("/v1beta/models/{call}", self.models_call)
        # A handler sleeping on purpose (delays, hangs, drips) is cancelled after 1 s at
        # the end of a test, instead of holding the test's teardown.
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    @web.middleware
    async def count(self, request: web.Request, handler):
        self.calls.append(f"{request.method} {request.path}")
        return await handler(request)

    def __enter__(self) -> "FakeGemini":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(15)
        except TimeoutError:
            pass  # a handler still sleeping on purpose; the loop stops regardless
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def key_error(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-goog-api-key", "")
        self.keys_seen.add(key)
        if key != VALID_KEY:
            return web.json_response(error_body(
                400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                  "domain": "googleapis.com"}]), status=400)
        return None

    # -- files -----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        command = request.headers.get("X-Goog-Upload-Command", "")
        if command == "start":
            if (denied := self.key_error(request)) is not None:
                return denied
            meta = (await request.json()).get("file", {})
            stored = StoredFile(id=secrets.token_hex(6), display_name=meta.get("display_name", ""),
                                mime_type=request.headers.get("X-Goog-Upload-Header-Content-Type", ""),
                                size=int(request.headers.get("X-Goog-Upload-Header-Content-Length", 0)))
            self.uploads[stored.id] = stored
            url = f"{self.base_url}/upload/v1beta/files?upload_id={stored.id}&upload_protocol=resumable"
            return web.Response(headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})
        stored = self.uploads.get(request.query.get("upload_id", ""))
        if stored is None:
            return web.json_response(error_body(404, "NOT_FOUND", "No such upload."), status=404)
        self.upload_started.set()
        if self.upload_delay:
            await asyncio.sleep(self.upload_delay)
        if int(request.headers.get("X-Goog-Upload-Offset", -1)) != len(stored.data):
            return web.json_response(error_body(400, "INVALID_ARGUMENT", "Bad offset."), status=400)
        stored.data += await request.read()
        if "finalize" not in command:
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        del self.uploads[stored.id]
        self.files[stored.id] = stored
        self.uploaded_sizes.append(len(stored.data))
        return web.json_response({"file": stored.resource()}, headers={"X-Goog-Upload-Status": "final"})

    async def get_file(self, request: web.Request) -> web.Response:
        if (denied := self.key_error(request)) is not None:
            return denied
        stored = self.files.get(request.match_info["id"])
        if stored is None:
            return web.json_response(error_body(403, "PERMISSION_DENIED",
                                                "You do not have permission to access the File."), status=403)
        stored.polls += 1
        if stored.state == "PROCESSING" and stored.polls >= self.processing_polls:
            stored.state = "FAILED" if self.file_fails else "ACTIVE"
        return web.json_response(stored.resource())

    async def delete_file(self, request: web.Request) -> web.Response:
        if (denied := self.key_error(request)) is not None:
            return denied
        stored = self.files.pop(request.match_info["id"], None)
        if stored is None:
            return web.json_response(error_body(404, "NOT_FOUND", "File not found."), status=404)
        self.deleted.append(stored.id)
        return web.json_response({})

    # -- generateContent -----------------------------------------------------------------------

    async def models_call(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if method != "generateContent":
            return web.json_response(error_body(404, "NOT_FOUND", "Unknown method."), status=404)
        if (denied := self.key_error(request)) is not None:
            return denied
        body = await request.json()
        self.generate_started.set()
        server_timeout = request.headers.get("X-Server-Timeout")
        if server_timeout and float(server_timeout) < SHORTEST_SERVER_TIMEOUT:
            return web.json_response(error_body(500, "INTERNAL", "An internal error has "
                                                "occurred. Please retry or report in "
                                                "https://developers.generativeai.google/guide/troubleshooting"),
                                     status=500)
        if self.generate_delay:
            await asyncio.sleep(self.generate_delay)
        self.generate_requests.append(without_media(body))
        if model not in MODELS:
            return web.json_response(error_body(
                404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is "
                "not supported for generateContent. Call ListModels to see the list of "
                "available models and their supported methods."), status=404)
        fault = self.outage or (self.faults.pop(0) if self.faults else None)
        if fault == "file_gone":
            self.files.clear()  # expired or deleted behind our back: the service says 403
        elif fault is not None:
            return await self.inject(fault, request)
        generation = body.get("generationConfig") or {}
        thinking = pick(generation, "thinkingConfig", "thinking_config") or {}
        level = pick(thinking, "thinkingLevel", "thinking_level")
        if level is not None and level not in self.levels.get(model, LEVELS["gemini-3.5-flash"]):
            return web.json_response(error_body(
                400, "INVALID_ARGUMENT", f"Thinking level {level} is not supported for this "
                "model."), status=400)
        if family(model) == "3" and pick(thinking, "thinkingBudget", "thinking_budget") is not None:
            return web.json_response(error_body(
                400, "INVALID_ARGUMENT", "Thinking budget is not supported for this model; "
                "use thinking_level."), status=400)
        video, problem = self.video_of(body)
        if problem is not None:
            return problem
        seconds, fps = 0.0, 1.0
        if video is not None:
            data, fps = video
            seconds = await asyncio.to_thread(video_seconds, data)
        answer = self.answer
        if self.looks and video is not None:
            answer = answer_from_looking(await asyncio.to_thread(frame_colours, data))
        elif answer is DEFAULT_ANSWER and video is not None:
            answer = answer_within(seconds)
        return web.json_response(self.completion(json.dumps(answer), model=model, body=body,
                                                 video_seconds=seconds, fps=fps))

    def video_of(self, body: dict) -> tuple[tuple[bytes, float] | None, web.Response | None]:
        """(bytes, fps) of the video part, inline or uploaded, or the error the service gives."""
        for part in body["contents"][0]["parts"]:
            fps = float(pick(pick(part, "videoMetadata", "video_metadata") or {}, "fps", "fps", 1.0))
            inline = pick(part, "inlineData", "inline_data")
            if inline:
                return (decode_base64(inline["data"]), fps), None
            file_data = pick(part, "fileData", "file_data")
            if file_data:
                file_id = pick(file_data, "fileUri", "file_uri").rsplit("/", 1)[-1]
                stored = self.files.get(file_id)
                if stored is None:
                    return None, web.json_response(error_body(
                        403, "PERMISSION_DENIED", f"You do not have permission to access the File "
                        f"{file_id} or it may not exist."), status=403)
                if stored.state != "ACTIVE":
                    return None, web.json_response(error_body(
                        400, "FAILED_PRECONDITION", f"The File {file_id} is not in an ACTIVE state "
                        "and usage is not allowed."), status=400)
                return (bytes(stored.data), fps), None
        return None, None

    def usage(self, model: str, body: dict, video_seconds: float, fps: float,
              answer_text: str) -> tuple[dict[str, Any], bool]:
        """usageMetadata for this request, and whether thinking plus answer ran out of room."""
        generation = body.get("generationConfig") or {}
        resolution = generation.get("mediaResolution")
        frames = math.ceil(video_seconds * fps) if video_seconds else 0
        video = frames * TOKENS_PER_FRAME[family(model)].get(resolution, TOKENS_PER_FRAME[family(model)][None])
        prompt_text = "".join(p.get("text", "") for c in body["contents"] for p in c["parts"])
        schema = generation.get("responseSchema") or generation.get("responseJsonSchema")
        text = text_tokens(prompt_text) + (text_tokens(json.dumps(schema)) if schema else 0)
        thoughts = thought_tokens(model, generation)
        output = text_tokens(answer_text)
        limit = generation.get("maxOutputTokens") or 65536
        truncated = thoughts + output > limit
        if truncated:
            output = max(limit - thoughts, 0)
        usage = {"promptTokenCount": text + video, "candidatesTokenCount": output,
                 "totalTokenCount": text + video + output + thoughts,
                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": text}]
                 + ([{"modality": "VIDEO", "tokenCount": video}] if video else [])}
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return usage, truncated

    def completion(self, text: str, finish: str = "STOP", *, model: str = "gemini-3.8-flash",
                   body: dict | None = None, video_seconds: float = 0.0,
                   fps: float = 1.0) -> dict[str, Any]:
        usage, truncated = self.usage(model, body or {"contents": [{"parts": []}]},
                                      video_seconds, fps, text)
        if truncated and finish == "STOP":
            text, finish = text[:usage["candidatesTokenCount"] * CHARS_PER_TOKEN], "MAX_TOKENS"
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": finish, "index": 0}],
                "usageMetadata": usage, "modelVersion": model,
                "responseId": secrets.token_hex(8)}

    async def inject(self, fault: str, request: web.Request) -> web.StreamResponse:
        self.fault_times.append(time.time())
        if fault == "429":
            return web.json_response(quota_429(
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "10", "37s",
                "You exceeded your current quota, please check your plan and billing details."),
                status=429)
        if fault in ("429_huge", "503_huge"):
            code, status = (429, "RESOURCE_EXHAUSTED") if fault == "429_huge" else (503, "UNAVAILABLE")
            return web.json_response(error_body(code, status, "Try again later.", [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                 "retryDelay": "999999999999s"}]), status=code)
        if fault == "429_daily":
            return web.json_response(quota_429(
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "250", "41s",
                "You exceeded your current quota, please check your plan and billing details."),
                status=429)
        if fault == "429_zero":
            return web.json_response(quota_429(
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "0", "12s",
                "You exceeded your current quota. Quota exceeded for metric: generativelanguage."
                "googleapis.com/generate_content_free_tier_requests, limit: 0, model: "
                "gemini-3.8-flash"), status=429)
        if fault == "bad_key":
            return web.json_response(error_body(
                400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                  "domain": "googleapis.com"}]), status=400)
        if fault == "401":
            return web.json_response(error_body(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
                status=401)
        if fault == "500":
            return web.json_response(error_body(500, "INTERNAL", "An internal error has occurred. "
                                                "Please retry or report in https://developers.generativeai.google/guide/troubleshooting"),
                                     status=500)
        if fault == "503":
            return web.json_response(error_body(503, "UNAVAILABLE", "The service is currently unavailable."),
                                     status=503)
        if fault == "403":
            return web.json_response(error_body(403, "PERMISSION_DENIED",
                                                "Method doesn't allow unregistered callers."), status=403)
        if fault == "400":
            return web.json_response(error_body(400, "INVALID_ARGUMENT",
                                                "Request contains an invalid argument."), status=400)
        if fault == "proxy":
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        if fault == "blocked":
            return web.json_response({"promptFeedback": {"blockReason": "OTHER"},
                                      "usageMetadata": {"promptTokenCount": 1234, "totalTokenCount": 1234},
                                      "modelVersion": request.match_info["call"].partition(":")[0]})
        if fault == "max_tokens":
            return web.json_response(self.completion('{"safety_score": 80, "summary": "A wor',
                                                     finish="MAX_TOKENS"))
        if fault == "recitation":
            return web.json_response(self.completion("", finish="RECITATION"))
        if fault in REFUSAL_FAULTS:
            return web.json_response(self.completion("", finish=REFUSAL_FAULTS[fault]))
        if fault == "blocked_safety":
            return web.json_response({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                                      "usageMetadata": {"promptTokenCount": 1234,
                                                        "totalTokenCount": 1234}})
        if fault == "huge":  # a model that ignores maxOutputTokens, or a hostile stand-in
            incident = dict(DEFAULT_ANSWER["incidents"][0], description="x" * 5_000_000)
            text = json.dumps(dict(DEFAULT_ANSWER, incidents=[incident]))
            return web.json_response({"candidates": [{"content": {"role": "model", "parts": [
                {"text": text}]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 10,
                                  "totalTokenCount": 110}})
        if fault == "long":
            incident = dict(DEFAULT_ANSWER["incidents"][0],
                            description="Flames\x00 spread.\u202e" + "y" * 50_000)
            return web.json_response(self.completion(json.dumps(
                dict(DEFAULT_ANSWER, summary="s" * 20_000, incidents=[incident]))))
        if fault == "html200":
            return web.Response(status=200, text="<html><body>Captive portal</body></html>",
                                content_type="text/html")
        if fault == "shape":
            return web.json_response({"candidates": "busy", "usageMetadata": []})
        if fault == "drip":
            return await self.drip(request)
        if fault == "bad_schema":
            return web.json_response(self.completion(json.dumps(
                {"safety_score": 150, "summary": "x", "incidents": []})))
        if fault == "not_json":
            return web.json_response(self.completion("The clip shows a warehouse."))
        raise ValueError(f"unknown fault {fault}")


    async def drip(self, request: web.Request) -> web.StreamResponse:
        return await drip(request, self.drip_for_seconds,
                          json.dumps(self.completion(json.dumps(DEFAULT_ANSWER))).encode())


def decode_base64(data: str) -> bytes:
    """The SDK sends URL-safe base64 without padding; the service takes either alphabet."""
    data = data.replace("-", "+").replace("_", "/")
    return base64.b64decode(data + "=" * (-len(data) % 4))


def without_media(body: dict) -> dict:
    """The request as recorded: video bytes replaced by their length (tests keep many)."""
    parts = []
    for part in body["contents"][0]["parts"]:
        inline = pick(part, "inlineData", "inline_data")
        if inline:
            part = dict(part, inlineData={"data_bytes": len(inline["data"]) * 3 // 4,
                                          "mime_type": pick(inline, "mimeType", "mime_type")})
            part.pop("inline_data", None)
        parts.append(part)
    return dict(body, contents=[dict(body["contents"][0], parts=parts)] + body["contents"][1:])


def main() -> None:
    """Run standalone (for the benchmarks): python tests/gemini_server.py PORT [DELAY_S]
    [looks]."""
    import sys

    server = FakeGemini()
    server.port = int(sys.argv[1])
    server.generate_delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    server.looks = len(sys.argv) > 3 and sys.argv[3] == "looks"
    with server:
        print("ready", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
