"""``classification``: the adapter's own head (PEFT ``modules_to_save``) predicts a class id.

Batches (right padding; ``B`` examples, ``L`` the longest in the batch): ``input_ids`` [B, L]
long, ``attention_mask`` [B, L] long, ``labels`` [B] long (class ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmerge.errors import ConfigError
from lmerge.metrics import MetricSpec, get_metric
from lmerge.tasks.kinds._batches import class_count, pad_inputs, to_device
from lmerge.tasks.kinds.registry import Batch, TaskData, TaskKind, register_kind

if TYPE_CHECKING:
    from lmerge.tasks.spec import TaskSpec


@register_kind
class Classification(TaskKind):
    """The adapter's own head predicts a class id from the model's sequence-classification output."""

    name = "classification"
    has_head = True

    def model_class(self, encoder_decoder: bool) -> str:
        return "AutoModelForSequenceClassification"

    def peft_task_type(self, encoder_decoder: bool) -> str:
        # PEFT keeps the classification head trainable and saves it with the adapter.
        return "SEQ_CLS"

    def finetune_options(self, spec: TaskSpec) -> dict[str, Any]:
        if not spec.label_names:
            raise ConfigError(f"task {spec.name}: classification fine-tuning needs label_names in the catalog")
        # A fresh head for this task, whatever classifier the base checkpoint carries.
        return {"num_labels": len(spec.label_names), "ignore_mismatched_sizes": True}

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of the head's logits against the class labels."""
        return F.cross_entropy(logits.float(), batch["labels"])

    def predict(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, C] class probabilities."""
        return logits.float().softmax(-1)

    def accuracy(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (logits.argmax(-1) == batch["labels"]).float().mean()

    def score(
        self, model: nn.Module, batches: Iterable[Batch], task: TaskSpec, data: TaskData, device: torch.device
    ) -> tuple[float, int]:
        return score_classification(model, batches, get_metric(task.metric), class_count(task.label_names), device)

    def encode(self, data: TaskData, texts: list[str], labels: list[int | str]) -> list[dict[str, Any]]:
        encoded = data.tokenizer(texts, truncation=True, max_length=data.spec.max_length)["input_ids"]
        return [{"input_ids": ids, "label": label} for ids, label in zip(encoded, labels)]

    def collator(self, data: TaskData) -> Callable[[list[dict[str, Any]]], Batch]:
        return partial(collate_classes, pad_id=data.pad_id())


def collate_classes(examples: list[dict[str, Any]], pad_id: int) -> Batch:
    """A classification batch (module docstring) from encoded examples."""
    batch = pad_inputs(examples, pad_id)
    batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return batch


def score_classification(
    model: nn.Module, batches: Iterable[Batch], metric: MetricSpec, n_classes: int, device: torch.device
) -> tuple[float, int]:
    """Metric of the model's class predictions (argmax of its head's logits)."""
    measure = metric.build(n_classes).to(device)
    count = 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        measure.update(logits.argmax(-1), batch["labels"])
        count += len(batch["labels"])
    return float(measure.compute()), count
