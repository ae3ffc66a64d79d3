"""Learners under Lightning's FSDP (``--trainer.strategy fsdp``): the frozen base model is sharded
across the ranks, one FSDP unit per block the model declares unsplittable (its decoder layers), and
the coefficients stay out of FSDP: whole on every rank (replicated), their gradients averaged across
the ranks before each optimizer step, as DDP averages them. So every rank reads the same coefficients
at any time (logging, export), and the merged modules gather them once per forward, not per unit.
Under any other strategy these functions do nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import nn


def shard_base_model(strategy: Strategy, model: nn.Module, coefficients: nn.Module) -> None:
    """Prepare an FSDP strategy for a learner whose fused ``model`` it is about to wrap: keep
    ``coefficients`` out of FSDP's flat parameters (and put them on the rank's device, since FSDP
    moves only what it manages), and, unless the user chose an ``auto_wrap_policy``, make each of the
    model's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``) a unit, so that one block's weights at a
    time are gathered, not the whole model's. Call it from ``configure_model``."""
    if not isinstance(strategy, FSDPStrategy):
        return
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs = strategy.kwargs
    key = "ignored_modules" if "ignored_modules" in kwargs else "ignored_states"
    kwargs[key] = [*(kwargs.get(key) or []), coefficients]
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(module) for module in model.modules() if type(module).__name__ in blocks}
    if "auto_wrap_policy" not in kwargs and classes:
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
    coefficients.to(strategy.root_device)


def average_replicated_gradients(strategy: Strategy, coefficients: nn.Module) -> None:
    """Under FSDP with several ranks, replace the coefficients' gradients by their mean over the ranks
    (FSDP reduces only what it shards). Call it once per optimizer step, after the backward."""
    if not isinstance(strategy, FSDPStrategy) or strategy.world_size == 1:
        return
    for parameter in coefficients.parameters():
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= strategy.world_size


def call_through_wrapper(strategy: Strategy, learner: nn.Module, method: str, *args: Any) -> Any:
    """``learner.<method>(*args)``, routed under FSDP through the wrapped model's forward as Lightning
    routes its steps, so that FSDP gathers the shards (a forward outside the steps, e.g. the baselines
    before training, would otherwise meet the root's weights sharded); a direct call otherwise."""
    if isinstance(strategy, FSDPStrategy) and strategy.model is not learner:
        return strategy._forward_redirection(strategy.model, learner, method, *args)
    return getattr(learner, method)(*args)
