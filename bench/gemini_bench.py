"""Gemini benchmark (issue 11): round trips and wall time per clip, tokens per camera-hour,
and a backlog meeting account-wide failures. Everything runs against the project's Gemini
stand-in (tests/gemini_server.py) on loopback, through the real google-genai SDK.

Run by hand:
    .venv/bin/python bench/gemini_bench.py clip  [--tree /work/main] [--jobs 3]
    .venv/bin/python bench/gemini_bench.py tokens
    .venv/bin/python bench/gemini_bench.py backlog [--jobs 60]

clip:    a 10-minute 640x360 25 fps archive (2-s GOP) analysed in mode "reduced" by one
         worker, --jobs times; prints HTTP requests per clip (counted at the stand-in) and
         the median claim-to-stored wall time. --tree runs another checkout's code and
         stand-in (the "before": /work/main), the same script, the same archive.
tokens:  one 10-minute clip at the shipped defaults with thinking off and on ("default"),
         usage from the stand-in's model (documented tokens per frame); x 6 per camera-hour.
backlog: --jobs 12-s clips, 2 analyzer processes (as `vlmguard run` forks them). A daily-
         quota 429 arrives mid-run; SIGHUP's probe clears it; then a bad key arrives and the
         10-s probe clears it. Prints jobs failed, retries used, seconds from the first such
         answer until every analyzer says paused, and seconds from the clearing to the next
         completed job.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
ARCHIVE = Path(tempfile.gettempdir()) / "vlmguard-bench-10min-360p.mp4"
SHORT = Path(tempfile.gettempdir()) / "vlmguard-bench-12s-360p.mp4"
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)
KEY = "test-key-123"
# gemini-3.8-flash paid tier, USD per million tokens (ai.google.dev/gemini-api/docs/pricing
# as transcribed 2026-10-07: "$0.75 through December 31, 2026"); thoughts bill as output.
INPUT_PRICE, OUTPUT_PRICE = 0.75, 3.75
HOURS_PER_MONTH = 720


def make_archives() -> None:
    if not ARCHIVE.exists():
        one_minute = ARCHIVE.with_suffix(".60s.mp4")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        "testsrc2=size=640x360:rate=25", "-t", "60", "-c:v", "libx264",
                        "-preset", "veryfast", "-g", "50", "-pix_fmt", "yuv420p", str(one_minute)],
                       check=True)
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", "9", "-i", str(one_minute),
                        "-c", "copy", str(ARCHIVE)], check=True)
    if not SHORT.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        "testsrc2=size=640x360:rate=25", "-t", "12", "-c:v", "libx264",
                        "-preset", "veryfast", "-g", "25", "-pix_fmt", "yuv420p", str(SHORT)],
                       check=True)


def use_tree(tree: Path) -> None:
    sys.path[:0] = [str(tree), str(tree / "tests")]


def count_requests(calls: list[str]):
    """Count every HTTP request at the stand-in, whichever version of it runs."""
    from aiohttp import web

    @web.middleware
    async def counter(request, handler):
        calls.append(f"{request.method} {request.path}")
        return await handler(request)

    original = web.Application.__init__

    def init(self, *args, middlewares=(), **kwargs):
        original(self, *args, middlewares=[counter, *middlewares], **kwargs)
    web.Application.__init__ = init


def write_config(directory: Path, base_url: str, gemini: str = "", analysis: str = "") -> Path:
    path = directory / "config.toml"
    path.write_text(textwrap.dedent(f"""
        [storage]
        data_dir = "{directory / 'data'}"
        [analysis]
        poll_seconds = 0.2
        {analysis}
        [gemini]
        base_url = "{base_url}"
        timeout_seconds = 60
        {gemini}
        [[cameras]]
        id = "cam1"
        url = "lavfi:testsrc2"
    """))
    return path


def run_clips(tree: Path, jobs: int) -> None:
    import os
    use_tree(tree)
    calls: list[str] = []
    count_requests(calls)
    os.environ["GEMINI_API_KEY"] = KEY
    from gemini_server import FakeGemini
    from vlmguard.analyzer import Worker
    from vlmguard.config import load_config
    from vlmguard.store.bundle import Store

    with FakeGemini() as gemini, tempfile.TemporaryDirectory() as tmp:
        config = load_config(write_config(Path(tmp), gemini.base_url))
        store = Store.from_config(config)
        worker = Worker(config, store.queue, store.pauses, "bench")
        seconds, per_clip = [], []
        for n in range(jobs):
            store.queue.register("cam1", ARCHIVE, T0 + timedelta(minutes=10 * n),
                                 T0 + timedelta(minutes=10 * (n + 1)))
            job = store.queue.next_job("bench", timeout=5)
            before = len(calls)
            started = time.perf_counter()
            worker.process(job)
            seconds.append(time.perf_counter() - started)
            per_clip.append(len(calls) - before)
            done = store.reports.get(job.id)
            assert done.status == "completed", done.error_message
        store.close()
    print(f"tree {tree}: requests per 10-minute clip {per_clip}, "
          f"wall time per job median {statistics.median(seconds):.2f} s "
          f"(runs {', '.join(f'{s:.2f}' for s in seconds)})")


def run_tokens() -> None:
    import os
    use_tree(HERE)
    os.environ["GEMINI_API_KEY"] = KEY
    from gemini_server import FakeGemini
    from vlmguard.analyzer import Worker
    from vlmguard.config import load_config
    from vlmguard.store.bundle import Store

    print("| thinking | requests | prompt | output | thoughts | total per clip | per camera-hour "
          "| USD per camera-month |")
    print("|---|---|---|---|---|---|---|---|")
    for thinking in ("off", "low", "high", "default"):
        with FakeGemini() as gemini, tempfile.TemporaryDirectory() as tmp:
            config = load_config(write_config(Path(tmp), gemini.base_url,
                                              gemini=f'thinking = "{thinking}"'))
            with Store.from_config(config) as store:
                store.queue.register("cam1", ARCHIVE, T0, T0 + timedelta(minutes=10))
                worker = Worker(config, store.queue, store.pauses, "bench")
                worker.process(store.queue.next_job("bench", timeout=5))
                [job] = store.reports.list_jobs()
                assert job.status == "completed", job.error_message
                print(f"| {thinking} | {len(gemini.generate_requests)} | {job.prompt_tokens:,} | {job.output_tokens:,} | "
                      f"{job.thoughts_tokens or 0:,} | {job.total_tokens:,} | "
                      f"{job.total_tokens * 6:,} | {month_cost(job):.2f} |")


def month_cost(job) -> float:
    clips = 6 * HOURS_PER_MONTH
    output = (job.output_tokens or 0) + (job.thoughts_tokens or 0)
    return clips * (job.prompt_tokens * INPUT_PRICE + output * OUTPUT_PRICE) / 1e6


def run_backlog(jobs: int) -> None:
    import multiprocessing
    import os
    use_tree(HERE)
    os.environ["GEMINI_API_KEY"] = KEY
    from gemini_server import FakeGemini
    from vlmguard import analyzer
    from vlmguard.config import load_config
    from vlmguard.health import read_states
    from vlmguard.store.bundle import Store

    spawn = multiprocessing.get_context("spawn")
    with FakeGemini() as gemini, tempfile.TemporaryDirectory() as tmp:
        config = load_config(write_config(Path(tmp), gemini.base_url,
                                          gemini="pause_probe_minutes = 0.1667",
                                          analysis="max_retries = 3"))
        store = Store.from_config(config)
        for n in range(jobs):
            store.queue.register("cam1", SHORT, T0 + timedelta(minutes=n),
                                 T0 + timedelta(minutes=n, seconds=12))
        workers = [spawn.Process(target=analyzer.main, args=(config, i)) for i in range(2)]
        for process in workers:
            process.start()

        def completed() -> int:
            return store.reports.count_jobs(states=["completed"])

        def all_paused() -> bool:
            states = read_states(config.data_dir)
            return all(str(states.get(f"analyzer-{i}", {}).get("state", "")).startswith("paused")
                       for i in range(2))

        def wait(condition, limit=300.0) -> float:
            deadline = time.time() + limit
            while not condition():
                if time.time() > deadline:
                    raise SystemExit("bench: condition not reached")
                time.sleep(0.01)
            return time.time()

        try:
            for fault, clear in (("429_daily", "SIGHUP"), ("bad_key", "probe every 10 s")):
                wait(lambda: completed() >= store.reports.count_jobs() // 3 * (1 if fault == "429_daily" else 2))
                gemini.fault_times.clear()
                gemini.outage = fault
                paused_at = wait(all_paused)
                first = gemini.fault_times[0]
                done_before = completed()
                time.sleep(1)
                gemini.outage = None
                cleared = time.time()
                if clear == "SIGHUP":
                    store.pauses.probe_now("gemini")  # what the supervisor does on SIGHUP
                resumed = wait(lambda: completed() > done_before)
                print(f"{fault}: every analyzer paused {paused_at - first:.2f} s after the "
                      f"first such answer; cleared by {clear}: next job completed "
                      f"{resumed - cleared:.2f} s later")
            wait(lambda: completed() == jobs)
        finally:
            for process in workers:
                process.terminate()
            for process in workers:
                process.join(30)
        rows = store.reports.list_jobs(limit=jobs)
        print(f"{jobs} jobs: completed {sum(r.status == 'completed' for r in rows)}, failed "
              f"{sum(r.status == 'failed' for r in rows)}, retries used "
              f"{sum(r.retry_count for r in rows)}")
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("clip", "tokens", "backlog"))
    parser.add_argument("--tree", type=Path, default=HERE)
    parser.add_argument("--jobs", type=int)
    args = parser.parse_args()
    make_archives()
    if args.what == "clip":
        run_clips(args.tree.resolve(), args.jobs or 3)
    elif args.what == "tokens":
        run_tokens()
    else:
        run_backlog(args.jobs or 60)


if __name__ == "__main__":
    main()
