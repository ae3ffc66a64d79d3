"""Score one task on one loader: run the (already folded) model and compute its metric."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmerge.metrics import MetricSpec
from lmerge.tasks.losses import aligned, answer_start_logits, forward_logits

Batch = dict[str, Any]


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def score_classification(
    model: nn.Module, batches: Iterable[Batch], metric: MetricSpec, n_classes: int, device: torch.device, **_: Any
) -> tuple[float, int]:
    """Metric of the model's class predictions (argmax of its head's logits)."""
    measure = metric.build(n_classes).to(device)
    count = 0
    for batch in batches:
        batch = _to(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        measure.update(logits.argmax(-1), batch["labels"])
        count += len(batch["labels"])
    return float(measure.compute()), count


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the label tokens and the mask of positions that count
    (``labels != -100``)."""
    logits, labels = aligned(logits.float(), labels, batch)
    mask = labels != -100
    picked = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def score_label_tokens(
    model: nn.Module,
    batches: Iterable[Batch],
    metric: MetricSpec,
    n_classes: int,
    device: torch.device,
    candidates: Sequence[Sequence[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    **_: Any,
) -> tuple[float, int]:
    """Exact match of the answer tokens. With label words (``candidates``, one token list per
    class), the prediction is the label word the model finds most likely after the prompt;
    without, every teacher-forced answer token must be the model's argmax. Text metrics
    (WER) compare the decoded argmax answer with the reference answer."""
    measure = metric.build(n_classes).to(device)
    count = 0
    for batch in batches:
        batch = _to(batch, device)
        logits = forward_logits(model, batch)
        labels = batch["labels"]
        count += len(labels)
        predicted_logits, target = aligned(logits, labels, batch)
        if metric.on_text:
            predicted = predicted_logits.argmax(-1)
            mask = target != -100
            hyps = [decode(predicted[i][mask[i]].tolist()) for i in range(len(labels))]
            refs = [decode(target[i][mask[i]].tolist()) for i in range(len(labels))]
            measure.update(hyps, refs)
        elif candidates:
            scores = _candidate_scores(model, batch, logits, candidates)
            measure.update(scores.argmax(-1), batch["class_ids"])
        else:
            mask = target != -100
            correct = ((predicted_logits.argmax(-1) == target) | ~mask).all(-1)
            # Exact match as a two-class accuracy: class 1 = the whole answer is right.
            measure.update(correct.long(), torch.ones_like(correct, dtype=torch.long))
    return float(measure.compute()), count


def _candidate_scores(
    model: nn.Module, batch: Batch, logits: torch.Tensor, candidates: Sequence[Sequence[int]]
) -> torch.Tensor:
    """[B, n_classes] log-likelihood of each label word after each example's prompt."""
    labels = batch["labels"]
    firsts = [c[0] for c in candidates]
    if len(set(firsts)) == len(firsts) and all(len(c) == 1 for c in candidates):
        # Single-token label words: one forward pass already holds every candidate's score.
        return F.log_softmax(answer_start_logits(logits, batch).float(), -1)[:, firsts]
    scores = []
    for candidate in candidates:
        if batch.get("encoder_decoder"):
            target = torch.tensor([list(candidate)] * len(labels), device=labels.device)
            asked = {**batch, "labels": target}
        else:
            ids, mask, target = _with_answer(batch, (labels != -100).int().argmax(-1), candidate)
            asked = {"input_ids": ids, "attention_mask": mask, "labels": target}
        picked, _ = answer_log_probs(forward_logits(model, asked), target, asked)
        scores.append(picked.sum(-1))
    return torch.stack(scores, -1)


def _with_answer(
    batch: Batch, starts: torch.Tensor, answer: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each example's prompt followed by ``answer``, right-padded, with labels on the answer."""
    input_ids = batch["input_ids"]
    answer_ids = torch.tensor(list(answer), device=input_ids.device)
    width = int(starts.max()) + len(answer)
    ids = torch.zeros(len(input_ids), width, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    for i, start in enumerate(starts.tolist()):
        ids[i, :start] = input_ids[i, :start]
        ids[i, start : start + len(answer)] = answer_ids
        mask[i, : start + len(answer)] = 1
        target[i, start : start + len(answer)] = answer_ids
    return ids, mask, target


SCORERS: dict[str, Callable[..., tuple[float, int]]] = {
    "classification": score_classification,
    "label_tokens": score_label_tokens,
}
