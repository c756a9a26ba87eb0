"""Sign-in, the session cookie and CSRF, through aiohttp's test client (no browser)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import CookieJar
from aiohttp.test_utils import TestClient, TestServer

from vlmguard.web import create_app
from vlmguard.web.session import COOKIE

from helpers import make_config as base_config


def make_config(tmp_path, token="tok", hours=12, data_dir=None):
    return base_config(tmp_path, token=token, server=f"session_hours = {hours}", data_dir=data_dir,
                       with_store=True)


def run(config, script):
    async def go():
        jar = CookieJar(unsafe=True)  # the test server is 127.0.0.1, an IP address
        async with TestClient(TestServer(create_app(config)), cookie_jar=jar) as client:
            return await script(client)
    return asyncio.run(go())


def test_sign_in_sets_a_strict_httponly_cookie_that_opens_the_api(tmp_path):
    async def script(client):
        assert (await client.get("/api/cameras")).status == 401
        state = await (await client.get("/api/session")).json()
        assert state == {"token_required": True, "signed_in": False, "csrf": None}
        assert (await client.post("/api/session", json={"token": "nope"})).status == 401
        signed = await client.post("/api/session", json={"token": "tok"})
        header = signed.headers["Set-Cookie"]
        assert "HttpOnly" in header and "SameSite=Strict" in header and "Max-Age=43200" in header
        assert (await client.get("/api/cameras")).status == 200
        state = await (await client.get("/api/session")).json()
        assert state["signed_in"] and len(state["csrf"]) == 40
        await client.post("/api/session/end", headers={"X-CSRF-Token": state["csrf"]})
        assert (await client.get("/api/cameras")).status == 401
    run(make_config(tmp_path), script)


def test_a_form_post_signs_in_too(tmp_path):
    async def script(client):
        signed = await client.post("/api/session", data={"token": "tok"})
        assert signed.status == 200 and COOKIE in signed.cookies
    run(make_config(tmp_path), script)


def test_tampered_or_expired_cookies_are_refused(tmp_path):
    async def script(client):
        await client.post("/api/session", json={"token": "tok"})
        value = next(c.value for c in client.session.cookie_jar if c.key == COOKIE)
        expiry, nonce, signature = value.split(".")
        for forged in (f"{int(expiry) + 3600}.{nonce}.{signature}",  # longer life, old signature
                       f"{int(time.time()) - 1}.{nonce}.{signature}", "garbage", "1.2.3"):
            client.session.cookie_jar.clear()
            client.session.cookie_jar.update_cookies({COOKIE: forged})
            assert (await client.get("/api/cameras")).status == 401, forged
    run(make_config(tmp_path), script)


def test_a_restart_keeps_sessions_a_new_token_signs_everyone_out(tmp_path):
    async def sign_in(client):
        await client.post("/api/session", json={"token": "tok"})
        return next(c.value for c in client.session.cookie_jar if c.key == COOKIE)
    cookie = run(make_config(tmp_path), sign_in)

    async def with_old_cookie(client):
        client.session.cookie_jar.update_cookies({COOKIE: cookie})
        return (await client.get("/api/cameras")).status
    data_dir = tmp_path / "data"
    (tmp_path / "restart").mkdir()
    assert run(make_config(tmp_path / "restart", data_dir=data_dir), with_old_cookie) == 200
    (tmp_path / "new").mkdir()
    assert run(make_config(tmp_path / "new", token="changed", data_dir=data_dir),
               with_old_cookie) == 401
    (tmp_path / "elsewhere").mkdir()  # another data dir: another session list
    assert run(make_config(tmp_path / "elsewhere"), with_old_cookie) == 401


def test_posts_need_csrf_even_without_a_token(tmp_path):
    async def script(client):
        assert (await client.post("/api/jobs/1/retry")).status == 403
        csrf = (await (await client.get("/api/session")).json())["csrf"]
        answer = await client.post("/api/jobs/1/retry", headers={"X-CSRF-Token": csrf})
        assert answer.status == 409  # past CSRF: job 1 is not a failed job
    run(make_config(tmp_path, token=""), script)


def test_other_origins_are_not_offered_post(tmp_path):
    async def script(client):
        answer = await client.options("/api/jobs/1/retry", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        return answer.headers["Access-Control-Allow-Methods"]
    assert "POST" not in run(make_config(tmp_path), script)


def test_the_token_itself_needs_no_csrf_but_a_cookie_does(tmp_path):
    async def script(client):
        by_query = await client.post("/api/jobs/1/retry?token=tok")
        by_header = await client.post("/api/jobs/1/retry", headers={"Authorization": "Bearer tok"})
        anonymous = await client.post("/api/jobs/1/retry")
        await client.post("/api/session", json={"token": "tok"})
        by_cookie = await client.post("/api/jobs/1/retry")
        return by_query.status, by_header.status, anonymous.status, by_cookie.status
    assert run(make_config(tmp_path), script) == (409, 409, 401, 403)
