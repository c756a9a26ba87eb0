"""Run-time checks a config must pass before vlmguard can start on it.

`vlmguard run`, a SIGHUP reload and `vlmguard check-config` all apply the same rules, so
that a config check-config accepts is one that run accepts too.
"""

from __future__ import annotations

import socket

from vlmguard.config import Config, check_server_settings
from vlmguard.errors import StartupError
from vlmguard.ffmpeg import ffmpeg_binary


def check_can_start(config: Config, *, port_held_by_us: bool = False) -> None:
    """One line (ConfigError or StartupError) naming the first thing that would stop a start.

    port_held_by_us: the port is taken by this data dir's own running vlmguard (check-config
    beside a running daemon, or a reload that keeps the address), so it is not probed.
    """
    check_server_settings(config)
    ffmpeg_binary()
    if not port_held_by_us:
        check_can_listen(config.server.host, config.server.port)


def check_can_listen(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
