"""``weighted``: a weighted sum of the LoRA factors, A = sum w_i A_i and B = sum w_i B_i."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.errors import MethodError
from lmerge.methods._params import check_equal_ranks, check_number, module_lambda, number_list
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_number(params, "lambda")
    if params["weights"] is not None:
        params["weights"] = number_list("weights", params["weights"], n_adapters)
    elif n_adapters != 2:
        raise MethodError(f"method_params.weights is required with {n_adapters} adapters (lambda covers exactly two)")


@register(
    "weighted",
    kind=Kind.FACTORS,
    defaults={"lambda": 0.5, "weights": None},
    validate=_validate,
    lambda_param="lambda",
)
def weighted(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the LoRA factors: weights w_i, or (lambda, 1 - lambda) for two adapters."""
    check_equal_ranks(As, "weighted", ctx)
    if params["weights"] is not None:
        weights = params["weights"]
    else:
        lam = module_lambda(params, ctx, "lambda")
        weights = [lam, 1.0 - lam]
    A = sum(w * A_i for w, A_i in zip(weights, As))
    B = sum(w * B_i for w, B_i in zip(weights, Bs))
    return A, B
