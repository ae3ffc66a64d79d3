"""Label-frequency sampling for training loaders, and the ``sampling`` config that picks it per task.

```yaml
sampling:
  default: {enabled: true, strategy: sqrt_inverse}
  per_task:
    intent: {strategy: balanced}
    asr: {enabled: false}
```
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import WeightedRandomSampler

from lmerge.errors import ConfigError, unknown_name

STRATEGIES = ("uniform", "inverse", "sqrt_inverse", "balanced", "none")
_KEYS = ("enabled", "strategy")


def sampling_weights(labels: Sequence[Hashable], strategy: str) -> torch.Tensor:
    """One float64 weight per example, from how often its label occurs (``count(y)``):

    - ``none`` and ``uniform``: 1 for every example (uniform over examples);
    - ``inverse``: ``1 / count(y)``, so every class is drawn equally often;
    - ``sqrt_inverse``: ``1 / sqrt(count(y))``, between uniform and inverse;
    - ``balanced``: ``1 / (n_classes * count(y))``: each class holds total mass ``1 / n_classes``
      and the weights sum to 1 (draws as ``inverse`` does; the scale differs).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(unknown_name("sampling strategy", strategy, list(STRATEGIES)))
    counts = Counter(labels)
    count = torch.tensor([counts[y] for y in labels], dtype=torch.float64)
    if strategy in ("none", "uniform"):
        return torch.ones_like(count)
    if strategy == "inverse":
        return 1.0 / count
    if strategy == "sqrt_inverse":
        return 1.0 / count.sqrt()
    return 1.0 / (len(counts) * count)


def make_sampler(
    labels: Sequence[Hashable], strategy: str, seed: int = 0, num_samples: int | None = None
) -> WeightedRandomSampler | None:
    """A seeded sampler drawing ``num_samples`` (default: one epoch's worth) examples with
    replacement by :func:`sampling_weights`; None for ``none`` (plain shuffling instead)."""
    weights = sampling_weights(labels, strategy)
    if strategy == "none":
        return None
    if not len(weights):
        raise ConfigError(f"sampling {strategy!r}: the training split is empty")
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or len(weights), replacement=True, generator=generator)


def sampling_strategy(config: Mapping[str, Any] | None, task: str) -> str:
    """The strategy for ``task`` from a ``sampling`` config; ``none`` when sampling is off for it.

    ``per_task.<task>`` overrides ``default`` key by key. Within either block, naming a
    ``strategy`` without ``enabled`` means enabled; ``enabled: true`` needs a strategy from one
    of the two blocks. No config, or neither block enabled, gives ``none``.
    """
    if config is None:
        return "none"
    if not isinstance(config, Mapping):
        raise ConfigError(f"sampling: expected a mapping with default/per_task, got {config!r}")
    extra = sorted(set(config) - {"default", "per_task"})
    if extra:
        raise ConfigError(f"sampling: unknown key {extra[0]!r}; valid: default, per_task")
    per_task = config.get("per_task") or {}
    if not isinstance(per_task, Mapping):
        raise ConfigError("sampling.per_task: expected a mapping of task name -> {enabled, strategy}")
    # Check every task's block, not only this one's, so a typo fails whichever task asks first.
    blocks = {name: _block(block, f"sampling.per_task.{name}") for name, block in per_task.items()}
    merged = {**_block(config.get("default"), "sampling.default"), **blocks.get(task, {})}
    if not merged.get("enabled", False):
        return "none"
    if "strategy" not in merged:
        raise ConfigError(f"sampling: enabled for task {task} but no strategy (one of {', '.join(STRATEGIES)})")
    return merged["strategy"]


def _block(block: Any, where: str) -> dict[str, Any]:
    """A checked ``{enabled, strategy}`` block, with ``enabled`` implied by a named strategy."""
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: expected a mapping with enabled/strategy, got {block!r}")
    extra = sorted(set(block) - set(_KEYS))
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; valid: {', '.join(_KEYS)}")
    out = dict(block)
    if "enabled" in out and not isinstance(out["enabled"], bool):
        raise ConfigError(f"{where}.enabled: expected true or false, got {out['enabled']!r}")
    if "strategy" in out:
        if out["strategy"] not in STRATEGIES:
            raise ConfigError(f"{where}.strategy: {unknown_name('strategy', out['strategy'], list(STRATEGIES))}")
        out.setdefault("enabled", True)
    return out
