"""The seed's old design, for the isolation benchmark: analysis inside the HLS server.

python bench/seed_baseline.py CONFIG PORT WORKERS ARCHIVE_DIR
Serves the same live files as vlmguard (vlmguard's own HLS app) from ONE process whose
thread pool meanwhile does what the seed did for every archive: read it, Base64 it into
an inline request and call Gemini through the SDK (our Gemini test server).
"""

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from google import genai
from google.genai import types

from vlmguard.config import load_config
from vlmguard.web import create_app


def analyse_forever(config, archives):
    client = genai.Client(api_key="test-key-123", http_options=types.HttpOptions(
        base_url=config.providers[0].base_url, api_version="v1beta", timeout=600_000))
    n = 0
    while True:
        data = archives[n % len(archives)].read_bytes()
        client.models.generate_content(model=config.providers[0].model, contents=[
            types.Part.from_bytes(data=data, mime_type="video/mp4"), "Report safety incidents."])
        n += 1


async def main():
    config = load_config(sys.argv[1])
    port, workers = int(sys.argv[2]), int(sys.argv[3])
    archives = sorted(Path(sys.argv[4]).glob("*.mp4"))
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = ThreadPoolExecutor(workers)
    loop = asyncio.get_running_loop()
    for _ in range(workers):
        loop.run_in_executor(pool, analyse_forever, config, archives)
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
