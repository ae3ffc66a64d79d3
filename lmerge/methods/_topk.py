"""Exact top-k by magnitude per task vector, fused with the merge of the pruned task vectors.

The count rule is peft's ``prune(..., method="magnitude")``: ``int(keep_fraction * numel)``
entries survive, and among entries tied at the k-th largest magnitude the first ones in flat
order (a stable sort's order). No sort (:mod:`~lmerge.methods._cuts`):

- Task vectors that fit in one block together (a low-rank method's cores or per-task right
  factors) get their exact cuts from a partition of the block's magnitudes, and are cut and
  merged in it: the block is built once.
- Larger ones are sampled on a lattice, which brackets each one's k-th largest magnitude; a scan
  of every block counts the entries over each bracket and gathers the few inside it, which give
  the exact cuts; then each block is built again, cut and merged. The second build (a GEMM of
  the LoRA rank per entry, or a copy) costs less than merging in the same pass as the scan and
  keeping track of the positions the brackets left undecided, merged again later (the way this
  module took before, a quarter slower on weight-space TIES and on KnOTS's modules of several
  blocks); and its scratch is the block and two bool masks, not three blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack

import torch

from lmerge.methods._cuts import (
    KEEP_ALL,
    BracketScan,
    Cut,
    exact_cuts,
    exactly,
    magnitude_dtype,
    magnitudes_,
    shrink_,
)
from lmerge.methods._scratch import scratch
from lmerge.methods._task_vectors import TaskVectors

_SAMPLE_EVERY = 16
"""Task vectors larger than a block are sampled at one entry in this many (a lattice, see
``TaskVectors.lattice``) to bracket their k-th largest magnitude."""
_SAMPLE_ALL = 1 << 16
"""Task vectors with at most this many entries are sampled whole: their brackets are exact."""
_Z = 4.0
"""Half-width of a bracket in standard deviations of the sample's rank: about one bracket in
15000 misses, and then the task vectors are scanned again."""
_BINS = 4096
"""Histogram bins per task vector, for a sample's order statistics (:func:`_brackets`)."""


def merge_top_k(deltas: TaskVectors, keep_fraction: float, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` of the task vectors, each cut to its ``int(keep_fraction * numel)`` largest magnitudes.

    ``fn`` maps a block ``[n, ..., in]`` (scratch) to its merge ``[..., in]`` position by position.
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
        cut = Cut(0, math.inf, math.inf) if k == 0 else KEEP_ALL
        return deltas.merge(lambda block, start: fn(shrink_(block, cut.after))), [cut] * deltas.n
    if deltas.one_block:
        return _merge_in_one_block(deltas, k, fn)
    cuts = _scanned_cuts(deltas, k)
    return _merge_with_cuts(deltas, cuts, fn), cuts


def _merge_in_one_block(
    deltas: TaskVectors, k: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, list[Cut]]:
    """The merge of task vectors that :meth:`TaskVectors.merge` hands over in one block: each
    one's exact cut from a partition of the block's magnitudes, applied in place, then ``fn``. A
    sample and a scan cost more here (measured: brackets from a sample of the block, then a
    :class:`~lmerge.methods._cuts.BracketScan`, took 2.6-3.5 ms for a million entries in 8 rows,
    the partition 1.9-2.3 ms)."""
    cuts: list[Cut] = []

    def merge_block(block: torch.Tensor, start: int) -> torch.Tensor:
        flat = block.view(block.shape[0], -1)
        cuts.extend(exact_cuts(flat, k))
        for x, cut in zip(flat, cuts, strict=True):
            cut.apply_(x, cut.index)
        return fn(block)

    return deltas.merge(merge_block), cuts


def _scanned_cuts(deltas: TaskVectors, k: int) -> list[Cut]:
    """The exact cuts of task vectors larger than a block: brackets from a sample, then a
    scan of every block; where a bracket missed, a second scan with it widened to all that lies
    beyond (which cannot miss) and the others narrowed to the entries at their exact cut."""
    every = 1 if deltas.numel <= _SAMPLE_ALL else _SAMPLE_EVERY
    brackets = _brackets(magnitudes_(deltas.lattice(every)), k, deltas.numel, exact=every == 1)
    for _ in range(2):
        found = _scan(deltas, k, brackets)
        if all(isinstance(cut, Cut) for cut in found):
            return found
        brackets = [exactly(cut, deltas.dtype) if isinstance(cut, Cut) else cut for cut in found]
    raise AssertionError(f"top-k brackets {brackets} missed again: {found}")


def _scan(deltas: TaskVectors, k: int, brackets: list[tuple[float, float]]) -> list[Cut | tuple[float, float]]:
    """One :class:`~lmerge.methods._cuts.BracketScan` of every block of ``deltas``."""
    n, dtype = deltas.n, magnitude_dtype(deltas.dtype)
    scan = BracketScan(brackets, deltas.dtype)
    with ExitStack() as buffers:
        over, inside = (buffers.enter_context(scratch(deltas.block_numel, torch.bool)) for _ in range(2))
        # The block is built again for the merge: its own magnitudes can overwrite it, unless
        # they are wider than it (half types).
        widened = None if deltas.dtype == dtype else buffers.enter_context(scratch(deltas.block_numel, dtype))
        for block, start in deltas.blocks():
            flat = block.view(n, -1)
            a = (flat if widened is None else widened[: flat.numel()].view(flat.shape).copy_(flat)).abs_()
            scan.add(a, start, over[: a.numel()].view(a.shape), inside[: a.numel()].view(a.shape))
    return scan.cuts(k, deltas.numel)


def _merge_with_cuts(deltas: TaskVectors, cuts: list[Cut], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` of every block of ``deltas`` with each task vector cut at its ``cuts``."""

    def merge_block(block: torch.Tensor, start: int) -> torch.Tensor:
        flat = block.view(block.shape[0], -1)
        for x, cut in zip(flat, cuts, strict=True):
            cut.apply_(x, min(max(cut.index - start, 0), x.numel()))
        return fn(block)

    return deltas.merge(merge_block)


def _brackets(sample: torch.Tensor, k: int, numel: int, exact: bool) -> list[tuple[float, float]]:
    """Per task vector of ``numel`` entries ``(low, high)`` such that its k-th largest magnitude
    very likely lies in ``(low, high]``, from one histogram of the magnitudes ``sample`` [n, m],
    which it overwrites (``exact``: the sample is everything): the k-th largest's rank in a
    sample of m is ``k * m / numel``, give or take ``_Z`` binomial standard deviations, widened to
    whole histogram bins."""
    n, m = sample.shape
    expected = k * m / numel
    spread = 0.0 if exact else _Z * math.sqrt(expected * (1 - k / numel))
    top, bottom = math.floor(expected - spread) - 1, math.ceil(expected + spread) + 1
    # The bins take the sample's place where they are as wide (a weight-space sample of an 8B
    # model's MLP module is 117 MB at n = 8).
    bins = sample.view(torch.int32) if sample.dtype == torch.float32 else torch.empty_like(sample, dtype=torch.int32)
    scale, counts = _histogram_(sample, bins)
    binnable = scale > 0
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


def _histogram_(magnitudes: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, counts)``: each row of ``magnitudes`` [n, m] (float32 or float64, overwritten
    by ``magnitudes * scale``) counted in :data:`_BINS` equal bins from 0 to its maximum, entry
    ``x`` in bin ``trunc(x * scale)``; ``bins`` (int32 [n, m], which may be ``magnitudes``'
    own memory viewed as int32: each entry is converted where it lies) gets each entry's bin
    plus ``_BINS`` times its row. A row of zeros, with a denormal maximum or with inf/nan cannot
    be binned: its scale is 0 and all of it goes to bin 0 (the clamp also takes inf * 0 = nan
    there)."""
    n = magnitudes.shape[0]
    scale = _BINS / magnitudes.amax(dim=1)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 0.0)
    bins.copy_(magnitudes.mul_(scale.view(n, 1))).clamp_(0, _BINS - 1)  # the copy truncates
    bins.add_(torch.arange(0, n * _BINS, _BINS, dtype=torch.int32).view(n, 1))
    return scale, torch.bincount(bins.view(-1), minlength=n * _BINS).view(n, _BINS)
