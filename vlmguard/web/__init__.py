"""The streaming process's web side: one aiohttp app on the server's port.

app.py builds the app and its middlewares (Host check, CORS, token). Each route module
adds its own routes and imports no other: hls.py the live playlists and segments, api.py
the REST API and /metrics, media.py incident snapshots and clips, recordings.py the
recordings API, events.py the Server-Sent Events, console.py the console's page and
endpoints, session.py sign-in and sign-out. What they share has a module of its own:
keys.py the app's keys, database.py the job table off the event loop, params.py checked
parameters, scratch.py RAM for clips and exports, metrics.py the Prometheus text.
"""

from vlmguard.web.app import create_app

__all__ = ["create_app"]
