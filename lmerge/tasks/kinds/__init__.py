"""Task kinds: one file per kind, each registering itself in ``registry.KINDS``.

Every module in this package is imported here, so a new kind file is picked up without a
hand-kept list; ``tests/test_data.py`` checks that each file registers its own kind.
"""

from __future__ import annotations

import importlib
import pkgutil

from lmerge.tasks.kinds.registry import KINDS, TaskData, TaskKind, get_kind, kinds_that, register_kind

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["KINDS", "TaskData", "TaskKind", "get_kind", "kinds_that", "register_kind"]
