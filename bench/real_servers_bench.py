"""Real model servers benchmark (issues 21 and 20): what each way a real server behaves
costs in windows, requests and tokens; what one busy 60-s window sends; and what a
faulty provider does to a running daemon.

Run by hand:
    .venv/bin/python bench/real_servers_bench.py modes  [--tree /work/main] [--windows 4]
    .venv/bin/python bench/real_servers_bench.py window
    .venv/bin/python bench/real_servers_bench.py faults [--tree /work/main] [--seconds 60]
                                                         [--only drip,429_huge]

modes:  busy 60-s windows (640x360, a keyframe every 2 s: 30 distinct keyframes at the
        default 0.5 fps) through the real analyzer of --tree (default: this checkout) into
        the project's OpenAI-protocol server in each of its modes, Gemini second. Per mode:
        windows answered by the local server and by Gemini, failed, local requests per
        window, prompt tokens the server counted against its context, images per request,
        and answers stored that were made without the task (the "colourful test pattern").
window: one busy 60-s window: what goes to Ollama at 4,096 and 16,384 tokens of context
        and to Gemini (prompt tokens, images, request bytes), and the cost per camera-month
        at the defaults, input and output priced apart.
faults: `vlmguard run` (of --tree) with one camera and [local, Gemini], while the local
        server answers every request with one fault for --seconds: absurd retry hints,
        dripping bytes, a 5 MB answer, HTML or malformed answers, over-long texts. Per
        fault: windows answered (by whom), failed, analyzer restarts, the live playlist's
        answers (polled every 0.5 s) and whether the streamer kept its pid.
The servers are tests/openai_server.py and tests/gemini_server.py, speaking the wire
protocols through the real SDKs; their token counts follow the published rules.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))

from daemon import free_port  # noqa: E402
from gemini_server import VALID_KEY, FakeGemini  # noqa: E402
from openai_server import FakeOpenAI  # noqa: E402
from vlmguard.health import run_dir  # noqa: E402

WINDOW = Path(tempfile.gettempdir()) / "vlmguard-bench-window-60s-360p.mp4"
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
# gemini-3.8-flash paid tier, USD per million tokens: $0.75 input, $3.75 output (thoughts
# bill as output), list price read 2026-10 (real-servers.md, from Google's pricing page),
# doubling on 2027-01-01 per the same page.
INPUT_PRICE, OUTPUT_PRICE = 0.75, 3.75
WINDOWS_PER_MONTH = 60 * 720
MODES = {
    # name: (server settings, local provider keys)
    "openai": ({}, ""),
    "ollama 4096, context_tokens default": ({"mode": "ollama", "num_ctx": 4096}, ""),
    "ollama 4096, context_tokens 16384": ({"mode": "ollama", "num_ctx": 4096},
                                          "context_tokens = 16384"),
    "ollama 16384, context_tokens 16384": ({"mode": "ollama", "num_ctx": 16384},
                                           "context_tokens = 16384"),
    "vllm 8192, context_tokens 16384": ({"mode": "vllm", "max_model_len": 8192},
                                        "context_tokens = 16384"),
    "vllm one image": ({"mode": "vllm", "mm_limit": 1}, ""),
    "llama.cpp -c 4096, context_tokens 16384": ({"mode": "llamacpp", "n_ctx": 4096},
                                                "context_tokens = 16384"),
    "gpt-5": ({"mode": "gpt5"}, "context_tokens = 400000"),
    "misconfigured": ({"mode": "misconfigured"}, ""),
}
FAULTS = ["429_huge", "429_date", "503_huge", "drip", "huge", "html", "shape", "nested", "long"]


def make_window() -> Path:
    if not WINDOW.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        "testsrc2=size=640x360:rate=25", "-t", "60", "-c:v", "libx264",
                        "-preset", "veryfast", "-g", "50", "-pix_fmt", "yuv420p", str(WINDOW)],
                       check=True)
    return WINDOW


def write_config(folder: Path, local_url: str, gemini_url: str, local_keys: str,
                 new_keys: bool, extra: str = "", analysis: str = "max_retries = 0",
                 order: str = '"local", "cloud"') -> Path:
    """A config both trees read: the keys this change added only when new_keys."""
    keys = local_keys if new_keys else ""
    path = folder / "config.toml"
    path.write_text(textwrap.dedent(f"""
        [storage]
        data_dir = "{folder / 'data'}"
        [analysis]
        providers = [{order}]
        retry_backoff_seconds = 0.2
        static_check_minutes = 0
        {analysis}
        [providers.local]
        kind = "openai"
        model = "qwen2.5vl:7b"
        base_url = "{local_url}"
        timeout_seconds = 5
        {keys}
        [providers.cloud]
        kind = "gemini"
        base_url = "{gemini_url}"
        """) + extra)
    return path


# -- modes ----------------------------------------------------------------------------------

ANALYZE = """
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from vlmguard.analyzer import Worker
from vlmguard.config import load_config
from vlmguard.store.bundle import Store
config = load_config(sys.argv[1])
clip, windows = Path(sys.argv[2]), int(sys.argv[3])
t0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
with Store.from_config(config) as store:
    worker = Worker(config, store.queue, store.pauses, "bench")
    for n in range(windows):
        start = t0 + timedelta(minutes=n)
        store.queue.register("cam1", clip, start, start + timedelta(seconds=60), max_retries=0)
        worker.process(store.queue.next_job("bench", timeout=5))
    while (job := store.queue.next_job("bench", timeout=3)) is not None:  # put back, now due
        worker.process(job)
"""


def run_analyzer(tree: Path, config: Path, clip: Path, windows: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "GEMINI_API_KEY": VALID_KEY}
    proc = subprocess.run([sys.executable, "-c", ANALYZE, str(config), str(clip), str(windows)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])


def run_mode(tree: Path, name: str, windows: int) -> dict:
    from vlmguard.config import load_config
    from vlmguard.store.bundle import Store

    settings, keys = MODES[name]
    clip = make_window()
    with FakeOpenAI() as local, FakeGemini() as gemini, tempfile.TemporaryDirectory() as tmp:
        for key, value in settings.items():
            setattr(local, key, value)
        config = write_config(Path(tmp), local.base_url, gemini.base_url, keys,
                              new_keys=tree == HERE)
        started = time.monotonic()
        run_analyzer(tree, config, clip, windows)
        seconds = time.monotonic() - started
        with Store.from_config(load_config(config)) as store:
            jobs = store.reports.list_jobs()
        answered = local.answered
        context = {"ollama": local.num_ctx, "vllm": local.max_model_len,
                   "llamacpp": local.n_ctx}.get(local.mode)
        sent = [r.get("prompt_sent") or r.get("usage", {}).get("prompt_tokens")
                for r in local.requests]
        return {
            "windows": windows,
            "by_local": sum(j.provider == "local" for j in jobs),
            "by_cloud": sum(j.provider == "cloud" for j in jobs),
            "failed": sum(j.status == "failed" for j in jobs),
            "local_requests_per_window": round(len(local.requests) / windows, 2),
            "local_400s": sum(r["status"] == 400 for r in local.requests),
            "prompt_tokens_sent_median": statistics.median([s for s in sent if s] or [0]),
            "prompt_tokens_kept_median": statistics.median(
                [r["usage"]["prompt_tokens"] for r in answered] or [0]),
            "server_context": context,
            "cut_requests": sum(bool(r.get("truncated")) for r in local.requests),
            "images_per_request_median": statistics.median(
                [len(r["images"]) for r in answered] or [0]),
            "stored_without_task": sum("test pattern" in (j.analysis_result or {}).get(
                "summary", "") for j in jobs if j.status == "completed"),
            "temperature_used": sorted({r.get("temperature_used", r.get("temperature"))
                                        for r in answered}, key=str),
            "seconds_per_window": round(seconds / windows, 2),
            "errors": sorted({(j.error_message or "")[:120] for j in jobs if j.error_message}),
        }


def modes(args) -> None:
    tree = Path(args.tree).resolve() if args.tree else HERE
    rows = {}
    for name in MODES:
        if args.only and name not in args.only.split(","):
            continue
        rows[name] = run_mode(tree, name, args.windows)
        print(name, json.dumps(rows[name]), flush=True)
    print(f"\ntree {tree}\n")
    print("| mode | answered by local / Gemini | failed | local requests per window | "
          "prompt tokens sent (server's count) vs context | images per request | "
          "stored without the task |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        context = f" / {r['server_context']:,}" if r["server_context"] else ""
        print(f"| {name} | {r['by_local']} / {r['by_cloud']} | {r['failed']} | "
              f"{r['local_requests_per_window']} | {r['prompt_tokens_sent_median']:,.0f}"
              f"{context} | {r['images_per_request_median']:.0f} | {r['stored_without_task']} |")


# -- one window ----------------------------------------------------------------------------

def window(args) -> None:
    from vlmguard.analyzer import Worker
    from vlmguard.config import load_config
    from vlmguard.store.bundle import Store

    os.environ["GEMINI_API_KEY"] = VALID_KEY
    clip = make_window()
    out = {}
    for name, server, keys, order in (
            ("Ollama, 4,096 context", {"mode": "ollama", "num_ctx": 4096}, "", "local"),
            ("Ollama, 16,384 context", {"mode": "ollama", "num_ctx": 16384},
             "context_tokens = 16384", "local"),
            ("Gemini 3.8 Flash", {}, "", "cloud")):
        with FakeOpenAI() as local, FakeGemini() as gemini, tempfile.TemporaryDirectory() as tmp:
            for key, value in server.items():
                setattr(local, key, value)
            config = load_config(write_config(Path(tmp), local.base_url, gemini.base_url, keys,
                                              True, order=f'"{order}"'))
            with Store.from_config(config) as store:
                store.queue.register("cam1", clip, T0, T0 + timedelta(seconds=60))
                Worker(config, store.queue, store.pauses, "bench").process(store.queue.next_job("bench", timeout=5))
                [job] = store.reports.list_jobs()
            if order == "local":
                [request] = local.requests
                images = len(request["images"])
                size = f"{request['images'][0]['width']}x{request['images'][0]['height']}"
                sent = request["bytes"]
            else:
                [request] = gemini.generate_requests
                part = request["contents"][0]["parts"][0]
                inline = part.get("inlineData") or {}
                meta = part.get("videoMetadata") or part.get("video_metadata") or {}
                images = f"video, {meta.get('fps')} fps"
                size = "640x360"
                sent = inline.get("data_bytes")
            out[name] = {"status": job.status, "prompt_tokens": job.prompt_tokens,
                         "output_tokens": job.output_tokens,
                         "thoughts_tokens": job.thoughts_tokens or 0,
                         "images": images, "size": size, "request_bytes": sent}
            print(name, json.dumps(out[name]), flush=True)
    print("\n| sent to | images | prompt tokens | output (+ thoughts) | request bytes |")
    print("|---|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['images']} ({r['size']}) | {r['prompt_tokens']:,} | "
              f"{r['output_tokens']} (+{r['thoughts_tokens']}) | {r['request_bytes']:,} |")
    g = out["Gemini 3.8 Flash"]
    per_input = g["prompt_tokens"] * WINDOWS_PER_MONTH / 1e6 * INPUT_PRICE
    per_output = (g["output_tokens"] + g["thoughts_tokens"]) * WINDOWS_PER_MONTH / 1e6 * OUTPUT_PRICE
    print(f"\nGemini per camera-month ({WINDOWS_PER_MONTH:,} busy 60-s windows): input "
          f"{g['prompt_tokens'] * WINDOWS_PER_MONTH / 1e6:.1f} M tokens = ${per_input:.2f}, "
          f"output and thoughts {(g['output_tokens'] + g['thoughts_tokens']) * WINDOWS_PER_MONTH / 1e6:.1f}"
          f" M tokens = ${per_output:.2f}; total ${per_input + per_output:.2f} "
          f"(from 2027-01-01 at double: ${2 * (per_input + per_output):.2f})")


# -- faults against a running daemon --------------------------------------------------------

def run_fault(tree: Path, fault: str, seconds: float) -> dict:
    from vlmguard.config import load_config
    from vlmguard.store.bundle import Store

    with FakeOpenAI() as local, FakeGemini() as gemini, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port = free_port()
        local.drip_for_seconds = 3600
        config = write_config(folder, local.base_url, gemini.base_url, "", tree == HERE,
                              analysis="window_seconds = 10\nworkers = 2",
                              extra=textwrap.dedent(f"""
            [server]
            port = {port}
            [[cameras]]
            id = "cam1"
            url = "lavfi:testsrc2=size=640x360:rate=25"
            """))
        log = open(folder / "vlmguard.log", "w")
        env = {**os.environ, "PYTHONPATH": str(tree), "GEMINI_API_KEY": VALID_KEY}
        proc = subprocess.Popen([sys.executable, "-m", "vlmguard", "run", "--config", str(config)],
                                cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/live/cam1/index.m3u8"
        answers: list[int] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.5):
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        answers.append(response.status)
                except OSError as exc:
                    answers.append(getattr(exc, "code", 0) or 0)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not answers_ok(url):
                time.sleep(0.5)
            run = run_dir(folder / "data")
            streamer = json.loads((run / "streamer.json").read_text())["pid"]
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            local.outage = fault
            time.sleep(seconds)
            local.outage = None
            alive = proc.poll() is None
            same_pid = alive and json.loads((run / "streamer.json").read_text())["pid"] == streamer
            children = (json.loads((run / "supervisor.json").read_text())["children"]
                        if alive else {})
        finally:
            stop.set()
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
            log.close()
        with Store.from_config(load_config(config)) as store:
            jobs = store.reports.list_jobs()
        events = [line for line in (folder / "vlmguard.log").read_text().splitlines()]
        return {
            "daemon_alive": alive, "streamer_same_pid": same_pid,
            "analyzer_restarts": sum(c["restarts"] for n, c in children.items()
                                     if n.startswith("analyzer")) if alive else
            sum('"child exited"' in e and "analyzer" in e for e in events),
            "windows": len(jobs), "by_local": sum(j.provider == "local" for j in jobs),
            "by_cloud": sum(j.provider == "cloud" for j in jobs),
            "failed": sum(j.status == "failed" for j in jobs),
            "pending_or_processing": sum(j.status in ("pending", "processing") for j in jobs),
            "playlist_200": f"{sum(a == 200 for a in answers)}/{len(answers)}",
            "local_requests": len(local.requests),
        }


def answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200 and b".ts" in response.read()
    except OSError:
        return False


def faults(args) -> None:
    tree = Path(args.tree).resolve() if args.tree else HERE
    rows = {}
    for fault in (args.only.split(",") if args.only else FAULTS):
        rows[fault] = run_fault(tree, fault, args.seconds)
        print(fault, json.dumps(rows[fault]), flush=True)
    print(f"\ntree {tree}, {args.seconds:g} s of the fault on every local request\n")
    print("| fault | windows answered local / Gemini | failed | analyzer restarts | "
          "live playlist 200 | streamer same pid |")
    print("|---|---|---|---|---|---|")
    for fault, r in rows.items():
        print(f"| {fault} | {r['by_local']} / {r['by_cloud']} | {r['failed']} | "
              f"{r['analyzer_restarts']} | {r['playlist_200']} | "
              f"{'yes' if r['streamer_same_pid'] else 'no' if r['daemon_alive'] else 'daemon gone'} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("modes")
    one.add_argument("--tree")
    one.add_argument("--windows", type=int, default=4)
    one.add_argument("--only")
    sub.add_parser("window")
    three = sub.add_parser("faults")
    three.add_argument("--tree")
    three.add_argument("--seconds", type=float, default=60)
    three.add_argument("--only")
    args = parser.parse_args()
    {"modes": modes, "window": window, "faults": faults}[args.what](args)


if __name__ == "__main__":
    main()
