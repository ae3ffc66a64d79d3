"""Scratch tensors reused from one module's merge to the next in the same thread.

A merge allocates its working buffers (a block of task vectors, DARE's hash bits) once per module.
Buffers of a few MiB come straight from the kernel each time (``malloc`` maps them and unmaps them
when freed), and every fresh 4 KiB page costs a page fault on first touch: in a virtual machine a
few microseconds, as much as a low-rank method's arithmetic on that page. Handed back to a small
per-thread pool instead, they are reused warm by the next request, in this module or the next.

A dense merge in weight space does hundreds of times more work per buffer and needs the memory for
its ``[out, in]`` results: it empties the pool when its module is merged (:func:`release`), as
does the engine when a merge ends. A merge's worker threads end with it, and their pools with them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_KEEP = 4
"""Free buffers a thread keeps: as many as one merge step holds at once."""
_local = threading.local()


@contextmanager
def scratch(numel: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """A 1-D tensor of ``numel`` entries of ``dtype`` (uninitialized) for the ``with`` block, taken
    from this thread's pool when one there is large enough, and given back to it afterwards."""
    pool = _pool()
    fitting = [t for t in pool if t.dtype == dtype and t.numel() >= numel]
    buffer = min(fitting, key=torch.Tensor.numel) if fitting else torch.empty(numel, dtype=dtype)
    pool[:] = [t for t in pool if t is not buffer]
    try:
        yield buffer[:numel]
    finally:
        pool = _pool()  # release() may have replaced it meanwhile
        pool.append(buffer)
        pool.sort(key=torch.Tensor.numel, reverse=True)
        del pool[_KEEP:]


def release() -> None:
    """Empty this thread's pool: its memory goes back to ``malloc`` (buffers in use stay theirs)."""
    _local.pool = []


def _pool() -> list[torch.Tensor]:
    if not hasattr(_local, "pool"):
        _local.pool = []
    return _local.pool
