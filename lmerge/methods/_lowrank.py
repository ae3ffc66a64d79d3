"""Exact low-rank algebra on LoRA factors: bases of factor stacks, the SVD of a product ``B @ A``
from its factors, core space (polar factors: :mod:`~lmerge.methods._polar`). Nothing here builds
an ``[out, in]`` matrix.

A module's task vectors are ``delta_i = B_i @ A_i`` (``B_i`` [out, r_i] with the scaling folded
in, ``A_i`` [r_i, in]); ``R = sum_i r_i``. Every big operation is an orthonormal basis of an
``[out, R]`` or ``[in, R]`` stack (or of one adapter's ``[out, r_i]``) and a GEMM that lifts a
small result back; the rest works on ``R x R`` matrices.

Where the time goes (one core, float32, ``out, in`` ~ 1000-3000, ``R = 128``): a Householder QR
of a tall stack takes about five times as long as the stack's Gram matrix, an ``R x R`` SVD about
three times an ``R x R`` eigendecomposition. So a well-conditioned stack's basis comes from its
Gram matrix (:mod:`~lmerge.methods._bases`: one GEMM and an ``R x R`` eigendecomposition, and
the basis is already the stack's singular vectors), any other one's from Householder QR; a
result whose core is as wide as a basis keeps the basis's tall factor, the stack itself on the
Gram route, as its own (one lift GEMM, on the smaller of ``out`` and ``in``, instead of two: the
stacks are laid out as the saved factors are, ``[B_1 ... B_n]`` and ``[A_1; ...; A_n]``
row-major); and many small factorizations of one shape are batched
(:func:`~lmerge.methods._products.product_svds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmerge.methods._bases import GRAM_TIERS, Basis, basis_of, gram_matrices, rank_blocks, well_conditioned_eigh
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


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAPACK's thin SVD ``x = P diag(S) Wh`` (batched over leading dims). When the float32
    divide-and-conquer SVD fails to converge on a finite matrix (MKL's does on some whose singular
    values cluster, such as a nearly orthonormal stack of singular vectors before its polar
    factor), the float64 one, rounded back."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64 or not bool(torch.isfinite(x).all()):
            raise
        P, S, Wh = torch.linalg.svd(x.double(), full_matrices=False)
        return P.to(x.dtype), S.to(x.dtype), Wh.to(x.dtype)


def rank_tolerance(largest: float | torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Singular values at or below this are zero: ``max(shape) * eps * largest``, the rule of
    ``numpy.linalg.matrix_rank`` for a matrix of ``shape`` whose largest singular value is ``largest``."""
    return float(largest) * max(shape) * torch.finfo(dtype).eps


def numerical_rank(S: torch.Tensor, tolerance: float) -> int:
    """How many of the descending singular values ``S`` are above ``tolerance``."""
    return int((S > tolerance).sum())


def factor_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """Frobenius norm of ``B @ A`` without building it: ``||BA||^2 = sum((B^T B) * (A A^T))``."""
    return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())


def small_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``x = P diag(S) Wh`` (descending) of a small matrix such as a core: from its
    Gram matrix ``x^T x = W diag(S^2) W^T`` when ``x`` is tall or square and conditioned well
    enough for the Gram's first tier (:data:`GRAM_TIERS`, in ``x``'s own precision), with
    ``P = x W diag(1/S)``: an eigendecomposition costs half an SVD of its size (a float64 one of
    float32 numbers would cost more than the float32 SVD, so there is no second tier); else
    LAPACK's SVD."""
    rows, cols = x.shape
    tiers = GRAM_TIERS.get(x.dtype)
    if tiers and 0 < cols <= rows:
        decomposed = well_conditioned_eigh(x.T @ x, tiers[0][1])  # the first tier: x's own precision
        if decomposed is not None:
            S, W = decomposed
            return x @ (W / S), S, W.T
    return thin_svd(x)


def lift_square(B: torch.Tensor, K: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' A' = B K A`` (``K`` square): ``K`` goes into the factor on the
    smaller of ``out`` and ``in``, so that the one GEMM is the smaller one."""
    if B.shape[0] >= A.shape[1]:
        return K @ A, B
    return A, B @ K


def _nonzero(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor has a nonzero entry: from their norms, one batched reduction (16
    ``any`` calls took six times as long), and entry by entry where a norm is zero (it can
    underflow) or NaN."""
    positive = (torch.stack(torch._foreach_norm(tensors)) > 0).tolist()
    return [found or bool(tensor.any()) for found, tensor in zip(positive, tensors, strict=True)]


def groups_of(keys: list[Any]) -> list[list[int]]:
    """The indices of ``keys`` grouped by equal key. A batched QR or SVD runs LAPACK's routine on
    each matrix in turn, so each result is the one of its own call: batching saves the per-call
    overhead only, which for an adapter's thin ``[out, r_i]`` factor is a good part of the work."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class CoreSpace:
    """One module's task vectors in orthonormal bases of their joint column and row spaces.

    ``Qb`` [out, p] spans the columns of ``[B_1 ... B_n]`` and ``Qa`` [in, q] the rows of
    ``[A_1; ...; A_n]`` (:mod:`~lmerge.methods._bases`: from the stacks' Gram matrices when they
    are well conditioned, else by Householder QR; ``p, q <= R``), so that, exactly,
    ``delta_i = Qb C_i Qa^T`` with the core ``C_i = Cb_i Ca_i^T`` [p, q] made of the two stacks'
    coordinate blocks of adapter i: every ``[out, in]`` computation becomes a ``p x q`` one.
    Results come back as LoRA factors through :meth:`lift`.

    An adapter whose update is zero (a factor all zeros, such as PEFT's ``B`` at initialization)
    is left out of the stacks, and its core is zero: its other factor would add directions that
    no task vector has, which turn every core (a merge such as TIES is not invariant under a
    rotation of them) and add rows or columns of zeros to them.
    """

    def __init__(self, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> None:
        As, Bs = as_working(As, Bs)
        self.out, self.inp = Bs[0].shape[0], As[0].shape[1]
        self.dtype = As[0].dtype
        self.n = len(As)
        nonzero = _nonzero([*As, *Bs])
        # Of a zero merge (no adapter of a nonzero update), the bases of the factors as they are.
        kept = [i for i in range(self.n) if nonzero[i] and nonzero[self.n + i]] or range(self.n)
        self.tasks = len(kept)  # adapters of a nonzero update here (all n, when none has)
        # Row-major [B_1 ... B_n]: as the saved B' it needs no copy.
        self.column = basis_of(torch.cat([Bs[i] for i in kept], dim=1))
        self.row = basis_of(torch.cat([As[i] for i in kept], dim=0).T)
        self.blocks = rank_blocks([A.shape[0] if i in kept else 0 for i, A in enumerate(As)])

    @property
    def R(self) -> int:
        """``sum_i r_i`` over the adapters of a nonzero update, the rank bound of every result."""
        return self.column.C.shape[1]

    def left(self, i: int) -> torch.Tensor:
        """``Qb^T B_i`` [p, r_i]: adapter i's ``B`` in the column basis."""
        return self.column.C[:, self.blocks[i]]

    def right(self, i: int) -> torch.Tensor:
        """``(A_i Qa)^T`` [q, r_i]: adapter i's ``A`` in the row basis (transposed)."""
        return self.row.C[:, self.blocks[i]]

    def summed(self) -> torch.Tensor:
        """The core of ``sum_i delta_i``: ``Cb @ Ca^T``."""
        return self.column.C @ self.row.C.T

    def sum_tolerance(self, largest: float | torch.Tensor) -> float:
        """:func:`rank_tolerance` for the sum of the task vectors, whose largest singular value is
        ``largest``, taken at no less than the largest task vector's scale (its Frobenius norm, an
        upper bound of its top singular value): the rounding error of a sum goes with its terms,
        so that where they cancel, exactly or in part, the remainder is not taken for directions."""
        largest_task = max(factor_norm(self.right(i).T, self.left(i)) for i in range(self.n))
        return rank_tolerance(max(float(largest), largest_task), (self.out, self.inp), self.dtype)

    def singular_bases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(Pb [p, p'], Pa [q, q'])``: the rotations that take the bases to the SVD bases of Core
        Space merging, ``U = Qb Pb`` the left singular vectors of ``[B_1 ... B_n]`` and
        ``V = Qa Pa`` the right singular vectors of ``[A_1; ...; A_n]``, of the stacks' numerical
        ranks ``p' <= p`` and ``q' <= q`` (at least 1); None for a basis that is one already (the
        Gram route's, of full rank). Singular vectors of a zero singular value would add rows or
        columns of zeros to every core: an adapter given twice would change the count of entries
        a top-k keeps, where in weight space TIES of an adapter with itself is its own."""
        return self._singular_rotation(self.column), self._singular_rotation(self.row)

    def _singular_rotation(self, basis: Basis) -> torch.Tensor | None:
        if basis.singular:
            return None
        P, S, _ = thin_svd(basis.C)
        stack = (basis.F.shape[0], basis.C.shape[1])
        return P[:, : max(1, numerical_rank(S, rank_tolerance(S[0], stack, S.dtype)))]

    def cores(self, Pb: torch.Tensor | None, Pa: torch.Tensor | None) -> TaskVectors:
        """Every ``Pb^T C_i Pa`` [p, q], the cores in the bases ``Qb Pb`` and ``Qa Pa`` (None: the
        identity), as task vectors built a block at a time from their factors ``(Pb^T Cb_i)
        (Pa^T Ca_i)^T``: the ``n x p x q`` stack never exists (at n = 32 and r = 16, 32 MiB)."""
        left = self.column.C if Pb is None else Pb.T @ self.column.C
        right = self.row.C if Pa is None else Pa.T @ self.row.C
        return TaskVectors.from_factors(
            [right[:, block].T for block in self.blocks], [left[:, block] for block in self.blocks]
        )

    def lift(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` with ``B' A' = Qb left right Qa^T`` (``left`` [p, k], ``right`` [k, q]), of
        rank at most ``k``: ``Qb left`` and ``right Qa^T``, or, when ``k`` is as large as a basis
        (``left right`` is no smaller a LoRA then), :meth:`lift_core` of ``left right``, one GEMM."""
        if left.shape[1] >= min(left.shape[0], right.shape[1]):
            return self.lift_core(left @ right)
        return self.row.small(right.T).T @ self.row.F.T, self.column.lift(left)

    def lift_core(
        self, core: torch.Tensor, Pb: torch.Tensor | None = None, Pa: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` with ``B' A' = Qb Pb core Pa^T Qa^T`` (``Pb``, ``Pa`` as from
        :meth:`singular_bases`; None the identity). With ``Q = F T`` for each basis, the small
        ``K = Tb Pb core Pa^T Ta^T`` goes into the factor of the narrower ``F``, the other factor
        is an ``F`` itself (of two as wide, the one on the larger of ``out`` and ``in``, so that
        the one GEMM is the smaller one)."""
        if Pb is not None:
            core = Pb @ core
        if Pa is not None:
            core = core @ Pa.T
        K = self.row.small(self.column.small(core).T).T
        Fb, Fa = self.column.F, self.row.F
        if Fb.shape[1] < Fa.shape[1] or (Fb.shape[1] == Fa.shape[1] and self.out >= self.inp):
            return K @ Fa.T, Fb
        return Fa.T, Fb @ K


@dataclass(frozen=True)
class ConcatenatedSVD:
    """The SVD of the task vectors side by side, ``[delta_1 ... delta_n] = U S [V_1^T ... V_n^T]``
    with ``U = F T`` [out, K] (``F`` [out, w] tall, ``T`` [w, K] small), and ``SV`` the per-task
    right factors scaled by the shared singular values, ``S V_i^T = U^T delta_i`` [K, in]
    (KnOTS's), as task vectors built a block of rows at a time from their own factors; ``K``
    the concatenation's numerical rank (its components of zero singular value left out), at most
    ``min(out, sum_i r_i)``."""

    F: torch.Tensor
    T: torch.Tensor
    SV: TaskVectors

    def lift(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` with ``B' A' = U merged`` (``merged`` [K, in]): ``T`` goes into the factor
        on the smaller of ``out`` and ``in``, ``F`` is the other."""
        if self.F.shape[0] > merged.shape[1]:
            return self.T @ merged, self.F
        return merged, self.F @ self.T


def concatenated_svd(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> ConcatenatedSVD:
    """The SVD of ``[delta_1 ... delta_n]`` (:class:`ConcatenatedSVD`) from the factors.

    With ``A_i = L_i Q_i^T`` (``Q_i`` [in, r_i] orthonormal) the concatenation is
    ``Z blockdiag(Q_i^T)`` with ``Z = [B_1 L_1 ... B_n L_n]`` [out, R] and orthonormal blocks, so
    its ``U`` and ``S`` are those of ``Z``, and ``U^T delta_i = (U^T Z)_i Q_i^T``. From Gram
    matrices when every ``A_i`` and ``Z`` are well conditioned (:mod:`~lmerge.methods._bases`),
    else by Householder QR."""
    As, Bs = as_working(As, Bs)
    return _concatenated_by_gram(As, Bs) or _concatenated_by_qr(As, Bs)


def _concatenated_by_gram(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> ConcatenatedSVD | None:
    X = torch.cat(Bs, dim=1)  # row-major: as the saved B' it needs no copy
    if X.shape[1] > X.shape[0] or any(A.shape[0] > A.shape[1] for A in As):
        return None  # rank deficient
    for dtype, condition in GRAM_TIERS.get(X.dtype, ()):
        found = _concatenated_in(As, X, dtype, condition)
        if found is not None:
            return found
    return None


def _concatenated_in(
    As: list[torch.Tensor], X: torch.Tensor, dtype: torch.dtype, condition: float
) -> ConcatenatedSVD | None:
    # A_i A_i^T = W_i diag(d_i^2) W_i^T: L_i = W_i diag(d_i), Q_i = A_i^T W_i diag(1/d_i) (never formed).
    rows = _row_eighs(As, dtype, condition)
    if rows is None:
        return None
    Xd = X.to(dtype)
    L = torch.block_diag(*[W * d for d, W in rows])
    # Z = X L, so Z^T Z = L^T (X^T X) L; U = Z W diag(1/s) = X (L W diag(1/s)) and U^T Z = diag(s) W^T.
    decomposed = well_conditioned_eigh(L.T @ (Xd.T @ Xd) @ L, condition)
    if decomposed is None:
        return None
    s, W = decomposed
    # U^T delta_i = (U^T Z)_i L_i^{-1} A_i with L^{-1} = blockdiag(diag(1/d_i) W_i^T): one GEMM for all.
    lefts = ((s[:, None] * W.T) @ torch.block_diag(*[(Wi / d).T for d, Wi in rows])).to(X.dtype)
    lefts = [lefts[:, block] for block in rank_blocks([A.shape[0] for A in As])]
    return ConcatenatedSVD(X, (L @ (W / s)).to(X.dtype), TaskVectors.from_factors(As, lefts))


def _row_eighs(
    As: list[torch.Tensor], dtype: torch.dtype, condition: float
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """:func:`~lmerge.methods._bases.well_conditioned_eigh` of every ``A_i A_i^T`` in ``dtype``,
    one batched call per rank; None if any is not well conditioned."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for members in groups_of([A.shape for A in As]):
        decomposed = well_conditioned_eigh(gram_matrices([As[i].T for i in members], dtype), condition)
        if decomposed is None:
            return None
        found.update({i: (decomposed[0][j], decomposed[1][j]) for j, i in enumerate(members)})
    return [found[i] for i in range(len(As))]


def _concatenated_by_qr(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> ConcatenatedSVD:
    # A_i^T = Qa_i Ra_i (thin QR): L_i = Ra_i^T; Z = Qz Rz, U = Qz P with P from the SVD of Rz.
    Qas, Ras = zip(*(thin_qr(A.T) for A in As), strict=True)
    # Z built transposed, [R, out] row-major: Z column-major, as its QR takes it.
    Z_t = torch.cat([Ra @ B.T for B, Ra in zip(Bs, Ras, strict=True)])
    Qz, Rz = thin_qr(Z_t.T)
    P, S, _ = thin_svd(Rz)
    # Only the components of nonzero singular values (at least one, a zero row if all are zero):
    # a stack short of full rank (a zero or duplicate adapter) would add rows of zeros to every
    # S V_i^T, and so entries to the count of a top-k.
    P = P[:, : max(1, numerical_rank(S, rank_tolerance(S[0], tuple(Z_t.shape), S.dtype)))]
    lefts = [P.T @ Rz[:, block] for block in rank_blocks([Ra.shape[0] for Ra in Ras])]
    return ConcatenatedSVD(Qz, P, TaskVectors.from_factors([Qa.T for Qa in Qas], lefts))


def zero_factors(out: int, inp: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [1, in], B [out, 1])`` of a zero update: a LoRA needs rank 1 at least."""
    return torch.zeros(1, inp, dtype=dtype), torch.zeros(out, 1, dtype=dtype)
