"""``task_vector``: task arithmetic, lambda times the sum of the task vectors."""

from __future__ import annotations

from typing import Any

from lmerge.methods._params import check_number, module_lambda
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_number(params, "lambda")


@register("task_vector", kind=Kind.LINEAR, defaults={"lambda": 1.0}, validate=_validate, lambda_param="lambda")
def task_vector(n: int, params: dict[str, Any], ctx: ModuleContext) -> list[float]:
    """Task arithmetic: lambda * sum of the task vectors (c_i = lambda)."""
    return [module_lambda(params, ctx, "lambda")] * n
