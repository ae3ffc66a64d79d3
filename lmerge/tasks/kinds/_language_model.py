"""Language-model pieces that kinds answering in tokens share: the forward pass (an
encoder-decoder also gets the answer as decoder targets), aligning logits with the tokens they
predict, teacher-forced cross-entropy and distillation, and tokenizing an answer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmerge.tasks.kinds._batches import IGNORE_INDEX, class_kl
from lmerge.tasks.kinds.registry import Batch


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
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
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def token_kl(logits: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> torch.Tensor:
    """:func:`class_kl` at the positions that predict an answer token (``labels != -100``)."""
    logits, labels = aligned(logits, batch["labels"], batch)
    teacher, _ = aligned(teacher, batch["labels"], batch)
    answer = labels != IGNORE_INDEX
    return class_kl(logits[answer], teacher[answer])


def answer_start_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, V] logits of each example's first answer token (read from where the labels start)."""
    if batch.get("encoder_decoder"):
        return logits[:, 0]  # the decoder's first position
    starts = (batch["labels"] != IGNORE_INDEX).int().argmax(-1)
    return logits[torch.arange(len(starts), device=starts.device), starts - 1]


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the label tokens and the mask of positions that count
    (``labels != -100``)."""
    logits, labels = aligned(logits.float(), labels, batch)
    mask = labels != IGNORE_INDEX
    picked = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def keep_end(prompt: list[int], room: int, bos: int | None) -> list[int]:
    """``prompt`` within ``room`` tokens: its end (the cue that the answer follows) and its BOS
    when it starts with one; what goes is the start of the text."""
    if len(prompt) <= room:
        return prompt
    head = prompt[:1] if bos is not None and prompt[0] == bos else []
    return head + prompt[len(prompt) - room + len(head) :]


def answer_ids(tokenizer: object, answer: str) -> list[int]:
    """Token ids of ``" " + answer``, then EOS when the tokenizer has one."""
    ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    # EOS ends the answer, so a label that is a prefix of another ("no" / "none") is still told apart.
    return ids + [eos] if eos is not None else ids
