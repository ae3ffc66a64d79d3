"""``dare``: DARE (random drop and rescale) of each task vector, then their mean."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._dare import DareMask
from lmerge.methods._params import check_int, check_number, check_range, module_lambda
from lmerge.methods._task_vectors import TaskVectors
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_range(params, "drop_rate", 0.0, 1.0, high_open=True)
    check_int(params, "seed")
    check_number(params, "lambda")


@register(
    "dare",
    kind=Kind.DENSE,
    defaults={"drop_rate": 0.9, "seed": 42, "lambda": 1.0},
    validate=_validate,
    lambda_param="lambda",
)
def dare(deltas: TaskVectors, params: dict[str, Any], ctx: ModuleContext) -> torch.Tensor:
    """DARE: drop entries at drop_rate and rescale the rest, mean of the task vectors, times lambda."""
    mask = DareMask(params["drop_rate"], params["seed"], ctx.key)
    merged = deltas.merge(lambda block, start: mask.apply_(block, start).sum(dim=0))
    # The rescale 1 / (1 - drop_rate) and the mean's 1 / n are linear: applied once, at the end.
    return merged.mul_(module_lambda(params, ctx, "lambda") / (deltas.n * (1.0 - params["drop_rate"])))
