"""Why tasks interfere, measured on the adapters themselves: each task vector's size relative to
the base weights, per layer and overall, and the cosine similarity of every pair of task vectors.

Nothing dense is built: with ``delta_i = s_i B_i A_i`` of one module,
``<delta_i, delta_j> = sum((B_i^T B_j) * (A_i A_j^T))`` (``s`` folded into ``B``), an ``r_i x r_j``
product, and a layer's (or the model's) inner product is the sum over its modules: the task
vector of a layer is all its modules' deltas together. The base weights' Frobenius norms are read
from the base model's safetensors files, one tensor at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lmerge.adapters.align import align_keys
from lmerge.adapters.lora import LoraAdapter
from lmerge.layers import layer_index

ALL = "all"
"""The name of the whole model in :class:`TaskVectorStats`."""


@dataclass
class TaskVectorStats:
    """Inner products of the task vectors per layer (and over the whole model), and the base
    weights' squared Frobenius norms over the same modules."""

    names: list[str]
    """The adapters, in order."""
    layers: list[str] = field(default_factory=list)
    """``layer.<i>`` in order, then ``other`` for modules outside numbered layers if any."""
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    """Layer (or ``all``) -> [n, n] float64 ``<delta_i, delta_j>``."""
    base_squared: dict[str, float | None] = field(default_factory=dict)
    """Layer (or ``all``) -> the base weights' squared Frobenius norm; None when some base weight
    of the layer was not found."""

    def cosine(self, layer: str = ALL) -> list[list[float]]:
        """[n][n] cosine similarities of the task vectors of ``layer`` (0 where a vector is zero)."""
        gram = self.gram[layer]
        norms = gram.diagonal().clamp_min(0).sqrt()
        scale = torch.outer(norms, norms)
        return torch.where(scale > 0, gram / scale.clamp_min(1e-300), torch.zeros_like(gram)).tolist()

    def norms(self, layer: str = ALL) -> list[float]:
        """Each task vector's Frobenius norm over ``layer``."""
        return self.gram[layer].diagonal().clamp_min(0).sqrt().tolist()

    def relative_sizes(self, layer: str = ALL) -> list[float] | None:
        """Each task vector's norm over ``layer`` divided by the base weights' norm there (None when
        the base weights are unknown)."""
        base = self.base_squared.get(layer)
        if not base:
            return None
        return [norm / math.sqrt(base) for norm in self.norms(layer)]

    def to_dict(self) -> dict[str, Any]:
        layers = [ALL, *self.layers]
        return {
            "adapters": self.names,
            "cosine": {layer: self.cosine(layer) for layer in layers},
            "relative_size": {layer: self.relative_sizes(layer) for layer in layers},
            "norm": {layer: self.norms(layer) for layer in layers},
        }


def task_vector_stats(adapters: list[LoraAdapter], base_model: str | Path | None = None) -> TaskVectorStats:
    """The statistics of ``adapters``' task vectors over the modules they all adapt; sizes
    relative to the base weights when ``base_model`` is a directory with safetensors weights."""
    keys, _ = align_keys(adapters, "common")
    base = BaseWeights(base_model) if base_model else None
    n = len(adapters)
    stats = TaskVectorStats([a.name for a in adapters])
    base_sums: dict[str, float] = {}
    missing: set[str] = set()
    for key in keys:
        index = layer_index(key)
        layer = f"layer.{index}" if index is not None else "other"
        scaled = []
        for adapter in adapters:
            A, B = adapter.factors(key)
            scaled.append((A.double(), B.double() * adapter.scaling(key)))
        gram = torch.zeros(n, n, dtype=torch.float64)
        for i, (A_i, B_i) in enumerate(scaled):
            for j in range(i, n):
                A_j, B_j = scaled[j]
                gram[i, j] = gram[j, i] = ((B_i.T @ B_j) * (A_i @ A_j.T)).sum()
        weight = base.squared_norm(key) if base else None
        for name in (layer, ALL):
            stats.gram[name] = stats.gram.get(name, torch.zeros(n, n, dtype=torch.float64)) + gram
            if weight is None:
                missing.add(name)
            else:
                base_sums[name] = base_sums.get(name, 0.0) + weight
    numbered = sorted((name for name in stats.gram if name.startswith("layer.")), key=lambda s: int(s[6:]))
    stats.layers = numbered + (["other"] if "other" in stats.gram else [])
    stats.base_squared = {name: None if name in missing else base_sums[name] for name in stats.gram}
    return stats


class BaseWeights:
    """The base model's weights on disk (``model.safetensors`` or its sharded index), read one
    tensor at a time; a module key is matched to the checkpoint's name for its weight whatever
    prefix either side carries (``bert.encoder...`` against ``encoder...``)."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.files: dict[str, Path] = {}
        index = self.root / "model.safetensors.index.json"
        single = self.root / "model.safetensors"
        try:
            if index.is_file():
                mapping = json.loads(index.read_text()).get("weight_map", {})
                self.files = {name: self.root / file for name, file in mapping.items()}
            elif single.is_file():
                with safe_open(str(single), framework="pt") as handle:
                    self.files = dict.fromkeys(handle.keys(), single)
        except (OSError, ValueError, SafetensorError):
            self.files = {}  # unreadable weights: sizes are left out, the similarities still hold

    def squared_norm(self, key: str) -> float | None:
        """``||W||_F^2`` of module ``key``'s weight, or None when the checkpoint has no match."""
        name = self._name(key)
        if name is None:
            return None
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return float(handle.get_tensor(name).double().square().sum())

    def _name(self, key: str) -> str | None:
        parts = key.split(".")
        for start in range(len(parts)):
            candidate = ".".join(parts[start:]) + ".weight"
            if candidate in self.files:
                return candidate
        ending = f".{key}.weight"
        matches = [name for name in self.files if name.endswith(ending)]
        return matches[0] if len(matches) == 1 else None
