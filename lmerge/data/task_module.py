"""``TaskDataModule``: one task's train/validation/test splits, tokenized with the base model's
tokenizer, in the batch format of the task's kind (``lmerge.tasks.kinds``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lmerge.data.sampling import STRATEGIES, ResumableLoader, make_sampler
from lmerge.data.subsets import subset_indices
from lmerge.errors import ConfigError, unknown_name
from lmerge.tasks.spec import SPLITS, TaskSpec, available_splits, load_task_dataset, select_split

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}


class TaskDataModule(LightningDataModule):
    """One task's train/validation/test data, tokenized with the base model's tokenizer."""

    def __init__(
        self,
        name: str,
        tokenizer: str,
        dataset: dict[str, Any],
        kind: str = "classification",
        splits: dict[str, str] | None = None,
        text_column: str = "text",
        label_column: str = "label",
        label_names: list[str] | None = None,
        prompt: str | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        sampling: Literal["uniform", "inverse", "sqrt_inverse", "balanced", "none"] = "none",
        seed: int = 0,
        subsets: dict[str, list[int]] | None = None,
        group_by_length: bool = False,
    ) -> None:
        """
        Args:
            name: Task name.
            tokenizer: Directory or hub name of the base model's tokenizer (no remote code).
            dataset: ``datasets.load_dataset`` keyword arguments.
            kind: The task kind (``lmerge.tasks.kinds``), e.g. ``classification`` or ``label_tokens``.
            splits: Our split names -> the dataset's; None: train/validation/test where present.
            text_column: Column with the input text.
            label_column: Column with the label (name, class id, or answer text).
            label_names: Class names in class-id order.
            prompt: Template with ``{text}`` for kinds with text answers; None: the text alone.
            max_length: Most tokens per example; long prompts lose their start, keeping BOS.
            batch_size: Training batch size.
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            num_workers: DataLoader worker processes.
            pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies.
            sampling: Training-loader sampling by label frequency (``lmerge.data.sampling``).
            seed: Seed of the training shuffle or sampler.
            subsets: Our split name -> row indices to keep (an eval subset); other splits whole.
            group_by_length: Training batches of examples of similar length (each run of 50
                batches' draws sorted by length, the batches shuffled within it): the same
                examples, less padding, so faster steps when lengths vary.
        """
        super().__init__()
        # The spec checks the task fields the same way as a catalog entry is checked.
        self.spec = TaskSpec(
            name=name,
            kind=kind,
            dataset=dataset,
            splits=splits,
            text_column=text_column,
            label_column=label_column,
            label_names=label_names,
            prompt=prompt,
            max_length=max_length,
        )
        if sampling not in STRATEGIES:
            raise ConfigError(f"task {name}: {unknown_name('sampling strategy', sampling, list(STRATEGIES))}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"task {name}: {key} must be a positive integer, got {value!r}")
        for split in subsets or {}:
            if split not in SPLITS:
                raise ConfigError(f"task {name}: subsets: {unknown_name('split', split, list(SPLITS))}")
        self.name = name
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.sampling = sampling
        self.seed = seed
        self.subsets = dict(subsets or {})
        self.group_by_length = group_by_length
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._data: DatasetDict | None = None
        self._encoded: dict[str, list[dict[str, Any]]] = {}
        self._candidates: torch.Tensor | None = None
        self._encoder_decoder: bool | None = None

    @classmethod
    def from_spec(
        cls,
        spec: TaskSpec,
        tokenizer: str,
        *,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        sampling: str = "none",
        seed: int = 0,
        eval_subset: Mapping[str, Any] | None = None,
        subset_cache_dir: str | Path | None = None,
        subset_splits: Sequence[str] = ("validation", "test"),
        group_by_length: bool = False,
    ) -> TaskDataModule:
        """A DataModule for a catalog task; ``eval_subset`` (the config of ``lmerge.data.subsets``)
        picks the rows kept of each of ``subset_splits``, cached under ``subset_cache_dir``."""
        if spec.dataset is None:
            raise ConfigError(f"task {spec.name}: the catalog entry has no dataset")
        subsets: dict[str, list[int]] = {}
        if eval_subset:
            data = load_task_dataset(spec.name, spec.dataset)
            for split in subset_splits:
                if split not in available_splits(spec.splits, list(data)):
                    continue
                rows = select_split(
                    data,
                    task=spec.name,
                    split=split,
                    splits=spec.splits,
                    columns=[spec.text_column, spec.label_column],
                    dataset=spec.dataset,
                )
                labels = spec.encode_labels(rows[spec.label_column], split)
                indices = subset_indices(
                    labels, task=spec.name, split=split, config=eval_subset, cache_dir=subset_cache_dir
                )
                if indices is not None:
                    subsets[split] = indices
        return cls(
            name=spec.name,
            tokenizer=tokenizer,
            dataset=spec.dataset,
            kind=spec.kind,
            splits=spec.splits,
            text_column=spec.text_column,
            label_column=spec.label_column,
            label_names=spec.label_names,
            prompt=spec.prompt,
            max_length=spec.max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            sampling=sampling,
            seed=seed,
            subsets=subsets or None,
            group_by_length=group_by_length,
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from lmerge.tasks.models import trust_remote_code

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.tokenizer_path, trust_remote_code=trust_remote_code()
                )
            except (OSError, ValueError) as exc:
                reason = " ".join(str(exc).split())
                where = f"task {self.name}: tokenizer {self.tokenizer_path}"
                raise ConfigError(f"{where}: cannot be loaded ({reason})") from None
        return self._tokenizer

    @property
    def candidates(self) -> torch.Tensor | None:
        """[C, Lc] answer token ids of every label name, -100-padded, where the task's kind scores
        classes by their words (``label_tokens`` with ``label_names``); else None."""
        if self._candidates is None:
            # Kept for every later batch, so never an inference tensor (evaluation runs in inference mode).
            with torch.inference_mode(False):
                self._candidates = self.spec.task_kind.label_words(self)
        return self._candidates

    def available_splits(self) -> list[str]:
        """Our split names that this task has data for."""
        return available_splits(self.spec.splits, list(self._dataset()))

    def has_split(self, split: str) -> bool:
        """Whether the task has data for our ``split``."""
        return split in self.available_splits()

    def prepare_data(self) -> None:
        """Download (or find in the cache) the dataset and the tokenizer, once per machine."""
        load_task_dataset(self.name, self.spec.dataset)
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the splits that ``stage`` uses (all of them for None)."""
        for split in _STAGE_SPLITS.get(stage or "", SPLITS):
            if self.has_split(split):
                self.examples(split)

    def dataloader(
        self, split: str, shuffle: bool = False, batch_size: int | None = None, by_length: bool = False
    ) -> DataLoader:
        """Batches of our ``split``; ``shuffle`` draws through the sampling strategy when one is
        set, else in a seeded random order (grouped by length with ``group_by_length``), from a
        loader that resumes mid-epoch from a checkpoint.
        ``by_length`` (unshuffled only) batches the examples shortest first. Batches are
        ``batch_size`` when given, else the training batch size for train and ``eval_batch_size``
        for the others."""
        if batch_size is None:
            batch_size = self.batch_size if split == "train" else self.eval_batch_size
        return self.loader(self.examples(split), shuffle, batch_size, by_length)

    def loader(
        self, examples: list[dict[str, Any]], shuffle: bool, batch_size: int, by_length: bool = False
    ) -> DataLoader:
        """Batches of ``examples`` (some of :meth:`examples`), as :meth:`dataloader` makes them."""
        options = {
            "batch_size": batch_size,
            "collate_fn": self.collator(),
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
        }
        if not shuffle:
            if by_length:
                # Scores and mean losses do not depend on the order; batches of similar lengths pad
                # little (half the tokens on the demo's tasks), so evaluation runs about twice as fast.
                examples = sorted(examples, key=lambda example: len(example["input_ids"]))
            return DataLoader(examples, **options)
        lengths = [len(e["input_ids"]) for e in examples] if self.group_by_length else None
        labels = [e["label"] for e in examples]
        sampler = make_sampler(labels, self.sampling, self.seed, lengths=lengths, batch_size=batch_size)
        return ResumableLoader(examples, sampler, **options)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning to skip validation for a task without that split.
        return self.dataloader("validation", by_length=True) if self.has_split("validation") else []

    def test_dataloader(self) -> DataLoader | list:
        return self.dataloader("test", by_length=True) if self.has_split("test") else []

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The batch-building function of this task's loaders."""
        return self.spec.task_kind.collator(self)

    def label_counts(self, split: str) -> dict[str | int, int]:
        """Examples per label in our ``split`` (after its subset): every label name in class
        order when ``label_names`` is set (zeros included), else each class id or answer text."""
        counts = Counter(e["label"] for e in self.examples(split))
        if self.spec.label_names:
            return {name: counts[i] for i, name in enumerate(self.spec.label_names)}
        return dict(sorted(counts.items()))

    def class_prior(self) -> torch.Tensor:
        """[C] float share of each class in the training split."""
        counts = Counter(e["label"] for e in self.examples("train"))
        if self.spec.label_names:
            n_classes = len(self.spec.label_names)
        elif not self.spec.task_kind.text_answers:
            n_classes = max(counts) + 1
        else:
            raise ConfigError(f"task {self.name}: a class prior needs label_names (answers are free text)")
        prior = torch.tensor([counts[i] for i in range(n_classes)], dtype=torch.float)
        return prior / prior.sum()

    def _dataset(self) -> DatasetDict:
        if self._data is None:
            self._data = load_task_dataset(self.name, self.spec.dataset)
        return self._data

    def examples(self, split: str) -> list[dict[str, Any]]:
        """Tokenized examples of our ``split``, encoded once by the task's kind: ``input_ids``,
        ``label`` (class id, or answer text for free-text answers) and what else the kind needs."""
        if split in self._encoded:
            return self._encoded[split]
        spec = self.spec
        rows = select_split(
            self._dataset(),
            task=self.name,
            split=split,
            splits=spec.splits,
            columns=[spec.text_column, spec.label_column],
            dataset=spec.dataset,
        )
        # Labels are checked on the whole split, so an error's row number is the file's row.
        labels = spec.encode_labels(rows[spec.label_column], split)
        indices = self.subsets.get(split)
        if indices is not None:
            if indices and not 0 <= min(indices) <= max(indices) < len(rows):
                raise ConfigError(f"task {self.name}: subset of split {split} has indices outside 0..{len(rows) - 1}")
            rows = rows.select(indices)
            labels = [labels[i] for i in indices]
        texts = list(rows[spec.text_column])
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                where = indices[row] if indices is not None else row
                raise ConfigError(f"task {self.name}: split {split}, row {where}: text is {text!r}, not a string")
        examples = spec.task_kind.encode(self, texts, labels)
        self._encoded[split] = examples
        return examples

    @property
    def encoder_decoder(self) -> bool:
        """Whether the base model is an encoder-decoder (seq2seq) model, read from its config."""
        if self._encoder_decoder is None:
            from transformers import AutoConfig

            from lmerge.tasks.models import trust_remote_code

            try:
                config = AutoConfig.from_pretrained(self.tokenizer_path, trust_remote_code=trust_remote_code())
                self._encoder_decoder = bool(config.is_encoder_decoder)
            except (OSError, ValueError):
                self._encoder_decoder = False  # a tokenizer directory without a model config
        return self._encoder_decoder

    def pad_id(self) -> int:
        """The id that pads batches: the tokenizer's pad token, else its EOS."""
        tokenizer = self.tokenizer
        # Llama-style tokenizers often have no pad token; padding is masked out, so EOS serves.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ConfigError(f"task {self.name}: tokenizer {self.tokenizer_path} has neither a pad nor an EOS token")
        return pad
