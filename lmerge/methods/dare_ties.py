"""``dare_ties``: DARE drop and rescale, then TIES sign election and disjoint mean."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._ops import (
    check_int,
    check_number,
    check_range,
    dare,
    disjoint_mean,
    elect_sign,
    module_lambda,
)
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
def dare_ties(deltas: torch.Tensor, params: dict[str, Any], ctx: ModuleContext) -> torch.Tensor:
    """DARE-TIES: drop and rescale at drop_rate, elect signs, disjoint mean, times lambda."""
    dropped = dare(deltas, params["drop_rate"], params["seed"], ctx.key)
    return disjoint_mean(dropped, elect_sign(dropped)) * module_lambda(params, ctx, "lambda")
