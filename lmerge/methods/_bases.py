"""Orthonormal bases of the column space of a tall factor stack, from its Gram matrix or by QR.

A basis ``Q`` [m, p] of the columns of ``X`` [m, R] comes with its coordinates ``C = Q^T X``
[p, R] (``X = Q C`` exactly) and is kept factored, ``Q = F T`` (``F`` [m, w] tall, ``T`` [w, p]
small, or None for the identity), so that a small result ``M`` comes back as ``F (T M)``: one
GEMM on the tall side whichever way the basis was found.

- **Gram** (:func:`gram_basis`): ``G = X^T X`` (one GEMM, in float64, or first in float32 for
  float32 factors: :data:`GRAM_TIERS`) and its
  eigendecomposition ``G = W diag(s^2) W^T`` (``R x R``) give ``X``'s left singular vectors
  ``Q = X W diag(1/s)`` without forming them: ``F = X`` itself, ``T = W diag(1/s)``, and
  ``C = diag(s) W^T``, whose rows are already ``X``'s singular directions. On a thin stack this
  is a fraction of a Householder QR's time (LAPACK's ``geqrf``/``orgqr`` are half matrix-vector
  work), but it squares the condition number: ``Q`` is orthonormal to about
  ``eps * kappa(X)^2`` (``eps`` of the Gram's precision), and its lift in float32 adds
  ``eps32 * kappa(X)``. So it is taken only when ``kappa(X) <= 100`` (:data:`GRAM_CONDITION`;
  ``<= 10`` for a float32 Gram): errors near 1e-12 in float64 and within float32's own rounding
  (1e-5) for float32 factors.
- **Householder** (:func:`qr_basis`): ``F = Q`` explicit, ``T`` None, ``C`` the triangular
  factor; exact in the factors' precision for any ``X``. Every stack the Gram route refuses goes
  here: rank deficient (duplicate or zero adapters, more rank than rows), or badly scaled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

GRAM_CONDITION = 1e-4
"""The Gram route needs ``lambda_min(G) >= GRAM_CONDITION * lambda_max(G)``, i.e. ``kappa(X) <= 100``."""
GRAM_TIERS = {
    torch.float64: [(torch.float64, GRAM_CONDITION)],
    # A float32 Gram is accurate to eps32 * kappa^2: within the float32 lift's own eps32 * kappa
    # up to kappa = 10 (a quarter of the float64 Gram's time); a float64 one up to kappa = 100.
    torch.float32: [(torch.float32, 1e-2), (torch.float64, GRAM_CONDITION)],
}
"""Per factor dtype, the precisions a Gram matrix is tried in, each with its condition bound."""


@dataclass(frozen=True)
class Basis:
    """An orthonormal basis ``Q = F T`` of a stack's columns with the stack's coordinates ``C``
    in it; ``singular``: the rows of ``C`` are the stack's right singular vectors, scaled (so
    ``Q`` holds its left singular vectors, in descending order)."""

    F: torch.Tensor
    T: torch.Tensor | None
    C: torch.Tensor
    singular: bool

    def small(self, M: torch.Tensor) -> torch.Tensor:
        """``T @ M``: what ``F`` multiplies to give ``Q @ M``."""
        return M if self.T is None else self.T @ M

    def lift(self, M: torch.Tensor) -> torch.Tensor:
        """``Q @ M`` [m, k] for a small ``M`` [p, k]."""
        return self.F @ self.small(M)


def basis_of(X: torch.Tensor) -> Basis:
    """The Gram route's basis of ``X`` [m, R] when it is well conditioned, else Householder's."""
    return gram_basis(X) or qr_basis(X)


def qr_basis(X: torch.Tensor) -> Basis:
    """Householder QR ``X = Q C`` (``Q`` [m, min(m, R)])."""
    Q, C = torch.linalg.qr(X, mode="reduced")
    return Basis(Q, None, C, singular=False)


def gram_basis(X: torch.Tensor) -> Basis | None:
    """``X``'s left singular vectors from its Gram matrix, kept implicit, or None when ``X`` is
    rank deficient or worse conditioned than the Gram route allows (module doc)."""
    decomposed = gram_eigh(X)
    if decomposed is None:
        return None
    s, W = decomposed
    return Basis(X, (W / s).to(X.dtype), (s[:, None] * W.T).to(X.dtype), singular=True)


GramSource = Callable[[torch.dtype], torch.Tensor]
"""A factor stack's Gram matrix ``X^T X`` in the precision asked for (:class:`StackGram`)."""


def gram_eigh(
    X: torch.Tensor | list[torch.Tensor], small: torch.Tensor | None = None, gram: GramSource | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(s, W)``: ``X``'s singular values, descending, and right singular vectors, from ``X^T X``
    (batched over leading dims, or over a list of matrices of one shape); None unless ``X``
    [..., m, R] has ``R <= m`` and every matrix of the batch is conditioned well enough
    (:data:`GRAM_TIERS`). Given ``small`` [..., R, K], those of ``X @ small``, never formed: its
    Gram matrix is ``small^T (X^T X) small``. Given ``gram``, ``X^T X`` comes from it (a caller
    that needs it more than once), else from :func:`gram_matrices`."""
    first = X[0] if isinstance(X, list) else X
    columns = first.shape[-1] if small is None else small.shape[-1]
    if columns > first.shape[-2] or not columns:
        return None
    for dtype, condition in GRAM_TIERS.get(first.dtype, ()):
        G = gram(dtype) if gram is not None else gram_matrices(X, dtype)
        if small is not None:
            Sd = small.to(dtype)
            G = Sd.mT @ G @ Sd
        decomposed = well_conditioned_eigh(G, condition)
        if decomposed is not None:
            return decomposed
    return None


_STACK_BELOW = 1 << 16
"""Matrices of a list with fewer entries than this are stacked for one batched Gram GEMM; larger
ones get a GEMM each (:func:`gram_matrices`)."""


def gram_matrices(X: torch.Tensor | list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``X^T X`` in ``dtype``, batched over leading dims or over a list of matrices of one shape.
    A list of small matrices is stacked for one batched GEMM (at r = 16 and 1024 rows, 0.1 ms less
    than a GEMM each); larger ones get a GEMM each, as the stack would copy all of them (an
    adapter's factors: 7 MiB at n = 8 on Llama-3-8B's down projection, and 1 ms slower there)."""
    if isinstance(X, list):
        if X[0].numel() >= _STACK_BELOW:
            return torch.stack([(x := matrix.to(dtype)).mT @ x for matrix in X])
        # Stacked as they lie in memory: transposed views as their contiguous selves.
        X = torch.stack([m.mT for m in X]).mT if X[0].mT.is_contiguous() else torch.stack(X)
    Xd = X.to(dtype)
    return Xd.mT @ Xd


class StackGram:
    """The Gram matrices of one factor stack ``X`` [m, R] (``[B_1 ... B_n]``, or ``[A_1; ...;
    A_n]^T``) and of its blocks ``parts`` (the adapters' own factors, side by side in it), each
    computed once per precision: TSV needs the Gram matrix of every adapter's factor and then
    the stack's, whose diagonal blocks they are. In the stack's own precision a block is a slice
    of the stack's Gram matrix (no copy of the factors into a batch, no GEMM of its own); in a
    wider one each block gets its own (the stack's would cost ``n`` times their work)."""

    def __init__(self, X: torch.Tensor, parts: list[torch.Tensor]) -> None:
        self.X, self.parts = X, parts
        self.columns = rank_blocks([part.shape[-1] for part in parts])
        self._grams: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        """``X^T X`` in ``dtype``."""
        if dtype not in self._grams:
            self._grams[dtype] = gram_matrices(self.X, dtype)
        return self._grams[dtype]

    def of(self, members: list[int]) -> GramSource:
        """The batched Gram matrices of the ``members``' parts (of one shape)."""

        def grams(dtype: torch.dtype) -> torch.Tensor:
            if dtype != self.X.dtype:
                return gram_matrices([self.parts[i] for i in members], dtype)
            G = self(dtype)
            return torch.stack([G[self.columns[i], self.columns[i]] for i in members])

        return grams


def rank_blocks(ranks: list[int]) -> list[slice]:
    """Each adapter's columns (rows) in a factor stack of adapters of ``ranks``, side by side."""
    ends = list(accumulate(ranks))
    return [slice(end - rank, end) for rank, end in zip(ranks, ends, strict=True)]


def well_conditioned_eigh(
    G: torch.Tensor, condition: float = GRAM_CONDITION
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(sqrt(lambda), W)`` of a Gram matrix ``G = W diag(lambda) W^T``, descending (batched over
    leading dims: one LAPACK call each, but one torch call, where a small eigendecomposition costs
    less than its call); None unless ``lambda_min >= condition * lambda_max > 0`` for every
    matrix (NaN fails too). Diagonal entries lie between the extreme eigenvalues, so a diagonal
    that spreads wider than ``condition`` allows fails without the eigendecomposition: the float32
    tier of a badly conditioned stack then costs a GEMM, not also an eigendecomposition as long
    as the float64 tier's."""
    diagonal = G.diagonal(dim1=-2, dim2=-1)
    if not bool((diagonal.amin(dim=-1) >= condition * diagonal.amax(dim=-1)).all()):
        return None
    lam, W = torch.linalg.eigh(G)
    smallest, largest = lam[..., 0], lam[..., -1]
    if not bool(((smallest >= condition * largest) & (largest > 0)).all()):
        return None
    return lam.flip(-1).sqrt(), W.flip(-1)
