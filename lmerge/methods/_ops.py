"""Tensor math and parameter checks that the merge methods share.

Pure torch: no model, adapter or file handling. Sign election and the disjoint mean follow
``peft.utils.merge_utils`` (``calculate_majority_sign_mask(method="total")`` and
``disjoint_merge``), which is the TIES paper's merge: the mean over the adapters that agree with
the elected sign, not their sum.

Dense methods get a module's task vectors as :class:`TaskVectors` and merge them a block of
rows at a time: each block is built from the LoRA factors into a reused buffer of a few MiB and
every step on it is an in-place pass, so the dense ``[n, out, in]`` stack never exists. Top-k
pruning is exact without a separate pass over the data (:func:`merge_top_k`) and DARE draws its
masks from a counter-based hash, block by block (:class:`DareMask`). Boolean temporaries are
avoided: comparisons that produce ``bool`` tensors cost several times a float pass on CPU, so
masks are applied with ``hardshrink``, ``clamp``, ``sign`` and integer bit operations.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from lmerge.errors import MethodError
from lmerge.methods.registry import ModuleContext

# ---------------------------------------------------------------- task vectors in row blocks

_BLOCK = 1 << 20
"""Entries per block (all task vectors together): 4 MiB of float32, so that a block and the
temporaries of the steps on it stay in cache, while each step is one call over many entries
(a torch call costs microseconds, more when it wakes another thread)."""
_MIN_ROWS = 12
"""Fewest rows a block of products has: MKL multiplies fewer rows with other kernels that round
differently, and with 12 or more every block is bitwise the same rows of the full ``B @ A``."""
_ALIGN = 64
"""Blocks start at multiples of this many entries, so that a reduction over the task vectors
(``sum(dim=0)``) takes each entry through the same vectorized code as one over the whole stack:
a block is bitwise the rows of the full result."""


class TaskVectors:
    """The task vectors ``delta_i`` [out, in] of one module's n adapters, a block of rows at a time.

    From LoRA factors a block is ``B_i[rows] @ A_i`` computed into a reused buffer (one batched
    GEMM when the ranks are equal); from a dense stack ``[n, out, in]`` it is a copy of the rows.
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
        self._stacked = None
        if dense is not None:
            self.n, rows, cols = dense.shape
            self.dtype = dense.dtype
        else:
            As, Bs = factors
            self.n, rows, cols = len(As), Bs[0].shape[0], As[0].shape[1]
            self.dtype = torch.result_type(Bs[0], As[0])
            if len({(A.shape[0], A.dtype, B.dtype) for A, B in zip(As, Bs, strict=True)}) == 1:
                self._stacked = torch.stack(As), torch.stack(Bs)
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

    def merge(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """``[out, in]`` made of ``fn(block, start)`` for each block of rows: ``block`` [n, rows, in]
        holds those rows of every task vector and ``start`` is its first entry's flat index."""
        merged = torch.empty(self.shape, dtype=self.dtype)
        cols = self.shape[1]
        blocks = self._row_blocks(self._block_elements // (self.n * cols))
        buffer = torch.empty(self.n * max(rows.stop - rows.start for rows in blocks) * cols, dtype=self.dtype)
        for rows in blocks:
            block = buffer[: self.n * (rows.stop - rows.start) * cols].view(self.n, -1, cols)
            if self._dense is not None:
                block.copy_(self._dense[:, rows])
            elif self._stacked is not None:
                torch.bmm(self._stacked[1][:, rows], self._stacked[0], out=block)
            else:
                for i, (A, B) in enumerate(zip(*self._factors, strict=True)):
                    torch.mm(B[rows], A, out=block[i])
            merged[rows] = fn(block, rows.start * cols)
        return merged

    def values_at(self, i: int, positions: torch.Tensor) -> torch.Tensor:
        """Entries of task vector ``i`` at the flat ``positions`` (to sample it; from factors
        each is a sum of r products, not bitwise the GEMM's)."""
        if self._dense is not None:
            return self._dense[i].reshape(-1)[positions]
        A, B = self._factors[0][i], self._factors[1][i]
        rows, cols = positions.div(self.shape[1], rounding_mode="floor"), positions.remainder(self.shape[1])
        products = B.index_select(0, rows).mul_(A.T.contiguous().index_select(0, cols))
        return products @ products.new_ones(products.shape[1])  # row . column

    def _row_blocks(self, rows_per_block: int) -> list[slice]:
        rows, align = self.shape[0], _ALIGN // math.gcd(self.shape[1], _ALIGN)
        rows_per_block = max(rows_per_block // align, -(-_MIN_ROWS // align), 1) * align
        starts = list(range(0, rows, rows_per_block))
        if len(starts) > 1 and rows - starts[-1] < _MIN_ROWS:
            starts.pop()  # a short last block joins the one before it
        return [slice(r0, r1) for r0, r1 in zip(starts, starts[1:] + [rows], strict=True)]


# ---------------------------------------------------------------- magnitude pruning (top-k)

_BINS = 4096
"""Histogram bins for the k-th largest search: with 4096 bins the bin that holds the k-th value
of a 3M-entry array has ~1k entries, so the exact selection inside it costs nothing."""
_SAMPLE = (1 << 14, 1 << 16)
"""Entries of a task vector sampled to bracket its k-th largest magnitude: 1/64 of them, within
these bounds (or all). A larger sample costs more but narrows the brackets, so that fewer
positions are merged twice; this balances the two."""
_Z = 3.5
"""Half-width of a bracket in standard deviations of the sample's rank: about one task vector in
2000 falls outside, and the module is merged again with a bracket that cannot miss."""


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
    bits = torch.tensor(value, dtype=dtype).view(_BITS[dtype])
    return float((bits - 1).view(dtype))


def _shrink_(x: torch.Tensor, lambd: float) -> torch.Tensor:
    """Zero, in place, the entries of ``x`` with ``|x| <= lambd``: one float pass, no bool mask."""
    if x.numel() and lambd >= 0:
        torch.hardshrink(x, lambd, out=x)
    return x


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
    The cut is exact, with peft's count rule and ties kept in flat order (see :class:`Cut`), yet
    takes no separate pass: a strided sample brackets each task vector's k-th largest magnitude
    in ``(low, high]``, entries above a bracket are kept and the others outside it dropped for
    sure, so a position where no task vector has an entry inside its bracket is merged at once.
    The other positions (a few percent per task vector) are gathered and merged again once the
    entries inside the brackets have given the exact cuts.
    """
    return _top_k(deltas, keep_fraction, fn)[0]


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
    merged, found = _bracketed_merge(deltas, k, [_bracket(deltas, i, k) for i in range(deltas.n)], fn)
    if not all(isinstance(cut, Cut) for cut in found):
        # A bracket missed: merge again with it widened to all that lies beyond (which cannot
        # miss) and the others narrowed to the entries at their exact cut.
        brackets = [_exactly(cut, deltas.dtype) if isinstance(cut, Cut) else cut for cut in found]
        merged, found = _bracketed_merge(deltas, k, brackets, fn)
        if not all(isinstance(cut, Cut) for cut in found):
            raise AssertionError(f"top-k brackets {brackets} missed again: {found}")
    return merged, found


def _exactly(cut: Cut, dtype: torch.dtype) -> tuple[float, float]:
    """A bracket that holds only the magnitudes at ``cut``, the k-th largest."""
    return (_below(cut.after, dtype), cut.after) if cut.after > 0 else (0.0, 0.0)


def _bracket(deltas: TaskVectors, i: int, k: int) -> tuple[float, float]:
    """``(low, high)`` such that the k-th largest magnitude of task vector ``i`` very likely lies
    in ``(low, high]``, from a strided sample (all entries when there are few)."""
    numel, cols = deltas.numel, deltas.shape[1]
    stride = max(1, numel // min(max(numel // 64, _SAMPLE[0]), _SAMPLE[1]))
    while math.gcd(stride, cols) != 1:  # visit every column, not a sublattice of them
        stride += 1
    sample = _magnitudes(deltas.values_at(i, torch.arange(stride // 2, numel, stride)))
    m = sample.numel()
    expected = k * m / numel  # the k-th largest's rank within the sample
    spread = _Z * math.sqrt(expected * (1 - k / numel)) + 2
    top, bottom = math.floor(expected - spread), math.ceil(expected + spread)
    high = float(_kth_largest(sample, top)) if top >= 1 else math.inf
    low = float(_kth_largest(sample, bottom)) if bottom <= m else 0.0
    return low, high


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in float32 or float64 (half types are exact in float32, and histograms want it)."""
    x = x.abs()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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
    spare = torch.empty(0, dtype=deltas.dtype)

    def merge_block(block: torch.Tensor, start: int) -> torch.Tensor:
        nonlocal spare
        if spare.numel() < 2 * block.numel():
            spare = torch.empty(2 * block.numel(), dtype=deltas.dtype)
        sure, kept = spare[: 2 * block.numel()].view(2, *block.shape)
        for x, y, z, (low, high) in zip(block, sure, kept, brackets, strict=True):
            torch.hardshrink(x, high, out=y)  # |x| > high: kept for sure
            torch.hardshrink(x, low, out=z)  # |x| > low: all that the exact cut may keep
        # Count in floats (exact: a block has fewer than 2**24 entries); a bool sum would copy twice.
        signs = torch.sign(sure, out=block).abs_().view(n, -1)
        above.add_(signs.sum(dim=1, dtype=torch.float64 if signs.dtype == torch.float64 else torch.float32))
        inside = torch.sub(kept, sure, out=block)  # low < |x| <= high: undecided
        spread = inside.amax(dim=0).abs_().add_(inside.amin(dim=0).abs_())  # 0 where none is undecided
        where = spread.view(-1).bool().nonzero().view(-1)
        if where.numel():
            positions.append(where + start)
            columns.append(kept.view(n, -1).index_select(1, where))
        return fn(sure)

    merged = deltas.merge(merge_block)
    where = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
    # Zero columns pad the positions to whole vectors (see _ALIGN); fn's results for them are dropped.
    undecided = torch.cat([*columns, torch.zeros(n, -where.numel() % _ALIGN, dtype=deltas.dtype)], dim=1)
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


# ---------------------------------------------------------------- DARE

_M32, _M64 = (1 << 32) - 1, (1 << 64) - 1


def _int32(value: int) -> int:
    """``value`` modulo 2**32 as a signed 32-bit integer (what torch's int32 ops wrap to)."""
    value &= _M32
    return value - (1 << 32) if value >> 31 else value


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


_GOLDEN = _int32(0x9E3779B1)
_MIX = (_int32(0x7FEB352D), _int32(0x846CA68B))


class DareMask:
    """DARE's random keep-mask of one module: entry ``j`` (flat index) of task vector ``i`` is kept
    with probability ``1 - drop_rate``, the same for the same ``seed`` and module ``key`` in any
    process, on any machine and whatever the blocks.

    A counter-based generator: the entry's bits are a 32-bit integer hash of ``c_i + j`` (a
    golden-ratio multiply, then lowbias32's xorshift-multiply rounds), with ``c_i`` drawn per
    (seed, key, i) by splitmix64 (``zlib.crc32`` of the key, since str hashing is salted per
    process). That is about ten int32 passes over a block instead of a serial Mersenne Twister,
    and any block can be drawn on its own. The keep probability is exact to 2**-31.
    """

    def __init__(self, drop_rate: float, seed: int, key: str) -> None:
        self.drop_rate = drop_rate
        self._bound = round((1.0 - drop_rate) * 2**31) - 2**30  # kept iff (hash >> 1) < bound
        self._seed = _splitmix64(_splitmix64(seed & _M64) ^ zlib.crc32(key.encode("utf-8")))
        self._starts: list[int] = []  # c_i, drawn as task vectors are met
        self._ramp = self._bits = self._shifted = torch.empty(0, dtype=torch.int32)

    def keep(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The boolean keep-mask of the task vectors stacked as ``shape`` ([n, ...])."""
        n = shape[0]
        return self._keep_bits(n, math.prod(shape[1:]), 0).view(shape).bool()

    def apply_(self, block: torch.Tensor, start: int) -> torch.Tensor:
        """``block`` [n, rows, in] (rows of the task vectors from flat index ``start``) with the
        dropped entries zeroed in place; not rescaled."""
        keep = self._keep_bits(block.shape[0], block[0].numel(), start).view(block.shape)
        if block.dtype == torch.float32 and block.is_contiguous():
            block.view(torch.int32).bitwise_and_(keep)  # kept: x & ~0 == x; dropped: all bits 0 == +0.0
        else:
            block.mul_(keep.neg_())
        return block

    def _keep_bits(self, n: int, size: int, start: int) -> torch.Tensor:
        """[n, size] int32: -1 (all bits set) where kept, 0 where dropped, for the flat entries
        ``start .. start + size`` of each of n task vectors (a buffer reused by the next call)."""
        while len(self._starts) < n:
            self._starts.append(_splitmix64(self._seed ^ len(self._starts)))
        if self._ramp.numel() < size:
            self._ramp = torch.arange(size, dtype=torch.int32).mul_(_GOLDEN)  # j * golden, wrapped
        if self._bits.numel() < n * size:
            self._bits = torch.empty(n * size, dtype=torch.int32)
            self._shifted = torch.empty_like(self._bits)
        offsets = torch.tensor([_int32((c + start) * _GOLDEN) for c in self._starts[:n]], dtype=torch.int32)
        x = torch.add(self._ramp[:size], offsets.view(n, 1), out=self._bits[: n * size].view(n, size))
        shifted = self._shifted[: n * size].view(n, size)
        for shift, mix in zip((16, 15), _MIX, strict=True):
            x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=shifted)).mul_(mix)
        # (hash >> 1) - bound cannot overflow; its sign bit, spread by >> 31, is the keep mask.
        return x.bitwise_right_shift_(1).sub_(self._bound).bitwise_right_shift_(31)


def dare_mask(shape: torch.Size | tuple[int, ...], drop_rate: float, seed: int, key: str) -> torch.Tensor:
    """Boolean keep-mask of DARE for task vectors stacked as ``shape`` (see :class:`DareMask`)."""
    return DareMask(drop_rate, seed, key).keep(shape)


def dare(deltas: torch.Tensor, drop_rate: float, seed: int, key: str) -> torch.Tensor:
    """DARE on ``deltas [n, ...]``: drop entries at random, rescale the rest by ``1 / (1 - drop_rate)``.

    Every task vector gets its own mask, the same for the same ``seed`` and module ``key`` in
    any process. The methods apply the same masks block by block (:meth:`DareMask.apply_`).
    """
    return deltas * dare_mask(deltas.shape, drop_rate, seed, key) / (1.0 - drop_rate)


# ---------------------------------------------------------------- sign election, disjoint mean


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """Elected sign (+1/-1, dtype of ``deltas``) of each entry: the sign of the sum over adapters.

    A zero sum elects +1, as peft's ``calculate_majority_sign_mask(method="total")``.
    """
    return _sign_of(deltas.sum(dim=0))


def _sign_of(total: torch.Tensor) -> torch.Tensor:
    """In place: +1 where ``total >= 0``, -1 elsewhere (sign is -1, 0 or 1; +0.5 makes 0 positive)."""
    return total.sign_().add_(0.5).sign_()


def disjoint_mean_(deltas: torch.Tensor) -> torch.Tensor:
    """Elect signs and average, per entry, the adapters whose entry is nonzero and has the elected
    sign (0 where none); ``deltas`` [n, ...] is overwritten.

    No bool temporary: times the elected sign the agreeing entries are the positive ones, so
    ``clamp`` keeps them, their sum times the sign is their signed sum (the same float sum,
    negated) and ``sign`` counts them.
    """
    sign = _sign_of(deltas.sum(dim=0))
    agreeing = deltas.mul_(sign).clamp_(min=0)
    total = agreeing.sum(dim=0).mul_(sign)
    return total.div_(agreeing.sign_().sum(dim=0).clamp_(min=1))


def module_lambda(params: dict[str, Any], ctx: ModuleContext, name: str) -> float:
    """The lambda for this module: the policy's value, else the method's own parameter ``name``."""
    return float(params[name] if ctx.lam is None else ctx.lam)


def check_equal_ranks(As: list[torch.Tensor], method: str, ctx: ModuleContext) -> None:
    """Factor averaging needs one rank: ``A_i`` of shape ``[r, in]`` for every adapter."""
    ranks = [A.shape[0] for A in As]
    if len(set(ranks)) > 1:
        raise MethodError(f"method {method!r} needs equal LoRA ranks, {ctx.key} has ranks {ranks}")


def _bad(name: str, message: str) -> MethodError:
    return MethodError(f"method_params.{name}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(params: dict[str, Any], name: str) -> float:
    """``params[name]`` as a finite float (stored back)."""
    value = params[name]
    if not _is_number(value):
        raise _bad(name, f"expected a finite number, got {value!r}")
    params[name] = float(value)
    return params[name]


def check_range(params: dict[str, Any], name: str, low: float, high: float, *, high_open: bool = False) -> float:
    """``params[name]`` as a float in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    value = check_number(params, name)
    if value < low or value > high or (high_open and value == high):
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise _bad(name, f"must be in {interval}, got {value:g}")
    return value


def check_int(params: dict[str, Any], name: str) -> int:
    """``params[name]`` as an int; a float with an integral value is accepted."""
    value = params[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, f"expected an integer, got {value!r}")
    params[name] = value
    return value


def check_bool(params: dict[str, Any], name: str) -> bool:
    """``params[name]``, which must be a bool (the registry casts CLI strings)."""
    value = params[name]
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {value!r}")
    return value


def parse_yaml(name: str, value: Any) -> Any:
    """A string given on the command line parsed as YAML (``"[0.5, 0.5]"``); anything else as is."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise _bad(name, f"cannot parse {value!r}") from None


def number_list(name: str, value: Any, n_adapters: int) -> list[float]:
    """``value`` (a list or its YAML string) as ``n_adapters`` finite floats, one per adapter."""
    value = parse_yaml(name, value)
    if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
        raise _bad(name, f"expected a list of {n_adapters} numbers (one per adapter), got {value!r}")
    if len(value) != n_adapters:
        raise _bad(name, f"has {len(value)} values for {n_adapters} adapters: {list(value)!r}")
    return [float(v) for v in value]
