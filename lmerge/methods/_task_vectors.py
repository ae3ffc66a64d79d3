"""One module's task vectors, handed to dense methods a block of rows at a time.

Each block is built from the LoRA factors into a reused buffer of a few MiB (kept for the next
module too, see ``_scratch``), so that the dense ``[n, out, in]`` stack never exists and every
elementwise step on a block runs while it is in cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from lmerge.methods._scratch import scratch

_BLOCK = 1 << 20
"""Entries per block (all task vectors together): 4 MiB of float32, so that a block and the
temporaries of the steps on it stay in cache, while each step is one call over many entries
(a torch call costs microseconds, more when it wakes another thread)."""
_MIN_ROWS = 12
"""Fewest rows a block of products has: MKL multiplies fewer rows with other kernels that round
differently, and with 12 or more every block is bitwise the same rows of the full ``B @ A``."""
ALIGN = 64
"""Blocks start at multiples of this many entries, so that a reduction over the task vectors
(``sum(dim=0)``) takes each entry through the same vectorized code as one over the whole stack:
a block is bitwise the rows of the full result."""


class TaskVectors:
    """The task vectors ``delta_i`` [out, in] of one module's n adapters, a block of rows at a time.

    From LoRA factors a block is ``B_i[rows] @ A_i`` computed into a reused buffer, a GEMM per
    task vector: a batched GEMM would need the factors stacked, a copy of one module's factors per
    merging thread (9 MiB at Llama-3-8B's MLP shapes and n = 8), for a few calls less per block.
    From a dense stack ``[n, out, in]`` a block is a copy of the rows.
    A block is scratch: the method may overwrite it.
    """

    def __init__(
        self,
        factors: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
        dense: torch.Tensor | None = None,
        block_elements: int = _BLOCK,
    ) -> None:
        if (factors is None) == (dense is None):
            raise ValueError("TaskVectors takes either factors or a dense stack")
        self._factors, self._dense, self._block_elements = factors, dense, block_elements
        if dense is not None:
            self.n, rows, cols = dense.shape
            self.dtype = dense.dtype
        else:
            As, Bs = factors
            self.n, rows, cols = len(As), Bs[0].shape[0], As[0].shape[1]
            self.dtype = torch.result_type(Bs[0], As[0])
        self.shape = (rows, cols)
        self.numel = rows * cols

    @classmethod
    def from_factors(cls, As: list[torch.Tensor], Bs: list[torch.Tensor], block_elements: int = _BLOCK) -> TaskVectors:
        """``delta_i = Bs[i] @ As[i]`` (``A_i`` [r_i, in], ``B_i`` [out, r_i])."""
        return cls(factors=(As, Bs), block_elements=block_elements)

    @classmethod
    def from_dense(cls, deltas: torch.Tensor, block_elements: int = _BLOCK) -> TaskVectors:
        """The stacked task vectors ``deltas`` [n, out, in]."""
        return cls(dense=deltas, block_elements=block_elements)

    @property
    def one_block(self) -> bool:
        """Whether :meth:`merge` hands all task vectors over in a single block."""
        return len(self._blocks()) == 1

    @property
    def block_numel(self) -> int:
        """Entries of the largest block :meth:`merge` hands over."""
        return self.n * max(rows.stop - rows.start for rows in self._blocks()) * self.shape[1]

    def merge(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """``[out, in]`` made of ``fn(block, start)`` for each block of rows: ``block`` [n, rows, in]
        holds those rows of every task vector and ``start`` is its first entry's flat index."""
        merged = torch.empty(self.shape, dtype=self.dtype)
        for block, start in self.blocks():
            row = start // self.shape[1]
            merged[row : row + block.shape[1]] = fn(block, start)
        return merged

    def blocks(self) -> Iterator[tuple[torch.Tensor, int]]:
        """Each block of rows ``[n, rows, in]`` in turn (scratch, valid until the next), with its
        first entry's flat index."""
        cols = self.shape[1]
        with scratch(self.block_numel, self.dtype) as buffer:
            for rows in self._blocks():
                block = buffer[: self.n * (rows.stop - rows.start) * cols].view(self.n, -1, cols)
                self._rows_into(rows, block)
                yield block, rows.start * cols

    def lattice(self, every: int) -> torch.Tensor:
        """``[n, m]``, a new tensor (the caller's to overwrite): the entries ``(row, col)`` with
        ``row % e == col % e`` of every task vector (``e = min(every, out, in)``), in the first
        whole multiples of ``e`` rows and columns: about ``numel / e`` each. Every row and every
        column is sampled, in equal shares, so the sample is nearly as good as one drawn at
        random; and it is one batched GEMM per task vector of the factors' rows and columns
        regrouped by their remainder, not a gather of single entries."""
        rows, cols = self.shape
        e = min(every, rows, cols)
        rows, cols = rows - rows % e, cols - cols % e
        if self._dense is not None:
            grid = self._dense[:, :rows, :cols].reshape(self.n, rows // e, e, cols // e, e)
            return grid.diagonal(dim1=2, dim2=4).clone(memory_format=torch.contiguous_format).reshape(self.n, -1)

        def by_remainder(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
            # [..., e, rows / e, cols / e]: group o multiplies B's rows o, o + e, ... by A's columns o, o + e, ...
            Bg = B[..., :rows, :].unflatten(-2, (rows // e, e)).transpose(-3, -2)
            Ag = A[..., :cols].unflatten(-1, (cols // e, e)).movedim(-1, -3)
            return Bg @ Ag

        return torch.stack([by_remainder(A, B) for A, B in zip(*self._factors, strict=True)]).reshape(self.n, -1)

    def _rows_into(self, rows: slice, out: torch.Tensor) -> None:
        if self._dense is not None:
            out.copy_(self._dense[:, rows])
        else:
            for i, (A, B) in enumerate(zip(*self._factors, strict=True)):
                torch.mm(B[rows], A, out=out[i])

    def _blocks(self) -> list[slice]:
        rows_per_block = self._block_elements // (self.n * self.shape[1])
        rows, align = self.shape[0], ALIGN // math.gcd(self.shape[1], ALIGN)
        rows_per_block = max(rows_per_block // align, -(-_MIN_ROWS // align), 1) * align
        starts = list(range(0, rows, rows_per_block))
        if len(starts) > 1 and rows - starts[-1] < _MIN_ROWS:
            starts.pop()  # a short last block joins the one before it
        return [slice(r0, r1) for r0, r1 in zip(starts, starts[1:] + [rows], strict=True)]
