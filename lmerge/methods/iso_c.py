"""``iso_c``: Iso-C, isotropic merging in the common subspace, exactly in low rank.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025. The SVD ``sum_i delta_i = U S V^T`` of the summed task vectors (rank at
most ``R = sum_i r_i``, computed in core space from the factor stacks), every singular value
replaced by their mean: ``lambda * mean(S) U V^T``, a LoRA of the sum's rank.

Choices, following the authors' code (``iso_c`` in github.com/danielm1405/iso-merging,
``src/utils/iso.py``): the task vectors are summed, not averaged, before the SVD; the mean is
over the sum's nonzero singular values, those above its numerical rank's tolerance, taken at the
largest task vector's scale so that task vectors that cancel sum to zero (the authors' dense SVD
also averages the ``min(out, in) - rank`` zeros of a low-rank sum and raises their arbitrary
singular vectors to that mean, which a LoRA sum cannot mean); ``lambda`` defaults to 1.0, and
the authors' evaluation picks it in 0.1 .. 3.0 on validation data.
"""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._gram_product import gram_product_svd
from lmerge.methods._lowrank import (
    CoreSpace,
    as_working,
    lift_square,
    numerical_rank,
    thin_svd,
    zero_factors,
)
from lmerge.methods._params import check_number, module_lambda
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_number(params, "lambda")


@register("iso_c", kind=Kind.LOW_RANK, defaults={"lambda": 1.0}, validate=_validate, lambda_param="lambda")
def iso_c(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-C: the SVD of the summed task vectors with a flat spectrum (the mean singular value), times lambda."""
    As, Bs = as_working(As, Bs)
    B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)  # sum_i delta_i = B @ A
    svd = gram_product_svd(B, A)
    if svd is not None:  # a well-conditioned sum of rank R: its polar factor is all it takes
        return lift_square(B, svd.polar() * (module_lambda(params, ctx, "lambda") * svd.S.mean()), A)
    space = CoreSpace(As, Bs)
    P, S, Wh = thin_svd(space.summed())
    rank = numerical_rank(S, space.sum_tolerance(S[0]))
    if not rank:
        return zero_factors(space.out, space.inp, space.dtype)
    level = module_lambda(params, ctx, "lambda") * S[:rank].mean()
    return space.lift(P[:, :rank] * level, Wh[:rank])
