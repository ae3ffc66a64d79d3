"""Regret smooth-max (``regret_smoothmax``): convex coefficients (softmax) that minimize a
smooth maximum of the tasks' relative regrets against their own adapters: the loss each task's
labels give the merge beyond what they give its own adapter, or (``targets: adapters``) how far the
merge's predictions are from its own adapter's."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lmerge.errors import ConfigError
from lmerge.learn.base import Batch, MergeLearner
from lmerge.learn.baselines import baseline_losses, prediction_entropies


class RegretSmoothMax(MergeLearner):
    """Objective ``tau * logsumexp(regret_t / tau)``, ``regret_t = (CE_t - base_t) / (base_t + eps)``
    (``targets: labels``) or ``KL(own_t || merged) / (H_t + eps)`` (``targets: adapters``)."""

    objective_name = "regret"

    def __init__(
        self,
        catalog: str,
        adapters: list[str],
        tasks: list[str] | None = None,
        tau: float = 0.1,
        regret_eps: float = 1e-6,
        baseline_batches: int = 32,
        lr: float = 5e-2,
        targets: Literal["labels", "adapters"] = "labels",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            adapters: The adapters to merge: catalog task names or adapter directories.
            tasks: The tasks trained on; default: the adapters that are catalog tasks.
            tau: Temperature of the smooth maximum (-> 0: the worst task alone; large: the mean).
            regret_eps: Added to each baseline CE in the regret's denominator.
            baseline_batches: Batches per task that estimate each task's own-adapter baseline.
            lr: Adam learning rate of the softmax logits.
            targets: What a task's regret measures: ``labels``, the cross-entropy against its labels beyond
                its own adapter's, relative to that CE; ``adapters``, ``KL(own adapter || merged)`` on the same
                inputs, relative to the mean entropy ``H_t`` of the own adapter's predictions (its loss
                against itself): distillation, no label read, so any split's inputs serve, the train split's
                included.
            **kwargs: Shared learner options (see ``MergeLearner``); the coefficients are global (task-wise)
                unless ``granularity`` says otherwise (``rank_wise``: softmax over adapters per layer, plus an
                offset per rank direction of each module).
        """
        kwargs.setdefault("granularity", "task_wise")
        kwargs["parametrization"] = "softmax"
        kwargs.setdefault("init", 1.0 / len(adapters))
        if targets not in ("labels", "adapters"):
            raise ConfigError(f"model.targets: labels or adapters, got {targets!r}")
        super().__init__(catalog, adapters, tasks, lr=lr, **kwargs)
        self.baselines: dict[str, float] = {}

    def on_fit_start(self) -> None:
        baselines = prediction_entropies if self.hparams.targets == "adapters" else baseline_losses
        self.baselines = baselines(self, self.hparams.baseline_batches)

    def task_objective(self, task: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        base = self.baselines[task]
        if self.hparams.targets == "adapters":
            excess = self.kind.distillation_loss(logits, self.own_adapter_logits(task, batch), batch)
        else:
            excess = self.kind.loss(logits, batch) - base
        return excess / (base + self.hparams.regret_eps)

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        tau = self.hparams.tau
        return tau * torch.logsumexp(torch.stack(list(terms.values())) / tau, 0)
