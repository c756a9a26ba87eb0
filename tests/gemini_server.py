"""A Gemini Developer API server for the tests, speaking the wire protocol the real
google-genai SDK speaks (../shared/docs/gemini-wire.md): resumable upload, files get and
delete, generateContent with usageMetadata, and the failures seen in the wild, injected
on demand. It runs on 127.0.0.1 in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from daemon import free_port

VALID_KEY = "test-key-123"
MODELS = {"gemini-2.5-flash"}

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


def answer_within(data: bytes) -> dict:
    """Like a model, place the incident inside the clip it was shown (3-5 s when it can)."""
    seconds = video_seconds(data)
    incident = dict(DEFAULT_ANSWER["incidents"][0],
                    start_offset_s=round(min(3.0, seconds / 2), 2),
                    end_offset_s=round(min(5.0, seconds), 2))
    return dict(DEFAULT_ANSWER, incidents=[incident])


def error_body(code: int, status: str, message: str, details: list | None = None) -> dict:
    return {"error": {"code": code, "message": message, "status": status,
                      "details": details or []}}


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


class FakeGemini:
    """Set .faults (consumed one per generateContent), .file_fails, .answer, .delay."""

    def __init__(self):
        self.port = free_port()
        self.files: dict[str, StoredFile] = {}
        self.uploads: dict[str, StoredFile] = {}
        self.deleted: list[str] = []
        self.uploaded_sizes: list[int] = []
        self.generate_requests: list[dict] = []
        self.keys_seen: set[str] = set()
        self.faults: list[str] = []
        self.file_fails = False
        self.answer: Any = DEFAULT_ANSWER
        self.upload_delay = 0.0
        self.generate_delay = 0.0  # "realistic latency" for the benchmarks
        self.upload_started = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- server plumbing --------------------------------------------------------------------

    def serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/upload/v1beta/files", self.upload)
        app.router.add_get("/v1beta/files/{id}", self.get_file)
        app.router.add_delete("/v1beta/files/{id}", self.delete_file)
        app.router.add_post("/v1beta/models/{call}", self.models_call)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

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
        if stored.state == "PROCESSING" and stored.polls >= 1:
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
        if self.generate_delay:
            await asyncio.sleep(self.generate_delay)
        self.generate_requests.append({"generationConfig": body.get("generationConfig")}
                                      if self.generate_delay else body)
        if model not in MODELS:
            return web.json_response(error_body(
                404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is "
                "not supported for generateContent."), status=404)
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            return await self.inject(fault, request)
        stored = None
        for part in body["contents"][0]["parts"]:
            file_data = part.get("fileData") or part.get("file_data")
            if file_data:
                file_id = (file_data.get("fileUri") or file_data.get("file_uri")).rsplit("/", 1)[-1]
                stored = self.files.get(file_id)
                if stored is None or stored.state != "ACTIVE":
                    return web.json_response(error_body(
                        400, "FAILED_PRECONDITION", f"The File {file_id} is not in an ACTIVE state "
                        "and usage is not allowed."), status=400)
        answer = self.answer
        if answer is DEFAULT_ANSWER and stored is not None and not self.generate_delay:
            answer = await asyncio.to_thread(answer_within, bytes(stored.data))
        return web.json_response(self.completion(json.dumps(answer)))

    def completion(self, text: str, finish: str = "STOP") -> dict[str, Any]:
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": finish, "index": 0}],
                "usageMetadata": {"promptTokenCount": 1234, "candidatesTokenCount": 56,
                                  "thoughtsTokenCount": 10, "totalTokenCount": 1300,
                                  "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 400},
                                                          {"modality": "VIDEO", "tokenCount": 834}]},
                "modelVersion": "gemini-2.5-flash", "responseId": secrets.token_hex(8)}

    async def inject(self, fault: str, request: web.Request) -> web.StreamResponse:
        if fault == "429":
            return web.json_response(error_body(
                429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.",
                [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]), status=429)
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
        if fault == "slow":
            await asyncio.sleep(8)  # past the tests' 5-s client timeout
            return web.json_response(self.completion(json.dumps(self.answer)))
        if fault == "blocked":
            return web.json_response({"promptFeedback": {"blockReason": "OTHER"},
                                      "usageMetadata": {"promptTokenCount": 1234, "totalTokenCount": 1234}})
        if fault == "max_tokens":
            return web.json_response(self.completion('{"safety_score": 80, "summary": "A wor',
                                                     finish="MAX_TOKENS"))
        if fault == "safety":
            return web.json_response(self.completion("", finish="SAFETY"))
        if fault == "bad_schema":
            return web.json_response(self.completion(json.dumps(
                {"safety_score": 150, "summary": "x", "incidents": []})))
        if fault == "not_json":
            return web.json_response(self.completion("The clip shows a warehouse."))
        raise ValueError(f"unknown fault {fault}")


def main() -> None:
    """Run standalone (for the benchmarks): python tests/gemini_server.py PORT [DELAY_S]."""
    import sys

    server = FakeGemini()
    server.port = int(sys.argv[1])
    server.generate_delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    with server:
        print("ready", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
