"""The SVD of a well-conditioned product ``B @ A`` of full rank from Gram matrices alone.

``B`` [m, R] and ``A`` [R, n] are factor stacks (``[B_1 ... B_n]`` and ``[A_1; ...; A_n]``), so
``B @ A`` is the summed task vectors. With ``A^T = Qa Ca`` from ``A``'s Gram eigendecomposition
(``Ca = diag(s) W^T``, ``Qa = A^T W diag(1/s)``, never formed), ``B @ A = Y Qa^T`` for
``Y = B Ca^T``, whose Gram matrix is ``H = Ca (B^T B) Ca^T = V diag(S^2) V^T``. So

    B @ A = U diag(S) (Qa V)^T,   U = B Ca^T V diag(1/S)

is the thin SVD, and ``U`` is an orthonormal basis of ``B``'s columns: two ``R x R``
eigendecompositions and the two Gram GEMMs, where a basis of each stack and the SVD of the summed
core take three factorizations. Results come back as factors of ``B`` and ``A`` themselves
(:meth:`GramProductSVD.left`, :meth:`GramProductSVD.right`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmerge.methods._bases import GRAM_TIERS, gram_eigh


@dataclass(frozen=True)
class GramProductSVD:
    """``B @ A = U diag(S) (Qa V)^T`` (module doc) in the factors' precision: ``S`` [R]
    descending, ``V`` [R, R], ``Ca`` [R, R] (``A^T = Qa Ca``), ``Ca_inv_t`` its inverse
    transposed, ``gram`` ``B^T B``."""

    S: torch.Tensor
    V: torch.Tensor
    Ca: torch.Tensor
    Ca_inv_t: torch.Tensor
    gram: torch.Tensor

    def left(self, M: torch.Tensor) -> torch.Tensor:
        """``K`` with ``B @ K = U @ M`` (``M`` [R, k] in the coordinates of ``U``)."""
        return self.Ca.T @ ((self.V / self.S) @ M)

    def right(self, M: torch.Tensor) -> torch.Tensor:
        """``K`` with ``K @ A = M @ (Qa)^T`` (``M`` [k, R] in the coordinates of ``Qa``)."""
        return M @ self.Ca_inv_t

    def polar(self) -> torch.Tensor:
        """``K`` [R, R] with ``B K A`` the orthogonal polar factor ``U (Qa V)^T`` of ``B @ A``."""
        return self.right(self.left(self.V.T))

    def stack_coordinates(self) -> torch.Tensor:
        """``U^T B`` [R, R]: ``B``'s columns in the basis ``U``, ``diag(1/S) V^T Ca B^T B``."""
        return (self.V.T / self.S[:, None]) @ (self.Ca @ self.gram)


def gram_product_svd(B: torch.Tensor, A: torch.Tensor) -> GramProductSVD | None:
    """:class:`GramProductSVD` of ``B @ A`` (``B`` [m, R], ``A`` [R, n]); None unless ``B @ A``
    has full rank ``R`` and is well conditioned.

    ``B^T B`` is tried in the precisions of :data:`GRAM_TIERS`, and taken when its rounding
    (about ``eps * ||B^T B||``, bounded by its largest row sum) reaches ``H`` as at most the
    tier's condition bound times ``H``'s smallest eigenvalue: the same accuracy as a basis from a
    Gram matrix (:mod:`~lmerge.methods._bases`)."""
    if A.shape[0] > min(B.shape[0], A.shape[1]):
        return None
    decomposed = gram_eigh(A.T)
    if decomposed is None:
        return None
    s, W = decomposed
    coordinates, inverse = s[:, None] * W.T, (W / s).T  # Ca and its inverse transposed
    for dtype, condition in GRAM_TIERS.get(B.dtype, ()):
        Bd, Ca = B.to(dtype), coordinates.to(dtype)
        G = Bd.T @ Bd
        H = Ca @ G @ Ca.T
        largest = float(s[0]) ** 2 * float(G.abs().sum(dim=1).max())  # >= lambda_max(H)
        if not bool(H.diagonal().min() >= condition * largest) or not largest > 0:
            continue  # lambda_min(H) <= its smallest diagonal entry: this tier fails, found without eigh
        lam, V = torch.linalg.eigh(H)
        if bool(lam[0] >= condition * largest):
            # Rounded to the factors' precision once decomposed: what follows is R x R products
            # of well-conditioned matrices, which a float64 tier would make several times slower
            # (at R = 512, most of the merge).
            parts = lam.flip(0).sqrt(), V.flip(1), Ca, inverse.to(dtype), G
            return GramProductSVD(*(part.to(B.dtype) for part in parts))
    return None
