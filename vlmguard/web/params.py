"""Query and path parameters, checked: a bad one is 400 with a JSON body naming it, never
a 500 and never a number or time Python would choke on further in."""

from __future__ import annotations

import re
from datetime import datetime

from aiohttp import web

from vlmguard.config import Config
from vlmguard.times import parse_time
from vlmguard.web.keys import CONFIG_KEY

INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


def config_of(request: web.Request) -> Config:
    return request.app[CONFIG_KEY]


class BadParameter(web.HTTPBadRequest):
    def __init__(self, name: str, problem: str):
        super().__init__(text=f'{{"error": "{name}: {problem}", "parameter": "{name}"}}',
                         content_type="application/json")


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    return checked_int(raw, name, lo, hi)


def checked_int(raw: str, name: str, lo: int, hi: int) -> int:
    """ASCII digits only, so int() never sees a huge or exotic number; then the range."""
    if not INTEGER.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise BadParameter(name, f"must be an integer {lo}-{hi}")
    return int(raw)


def choice_params(request: web.Request, name: str, choices: tuple[str, ...]) -> list[str]:
    values = [v for raw in request.query.getall(name, []) for v in raw.split(",") if v]
    for value in values:
        if value not in choices:
            raise BadParameter(name, f"must be one of {', '.join(choices)}")
    return values


def camera_param(request: web.Request) -> str | None:
    """The camera asked for; one not configured here is checked against the other boxes'
    (api.site_camera, with the database), since jobs and incidents are the whole site's."""
    camera = request.query.get("camera")
    if camera is not None and len(camera) > 200:
        raise BadParameter("camera", "unknown camera")
    return camera


def since_param(request: web.Request, name: str = "since") -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return parse_time(raw)
    except ValueError as exc:
        raise BadParameter(name, str(exc)) from None


def category_params(request: web.Request) -> list[str]:
    values = [v for raw in request.query.getall("category", []) for v in raw.split(",") if v]
    for value in values:
        if len(value) > 100:
            raise BadParameter("category", "at most 100 characters")
    return values
