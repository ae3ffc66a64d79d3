"""Pieces of batches that every kind shares: padding the inputs, moving a batch to a device, the
divergence of one prediction from another."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmerge.tasks.kinds.registry import Batch

IGNORE_INDEX = -100


def pad_inputs(examples: list[dict[str, Any]], pad_id: int) -> Batch:
    """``input_ids`` [B, L] (right-padded with ``pad_id``) and ``attention_mask`` [B, L] of the
    examples' ``input_ids``, ``L`` the longest in the batch."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with its tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def class_count(label_names: list[str] | None) -> int:
    """Classes a task's metric is built for: its label names, or two (right / wrong) without."""
    return len(label_names or ()) or 2


def class_kl(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(logits))`` over the last dim, mean over the rows."""
    rows = logits.reshape(-1, logits.shape[-1]).float().log_softmax(-1)
    targets = teacher.reshape(-1, teacher.shape[-1]).float().log_softmax(-1)
    return F.kl_div(rows, targets, log_target=True, reduction="batchmean")
