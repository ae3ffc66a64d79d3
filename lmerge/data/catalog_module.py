"""``CatalogDataModule``: catalog tasks by name, with the flat arguments of ``lmerge fit`` configs."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import CombinedLoader

from lmerge.data.multitask import MultiTaskDataModule
from lmerge.errors import ConfigError
from lmerge.outputs import DEFAULT_OUTPUT_DIR, subsets_dir
from lmerge.tasks.spec import TaskSpec, catalog_tasks


class CatalogDataModule(MultiTaskDataModule):
    """Catalog tasks by name, with flat arguments for ``lmerge fit`` configs. Training draws one
    batch of every task per step from ``fit_split``: ``train`` to fine-tune, ``validation`` for
    supervised coefficient learners, ``test`` for AdaMerging (which reads inputs, never labels)."""

    def __init__(
        self,
        catalog: str,
        tasks: list[str],
        fit_split: Literal["train", "validation", "test"] = "train",
        tokenizer: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        eval_subset: dict[str, Any] | None = None,
        subset_cache_dir: str | None = None,
        holdout: float = 0.0,
        group_by_length: bool = False,
    ) -> None:
        """
        Args:
            catalog: Task catalog YAML.
            tasks: Catalog task names.
            fit_split: The split that training steps draw from.
            tokenizer: Tokenizer directory; default: the base model of the first task's adapter.
            batch_size: Examples per task per training step.
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            num_workers: DataLoader worker processes.
            pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies.
            sampling: Label-frequency sampling config ``{default: {...}, per_task: {...}}``.
            seed: Seed of shuffles and samplers.
            eval_subset: Eval-subset config for the validation and test splits.
            subset_cache_dir: Where eval-subset indices are cached; default: ``subsets/`` under the
                default output root.
            holdout: Share of each task's ``fit_split`` examples (a seeded random pick, at least one)
                kept out of training and validated on instead of the validation split: what early
                stopping and best-coefficient callbacks watch when a learner trains on the
                validation split itself. 0: train on all of it, validate on the validation split.
            group_by_length: Training batches of examples of similar length (each run of 50
                batches' draws sorted by length, the batches shuffled within it): every example
                drawn as often, less padding, so faster steps when lengths vary.
        """
        if not 0 <= holdout < 1:
            raise ConfigError(f"data.holdout: must be in [0, 1), got {holdout}")
        chosen = catalog_tasks(catalog, tasks, key="data.tasks")
        tokenizer = tokenizer or _base_model_of(chosen)
        built = MultiTaskDataModule.from_specs(
            chosen,
            tokenizer,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            sampling=sampling,
            seed=seed,
            eval_subset=eval_subset,
            subset_cache_dir=subset_cache_dir or subsets_dir(DEFAULT_OUTPUT_DIR),
            group_by_length=group_by_length,
        )
        super().__init__(list(built.tasks.values()))
        self.catalog = catalog
        self.fit_split = fit_split
        self.fit_batch_size = batch_size
        self.holdout = holdout
        self.seed = seed

    def split_tasks(self, split: str) -> list[str]:
        if split == "validation" and self.holdout:
            return super().split_tasks(self.fit_split)
        return super().split_tasks(split)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {
            name: task.loader(self._part(name, held_out=False), True, self.fit_batch_size)
            for name, task in self.tasks.items()
        }
        return CombinedLoader(loaders, "max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        if not self.holdout:
            return super().val_dataloader()
        loaders = {
            name: self.tasks[name].loader(
                self._part(name, held_out=True), False, self.tasks[name].eval_batch_size, by_length=True
            )
            for name in self.split_tasks("validation")
        }
        return CombinedLoader(loaders, "sequential")

    def _part(self, task: str, held_out: bool) -> list[dict[str, Any]]:
        """The fit split's examples of ``task`` that are trained on, or the held-out ones."""
        examples = self.tasks[task].examples(self.fit_split)
        if not self.holdout:
            return examples
        if len(examples) < 2:
            raise ConfigError(f"data.holdout: task {task} has {len(examples)} {self.fit_split} example(s), too few")
        count = min(len(examples) - 1, max(1, round(self.holdout * len(examples))))
        # Seeded by the task's name too, so that adding a task leaves the other tasks' parts as they were.
        generator = torch.Generator().manual_seed(self.seed + zlib.crc32(task.encode()))
        order = torch.randperm(len(examples), generator=generator).tolist()
        chosen = sorted(order[:count]) if held_out else sorted(order[count:])
        return [examples[i] for i in chosen]


def _base_model_of(specs: Sequence[TaskSpec]) -> str:
    from lmerge.adapters.lora import LoraAdapter

    for spec in specs:
        base = LoraAdapter(spec.adapter).base_model if spec.adapter else None
        if base:
            return base
    raise ConfigError("data.tokenizer: no task adapter names its base model; give the tokenizer directory")
