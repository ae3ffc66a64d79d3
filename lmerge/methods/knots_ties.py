"""``knots_ties``: KnOTS-TIES, TIES on the aligned right singular vectors, exactly in low rank.

Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025. The task vectors side by
side have one SVD ``[delta_1 ... delta_n] = U S [V_1^T ... V_n^T]`` (computed in low rank,
:func:`~lmerge.methods._lowrank.concatenated_svd`): ``U`` is a basis all tasks share and
``S V_i^T`` [K, in] is task i in it. TIES merges the ``S V_i^T`` (trim each to its top ``k``%
magnitudes, elect signs, disjoint mean), and the merge is ``lambda * U (merged)``, a LoRA of
rank ``K <= sum_i r_i``.

Choices, following the authors' code (github.com/gstoica27/KnOTS, ``task_merger.py``
``SVDMerger`` and ``masking_ops.py``): the concatenation is along the input (``W_concat`` is
``out x n in``, their default ``concat_across_output``); TIES runs on ``S V_i^T`` (their
``diag(s) @ V``), its sign election is the sign of the sum of the trimmed entries and the merge
the mean over the agreeing nonzero entries (their ``mean`` merging type), times ``lambda``. Where
theirs differs: the top-k is per module (theirs is over the whole model's flattened vectors) and
keeps exactly ``int(k% * entries)`` as lmerge's ``ties`` (theirs, ``topk_values_mask``, keeps the
``int(k% * entries) + 1`` largest and every entry tied with the last); an entry whose trimmed
values sum to exactly 0 elects +1, as PEFT's (theirs, the sign most other entries elected);
components of zero singular value are left out, as theirs drops ``s <= 1e-5``, but by numpy's
relative rank rule (their threshold is absolute): a zero or duplicate adapter would otherwise add
rows of zeros to every ``S V_i^T`` and so change the count of entries ``k%`` is taken of (with
the rule, an all-zero adapter changes nothing).
``k`` defaults to 20 (their ViT-B and ViT-L configs; their Llama-3-8B config trims nothing,
``topK`` 100) and ``lambda`` to 1.0 (their linear search's default, which their evaluation tunes
on validation data).
"""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._lowrank import concatenated_svd
from lmerge.methods._params import check_number, check_range, module_lambda
from lmerge.methods._signs import disjoint_mean_
from lmerge.methods._topk import merge_top_k
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_range(params, "k", 0.0, 100.0)
    check_number(params, "lambda")


@register(
    "knots_ties", kind=Kind.LOW_RANK, defaults={"k": 20.0, "lambda": 1.0}, validate=_validate, lambda_param="lambda"
)
def knots_ties(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS-TIES: TIES (top k%, elect signs, disjoint mean) on the tasks' S V_i^T in their joint SVD, times lambda."""
    svd = concatenated_svd(As, Bs)
    merged = merge_top_k(svd.SV, params["k"] / 100.0, disjoint_mean_)
    return svd.lift(merged.mul_(module_lambda(params, ctx, "lambda")))
