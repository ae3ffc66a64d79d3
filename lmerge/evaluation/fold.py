"""Fold weight updates into a loaded model once, so evaluation runs at the base model's
speed, and restore the original weights afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmerge.errors import AdapterError


class ModuleUpdate(Protocol):
    """One module's weight update, as the merge engine yields it."""

    key: str

    def dense(self) -> torch.Tensor: ...


class WeightFolder:
    """Adds merged modules into ``model``'s linear weights, keeping the originals of the
    touched modules only (not a copy of the model) so :meth:`restore` is exact."""

    def __init__(self, model: nn.Module, fan_in_fan_out: bool = False) -> None:
        self.model = model
        self.fan_in_fan_out = fan_in_fan_out
        self.originals: dict[str, torch.Tensor] = {}

    def add(self, module: ModuleUpdate) -> None:
        """Add one merged module's update (a writer for the merge engine)."""
        self.add_delta(module.key, module.dense())

    def add_delta(self, key: str, delta: torch.Tensor) -> None:
        try:
            weight = self.model.get_submodule(key).weight
        except AttributeError:
            raise AdapterError(f"the model has no linear module {key!r} that the adapters target") from None
        if self.fan_in_fan_out:
            delta = delta.T
        if key not in self.originals:
            self.originals[key] = weight.detach().clone()
        with torch.no_grad():
            weight += delta.to(device=weight.device, dtype=weight.dtype)

    def write(self, out: Path) -> dict[str, Any]:
        return {}

    def restore(self) -> None:
        """Put every touched weight back as it was."""
        with torch.no_grad():
            for key, original in self.originals.items():
                self.model.get_submodule(key).weight.copy_(original)
        self.originals.clear()
