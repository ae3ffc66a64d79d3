"""Merge methods: one file per method, each registering itself in ``registry.METHODS``.

Every module in this package is imported here, so a new method file is picked up without a
hand-kept list; ``tests/test_methods.py`` checks that each file registers its own name.
"""

from __future__ import annotations

import importlib
import pkgutil

from lmerge.methods.registry import METHODS, Kind, MergeMethod, ModuleContext, get_method, register

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Kind", "MergeMethod", "ModuleContext", "get_method", "register"]
