"""Tensor math and parameter checks that the merge methods share.

Pure torch: no model, adapter or file handling. Sign election and the disjoint mean follow
``peft.utils.merge_utils`` (``calculate_majority_sign_mask(method="total")`` and
``disjoint_merge``), which is the TIES paper's merge: the mean over the adapters that agree with
the elected sign, not their sum.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import yaml

from lmerge.errors import MethodError
from lmerge.methods.registry import ModuleContext

_BINS = 4096
"""Histogram bins for the k-th largest search: with 4096 bins the bin that holds the k-th value
of a 3M-entry task vector has ~1k entries, so the exact selection inside it costs nothing."""


def _kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest value (0-d tensor) of the non-negative 1-D ``a``, ``1 <= k <= a.numel()``.

    A full sort or ``torch.topk``/``torch.kthvalue`` over millions of entries is 4-5x slower than
    one histogram pass followed by an exact selection among the few entries of one bin.
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


def topk_mask(x: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask of the ``int(keep_fraction * x.numel())`` entries of largest ``|x|``.

    The count rule is peft's ``prune(..., method="magnitude")``. Among entries tied at the
    threshold the first ones in flattened order are kept, so exactly that many survive.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    n = x.numel()
    k = int(keep_fraction * n)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k == n:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().reshape(-1)
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()  # half types: exact in float32, and histogram ops want it
    threshold = _kth_largest(a, k)
    mask = a >= threshold
    extra = int(mask.sum()) - k
    if extra > 0:
        tied = a == threshold
        keep_tied = int(tied.sum()) - extra
        mask = (a > threshold) | (tied & (tied.cumsum(0) <= keep_tied))
    return mask.view(x.shape)


def prune_magnitude(deltas: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """``deltas [n, ...]`` with each task vector ``deltas[i]`` cut to its top-k magnitudes."""
    mask = torch.stack([topk_mask(delta, keep_fraction) for delta in deltas])
    return torch.where(mask, deltas, 0.0)


def dare_generator(seed: int, key: str) -> torch.Generator:
    """CPU generator seeded from ``seed`` and the module key.

    ``zlib.crc32`` rather than ``hash`` because string hashing is randomised per process, and a
    CPU generator so that the masks do not depend on the device either. The CPU generator keeps
    only the low 32 bits of its seed, so both parts are folded into those.
    """
    generator = torch.Generator()
    generator.manual_seed((seed ^ zlib.crc32(key.encode("utf-8"))) & 0xFFFFFFFF)
    return generator


def dare_mask(shape: torch.Size | tuple[int, ...], drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean keep-mask (on CPU): each entry is kept with probability ``1 - drop_rate``."""
    return torch.rand(shape, generator=generator) >= drop_rate


def dare(deltas: torch.Tensor, drop_rate: float, seed: int, key: str) -> torch.Tensor:
    """DARE on ``deltas [n, ...]``: drop entries at random, rescale the rest by ``1 / (1 - drop_rate)``.

    Every task vector gets its own mask (one draw over the whole stack), the same for the same
    ``seed`` and module ``key`` in any process.
    """
    mask = dare_mask(deltas.shape, drop_rate, dare_generator(seed, key)).to(deltas.device)
    return deltas * mask / (1.0 - drop_rate)


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """Elected sign (+1/-1, dtype of ``deltas``) of each entry: the sign of the sum over adapters.

    A zero sum elects +1, as peft's ``calculate_majority_sign_mask(method="total")``.
    """
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_mean(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the adapters whose entry is nonzero and has the elected ``sign``; 0 where none."""
    agree = deltas.sign() == sign
    total = (deltas * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(deltas.dtype)


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
