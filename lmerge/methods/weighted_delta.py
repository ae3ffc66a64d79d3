"""``weighted_delta``: the convex mix lambda * delta_1 + (1 - lambda) * delta_2 of two task vectors."""

from __future__ import annotations

from typing import Any

from lmerge.methods._params import check_number, module_lambda
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_number(params, "lambda")


@register(
    "weighted_delta",
    kind=Kind.LINEAR,
    defaults={"lambda": 0.5},
    validate=_validate,
    min_adapters=2,
    max_adapters=2,
    lambda_param="lambda",
)
def weighted_delta(n: int, params: dict[str, Any], ctx: ModuleContext) -> list[float]:
    """Two task vectors mixed as lambda * delta_1 + (1 - lambda) * delta_2."""
    lam = module_lambda(params, ctx, "lambda")
    return [lam, 1.0 - lam]
