"""``knots_dare``: KnOTS-DARE, DARE-TIES on the aligned right singular vectors, exactly in low rank.

Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025. As ``knots_ties``, the
joint SVD ``[delta_1 ... delta_n] = U S [V_1^T ... V_n^T]`` computed in low rank, then DARE on
each task's ``S V_i^T`` [K, in] (drop entries at ``drop_rate``, rescale the rest by
``1 / (1 - drop_rate)``), TIES sign election and disjoint mean, and ``lambda * U (merged)``.

Choices, following the authors' code (github.com/gstoica27/KnOTS, ``configs/*knots_dare_ties*``
with ``task_merger.py`` ``SVDMerger``): their KnOTS-DARE is DARE followed by TIES at ``topK``
100 (sign election and the mean over the agreeing entries, no trim), so no ``k`` here;
``drop_rate`` defaults to 0.8, their Llama-3-8B config's (their ViT-B and ViT-L configs drop
0.1). The drop masks are lmerge's DARE masks (seeded per module,
the same in any process; theirs come from ``torch.manual_seed``); ``lambda`` defaults to 1.0,
tuned on validation data in their evaluation.
"""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._dare import DareMask
from lmerge.methods._lowrank import concatenated_svd
from lmerge.methods._params import check_int, check_number, check_range, module_lambda
from lmerge.methods._signs import disjoint_mean_
from lmerge.methods.registry import Kind, ModuleContext, register


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    check_range(params, "drop_rate", 0.0, 1.0, high_open=True)
    check_int(params, "seed")
    check_number(params, "lambda")


@register(
    "knots_dare",
    kind=Kind.LOW_RANK,
    defaults={"drop_rate": 0.8, "seed": 42, "lambda": 1.0},
    validate=_validate,
    lambda_param="lambda",
)
def knots_dare(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS-DARE: DARE-TIES (drop at drop_rate, elect signs, disjoint mean) on the tasks' S V_i^T, times lambda."""
    svd = concatenated_svd(As, Bs)
    mask = DareMask(params["drop_rate"], params["seed"], ctx.key)
    merged = svd.SV.merge(lambda block, start: disjoint_mean_(mask.apply_(block, start)))
    # Sign election and the disjoint mean commute with the positive rescale 1 / (1 - drop_rate).
    return svd.lift(merged.mul_(module_lambda(params, ctx, "lambda") / (1.0 - params["drop_rate"])))
