"""``ties``: TIES merging (trim, elect sign, disjoint mean) of dense task vectors.

Normalisation follows peft and the TIES paper: each entry is the mean over the adapters that
agree with the elected sign, then scaled by lambda.
"""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._params import check_number, check_range, module_lambda
from lmerge.methods._signs import disjoint_mean_
from lmerge.methods._task_vectors import TaskVectors
from lmerge.methods._topk import merge_top_k
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_range(params, "k", 0.0, 100.0)
    check_number(params, "lambda")


@register(
    "ties",
    kind=Kind.DENSE,
    defaults={"k": 20.0, "lambda": 1.0},
    validate=_validate,
    lambda_param="lambda",
)
def ties(deltas: TaskVectors, params: dict[str, Any], ctx: ModuleContext) -> torch.Tensor:
    """TIES: keep each task vector's top k% magnitudes, elect signs, disjoint mean, times lambda."""
    merged = merge_top_k(deltas, params["k"] / 100.0, disjoint_mean_)
    return merged.mul_(module_lambda(params, ctx, "lambda"))
