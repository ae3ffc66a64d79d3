"""AdaMerging (Yang et al., 2024): minimize the entropy of each task's predictions on
unlabeled inputs, with coefficients clamped to [0, 1] and initialized at 0.3."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lmerge.errors import ConfigError
from lmerge.learn.base import Batch, MergeLearner


class AdaMerging(MergeLearner):
    """Entropy minimization over unlabeled inputs (labels in the batches are never read)."""

    objective_name = "entropy"

    def __init__(
        self,
        catalog: str,
        adapters: list[str],
        tasks: list[str] | None = None,
        granularity: Literal["task_wise", "layer_wise", "rank_wise"] = "layer_wise",
        init: float | list[float] = 0.3,
        lr: float = 1e-3,
        diversity_weight: float = 0.0,
        distillation_weight: float = 0.0,
        distribution_max_classes: int = 32,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML (task name -> adapter and data).
            adapters: The adapters to merge: catalog task names or adapter directories.
            tasks: The tasks whose inputs drive the objective; default: the adapters that are catalog tasks.
            granularity: ``task_wise``: one coefficient per adapter; ``layer_wise`` (the paper's best): per layer;
                ``rank_wise``: per rank direction of each module (see ``MergeLearner``).
            init: Initial coefficient (the paper: 0.3).
            lr: Adam learning rate (the paper: 1e-3).
            diversity_weight: Information-maximization weight (0 = the paper's objective): also keep the
                batch-mean prediction close to the task's training class prior when known, else maximize its entropy,
                against the collapse to one class that entropy minimization alone can reach.
            distillation_weight: Weight of ``KL(own adapter || merged)`` between the predictive distributions the
                entropy is taken of, each task's own adapter alone on the same inputs against the merge (0 = the
                paper's objective): a safeguard that keeps every task near what its adapter predicts, from the
                same unlabeled inputs.
            distribution_max_classes: Log each task's predicted-class distribution (one scalar per class and
                step) up to this many classes; above it (e.g. a vocabulary), a summary: the entropy of the
                batch-mean prediction and the mass of its top 1 and top 5 classes.
            **kwargs: Shared learner options (see ``MergeLearner``), e.g. ``early_stopping_patience``.
        """
        kwargs.setdefault("parametrization", "clamp")
        super().__init__(catalog, adapters, tasks, granularity=granularity, init=init, lr=lr, **kwargs)
        if distribution_max_classes < 0:
            raise ConfigError(f"model.distribution_max_classes: must be >= 0, got {distribution_max_classes}")
        for name, weight in (("diversity_weight", diversity_weight), ("distillation_weight", distillation_weight)):
            if not weight >= 0:
                raise ConfigError(f"model.{name}: must be >= 0, got {weight}")
        self.diversity_weight = diversity_weight
        self.distillation_weight = distillation_weight
        self.priors: dict[str, torch.Tensor] = {}

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        for task in self.task_specs:
            module = datamodule.tasks.get(task) if datamodule is not None else None
            # A class prior is comparable with predictions over class ids (not with answer tokens).
            if module is not None and not self.kind.text_answers and module.has_split("train"):
                self.priors[task] = module.class_prior().to(self.device)

    def task_objective(self, task: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        probs = self.kind.predict(logits, batch)
        term = entropy(probs).mean()
        mean = probs.mean(0)
        self._log_distribution(task, mean.detach())
        if self.diversity_weight:
            prior = self.priors.get(task)
            if prior is not None and len(prior) == len(mean):
                spread = kl_divergence(mean, prior)
            else:
                spread = -entropy(mean)
            term = term + self.diversity_weight * spread
        if self.distillation_weight:
            own = self.kind.predict(self.own_adapter_logits(task, batch), batch)
            term = term + self.distillation_weight * kl_divergence(own, probs).mean()
        return term

    def _log_distribution(self, task: str, mean: torch.Tensor) -> None:
        """The batch-mean prediction, so that a collapse to one class shows in TensorBoard."""
        if len(mean) <= self.hparams.distribution_max_classes:
            for index, share in enumerate(mean):  # tensors: no wait for an accelerator at every step
                self.log(f"predicted_distribution/{task}/{index}", share)
            return
        # One scalar per class of a vocabulary would be tens of thousands of series per step.
        top = mean.topk(min(5, len(mean))).values
        self.log(f"predicted_distribution/{task}/entropy", entropy(mean))
        self.log(f"predicted_distribution/{task}/top1_mass", top[0])
        self.log(f"predicted_distribution/{task}/top5_mass", top.sum())


def kl_divergence(target: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``KL(target || probs)`` (nats) of each row."""
    return (target * (target.clamp_min(1e-12).log() - probs.clamp_min(1e-12).log())).sum(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of ``probs``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
