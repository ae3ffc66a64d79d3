"""The unified merge schema: ``MergeConfig`` and friends, and the YAML loader with the
specification's legacy keys (migrated with a DeprecationWarning)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmerge.errors import ConfigError, did_you_mean
from lmerge.evaluation.harness import HarnessConfig
from lmerge.outputs import DEFAULT_OUTPUT_DIR
from lmerge.yaml_files import read_yaml


@dataclass
class SaveConfig:
    """How a merge is saved."""

    format: Literal["lora", "full", "none"] = "lora"
    """``lora``: a PEFT adapter (exact for factor, linear and low-rank methods, truncated SVD for
    dense ones); ``full``: the base model with the merge added to its weights; ``none``: metadata
    only."""
    rank: int | None = None
    """Rank of the saved LoRA: a dense method's merge (ties, dare, ... in weight space) is saved as
    its truncated SVD of this rank (default: the largest input rank); a merge that comes as LoRA
    factors (linear and low-rank methods, dense ones in core space) is saved exactly, or, when this
    is lower than its rank, as its best approximation of this rank, computed exactly from its
    factors. The truncation errors go to merge_metadata.json."""
    base_model: str | None = None
    """Base model directory for ``format: full``; default: the adapters' ``base_model_name_or_path``."""

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"save.rank: must be a positive integer, got {self.rank}")


@dataclass
class MergeConfig:
    """One merge: which adapters, which method with which parameters, and where it goes."""

    adapters: list[str]
    """Adapter directories, or task names from the catalog, e.g. ``[sentiment, question]``."""
    method: str
    """Merge method: one of those listed at the end of ``lmerge merge --help``."""
    merge_mode: Literal["common", "strict"] = "common"
    """``common``: merge the modules all adapters share; ``strict``: any difference is an error."""
    method_params: dict[str, Any] = field(default_factory=dict)
    """The method's parameters, e.g. ``{k: 20}`` or ``--method_params.k 20`` (each method's, with
    their defaults, are listed at the end of ``lmerge merge --help``); in a sweep, those held fixed."""
    transforms: list[Any] = field(default_factory=list)
    """Pre-merge transforms, e.g. ``[{name: layer_l2_normalize, params: {target_norm: 1.0}}]``."""
    lambda_policy: str | dict[str, Any] = "scalar"
    """``scalar``, or ``{type: per_layer, default: 0.5, overrides: {0: 0.2}}``."""
    save: SaveConfig = field(default_factory=SaveConfig)
    """How the merge is saved (in a sweep: each point's, when ``save_merged`` is set)."""
    output_dir: str = DEFAULT_OUTPUT_DIR
    """Root of all outputs."""
    catalog: str | None = None
    """Task catalog YAML mapping task names to adapters and data."""
    tag: str | None = None
    """Name of this merge in outputs; default: the method and its parameters."""
    optimizer: str | dict[str, Any] | None = None
    """A learner that sets the coefficients of ``weighted_delta_n`` before merging: ``none``, or
    ``{name: adamerging | gradient | supermerge | regret_smoothmax, params: {...}}``; or ``bayes``:
    search the method parameters over ``search`` first (``params`` override its keys). A sweep
    takes none: it searches the method parameters itself."""
    eval_tasks: list[str] | None = None
    """Catalog tasks to evaluate the merge on (needs ``catalog``), next to each task's own adapter;
    none: no evaluation (a sweep: the adapters' tasks)."""
    split: str = "test"
    """Split to evaluate on: train, validation or test."""
    eval_subset: dict[str, Any] | None = None
    """Evaluate on a deterministic subset: ``{enabled, seed, shuffle, stratified, max_samples, per_task}``."""
    eval_batch_size: int = 32
    """Batch size of evaluation."""
    eval_precision: str = "32-true"
    """Precision of evaluation: ``32-true``, or ``bf16-mixed`` / ``16-mixed`` (autocast; on a CPU
    bf16 is faster where it computes bf16 natively, AVX512-BF16 or AMX, and slower elsewhere)."""
    eval_harness: HarnessConfig | None = None
    """lm-evaluation-harness tasks to evaluate the merge on too (``pip install lmerge[harness]``),
    e.g. ``{tasks: [arc_easy, hellaswag], num_fewshot: 0, limit: 500, batch_size: 8}``: the merged
    model in memory against each merged adapter alone (cached), recorded beside ``eval_tasks``."""
    search: dict[str, Any] | None = None
    """For ``optimizer: bayes``: the search over method parameters, as in a sweep config
    (``{budget: 20, init_points: 6, seed: 42, space: {lambda: {type: float, min: 0, max: 1}}}``)."""

    def __post_init__(self) -> None:
        self.save = config_section(SaveConfig, self.save, "save")
        if self.eval_harness is not None:
            self.eval_harness = config_section(HarnessConfig, self.eval_harness, "eval_harness")
        if self.merge_mode not in ("common", "strict"):
            raise ConfigError(f"merge_mode: {self.merge_mode!r} is not one of common, strict")
        if self.eval_tasks and not self.catalog:
            raise ConfigError("eval_tasks: evaluation needs a task catalog (catalog: path/to/catalog.yaml)")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size: must be a positive integer, got {self.eval_batch_size}")
        if not isinstance(self.method_params, dict):
            raise ConfigError(f"method_params: expected a mapping, got {self.method_params!r}")


def optimizer_spec(optimizer: str | dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` of the config's ``optimizer`` (``none`` when absent)."""
    if optimizer is None or isinstance(optimizer, str):
        return optimizer or "none", {}
    if not isinstance(optimizer, dict) or "name" not in optimizer:
        raise ConfigError("optimizer: expected a name or {name: ..., params: {...}}")
    extra = sorted(set(optimizer) - {"name", "params"})
    if extra:
        raise ConfigError(
            f"optimizer.{extra[0]}: unknown key{did_you_mean(extra[0], ['name', 'params'])} (valid: name, params)"
        )
    return optimizer["name"], dict(optimizer.get("params") or {})


# The specification's migration table: old top-level keys and where they live now.
LEGACY_KEYS = {
    "lambda": "method_params.lambda",
    "params": "method_params",
    "grid": "search.grid (with search.type: grid)",
}


def migrate_legacy(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Rewrite legacy keys to the unified schema, warning once per key."""
    data = dict(data)
    for old, new in LEGACY_KEYS.items():
        if old not in data:
            continue
        warnings.warn(f"{source}: key {old!r} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        value = data.pop(old)
        if old == "lambda":
            given = data.get("method_params") or {}
            if isinstance(given, dict) and "lambda" in given and given["lambda"] != value:
                raise ConfigError(
                    f"{source}: lambda: {value!r} conflicts with method_params.lambda: {given['lambda']!r}; "
                    "keep method_params.lambda only"
                )
            data["method_params"] = {**given, "lambda": value}
        elif old == "params":
            data["method_params"] = {**value, **(data.get("method_params") or {})}
        else:
            search = dict(data.get("search") or {})
            search.setdefault("type", "grid")
            search["grid"] = value
            data["search"] = search
    return data


def load_merge_config(path: str | Path, **overrides: Any) -> MergeConfig:
    """Read a merge config YAML (legacy keys migrated), apply ``overrides``, and check it."""
    data = migrate_legacy(read_yaml(path), str(path))
    data.update(overrides)
    return _build(MergeConfig, data, "", source=str(path))


def config_section(cls: type, value: Any, key: str) -> Any:
    """A config's nested section ``key``: ``value`` itself when it is a ``cls``, else built from its mapping."""
    if isinstance(value, dict):
        return _build(cls, value, f"{key}.")
    if not isinstance(value, cls):
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{key}: expected a mapping of {valid}; got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, source: str | None = None) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    where = f"{source}: " if source else ""
    if unknown:
        hint = did_you_mean(unknown[0], names)
        raise ConfigError(f"{where}{prefix}{unknown[0]}: unknown key{hint} (valid: {', '.join(sorted(names))})")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}{prefix}{missing[0]}: required key is missing")
    return cls(**data)
