"""``weighted_rank``: a weight per rank direction of each adapter in each module (what a learner
with ``granularity: rank_wise`` learns).

``delta = sum_i B_i diag(w_i) A_i`` with ``w_i`` one weight per rank direction of adapter ``i``:
exactly the LoRA ``B' = [w_1 * B_1 ... w_n * B_n]``, ``A' = [A_1; ...; A_n]`` of rank ``sum r_i``
(each ``B_i`` with its adapter's scaling). The weights are written inline in the merge spec,
``rank_weights: {module key: [[w_1k ...], [w_2k ...]]}``, one list per adapter, so a learned merge
is one self-contained, reviewable file that YAML round-trips exactly.

``rank_mixing: {module key: N}`` (optional; what ``rank_mixing_lr`` learns) adds an ``R x R`` matrix
per module that mixes the rank directions: ``delta = B_s (diag(w) + N) A'`` with
``B_s = [B_1 ... B_n]``, the LoRA ``B' = [w_1 * B_1 ... w_n * B_n] + B_s N``, ``A'`` as above.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmerge.errors import MethodError
from lmerge.methods._params import check_bool, parse_yaml
from lmerge.methods.registry import Kind, ModuleContext, register


def _finite_numbers(values: Any) -> bool:
    """Whether ``values`` is a non-empty list of finite numbers (booleans are not numbers here)."""
    return (
        isinstance(values, (list, tuple))
        and bool(values)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def _rows(key: str, rows: Any, n_adapters: int, allow_negative: bool) -> list[list[float]]:
    where = f"method_params.rank_weights.{key}"
    if not isinstance(rows, (list, tuple)) or len(rows) != n_adapters:
        raise MethodError(f"{where}: expected {n_adapters} lists (one per adapter) of per-rank weights, got {rows!r}")
    parsed = []
    for index, weights in enumerate(rows):
        if not _finite_numbers(weights):
            raise MethodError(f"{where}: adapter {index}: expected a list of finite numbers, got {weights!r}")
        if not allow_negative and any(w < 0 for w in weights):
            raise MethodError(
                f"{where}: adapter {index}: negative weight (set method_params.allow_negative_coefficients to allow it)"
            )
        parsed.append([float(w) for w in weights])
    return parsed


def _validate(params: dict[str, Any], n_adapters: int) -> None:
    allow_negative = check_bool(params, "allow_negative_coefficients")
    table = parse_yaml("rank_weights", params["rank_weights"])
    if not isinstance(table, dict) or not table:
        raise MethodError(
            "method_params.rank_weights: expected a mapping {module key: one list of per-rank weights per adapter}"
        )
    params["rank_weights"] = {
        str(key): _rows(str(key), rows, n_adapters, allow_negative) for key, rows in table.items()
    }
    mixing = parse_yaml("rank_mixing", params["rank_mixing"])
    if mixing is not None:
        if not isinstance(mixing, dict):
            raise MethodError("method_params.rank_mixing: expected a mapping {module key: R x R matrix}")
        params["rank_mixing"] = {str(key): _matrix(str(key), matrix) for key, matrix in mixing.items()}


def _matrix(key: str, matrix: Any) -> list[list[float]]:
    where = f"method_params.rank_mixing.{key}"
    rows = matrix if isinstance(matrix, (list, tuple)) and matrix else None
    if rows is None or not all(_finite_numbers(row) and len(row) == len(rows) for row in rows):
        raise MethodError(f"{where}: expected a square matrix (a list of rows) of finite numbers")
    return [[float(v) for v in row] for row in rows]


@register(
    "weighted_rank",
    kind=Kind.FACTORS,
    defaults={"allow_negative_coefficients": False, "rank_mixing": None},
    required=("rank_weights",),
    validate=_validate,
)
def weighted_rank(
    As: list[torch.Tensor], Bs: list[torch.Tensor], params: dict[str, Any], ctx: ModuleContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank weighted sum of n adapters: B' = [w_i * B_i] (+ [B_i] N with rank_mixing), A' = [A_i] (exact)."""
    rows = params["rank_weights"].get(ctx.key)
    if rows is None:
        raise MethodError(f"method_params.rank_weights: no weights for module {ctx.key}")
    for index, (weights, A) in enumerate(zip(rows, As, strict=True)):
        if len(weights) != A.shape[0]:
            raise MethodError(
                f"method_params.rank_weights.{ctx.key}: adapter {index} has rank {A.shape[0]}, "
                f"got {len(weights)} weights"
            )
    B = torch.cat([B * torch.tensor(w, dtype=B.dtype) for w, B in zip(rows, Bs, strict=True)], dim=1)
    mixing = (params["rank_mixing"] or {}).get(ctx.key)
    if mixing is not None:
        if len(mixing) != B.shape[1]:
            raise MethodError(
                f"method_params.rank_mixing.{ctx.key}: a {len(mixing)} x {len(mixing)} matrix for rank {B.shape[1]}"
            )
        B = B + torch.cat(Bs, dim=1) @ torch.tensor(mixing, dtype=B.dtype)
    return torch.cat(As, dim=0), B
