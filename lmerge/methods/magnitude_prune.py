"""``magnitude_prune``: each task vector cut to its largest magnitudes, then their mean."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._params import check_number, check_range, module_lambda
from lmerge.methods._task_vectors import TaskVectors
from lmerge.methods._topk import merge_top_k
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_range(params, "k", 0.0, 100.0)
    check_number(params, "lambda")


@register(
    "magnitude_prune",
    kind=Kind.DENSE,
    defaults={"k": 20.0, "lambda": 1.0},
    validate=_validate,
    lambda_param="lambda",
)
def magnitude_prune(deltas: TaskVectors, params: dict[str, Any], ctx: ModuleContext) -> torch.Tensor:
    """Magnitude pruning: keep each task vector's top k% magnitudes, mean, times lambda."""
    merged = merge_top_k(deltas, params["k"] / 100.0, lambda pruned: pruned.sum(dim=0))
    return merged.div_(deltas.n).mul_(module_lambda(params, ctx, "lambda"))
