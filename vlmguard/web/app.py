"""The app factory and the middlewares every route shares (CORS, token)."""

from __future__ import annotations

import hmac

from aiohttp import web

from vlmguard.config import Config
from vlmguard.web.api import add_api_routes
from vlmguard.web.hls import add_hls_routes
from vlmguard.web.media import add_media_routes
from vlmguard.web.keys import CONFIG_KEY

CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Range",
        "Access-Control-Expose-Headers": "Content-Length, Content-Range, X-Clip-Start"}


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[cors_middleware, token_middleware])
    app[CONFIG_KEY] = config
    add_hls_routes(app)
    add_api_routes(app)
    add_media_routes(app)
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
    response.headers.update(CORS)
    return response


@web.middleware
async def token_middleware(request: web.Request, handler):
    expected = request.app[CONFIG_KEY].server.token
    if expected and not token_ok(request, expected):
        raise web.HTTPUnauthorized(text="token required\n",
                                   headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def token_ok(request: web.Request, expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    # Undecodable bytes reach us as surrogates: compare them, never fail on them.
    return hmac.compare_digest(given.encode(errors="surrogateescape"),
                               expected.encode(errors="surrogateescape"))

