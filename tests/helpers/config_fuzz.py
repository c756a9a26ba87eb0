"""Hypothesis values for config keys, and the check every fuzzed config file must pass:
it loads within every key's bounds, or fails with one line naming the file."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import strategies as st

from vlmguard.config import FFMPEG_PATH_CHARS, SECTIONS, load_config, masked
from vlmguard.errors import ConfigError

NUMERIC = [(section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
           if f.type in ("int", "float")]


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"
    return str(value)


SCALARS = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(), st.booleans(),
                    st.text(max_size=40), st.datetimes(timezones=st.just(timezone.utc)))
ANY_VALUE = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)


def assert_loads_or_one_line(path: Path) -> None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message and "\r" not in message
        return
    json.dumps(masked(config))  # what check-config prints
    assert not set(str(config.data_dir)) & set(FFMPEG_PATH_CHARS) and str(config.data_dir).isprintable()
    for section, spec in NUMERIC:
        value = getattr(getattr(config, section), spec.name)
        assert math.isfinite(value) and spec.metadata["lo"] <= value <= spec.metadata["hi"]
