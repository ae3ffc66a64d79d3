"""``uniform``: the LoRA factors averaged, A = mean A_i and B = mean B_i."""

from __future__ import annotations

from typing import Any

import torch

from lmerge.methods._params import check_equal_ranks
from lmerge.methods.registry import Kind, ModuleContext, register


@register("uniform", kind=Kind.FACTORS)
def uniform(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the LoRA factors: A = mean A_i, B = mean B_i (all ranks equal)."""
    check_equal_ranks(As, "uniform", ctx)
    return torch.stack(As).mean(dim=0), torch.stack(Bs).mean(dim=0)
