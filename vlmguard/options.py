"""How a settings field is declared: its default and the checks config's walker applies
to it. Apart from config.py so that a plug-in's settings dataclass (a model provider's)
declares its fields without importing config, which reads the plug-ins' tables."""

from __future__ import annotations

import dataclasses
from typing import Any


def opt(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
        choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
    """A config field: its default plus the checks the walker applies to it."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "secret": secret}
    return dataclasses.field(default=default, metadata=meta)
