"""Exact rescaling of a module's factors by a power of two, so that their Gram matrices neither
overflow nor underflow.

The low-rank routes square the factor stacks (``B^T B``, ``A A^T``): a float32 factor whose
entries reach about 1e19 squares to Inf, which stops an eigendecomposition, and one whose entries
are below about 1e-19 squares to zero or to a subnormal without its relative precision, which
merges it wrong without a word. Every merge on these routes is homogeneous of degree one in the
``A``'s and in the ``B``'s, and a product by a power of two is exact, so the factors are brought
to unit scale first and the merged factors are scaled back: bit for bit the same result wherever
the scale was already safe.
"""

from __future__ import annotations

import math

import torch

SAFE = 2.0**20
"""Largest Frobenius norms from ``1 / SAFE`` to ``SAFE`` are left as they are: their squares, and
their Gram matrices' smallest eigenvalues the routes accept, stay far inside float32's range."""


def unit_scale(tensors: list[torch.Tensor]) -> float:
    """A power of two that brings the largest Frobenius norm among ``tensors`` (finite entries)
    into [1, 2), or 1.0 when that norm is zero or already within ``[1 / SAFE, SAFE]``."""
    largest = float(torch.stack(torch._foreach_norm(tensors, 2)).max())  # one batched reduction
    if largest == 0.0 or math.isinf(largest):  # the squares under- or overflowed, or all is zero
        largest = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
    if largest == 0.0 or 1.0 / SAFE <= largest <= SAFE:
        return 1.0
    return math.ldexp(1.0, 1 - math.frexp(largest)[1])
