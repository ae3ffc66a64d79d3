"""Exact top-k cuts: where each task vector's ``k`` largest magnitudes end (:class:`Cut`).

Two ways to find them, both exact:

- :func:`exact_cuts`, from one histogram of every magnitude, then an exact selection among the
  entries of the bin that holds the k-th largest: for task vectors that sit in memory whole.
- :class:`BracketScan`, given a bracket ``(low, high]`` per task vector that very likely holds its
  k-th largest (from a sample): count the entries over ``high`` and gather the few inside the
  bracket, block by block, then select among those. Two comparisons per entry, where a histogram
  costs an increment at a random place in a table; and blocks can come one at a time.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from lmerge.methods._scratch import scratch

BINS = 4096
"""Histogram bins per task vector, for the k-th largest of a set of magnitudes and a sample's
order statistics: the bin that holds the k-th of a few million entries has about a thousand."""
_EXACT_ENTRIES = 1 << 20
"""Entries whose exact cuts :func:`exact_cuts` finds together (each call is dozens of torch
calls); its scratch is 5 MiB (float32 magnitudes, their bins in place, and a bool mask)."""


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
    """:func:`exact_cuts` of all rows of ``x`` at once: one histogram of every row's magnitudes,
    then an exact selection among the entries of the bin that holds the k-th (rounded
    multiplication and truncation are monotone, so every entry of a higher bin is larger)."""
    n, size = x.shape
    # Its temporaries are scratch: fresh, they would cost a page fault per 4 KiB (module doc of
    # lmerge.methods._scratch), several times the arithmetic on them.
    with ExitStack() as buffers:
        scaled = buffers.enter_context(scratch(x.numel(), magnitude_dtype(x.dtype))).view(n, size)
        # float32 magnitudes become their bins in place (each entry converted where it lies): a
        # buffer less to keep in cache; float64 ones are twice as wide as their bins.
        if scaled.dtype == torch.float32:
            bins = scaled.view(torch.int32)
        else:
            bins = buffers.enter_context(scratch(x.numel(), torch.int32)).view(n, size)
        matches = buffers.enter_context(scratch(x.numel(), torch.bool)).view(n, size)
        torch.abs(x if x.dtype == scaled.dtype else scaled.copy_(x), out=scaled)  # one pass, or a widening copy first
        # A row that cannot be binned goes to bin 0 whole: the selection is among all its entries.
        counts = histogram_(scaled, bins)[1]
        at_or_above = counts.flip(1).cumsum(1).flip(1)
        rows = torch.arange(n)
        holding = (at_or_above >= k).sum(dim=1) - 1
        above = (at_or_above - counts)[rows, holding]  # entries in higher bins, all larger
        sizes = counts[rows, holding]
        # Every row's entries in the bin holding its k-th largest, rows in order and each row's in
        # flat order, then sorted by magnitude within each row (stable sorts): all rows in a few calls.
        target = (holding + rows * BINS).to(bins.dtype).view(n, 1)
        flat = _positions_equal(bins, target, matches)
    row_of, where = flat.div(size, rounding_mode="floor"), flat.remainder(size)
    inside = magnitudes(x[row_of, where])
    order = inside.argsort(stable=True)
    order = order[row_of[order].argsort(stable=True)]
    values = inside[order][sizes.cumsum(0) - (k - above)]  # each row's k-th largest magnitude
    greater = torch.zeros(n, dtype=torch.int64).index_add_(0, row_of, (inside > values[row_of]).long())
    equal = inside == values[row_of]
    equals = torch.zeros(n, dtype=torch.int64).index_add_(0, row_of, equal.long())
    # Of the entries at exactly the k-th largest, the first k - greater (>= 1) in flat order are kept.
    tied = k - above - greater
    belows = below_each(values, x.dtype)  # a row whose k-th largest is 0 does not use its own
    cuts = []
    rows_data = zip(values.tolist(), belows, tied.tolist(), equals.tolist(), strict=True)
    for i, (value, before, keep, count) in enumerate(rows_data):
        if value == 0:  # fewer than k nonzero entries: keep them all
            cuts.append(KEEP_ALL)
            continue
        index = size if count == keep else int(where[equal & (row_of == i)][keep - 1]) + 1
        cuts.append(Cut(index, before, value))
    return cuts


def histogram_(magnitudes: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, counts)``: each row of ``magnitudes`` [n, m] (float32 or float64, overwritten
    by ``magnitudes * scale``) counted in :data:`BINS` equal bins from 0 to its maximum, entry
    ``x`` in bin ``trunc(x * scale)``; ``bins`` (int32 [n, m], which may be ``magnitudes``'
    own memory viewed as int32: each entry is converted where it lies) gets each entry's bin
    plus ``BINS`` times its row. A row of zeros, with a denormal maximum or with inf/nan cannot
    be binned: its scale is 0 and all of it goes to bin 0 (the clamp also takes inf * 0 = nan
    there)."""
    n = magnitudes.shape[0]
    scale = BINS / magnitudes.amax(dim=1)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 0.0)
    bins.copy_(magnitudes.mul_(scale.view(n, 1))).clamp_(0, BINS - 1)  # the copy truncates
    bins.add_(torch.arange(0, n * BINS, BINS, dtype=torch.int32).view(n, 1))
    return scale, torch.bincount(bins.view(-1), minlength=n * BINS).view(n, BINS)


def _positions_equal(values: torch.Tensor, target: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """The flat indices (ascending, int64) of the entries of ``values`` [n, size] equal to
    ``target`` [n, 1]; ``matches`` (bool, shaped as ``values``) is scratch. By numpy, whose
    comparison and ``flatnonzero`` take a tenth of the time of torch's ``eq`` into a bool tensor
    and ``nonzero`` on the CPU (a million int32 entries: 0.07 + 0.12 ms against 0.8 + 0.9 ms);
    the exact cuts' buffers are CPU scratch."""
    found = np.equal(values.numpy(), target.numpy(), out=matches.numpy())
    return torch.from_numpy(np.flatnonzero(found))


class BracketScan:
    """Each task vector's entries over its bracket ``(low, high]`` counted and those inside it
    gathered (magnitude and flat index), block by block, then its exact :class:`Cut` from them.

    The bracket is only a guess: when the k-th largest magnitude is outside it, :meth:`cuts` gives
    the bracket beyond it instead, for another scan. The scan runs in numpy, whose ``greater``,
    ``flatnonzero`` and indexing take a fraction of the time of torch's ``gt``, ``nonzero`` and
    indexing on the CPU.
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
    """``|x|`` in float32 or float64 (half types are exact in float32, and histograms want it)."""
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
