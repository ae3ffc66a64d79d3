"""lmerge: merge the LoRA adapters of one base model into one multi-task model."""

from lmerge.adapters import LoraAdapter
from lmerge.errors import LMergeError
from lmerge.merge.config import MergeConfig, SaveConfig, load_merge_config
from lmerge.merge.runner import MergeResult
from lmerge.methods import METHODS, get_method, register
from lmerge.pipeline import run_merge
from lmerge.tasks.resolve import resolve_adapters

__all__ = [
    "METHODS",
    "LMergeError",
    "LoraAdapter",
    "MergeConfig",
    "MergeResult",
    "SaveConfig",
    "get_method",
    "load_merge_config",
    "register",
    "resolve_adapters",
    "run_merge",
]
