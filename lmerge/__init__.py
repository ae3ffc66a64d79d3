"""lmerge: merge the LoRA adapters of one base model into one multi-task model."""

from lmerge.adapters import LoraAdapter, resolve_adapters
from lmerge.config import MergeConfig, SaveConfig, load_merge_config
from lmerge.errors import LMergeError
from lmerge.methods import METHODS, get_method, register
from lmerge.runner import MergeResult, run_merge

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
