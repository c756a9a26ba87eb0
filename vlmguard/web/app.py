"""The app factory and the middlewares every route shares (CORS, auth)."""

from __future__ import annotations

from aiohttp import web

from vlmguard.config import Config
from vlmguard.web.api import add_api_routes
from vlmguard.web.console import add_console_routes
from vlmguard.web.events import add_event_routes
from vlmguard.web.hls import add_hls_routes
from vlmguard.web.keys import CONFIG_KEY, GUARD_KEY
from vlmguard.web.media import add_media_routes
from vlmguard.web.recordings import add_recording_routes
from vlmguard.web.session import add_session_routes, auth_middleware

# Other origins may read (players on other pages); POST is not offered to them, so a
# browser never sends another site's state-changing request (its preflight fails).
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Range",
        "Access-Control-Expose-Headers": "Content-Length, Content-Range, X-Clip-Start"}


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[cors_middleware, auth_middleware])
    app[CONFIG_KEY] = config
    app[GUARD_KEY] = []
    add_session_routes(app)
    add_console_routes(app)
    add_hls_routes(app)
    add_api_routes(app)
    add_media_routes(app)
    add_recording_routes(app)
    add_event_routes(app)
    return app


@web.middleware
async def cors_middleware(request: web.Request, handler):
    if request.method == "OPTIONS":  # a browser's preflight: no route, no token
        return web.Response(status=204, headers=CORS)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(CORS)
        raise
    if not response.prepared:  # an event stream sent its headers already
        response.headers.update(CORS)
    return response
