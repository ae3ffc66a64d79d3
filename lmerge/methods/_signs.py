"""TIES sign election and disjoint mean, as ``peft.utils.merge_utils``
(``calculate_majority_sign_mask(method="total")`` and ``disjoint_merge``): the mean over the
adapters that agree with the elected sign, not their sum."""

from __future__ import annotations

import torch


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
