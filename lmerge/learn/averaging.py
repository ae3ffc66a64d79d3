"""``CoefficientAverage``: an exponential moving average of a learner's coefficient parameters
(Polyak averaging), which validation reads in place of the trained ones (``coefficient_average``
of :class:`~lmerge.learn.base.MergeLearner`)."""

from __future__ import annotations

import torch
from torch import nn


class CoefficientAverage:
    """The average of a module's parameters over the optimizer steps, with ``decay``; it can stand
    in for them (:meth:`swap_in`) while training keeps the trained ones (:attr:`trained`). Each call
    names the module: a learner may replace its coefficients module after building (hierarchical
    SuperMerge)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.values: list[torch.Tensor] | None = None
        """The average, once a step has been taken (or a checkpoint's)."""
        self.trained: list[torch.Tensor] | None = None
        """The trained parameters while the average stands in for them."""

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold ``module``'s parameters as they are after an optimizer step into the average (the
        first step's start it)."""
        params = [p.detach() for p in module.parameters()]
        if self.values is None:
            self.values = [p.clone() for p in params]
            return
        for average, param in zip(self._on_device(module), params, strict=True):
            average.lerp_(param, 1 - self.decay)

    def swap_in(self, module: nn.Module) -> None:
        """Set ``module``'s parameters to the average, keeping the trained ones (no-op before any step)."""
        if self.values is not None:
            self.trained = [p.detach().clone() for p in module.parameters()]
            _set(module, self._on_device(module))

    def swap_back(self, module: nn.Module) -> None:
        """Set ``module``'s parameters back to the trained ones after :meth:`swap_in`."""
        if self.trained is not None:
            _set(module, self.trained)
            self.trained = None

    def apply(self, module: nn.Module) -> None:
        """Set ``module``'s parameters to the average for good (the learned merge)."""
        if self.values is not None:
            _set(module, self._on_device(module))

    def _on_device(self, module: nn.Module) -> list[torch.Tensor]:
        # A checkpoint's average is loaded before the strategy moves the module to its device.
        params = list(module.parameters())
        self.values = [a.to(p.device, p.dtype) for a, p in zip(self.values, params, strict=True)]
        return self.values


@torch.no_grad()
def _set(module: nn.Module, values: list[torch.Tensor]) -> None:
    for param, value in zip(module.parameters(), values, strict=True):
        param.copy_(value)
