"""``uniform_scalar_delta``: one scale for every task vector."""

from __future__ import annotations

from typing import Any

from lmerge.methods._params import check_number, module_lambda
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_number(params, "scale")


@register(
    "uniform_scalar_delta",
    kind=Kind.LINEAR,
    defaults={"scale": 1.0},
    validate=_validate,
    lambda_param="scale",
)
def uniform_scalar_delta(n: int, params: dict[str, Any], ctx: ModuleContext) -> list[float]:
    """Every task vector times one scale (c_i = scale), summed."""
    return [module_lambda(params, ctx, "scale")] * n
