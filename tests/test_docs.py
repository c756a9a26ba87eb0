"""The README and docs/: the two commands on the README's first lines, every relative link
and heading anchor resolving, and every config key in docs/configuration.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from vlmguard import config
from vlmguard.vlm import ProviderSettings
from vlmguard.vlm.gemini import GeminiSettings
from vlmguard.vlm.openai_chat import OpenAISettings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
CODE_BLOCK = re.compile(r"^(?: {4}|\t)[^\n]*$|^```(?s:.*?)^```", re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", CODE_BLOCK.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(page: Path) -> list[str]:
    text = CODE_BLOCK.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [a or b for a, b in LINK.findall(text)]


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "# vlmguard"
    commands = [line.strip() for line in lines[1:5] if line.strip()]
    assert commands == ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/vlmguard run",
                        "bash tests/run.sh"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in readme]
    assert not unlinked


def config_keys() -> set[str]:
    def fields(cls):
        return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    keys = {f"{name}.{key}" for name, cls in config.SECTIONS.items() for key in fields(cls)}
    keys |= {f"alerts.{key}" for key in fields(config.AlertsConfig)}
    keys |= {f"alerts.rules[].{key}" for key in fields(config.AlertRule)}
    keys |= {f"cameras[].{key}" for key in fields(config.CameraConfig)}
    keys |= {f"providers.NAME.{key}"
             for cls in (ProviderSettings, GeminiSettings, OpenAISettings) for key in fields(cls)}
    return keys


def test_configuration_page_lists_every_key():
    page = (ROOT / "docs" / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+)` \|", page, re.M))
    assert config_keys() - listed == set(), "keys missing from docs/configuration.md"
    assert listed - config_keys() == set(), "docs/configuration.md lists keys the code lacks"
