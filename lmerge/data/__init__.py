"""Tasks and data: task specs and the catalog, sampling, eval subsets and the DataModules.

The DataModules are imported on first use: Lightning takes seconds to import, and commands such
as ``lmerge merge`` need only the specs and subsets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lmerge.data.sampling import STRATEGIES, make_sampler, sampling_strategy, sampling_weights
from lmerge.data.subsets import parse_eval_subset, select_subset, subset_indices, subset_namespace
from lmerge.tasks.spec import TaskSpec, load_task_catalog

if TYPE_CHECKING:
    from lmerge.data.catalog_module import CatalogDataModule
    from lmerge.data.multitask import MultiTaskDataModule
    from lmerge.data.task_module import TaskDataModule

__all__ = [
    "STRATEGIES",
    "CatalogDataModule",
    "MultiTaskDataModule",
    "TaskDataModule",
    "TaskSpec",
    "load_task_catalog",
    "make_sampler",
    "parse_eval_subset",
    "sampling_strategy",
    "sampling_weights",
    "select_subset",
    "subset_indices",
    "subset_namespace",
]


# The module that defines each DataModule, imported on first use.
_LAZY = {
    "CatalogDataModule": "lmerge.data.catalog_module",
    "MultiTaskDataModule": "lmerge.data.multitask",
    "TaskDataModule": "lmerge.data.task_module",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmerge.data' has no attribute {name!r}")
