"""Exact top-k cuts: where each task vector's ``k`` largest magnitudes end (:class:`Cut`).

Two ways to find them, both exact:

- :func:`exact_cuts`, by numpy's partition of every magnitude around the k-th largest (an
  introselect, in place), then two comparisons per entry to count the ties: for task vectors that
  sit in memory whole.
- :class:`BracketScan`, given a bracket ``(low, high]`` per task vector that very likely holds its
  k-th largest (from a sample): count the entries over ``high`` and gather the few inside the
  bracket, block by block, then select among those. Two comparisons per entry, and blocks can
  come one at a time.

On the CPU numpy does the selection and the comparisons: its ``partition``, ``greater``,
``flatnonzero`` and indexing take a fraction of the time of torch's ``kthvalue``, ``gt``,
``nonzero`` and indexing (a million float32 magnitudes in 8 rows, one thread: ``partition``
1.4 ms against ``kthvalue`` 10 ms, a comparison into a bool array 0.09 ms against 0.73 ms).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from lmerge.methods._scratch import scratch

_EXACT_ENTRIES = 1 << 20
"""Entries whose exact cuts :func:`exact_cuts` finds together; its scratch is 5 MiB (float32
magnitudes, partitioned in place, and a bool mask)."""


@dataclass(frozen=True)
class Cut:
    """Where a task vector's top-k by magnitude ends: keep ``|x| > before`` at flat indices below
    ``index`` and ``|x| > after`` from ``index`` on.

    With ``after`` the k-th largest magnitude and ``before`` the next smaller number, that is
    exactly k entries with peft's count rule: among entries tied at the k-th largest magnitude
    the first ones in flat order are kept (a stable sort's order). When fewer than k entries are
    nonzero, ``before = after = -1`` keeps everything: which zeros count among the k changes no
    sum, sign or count.
    """

    index: int
    before: float
    after: float

    def apply_(self, x: torch.Tensor, ahead: int) -> None:
        """Zero, in place, the dropped entries of the 1-D ``x``, whose first ``ahead`` entries are
        the ones with a flat index below ``index``."""
        shrink_(x[:ahead], self.before)
        shrink_(x[ahead:], self.after)


KEEP_ALL = Cut(0, -1.0, -1.0)
"""The cut of a task vector with at most k nonzero entries (any ``index``: both bounds keep all)."""


def exactly(cut: Cut, dtype: torch.dtype) -> tuple[float, float]:
    """A bracket that holds only the magnitudes at ``cut``, the k-th largest."""
    return (below(cut.after, dtype), cut.after) if cut.after > 0 else (0.0, 0.0)


def exact_cuts(x: torch.Tensor, k: int) -> list[Cut]:
    """The :class:`Cut` of each row of ``x`` [n, N] at its k-th largest magnitude (``0 < k < N``),
    for as many rows at a time as :data:`_EXACT_ENTRIES` allows: their temporaries are scratch
    buffers, reused from one group to the next."""
    rows = max(1, _EXACT_ENTRIES // x.shape[1])
    return [cut for group in x.split(rows) for cut in _exact_cuts_of(group, k)]


def _exact_cuts_of(x: torch.Tensor, k: int) -> list[Cut]:
    """:func:`exact_cuts` of all rows of ``x`` at once: numpy partitions each row's magnitudes in
    place around its k-th largest (introselect, linear time), then counts the magnitudes at least
    as large and those larger; only a row tied at its k-th largest looks for the flat position
    where its kept ties end."""
    n, size = x.shape
    top = size - k  # the k-th largest's place in a row sorted ascending
    # Its temporaries are scratch: fresh, they would cost a page fault per 4 KiB (module doc of
    # lmerge.methods._scratch), several times the arithmetic on them.
    with ExitStack() as buffers:
        scaled = buffers.enter_context(scratch(x.numel(), magnitude_dtype(x.dtype))).view(n, size)
        flags = buffers.enter_context(scratch(x.numel(), torch.bool)).view(n, size).numpy()
        torch.abs(x if x.dtype == scaled.dtype else scaled.copy_(x), out=scaled)  # one pass, or a widening copy first
        a = scaled.numpy()
        a.partition(top, axis=1)
        values = a[:, top].copy()  # each row's k-th largest magnitude
        at_least = _row_counts(np.greater_equal(a, values[:, None], out=flags))
        # Only the k - 1 places above the k-th can hold larger magnitudes.
        greater = _row_counts(np.greater(a[:, top + 1 :], values[:, None], out=flags[:, : k - 1]))
    belows = below_each(torch.from_numpy(values), x.dtype)  # a row whose k-th largest is 0 does not use its own
    cuts = []
    for i, (value, before) in enumerate(zip(values.tolist(), belows, strict=True)):
        if value == 0:  # fewer than k nonzero entries: keep them all
            cuts.append(KEEP_ALL)
            continue
        # Of the entries at exactly the k-th largest, the first k - greater (>= 1) in flat order are kept.
        tied = k - greater[i]
        if tied == at_least[i] - greater[i]:
            index = size
        else:
            index = int(np.flatnonzero(magnitudes(x[i]).numpy() == value)[tied - 1]) + 1
        cuts.append(Cut(index, before, value))
    return cuts


def _row_counts(flags: np.ndarray) -> list[int]:
    """The True entries of each row of ``flags``, one call per row: numpy counts along an axis slowly."""
    return [int(np.count_nonzero(row)) for row in flags]


class BracketScan:
    """Each task vector's entries over its bracket ``(low, high]`` counted and those inside it
    gathered (magnitude and flat index), block by block, then its exact :class:`Cut` from them.

    The bracket is only a guess: when the k-th largest magnitude is outside it, :meth:`cuts` gives
    the bracket beyond it instead, for another scan. The scan runs in numpy (module doc).
    """

    def __init__(self, brackets: list[tuple[float, float]], dtype: torch.dtype) -> None:
        bounds = torch.tensor(brackets, dtype=magnitude_dtype(dtype)).numpy()  # as the comparisons see them
        self.lows, self.highs = bounds[:, :1], bounds[:, 1:]
        self.dtype = dtype
        self.above = [0] * len(brackets)
        self._inside: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in brackets]

    def add(self, block: torch.Tensor, start: int, over: torch.Tensor, inside: torch.Tensor) -> None:
        """Scan ``block`` [n, L], the magnitudes of the task vectors' flat entries ``start`` to
        ``start + L`` (in :func:`magnitude_dtype`, CPU scratch); ``over`` and ``inside``: bool
        scratch [n, L]."""
        n, size = block.shape
        a, is_over, is_inside = block.numpy(), over.numpy(), inside.numpy()
        np.greater(a, self.highs, out=is_over)
        np.not_equal(np.greater(a, self.lows, out=is_inside), is_over, out=is_inside)
        flat = np.flatnonzero(is_inside)
        values = a.reshape(-1)[flat]
        ends = np.searchsorted(flat, np.arange(1, n + 1) * size).tolist()
        for i, (row, begin, end) in enumerate(zip(is_over, [0, *ends[:-1]], ends, strict=True)):
            self.above[i] += int(np.count_nonzero(row))  # per row: numpy counts along an axis slowly
            self._inside[i].append((values[begin:end], flat[begin:end] - (i * size - start)))

    def cuts(self, k: int, numel: int) -> list[Cut | tuple[float, float]]:
        """Per task vector (``numel`` entries, keep ``k``), its exact :class:`Cut`, or, if its k-th
        largest magnitude is not in its bracket, the bracket beyond it."""
        found: list[Cut | tuple[float, float]] = []
        selected: dict[int, tuple[int, float]] = {}  # task vector -> (index, k-th largest)
        for i, pieces in enumerate(self._inside):
            low, high = float(self.lows[i, 0]), float(self.highs[i, 0])
            rank = k - self.above[i]
            inside = np.concatenate([values for values, _ in pieces])
            if rank < 1:
                found.append((high, math.inf))
            elif rank > inside.size:  # at or below low; all of it if fewer than k are nonzero
                found.append((0.0, low) if low > 0 else KEEP_ALL)
            else:
                value = np.partition(inside, inside.size - rank)[inside.size - rank]
                greater = self.above[i] + int(np.count_nonzero(inside > value))
                equal = np.flatnonzero(inside == value)
                tied = k - greater  # entries at exactly the k-th largest that are kept: the first ones
                if tied == equal.size:
                    index = numel
                else:
                    index = int(np.concatenate([where for _, where in pieces])[equal[tied - 1]]) + 1
                selected[i] = (index, float(value))
                found.append(KEEP_ALL)  # replaced below, once every k-th largest is known
        values = torch.tensor([value for _, value in selected.values()], dtype=self.dtype)
        for (i, (index, value)), before in zip(selected.items(), below_each(values, self.dtype), strict=True):
            found[i] = Cut(index, before, value)
        return found


def magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in float32 or float64 (half types are exact in float32, and numpy has no bfloat16)."""
    return x.abs().to(magnitude_dtype(x.dtype))


def magnitudes_(x: torch.Tensor) -> torch.Tensor:
    """:func:`magnitudes` of ``x``, in place when ``x`` is already float32 or float64."""
    return x.abs_() if x.dtype == magnitude_dtype(x.dtype) else magnitudes(x)


def magnitude_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32 (which holds every half-precision number exactly)."""
    return dtype if dtype == torch.float64 else torch.float32


_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value`` (a positive, finite ``dtype`` number)."""
    return below_each(torch.tensor([value], dtype=dtype), dtype)[0]


def below_each(values: torch.Tensor, dtype: torch.dtype) -> list[float]:
    """:func:`below` of each of the 1-D ``values`` (``dtype`` numbers), in one call."""
    return (values.to(dtype).view(_BITS[dtype]) - 1).view(dtype).tolist()


def shrink_(x: torch.Tensor, lambd: float) -> torch.Tensor:
    """Zero, in place, the entries of ``x`` with ``|x| <= lambd``: one float pass, no bool mask."""
    if x.numel() and lambd >= 0:
        torch.hardshrink(x, lambd, out=x)
    return x
