"""``iso_cts``: Iso-CTS, isotropic merging in common and task-specific subspaces, exactly in low rank.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025. Of the summed task vectors' SVD (rank ``D``, computed from the factor
stacks' Gram matrices when the sum is well conditioned, else in core space), the top ``c``
singular directions span the common subspace; each task's task vector, projected off the common
left singular vectors, gives its top ``d`` directions; all ``c + n d = D`` left and right
singular vectors are orthogonalized together (polar factors), every singular value is replaced
by the mean of the kept ones, times ``lambda``: a LoRA of rank ``D <= sum_i r_i``.

Choices, following the authors' code (``iso_cts`` in github.com/danielm1405/iso-merging,
``src/utils/iso.py``): ``D`` is the summed update's numerical rank, its tolerance taken at the
largest task vector's scale (the authors work with a full matrix's ``min(out, in)``; of task
vectors that cancel, ``D`` is 0 and so is the merge, where theirs would take the sum's rounding
noise for its common directions and add every task's own); ``c = int(D * common)`` (``common``
defaults to the authors' 0.8), then ``d = round((D - c) / n)`` (Python's ``round``, as theirs;
``n`` counts the tasks of a nonzero update in the module: an untrained adapter, PEFT's
``B = 0``, takes no share, where theirs would give it directions of a zero singular value) and
``c = D - n d`` so that the task-specific share divides evenly; ``d`` is capped at ``D // n``
(the authors' rule can overshoot ``D`` when ``n > D - c``) and each task's at the numerical rank
of its projected task vector (directions of a zero singular value are arbitrary). The mean runs
over the kept singular values, the common ones of the sum and each task's projected ones.
``lambda`` defaults to 1.0; the authors' evaluation picks it in 0.1 .. 3.0 on validation data.
"""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._bases import rank_blocks
from lmerge.methods._gram_product import GramProductSVD, gram_product_svd
from lmerge.methods._lowrank import (
    CoreSpace,
    as_working,
    lift_square,
    numerical_rank,
    rank_tolerance,
    small_svd,
    zero_factors,
)
from lmerge.methods._params import check_number, check_range, module_lambda
from lmerge.methods._polar import polar, polar_rows_extending
from lmerge.methods._products import product_svds
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
    As, Bs = as_working(As, Bs)
    B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)  # sum_i delta_i = B @ A
    svd = gram_product_svd(B, A)
    if svd is not None:
        return _from_gram_product(svd, B, A, [A_i.shape[0] for A_i in As], params, ctx)
    return _in_core_space(CoreSpace(As, Bs), params, ctx)


def _from_gram_product(
    svd: GramProductSVD, B: torch.Tensor, A: torch.Tensor, ranks: list[int], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-CTS of a well-conditioned sum of full rank R, whose left singular vectors ``U`` are a
    basis of every task's columns: the common subspace is ``U``'s first ``c`` columns, so a task
    projected off it is its coordinates past the ``c``-th, and the merged left factor in the
    coordinates of ``U`` is ``blockdiag(I_c, polar(task-specific))``."""
    R = A.shape[0]
    tolerance = rank_tolerance(svd.S[0], (B.shape[0], A.shape[1]), B.dtype)
    common, per_task = split_sizes(R, params["common"], len(ranks))
    left = svd.stack_coordinates()
    blocks = rank_blocks(ranks)
    specific, Ss, Vhs = _task_specific(
        [left[common:, block] for block in blocks], [svd.Ca[:, block].T for block in blocks], per_task, tolerance
    )
    merged_left = torch.zeros(R, common + specific.shape[1], dtype=left.dtype)
    merged_left[:common, :common].fill_diagonal_(1.0)
    merged_left[common:, common:] = specific
    level = module_lambda(params, ctx, "lambda") * torch.cat([svd.S[:common], *Ss]).mean()
    K_left = svd.left(merged_left * level)
    K_right = svd.right(_right_directions(svd.V.T[:common], Vhs))
    if K_left.shape[1] == R:  # as wide as the stacks: one GEMM, on the smaller side
        return lift_square(B, K_left @ K_right, A)
    return K_right @ A, B @ K_left


def _right_directions(common: torch.Tensor, Vhs: list[torch.Tensor]) -> torch.Tensor:
    """The polar factor (orthonormal rows) of the orthonormal rows ``common`` and the tasks'
    ``Vhs`` below them (:func:`~lmerge.methods._polar.polar_rows_extending`, or an SVD where it
    declines)."""
    specific = torch.cat(Vhs, dim=0) if Vhs else common[:0]
    rows = polar_rows_extending(common, specific)
    return polar(torch.cat([common, specific], dim=0).T).T if rows is None else rows


def _in_core_space(space: CoreSpace, params: dict[str, Any], ctx: ModuleContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-CTS in core space: any sum, of any rank and conditioning."""
    P, S, Wh = small_svd(space.summed())
    tolerance = space.sum_tolerance(S[0])
    rank = numerical_rank(S, tolerance)
    if not rank:
        return zero_factors(space.out, space.inp, space.dtype)
    common, per_task = split_sizes(rank, params["common"], space.tasks)
    Uc = P[:, :common]
    # Task i's core with the common left subspace projected out: (I - Uc Uc^T) C_i.
    projected = [left - Uc @ (Uc.T @ left) for left in map(space.left, range(space.n))]
    specific, Ss, Vhs = _task_specific(projected, [space.right(i).T for i in range(space.n)], per_task, tolerance)
    # The task-specific directions are orthogonal to the common ones, so the polar factor of
    # [Uc, specific] is [Uc, polar(specific)].
    U = torch.cat([Uc, specific], dim=1)
    level = module_lambda(params, ctx, "lambda") * torch.cat([S[:common], *Ss]).mean()
    return space.lift(U * level, _right_directions(Wh[:common], Vhs))


def _task_specific(
    projected: list[torch.Tensor], rights: list[torch.Tensor], per_task: int, tolerance: float
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Each task's top ``per_task`` directions of ``projected[i] @ rights[i]`` (its task vector
    off the common subspace; fewer where its rank is lower): the polar factor of their left
    singular vectors side by side (the SVD of a block of ``n * per_task`` columns only), and
    per task the singular values and right singular vectors (rows)."""
    Us, Ss, Vhs = [], [], []
    for svd in product_svds(projected, rights) if per_task else []:
        kept = min(per_task, numerical_rank(svd.S, tolerance))
        Us.append(svd.U(kept))
        Ss.append(svd.S[:kept])
        Vhs.append(svd.Vh(kept))
    specific = torch.cat(Us, dim=1) if Us else projected[0][:, :0]
    return (polar(specific) if specific.shape[1] else specific), Ss, Vhs
