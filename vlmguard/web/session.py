"""Who may use the web side: the token, the console's session cookie, and CSRF.

With server.token set, a request passes with "Authorization: Bearer <token>", with
"?token=<token>" (players that cannot set headers), or with the console's session cookie.
The cookie is what the sign-in form gets for the token: "<expiry>.<nonce>.<signature>",
HttpOnly and SameSite=Strict, signed with a key derived from the token (so changing the
token signs everyone out, and a restart does not). The console shell and its static files
need nothing: they hold no data, and they must load to show the sign-in form.

A POST changes state (acknowledge, keep, retry). Sent with the token itself (a Bearer
header or ?token=) it is a script's, and no other site knows the token; otherwise (the
session cookie, or a server without a token) it needs the CSRF token the page got from
GET /api/session, in the X-CSRF-Token header: a cookie alone, which a browser attaches by
itself, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from urllib.parse import parse_qs

from aiohttp import web

from vlmguard.web.keys import CONFIG_KEY, SECRET_KEY

COOKIE = "vlmguard_session"
CSRF_HEADER = "X-CSRF-Token"
VIA_KEY = web.RequestKey("auth_via", str)
PUBLIC_PATHS = frozenset({"/", "/api/session"})
PUBLIC_PREFIX = "/static/"
MAX_TOKEN_BYTES = 4096


def add_session_routes(app: web.Application) -> None:
    # Without a token there is no session to sign; CSRF still needs a per-process key.
    app[SECRET_KEY] = secrets.token_bytes(32)
    app.router.add_get("/api/session", session_state)
    app.router.add_post("/api/session", sign_in)
    app.router.add_post("/api/session/end", sign_out)


def signing_key(app: web.Application) -> bytes:
    token = app[CONFIG_KEY].server.token
    if not token:
        return app[SECRET_KEY]
    return hmac.new(token.encode(errors="surrogateescape"), b"vlmguard console session",
                    hashlib.sha256).digest()


def sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def new_cookie(app: web.Application) -> tuple[str, int]:
    lifetime = int(app[CONFIG_KEY].server.session_hours * 3600)
    body = f"{int(time.time()) + lifetime}.{secrets.token_hex(8)}"
    return f"{body}.{sign(signing_key(app), body)}", lifetime


def cookie_valid(app: web.Application, value: str | None) -> bool:
    if not value or value.count(".") != 2:
        return False
    expiry, nonce, signature = value.split(".")
    if not expiry.isdigit() or len(expiry) > 12 or int(expiry) < time.time():
        return False
    expected = sign(signing_key(app), f"{expiry}.{nonce}")
    return hmac.compare_digest(signature.encode(errors="surrogateescape"), expected.encode())


def csrf_token(request: web.Request) -> str:
    """Bound to the session cookie, so a token read under one session is useless in another."""
    return sign(signing_key(request.app), "csrf." + (request.cookies.get(COOKIE) or "open"))[:40]


def token_ok(request: web.Request, expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    return same_secret(given, expected)


def same_secret(given: str, expected: str) -> bool:
    # Undecodable bytes reach us as surrogates: compare them, never fail on them.
    return hmac.compare_digest(given.encode(errors="surrogateescape"),
                               expected.encode(errors="surrogateescape"))


def authenticate(request: web.Request) -> str | None:
    """How the request proved itself: "bearer", "token", "session", "open", or None."""
    expected = request.app[CONFIG_KEY].server.token
    if not expected:
        return "open"
    if token_ok(request, expected):
        return "bearer" if request.headers.get("Authorization") else "token"
    if cookie_valid(request.app, request.cookies.get(COOKIE)):
        return "session"
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler):
    via = authenticate(request)
    public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIX)
    if via is None and not public:
        raise web.HTTPUnauthorized(text="token required\n",
                                   headers={"WWW-Authenticate": "Bearer"})
    request[VIA_KEY] = via or ""
    if request.method == "POST" and request.path != "/api/session" and \
            via not in ("bearer", "token"):
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(errors="surrogateescape"),
                                   csrf_token(request).encode()):
            raise web.HTTPForbidden(text='{"error": "CSRF token missing or wrong"}',
                                    content_type="application/json")
    return await handler(request)


async def session_state(request: web.Request) -> web.Response:
    signed_in = bool(request[VIA_KEY])
    return web.json_response({
        "token_required": bool(request.app[CONFIG_KEY].server.token),
        "signed_in": signed_in,
        "csrf": csrf_token(request) if signed_in else None,
    }, headers={"Cache-Control": "no-store"})


async def sign_in(request: web.Request) -> web.Response:
    """The form's token for a session cookie; JSON {"token": ...} or a form field."""
    expected = request.app[CONFIG_KEY].server.token
    if request.content_length is not None and request.content_length > MAX_TOKEN_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_TOKEN_BYTES,
                                            actual_size=request.content_length)
    given = await given_token(request)
    if expected and not same_secret(given, expected):
        raise web.HTTPUnauthorized(text='{"error": "wrong token"}', content_type="application/json")
    value, lifetime = new_cookie(request.app)
    response = web.json_response({"signed_in": True, "csrf": None, "expires_in": lifetime},
                                 headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE, value, max_age=lifetime, httponly=True, samesite="Strict",
                        path="/")
    # The CSRF token belongs to the new cookie; the page reads it from GET /api/session.
    return response


async def given_token(request: web.Request) -> str:
    body = await request.content.read(MAX_TOKEN_BYTES + 1)
    if len(body) > MAX_TOKEN_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_TOKEN_BYTES, actual_size=len(body))
    text = body.decode(errors="surrogateescape")
    if request.content_type == "application/json":
        try:
            found = json.loads(text).get("token", "")
        except (ValueError, AttributeError):
            raise web.HTTPBadRequest(text='{"error": "body: must be JSON {\\"token\\": ...}"}',
                                     content_type="application/json") from None
        return found if isinstance(found, str) else ""
    return parse_qs(text).get("token", [""])[0]


async def sign_out(request: web.Request) -> web.Response:
    response = web.json_response({"signed_in": False})
    response.del_cookie(COOKIE, path="/")
    return response
