"""Exact top-k by magnitude per task vector, fused with the merge of the pruned task vectors.

The count rule is peft's ``prune(..., method="magnitude")``: ``int(keep_fraction * numel)``
entries survive, and among entries tied at the k-th largest magnitude the first ones in flat
order (a stable sort's order). No sort and no separate pass over the data: a sample of rows
brackets each task vector's k-th largest magnitude, one merging pass keeps what lies above the
brackets, and the few positions with an entry inside one are merged again once the exact cuts
are known. Task vectors that fit in one block together (a low-rank method's cores or per-task
right factors) need no sample: their exact cuts come from the block itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from lmerge.methods._scratch import scratch
from lmerge.methods._task_vectors import ALIGN, TaskVectors

_BINS = 4096
"""Histogram bins per task vector, for the sample's order statistics and for the k-th largest of
a set of magnitudes: the bin that holds the k-th of a few million entries has about a thousand."""
_SAMPLE_EVERY = 16
"""A task vector is sampled at one entry in this many (a lattice, see ``TaskVectors.lattice``)
to bracket its k-th largest magnitude: a larger sample costs more but narrows the brackets,
so that fewer positions are merged twice."""
_SAMPLE_ALL = 1 << 16
"""Task vectors with at most this many entries are sampled whole: their brackets are exact."""
_EXACT_ENTRIES = 1 << 20
"""Entries whose exact cuts are found together (:func:`_exact_cuts`): all eight tasks of a KnOTS
module of 128 x 1024 right factors in one call (each call is dozens of torch calls, a third of
the time for one task's 131072 entries); its scratch is 5 MiB (float32 magnitudes, their bins
in place, and a bool mask)."""
_Z = 4.0
"""Half-width of a bracket in standard deviations of the sample's rank: about one bracket in
15000 misses, and then the module is merged again with a bracket that cannot miss."""


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
        _shrink_(x[:ahead], self.before)
        _shrink_(x[ahead:], self.after)


def merge_top_k(deltas: TaskVectors, keep_fraction: float, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` of the task vectors, each cut to its ``int(keep_fraction * numel)`` largest magnitudes.

    ``fn`` maps a block ``[n, ..., in]`` (scratch) to its merge ``[..., in]`` position by position.
    The cut is exact (see :class:`Cut`) yet takes no separate pass: a sample of rows brackets
    each task vector's k-th largest magnitude in ``(low, high]``, entries above a bracket are
    kept and the others outside it dropped for sure, so a position where no task vector has an
    entry inside its bracket is merged at once. The other positions (a few percent) are gathered
    and merged again once the entries inside the brackets have given the exact cuts.
    """
    return _top_k(deltas, keep_fraction, fn)[0]


def topk_mask(x: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask of the ``int(keep_fraction * x.numel())`` entries of largest ``|x|``.

    The count rule is peft's ``prune(..., method="magnitude")``. Among entries tied at the
    threshold the first ones in flattened order are kept, so exactly that many survive.
    """
    flat = x.detach().reshape(1, 1, -1)
    cut = _top_k(TaskVectors.from_dense(flat), keep_fraction, lambda block: block[0])[1][0]
    a = flat.reshape(-1).abs()
    mask = a > cut.after
    mask[: cut.index] = a[: cut.index] > cut.before
    if cut.after < 0:  # fewer than k nonzero entries: the first zeros make up the count
        zeros = a == 0
        mask = ~zeros | (zeros & (zeros.cumsum(0) <= int(keep_fraction * x.numel()) - int((~zeros).sum())))
    return mask.view(x.shape)


def _top_k(
    deltas: TaskVectors, keep_fraction: float, fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, list[Cut]]:
    """:func:`merge_top_k`'s merge and the cuts it made."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    numel = deltas.numel
    k = int(keep_fraction * numel)
    if k in (0, numel):
        cut = Cut(0, math.inf, math.inf) if k == 0 else Cut(numel, -1.0, -1.0)
        return deltas.merge(lambda block, start: fn(_shrink_(block, cut.after))), [cut] * deltas.n
    if deltas.one_block:
        return _merge_in_one_block(deltas, k, fn)
    merged, found = _bracketed_merge(deltas, k, _brackets(deltas, k), fn)
    if not all(isinstance(cut, Cut) for cut in found):
        # A bracket missed: merge again with it widened to all that lies beyond (which cannot
        # miss) and the others narrowed to the entries at their exact cut.
        brackets = [_exactly(cut, deltas.dtype) if isinstance(cut, Cut) else cut for cut in found]
        merged, found = _bracketed_merge(deltas, k, brackets, fn)
        if not all(isinstance(cut, Cut) for cut in found):
            raise AssertionError(f"top-k brackets {brackets} missed again: {found}")
    return merged, found


def _merge_in_one_block(
    deltas: TaskVectors, k: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, list[Cut]]:
    """The merge of task vectors that :meth:`TaskVectors.merge` hands over in one block: each
    one's exact cut from the block, applied in place, then ``fn``. A sample and its brackets would
    cost more than they save here: about a quarter of a small block's positions would have an
    entry inside some task vector's bracket, and be merged twice."""
    cuts: list[Cut] = []

    def merge_block(block: torch.Tensor, start: int) -> torch.Tensor:
        flat = block.view(block.shape[0], -1)
        cuts.extend(_exact_cuts(flat, k))
        for x, cut in zip(flat, cuts, strict=True):
            cut.apply_(x, cut.index)
        return fn(block)

    return deltas.merge(merge_block), cuts


def _exact_cuts(x: torch.Tensor, k: int) -> list[Cut]:
    """The :class:`Cut` of each row of ``x`` [n, N] at its k-th largest magnitude (``0 < k < N``),
    for as many rows at a time as :data:`_EXACT_ENTRIES` allows: their temporaries are scratch
    buffers, reused from one group to the next."""
    rows = max(1, _EXACT_ENTRIES // x.shape[1])
    return [cut for group in x.split(rows) for cut in _exact_cuts_of(group, k)]


def _exact_cuts_of(x: torch.Tensor, k: int) -> list[Cut]:
    """:func:`_exact_cuts` of all rows of ``x`` at once: one histogram of every row's magnitudes,
    then an exact selection among the entries of the bin that holds the k-th (all entries of a
    higher bin are larger: see :func:`_kth_largest`)."""
    n, size = x.shape
    # Its temporaries are scratch: fresh, they would cost a page fault per 4 KiB (module doc of
    # lmerge.methods._scratch), several times the arithmetic on them.
    with ExitStack() as buffers:
        scaled = buffers.enter_context(scratch(x.numel(), _magnitude_dtype(x.dtype))).view(n, size)
        # float32 magnitudes become their bins in place (each entry converted where it lies): a
        # buffer less to keep in cache; float64 ones are twice as wide as their bins.
        if scaled.dtype == torch.float32:
            bins = scaled.view(torch.int32)
        else:
            bins = buffers.enter_context(scratch(x.numel(), torch.int32)).view(n, size)
        matches = buffers.enter_context(scratch(x.numel(), torch.bool)).view(n, size)
        torch.abs(x if x.dtype == scaled.dtype else scaled.copy_(x), out=scaled)  # one pass, or a widening copy first
        scale = _BINS / scaled.amax(dim=1)
        # A row of zeros, with a denormal maximum or with inf/nan cannot be binned: all of it goes
        # to bin 0 (the clamp also takes inf * 0 = nan there), and the selection is among all its
        # entries.
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 0.0)
        bins.copy_(scaled.mul_(scale.view(n, 1))).clamp_(0, _BINS - 1)  # the copy truncates
        bins.add_(torch.arange(0, n * _BINS, _BINS, dtype=torch.int32).view(n, 1))
        counts = torch.bincount(bins.view(-1), minlength=n * _BINS).view(n, _BINS)
        at_or_above = counts.flip(1).cumsum(1).flip(1)
        rows = torch.arange(n)
        holding = (at_or_above >= k).sum(dim=1) - 1
        above = (at_or_above - counts)[rows, holding]  # entries in higher bins, all larger
        sizes = counts[rows, holding]
        # Every row's entries in the bin holding its k-th largest, rows in order and each row's in
        # flat order, then sorted by magnitude within each row (stable sorts): all rows in a few calls.
        target = (holding + rows * _BINS).to(bins.dtype).view(n, 1)
        flat = _positions_equal(bins, target, matches)
    row_of, where = flat.div(size, rounding_mode="floor"), flat.remainder(size)
    inside = _magnitudes(x[row_of, where])
    order = inside.argsort(stable=True)
    order = order[row_of[order].argsort(stable=True)]
    values = inside[order][sizes.cumsum(0) - (k - above)]  # each row's k-th largest magnitude
    greater = torch.zeros(n, dtype=torch.int64).index_add_(0, row_of, (inside > values[row_of]).long())
    equal = inside == values[row_of]
    equals = torch.zeros(n, dtype=torch.int64).index_add_(0, row_of, equal.long())
    # Of the entries at exactly the k-th largest, the first k - greater (>= 1) in flat order are kept.
    tied = k - above - greater
    belows = _below_each(values, x.dtype)  # a row whose k-th largest is 0 does not use its own
    cuts = []
    rows_data = zip(values.tolist(), belows, tied.tolist(), equals.tolist(), strict=True)
    for i, (value, below, keep, count) in enumerate(rows_data):
        if value == 0:  # fewer than k nonzero entries: keep them all
            cuts.append(Cut(size, -1.0, -1.0))
            continue
        index = size if count == keep else int(where[equal & (row_of == i)][keep - 1]) + 1
        cuts.append(Cut(index, below, value))
    return cuts


def _positions_equal(values: torch.Tensor, target: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """The flat indices (ascending, int64) of the entries of ``values`` [n, size] equal to
    ``target`` [n, 1]; ``matches`` (bool, shaped as ``values``) is scratch. On the CPU by numpy,
    whose comparison and ``flatnonzero`` take a tenth of the time of torch's ``eq`` into a bool
    tensor and ``nonzero`` (a million int32 entries: 0.07 + 0.12 ms against 0.8 + 0.9 ms)."""
    if values.device.type != "cpu":
        return torch.eq(values, target, out=matches).view(-1).nonzero().view(-1)
    found = np.equal(values.numpy(), target.numpy(), out=matches.numpy())
    return torch.from_numpy(np.flatnonzero(found))


def _exactly(cut: Cut, dtype: torch.dtype) -> tuple[float, float]:
    """A bracket that holds only the magnitudes at ``cut``, the k-th largest."""
    return (_below(cut.after, dtype), cut.after) if cut.after > 0 else (0.0, 0.0)


def _brackets(deltas: TaskVectors, k: int) -> list[tuple[float, float]]:
    """Per task vector ``(low, high)`` such that its k-th largest magnitude very likely lies in
    ``(low, high]``, from one histogram of a sample of all task vectors (exact when the sample is
    everything): the k-th largest's rank in a sample of m is ``k * m / numel``, give or take
    ``_Z`` binomial standard deviations, widened to whole histogram bins."""
    every = 1 if deltas.numel <= _SAMPLE_ALL else _SAMPLE_EVERY
    sample = _magnitudes(deltas.lattice(every))
    n, m = sample.shape
    expected = k * m / deltas.numel
    spread = _Z * math.sqrt(expected * (1 - k / deltas.numel)) if every > 1 else 0.0
    top, bottom = math.floor(expected - spread) - 1, math.ceil(expected + spread) + 1
    scale = _BINS / sample.amax(dim=1)
    binnable = torch.isfinite(scale) & (scale > 0)
    scale = torch.where(binnable, scale, 0.0)
    # The clamp also keeps the bins of a task vector that cannot be binned (inf * 0 is nan) valid.
    bins = sample.mul_(scale.view(n, 1)).to(torch.int32).clamp_(0, _BINS - 1)
    bins.add_(torch.arange(0, n * _BINS, _BINS, dtype=torch.int32).view(n, 1))
    counts = torch.bincount(bins.view(-1), minlength=n * _BINS).view(n, _BINS)
    at_or_above = counts.flip(1).cumsum(1).flip(1)
    # The bins that hold the top-th and bottom-th largest sampled entries, and one bin of margin
    # on each side (x * scale rounds, so a bin's edges are fuzzy).
    highs = ((at_or_above >= max(top, 1)).sum(dim=1) + 1).double() / scale.double()
    lows = ((at_or_above >= min(bottom, m)).sum(dim=1) - 2).clamp_(min=0).double() / scale.double()
    brackets = []
    for i in range(n):
        if not bool(binnable[i]):  # all zeros, a denormal maximum or inf/nan: no histogram
            brackets.append((0.0, math.inf))
        else:
            brackets.append((float(lows[i]) if bottom <= m else 0.0, float(highs[i]) if top >= 1 else math.inf))
    return brackets


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in float32 or float64 (half types are exact in float32, and histograms want it)."""
    return x.abs().to(_magnitude_dtype(x.dtype))


def _magnitude_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32 (which holds every half-precision number exactly)."""
    return dtype if dtype == torch.float64 else torch.float32


def _bracketed_merge(
    deltas: TaskVectors,
    k: int,
    brackets: list[tuple[float, float]],
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, list[Cut | tuple[float, float]]]:
    """One merging pass with each task vector's k-th largest magnitude taken to lie in its
    bracket ``(low, high]``; per task vector its exact :class:`Cut`, or a wider bracket if not."""
    n = deltas.n
    above = torch.zeros(n, dtype=torch.float64)
    # Per block, the positions where some task vector has an entry inside its bracket, and all
    # entries there that are over ``low`` (the others are dropped whatever the exact cut).
    positions, columns = [], []
    count_dtype = torch.float64 if deltas.dtype == torch.float64 else torch.float32
    buffers = ExitStack()
    sure_buffer = buffers.enter_context(scratch(deltas.block_numel, deltas.dtype))
    spare_buffer = buffers.enter_context(scratch(deltas.block_numel, deltas.dtype))

    def merge_block(block: torch.Tensor, start: int) -> torch.Tensor:
        sure, spare = (buffer[: block.numel()].view(block.shape) for buffer in (sure_buffer, spare_buffer))
        for x, y, (low, high) in zip(block, sure, brackets, strict=True):
            torch.hardshrink(x, low, out=x)  # |x| > low: all that the exact cut may keep
            torch.hardshrink(x, high, out=y)  # |x| > high: kept for sure
        # Comparisons written as 0.0/1.0 in the block's dtype: one pass each, where a bool
        # tensor and its sum cost several. Counts in floats are exact (fewer than 2**24 entries).
        undecided = torch.ne(block, sure, out=spare)  # low < |x| <= high
        any_undecided = torch.amax(undecided, dim=0)
        where = any_undecided.view(-1).nonzero().view(-1)
        if where.numel():
            positions.append(where + start)
            columns.append(block.view(n, -1).index_select(1, where))
        above.add_(torch.ne(sure, 0, out=spare).view(n, -1).sum(dim=1, dtype=count_dtype))
        return fn(sure)

    with buffers:
        merged = deltas.merge(merge_block)
    where = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
    # Zero columns pad the positions to whole vectors (see ALIGN); fn's results for them are dropped.
    undecided = torch.cat([*columns, torch.zeros(n, -where.numel() % ALIGN, dtype=deltas.dtype)], dim=1)
    found = [_cut(deltas, k, int(count), bracket, x, where) for count, bracket, x in zip(above, brackets, undecided)]
    if where.numel() and all(isinstance(cut, Cut) for cut in found):
        for x, cut in zip(undecided, found, strict=True):
            cut.apply_(x, int(torch.searchsorted(where, cut.index)))
        merged.view(-1)[where] = fn(undecided.unsqueeze(1)).view(-1)[: where.numel()]
    return merged, found


def _cut(
    deltas: TaskVectors, k: int, above: int, bracket: tuple[float, float], kept: torch.Tensor, where: torch.Tensor
) -> Cut | tuple[float, float]:
    """The exact cut of a task vector with ``above`` entries over its ``bracket`` ``(low, high]``
    and, at the flat indices ``where``, the entries ``kept`` that are over ``low`` (zeros
    elsewhere); or, if the k-th largest magnitude is not in the bracket, the bracket beyond it."""
    low, high = bracket
    rank = k - above
    if rank < 1:
        return (high, math.inf)
    kept = kept[: where.numel()]
    inside = _magnitudes(kept - torch.hardshrink(kept, high) if math.isfinite(high) else kept)
    magnitudes = inside[inside.bool()]
    if rank > magnitudes.numel():
        return (0.0, low) if low > 0 else Cut(deltas.numel, -1.0, -1.0)
    value = float(_kth_largest(magnitudes, rank))
    greater = above + int((magnitudes > value).sum())
    cut = Cut(deltas.numel, _below(value, deltas.dtype), value)
    if greater + int((magnitudes == value).sum()) == k:
        return cut
    tied = k - greater  # entries at exactly the k-th largest that are kept: the first ones
    index = int(where[(inside == value).nonzero()[tied - 1]]) + 1 if tied else 0
    return Cut(index, cut.before, value)


def _kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest value (0-d tensor) of the non-negative 1-D ``a``, ``1 <= k <= a.numel()``.

    A full sort or ``torch.topk``/``torch.kthvalue`` over many entries is 4-5x slower than one
    histogram pass followed by an exact selection among the few entries of one bin.
    """
    scale = _BINS / a.max()
    if not bool(torch.isfinite(scale) & (scale > 0)):
        # All zeros, a denormal maximum or inf/nan entries: binning would break, select directly.
        return torch.kthvalue(a, a.numel() - k + 1).values
    # Rounded multiplication and truncation are monotone, so every entry of a higher bin is
    # strictly larger than every entry of a lower one: only the bin holding the k-th value matters.
    bins = (a * scale).to(torch.int32).clamp_(max=_BINS - 1)
    counts = torch.bincount(bins, minlength=_BINS)
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= k).sum()) - 1
    rank = k - int(at_or_above[b] - counts[b])
    candidates = a[bins == b]
    return torch.kthvalue(candidates, candidates.numel() - rank + 1).values


_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value`` (a positive, finite ``dtype`` number)."""
    return _below_each(torch.tensor([value], dtype=dtype), dtype)[0]


def _below_each(values: torch.Tensor, dtype: torch.dtype) -> list[float]:
    """:func:`_below` of each of the 1-D ``values`` (``dtype`` numbers), in one call."""
    return (values.to(dtype).view(_BITS[dtype]) - 1).view(dtype).tolist()


def _shrink_(x: torch.Tensor, lambd: float) -> torch.Tensor:
    """Zero, in place, the entries of ``x`` with ``|x| <= lambd``: one float pass, no bool mask."""
    if x.numel() and lambd >= 0:
        torch.hardshrink(x, lambd, out=x)
    return x
