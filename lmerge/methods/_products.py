"""The SVDs of many small products ``B_i @ A_i`` (one adapter's factors each) from their factors,
batched per shape: from the factors' Gram matrices when they are long and well conditioned
(:mod:`~lmerge.methods._bases`), else by batched Householder QRs; and, for a caller that needs no
SVD, each product's orthonormal bases and small core alone (:func:`product_cores`). TSV and
Iso-CTS factor every task this way, and the writers truncate a low-rank merge with it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmerge.methods._bases import GramSource, StackGram, gram_eigh
from lmerge.methods._lowrank import groups_of, thin_qr, thin_svd


@dataclass(frozen=True)
class FactoredSVD:
    """The thin SVD ``B @ A = (Fb P) diag(S) (Wh Fa^T)`` of a product, kept factored: ``Fb``
    [m, p] and ``Fa`` [n, q] tall (orthonormal bases, or ``B`` and ``A^T`` themselves with the
    bases' small factors folded into ``P`` [p, s] and ``Wh`` [s, q]); singular values descending."""

    Fb: torch.Tensor
    P: torch.Tensor
    S: torch.Tensor
    Wh: torch.Tensor
    Fa: torch.Tensor

    def U(self, k: int) -> torch.Tensor:
        """The top ``k`` left singular vectors [m, k]."""
        return self.Fb @ self.P[:, :k]

    def Vh(self, k: int) -> torch.Tensor:
        """The top ``k`` right singular vectors as rows [k, n]."""
        return self.Wh[:k] @ self.Fa.T


_GRAM_ROWS_PER_RANK = 32
"""A product's factors take the Gram route (:func:`product_svds`) from this many rows (of ``B``,
columns of ``A``) per unit of rank on: below, batched Householder QRs take less time (the Gram
route's eigendecompositions cost more than Householder QRs of short factors: at r = 16, up to
about 500 rows, such as Iso-CTS's cores)."""


def product_svds(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> list[FactoredSVD]:
    """The thin SVD of every ``Bs[i] @ As[i]`` (``B`` [m, r], ``A`` [r, n]) from its factors, in
    ``O((m + n) r^2)``: orthonormal bases ``B = Qb Rb`` and ``A^T = Qa Ra``, then the SVD of the
    small ``Rb @ Ra^T``. The bases come from the factors' Gram matrices when both are well
    conditioned and long enough (:mod:`~lmerge.methods._bases`: ``Qb = B Wb diag(1/sb)``,
    ``Rb = diag(sb) Wb^T``, never formed), else from thin QRs. Batched per group of equal
    shapes: a few torch calls per group, where TSV's and Iso-CTS's many small products would take
    dozens each (whose dispatch, under the interpreter lock, also keeps the merge's threads from
    running side by side)."""
    svds: dict[int, FactoredSVD] = {}
    for members in groups_of([(B.shape, A.shape) for A, B in zip(As, Bs, strict=True)]):
        group_B, group_A = [Bs[i] for i in members], [As[i] for i in members]
        gram = _product_svds_by_gram(group_B, group_A)
        svds.update(zip(members, gram or _product_svds_by_qr(group_B, group_A), strict=True))
    return [svds[i] for i in range(len(Bs))]


@dataclass(frozen=True)
class ProductCores:
    """Every ``B_i @ A_i = (B_i Tb[i]) C[i] (A_i^T Ta[i])^T`` with ``B_i Tb[i]`` and ``A_i^T Ta[i]``
    orthonormal: the Gram route's bases of ``B_i`` [m, r_i] and ``A_i^T`` [n, r_i], kept implicit
    (``B_i^T B_i = Wb diag(sb^2) Wb^T``, ``Tb[i] = Wb diag(1/sb)``), and the cores ``C[i] =
    diag(sb) Wb^T Wa diag(sa)`` [r_i, r_i]. ``full_rank``: every ``B_i @ A_i`` is of full
    numerical rank ``r_i`` for certain, as ``sigma_min(C) >= min(sb) min(sa)`` lies above the
    tolerance (:func:`rank_tolerance`) at ``sigma_max(C) <= max(sb) max(sa)``."""

    Tb: list[torch.Tensor]
    C: list[torch.Tensor]
    Ta: list[torch.Tensor]
    full_rank: bool


def product_cores(
    Bs: list[torch.Tensor], As: list[torch.Tensor], grams: tuple[StackGram, StackGram] | None = None
) -> ProductCores | None:
    """:class:`ProductCores` of the products ``Bs[i] @ As[i]``, in the factors' precision, batched
    per group of equal shapes; None unless every factor takes the Gram route (as
    :func:`product_svds` would: long enough and well conditioned). A few torch calls per group,
    not per task: each call hands the interpreter lock to the other merging threads and back
    (measured: tens of microseconds per call, when they wait for it). ``grams``: those of the
    stacks ``[B_1 ... B_n]`` and ``[A_1; ...; A_n]^T``, for a caller that needs them too."""
    if grams is None:
        grams = StackGram(torch.cat(Bs, dim=1), Bs), StackGram(torch.cat(As, dim=0).T, [A.T for A in As])
    found: dict[int, tuple[torch.Tensor, ...]] = {}
    full_rank = True
    for members in groups_of([(B.shape, A.shape) for A, B in zip(As, Bs, strict=True)]):
        group = _product_cores_by_gram(
            [Bs[i] for i in members], [As[i] for i in members], grams[0].of(members), grams[1].of(members)
        )
        if group is None:
            return None
        dtype = Bs[members[0]].dtype
        found.update(zip(members, zip(*(batch.to(dtype).unbind(0) for batch in group[:3]), strict=True), strict=True))
        full_rank = full_rank and bool(group[3].all())
    Tb, C, Ta = (list(part) for part in zip(*(found[i] for i in range(len(Bs))), strict=True))
    return ProductCores(Tb, C, Ta, full_rank)


def _product_cores_by_gram(
    Bs: list[torch.Tensor],
    As: list[torch.Tensor],
    gram_B: GramSource | None = None,
    gram_A: GramSource | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(Tb, C, Ta, full_rank)`` of :class:`ProductCores` for products of one shape, batched, in
    the precision their Gram matrices needed; None off the Gram route. ``gram_B``, ``gram_A``:
    the factors' batched Gram matrices when the caller has them."""
    (m, r), n = Bs[0].shape, As[0].shape[1]
    if min(m, n) < _GRAM_ROWS_PER_RANK * r:
        return None
    b, a = gram_eigh(Bs, gram=gram_B), gram_eigh([A.T for A in As], gram=gram_A)
    if b is None or a is None:
        return None
    dtype = torch.promote_types(b[0].dtype, a[0].dtype)  # one may have needed a float64 Gram
    (sb, Wb), (sa, Wa) = [[t.to(dtype) for t in pair] for pair in (b, a)]
    C = (sb[..., :, None] * (Wb.mT @ Wa)) * sa[..., None, :]
    largest, smallest = sb[..., 0] * sa[..., 0], sb[..., -1] * sa[..., -1]
    full_rank = smallest > largest * (max(m, n) * torch.finfo(Bs[0].dtype).eps)  # rank_tolerance's rule
    return Wb / sb[..., None, :], C, Wa / sa[..., None, :], full_rank


def _product_svds_by_gram(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> list[FactoredSVD] | None:
    # One shape: B = Qb Rb and A^T = Qa Ra from the Gram matrices, kept implicit (product_svds).
    cores = _product_cores_by_gram(Bs, As)
    if cores is None:
        return None
    Tb, C, Ta, _ = cores
    P, S, Wh = thin_svd(C)
    P, Wh = Tb @ P, Wh @ Ta.mT
    P, S, Wh = (t.to(Bs[0].dtype) for t in (P, S, Wh))
    return [FactoredSVD(B, P[j], S[j], Wh[j], A.T) for j, (B, A) in enumerate(zip(Bs, As, strict=True))]


def _product_svds_by_qr(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> list[FactoredSVD]:
    Qb, Rb = thin_qr(_batch(Bs))
    Qa, Ra = thin_qr(_batch([A.T for A in As]))
    P, S, Wh = thin_svd(Rb @ Ra.mT)
    return [FactoredSVD(Qb[j], P[j], S[j], Wh[j], Qa[j]) for j in range(len(Bs))]


def _batch(xs: list[torch.Tensor]) -> torch.Tensor:
    """The matrices ``xs`` (of one shape) stacked [g, m, k], each stored column-major: the layout
    LAPACK factors (a QR copies its input into it; from a row-major stack the copy is a transpose)."""
    return torch.stack([x.mT for x in xs]).mT
