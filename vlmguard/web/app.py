"""The app factory and what every route shares: the Host check, CORS, auth.

With a token, any origin may read (a player page elsewhere still needs the token), so the
answers carry "Access-Control-Allow-Origin: *". Without one (open mode, loopback only),
the token is not there to stop a page the operator happens to visit: its script could
read the API (CORS) or, after pointing its own host name at 127.0.0.1 (DNS rebinding),
reach the server as if same-origin. So in open mode the Host header must name this
server (loopback, server.host, public_url's host, server.allowed_hosts), and only pages
of loopback origins (any local program can read a loopback server anyway) or of
server.cors_origins are let read. POST is never offered to other origins, so a browser
never sends another site's state-changing request (its preflight fails).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from vlmguard.child import ChildState
from vlmguard.config import Config, ServerConfig
from vlmguard.web.api import add_api_routes
from vlmguard.web.console import add_console_routes
from vlmguard.web.database import add_database
from vlmguard.web.events import add_event_routes
from vlmguard.web.hls import add_hls_routes
from vlmguard.web.keys import CHILD_STATE_KEY, CONFIG_KEY, GUARD_KEY
from vlmguard.web.media import add_media_routes
from vlmguard.web.nodes import add_node_routes
from vlmguard.web.recordings import add_recording_routes
from vlmguard.web.session import add_session_routes, auth_middleware

CORS = {"Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Range",
        "Access-Control-Expose-Headers": "Content-Length, Content-Range, X-Clip-Start"}


@dataclass(frozen=True)
class Access:
    """Which Host names and which origins the server answers, from [server]."""

    open: bool  # no token
    hosts: frozenset[str]
    origins: frozenset[str]

    @classmethod
    def of(cls, server: ServerConfig) -> "Access":
        hosts = {"localhost", server.host.lower().strip("[]")}
        hosts |= {name.lower().strip("[]").rstrip(".") for name in server.allowed_hosts}
        if server.public_url:
            hosts.add((urlsplit(server.public_url).hostname or "").lower())
        return cls(open=not server.token, hosts=frozenset(hosts),
                   origins=frozenset(origin.lower() for origin in server.cors_origins))

    def host_allowed(self, header: str | None) -> bool:
        if not self.open or header is None:
            return True  # no Host header: HTTP/1.0, not a browser
        name = host_name(header)
        return name in self.hosts or name.endswith(".localhost") or is_loopback(name)

    def cors(self, origin: str | None) -> dict[str, str]:
        """The CORS headers for a request from origin (none for a refused origin)."""
        if not self.open:
            return {"Access-Control-Allow-Origin": "*", **CORS}
        if origin and (origin.lower() in self.origins or loopback_origin(origin)):
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", **CORS}
        return {"Vary": "Origin"}


ACCESS_KEY = web.AppKey("access", Access)


def host_name(header: str) -> str:
    """The host of a Host header, lower case, without port, brackets or a final dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return header.rstrip(".")


def is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        name = (parts.hostname or "").rstrip(".")
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and \
        (name == "localhost" or name.endswith(".localhost") or is_loopback(name))


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[host_middleware, preflight_middleware, auth_middleware])
    app[CONFIG_KEY] = config
    app[ACCESS_KEY] = Access.of(config.server)
    app.on_response_prepare.append(add_cors_headers)
    app[GUARD_KEY] = []
    # The streamer puts its own in (counted in its state file); this one only logs.
    app[CHILD_STATE_KEY] = ChildState()
    add_database(app)
    add_session_routes(app)
    add_console_routes(app)
    add_hls_routes(app)
    add_api_routes(app)
    add_media_routes(app)
    add_recording_routes(app)
    add_event_routes(app)
    add_node_routes(app)
    return app


@web.middleware
async def host_middleware(request: web.Request, handler):
    if not request.app[ACCESS_KEY].host_allowed(request.headers.get("Host")):
        raise web.HTTPForbidden(
            text='{"error": "Host header names no host of this server; add it to '
                 'server.allowed_hosts"}', content_type="application/json")
    return await handler(request)


@web.middleware
async def preflight_middleware(request: web.Request, handler):
    if request.method == "OPTIONS":  # a browser's preflight: no route, no token
        return web.Response(status=204)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer's CORS headers, errors and streamed answers (clips, events) included:
    aiohttp calls this right before it sends the headers."""
    for name, value in request.app[ACCESS_KEY].cors(request.headers.get("Origin")).items():
        if name == "Vary" and response.headers.get("Vary"):
            value = f"{response.headers['Vary']}, {value}"  # e.g. Accept-Encoding stays
        response.headers[name] = value
