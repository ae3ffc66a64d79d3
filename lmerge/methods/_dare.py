"""DARE's random drop masks: a counter-based hash, so that any block of any task vector can be
drawn on its own and the masks are the same in any process."""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from lmerge.methods._scratch import scratch

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


_CHUNK = 1 << 18
"""Entries whose hash bits :meth:`DareMask.apply_` draws at a time: its two int32 buffers take 1 MiB
each, where a whole block's (a few million entries at an 8B model's MLP shapes) would take tens
of MiB per merging thread, for a few calls less."""
_GOLDEN = _int32(0x9E3779B1)
_INT32_MAX = (1 << 31) - 1
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
        # Kept iff the hash, a signed int32 (uniform over its 2**32 values), is below this: then
        # 2 round((1 - p) 2**31) of them are kept, exact to 2**-31; for p = 0 it is above them all.
        self._threshold = 2 * round((1.0 - drop_rate) * 2**31) - 2**31
        self._seed = _splitmix64(_splitmix64(seed & _M64) ^ zlib.crc32(key.encode("utf-8")))
        self._starts: list[int] = []  # c_i, drawn as task vectors are met
        self._ramp = np.empty(0, dtype=np.int32)

    def keep(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The boolean keep-mask of the task vectors stacked as ``shape`` ([n, ...])."""
        n, size = shape[0], math.prod(shape[1:])
        if self._keeps_all:
            return torch.ones(shape, dtype=torch.bool)
        with scratch(n * size, torch.int32) as bits, scratch(n * size, torch.int32) as shifted:
            return self._hashes(n, size, 0, bits, shifted).lt(self._threshold).view(shape)

    def apply_(self, block: torch.Tensor, start: int) -> torch.Tensor:
        """``block`` [n, rows, in] (rows of the task vectors from flat index ``start``) with the
        dropped entries zeroed in place; not rescaled."""
        n, size = block.shape[0], block[0].numel()
        if self._keeps_all:
            return block
        flat = block.view(n, size)
        width = max(1, min(size, _CHUNK // n))
        with scratch(n * width, torch.int32) as bits, scratch(n * width, torch.int32) as shifted:
            for begin in range(0, size, width):
                part = flat[:, begin : begin + width]
                used = part.numel()
                hashes = self._hashes(n, part.shape[1], start + begin, bits[:used], shifted[:used])
                keep = torch.lt(hashes, self._threshold, out=hashes)  # 1 where kept, 0 where dropped
                if part.dtype == torch.float32:
                    part.view(torch.int32).bitwise_and_(keep.neg_())  # kept: x & ~0 == x; dropped: all bits 0 == +0.0
                else:
                    part.mul_(keep)
        return block

    @property
    def _keeps_all(self) -> bool:
        return self._threshold > _INT32_MAX

    def _hashes(self, n: int, size: int, start: int, bits: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
        """[n, size] int32 in ``bits`` (``shifted``: scratch of the same size): the hashes of the
        flat entries ``start .. start + size`` of each of n task vectors. Computed by numpy, whose
        int32 shifts, xors and wrapping multiplies take a tenth less time than torch's here."""
        while len(self._starts) < n:
            self._starts.append(_splitmix64(self._seed ^ len(self._starts)))
        if self._ramp.size < size:
            self._ramp = np.arange(size, dtype=np.int32) * np.int32(_GOLDEN)  # j * golden, wrapped
        offsets = np.array([_int32((c + start) * _GOLDEN) for c in self._starts[:n]], dtype=np.int32)
        x, spare = bits.view(n, size).numpy(), shifted.view(n, size).numpy()
        np.add(self._ramp[:size], offsets[:, None], out=x)
        for shift, mix in zip((16, 15), _MIX, strict=True):
            np.bitwise_xor(x, np.right_shift(x, shift, out=spare), out=x)
            np.multiply(x, np.int32(mix), out=x)
        return bits.view(n, size)


def dare_mask(shape: torch.Size | tuple[int, ...], drop_rate: float, seed: int, key: str) -> torch.Tensor:
    """Boolean keep-mask of DARE for task vectors stacked as ``shape`` (see :class:`DareMask`)."""
    return DareMask(drop_rate, seed, key).keep(shape)


def dare(deltas: torch.Tensor, drop_rate: float, seed: int, key: str) -> torch.Tensor:
    """DARE on ``deltas [n, ...]``: drop entries at random, rescale the rest by ``1 / (1 - drop_rate)``.

    Every task vector gets its own mask, the same for the same ``seed`` and module ``key`` in
    any process. The methods apply the same masks block by block (:meth:`DareMask.apply_`).
    """
    return deltas * dare_mask(deltas.shape, drop_rate, seed, key) / (1.0 - drop_rate)
