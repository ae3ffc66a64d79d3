"""``classification``: a task head predicts a class id from one vector per sequence.

The catalog's ``pooling`` says how the sequence becomes that vector: ``cls``, the model's own
sequence-classification class (its head saved by PEFT in ``modules_to_save``); ``mean`` or
``last``, the base model's last hidden state pooled by a :class:`~lmerge.tasks.heads.PooledHead`
saved beside a plain LoRA adapter of the encoder (PEFT ``FEATURE_EXTRACTION``); ``model`` (the
default), what the adapter's head was trained with, and for a new head what the base model was
trained with (a sentence-transformers model's pooling, else ``cls``).

Batches (right padding; ``B`` examples, ``L`` the longest in the batch): ``input_ids`` [B, L]
long, ``attention_mask`` [B, L] long, ``labels`` [B] long (class ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lmerge.errors import ConfigError, unknown_name
from lmerge.metrics import MetricSpec, get_metric
from lmerge.tasks.heads import (
    ADAPTER_HEAD,
    HEAD_MODULE,
    PooledHead,
    copy_model_head,
    has_head,
    head_pooling,
    model_pooling,
    read_head,
    write_head,
)
from lmerge.tasks.kinds._batches import class_count, class_kl, pad_inputs, to_device
from lmerge.tasks.kinds.registry import Batch, Scored, TaskData, TaskKind, get_kind, register_kind

if TYPE_CHECKING:
    from lmerge.adapters.lora import LoraAdapter
    from lmerge.tasks.spec import TaskSpec

POOLINGS = ("model", "mean", "cls", "last")

if TYPE_CHECKING:
    from lmerge.tasks.spec import TaskSpec


@register_kind
class Classification(TaskKind):
    """The adapter's own head predicts a class id from the model's sequence-classification output
    (``cls`` pooling); :meth:`resolve` gives the :class:`PooledClassification` of other poolings."""

    name = "classification"
    has_head = True

    def check(self, spec: TaskSpec, where: str) -> None:
        if spec.pooling not in POOLINGS:
            raise ConfigError(f"{where}: {unknown_name('pooling', spec.pooling, list(POOLINGS))}")

    def resolve(self, spec: TaskSpec, base_model: str | None = None) -> TaskKind:
        pooling = spec.pooling
        if pooling == "model" and base_model is not None:
            pooling = model_pooling(base_model)
        elif pooling == "model":
            # An adapter's pooled head says how it pools; any other head is the model's own.
            pooling = head_pooling(spec.adapter) if spec.adapter and has_head(spec.adapter) else "cls"
        return get_kind(Classification.name) if pooling == "cls" else pooled_classification(pooling)

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

    def distillation_loss(self, logits: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean over the batch of ``KL(teacher || model)`` over the classes."""
        return class_kl(logits, teacher)

    def predict(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, C] class probabilities."""
        return logits.float().softmax(-1)

    def accuracy(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (logits.argmax(-1) == batch["labels"]).float().mean()

    def score(
        self, model: nn.Module, batches: Iterable[Batch], task: TaskSpec, data: TaskData, device: torch.device
    ) -> Scored:
        metric, n_classes = get_metric(task.metric), class_count(task.label_names)
        return score_classification(partial(self.logits, model), batches, metric, n_classes, device)

    def bundle_head(self, spec: TaskSpec, heads_dir: Path) -> dict[str, torch.Tensor] | None:
        file = heads_dir / f"{spec.name}.safetensors"
        if not file.is_file():
            return None
        try:
            return load_file(file)
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"{file}: not a readable safetensors file ({exc})") from None

    def build_head(self, model: nn.Module, head_state: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
        return copy_model_head(model, head_state)

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
    logits: Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],
    metric: MetricSpec,
    n_classes: int,
    device: torch.device,
) -> Scored:
    """Metric of the class predictions (argmax of ``logits(batch)``, the head's logits)."""
    measure = metric.build(n_classes).to(device)
    predicted = torch.zeros(n_classes, dtype=torch.long, device=device)
    for batch in batches:
        batch = to_device(batch, device)
        classes = logits(batch).argmax(-1)
        measure.update(classes, batch["labels"])
        predicted += torch.bincount(classes, minlength=n_classes)[:n_classes]
    counts = predicted.tolist()
    return Scored(float(measure.compute()), sum(counts), counts)


class PooledClassification(Classification):
    """Classification through a :class:`~lmerge.tasks.heads.PooledHead` on the base model's last
    hidden state (``mean`` or ``last`` pooling). The adapter is a plain LoRA of the bare model
    (``AutoModel``, PEFT ``FEATURE_EXTRACTION``); the head is saved beside it as
    ``task_head.json`` + ``task_head.safetensors``, and in a merged bundle as ``heads/<task>.*``."""

    def __init__(self, pooling: str) -> None:
        super().__init__()
        self.pooling = pooling

    def __str__(self) -> str:
        return f"{self.name} ({self.pooling} pooling)"

    def model_class(self, encoder_decoder: bool) -> str:
        if encoder_decoder:
            raise ConfigError(f"pooling {self.pooling}: an encoder-decoder model pools with pooling: cls only")
        return "AutoModel"

    def peft_task_type(self, encoder_decoder: bool) -> str:
        # A plain LoRA of the bare model: the head is ours, saved beside the adapter.
        return "FEATURE_EXTRACTION"

    def finetune_options(self, spec: TaskSpec) -> dict[str, Any]:
        super().finetune_options(spec)  # its checks; the bare model takes no head size
        return {}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        # A PEFT model hands attribute look-ups on to the model it wraps, so the head is found either way.
        return getattr(model, HEAD_MODULE)(hidden, batch["attention_mask"])

    def adapter_head(self, spec: TaskSpec, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        if not has_head(adapter.path):
            raise ConfigError(
                f"task {spec.name}: adapter {adapter.path} has no {ADAPTER_HEAD}.json + {ADAPTER_HEAD}.safetensors "
                f"(a head with {self.pooling} pooling)"
            )
        return self._checked(spec, read_head(adapter.path))

    def bundle_head(self, spec: TaskSpec, heads_dir: Path) -> dict[str, torch.Tensor] | None:
        return self._checked(spec, read_head(heads_dir, spec.name)) if has_head(heads_dir, spec.name) else None

    def build_head(self, model: nn.Module, head_state: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
        if set(head_state) != {"weight", "bias"}:
            raise ConfigError(f"a {self} head holds weight and bias, got {', '.join(sorted(head_state))}")
        return HEAD_MODULE, PooledHead.from_state(self.pooling, head_state)

    def new_head(self, model: nn.Module, spec: TaskSpec) -> None:
        bare = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Set on the bare model after PEFT wrapped it: PEFT never sees it, so it stays out of the adapter.
        head = PooledHead(self.pooling, bare.config.hidden_size, len(spec.label_names))
        setattr(bare, HEAD_MODULE, head.to(next(bare.parameters()).device))

    def save_head(self, model: nn.Module, spec: TaskSpec, directory: Path) -> list[Path]:
        linear = getattr(model, HEAD_MODULE).linear
        return write_head(directory, self.pooling, spec.label_names, linear.weight, linear.bias, root=directory)

    def _checked(self, spec: TaskSpec, head: Any) -> dict[str, torch.Tensor]:
        if head.pooling != self.pooling:
            raise ConfigError(
                f"task {spec.name}: {head.where} was trained with {head.pooling} pooling; "
                f"the catalog says {self.pooling}"
            )
        if spec.label_names and head.label_names and head.label_names != list(spec.label_names):
            raise ConfigError(
                f"task {spec.name}: {head.where} has labels {head.label_names}, the catalog {list(spec.label_names)}"
            )
        return head.state


_POOLED: dict[str, PooledClassification] = {}


def pooled_classification(pooling: str) -> PooledClassification:
    """The one :class:`PooledClassification` of ``pooling`` (one object each, so tasks that share a
    model compare equal)."""
    if pooling not in _POOLED:
        _POOLED[pooling] = PooledClassification(pooling)
    return _POOLED[pooling]
