"""Orthogonal polar factors (Procrustes), of tall factor stacks and of small matrices, never of
an ``[out, in]`` one: from the Gram matrix when it is well conditioned, else by thin QR and SVD."""

from __future__ import annotations

import torch

from lmerge.methods._bases import GramSource, gram_eigh
from lmerge.methods._lowrank import numerical_rank, rank_tolerance, thin_qr, thin_svd


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P @ W^T`` of ``x = P diag(S) W^T`` (thin SVD): the nearest
    matrix with orthonormal columns (rows, when ``x`` is wide) to ``x``, as in Procrustes. From
    the Gram matrix ``x^T x = W diag(S^2) W^T`` when a tall ``x`` is well conditioned (as the
    bases are, :mod:`~lmerge.methods._bases`): ``x (W diag(1/S) W^T)``; else a tall ``x`` goes
    through its thin QR first, so the SVD is of a square matrix of its width.

    Of an ``x`` short of full rank (numerically: :func:`~lmerge.methods._lowrank.rank_tolerance`),
    the partial isometry on its range: the components of zero singular value are left out. Their
    singular vectors are arbitrary, and the nearest orthonormal matrix would raise them to 1:
    TSV's ``U`` of two equal adapters would then hold as many arbitrary directions as real ones
    (with the partial isometry, it is their mean)."""
    if x.shape[0] < x.shape[1]:
        return polar(x.T).T
    return polar_given(x, polar_right(x))


def polar_given(x: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """:func:`polar` of ``x`` for a caller that has tried ``right = polar_right(x)`` already: not
    tried again (None: by QR and SVD, or, for a wide ``x``, as :func:`polar` does)."""
    rows, cols = x.shape
    if right is not None:
        return x @ right
    if rows < cols:
        return polar(x)
    if rows > cols:
        Q, R = thin_qr(x)
        return Q @ _square_polar(R, rows)
    return _square_polar(x, rows)


def polar_right(
    x: torch.Tensor, small: torch.Tensor | None = None, gram: GramSource | None = None
) -> torch.Tensor | None:
    """The small ``M = W diag(1/S) W^T`` with ``polar(x) = x @ M``, from the Gram matrix of a tall,
    well-conditioned ``x`` (None for any other ``x``): a caller that multiplies the polar factor
    by more small matrices keeps ``x`` as its tall factor, one GEMM fewer. A square ``x`` has no
    QR to save, and its SVD costs about what the Gram route's eigendecomposition and GEMMs do.
    Given ``small``, the ``M`` of ``x @ small`` (:func:`~lmerge.methods._bases.gram_eigh`), never
    formed: ``polar(x @ small) = x @ (small @ M)``. ``gram``: ``x^T x`` when the caller has it
    (:class:`~lmerge.methods._bases.StackGram`)."""
    rows, cols = x.shape[0], (x if small is None else small).shape[1]
    decomposed = gram_eigh(x, small, gram) if rows > cols else None
    if decomposed is None:
        return None
    S, W = decomposed
    return ((W / S) @ W.T).to(x.dtype)


def _square_polar(x: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`polar` of a square ``x``, the triangular factor of a matrix of ``rows`` rows (or that
    matrix itself), by its SVD, over its numerical rank."""
    P, S, Wh = thin_svd(x)
    rank = numerical_rank(S, rank_tolerance(S[0], (rows, x.shape[1]), S.dtype)) if S.numel() else 0
    return P[:, :rank] @ Wh[:rank]


EXTENDED_CONDITION = {torch.float64: 1e-5, torch.float32: 1e-8}
"""Per dtype of its rows, :func:`polar_rows_extending` needs ``lambda_min >= condition *
lambda_max`` of ``X X^T``: its float64 eigendecomposition then errs by about ``2e-16 /
condition``, 2e-11 for float64 rows (``kappa(X) <= 316``) and 2e-8 for float32 ones (``kappa <=
1e4``, within float32's own rounding, and well inside the numerical rank's tolerance)."""


def polar_rows_extending(C: torch.Tensor, T: torch.Tensor) -> torch.Tensor | None:
    """The orthogonal polar factor (orthonormal rows) of ``X = [C; T]`` whose first rows ``C``
    [c, k] are orthonormal already (Iso-CTS's common right singular vectors, then the tasks' own
    ``T`` [t, k]), from a ``2t``-square eigendecomposition instead of the SVD of ``X``.

    ``X X^T = I + N`` with ``N = [[0, E^T], [E, T T^T - I]]`` (``E = T C^T``) of rank at most
    ``2t``: with ``E^T = Qe Re`` (thin QR), ``N = Q N' Q^T`` for the orthonormal ``Q =
    blockdiag(Qe, I_t)`` and ``N' = [[0, Re], [Re^T, T T^T - I]]``. So from ``I + N' = W diag(mu)
    W^T`` (float64), ``(X X^T)^{-1/2} = I + Q (W diag(mu^{-1/2}) W^T - I) Q^T``, and the polar
    factor ``(X X^T)^{-1/2} X`` adds to ``X`` the rows ``Q Z`` with ``Z = (W diag(mu^{-1/2}) W^T -
    I) [Qe^T C; T]``. None unless ``X`` is conditioned well enough (:data:`EXTENDED_CONDITION`):
    of dependent rows its polar factor is a partial isometry, which :func:`polar` computes."""
    c, t = C.shape[0], T.shape[0]
    if not t:
        return None
    Cd, Td = C.double(), T.double()
    # C's rows are orthonormal only to C's precision (float32: ~1e-7), and the eigendecomposition
    # below takes C C^T as I exactly, an error amplified by kappa(X)^2: first orthonormalize them
    # to second order, C <- (I - D / 2) C with D = C C^T - I, a change within C's own rounding.
    D = Cd @ Cd.T
    D.diagonal().sub_(1.0)
    Cd = Cd - 0.5 * (D @ Cd)
    Qe, Re = thin_qr(Cd @ Td.T)  # E^T = C T^T
    w = Re.shape[0]
    # I + N', which is X X^T in the coordinates of Q.
    gram = torch.zeros(w + t, w + t, dtype=torch.float64)
    gram[:w, w:], gram[w:, :w], gram[w:, w:] = Re, Re.T, Td @ Td.T
    gram[:w, :w].diagonal().fill_(1.0)
    mu, W = torch.linalg.eigh(gram)
    # The eigenvalues of X X^T off Q's span are 1.
    largest = max(float(mu[-1]), 1.0) if c > w else float(mu[-1])
    if not float(mu[0]) >= EXTENDED_CONDITION.get(C.dtype, 1e-5) * largest:
        return None
    correction = (W * mu.rsqrt()) @ W.T
    correction.diagonal().sub_(1.0)
    Z = correction @ torch.cat([Qe.T @ Cd, Td])
    return torch.cat([Cd + Qe @ Z[:w], Td + Z[w:]]).to(C.dtype)
