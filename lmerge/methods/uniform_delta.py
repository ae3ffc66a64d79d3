"""``uniform_delta``: the mean of the task vectors."""

from __future__ import annotations

from typing import Any

from lmerge.methods.registry import Kind, ModuleContext, register


@register("uniform_delta", kind=Kind.LINEAR)
def uniform_delta(n: int, params: dict[str, Any], ctx: ModuleContext) -> list[float]:
    """Mean of the task vectors (c_i = 1/n)."""
    return [1.0 / n] * n
