"""The streaming process's web side: one aiohttp app on the server's port.

app.py builds the app and its middlewares (CORS, token); hls.py serves the live playlists
and segments; api.py the REST API (database reads in worker threads, never on the event
loop); metrics.py the Prometheus text. Each module adds its own routes.
"""

from vlmguard.web.app import create_app

__all__ = ["create_app"]
