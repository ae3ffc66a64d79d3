"""Each task's loss under its own adapter alone, on the training split: the yardstick that
normalized and regret objectives divide by."""

from __future__ import annotations

import torch

from lmerge.learn.base import MergeLearner
from lmerge.learn.sharding import call_through_wrapper


def baseline_losses(learner: MergeLearner, batches: int) -> dict[str, float]:
    """Mean task loss of each task's own adapter (one-hot coefficients) over ``batches`` batches."""
    datamodule = learner.trainer.datamodule
    losses = {}
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
                total += float(learner.kind.loss(logits, batch))
                count += 1
        losses[task] = total / max(count, 1)
    if learner.logger is not None:
        learner.logger.log_metrics({f"baseline/{task}": loss for task, loss in losses.items()}, step=0)
    return losses
