"""Provider benchmark: model requests and tokens per camera-hour with and without static
gating, and what one clip costs to send to an OpenAI-compatible server (frames vs grid).

Run by hand:  .venv/bin/python bench/providers_bench.py [--hours 2]

Scenes, each a sequence of 10-minute archives (640x360, 5 fps, a keyframe a second, grey
background under sensor noise, noise=alls=16), made once by FFmpeg:
  static  nothing moves;
  burst   10 % activity in one burst: a figure walks for 6 minutes of the hour (one
          archive), the other five archives are still;
  spread  10 % activity spread out: a figure walks for 1 minute of every archive;
  busy    FFmpeg's testsrc2 (every frame differs).
Every archive goes through the real analyzer (Worker.process: analysis copy, mpdecimate,
the gate, the request) into the project's test servers speaking the Gemini and OpenAI
wire protocols through the real SDKs; their token counts follow the providers' published
rules (tests/gemini_server.py, tests/openai_server.py). Gating on is the default
static_check_minutes = 30; off is 0. Figures are per camera-hour: totals / hours.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gemini_server import VALID_KEY, FakeGemini  # noqa: E402
from openai_server import FakeOpenAI  # noqa: E402

from vlmguard.analyzer import Worker  # noqa: E402
from vlmguard.config import load_config  # noqa: E402
from vlmguard.store.bundle import Store  # noqa: E402

T0 = datetime(2026, 11, 26, 0, 0, tzinfo=timezone.utc)
CLIPS = Path(tempfile.gettempdir()) / "vlmguard-bench-providers"
STILL = "color=c=0x606060:size=640x360:rate=5,noise=alls=16:allf=t"
WALKER = ("color=c=0x606060:size=640x360:rate=5,noise=alls=16:allf=t[bg];"
          "color=c=0x803030:size=16x40:rate=5[p];[bg][p]overlay=x='mod(t*20,620)':y=150:"
          "enable='{when}'")
SOURCES = {
    "static": STILL,
    "burst": WALKER.format(when="lt(t,360)"),
    "spread": WALKER.format(when="lt(t,60)"),
    "busy": "testsrc2=size=640x360:rate=5",
}
# Which archive each scene records in each 10-minute slot of an hour.
HOUR = {"static": ["static"] * 6, "burst": ["burst"] + ["static"] * 5,
        "spread": ["spread"] * 6, "busy": ["busy"] * 6}


def make_clips() -> dict[str, Path]:
    CLIPS.mkdir(exist_ok=True)
    out = {}
    for name, graph in SOURCES.items():
        path = CLIPS / f"{name}.mp4"
        if not path.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-filter_complex", graph, "-t", "600",
                            "-c:v", "libx264", "-preset", "ultrafast", "-g", "5",
                            "-pix_fmt", "yuv420p", str(path)], check=True)
        out[name] = path
    return out


def config_for(folder: Path, provider: str, gating: bool, local_url: str, gemini_url: str,
               images: str = "frames"):
    path = folder / "config.toml"
    path.write_text(f"""
[storage]
data_dir = "{folder / 'data'}"
[analysis]
providers = ["{provider}"]
static_check_minutes = {30 if gating else 0}
[providers.local]
kind = "openai"
model = "qwen2.5vl:7b"
base_url = "{local_url}"
images = "{images}"
[providers.cloud]
kind = "gemini"
base_url = "{gemini_url}"
[[cameras]]
id = "cam1"
url = "lavfi:testsrc2"
""")
    return load_config(path)


def run_scene(clips, scene: str, hours: int, provider: str, gating: bool) -> dict:
    import os
    os.environ["GEMINI_API_KEY"] = VALID_KEY
    with FakeOpenAI() as local, FakeGemini() as gemini, \
            tempfile.TemporaryDirectory() as tmp:
        config = config_for(Path(tmp), provider, gating, local.base_url, gemini.base_url)
        with Store.from_config(config) as store:
            worker = Worker(config, store.queue, store.pauses, "bench")
            started = time.monotonic()
            for n in range(6 * hours):
                start = T0 + timedelta(minutes=10 * n)
                store.queue.register("cam1", clips[HOUR[scene][n % 6]], start,
                                     start + timedelta(minutes=10))
                worker.process(store.queue.next_job("bench", timeout=5))
            seconds = time.monotonic() - started
            jobs = store.reports.list_jobs()
    assert all(j.status == "completed" for j in jobs), [j.error_message for j in jobs]
    sent = [j for j in jobs if j.provider]
    return {"requests_per_h": len(sent) / hours,
            "tokens_per_h": sum(j.total_tokens or 0 for j in jobs) / hours,
            "analyzer_s_per_clip": seconds / len(jobs)}


def request_sizes(clips) -> dict:
    """One busy archive sent to the OpenAI-compatible server as frames and as a grid."""
    import os
    os.environ["GEMINI_API_KEY"] = VALID_KEY
    out = {}
    for images in ("frames", "grid"):
        with FakeOpenAI() as local, FakeGemini() as gemini, \
                tempfile.TemporaryDirectory() as tmp:
            config = config_for(Path(tmp), "local", False, local.base_url, gemini.base_url,
                                images)
            with Store.from_config(config) as store:
                store.queue.register("cam1", clips["busy"], T0, T0 + timedelta(minutes=10))
                Worker(config, store.queue, store.pauses, "bench").process(store.queue.next_job("bench", timeout=5))
            [request] = local.requests
            out[images] = {"request_bytes": request["bytes"],
                           "images": len(request["images"]),
                           "image_bytes": sum(len(i["data"]) for i in request["images"]),
                           "image_size": f"{request['images'][0]['width']}x"
                                         f"{request['images'][0]['height']}",
                           "prompt_tokens": request["usage"]["prompt_tokens"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=int, default=2)
    parser.add_argument("--only", action="append", default=[],
                        help="run only these provider/scene/gating keys, e.g. local/busy/on")
    parser.add_argument("--no-sizes", action="store_true", help="skip frames vs grid")
    args = parser.parse_args()
    clips = make_clips()
    results = {}
    for provider in ("cloud", "local"):
        for scene in HOUR:
            for gating in (True, False):
                key = f"{provider}/{scene}/{'on' if gating else 'off'}"
                if args.only and key not in args.only:
                    continue
                results[key] = run_scene(clips, scene, args.hours, provider, gating)
                print(key, json.dumps(results[key]), flush=True)
    print()
    print("| provider | scene | gating | requests / camera-hour | tokens / camera-hour |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        provider, scene, gating = key.split("/")
        print(f"| {provider} | {scene} | {gating} | {r['requests_per_h']:.1f} | "
              f"{r['tokens_per_h']:,.0f} |")
    for provider in ("cloud", "local"):
        if f"{provider}/static/on" not in results or f"{provider}/busy/on" not in results:
            continue
        static, busy = results[f"{provider}/static/on"], results[f"{provider}/busy/on"]
        print(f"{provider}: static / busy with gating: requests "
              f"{static['requests_per_h'] / busy['requests_per_h']:.1%}, tokens "
              f"{static['tokens_per_h'] / busy['tokens_per_h']:.1%}")
    if not args.no_sizes:
        print()
        print(json.dumps(request_sizes(clips), indent=2))


if __name__ == "__main__":
    main()
