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
        for module in self.modules:
            importlib.import_module(module)
        return self.table
