"""The web app served on a real port, as the streaming process serves it."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

from vlmguard.httpguard import start_server
from vlmguard.web import create_app


@contextmanager
def serving(config):
    """The app behind the guard, as the streaming process serves it, on its own loop."""
    loop = asyncio.new_event_loop()
    runner = loop.run_until_complete(start_server(create_app(config), config))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield config.server.port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
