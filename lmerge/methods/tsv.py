"""``tsv``: TSV-M, Task Singular Vectors merging, exactly in low rank.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
Per task, the SVD ``delta_i = U_i S_i V_i^T``, computed from the LoRA factors
(:func:`~lmerge.methods._products.product_svds`); its top ``k_i`` singular triplets are kept; all
tasks' kept ``U_i`` are concatenated into ``U_cat`` [out, K] and their ``V_i`` into ``V_cat``
[in, K], each replaced by its orthogonal polar factor (Procrustes: the nearest matrix with
orthonormal columns), and the merge is ``lambda * polar(U_cat) diag(S_cat) polar(V_cat)^T``, a
LoRA of rank ``K <= sum_i r_i``. Task vectors that are already mutually orthogonal come back
summed (with every direction kept), equal ones as one: the polar factor of a concatenation short
of full rank is its partial isometry (:func:`~lmerge.methods._polar.polar`). Where every task
keeps all its directions (by default, for LoRA ranks up to ``min(out, in) / n``), the polar
factors of ``U_cat`` and ``V_cat`` come from the tasks' bases alone, without their SVDs
(:func:`_every_direction`).

Choices, following the authors' code (``compute_and_sum_svd_mem_reduction`` in
github.com/danielm1405/iso-merging, ``src/utils/TSVM_utils.py``):

- By default, the authors' count: ``k_i = int(min(out, in) * (1 / n))`` (their
  ``int(s.shape[0] * sv_reduction)``), at least 1, and never beyond the numerical rank of
  ``delta_i``: directions of a zero singular value are arbitrary, and with them in the
  concatenation its polar factor would depend on them. For a LoRA of rank
  ``r_i <= min(out, in) / n`` that keeps every direction, as Core Space merging's TSV on the
  cores does (``int(R / n)`` of each task's ``R x R`` core). A ``keep`` given is a fraction of
  the adapter's own rank instead: ``k_i = int(keep * r_i)`` (rounded down, as the authors'
  ``int``), at least 1, with the same bound (``keep: 0.25`` keeps 4 of rank 16).
- No normalisation of the singular values; ``lambda`` (default 1.0, the paper's value) scales
  the result. The authors' evaluation picks it in 0.1 .. 3.0 on validation data.
"""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._bases import StackGram
from lmerge.methods._lowrank import (
    as_working,
    lift_square,
    numerical_rank,
    rank_tolerance,
    zero_factors,
)
from lmerge.methods._params import check_number, check_range, module_lambda, parse_yaml
from lmerge.methods._polar import polar_given, polar_right
from lmerge.methods._products import product_cores, product_svds
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    if params["keep"] is not None:
        params["keep"] = parse_yaml("keep", params["keep"])
        check_range(params, "keep", 0.0, 1.0, low_open=True)
    check_number(params, "lambda")


@register("tsv", kind=Kind.LOW_RANK, defaults={"keep": None, "lambda": 1.0}, validate=_validate, lambda_param="lambda")
def tsv(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M: each task's top singular directions (by default the authors' count), orthogonalized
    together, times lambda."""
    As, Bs = as_working(As, Bs)
    out, inp = Bs[0].shape[0], As[0].shape[1]
    ranks = [A.shape[0] for A in As]
    wanted = [
        int(min(out, inp) * (1.0 / len(As))) if params["keep"] is None else int(params["keep"] * r) for r in ranks
    ]
    scale = module_lambda(params, ctx, "lambda")
    if all(max(1, w) >= r for w, r in zip(wanted, ranks, strict=True)):
        merged = _every_direction(Bs, As, scale)
        if merged is not None:
            return merged
    svds = product_svds(Bs, As)
    kept = [
        min(max(1, w), numerical_rank(svd.S, rank_tolerance(svd.S[0], (out, inp), As[0].dtype)))
        for w, svd in zip(wanted, svds, strict=True)
    ]
    S = torch.cat([svd.S[:k] for svd, k in zip(svds, kept, strict=True)]) * scale
    if not S.numel():
        return zero_factors(out, inp, As[0].dtype)
    # U_cat = [Fb_1 P_1 ... Fb_n P_n] = F_U D_U and V_cat^T = D_V F_V^T with block-diagonal D_U, D_V:
    # on the Gram route the tall stacks are [B_1 ... B_n] and [A_1; ...; A_n] themselves, and
    # U_cat and V_cat are never formed (their Gram matrices are D^T (F^T F) D).
    F_U, F_Vt = torch.cat([svd.Fb for svd in svds], dim=1), torch.cat([svd.Fa.T for svd in svds], dim=0)
    D_U = torch.block_diag(*[svd.P[:, :k] for svd, k in zip(svds, kept, strict=True)])
    D_V = torch.block_diag(*[svd.Wh[:k] for svd, k in zip(svds, kept, strict=True)])
    right_U, right_V = polar_right(F_U, D_U), polar_right(F_Vt.T, D_V.T)
    if right_U is None or right_V is None:
        U, Vh = F_U @ D_U, D_V @ F_Vt
        return polar_given(Vh.T, right_V).T, polar_given(U, right_U) * S
    # polar(U_cat) S polar(V_cat)^T = F_U (D_U M_U S M_V^T D_V) F_V^T.
    left, right = D_U @ (right_U * S), right_V.T @ D_V
    if left.shape[1] == min(left.shape[0], right.shape[1]):  # no rank to save: one GEMM, as a linear save's
        return lift_square(F_U, left @ right, F_Vt)
    return right @ F_Vt, F_U @ left


def _every_direction(
    Bs: list[torch.Tensor], As: list[torch.Tensor], scale: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """TSV where every task keeps all its directions, without the tasks' SVDs: with each
    ``delta_i = Qb_i C_i Qa_i^T`` in orthonormal bases of its factors
    (:func:`~lmerge.methods._products.product_cores`) and
    ``C_i = P_i S_i W_i^T`` (its SVD), ``U_cat = Qb_stack blockdiag(P_i)`` with ``blockdiag(P_i)``
    orthogonal, so ``polar(U_cat) = polar(Qb_stack) blockdiag(P_i)`` (the same for ``V``), and the
    merge is ``polar(Qb_stack) blockdiag(C_i) polar(Qa_stack)^T``. None unless every task is of
    full rank for certain and both polar factors come from Gram matrices."""
    B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
    # The tasks' Gram matrices are the diagonal blocks of the stacks': each computed once.
    gram_B, gram_A = StackGram(B, Bs), StackGram(A.T, [A_i.T for A_i in As])
    cores = product_cores(Bs, As, (gram_B, gram_A))
    if cores is None or not cores.full_rank:
        return None
    Tb, Ta = torch.block_diag(*cores.Tb), torch.block_diag(*cores.Ta)
    right_U, right_V = polar_right(B, Tb, gram_B), polar_right(A.T, Ta, gram_A)
    if right_U is None or right_V is None:
        return None
    C = torch.block_diag(*cores.C) * scale
    return lift_square(B, (Tb @ right_U) @ C @ (Ta @ right_V).T, A)
