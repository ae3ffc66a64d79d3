"""The task kinds. A kind lives in its own file here and registers itself with ``@register_kind``;
importing this package imports each such file (any name not starting with ``_``), and a test
checks that every file registers exactly its own kind.
"""

from __future__ import annotations

import importlib
import pkgutil

from lmerge.tasks.kinds.registry import KINDS, TaskData, TaskKind, get_kind, kinds_that, register_kind

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["KINDS", "TaskData", "TaskKind", "get_kind", "kinds_that", "register_kind"]
