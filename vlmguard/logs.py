"""structlog set-up, called once in every process (children start unconfigured).

JSON lines when stdout is not a terminal (journald), a readable console otherwise. Each
line carries role and pid: journald attributes a shared stdout to the process that opened
it, so the supervisor's children would otherwise all look like the supervisor.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

from vlmguard.redact import redact_value


def configure_logging(role: str, *, json: bool | None = None, level: str = "INFO") -> None:
    if json is None:
        json = not sys.stdout.isatty()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, pid=os.getpid())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json else _keep_exc_info,
            redact_secrets,  # again: a formatted traceback can quote a URL
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log and SQLAlchemy's echo are noise at INFO on an edge box.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)


def redact_secrets(_logger, _name, event_dict):
    """Camera passwords and URL tokens out of every string of every event, whoever logs
    it (FFmpeg's stderr, an aiohttp error, an exception message)."""
    return {key: redact_value(value) for key, value in event_dict.items()}


def _keep_exc_info(logger, name, event_dict):
    """The console renderer formats exceptions itself."""
    return event_dict


def get_logger(name: str = "vlmguard") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


class Noticed:
    """Remembers what was already logged, so an odd file is reported once, not each loop."""

    def __init__(self) -> None:
        self.seen: set = set()

    def first(self, key) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        return True
