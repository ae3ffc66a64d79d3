"""``dare``: DARE (random drop and rescale) of each task vector, then their mean."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._ops import check_int, check_number, check_range, module_lambda
from lmerge.methods._ops import dare as drop_and_rescale
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
def dare(deltas: torch.Tensor, params: dict[str, Any], ctx: ModuleContext) -> torch.Tensor:
    """DARE: drop entries at drop_rate and rescale the rest, mean of the task vectors, times lambda."""
    dropped = drop_and_rescale(deltas, params["drop_rate"], params["seed"], ctx.key)
    return dropped.mean(dim=0) * module_lambda(params, ctx, "lambda")
