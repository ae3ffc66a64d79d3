"""``dare_ties``: DARE drop and rescale, then TIES sign election and disjoint mean."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._dare import DareMask
from lmerge.methods._params import check_int, check_number, check_range, module_lambda
from lmerge.methods._signs import disjoint_mean_
from lmerge.methods._task_vectors import TaskVectors
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_range(params, "drop_rate", 0.0, 1.0, high_open=True)
    check_int(params, "seed")
    check_number(params, "lambda")


@register(
    "dare_ties",
    kind=Kind.DENSE,
    defaults={"drop_rate": 0.9, "seed": 42, "lambda": 1.0},
    validate=_validate,
    lambda_param="lambda",
)
def dare_ties(deltas: TaskVectors, params: dict[str, Any], ctx: ModuleContext) -> torch.Tensor:
    """DARE-TIES: drop and rescale at drop_rate, elect signs, disjoint mean, times lambda."""
    mask = DareMask(params["drop_rate"], params["seed"], ctx.key)
    merged = deltas.merge(lambda block, start: disjoint_mean_(mask.apply_(block, start)))
    # Sign election and the disjoint mean commute with the positive rescale 1 / (1 - drop_rate).
    return merged.mul_(module_lambda(params, ctx, "lambda") / (1.0 - params["drop_rate"]))
