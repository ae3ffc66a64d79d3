"""Exact low-rank algebra on LoRA factors: thin QR/SVD of factor stacks, the SVD of a product
``B @ A`` from its factors, core space, polar factors. Nothing here builds an ``[out, in]`` matrix.

A module's task vectors are ``delta_i = B_i @ A_i`` (``B_i`` [out, r_i] with the scaling folded
in, ``A_i`` [r_i, in]); ``R = sum_i r_i``. Every big operation is a thin QR of an ``[out, R]`` or
``[in, R]`` stack (or of one adapter's ``[out, r_i]``) and a GEMM that lifts a small result back;
the rest works on ``R x R`` matrices.

Where the time goes (one core, float32, ``out, in`` ~ 1000-3000, ``R = 128``): a Householder QR
of a tall stack is about half of a merge, an ``R x R`` SVD a fifth, a lift GEMM a tenth. So stacks
are built column-major, the layout LAPACK factors (a QR copies its input into it: from a row-major
stack the copy is a transpose); a result whose core is as wide as a basis keeps that basis as its
factor (one lift GEMM, on the smaller of ``out`` and ``in``, instead of two); and many small
factorizations of one shape are batched (:func:`product_svds`). QR and SVD stay Householder-based
in the factors' own precision: a Gram-matrix or Cholesky shortcut would be about twice as fast on
the tall stacks but squares their condition number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmerge.methods._task_vectors import TaskVectors


def working_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 if any tensor is, else float32 (LAPACK has no half-precision QR or SVD)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_working(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The factors in their :func:`working_dtype`."""
    dtype = working_dtype([*As, *Bs])
    return [A.to(dtype) for A in As], [B.to(dtype) for B in Bs]


def thin_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder QR ``x = Q @ R`` with ``Q`` [..., m, min(m, k)] orthonormal (batched over leading dims)."""
    return torch.linalg.qr(x, mode="reduced")


def stacked_columns(Bs: list[torch.Tensor]) -> torch.Tensor:
    """``[B_1 ... B_n]`` [out, R], stored column-major: LAPACK's layout, so a QR copies it as it is."""
    return torch.cat([B.T for B in Bs]).T


def _batch(xs: list[torch.Tensor]) -> torch.Tensor:
    """The matrices ``xs`` (of one shape) stacked [g, m, k], each stored column-major (see above)."""
    return torch.stack([x.mT for x in xs]).mT


def rank_tolerance(largest: float | torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Singular values at or below this are zero: ``max(shape) * eps * largest``, the rule of
    ``numpy.linalg.matrix_rank`` for a matrix of ``shape`` whose largest singular value is ``largest``."""
    return float(largest) * max(shape) * torch.finfo(dtype).eps


def numerical_rank(S: torch.Tensor, tolerance: float) -> int:
    """How many of the descending singular values ``S`` are above ``tolerance``."""
    return int((S > tolerance).sum())


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P @ W^T`` of ``x = P diag(S) W^T`` (thin SVD): the nearest
    matrix with orthonormal columns (rows, when ``x`` is wide) to ``x``, as in Procrustes. A tall
    ``x`` goes through its thin QR first, so the SVD is of a square matrix of its width."""
    rows, cols = x.shape
    if rows > cols:
        Q, R = thin_qr(x)
        return Q @ polar(R)
    P, _, Wh = torch.linalg.svd(x, full_matrices=False)
    return P @ Wh


@dataclass(frozen=True)
class FactoredSVD:
    """The thin SVD ``B @ A = (Qb P) diag(S) (Wh Qa^T)`` of a product, kept factored: ``Qb``
    [m, p] and ``Qa`` [n, q] orthonormal, ``P`` [p, s], ``Wh`` [s, q]; singular values descending."""

    Qb: torch.Tensor
    P: torch.Tensor
    S: torch.Tensor
    Wh: torch.Tensor
    Qa: torch.Tensor

    def U(self, k: int) -> torch.Tensor:
        """The top ``k`` left singular vectors [m, k]."""
        return self.Qb @ self.P[:, :k]

    def Vh(self, k: int) -> torch.Tensor:
        """The top ``k`` right singular vectors as rows [k, n]."""
        return self.Wh[:k] @ self.Qa.T


def product_svd(B: torch.Tensor, A: torch.Tensor) -> FactoredSVD:
    """The thin SVD of ``B @ A`` (``B`` [m, r], ``A`` [r, n]) from its factors, in
    ``O((m + n) r^2)``: ``B = Qb Rb`` and ``A^T = Qa Ra`` (thin QR), then the SVD of the small
    ``Rb @ Ra^T``."""
    Qb, Rb = thin_qr(B)
    Qa, Ra = thin_qr(A.T)
    P, S, Wh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return FactoredSVD(Qb, P, S, Wh, Qa)


def product_svds(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> list[FactoredSVD]:
    """:func:`product_svd` of every ``Bs[i] @ As[i]``, batched per group of equal shapes (for many
    small products: a third less time than one call each for Iso-CTS's ``R x r_i`` cores)."""
    svds: dict[int, FactoredSVD] = {}
    for members in _groups([(B.shape, A.shape) for A, B in zip(As, Bs, strict=True)]):
        Qb, Rb = thin_qr(_batch([Bs[i] for i in members]))
        Qa, Ra = thin_qr(_batch([As[i].T for i in members]))
        P, S, Wh = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
        svds.update({i: FactoredSVD(Qb[j], P[j], S[j], Wh[j], Qa[j]) for j, i in enumerate(members)})
    return [svds[i] for i in range(len(Bs))]


def _groups(keys: list[Any]) -> list[list[int]]:
    """The indices of ``keys`` grouped by equal key. A batched QR or SVD runs LAPACK's routine on
    each matrix in turn, so each result is the one of its own call: batching saves the per-call
    overhead only, which for an adapter's thin ``[out, r_i]`` factor is a good part of the work."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class CoreSpace:
    """One module's task vectors in the orthonormal bases of their joint column and row spaces.

    ``Qb`` [out, p] spans the columns of ``[B_1 ... B_n]`` and ``Qa`` [in, q] the rows of
    ``[A_1; ...; A_n]`` (thin QR of the two stacks, ``p, q <= R``), so that, exactly,
    ``delta_i = Qb C_i Qa^T`` with the core ``C_i = Rb_i Ra_i^T`` [p, q] made of the two QR
    factors' column blocks of adapter i: every ``[out, in]`` computation becomes a ``p x q`` one.
    Results come back as LoRA factors through :meth:`lift`.
    """

    def __init__(self, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> None:
        As, Bs = as_working(As, Bs)
        self.out, self.inp = Bs[0].shape[0], As[0].shape[1]
        self.dtype = As[0].dtype
        self.n = len(As)
        self.Qb, self.Rb = thin_qr(stacked_columns(Bs))
        self.Qa, self.Ra = thin_qr(torch.cat(As, dim=0).T)  # the transpose of a row-major stack: column-major
        ends = torch.tensor([A.shape[0] for A in As]).cumsum(0).tolist()
        self.blocks = [slice(end - A.shape[0], end) for A, end in zip(As, ends, strict=True)]

    @property
    def R(self) -> int:
        """``sum_i r_i``, the rank bound of every result."""
        return self.Rb.shape[1]

    def left(self, i: int) -> torch.Tensor:
        """``Qb^T B_i`` [p, r_i]: adapter i's ``B`` in the column basis."""
        return self.Rb[:, self.blocks[i]]

    def right(self, i: int) -> torch.Tensor:
        """``(A_i Qa)^T`` [q, r_i]: adapter i's ``A`` in the row basis (transposed)."""
        return self.Ra[:, self.blocks[i]]

    def summed(self) -> torch.Tensor:
        """The core of ``sum_i delta_i``: ``Rb @ Ra^T``."""
        return self.Rb @ self.Ra.T

    def cores(self, Pb: torch.Tensor, Pa: torch.Tensor) -> torch.Tensor:
        """``[n, p, q]``: every ``Pb^T C_i Pa``, the cores in the bases ``Qb Pb`` and ``Qa Pa``."""
        left, right = Pb.T @ self.Rb, Pa.T @ self.Ra
        return torch.stack([left[:, block] @ right[:, block].T for block in self.blocks])

    def singular_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Pb [p, p], Pa [q, q])``: the rotations that take the QR bases to the SVD bases of
        Core Space merging, ``U = Qb Pb`` the left singular vectors of ``[B_1 ... B_n]`` and
        ``V = Qa Pa`` the right singular vectors of ``[A_1; ...; A_n]``."""
        Pb = torch.linalg.svd(self.Rb, full_matrices=False)[0]
        Pa = torch.linalg.svd(self.Ra, full_matrices=False)[0]
        return Pb, Pa

    def lift(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` with ``B' A' = Qb left right Qa^T`` (``left`` [p, k], ``right`` [k, q]), of
        rank at most ``k``: ``Qb left`` and ``right Qa^T``, or, when ``k`` is as large as a basis
        (``left right`` is no smaller a LoRA then), :meth:`lift_core` of ``left right``, one GEMM."""
        if left.shape[1] >= min(left.shape[0], right.shape[1]):
            return self.lift_core(left @ right)
        return right @ self.Qa.T, self.Qb @ left

    def lift_core(self, core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` with ``B' A' = Qb core Qa^T``, of rank ``min(p, q)``: the core goes into
        the factor of the smaller basis, the other factor is a basis itself (of two bases as wide,
        the one on the larger of ``out`` and ``in``, so that the GEMM is the smaller one)."""
        p, q = core.shape
        if p < q or (p == q and self.out >= self.inp):
            return core @ self.Qa.T, self.Qb
        return self.Qa.T, self.Qb @ core


@dataclass(frozen=True)
class ConcatenatedSVD:
    """The SVD of the task vectors side by side, ``[delta_1 ... delta_n] = U S [V_1^T ... V_n^T]``
    with ``U = Qz P`` [out, K] (``Qz`` orthonormal [out, K], ``P`` [K, K] a rotation), and ``SV``
    the per-task right factors scaled by the shared singular values, ``S V_i^T = U^T delta_i``
    [K, in] (KnOTS's), as task vectors built a block of rows at a time from their own factors;
    ``K = min(out, sum_i r_i)``."""

    Qz: torch.Tensor
    P: torch.Tensor
    SV: TaskVectors

    def lift(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` with ``B' A' = U merged`` (``merged`` [K, in]), of rank K: the rotation
        ``P`` goes into the factor on the smaller of ``out`` and ``in``."""
        if self.Qz.shape[0] > merged.shape[1]:
            return self.P @ merged, self.Qz
        return merged, self.Qz @ self.P


def concatenated_svd(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> ConcatenatedSVD:
    """The SVD of ``[delta_1 ... delta_n]`` (:class:`ConcatenatedSVD`) from the factors.

    With ``A_i^T = Qa_i Ra_i`` (thin QR of each adapter's ``A``) the concatenation is
    ``Z blockdiag(Qa_i^T)`` with ``Z = [B_1 Ra_1^T ... B_n Ra_n^T]`` [out, R] and orthonormal
    blocks, so its ``U`` and ``S`` are those of ``Z = Qz Rz``, from the SVD of the small ``Rz``,
    and ``U^T delta_i = (P^T Rz_i) Qa_i^T``."""
    As, Bs = as_working(As, Bs)
    Qas, Ras = zip(*(thin_qr(A.T) for A in As), strict=True)
    # Z built transposed, [R, out] row-major: Z column-major, as its QR takes it.
    Qz, Rz = thin_qr(torch.cat([Ra @ B.T for B, Ra in zip(Bs, Ras, strict=True)]).T)
    P = torch.linalg.svd(Rz, full_matrices=False)[0]
    ends = torch.tensor([Ra.shape[0] for Ra in Ras]).cumsum(0).tolist()
    lefts = [P.T @ Rz[:, end - Ra.shape[0] : end] for Ra, end in zip(Ras, ends, strict=True)]
    return ConcatenatedSVD(Qz, P, TaskVectors.from_factors([Qa.T for Qa in Qas], lefts))


def zero_factors(out: int, inp: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [1, in], B [out, 1])`` of a zero update: a LoRA needs rank 1 at least."""
    return torch.zeros(1, inp, dtype=dtype), torch.zeros(out, 1, dtype=dtype)
