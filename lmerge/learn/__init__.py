"""The learn stage: fused LoRA-linear models, coefficients, the LightningModules that learn
merge coefficients (and LoraFinetune), and their callbacks.

Imported on first use: Lightning takes seconds to import, and a static merge never needs it.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AdaMerging": "lmerge.learn.adamerging",
    "GradientCE": "lmerge.learn.gradient",
    "LoraFinetune": "lmerge.learn.finetune",
    "MergeLearner": "lmerge.learn.base",
    "RegretSmoothMax": "lmerge.learn.regret",
    "SuperMerge": "lmerge.learn.supermerge",
    "LEARNERS": "lmerge.learn.from_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmerge.learn' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
