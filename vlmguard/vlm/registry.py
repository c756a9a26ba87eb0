"""The provider seam: every model provider registers its kind here, and the rest of
vlmguard (config, analyzer, supervisor, status) reaches providers only through it.

A kind is a client class decorated with @register("kind"). The class says what input it
wants (WANTS "video": the reduced clip; "frames": distinct keyframes with their offsets),
which settings dataclass its [providers.NAME] table is checked against (Settings), and
how it makes a client for a key. The table of kinds is filled once, on import of the
provider modules, and only read after that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from vlmguard.plugins import PluginTable
from vlmguard.vlm import ProviderSettings, VlmClient, find_api_key

PROVIDER_MODULES = ("vlmguard.vlm.gemini", "vlmguard.vlm.openai_chat")
KINDS = PluginTable(PROVIDER_MODULES)
# The single-provider config of earlier versions: a [gemini] section, plus the one
# [analysis] key that belonged to it. Read as one provider with the section's name.
LEGACY_SECTION = "gemini"
LEGACY_ANALYSIS_KEYS = ("media_resolution",)
# With no provider configured at all, this one (its key from its default variable).
DEFAULT_PROVIDER = {"kind": "gemini"}


def register(kind: str) -> Callable[[type], type]:
    return KINDS.register(kind)


def kinds() -> dict[str, type]:
    return KINDS.kinds()


def kind_of(settings: ProviderSettings) -> type:
    return kinds()[settings.kind]


def settings_class(kind: str) -> type | None:
    cls = kinds().get(kind)
    return cls.Settings if cls else None


def legacy_tables(raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]] | None:
    """The provider tables an old single-provider config stands for (None: new form).
    Its keys keep their old names in errors (gemini.timeout_seconds)."""
    if "providers" in raw:
        return None
    value = raw.get(LEGACY_SECTION, {})
    if not isinstance(value, dict):
        return {LEGACY_SECTION: value}  # the caller reports "must be a table"
    table = dict(value)
    analysis = raw.get("analysis", {})
    if isinstance(analysis, dict):
        for key in LEGACY_ANALYSIS_KEYS:
            if key in analysis:
                table[key] = analysis[key]
    return {LEGACY_SECTION: {**DEFAULT_PROVIDER, **table}}


def legacy_sections() -> tuple[str, ...]:
    return (LEGACY_SECTION,)


def label(settings: ProviderSettings) -> str:
    """The provider's product name for messages (\"no ... API key\")."""
    return kind_of(settings).LABEL


def describe(settings: ProviderSettings) -> str:
    return f"{settings.name} ({settings.kind} {settings.model})"


def wants_frames(settings: ProviderSettings) -> bool:
    return kind_of(settings).WANTS == "frames"


def client_maker(settings: ProviderSettings) -> Callable[[], VlmClient | None]:
    """The client for the current key: the same one while the key stays the same (the
    worker asks every loop), a new one when the key was added or rotated. None while a
    kind that needs a key has none."""
    cls = kind_of(settings)
    made: dict[str, VlmClient] = {}

    def make() -> VlmClient | None:
        key = find_api_key(settings)
        if key is None:
            if cls.NEEDS_KEY:
                return None
            key = "unused"  # local servers take any key, but the SDK wants one
        if key not in made:
            made.clear()
            made[key] = cls(settings, key)
        return made[key]
    return make


def load_sdks(providers: tuple[ProviderSettings, ...]) -> None:
    for settings in providers:
        kind_of(settings).load_sdk(settings)


def longest_wait_seconds(settings: ProviderSettings) -> float:
    """How long one job may sit in this provider's hands (for the hang watchdog)."""
    return kind_of(settings).longest_wait_seconds(settings)


def plain(settings: ProviderSettings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
            if not f.metadata.get("internal")}
