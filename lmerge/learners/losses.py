"""Per-task losses and predictive distributions for both task kinds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Batch = dict[str, Any]


def classification_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the head's logits against the class labels."""
    return F.cross_entropy(logits.float(), batch["labels"])


def token_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Token-normalized cross-entropy of a causal LM on ``labels != -100`` (shifted by one)."""
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def classification_probs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, C] class probabilities."""
    return logits.float().softmax(-1)


def answer_probs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, C] probabilities at the end of each prompt: over the label words' first tokens when
    the task has label words, else over the whole vocabulary. Reads where the answer starts,
    never which answer it is, so it suits unlabeled objectives."""
    starts = (batch["labels"] != -100).int().argmax(-1)
    rows = torch.arange(len(starts), device=starts.device)
    next_token = logits[rows, starts - 1].float()
    if "candidates" in batch:
        next_token = next_token[:, batch["candidates"][:, 0]]
    return next_token.softmax(-1)


TASK_LOSSES: dict[str, Callable[[torch.Tensor, Batch], torch.Tensor]] = {
    "classification": classification_ce,
    "label_tokens": token_ce,
}
PREDICTIONS: dict[str, Callable[[torch.Tensor, Batch], torch.Tensor]] = {
    "classification": classification_probs,
    "label_tokens": answer_probs,
}


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of ``probs``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
