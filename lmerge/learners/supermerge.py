"""SuperMerge: supervised, signed coefficients (tanh) learned on validation data."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lmerge.errors import ConfigError
from lmerge.learners.base import Batch, MergeLearner
from lmerge.learners.losses import TASK_LOSSES


class SuperMerge(MergeLearner):
    """Minimize the tasks' supervised loss with coefficients in (-1, 1), task- or layer-wise."""

    objective_name = "loss"

    def __init__(
        self,
        catalog: str,
        adapters: list[str],
        tasks: list[str] | None = None,
        variant: Literal["task_wise", "layer_wise"] = "layer_wise",
        coefficient_parameterization: Literal["tanh_alpha"] = "tanh_alpha",
        init: float | list[float] = 0.3,
        lr: float = 1e-2,
        normalize_coefficients: bool = False,
        split: Literal["validation"] = "validation",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            adapters: The adapters to merge: catalog task names or adapter directories.
            tasks: The tasks trained on; default: the adapters that are catalog tasks.
            variant: ``task_wise`` or ``layer_wise`` (the paper's per-layer formulation).
            coefficient_parameterization: ``tanh_alpha``: coefficient = tanh(alpha), signed.
            init: Initial coefficient value.
            lr: Adam learning rate.
            normalize_coefficients: Kept false, as in the paper: the exported spec does not normalize.
            split: SuperMerge selects on validation data.
            **kwargs: Shared learner options (see ``MergeLearner``).
        """
        if normalize_coefficients:
            raise ConfigError("model.normalize_coefficients: SuperMerge learns unnormalized signed coefficients")
        super().__init__(
            catalog, adapters, tasks, granularity=variant, parametrization="tanh", init=init, lr=lr, **kwargs
        )

    def on_fit_start(self) -> None:
        if self.trainer.datamodule.fit_split != self.hparams.split:
            raise ConfigError(f"data.fit_split must be {self.hparams.split!r} for SuperMerge")

    def task_objective(self, task: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        # Per-task heads differ in their number of classes, so the loss is computed here; for a
        # causal LM it is the same token-normalized CE the model's own ``loss`` returns.
        return TASK_LOSSES[self.kind](logits, batch)
