"""Who may use the web side: the token, the console's session cookie, and CSRF.

With server.token set, a request passes with "Authorization: Bearer <token>", with
"?token=<token>" (players that cannot set headers), or with the console's session cookie.
The cookie is what the sign-in form gets for the token: "<expiry>.<nonce>.<signature>",
HttpOnly and SameSite=Strict, signed with a key derived from the token (so changing the
token signs everyone out). A cookie counts only while its nonce is in the session list
(<data_dir>/sessions.json, 0600): signing out strikes it, so a copy of the cookie is
useless afterwards, and a restart keeps everyone else signed in. The console shell and
its static files need nothing: they hold no data, and they must load to show the form.

Wrong tokens (the form's, a Bearer header's, a ?token=) are counted per client address
(an IPv6 /64 counts as one): after FREE_FAILURES, that address must wait, twice as long
after each further failure up to MAX_WAIT_SECONDS, and until then any request from it
that carries a token is answered 429 without the token being looked at. The table of
addresses is bounded (MAX_TRACKED, least recent dropped first); each failure that was
checked is logged, and both kinds are counted for /metrics.

A POST changes state (acknowledge, keep, retry). Sent with the token itself (a Bearer
header or ?token=) it is a script's, and no other site knows the token; otherwise (the
session cookie, or a server without a token) it needs the CSRF token the page got from
GET /api/session, in the X-CSRF-Token header: a cookie alone, which a browser attaches by
itself, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from aiohttp import web

from vlmguard.logs import get_logger
from vlmguard.web.keys import CONFIG_KEY, LIMITER_KEY, SECRET_KEY

log = get_logger("vlmguard.web.session")

COOKIE = "vlmguard_session"
CSRF_HEADER = "X-CSRF-Token"
VIA_KEY = web.RequestKey("auth_via", str)
PUBLIC_PATHS = frozenset({"/", "/api/session"})
PUBLIC_PREFIX = "/static/"
MAX_TOKEN_BYTES = 4096

FREE_FAILURES = 5
MAX_WAIT_SECONDS = 60.0
FORGET_SECONDS = 900.0  # an address's failures are forgotten this long after its last one
MAX_TRACKED = 4096
MAX_SESSIONS = 1000


@dataclass
class Failures:
    count: int = 0
    last: float = 0.0
    until: float = 0.0  # monotonic time before which no token from there is looked at


class SignInLimiter:
    """Wrong tokens per client address, and how long each address must wait."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.table: OrderedDict[str, Failures] = OrderedDict()  # least recent failure first
        self.failed_total = 0
        self.refused_total = 0

    def wait(self, address: str) -> float:
        """Seconds before a token from address may be looked at (0: now)."""
        entry = self.table.get(address)
        return max(0.0, entry.until - self.clock()) if entry else 0.0

    def refuse(self, address: str) -> web.HTTPTooManyRequests | None:
        """The 429 for a request from an address that must still wait, counted; else None."""
        wait = self.wait(address)
        if wait <= 0:
            return None
        self.refused_total += 1
        seconds = math.ceil(wait)
        return web.HTTPTooManyRequests(
            text=json.dumps({"error": f"too many wrong tokens from your address: try again "
                                      f"in {seconds} s"}),
            content_type="application/json", headers={"Retry-After": str(seconds)})

    def failed(self, address: str, how: str) -> None:
        now = self.clock()
        self.forget_old(now)
        entry = self.table.pop(address, None) or Failures()
        entry.count += 1
        entry.last = now
        wait = backoff(entry.count)
        entry.until = now + wait
        self.table[address] = entry
        while len(self.table) > MAX_TRACKED:
            self.table.popitem(last=False)
        self.failed_total += 1
        log.warning("sign-in failed: wrong token", client=address, via=how,
                    failures=entry.count, wait_s=wait)

    def forget_old(self, now: float) -> None:
        while self.table:
            address, entry = next(iter(self.table.items()))
            if now - entry.last < FORGET_SECONDS:
                break
            del self.table[address]


def backoff(failures: int) -> float:
    """0 for the first FREE_FAILURES - 1 failures, then 1 s, doubling, up to the cap."""
    if failures < FREE_FAILURES:
        return 0.0
    return min(MAX_WAIT_SECONDS, 2.0 ** (failures - FREE_FAILURES))


def client_address(request: web.Request) -> str:
    """The address failures are counted under: the peer's IP, an IPv6 peer's /64 (one
    host holds a whole /64), an IPv4-mapped one as IPv4."""
    remote = request.remote or "unknown"
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Sessions:
    """The signed-in sessions (nonce -> expiry), kept in a file so a restart keeps them."""

    def __init__(self, path: Path, clock=time.time):
        self.path = path
        self.clock = clock
        self.expiry: dict[str, int] = self.load()

    def load(self) -> dict[str, int]:
        try:
            found = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("session list unreadable: everyone signs in again",
                        path=str(self.path), error=str(exc)[:200])
            return {}
        if not isinstance(found, dict):
            return {}
        return {nonce: expiry for nonce, expiry in found.items()
                if isinstance(nonce, str) and isinstance(expiry, int)
                and not isinstance(expiry, bool)}

    def __contains__(self, nonce: str) -> bool:
        expiry = self.expiry.get(nonce)
        return expiry is not None and expiry >= self.clock()

    def add(self, nonce: str, expiry: int) -> None:
        now = self.clock()
        self.expiry = {n: e for n, e in self.expiry.items() if e >= now}
        while len(self.expiry) >= MAX_SESSIONS:  # the one closest to its end goes first
            del self.expiry[min(self.expiry, key=self.expiry.__getitem__)]
        self.expiry[nonce] = expiry
        self.save()

    def remove(self, nonce: str) -> None:
        if self.expiry.pop(nonce, None) is not None:
            self.save()

    def save(self) -> None:
        temp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(descriptor, "w") as handle:
                json.dump(self.expiry, handle)
            temp.replace(self.path)
        except OSError as exc:
            # Kept in memory: sign-in and sign-out still work until a restart.
            log.warning("session list not saved", path=str(self.path), error=str(exc))


SESSIONS_KEY = web.AppKey("sessions", Sessions)


def add_session_routes(app: web.Application) -> None:
    # Without a token there is no session to sign; CSRF still needs a per-process key.
    app[SECRET_KEY] = secrets.token_bytes(32)
    app[LIMITER_KEY] = SignInLimiter()
    app[SESSIONS_KEY] = Sessions(app[CONFIG_KEY].data_dir / "sessions.json")
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
    expiry, nonce = int(time.time()) + lifetime, secrets.token_hex(16)
    app[SESSIONS_KEY].add(nonce, expiry)
    body = f"{expiry}.{nonce}"
    return f"{body}.{sign(signing_key(app), body)}", lifetime


def cookie_nonce(app: web.Application, value: str | None) -> str | None:
    """The nonce of a cookie this server signed that has not expired, else None."""
    if not value or value.count(".") != 2:
        return None
    expiry, nonce, signature = value.split(".")
    if not expiry.isascii() or not expiry.isdigit() or len(expiry) > 12 \
            or int(expiry) < time.time():
        return None
    expected = sign(signing_key(app), f"{expiry}.{nonce}")
    if not hmac.compare_digest(signature.encode(errors="surrogateescape"), expected.encode()):
        return None
    return nonce


def cookie_valid(app: web.Application, value: str | None) -> bool:
    nonce = cookie_nonce(app, value)
    return nonce is not None and nonce in app[SESSIONS_KEY]


def csrf_token(request: web.Request) -> str:
    """Bound to the session cookie, so a token read under one session is useless in another."""
    return sign(signing_key(request.app), "csrf." + (request.cookies.get(COOKIE) or "open"))[:40]


def presented_token(request: web.Request) -> tuple[str, str] | None:
    """(how, token) when the request carries a token in the URL or a Bearer header."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return "bearer", header[7:]
    if "token" in request.query:
        return "query", request.query.get("token", "")
    return None


def same_secret(given: str, expected: str) -> bool:
    # Undecodable bytes reach us as surrogates: compare them, never fail on them.
    return hmac.compare_digest(given.encode(errors="surrogateescape"),
                               expected.encode(errors="surrogateescape"))


def authenticate(request: web.Request) -> str | None:
    """How the request proved itself: "bearer", "token", "session", "open", or None.

    A wrong token counts against the client's address (unless the cookie let it in);
    while that address must wait, a request carrying a token is refused with 429.
    """
    expected = request.app[CONFIG_KEY].server.token
    if not expected:
        return "open"
    session = cookie_valid(request.app, request.cookies.get(COOKIE))
    presented = presented_token(request)
    if presented is None:
        return "session" if session else None
    limiter, address = request.app[LIMITER_KEY], client_address(request)
    refusal = limiter.refuse(address)
    if refusal is not None:
        raise refusal
    how, given = presented
    if same_secret(given, expected):
        return "bearer" if how == "bearer" else "token"
    if session:
        return "session"
    limiter.failed(address, how)
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
    if not expected:  # nothing to sign in to: every request is let in
        return web.json_response({"signed_in": True, "csrf": None},
                                 headers={"Cache-Control": "no-store"})
    # Nothing awaited from here to the verdict: concurrent attempts from one address
    # cannot all pass the wait before the first failure is counted.
    limiter, address = request.app[LIMITER_KEY], client_address(request)
    refusal = limiter.refuse(address)
    if refusal is not None:
        raise refusal
    if not same_secret(given, expected):
        limiter.failed(address, "form")
        raise web.HTTPUnauthorized(text='{"error": "wrong token"}',
                                   content_type="application/json")
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
    """Strikes the session from the list: the cookie, or any copy of it, is dead."""
    nonce = cookie_nonce(request.app, request.cookies.get(COOKIE))
    if nonce is not None:
        request.app[SESSIONS_KEY].remove(nonce)
    response = web.json_response({"signed_in": False})
    response.del_cookie(COOKIE, path="/")
    return response
