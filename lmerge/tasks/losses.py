"""Per-task losses and predictive distributions for both task kinds (shared by learners and evaluation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Batch = dict[str, Any]


def classification_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the head's logits against the class labels."""
    return F.cross_entropy(logits.float(), batch["labels"])


def forward_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits on a batch; an encoder-decoder also gets the answer as decoder targets."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if batch.get("encoder_decoder"):
        inputs["labels"] = batch["labels"]
    return model(**inputs).logits


def aligned(logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the label each predicts: a causal LM's position t predicts token t + 1; an
    encoder-decoder's decoder position t predicts label t."""
    if batch.get("encoder_decoder"):
        return logits, labels
    return logits[:, :-1], labels[:, 1:]


def token_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Token-normalized cross-entropy of a language model on ``labels != -100``."""
    logits, labels = aligned(logits.float(), batch["labels"], batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def classification_probs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, C] class probabilities."""
    return logits.float().softmax(-1)


def answer_probs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, C] probabilities at the end of each prompt: over the label words' first tokens when
    the task has label words, else over the whole vocabulary. Reads where the answer starts,
    never which answer it is, so it suits unlabeled objectives."""
    next_token = answer_start_logits(logits, batch).float()
    if "candidates" in batch:
        next_token = next_token[:, batch["candidates"][:, 0]]
    return next_token.softmax(-1)


def answer_start_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, V] logits of each example's first answer token (read from where the labels start)."""
    if batch.get("encoder_decoder"):
        return logits[:, 0]  # the decoder's first position
    starts = (batch["labels"] != -100).int().argmax(-1)
    return logits[torch.arange(len(starts), device=starts.device), starts - 1]


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
