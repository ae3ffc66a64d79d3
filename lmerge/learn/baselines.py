"""Each task's loss under its own adapter alone, on the training split: the yardstick that
normalized and regret objectives divide by."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmerge.learn.base import MergeLearner
from lmerge.learn.sharding import call_through_wrapper


def baseline_losses(learner: MergeLearner, batches: int) -> dict[str, float]:
    """Mean task loss of each task's own adapter (one-hot coefficients) over ``batches`` batches."""
    return _own_adapter_means(learner, batches, lambda logits, batch: float(learner.kind.loss(logits, batch)))


def prediction_entropies(learner: MergeLearner, batches: int) -> dict[str, float]:
    """Mean entropy of each task's own adapter's predictions (``kind.predict``: an example's class
    distribution, or a language model's at the answer's start) over ``batches`` batches: the loss
    of the own adapter against its own predictions, which distillation objectives compare with.
    Reads no label."""

    def entropy(logits: torch.Tensor, batch: dict) -> float:
        probs = learner.kind.predict(logits, batch)
        return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())

    return _own_adapter_means(learner, batches, entropy)


def _own_adapter_means(
    learner: MergeLearner, batches: int, measure: Callable[[torch.Tensor, dict], float]
) -> dict[str, float]:
    """Per task, the mean of ``measure(logits, batch)`` of its own adapter alone over the first
    ``batches`` batches of the fit split; logged as ``baseline/<task>``."""
    datamodule = learner.trainer.datamodule
    means = {}
    for task in learner.task_specs:
        loader = datamodule.tasks[task].dataloader(datamodule.fit_split, batch_size=datamodule.fit_batch_size)
        total, count = 0.0, 0
        # Under the training steps' precision (autocast with bf16-mixed), so a baseline compares like with like.
        with torch.no_grad(), learner.own_adapter_alone(task), learner.trainer.precision_plugin.forward_context():
            for index, batch in enumerate(loader):
                if index >= batches:
                    break
                batch = learner.transfer_batch_to_device(batch, learner.device, 0)
                logits = call_through_wrapper(learner.trainer.strategy, learner, "task_logits", task, batch)
                total += measure(logits, batch)
                count += 1
        means[task] = total / max(count, 1)
    if learner.logger is not None:
        learner.logger.log_metrics({f"baseline/{task}": value for task, value in means.items()}, step=0)
    return means
