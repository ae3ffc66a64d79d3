"""Deterministic evaluation subsets, cached on disk, and the namespace that keeps their results apart.

```yaml
eval_subset:
  enabled: true       # default true once the block is given
  seed: 0
  shuffle: true       # false: the first rows (per class when stratified)
  stratified: true    # proportional per label, at least one per class where possible
  max_samples: 1000   # null: the whole split
  per_task:
    asr: {max_samples: 200}
```

Everything here is a pure function of the labels and the config (seeded numpy generators, SHA-256
digests, never Python's salted ``hash()``), so the same indices come out in every process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmerge.errors import ConfigError
from lmerge.outputs import safe_component, write_json_atomic

_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "seed": 0,
    "shuffle": True,
    "stratified": True,
    "max_samples": None,
    "per_task": {},
}


def parse_eval_subset(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checked ``eval_subset`` config with defaults filled in; None or ``{}`` is disabled."""
    if not config:
        return {**_DEFAULTS, "enabled": False}
    if not isinstance(config, Mapping):
        raise ConfigError(f"eval_subset: expected a mapping, got {config!r}")
    extra = sorted(set(config) - set(_DEFAULTS))
    if extra:
        raise ConfigError(f"eval_subset: unknown key {extra[0]!r}; valid: {', '.join(_DEFAULTS)}")
    out = {**_DEFAULTS, **config}
    for key in ("enabled", "shuffle", "stratified"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"eval_subset.{key}: expected true or false, got {out[key]!r}")
    if not _is_int(out["seed"]):
        raise ConfigError(f"eval_subset.seed: expected an integer, got {out['seed']!r}")
    _check_max(out["max_samples"], "eval_subset.max_samples")
    per_task = out["per_task"] or {}
    if not isinstance(per_task, Mapping):
        raise ConfigError("eval_subset.per_task: expected a mapping of task name -> {max_samples}")
    for task, block in per_task.items():
        if not isinstance(block, Mapping) or set(block) != {"max_samples"}:
            raise ConfigError(f"eval_subset.per_task.{task}: expected {{max_samples: N}}, got {block!r}")
        _check_max(block["max_samples"], f"eval_subset.per_task.{task}.max_samples")
    # Sorted, so that the digest of the config does not depend on the order it was written in.
    out["per_task"] = {str(t): {"max_samples": per_task[t]["max_samples"]} for t in sorted(per_task, key=str)}
    return out


def max_samples_for(config: Mapping[str, Any] | None, task: str) -> int | None:
    """How many examples ``task`` keeps: its ``per_task`` override, else ``max_samples``;
    None (everything) when the subset is disabled."""
    config = parse_eval_subset(config)
    if not config["enabled"]:
        return None
    override = config["per_task"].get(task)
    return override["max_samples"] if override else config["max_samples"]


def subset_namespace(config: Mapping[str, Any] | None) -> str:
    """``full`` when the config keeps every example, else ``subset_<8 hex>`` from its digest, so
    results on different subsets never share a file."""
    config = parse_eval_subset(config)
    limits = [config["max_samples"], *(block["max_samples"] for block in config["per_task"].values())]
    if not config["enabled"] or all(limit is None for limit in limits):
        return "full"
    return f"subset_{_digest(config)[:8]}"


def select_subset(
    labels: Sequence[Hashable],
    max_samples: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    stratified: bool = True,
) -> list[int]:
    """Sorted indices of at most ``max_samples`` examples.

    Stratified: each label keeps a share proportional to its count (largest remainders round),
    at least one per label when ``max_samples`` covers every label, else one for each of the
    most frequent labels. Shuffle picks the rows of each share with ``numpy.random.default_rng(seed)``;
    without it, the first rows.
    """
    n = len(labels)
    if max_samples >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    if not stratified:
        picked = rng.permutation(n)[:max_samples] if shuffle else np.arange(max_samples)
        return sorted(int(i) for i in picked)
    groups: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    members = list(groups.values())
    quotas = _quotas([len(m) for m in members], max_samples)
    picked = []
    for rows, quota in zip(members, quotas):
        chosen = rng.permutation(rows)[:quota] if shuffle else rows[:quota]
        picked.extend(int(i) for i in chosen)
    return sorted(picked)


def subset_indices(
    labels: Sequence[Hashable],
    *,
    task: str,
    split: str,
    config: Mapping[str, Any] | None,
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
) -> list[int] | None:
    """The eval-subset indices of ``task``'s ``split`` (whose labels, class ids or texts, are
    ``labels``), or None when the whole split is used.

    With ``cache_dir``, indices are read from ``<cache_dir>/<task>_<split>_<8 hex>.json`` (the hex
    digests the config, task and split) when that file was made for data of the same size and
    ``fingerprint`` (default: a digest of the labels), and written there otherwise.
    """
    parsed = parse_eval_subset(config)
    limit = max_samples_for(parsed, task)
    if limit is None or limit >= len(labels):
        return None
    options = {"seed": parsed["seed"], "shuffle": parsed["shuffle"], "stratified": parsed["stratified"]}
    if cache_dir is None:
        return select_subset(labels, limit, **options)
    fingerprint = fingerprint or _digest(list(labels))[:16]
    key = _digest({"config": parsed, "task": task, "split": split})[:8]
    path = Path(cache_dir) / f"{safe_component(task, 'task name')}_{safe_component(split, 'split')}_{key}.json"
    cached = _read(path)
    if cached and cached.get("size") == len(labels) and cached.get("fingerprint") == fingerprint:
        return [int(i) for i in cached["indices"]]
    indices = select_subset(labels, limit, **options)
    record = {"task": task, "split": split, "size": len(labels), "fingerprint": fingerprint, "config": parsed}
    write_json_atomic(path, {**record, "indices": indices}, root=cache_dir)
    return indices


def _quotas(counts: list[int], k: int) -> list[int]:
    """Per-class sample counts summing to ``k`` (< sum of counts), proportional to ``counts``."""
    n = sum(counts)
    if k < len(counts):
        # Too few samples for one per class: one each for the k largest (earliest on ties).
        order = sorted(range(len(counts)), key=lambda j: -counts[j])[:k]
        return [int(j in order) for j in range(len(counts))]
    # Exact shares are k*c/n; compare remainders as integers (k*c - q*n) so no float rounding decides.
    # Ties go to the larger class (a one-sample change is the smaller relative error there), then
    # to the label seen first.
    quotas = [max(1, k * c // n) for c in counts]
    classes = range(len(counts))
    while sum(quotas) > k:  # the minimum of one pushed us over: take from the most over-served
        j = max((j for j in classes if quotas[j] > 1), key=lambda j: (quotas[j] * n - k * counts[j], counts[j], -j))
        quotas[j] -= 1
    while sum(quotas) < k:  # largest remainders first
        j = max(
            (j for j in classes if quotas[j] < counts[j]), key=lambda j: (k * counts[j] - quotas[j] * n, counts[j], -j)
        )
        quotas[j] += 1
    return quotas


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or damaged: recompute and overwrite
    return data if isinstance(data, dict) and isinstance(data.get("indices"), list) else None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_max(value: Any, where: str) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise ConfigError(f"{where}: expected a positive integer or null, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
