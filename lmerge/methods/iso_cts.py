"""``iso_cts``: Iso-CTS, isotropic merging in common and task-specific subspaces, exactly in low rank.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025. Of the summed task vectors' SVD (rank ``D``, computed in core space), the
top ``c`` singular directions span the common subspace; each task's task vector, projected off
the common left singular vectors, gives its top ``d`` directions; all ``c + n d = D`` left and
right singular vectors are orthogonalized together (polar factors), every singular value is
replaced by the mean of the kept ones, times ``lambda``: a LoRA of rank ``D <= sum_i r_i``.

Choices, following the authors' code (``iso_cts`` in github.com/danielm1405/iso-merging,
``src/utils/iso.py``): ``D`` is the summed update's numerical rank (the authors work with a full
matrix's ``min(out, in)``); ``c = int(D * common)`` (``common`` defaults to the authors' 0.8),
then ``d = round((D - c) / n)`` (Python's ``round``, as theirs) and ``c = D - n d`` so that the
task-specific share divides evenly; ``d`` is capped at ``D // n`` (the authors' rule can
overshoot ``D`` when ``n > D - c``) and each task's at the numerical rank of its projected task
vector (directions of a zero singular value are arbitrary). The mean runs over the kept singular
values, the common ones of the sum and each task's projected ones. ``lambda`` defaults to 1.0;
the authors' evaluation picks it in 0.1 .. 3.0 on validation data.
"""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._lowrank import (
    CoreSpace,
    numerical_rank,
    polar,
    product_svds,
    rank_tolerance,
    small_svd,
    zero_factors,
)
from lmerge.methods._params import check_number, check_range, module_lambda
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_range(params, "common", 0.0, 1.0)
    check_number(params, "lambda")


def split_sizes(rank: int, common: float, n: int) -> tuple[int, int]:
    """``(c, d)``: common directions and directions per task, ``c + n d = rank``."""
    per_task = min(round((rank - int(rank * common)) / n), rank // n)
    return rank - n * per_task, per_task


@register(
    "iso_cts", kind=Kind.LOW_RANK, defaults={"common": 0.8, "lambda": 1.0}, validate=_validate, lambda_param="lambda"
)
def iso_cts(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-CTS: the sum's top common fraction of directions plus each task's own, flat spectrum, times lambda."""
    space = CoreSpace(As, Bs)
    P, S, Wh = small_svd(space.summed())
    tolerance = rank_tolerance(S[0], (space.out, space.inp), space.dtype)
    rank = numerical_rank(S, tolerance)
    if not rank:
        return zero_factors(space.out, space.inp, space.dtype)
    common, per_task = split_sizes(rank, params["common"], space.n)
    Uc = P[:, :common]
    Us, Ss, Vhs = [], [S[:common]], [Wh[:common]]
    # Task i's core with the common left subspace projected out: (I - Uc Uc^T) C_i.
    projected = [left - Uc @ (Uc.T @ left) for left in map(space.left, range(space.n))]
    for svd in product_svds(projected, [space.right(i).T for i in range(space.n)]):
        kept = min(per_task, numerical_rank(svd.S, tolerance))
        Us.append(svd.U(kept))
        Ss.append(svd.S[:kept])
        Vhs.append(svd.Vh(kept))
    specific = torch.cat(Us, dim=1)
    # The task-specific directions are orthogonal to the common ones, so the polar factor of
    # [Uc, specific] is [Uc, polar(specific)]: the SVD of a block of n * per_task columns only.
    U = torch.cat([Uc, polar(specific)], dim=1) if specific.shape[1] else Uc
    level = module_lambda(params, ctx, "lambda") * torch.cat(Ss).mean()
    return space.lift(U * level, polar(torch.cat(Vhs, dim=0).T).T)
