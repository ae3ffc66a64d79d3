"""The task-kind registry: the only dispatch from a task's ``kind:`` to the code that depends on it.

A kind is one object (a ``TaskKind`` subclass, registered with ``@register_kind`` in its own
file of this package) holding everything kind-specific: the transformers class its base model
loads as, the PEFT task type of a fresh adapter, how labels become examples and batches, the
training loss, the predictive distribution of unlabeled objectives, validation accuracy and the
evaluation scorer. Code looks the kind up once (``TaskSpec.task_kind``) and asks it; nothing
compares a kind's name. A new kind is one new file here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from lmerge.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmerge.adapters.lora import LoraAdapter
    from lmerge.tasks.spec import TaskSpec

Batch = dict[str, Any]


class Scored(NamedTuple):
    """A model's score on one task's split, as a kind computes it."""

    value: float
    """The task's primary metric."""
    examples: int
    """Examples scored."""
    predicted: list[int] | None = None
    """Examples predicted as each class (class-id order), for kinds that predict classes: a
    collapse onto one class shows here before it shows in the metric."""


class TaskData(Protocol):
    """What a kind reads of one task's data (``lmerge.data.TaskDataModule`` provides it)."""

    spec: TaskSpec
    """The fields that shape the data (columns, labels, prompt, lengths); its metric and adapter
    may be defaults, so scoring reads the catalog's spec instead."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def encoder_decoder(self) -> bool:
        """Whether the base model is an encoder-decoder (seq2seq) model."""

    @property
    def candidates(self) -> torch.Tensor | None:
        """The kind's ``label_words``, computed once."""

    def pad_id(self) -> int: ...


class TaskKind(ABC):
    """Everything that depends on a task's kind. Subclass it in a new file of this package, set
    ``name`` (the catalog's ``kind:`` value) and register the class with ``@register_kind``."""

    name: ClassVar[str]
    """The catalog's ``kind:`` value."""
    has_head: ClassVar[bool] = False
    """Each task's adapter carries its own head (PEFT ``modules_to_save``), which the shared
    backbone swaps in per task; its predictions are over the head's class ids."""
    text_answers: ClassVar[bool] = False
    """A language model answers after a prompt: ``prompt`` and text metrics (WER) apply, and a
    label without ``label_names`` is the answer text; otherwise labels are class ids."""
    generates: ClassVar[bool] = False
    """The model generates its answers: a task's ``generation`` settings (decoding, answer
    extraction) apply."""
    default_metric: ClassVar[str] = "accuracy"
    """The primary metric of a task that names none."""
    shared_keys: ClassVar[tuple[str, ...]] = ()
    """Batch entries that are not per example (e.g. every class's label words): a part of a
    batch (:meth:`sub_batch`) keeps them whole."""

    # ---- the task spec ----------------------------------------------------------------------------
    def check(self, spec: TaskSpec, where: str) -> None:
        """Rules of this kind on a task spec beyond the shared ones; ``where`` starts the message."""

    # ---- the model --------------------------------------------------------------------------------
    @abstractmethod
    def model_class(self, encoder_decoder: bool) -> str:
        """The transformers auto class the base model loads as (e.g. ``AutoModelForCausalLM``)."""

    @abstractmethod
    def peft_task_type(self, encoder_decoder: bool) -> str:
        """PEFT's ``task_type`` for a fresh adapter of this kind (e.g. ``CAUSAL_LM``)."""

    def finetune_options(self, spec: TaskSpec) -> dict[str, Any]:
        """``from_pretrained`` options for fine-tuning a fresh adapter on ``spec`` (e.g. a head's size)."""
        return {}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's logits on one of this kind's batches."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # ---- task heads (kinds with ``has_head``) -----------------------------------------------------
    def resolve(self, spec: TaskSpec, base_model: str | None = None) -> TaskKind:
        """The kind object that serves ``spec``: this one, or a variant of it (a classification
        task's pooling). With ``base_model``: for a new head fine-tuned on that model; without: for
        the task's adapter as it is."""
        return self

    def adapter_head(self, spec: TaskSpec, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        """The task head that ``adapter`` carries for ``spec`` (empty: none)."""
        return adapter.head_state()

    def bundle_head(self, spec: TaskSpec, heads_dir: Path) -> dict[str, torch.Tensor] | None:
        """The head of ``spec`` that a merged adapter saved in its ``heads_dir``, or None."""
        return None

    def build_head(self, model: nn.Module, head_state: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
        """``(module path, frozen head module)`` holding ``head_state`` for ``model``."""
        raise ConfigError(f"kind {self.name!r} has no task heads")

    def new_head(self, model: nn.Module, spec: TaskSpec) -> None:
        """Give ``model`` (a PEFT model about to be fine-tuned on ``spec``) a fresh trainable head,
        where PEFT does not make one itself."""

    def save_head(self, model: nn.Module, spec: TaskSpec, directory: Path) -> list[Path]:
        """Save the head :meth:`new_head` made into the adapter ``directory``; the files written."""
        return []

    def __str__(self) -> str:
        return self.name

    # ---- objectives and scores --------------------------------------------------------------------
    @abstractmethod
    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The supervised training loss (mean over the batch)."""

    def loss_terms(self, batch: Batch) -> int:
        """How many terms :meth:`loss` averages over ``batch`` (examples): the losses of a batch's
        parts, each weighted by its own count over the batch's, add up to the batch's loss."""
        return len(batch["input_ids"])

    def split(self, batch: Batch, parts: int) -> list[Batch]:
        """``batch`` as at most ``parts`` batches of examples of similar lengths, each trimmed of
        the padding its own examples do not need (:func:`length_parts`: the fewest padded tokens)."""
        lengths = batch["attention_mask"].sum(1).tolist()
        return [self.sub_batch(batch, rows) for rows in length_parts(lengths, parts)]

    def sub_batch(self, batch: Batch, rows: list[int]) -> Batch:
        """The examples ``rows`` of a right-padded ``batch``, its entries along the input tokens
        (:meth:`token_keys`) cut to the longest of them; entries that are not per example
        (:attr:`shared_keys`) whole."""
        size = len(batch["input_ids"])
        index = torch.tensor(rows, device=batch["input_ids"].device)
        width = int(batch["attention_mask"][index].sum(1).max())
        tokens = self.token_keys(batch)
        part: Batch = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() and len(value) == size and key not in self.shared_keys:
                part[key] = value[index, :width] if key in tokens else value[index]
            elif isinstance(value, list) and len(value) == size and key not in self.shared_keys:
                part[key] = [value[i] for i in rows]
            else:
                part[key] = value
        return part

    def token_keys(self, batch: Batch) -> tuple[str, ...]:
        """The per-example entries of ``batch`` laid out along its input tokens, padded on the right."""
        return ("input_ids", "attention_mask")

    @abstractmethod
    def distillation_loss(self, logits: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> torch.Tensor:
        """KL divergence of ``logits``' predictions from ``teacher``'s (logits on the same batch),
        mean over what the supervised loss averages; reads no label value."""

    @abstractmethod
    def predict(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, C] predictive distribution, read without the labels (for unlabeled objectives)."""

    def accuracy(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """The batch's accuracy, logged during validation; None where it is not defined per batch."""
        return None

    @abstractmethod
    def score(
        self, model: nn.Module, batches: Iterable[Batch], task: TaskSpec, data: TaskData, device: torch.device
    ) -> Scored:
        """The (already folded) model's primary metric of ``task`` on ``batches`` of ``data``, and
        the predicted classes where there are classes (``task`` is the catalog's spec:
        ``data.spec`` holds only the fields that shape the data)."""

    # ---- data ---------------------------------------------------------------------------------------
    def label_words(self, data: TaskData) -> torch.Tensor | None:
        """[C, Lc] token ids of each class's answer, -100-padded, when the kind scores classes by
        their words (else None)."""
        return None

    @abstractmethod
    def encode(self, data: TaskData, texts: list[str], labels: list[int | str]) -> list[dict[str, Any]]:
        """Tokenized examples (each with its ``label``) from input texts and encoded labels."""

    @abstractmethod
    def collator(self, data: TaskData) -> Callable[[list[dict[str, Any]]], Batch]:
        """The batch-building function of the task's loaders (picklable, for DataLoader workers)."""


def length_parts(lengths: list[int], parts: int) -> list[list[int]]:
    """The indices of ``lengths`` in at most ``parts`` groups, each padded to its longest, with the
    fewest padded tokens in all (the fewest groups among equals): sorted by length, the best cut
    points by dynamic programming (``O(parts * n^2)``, for a batch's few dozen examples)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    n = len(ordered)
    parts = max(1, min(parts, n))
    # cost[k][j]: the fewest tokens of the first j examples in k groups; cut[k][j]: where its last group starts.
    cost = [[0] + [ordered[j - 1] * j for j in range(1, n + 1)]]
    cut = [[0] * (n + 1)]
    for k in range(1, parts):
        row, starts = [0] * (n + 1), [0] * (n + 1)
        for j in range(1, n + 1):
            row[j], starts[j] = min((cost[k - 1][i] + ordered[j - 1] * (j - i), i) for i in range(j))
        cost.append(row)
        cut.append(starts)
    k = min(range(parts), key=lambda k: cost[k][n])  # the first of equal costs: the fewest groups
    groups, end = [], n
    for level in range(k, -1, -1):
        start = cut[level][end] if level else 0
        groups.append(order[start:end])
        end = start
    return [group for group in reversed(groups) if group]


KINDS: dict[str, TaskKind] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in KINDS:
        raise RuntimeError(f"task kind {cls.name!r} is registered twice")
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> TaskKind:
    """The kind registered as ``name``; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name not in KINDS:
        raise ConfigError(unknown_name("kind", name, list(KINDS)))
    return KINDS[name]


def kinds_that(selected: Callable[[TaskKind], bool]) -> str:
    """The names of the kinds ``selected`` accepts, for messages: ``'a'`` or ``'a' or 'b'``."""
    return " or ".join(repr(kind.name) for kind in KINDS.values() if selected(kind))
