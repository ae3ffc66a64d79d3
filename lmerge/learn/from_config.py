"""Run a learner from a merge config's ``optimizer`` key (the specification's form):

```yaml
method: weighted_delta_n
optimizer: {name: adamerging, params: {max_steps: 100, granularity: layer_wise, split: test}}
```

``params`` mixes learner arguments with trainer and data settings; this module sorts them out,
trains with the same code as ``lmerge fit``, and returns the learned ``method_params``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from lightning.pytorch import Trainer

from lmerge.data.catalog_module import CatalogDataModule
from lmerge.errors import ConfigError, unknown_name
from lmerge.learn.adamerging import AdaMerging
from lmerge.learn.callbacks import CoefficientLogger
from lmerge.learn.gradient import GradientCE
from lmerge.learn.regret import RegretSmoothMax
from lmerge.learn.supermerge import SuperMerge

# The names a merge config's ``optimizer`` key uses for each learner.
LEARNERS = {
    "adamerging": AdaMerging,
    "gradient": GradientCE,
    "supermerge": SuperMerge,
    "regret_smoothmax": RegretSmoothMax,
}

# Specification names (and their aliases) of settings that belong to the Trainer.
_TRAINER = {
    "max_steps": "max_steps",
    "gradient_accumulation_steps": "accumulate_grad_batches",
    "grad_accum_steps": "accumulate_grad_batches",
    "logging_steps": "log_every_n_steps",
    "log_every": "log_every_n_steps",
    "progress_bar": "enable_progress_bar",
    "accelerator": "accelerator",
    "devices": "devices",
    "strategy": "strategy",
}
# ... and to the DataModule.
_DATA = {
    "split": "fit_split",
    "batch_size": "batch_size",
    "dataloader_num_workers": "num_workers",
    "dataloader_pin_memory": "pin_memory",
    "sampling": "sampling",
    "seed": "seed",
}
_PRECISIONS = {"auto": None, "fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
# Learner aliases from the specification.
_ALIASES = {"early_stopping_min_delta": "early_stopping_threshold"}
# Settings of the older implementation that the fused LoRA model makes meaningless, or that only
# ever had one value.
_OBSOLETE = {
    "delta_residency": "the fused LoRA model keeps no dense deltas",
    "non_blocking_transfer": "Lightning moves batches itself",
    "coefficient_parameterization": "supermerge's coefficients are always tanh of their parameters (signed)",
    "normalize_coefficients": "supermerge's learned coefficients are never normalized",
    "ce_baseline_source": "gradient's baseline is always the task's own adapter on the same data",
}
_DEFAULT_SPLITS = {"adamerging": "test"}


def train_learner(
    name: str,
    params: dict[str, Any],
    catalog: str | None,
    adapters: list[str],
    merge_mode: str,
    method: str = "weighted_delta_n",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train learner ``name`` and return ``(method_params, record)`` of merge method ``method``, which
    must be the one its coefficients export (``weighted_delta_n``; ``weighted_rank`` when rank-wise)."""
    if name not in LEARNERS:
        raise ConfigError("optimizer.name: " + unknown_name("optimizer", name, ["none", *LEARNERS]))
    if not catalog:
        raise ConfigError(f"optimizer {name}: learning needs a task catalog with the tasks' data (catalog: ...)")
    learner_class = LEARNERS[name]
    accepted = _accepted(learner_class)
    trainer_args: dict[str, Any] = {
        "max_steps": 100,
        "logger": True,
        "enable_checkpointing": False,
        "use_distributed_sampler": False,  # the samplers shard themselves (EpochSampler)
    }
    data_args: dict[str, Any] = {"fit_split": _DEFAULT_SPLITS.get(name, "validation")}
    learner_args: dict[str, Any] = {"merge_mode": merge_mode}
    for key, value in params.items():
        where = f"optimizer.params.{key}"
        if key in _OBSOLETE:
            warnings.warn(f"{where} is ignored: {_OBSOLETE[key]}", DeprecationWarning, stacklevel=2)
        elif key in _TRAINER:
            trainer_args[_TRAINER[key]] = value
        elif key in _DATA:
            data_args[_DATA[key]] = value
        elif key == "dtype_compute":
            if value not in _PRECISIONS:
                raise ConfigError(f"{where}: {unknown_name('dtype', value, list(_PRECISIONS))}")
            if _PRECISIONS[value]:
                trainer_args["precision"] = _PRECISIONS[value]
        elif key == "force_cpu":
            if value:
                trainer_args["accelerator"] = "cpu"
        elif _ALIASES.get(key, key) in accepted:
            learner_args[_ALIASES.get(key, key)] = value
        else:
            valid = sorted(set(accepted) | set(_TRAINER) | set(_DATA) | {"dtype_compute", "force_cpu"})
            raise ConfigError(f"{where}: not a setting of optimizer {name!r} (valid: {', '.join(valid)})")
    tasks = learner_args.pop("tasks", None)
    learner = learner_class(catalog, adapters, tasks, **learner_args)
    learned = learner.coefficients.merge_method
    if learned != method:
        raise ConfigError(f"optimizer {name}: with these settings it learns {learned} weights; set method: {learned}")
    data = CatalogDataModule(catalog, list(learner.task_specs), **data_args)
    trainer_args.setdefault("callbacks", [CoefficientLogger()])
    trainer_args.setdefault("limit_val_batches", 0)
    trainer_args.setdefault("default_root_dir", ".")
    Trainer(**trainer_args).fit(learner, datamodule=data)
    spec = learner.merge_spec()
    record = {
        "name": name,
        "params": params,
        "steps": learner.global_step,
        "groups": learner.coefficients.group_names,
        "values": learner.coefficients.values(),
    }
    return spec["method_params"], record


def _accepted(learner_class: type) -> set[str]:
    """Init arguments a learner takes, its base class's included."""
    names: set[str] = set()
    for cls in learner_class.__mro__:
        if "__init__" in vars(cls) and cls.__module__.startswith("lmerge."):
            names |= {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}
    return names - {"catalog", "adapters"}
