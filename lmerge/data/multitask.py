"""``MultiTaskDataModule``: several tasks at once, one batch of every task per training step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader

from lmerge.data.sampling import sampling_strategy
from lmerge.data.task_module import TaskDataModule
from lmerge.errors import ConfigError
from lmerge.tasks.spec import TaskSpec


class MultiTaskDataModule(LightningDataModule):
    """Several tasks at once: a training step gets one batch of every task (a dict task -> batch,
    shorter tasks cycling, Lightning's ``max_size_cycle``); validation and test run the tasks one
    after another (``sequential``), dataloader index i being task ``split_tasks(split)[i]``."""

    def __init__(self, tasks: list[TaskDataModule]) -> None:
        """
        Args:
            tasks: One DataModule per task; task names must differ.
        """
        super().__init__()
        names = [task.name for task in tasks]
        if not names:
            raise ConfigError("MultiTaskDataModule: no tasks given")
        clash = next((n for n in names if names.count(n) > 1), None)
        if clash:
            raise ConfigError(f"MultiTaskDataModule: task {clash!r} is given twice")
        self.tasks = {task.name: task for task in tasks}

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[TaskSpec],
        tokenizer: str,
        *,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        sampling: Mapping[str, Any] | None = None,
        seed: int = 0,
        eval_subset: Mapping[str, Any] | None = None,
        subset_cache_dir: str | Path | None = None,
        group_by_length: bool = False,
    ) -> MultiTaskDataModule:
        """Build from catalog specs, with the ``sampling`` and ``eval_subset`` configs resolved per task."""
        return cls(
            [
                TaskDataModule.from_spec(
                    spec,
                    tokenizer,
                    batch_size=batch_size,
                    eval_batch_size=eval_batch_size,
                    num_workers=num_workers,
                    pin_memory=pin_memory,
                    sampling=sampling_strategy(sampling, spec.name),
                    seed=seed,
                    eval_subset=eval_subset,
                    subset_cache_dir=subset_cache_dir,
                    group_by_length=group_by_length,
                )
                for spec in specs
            ]
        )

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def split_tasks(self, split: str) -> list[str]:
        """The tasks that have data for ``split``, in the order of their evaluation loaders."""
        return [name for name, task in self.tasks.items() if task.has_split(split)]

    def prepare_data(self) -> None:
        for task in self.tasks.values():
            task.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for task in self.tasks.values():
            task.setup(stage)

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({name: task.train_dataloader() for name, task in self.tasks.items()}, "max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        return self._sequential("validation")

    def test_dataloader(self) -> CombinedLoader:
        return self._sequential("test")

    def _sequential(self, split: str) -> CombinedLoader:
        loaders = {name: self.tasks[name].dataloader(split, by_length=True) for name in self.split_tasks(split)}
        return CombinedLoader(loaders, "sequential")
