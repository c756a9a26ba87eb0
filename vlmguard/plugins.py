"""A table of plug-in kinds, the shape both seams share (model providers, alert destinations).

A kind is a class decorated with @table.register("kind"); the table is filled once, when
its plug-in modules are imported (on first use of kinds()), and only read after that.
"""

from __future__ import annotations

import importlib
from typing import Callable


class PluginTable:
    def __init__(self, modules: tuple[str, ...]):
        self.modules = modules
        self.table: dict[str, type] = {}

    def register(self, kind: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            cls.KIND = kind
            self.table[kind] = cls
            return cls
        return add

    def kinds(self) -> dict[str, type]:
        """Every kind, in the order its module is listed (not the order some earlier caller
        happened to import them), so what iterates over kinds is the same on every run."""
        for module in self.modules:
            importlib.import_module(module)
        rank = {module: index for index, module in enumerate(self.modules)}
        ordered = sorted(self.table.items(),
                         key=lambda item: rank.get(item[1].__module__, len(rank)))
        return dict(ordered)
